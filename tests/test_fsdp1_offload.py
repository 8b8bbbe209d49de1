"""memplan's fsdp1 engine with CPUOffload(offload_params=True), and NO_SHARD with gradient
accumulation, against torch FSDP1 run on gloo ranks (tests/fsdp1_probe.py): what each rank
keeps on the host to the byte (FSDP1's `_local_shard` and `_cpu_grad`, the optimizer's
states), and each phase's peak less that (what the GPU would hold) within what was measured.
The default run reads benchmarks/results/fsdp1-offload.json (benchmarks/fsdp1_offload.py);
the slow test runs FSDP1 live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report.estimate import estimate, model_states
from memplan.report.json import estimate_json
from memplan.states.engines.fsdp1.sharding import flat_units
from tests import test_fsdp1 as single
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fsdp1-offload.json"
WIDTH = {"float32": 4, "bfloat16": 2}


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def _cases(offload: bool, accumulation: int = 1) -> list[dict[str, Any]]:
    return [
        c
        for c in _doc()["cases"]
        if bool(c.get("offload")) == offload and c.get("accumulation", 1) == accumulation
    ]


def _modelled() -> list[dict[str, Any]]:
    """FULL_SHARD and SHARD_GRAD_OP with offload over 2 ranks, one micro-batch, FULL_SHARD
    also with backward prefetch (NO_SHARD's, one rank's and accumulation's offload are
    refused: test_refused_offload_cases)."""
    return [c for c in _cases(True) if c["strategy"] != "NO_SHARD" and c["world"] > 1]


def _prefetch(case: dict[str, Any]) -> str:
    return str(case.get("backward_prefetch", "none"))


def _case_id(case: dict[str, Any]) -> str:
    return f"{single._case_id(case)}-x{case.get('accumulation', 1)}-{_prefetch(case)}"


def _raw(case: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    raw = single.spec_of(case, config)
    raw["training"]["gradient_accumulation_steps"] = case.get("accumulation", 1)
    if case.get("offload"):
        # accelerate's fsdp_offload_params: true
        raw["parallelism"]["offload"] = {"parameters": "cpu", "optimizer": "cpu"}
    if _prefetch(case) != "none":
        raw["parallelism"]["fsdp1_backward_prefetch"] = _prefetch(case)
    return raw


def _estimate(case: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any]:
    spec = validate(_raw(case, config)).spec
    inventory = from_config({"model_type": "llama", **config})
    return spec, inventory


@pytest.mark.parametrize("case", _modelled(), ids=_case_id)
def test_host_states_equal_measured(case: dict[str, Any]) -> None:
    """Each rank's host rows are FSDP1's own: the parameters its `_local_shard` (the padded
    shard, fp32), the gradients its `_cpu_grad` (the same size and dtype, and the
    FlatParameter's `.grad` after the step), the optimizer's states by name; nothing of them
    is left on the GPU but the buffers."""
    spec, inventory = _estimate(case, _doc()["model"])
    stage = model_states(spec, inventory)[0]
    for measured in case["ranks"]:
        rank = single._rank_of(list(stage.ranks), measured["rank"])
        assert [t.category for t in rank.terms] == []
        host = {t.name: t for t in rank.host_terms}
        local = sum(u["local_shard"][0] * WIDTH[u["local_shard"][1]] for u in measured["units"])
        cpu_grad = sum(u["cpu_grad"][0] * WIDTH[u["cpu_grad"][1]] for u in measured["units"])
        assert all(u["grad_is_cpu_grad"] for u in measured["units"])
        assert host["parameters"].bytes == local == measured["parameters_bytes"]
        assert host["gradients"].bytes == cpu_grad == measured["pinned_bytes"] - local
        states = {
            t.name: {"tensors": t.tensors, "elements": t.elements, "bytes": t.bytes}
            for t in rank.host_terms
            if t.category == "optimizer_states"
        }
        assert states == measured["optimizer"]
        assert sum(t.bytes for t in rank.host_terms) == measured["host_bytes"]


@pytest.mark.parametrize("case", _modelled(), ids=_case_id)
def test_host_shards_are_the_flat_parameters_shards(case: dict[str, Any]) -> None:
    """`_local_shard` and `_cpu_grad` of every unit: the shard memplan lays out, fp32."""
    spec, inventory = _estimate(case, _doc()["model"])
    compute = "bf16" if case["mp"] == "bf16" else "fp32"
    units = flat_units(inventory, compute, case["world"], spec.parallelism.stage)
    for measured in case["ranks"]:
        for unit, m in zip(units, measured["units"], strict=True):
            assert m["local_shard"] == [unit.shard, "float32", "cpu"]
            assert m["cpu_grad"] == [unit.shard, "float32", "cpu"]


def phase_errors(case: dict[str, Any], config: dict[str, Any]) -> dict[str, float]:
    """(predicted - measured) / measured per phase on the GPU: memplan's GPU timeline against
    each phase's measured peak less the rank's host bytes (constant over the step) and the
    input ids, the most-loaded rank's. The optimizer step runs on the host: the GPU's part is
    what is left once it has run (its host temporaries are not the GPU's)."""
    spec, inventory = _estimate(case, config)
    doc = estimate_json(estimate(spec, inventory))
    totals = {p["phase"]: p["total"] for p in doc["timeline"]["phases"]}
    out = {}
    for phase, points in single.PHASES.items():
        predicted = max(totals[p] for p in points)
        key = "end" if phase == "optimizer step" else "peak"
        measured = max(r["phases"][phase][key] - r["host_bytes"] for r in case["ranks"])
        measured -= single.IDS_BYTES
        out[phase] = (predicted - measured) / measured
    return out


# The largest errors over the 4 stored cases, rounded up: FULL_SHARD's forward +0.5% (bf16)
# and +4.1% (fp32), its backward +2.5% (bf16): the same bytes as without offload
# (tests/test_fsdp1.py: 26,240 B in fp32's forward, 14,032 B in bf16's backward) over the
# GPU's part alone; SHARD_GRAD_OP within 0.1%; the GPU in the optimizer step (the buffers)
# exact. Without CPU ranks' pre-backward gradient shards (fsdp1.offload.cpu_writeback)
# FULL_SHARD's backward would be 22% (bf16) and 14% (fp32) under.
TOLERANCE = {"forward": 0.05, "backward": 0.03, "optimizer step": 0.0}


@pytest.mark.parametrize("case", _modelled(), ids=_case_id)
def test_device_phase_peaks_within_measured(case: dict[str, Any]) -> None:
    for phase, error in phase_errors(case, _doc()["model"]).items():
        assert abs(error) <= TOLERANCE[phase], (phase, error)


PREFETCH_RESULTS = ROOT / "benchmarks" / "results" / "fsdp1-prefetch.json"


def _plain(case: dict[str, Any]) -> dict[str, Any]:
    """The same case run without offload: benchmarks/results/fsdp1.json, or with backward
    prefetch fsdp1-prefetch.json (2 decoder layers)."""
    if _prefetch(case) == "none":
        cases = single._cases()
    else:
        cases = [c for c in json.loads(PREFETCH_RESULTS.read_text())["cases"] if c["layers"] == 2]
    key = (case["world"], case["strategy"], case["mp"], _prefetch(case))
    return next(c for c in cases if (c["world"], c["strategy"], c["mp"], _prefetch(c)) == key)


@pytest.mark.parametrize("case", _modelled(), ids=_case_id)
def test_offload_adds_only_the_host_gradient_on_cpu_ranks(case: dict[str, Any]) -> None:
    """On CPU ranks the step is the same memory as without offload but `_cpu_grad` (the
    FlatParameter's `.grad` is the host gradient, the device one is freed), and FULL_SHARD's
    backward also the root's and a layer's gradient shards from their pre-backward, two
    layers' with backward prefetch (the prefetched layer's writeback runs when it is
    gathered): benchmarks/results/fsdp1.json's (fsdp1-prefetch.json's) run of the same case
    is the oracle."""
    plain = _plain(case)
    spec, inventory = _estimate(case, _doc()["model"])
    compute = "bf16" if case["mp"] == "bf16" else "fp32"
    units = flat_units(inventory, compute, case["world"], spec.parallelism.stage)
    root = next(u.shard for u in units if u.name == "root")
    layer = max(u.shard for u in units if u.name != "root")
    for m, p in zip(case["ranks"], plain["ranks"], strict=True):
        cpu_grad = m["pinned_bytes"] - m["parameters_bytes"]
        assert m["phases"]["forward"]["peak"] - p["phases"]["forward"]["peak"] == cpu_grad
        layers = 1 if _prefetch(case) == "none" else 2
        writeback = (root + layers * layer) * 4 if case["strategy"] == "FULL_SHARD" else 0
        backward = m["phases"]["backward"]["peak"] - p["phases"]["backward"]["peak"]
        assert backward == cpu_grad + writeback


@pytest.mark.parametrize("case", _cases(False, 2) + _cases(False, 3), ids=_case_id)
def test_no_shard_accumulation(case: dict[str, Any]) -> None:
    """NO_SHARD under no_sync(): what each unit's `.grad` holds between micro-batches (its
    whole flat gradient, bf16 under MixedPrecision, fp32 without) is memplan's, and every
    phase's peak within 1% (bf16 +0.1% forward, +0.8% backward; fp32 within 0.01%, with the
    new flat gradient beside the kept one, fsdp1.accumulation.new_gradients_beside_kept:
    without it 4.3% under in backward)."""
    compute = "bf16" if case["mp"] == "bf16" else "fp32"
    held = case["ranks"][0]["microbatches"][0]["held"]
    spec, inventory = _estimate(case, _doc()["model"])
    units = flat_units(inventory, compute, case["world"], 0)
    assert held["grad_numels"] == [u.padded for u in units]
    assert held["grad_dtypes"] == ["bfloat16" if compute == "bf16" else "float32"]
    doc = estimate_json(estimate(spec, inventory))
    totals = {p["phase"]: p["total"] for p in doc["timeline"]["phases"]}
    for phase, points in single.PHASES.items():
        predicted = max(totals[p] for p in points)
        measured = max(r["phases"][phase]["peak"] for r in case["ranks"]) - single.IDS_BYTES
        assert abs(predicted - measured) / measured <= 0.01, phase


@pytest.mark.parametrize(
    "case",
    [c for c in _doc()["cases"] if c.get("offload") and c not in _modelled()],
    ids=_case_id,
)
def test_refused_offload_cases(case: dict[str, Any]) -> None:
    """NO_SHARD with offload, on 2 ranks and on one (where FSDP1 runs NO_SHARD), and offload
    with accumulation, each refused with the measured reason: the message quotes the stored
    run's worst phase."""
    match = "38%" if case["world"] == 1 or case["strategy"] == "NO_SHARD" else "27%"
    with pytest.raises(MemplanError, match=match):
        estimate(*_estimate(case, _doc()["model"]))


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in _doc()["cases"]
        if c.get("offload") and (c["world"] == 1 or c["strategy"] == "NO_SHARD")
    ],
    ids=_case_id,
)
def test_no_shard_offload_on_cpu_ranks_is_plain_no_shard_and_the_host_gradient(
    case: dict[str, Any],
) -> None:
    """Why NO_SHARD's offload stays refused: on CPU ranks (2, and one, where FSDP1 runs
    NO_SHARD) every phase's peak is exactly NO_SHARD's without offload (benchmarks/results/
    fsdp1.json, 2 ranks) plus `_cpu_grad`, the whole gradient in fp32: the run never makes
    the GPU's copies of the whole flat parameter that offload adds (pre_unshard's
    flat_param_to: the compute device is the host), so it cannot prove a rule for them."""
    plain = next(
        c
        for c in single._cases()
        if (c["world"], c["strategy"], c["mp"]) == (2, "NO_SHARD", case["mp"])
    )
    for m, p in zip(case["ranks"], plain["ranks"], strict=False):
        cpu_grad = m["pinned_bytes"] - m["parameters_bytes"]
        assert cpu_grad == m["parameters_bytes"]  # the whole flat parameters' fp32 gradient
        for phase in ("forward", "backward"):
            assert m["phases"][phase]["peak"] - p["phases"][phase]["peak"] == cpu_grad, phase


