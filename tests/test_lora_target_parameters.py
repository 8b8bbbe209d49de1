"""finetune.target_parameters: peft's `LoraConfig(target_parameters=...)` (issue 19).

Oracle: peft 0.21.2's real model on the CPU (transformers 5.25): its named_parameters (name,
shape, dtype, requires_grad) and what autograd saves in one forward + loss, measured by
benchmarks/lora_target_parameters.py and stored in benchmarks/results/
lora-target-parameters.json. The default run holds memplan's torch-free inventory and
activations to the stored numbers; the live peft runs are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lora_target_parameters import (
    FORWARD_CASES,
    PARAMETER_CASES,
    spec_doc,
)
from memplan import activations
from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.sources import from_config
from memplan.precision import TORCH_NAMES
from memplan.report.settings import layout_of, setting_of

RESULTS = (
    Path(__file__).resolve().parent.parent
    / "benchmarks"
    / "results"
    / "lora-target-parameters.json"
)
STORED = json.loads(RESULTS.read_text())


def inventory(doc: dict[str, Any]) -> Any:
    spec = validate(doc).spec
    return spec, finetune.apply(spec, from_config(doc["model"]["architecture"]))


def memplan_parameters(doc: dict[str, Any]) -> list[list[Any]]:
    """memplan's inventory as [name, shape, dtype, trainable], peft's order."""
    spec, inv = inventory(doc)
    held = spec.recipe().parameters
    return [
        [t.name, list(t.shape), TORCH_NAMES[t.dtype or held], t.trainable] for t in inv.parameters
    ]


def most_saved(doc: dict[str, Any]) -> activations.Activations:
    spec, trained = inventory(doc)
    st, lay = setting_of(spec), layout_of(spec)
    steps = spec.training.gradient_accumulation_steps
    stages = activations.for_stages(trained, st, lay, spec.finetune, steps)
    return max(stages, key=lambda a: a.bytes)


def _id(row: dict[str, Any]) -> str:
    ft = "-".join(
        f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in row["finetune"].items()
    )
    return "-".join(str(p) for p in (row["model"], ft, row["precision"], row.get("ck", "")) if p)


def test_stored_results_cover_every_case() -> None:
    stored = {(r["model"], json.dumps(r["finetune"]), r["precision"]) for r in STORED["parameters"]}
    wanted = {(m, json.dumps(ft), p) for m, ft in PARAMETER_CASES for p in ("fp32", "bf16")}
    assert stored == wanted
    assert len(STORED["forward"]) == len(FORWARD_CASES)
    assert STORED["versions"]["peft"] == "0.21.2"


@pytest.mark.parametrize("row", STORED["parameters"], ids=[_id(r) for r in STORED["parameters"]])
def test_parameter_list_equals_peft(row: dict[str, Any]) -> None:
    """Every parameter of peft's model, in order: the wrapped parameter under `base_layer`
    (frozen), the wrapper's lora_A [r x E, in] / lora_B [out, r x E] (trainable); beside
    target_modules or alone; exclude_modules not consulted; Llama's default q_proj/v_proj
    added where target_modules is not given."""
    doc = spec_doc(row["model"], row["finetune"], row["precision"])
    assert memplan_parameters(doc) == row["parameters"]


@pytest.mark.parametrize("row", STORED["forward"], ids=[_id(r) for r in STORED["forward"]])
def test_saved_bytes_equal_peft_measured(row: dict[str, Any]) -> None:
    """The MoE block's wrappers named by target_parameters take memplan.activations.lora_moe's
    rules: saved bytes equal what peft's real model saved."""
    predicted = most_saved(spec_doc(row["model"], row["finetune"], row["precision"], row["ck"]))
    assert predicted.modelled, predicted.notes
    assert predicted.bytes == row["measured_bytes"]


