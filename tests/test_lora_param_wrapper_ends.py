"""peft's lora.ParamWrapper on an input embedding's weight, the LM head's (tied or not), GPT-2's
Conv1D weights and Phi-3's fused projections (finetune.target_parameters; issue 19).

Oracle: peft 0.21.2's real model on the CPU (transformers 5.25): its parameter list, what
autograd saves in one forward + loss, and what each layer's recomputation saves under full
checkpointing, measured by benchmarks/lora_param_wrapper_ends.py and stored in
benchmarks/results/lora-param-wrapper-ends.json. The default run holds memplan's torch-free
prediction to the stored numbers; the live peft runs are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lora_param_wrapper_ends import (
    baseline_doc,
    case_doc,
    forward_cases,
    parameter_cases,
    recompute_cases,
    with_baseline,
)
from memplan.config.load import validate
from memplan.model.finetune import lora as finetune
from memplan.model.sources import from_config
from memplan.precision import TORCH_NAMES
from tests.test_lora_moe import most_saved, recompute_per_layer

RESULTS = (
    Path(__file__).resolve().parent.parent
    / "benchmarks"
    / "results"
    / "lora-param-wrapper-ends.json"
)
STORED = json.loads(RESULTS.read_text())


def _id(case: dict[str, Any]) -> str:
    extra = "-".join(f"{k}={v}" for k, v in case.get("finetune", {}).items())
    parts = [case["family"], case["target"], case["precision"], case.get("ck", ""), extra]
    return "-".join(p for p in parts if p)


def test_stored_results_cover_every_case() -> None:
    strip = ("measured_bytes", "measured_delta_per_layer", "parameters")
    for key, cases in (
        ("forward", forward_cases()),
        ("recompute", recompute_cases()),
        ("parameters", parameter_cases()),
    ):
        stored = [{k: v for k, v in c.items() if k not in strip} for c in STORED[key]]
        assert stored == cases, key
    assert STORED["dirty"] is False
    assert STORED["versions"]["peft"] == "0.21.2"
    assert STORED["versions"]["transformers"] == "5.25.0"


@pytest.mark.parametrize("case", STORED["parameters"], ids=[_id(c) for c in STORED["parameters"]])
def test_parameter_list_equals_peft(case: dict[str, Any]) -> None:
    """memplan's parameter list (name, shape, dtype, trainable), in order, equals peft's: the
    wrapped module's weight under base_layer, lora_A [r, in] and lora_B [out, r] after it;
    GPT-2's tied lm_head.weight wrapped on lm_head alone, transformer.wte.weight frozen
    (before, 'matches no parameter of the model')."""
    doc = case_doc(case)
    spec = validate(doc).spec
    inv = finetune.apply(spec, from_config(doc["model"]["architecture"]))
    held = spec.recipe().parameters
    mine = [
        [t.name, list(t.shape), TORCH_NAMES[t.dtype or held], t.trainable] for t in inv.parameters
    ]
    assert mine == case["parameters"]


@pytest.mark.parametrize("case", STORED["forward"], ids=[_id(c) for c in STORED["forward"]])
def test_saved_bytes_equal_peft_measured(case: dict[str, Any]) -> None:
    """Every family x wrapped weight x recipe x checkpointing: memplan's saved bytes equal
    what peft's real model saved (before, 'not modelled', or the head taken for a lora.Linear:
    llama qv+head bf16 70,496 B low)."""
    predicted = most_saved(case_doc(case))
    assert predicted.modelled, predicted.notes
    assert predicted.bytes == case["measured_bytes"]


@pytest.mark.parametrize("case", STORED["recompute"], ids=[_id(c) for c in STORED["recompute"]])
def test_recomputed_wrapper_tensors_equal_peft_measured(case: dict[str, Any]) -> None:
    """Under full checkpointing GPT-2's wrapped Conv1D and Phi-3's wrapped fused weights are
    merged again in each layer's backward: memplan's per-layer recompute with them, minus
    without them, equals the measured."""
    base = recompute_per_layer(baseline_doc(case))
    with_wrapped = recompute_per_layer(with_baseline(case))
    delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
    assert delta == case["measured_delta_per_layer"]
    assert all(d > 0 for d in delta)


@pytest.mark.slow
@pytest.mark.parametrize("case", forward_cases()[::16], ids=[_id(c) for c in forward_cases()[::16]])
def test_live_saved_bytes_equal_the_prediction(case: dict[str, Any]) -> None:
    from benchmarks.lora_moe import measure_forward

    doc = case_doc(case)
    assert measure_forward(doc) == most_saved(doc).bytes