@pytest.mark.parametrize(
    ("offload", "extra", "match"),
    [
        ({"optimizer": "cpu"}, {}, "set offload.parameters: cpu"),
        ({"parameters": "nvme"}, {}, "CPU only"),
        ({"parameters": "cpu", "pin_memory": False}, {}, "always pins"),
        ({"parameters": "cpu"}, {"zero_stage": 0}, "NO_SHARD"),
        ({"parameters": "cpu"}, {"data": 1}, "more than one rank"),
    ],
)
def test_offload_spec_refusals(offload: dict[str, Any], extra: dict[str, Any], match: str) -> None:
    spec = {
        "model": {"architecture": TINY_LLAMA},
        "parallelism": {"engine": "fsdp1", "data": 4, "offload": offload, **extra},
    }
    with pytest.raises(MemplanError, match=match):
        validate(spec)


def test_gpu_rule_on_cuda() -> None:
    """On a GPU (hardware.device cuda) the pre-backward writeback is the host's and the
    host shard's copy beside each all-gather is the device's: the sharded gradients are on
    the GPU at the end of backward only, none in the optimizer step; the step's host rows
    are the same as on CPU ranks."""
    case = {"world": 2, "strategy": "FULL_SHARD", "mp": "bf16", "offload": True}
    raw = _raw(case, _doc()["model"])
    raw["hardware"] = {"gpu": "H100-80GB"}
    spec = validate(raw).spec
    inventory = from_config({"model_type": "llama", **_doc()["model"]})
    doc = estimate_json(estimate(spec, inventory))
    names = {t["name"] for t in doc["timeline"]["transients"]}
    assert "fsdp1 offload: sharded gradients on the device" in names
    assert not any("pre-backward" in n for n in names)
    step = next(p for p in doc["timeline"]["phases"] if p["phase"] == "optimizer_step")
    assert step["total"] == step["buffers"]