def test_unmatched_parameters_beside_modules_are_noted() -> None:
    """peft warns and adapts q_proj alone; memplan notes it."""
    doc = spec_doc("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["nope"]})
    _, inv = inventory(doc)
    assert any("match no parameter" in n for n in inv.notes)


# peft's refusals (the live peft error is checked in the slow test below)
REFUSALS: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "mixtral",
        {"target_parameters": ["nope"]},
        "NoMatchingPeftModuleError",
        "matches no parameter",
    ),
    (
        "mixtral",
        {"target_parameters": ["input_layernorm.weight"]},
        "only 2d and 3d are supported",
        "is a 1-D parameter",
    ),
    (
        "mixtral",
        {"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]},
        "which is not a valid target",
        "adapted by finetune.target_modules",
    ),
    (
        "mixtral",
        {"target_parameters": ["down_proj"], "dropout": 0.1},
        "does not work with lora_dropout",
        "ParamWrapper",
    ),
    (
        "llama",
        {"target_parameters": ["q_proj.weight"]},
        "which is not a valid target",
        "set target_modules: \\[\\]",
    ),
]


@pytest.mark.parametrize(
    ("model", "ft", "peft_error", "mine"), REFUSALS, ids=[r[3][:20] for r in REFUSALS]
)
def test_refusals_like_peft(model: str, ft: dict[str, Any], peft_error: str, mine: str) -> None:
    with pytest.raises(MemplanError, match=mine) as err:
        inventory(spec_doc(model, ft))
    assert err.value.field.startswith("finetune.")


def test_a_string_is_refused_like_peft() -> None:
    """peft's LoraConfig raises TypeError for a string (no regex); memplan's spec says so."""
    with pytest.raises(MemplanError, match="target_parameters.*list of parameter names"):
        validate(spec_doc("mixtral", {"target_parameters": "down_proj"}))


def test_the_key_needs_lora() -> None:
    doc = spec_doc("mixtral", {"target_parameters": ["down_proj"]})
    doc["finetune"] = {"method": "full", "target_parameters": ["down_proj"]}
    with pytest.raises(MemplanError, match="target_parameters set but method is full"):
        validate(doc)


# --- live peft runs ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ft"),
    PARAMETER_CASES,
    ids=[_id({"model": m, "finetune": f, "precision": ""}) for m, f in PARAMETER_CASES],
)
def test_live_parameter_list_equals_peft(model: str, ft: dict[str, Any]) -> None:
    pytest.importorskip("peft")
    from benchmarks.lora_target_parameters import peft_parameters

    for precision in ("fp32", "bf16"):
        doc = spec_doc(model, ft, precision)
        assert memplan_parameters(doc) == peft_parameters(doc)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ft", "precision", "ck"),
    FORWARD_CASES,
    ids=[_id({"model": m, "finetune": f, "precision": p, "ck": c}) for m, f, p, c in FORWARD_CASES],
)
def test_live_saved_bytes_equal_the_prediction(
    model: str, ft: dict[str, Any], precision: str, ck: str
) -> None:
    pytest.importorskip("peft")
    from benchmarks.lora_moe import measure_forward

    doc = spec_doc(model, ft, precision, ck)
    assert measure_forward(doc) == most_saved(doc).bytes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ft", "peft_error", "mine"), REFUSALS, ids=[r[3][:20] for r in REFUSALS]
)
def test_live_peft_refuses_too(model: str, ft: dict[str, Any], peft_error: str, mine: str) -> None:
    pytest.importorskip("peft")
    from benchmarks.lora_moe import _model

    with pytest.raises(Exception) as real:
        _model(spec_doc(model, ft))
    assert peft_error in f"{type(real.value).__name__}: {real.value}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_verify_target_parameters_delta_zero(precision: str) -> None:
    """`memplan verify` of Mixtral with q_proj/v_proj modules and the experts' down_proj and
    the router's weight as target_parameters: model states and activations to the byte."""
    pytest.importorskip("peft")
    from tests.test_verify_support import model_state_rows_exact, run

    doc = spec_doc(
        "mixtral",
        {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["down_proj", "gate.weight"]},
    )
    doc.update(precision=precision, optimizer={"name": "adamw"})
    result = run(validate(doc))
    model_state_rows_exact(result)
    rows = {r.name: r for r in result.headline.rows}
    assert rows["activations"].checked and rows["activations"].predicted > 0
    assert rows["activations"].delta == 0


def test_litgpt_has_no_parameter_targets() -> None:
    """LitGPT's LoRA takes lora_* flags only: the key is refused under model.implementation
    litgpt rather than applied to names LitGPT does not have."""
    doc = spec_doc("llama", {"target_parameters": ["mlp.down_proj.weight"]})
    doc["model"]["implementation"] = "litgpt"
    with pytest.raises(MemplanError, match="target_parameters is peft's"):
        validate(doc)
