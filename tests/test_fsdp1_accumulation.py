"""memplan's fsdp1 engine with gradient accumulation against torch FSDP1 run on gloo ranks as
accelerate accumulates (every micro-batch but the last inside no_sync(); tests/fsdp1_probe.py):
what FSDP1 holds between micro-batches to the byte, the model states after the step to the
byte, each phase's peak within what was measured. The default run reads
benchmarks/results/fsdp1-accumulation.json (benchmarks/fsdp1_accumulation.py); the slow test
runs FSDP1 live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate, model_states
from memplan.report.json import estimate_json
from memplan.states.engines.fsdp1.accumulation import accumulated_gradients
from memplan.states.engines.fsdp1.sharding import flat_units
from tests import test_fsdp1 as single
from tests.conftest import TINY_LLAMA, make_spec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fsdp1-accumulation.json"
COMPUTE = {"bf16": "bf16", "fp32": "fp32"}


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def _cases() -> list[dict[str, Any]]:
    return list(_doc()["cases"])


def _case_id(case: dict[str, Any]) -> str:
    return f"{single._case_id(case)}-x{case['accumulation']}"


def _spec(case: dict[str, Any], config: dict[str, Any]) -> Any:
    raw = single.spec_of(case, config)
    raw["training"]["gradient_accumulation_steps"] = case["accumulation"]
    return validate(raw).spec


def phase_errors(case: dict[str, Any], config: dict[str, Any]) -> dict[str, float]:
    """(predicted - measured) / measured per phase: memplan's timeline (the last
    micro-batch's) against the highest peak of each phase over the step's micro-batches,
    the most-loaded measured rank's, the input ids taken out."""
    spec = _spec(case, config)
    doc = estimate_json(estimate(spec, from_config({"model_type": "llama", **config})))
    totals = {p["phase"]: p["total"] for p in doc["timeline"]["phases"]}
    out = {}
    for phase, points in single.PHASES.items():
        predicted = max(totals[p] for p in points)
        measured = max(r["phases"][phase]["peak"] for r in case["ranks"]) - single.IDS_BYTES
        out[phase] = (predicted - measured) / measured
    return out


# The largest errors over the 8 stored cases, rounded up (docs/fsdp1.md lists each case's):
# forward +1.5% (FULL_SHARD fp32, the single step's 26,240 B), backward +1.1% (FULL_SHARD
# bf16) and -1.7% (SHARD_GRAD_OP bf16 x2: its rank 1's last backward measured 24,756 B more
# than in the development run of the same case and than x3's, which agree with memplan
# within 0.04%: the probe's measurement varies there, memplan does not), the optimizer step
# within 0.01%. Without the accumulated unsharded gradients memplan is 16% to 24% under in
# forward and backward.
TOLERANCE = {"forward": 0.02, "backward": 0.02, "optimizer step": 0.001}


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_phase_peaks_within_measured(case: dict[str, Any]) -> None:
    for phase, error in phase_errors(case, _doc()["model"]).items():
        assert abs(error) <= TOLERANCE[phase], (phase, error)


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_held_between_microbatches(case: dict[str, Any]) -> None:
    """After each backward but the last, every FlatParameter's `.grad` is its unsharded
    gradient in the compute dtype (memplan: accumulated_gradients); SHARD_GRAD_OP keeps every
    unit's unsharded parameter gathered, FULL_SHARD none (_should_free_in_backward)."""
    inventory = from_config({"model_type": "llama", **_doc()["model"]})
    stage = single.STAGE[case["strategy"]]
    units = flat_units(inventory, COMPUTE[case["mp"]], case["world"], stage)
    (rule,) = accumulated_gradients(units, param=COMPUTE[case["mp"]])
    width = 2 if case["mp"] == "bf16" else 4
    gathered = sum(u.padded for u in units) * width if stage == 2 else 0
    for rank in case["ranks"]:
        earlier = rank["microbatches"][:-1]
        assert len(earlier) == case["accumulation"] - 1
        for micro in earlier:
            assert micro["held"]["grad_bytes"] == rule.bytes
            assert micro["held"]["grad_numels"] == [u.padded for u in units]
            assert micro["held"]["unsharded_param_bytes"] == gathered


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_model_states_equal_measured(case: dict[str, Any]) -> None:
    """After the accumulated step the model states are the single step's, to the byte."""
    spec = _spec(case, _doc()["model"])
    stage = model_states(spec, from_config({"model_type": "llama", **_doc()["model"]}))[0]
    buffers = sum(t.bytes for t in stage.buffers)
    for measured in case["ranks"]:
        single._check_rank(single._rank_of(list(stage.ranks), measured["rank"]), buffers, measured)


def test_plan_finds_rows_with_several_microbatches() -> None:
    """With fsdp1 listed, plan's rows include layouts of more than one micro-batch per step,
    of every sharding strategy."""
    from memplan.plan.search import plan

    spec = make_spec(
        model={"architecture": TINY_LLAMA},
        training={"sequence_length": 32},
        hardware={"gpu": "H100-80GB", "gpus_per_node": 8},
        plan={"gpus": 2, "global_batch_size": 16, "engines": ["fsdp1"]},
    )
    rows = list(plan(spec, from_config(TINY_LLAMA), suggest=False).layouts)
    assert {r.engine for r in rows} == {"fsdp1"}
    several = [r for r in rows if r.gradient_accumulation_steps > 1]
    assert several
    # NO_SHARD accumulates too under bf16-mixed (tests/test_fsdp1_offload.py)
    assert {r.zero_stage for r in several} == {0, 2, 3}


@pytest.mark.slow
def test_live_gloo_run_equals_memplan() -> None:
    """FSDP1 accumulating 2 micro-batches on 2 gloo ranks now (SHARD_GRAD_OP, bf16
    MixedPrecision): held gradients and model states to the byte, peaks within tolerance."""
    from tests.fsdp1_probe import CONFIG, measure

    case = measure(2, "SHARD_GRAD_OP", "bf16", accumulation=2)
    inventory = from_config({"model_type": "llama", **CONFIG})
    units = flat_units(inventory, "bf16", 2, 2)
    (rule,) = accumulated_gradients(units, param="bf16")
    for rank in case["ranks"]:
        assert rank["microbatches"][0]["held"]["grad_bytes"] == rule.bytes
    for phase, error in phase_errors(case, CONFIG).items():
        assert abs(error) <= TOLERANCE[phase], (phase, error)