def in_flight_bound(case: dict[str, Any], config: dict[str, Any]) -> int:
    """The most a live gloo run's backward peak has been seen to, and may, exceed the
    timing-free one: the largest decoder layer's unsharded gradient in the reduce dtype, the
    reduce-scatter input its post-backward hook holds (torch 2.13 _runtime_utils.py::
    _reduce_grad, `padded_unsharded_grad`; bf16 80,648 B on the probe's model).

    Run alone, FULL_SHARD bf16 with offload measures every phase's peak of both ranks equal
    to the stored run's, run after run (8 runs, 3 of them beside two busy processes). With
    the ranks' threads timed differently (the cycle collector off: 5 of 12 runs) the peak
    moves from the layer's backward compute into a layer's post-backward hook (its
    reduce-scatter output cast to fp32 and accumulated, _accumulate_sharded_grad) and is
    20,620 or 40,324 B higher; one full test run measured the same +40,324 B on rank 0
    (backward -4.25% against the 3% tolerance). No collective's tensors were found still held
    by gloo when its call returned (their reference counts), so which tensor outlives its
    moment was not pinned down: the bound is the hook's largest tensor."""
    spec, inventory = _estimate(case, config)
    compute = "bf16" if case["mp"] == "bf16" else "fp32"
    units = flat_units(inventory, compute, case["world"], spec.parallelism.stage)
    width = WIDTH["bfloat16" if compute == "bf16" else "float32"]
    return max(u.padded for u in units if u.name != "root") * width


