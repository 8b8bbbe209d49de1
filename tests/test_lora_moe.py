"""LoRA on the MoE router and fused experts (peft's lora.ParamWrapper): activations (issue 19).

Oracle: what autograd saves in peft 0.21.2's real model on the CPU (transformers 5.25 Mixtral
and Qwen3-MoE, tests/activation_probe.py's contract), measured by benchmarks/lora_moe.py and
stored in benchmarks/results/lora-moe.json. The default run holds memplan's torch-free
prediction to the stored numbers; the live peft runs are marked slow.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lora_moe import (
    FAMILIES,
    QV,
    TARGETS,
    forward_cases,
    recompute_cases,
    spec_doc,
    wrapped_names,
)
from memplan import activations
from memplan.config.load import validate
from memplan.model.finetune import lora as finetune
from memplan.model.sources import from_config
from memplan.report.settings import layout_of, setting_of

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "lora-moe.json"
STORED = json.loads(RESULTS.read_text())


def most_saved(doc: dict[str, Any]) -> activations.Activations:
    """memplan's activations of the GPU that saves the most for the spec (one stage here)."""
    spec = validate(doc).spec
    trained = finetune.apply(spec, from_config(doc["model"]["architecture"]))
    st, lay = setting_of(spec), layout_of(spec)
    steps = spec.training.gradient_accumulation_steps
    stages = activations.for_stages(trained, st, lay, spec.finetune, steps)
    return max(stages, key=lambda a: a.bytes)


def recompute_per_layer(doc: dict[str, Any]) -> list[int]:
    """What memplan says each decoder layer re-creates in backward, in model order."""
    out: list[int] = []
    for block in most_saved(doc).blocks:
        if block.name == "layers":
            out += [block.recompute_bytes] * block.count
    return out


def _doc(case: dict[str, Any]) -> dict[str, Any]:
    family = case["family"]
    targets = TARGETS[family][case["target"]]
    return spec_doc(family, targets, case["precision"], case["ck"], **case.get("finetune", {}))


def _id(case: dict[str, Any]) -> str:
    extra = "-".join(f"{k}={v}" for k, v in case.get("finetune", {}).items())
    parts = [case["family"], case["target"], case["precision"], case.get("ck", "full"), extra]
    return "-".join(p for p in parts if p)


def test_stored_results_cover_every_case_on_clean_code() -> None:
    """The stored file holds the matrix benchmarks/lora_moe.py runs, measured on committed
    code and the library versions the rules cite."""
    strip = ("measured_bytes", "measured_delta_per_layer")
    stored = [{k: v for k, v in c.items() if k not in strip} for c in STORED["forward"]]
    assert stored == forward_cases()
    stored = [{k: v for k, v in c.items() if k not in strip} for c in STORED["recompute"]]
    assert stored == recompute_cases()
    assert STORED["dirty"] is False
    assert STORED["versions"]["peft"] == "0.21.2"
    assert STORED["versions"]["transformers"] == "5.25.0"


@pytest.mark.parametrize("case", STORED["forward"], ids=[_id(c) for c in STORED["forward"]])
def test_saved_bytes_equal_peft_measured(case: dict[str, Any]) -> None:
    """Every family x wrapped target x recipe x checkpointing: memplan's saved bytes equal
    what peft's real model saved (before issue 19 these were 'not modelled')."""
    predicted = most_saved(_doc(case))
    assert predicted.modelled, predicted.notes
    assert predicted.bytes == case["measured_bytes"]


@pytest.mark.parametrize("case", STORED["recompute"], ids=[_id(c) for c in STORED["recompute"]])
def test_recomputed_wrapper_tensors_equal_peft_measured(case: dict[str, Any]) -> None:
    """Under full checkpointing the wrappers' tensors (merged weights, casts, the inputs their
    ops keep) are made again in each layer's backward: memplan's per-layer recompute with the
    wrapped targets beside q_proj/v_proj, minus with q_proj/v_proj alone, equals the measured."""
    family, precision = case["family"], case["precision"]
    wrapped = wrapped_names(family, case["target"])
    base = recompute_per_layer(spec_doc(family, QV, precision, "full"))
    with_wrapped = recompute_per_layer(spec_doc(family, QV + wrapped, precision, "full"))
    delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
    assert delta == case["measured_delta_per_layer"]
    assert all(d > 0 for d in delta)


