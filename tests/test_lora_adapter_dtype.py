"""16-bit LoRA adapters on a 16-bit model under autocast (issue 19, found beside the MoE work).

With `autocast_adapter_dtype: false` (or an engine that casts the whole module: DeepSpeed,
Megatron) the adapters stay in the model's bf16; under autocast to bf16, lora_A then reads x
itself (no cast is made: x, the adapter and autocast share one dtype), so x's storage is saved
even where the base linear is frozen. Oracle: what autograd saves in peft 0.21.2's real model
on the CPU (tests/test_finetune_peft.py's saved_bytes).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.model.sources import from_config
from tests.test_finetune_peft import (
    AMP_BF16_BASE,
    GPT2,
    LLAMA3,
    MIXTRAL,
    make,
    most_saved,
    peft_model,
    saved_bytes,
)

CASES = [
    (LLAMA3, ["q_proj", "v_proj"]),
    (LLAMA3, "all-linear"),
    (GPT2, ["c_attn"]),
    (MIXTRAL, ["q_proj", "v_proj", "w2"]),
]


@pytest.mark.parametrize(
    ("config", "targets"),
    CASES,
    ids=[f"{c['model_type']}-{t if isinstance(t, str) else '+'.join(t)}" for c, t in CASES],
)
def test_bf16_adapters_under_autocast_save_x_itself(config: dict, targets: Any) -> None:
    ft = {"method": "lora", "target_modules": targets, "autocast_adapter_dtype": False}
    spec = make(config, ft, precision=AMP_BF16_BASE)
    predicted = most_saved(spec, from_config(config))
    assert predicted.modelled
    assert saved_bytes(peft_model(config, spec), spec, config) == predicted.bytes