def live_matches_stored(live: dict[str, Any], stored: dict[str, Any], bound: int) -> list[str]:
    """What differs between a live run and the stored run of the same case, rank by rank:
    the host bytes and every phase's end and peak must be equal, but the backward peak,
    which may be higher by up to `bound` (the in-flight term, in_flight_bound)."""
    out = []
    for lr, sr in zip(live["ranks"], stored["ranks"], strict=True):
        if lr["host_bytes"] != sr["host_bytes"]:
            out.append(f"rank {lr['rank']} host {lr['host_bytes']} != {sr['host_bytes']}")
        for phase, lp in lr["phases"].items():
            sp = sr["phases"][phase]
            excess = lp["peak"] - sp["peak"]
            late = phase == "backward" and 0 <= excess <= bound
            if lp["end"] != sp["end"] or (excess and not late):
                out.append(f"rank {lr['rank']} {phase} {lp} != {sp}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", ["none", "pre"])
def test_live_gloo_run_equals_memplan(prefetch: str) -> None:
    """FSDP1 with CPUOffload run now on 2 gloo ranks (FULL_SHARD, bf16 MixedPrecision, without
    and with BACKWARD_PRE): the timing-free terms equal the stored run's to the byte (host
    states, every phase's end, the forward and optimizer-step peaks), the backward peak at
    most the in-flight term above it; memplan within the tolerance of the stored peaks (as
    test_device_phase_peaks_within_measured) and never more than 3% over the live ones."""
    from tests.fsdp1_probe import CONFIG, measure

    case = measure(2, "FULL_SHARD", "bf16", prefetch=prefetch, offload=True)
    stored = next(
        c
        for c in _modelled()
        if (c["strategy"], c["mp"], _prefetch(c)) == ("FULL_SHARD", "bf16", prefetch)
    )
    assert CONFIG == _doc()["model"]
    spec, inventory = _estimate(case, CONFIG)
    stage = model_states(spec, inventory)[0]
    for measured in case["ranks"]:
        rank = single._rank_of(list(stage.ranks), measured["rank"])
        assert sum(t.bytes for t in rank.host_terms) == measured["host_bytes"]
    assert live_matches_stored(case, stored, in_flight_bound(case, CONFIG)) == []
    for phase, error in phase_errors(stored, CONFIG).items():
        assert abs(error) <= TOLERANCE[phase], (phase, error)
    for phase, error in phase_errors(case, CONFIG).items():
        assert error <= TOLERANCE[phase], (phase, error)


