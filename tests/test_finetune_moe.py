"""LoRA on transformers-5 MoE models: peft wraps the router and the fused expert parameters.

Oracle: peft's own get_peft_model (0.21.2) on the tiny model transformers builds; memplan's
trainable tensors must be the same multiset of shapes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.sources import from_config
from tests.conftest import make_spec
from tests.test_moe_states import MIXTRAL, QWEN3_MOE


def _peft_trainable(arch: dict[str, Any], targets: Any, rank: int) -> list[tuple[int, ...]]:
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=targets))
    return sorted(tuple(p.shape) for p in peft_model.parameters() if p.requires_grad)


def _memplan_trainable(arch: dict[str, Any], targets: Any, rank: int) -> list[tuple[int, ...]]:
    spec = make_spec(
        model={"architecture": arch},
        finetune={"method": "lora", "rank": rank, "target_modules": targets},
    )
    inv = finetune.apply(spec, from_config(arch))
    return sorted(t.shape for t in inv.parameters if t.trainable)


@pytest.mark.parametrize("arch", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
@pytest.mark.parametrize(
    ("targets", "rank"),
    [
        ("all-linear", 8),
        ("all-linear", 4),
        (["q_proj", "v_proj"], 8),
        (["q_proj", "gate"], 4),
    ],
)
def test_lora_trainable_tensors_match_peft(arch: dict[str, Any], targets: Any, rank: int) -> None:
    assert _memplan_trainable(arch, targets, rank) == _peft_trainable(arch, targets, rank)


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_expert_lists_match_peft(rank: int) -> None:
    """Naming the v4 expert projections: both halves of the fused gate_up_proj give it 2r."""
    for arch, names in ((MIXTRAL, ["w1", "w3", "w2"]), (QWEN3_MOE, ["gate_proj", "up_proj"])):
        assert _memplan_trainable(arch, names, rank) == _peft_trainable(arch, names, rank)


def test_half_a_fused_projection_is_refused_like_peft() -> None:
    with pytest.raises(ValueError, match="Cannot convert PEFT target"):
        _peft_trainable(MIXTRAL, ["w1"], 8)
    with pytest.raises(MemplanError, match="without w3"):
        _memplan_trainable(MIXTRAL, ["w1"], 8)