# --- live peft runs ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", forward_cases(), ids=[_id(c) for c in forward_cases()])
def test_live_saved_bytes_equal_the_prediction(case: dict[str, Any]) -> None:
    pytest.importorskip("peft")
    from benchmarks.lora_moe import measure_forward

    doc = _doc(case)
    assert measure_forward(doc) == most_saved(doc).bytes


LIVE_RECOMPUTE = [c for c in recompute_cases() if c["precision"] in ("bf16", "amp-bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("case", LIVE_RECOMPUTE, ids=[_id(c) for c in LIVE_RECOMPUTE])
def test_live_recompute_delta_equals_the_prediction(case: dict[str, Any]) -> None:
    pytest.importorskip("peft")
    from benchmarks.lora_moe import measure_recompute

    family, precision = case["family"], case["precision"]
    docs = [
        spec_doc(family, targets, precision, "full")
        for targets in (QV, QV + wrapped_names(family, case["target"]))
    ]
    measured = [measure_recompute(d) for d in docs]
    predicted = [recompute_per_layer(d) for d in docs]
    assert [w - b for w, b in zip(*measured, strict=True)] == [
        w - b for w, b in zip(*predicted, strict=True)
    ]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_wrapped_w2_saves_one_merged_expert_weight_per_layer(precision: str) -> None:
    """peft's ParamWrapper folds B @ A into the expert weight (baddbmm) and grouped_mm keeps
    that merged [E, H, I] weight for its input's gradient, one per layer: measured as the
    storages added over the same model with q_proj/v_proj adapters only; memplan's prediction
    moves by the same bytes."""
    pytest.importorskip("peft")
    from benchmarks.lora_moe import measure_storages

    def saved(targets: list[str]) -> tuple[Counter[tuple[Any, ...]], int]:
        doc = spec_doc("mixtral", targets, precision, "none")
        storages = measure_storages(doc)
        return Counter((s.shape, s.dtype, s.nbytes) for s in storages), most_saved(doc).bytes

    base, base_predicted = saved(QV)
    wrapped, wrapped_predicted = saved([*QV, "w2"])
    added = wrapped - base
    mixtral = FAMILIES["mixtral"]
    experts, hidden, inter = (
        mixtral[k] for k in ("num_local_experts", "hidden_size", "intermediate_size")
    )
    width = 2 if precision == "bf16" else 4
    merged = (experts, inter, hidden)  # the transposed view grouped_mm reads
    assert (
        added[(merged, precision, experts * hidden * inter * width)]
        == (mixtral["num_hidden_layers"])
    )
    assert not base - wrapped
    grown = sum(n * count for (_, _, n), count in added.items())
    assert wrapped_predicted - base_predicted == grown


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parallelism", "precision", "targets"),
    [
        ({"engine": "fsdp2", "data": 2}, "bf16-mixed", "all-linear"),
        ({"engine": "fsdp2", "data": 2}, "bf16", ["q_proj", "v_proj", "gate", "w2"]),
        ({"engine": "ddp", "data": 2, "zero_stage": 1}, "bf16-mixed", "all-linear"),
    ],
    ids=["fsdp2-bf16-mixed-all-linear", "fsdp2-bf16-router-w2", "zero1-bf16-mixed-all-linear"],
)
def test_verify_wrapped_moe_on_two_ranks(parallelism: dict, precision: str, targets: Any) -> None:
    """`memplan verify` on two gloo ranks (FSDP2 gathers the experts whole for the merge):
    model states and activations to the byte on every rank."""
    pytest.importorskip("peft")
    from tests.test_verify_support import model_state_rows_exact, run

    doc = spec_doc("mixtral", targets, "fp32", "none")
    doc.update(precision=precision, parallelism=parallelism, optimizer={"name": "adamw"})
    result = run(validate(doc))
    model_state_rows_exact(result)
    for rank in result.ranks:
        row = rank.row("activations")
        assert row.checked and row.predicted > 0
        assert row.delta == 0