def test_live_comparison_bounds_only_the_in_flight_term() -> None:
    """live_matches_stored, on the stored case and edits of it: the +40,324 B backward of the
    one failing full run passes, a backward 80,656 B higher (over the 80,648 B bound) or a
    forward 8 B higher fails, and so does a backward lower than the stored one."""
    case = next(
        c
        for c in _modelled()
        if (c["strategy"], c["mp"], _prefetch(c)) == ("FULL_SHARD", "bf16", "none")
    )
    bound = in_flight_bound(case, _doc()["model"])
    assert bound == 80_648

    def shifted(phase: str, bytes_: int) -> dict[str, Any]:
        ranks = [
            dict(
                r,
                phases={
                    **r["phases"],
                    phase: {**r["phases"][phase], "peak": r["phases"][phase]["peak"] + bytes_},
                },
            )
            for r in case["ranks"]
        ]
        return dict(case, ranks=ranks)

    assert live_matches_stored(case, case, bound) == []
    assert live_matches_stored(shifted("backward", 40_324), case, bound) == []
    assert live_matches_stored(shifted("backward", 80_656), case, bound) != []
    assert live_matches_stored(shifted("backward", -8), case, bound) != []
    assert live_matches_stored(shifted("forward", 8), case, bound) != []


def test_prefetch_with_offload_under_shard_grad_op_refused() -> None:
    """Backward prefetch with offload was measured under FULL_SHARD only: SHARD_GRAD_OP's is
    refused with the key to change."""
    case = {"world": 2, "strategy": "SHARD_GRAD_OP", "mp": "bf16", "offload": True}
    raw = _raw(case, _doc()["model"])
    raw["parallelism"]["fsdp1_backward_prefetch"] = "pre"
    spec = validate(raw).spec
    with pytest.raises(MemplanError, match="offload and SHARD_GRAD_OP") as err:
        estimate(spec, from_config({"model_type": "llama", **_doc()["model"]}))
    assert err.value.field == "parallelism.fsdp1_backward_prefetch"


def test_prefetch_with_offload_is_measured() -> None:
    """The stored grid holds FULL_SHARD with offload and each backward prefetch, bf16 and
    fp32, on 2 ranks (what test_device_phase_peaks_within_measured holds memplan to)."""
    got = {(c["mp"], _prefetch(c)) for c in _modelled() if c["strategy"] == "FULL_SHARD"}
    assert got == {(mp, p) for mp in ("bf16", "fp32") for p in ("none", "pre", "post")}
