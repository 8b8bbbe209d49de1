"""`training.compile` on torchtitan 0.3.0's DeepSeek-V3 MoE blocks under expert parallelism
(memplan.model.forward.compiled_mla.moe_ep_layer, op_sac_ep_layer; wired in
memplan.model.stacks.torchtitan), against what Inductor's min-cut partition keeps on
torchtitan's real block on gloo ranks.

benchmarks/compile_mla_ep.py traces the grid (EP 2 and 4; seeded, balanced and collapsed
routing; bf16 / fp32; q_lora_rank 0 and 24; node-limited groups on and off; top 2 and 6;
none / SelectiveAC / FullAC) into benchmarks/results/compile-mla-ep.json with
tests/compile_mla_ep_probe.py: the rule, given each rank's received rows, is checked against
every stored trace on every rank; one case is traced again live (slow: two spawned ranks); the
estimate's blocks at EP 2 are checked against the stored traces' bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_mla_ep as bench
from memplan.config.load import validate
from memplan.model.forward import compiled_mla
from memplan.model.load import load_inventory
from tests.conftest import micro_batch_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "compile-mla-ep.json"
EP1_RESULTS = ROOT / "benchmarks" / "results" / "compile-mla.json"


def _all_stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _stored() -> list[dict[str, Any]]:
    """The traced cases (not the ones torch failed on)."""
    return [c for c in _all_stored() if "error" not in c]


def _mismatches() -> list[str]:
    """Each stored (case, rank) whose traced kept set is not the rule's at that rank's R."""
    out = []
    for case in _stored():
        for rank, (kept, received) in enumerate(zip(case["kept"], case["received"], strict=True)):
            if bench.traced_tensors(kept) != bench.rule_tensors(case, case["ep"], received):
                out.append(f"{case['case']} EP {case['ep']} rank {rank}")
    return out


def test_rule_matches_every_stored_trace_on_every_rank() -> None:
    """Every traced (case, rank): the rule's (dtype, bytes) multiset at that rank's received
    rows R is exactly what Inductor's partition kept (stored traces)."""
    cases = _stored()
    assert {c["ep"] for c in cases} == {2, 4}
    assert {c["routing"] for c in cases} == {"seeded", "balanced", "collapsed"}
    assert {c["mode"] for c in cases} == {"none", "selective-op", "full"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    assert {c["q_lora"] > 0 for c in cases} == {True, False}
    assert {c["groups"] > 0 for c in cases} == {True, False}
    assert {c["top_k"] for c in cases} == {2, 6}
    # The routings really gave different R: unequal ranks, and a rank that received nothing.
    assert any(len(set(c["received"])) > 1 for c in cases if c["routing"] == "seeded")
    assert any(0 in c["received"] for c in cases if c["routing"] == "collapsed")
    assert _mismatches() == []


def test_a_dropped_tensor_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison fails on every stored trace of no checkpointing or SelectiveAC, on every
    rank, when the rule drops a tensor (the permutation's indices; the combine all-to-all's
    output under SAC)."""
    layer, sac = compiled_mla.moe_ep_layer, compiled_mla.op_sac_ep_layer

    def without(fn: Any, name: str) -> Any:
        return lambda **kw: tuple(t for t in fn(**kw) if t.name != name)

    monkeypatch.setattr(
        compiled_mla, "moe_ep_layer", without(layer, "moe.dispatch.permuted_indices")
    )
    monkeypatch.setattr(compiled_mla, "op_sac_ep_layer", without(sac, "moe.combine.received"))
    # FullAC's traces keep the input alone: the rule there is not these functions'.
    traced = [c for c in _stored() if c["mode"] != "full"]
    assert len(_mismatches()) == sum(len(c["received"]) for c in traced)


def test_dropping_any_tensor_breaks_the_match() -> None:
    """The comparison is tight: the rule less any one of its tensors no longer matches the
    seeded bf16 trace on rank 0 (R differs from tokens x top_k there)."""
    (case,) = (
        c
        for c in _stored()
        if c["case"] == "dsv3-bf16-none-seeded-b2s16-e8k2f48-q0-g4l2-sh1-norm" and c["ep"] == 2
    )
    received = case["received"][0]
    assert received != 2 * 16 * 2
    mla, moe = bench.mla_moe(case)
    kept = compiled_mla.moe_ep_layer(
        batch=2, seq=16, mla=mla, moe=moe, dtype="bf16", ep=2, received=received
    )
    traced = bench.traced_tensors(case["kept"][0])
    assert Counter((t.dtype, t.bytes) for t in kept) == traced
    for i in range(len(kept)):
        less = kept[:i] + kept[i + 1 :]
        assert Counter((t.dtype, t.bytes) for t in less) != traced, kept[i].name


def test_balanced_routing_receives_what_it_sends() -> None:
    """Under torchtitan's round-robin every rank receives tokens x top_k rows: the R the
    estimate uses (received=None); the balanced rule is then the traced bytes."""
    balanced = [c for c in _stored() if c["routing"] == "balanced"]
    assert balanced
    for c in balanced:
        assert c["received"] == [c["batch"] * c["seq"] * c["top_k"]] * c["ep"]
        assert c["traced_bytes"] == [c["balanced_rule_bytes"]] * c["ep"]


@pytest.mark.slow
def test_compiled_ep_block_saves_what_the_rule_says_live(tmp_path: Path) -> None:
    """torchtitan's DeepSeek-V3 MoE block compiled under EP 2 on two gloo ranks and traced now
    (seeded routing, bf16, no checkpointing; 35 to 75 s on 2 busy cores)."""
    pytest.importorskip("torchtitan.models.deepseek_v3")
    from tests.compile_mla_ep_probe import MlaCase, asdict, run

    case = MlaCase("bf16", "none", "seeded")
    ranks = [r[case.name] for r in run([case], tmp_path, world=2)]
    assert sum(r["received"] for r in ranks) == 2 * case.batch * case.seq * case.top_k
    for r in ranks:
        assert bench.traced_tensors(r["kept"]) == bench.rule_tensors(asdict(case), 2, r["received"])


def _micro(mode: str, **change: Any) -> Any:
    """memplan's micro-batch activations of bench.spec_of(mode, compile true) with sections
    replaced by `change`."""
    loaded = validate({**bench.spec_of(mode, True), **change})
    return micro_batch_of(loaded.spec, load_inventory(loaded))


def _blocks(mode: str) -> dict[str, Any]:
    saved = _micro(mode)
    assert saved.modelled, saved.notes
    assert any("training.compile" in n for n in saved.notes)
    return {b.name: b for b in saved.blocks}


@pytest.mark.parametrize("mode", ["none", "selective-op"])
def test_estimate_at_ep2_keeps_the_traced_blocks(mode: str) -> None:
    """`estimate` with training.compile on the tiny torchtitan DeepSeek-V3 at EP 2 (data 2,
    2 x 16 tokens, bf16, CPU): the MoE layer block holds the traced per-rank bytes averaged
    over the EP ranks of the stored traces (the ranks' R sum to EP x tokens x top_k whatever
    the routing, and the kept bytes are affine in R: their mean is the balanced rank's), and
    under balanced routing exactly each rank's; the dense block holds EP 1's traced bytes
    (benchmarks/results/compile-mla.json: EP shards the MoE alone). Before this rule the
    setting was refused ("not under expert parallelism")."""
    blocks = _blocks(mode)
    moe, dense = blocks["layers"], blocks["layers.dense"]
    traced = [
        c
        for c in _stored()
        if c["ep"] == 2
        and c["mode"] == mode
        and c["dtype"] == "bf16"
        and (c["batch"], c["seq"], c["experts"], c["top_k"], c["q_lora"], c["groups"])
        == (2, 16, 8, 2, 0, 4)
    ]
    assert {c["routing"] for c in traced} >= {"seeded", "collapsed"}
    for c in traced:
        if c["routing"] == "balanced":
            assert [moe.bytes_each] * 2 == c["traced_bytes"], c["case"]
        else:
            assert sum(c["received"]) == 2 * 2 * 16 * 2
            assert 2 * moe.bytes_each == sum(c["traced_bytes"]), c["case"]
    (ep1,) = (
        c
        for c in json.loads(EP1_RESULTS.read_text())["cases"]
        if (c["shape"], c["layer"], c["dtype"], c["mode"], c["routing"])
        == ("base", "dense", "bf16", mode, "seeded")
    )
    assert dense.bytes_each == ep1["traced_bytes"][ep1["sizes"].index([2, 16])]


def test_full_checkpointing_under_ep_runs_and_keeps_the_input() -> None:
    """Unlike Qwen3-MoE's block (torch 2.13 fails there: compiled_ep.FULL_AC_FAILS),
    torchtitan's DeepSeek-V3 MoE block compiled under FullAC runs at EP 2 and 4 (no stored
    trace holds an error) and passes its input alone, [batch, seq, dim], to the backward on
    every rank whatever the routing; the estimate at EP 2 models it, each block keeping that
    input. Before this rule the setting was refused."""
    assert not any("error" in c for c in _all_stored())
    full = [c for c in _stored() if c["mode"] == "full"]
    assert {c["ep"] for c in full} == {2, 4}
    assert {c["routing"] for c in full} >= {"seeded", "collapsed"}
    for c in full:
        for kept in c["kept"]:
            assert [k[2] for k in kept] == [[c["batch"], c["seq"], bench.SHAPE["hidden"]]]
    blocks = _blocks("full")
    (traced,) = (
        c
        for c in full
        if c["case"] == "dsv3-bf16-full-seeded-b2s16-e8k2f48-q0-g4l2-sh1-norm" and c["ep"] == 2
    )
    assert [blocks["layers"].bytes_each] * 2 == traced["traced_bytes"]
    assert blocks["layers.dense"].bytes_each == traced["traced_bytes"][0]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"}},
            "not under torchao Float8",
        ),
        ({"hardware": {"gpu": "H100-80GB"}}, "torchtitan's DeepSeek-V3 on CUDA is not modelled"),
    ],
)
def test_untraced_settings_under_ep_stay_refused(change: dict[str, Any], reason: str) -> None:
    """torchao Float8 on a compiled DeepSeek-V3 block (not traced at any EP) and CUDA (the
    attention kernel: refused eager too) stay refused at EP 2, with the reason."""
    saved = _micro("none", **change)
    assert not saved.modelled
    assert reason in saved.notes[0]
