"""`training.compile` on torchtitan 0.3.0's Qwen3-MoE blocks under expert parallelism
(memplan.model.forward.compiled_ep; wired in memplan.model.stacks.torchtitan), against what
Inductor's min-cut partition keeps on torchtitan's real block on gloo ranks.

benchmarks/compile_moe_ep.py traces the grid (EP 2 and 4; seeded, balanced and collapsed
routing; bf16 / fp32; none / SelectiveAC / FullAC) into benchmarks/results/compile-moe-ep.json
with tests/compile_ep_probe.py: the rule, given each rank's received rows, is checked against
every stored trace on every rank; one case is traced again live (slow: two spawned ranks); the
estimate's layer block at EP 2 is checked against the balanced trace's bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_moe_ep as bench
from memplan.model.forward import compiled_ep
from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of
from tests.test_torchtitan_moe import qwen3_moe

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-moe-ep.json"


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
    assert {c["mode"] for c in cases} == {"none", "selective-op"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    # The routings really gave different R: unequal ranks, and a rank that received nothing.
    assert any(len(set(c["received"])) > 1 for c in cases if c["routing"] == "seeded")
    assert any(0 in c["received"] for c in cases if c["routing"] == "collapsed")
    assert _mismatches() == []


def test_a_dropped_tensor_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison fails on every stored trace, on every rank, when the rule drops a tensor
    (the permutation's indices; the combine all-to-all's output under SAC)."""
    layer, sac = compiled_ep.qwen3_moe_ep_layer, compiled_ep.op_sac_moe_ep_layer

    def without(fn: Any, name: str) -> Any:
        return lambda **kw: tuple(t for t in fn(**kw) if t.name != name)

    monkeypatch.setattr(
        compiled_ep, "qwen3_moe_ep_layer", without(layer, "moe.dispatch.permuted_indices")
    )
    monkeypatch.setattr(compiled_ep, "op_sac_moe_ep_layer", without(sac, "moe.combine.received"))
    assert len(_mismatches()) == sum(len(c["received"]) for c in _stored())


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
    """torchtitan's Qwen3-MoE block compiled under EP 2 on two gloo ranks and traced now
    (seeded routing, bf16, no checkpointing; about 40 s)."""
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.compile_ep_probe import Case, asdict, run

    case = Case("bf16", "none", "seeded")
    ranks = [r[case.name] for r in run([case], tmp_path, world=2)]
    assert sum(r["received"] for r in ranks) == 2 * case.batch * case.seq * case.top_k
    for r in ranks:
        want = bench.rule_tensors(asdict(case), 2, r["received"])
        assert bench.traced_tensors(r["kept"]) == want


def _micro(mode: str, ep: int = 2, dtype: str = "bf16") -> Any:
    cfg = qwen3_moe(1)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": 2,
            "sequence_length": 16,
            "activation_checkpointing": mode,
            "compile": True,
        },
        parallelism={"engine": "fsdp2", "data": ep, "expert": ep},
        hardware={"device": "cpu"},
    )
    return micro_batch_of(spec, from_config(cfg))


@pytest.mark.parametrize("mode", ["none", "selective-op"])
def test_estimate_at_ep2_keeps_the_traced_block(mode: str) -> None:
    """`estimate` with training.compile on torchtitan's Qwen3-MoE at EP 2 (data 2, 2 x 16
    tokens, bf16): the layer block holds the traced per-rank bytes averaged over the EP ranks
    of the stored seeded and collapsed traces (the ranks' R sum to EP x tokens x top_k whatever
    the routing, and the kept bytes are affine in R: their mean is the balanced rank's), and
    under balanced routing exactly each rank's. Before compiled_ep this setting was
    refused."""
    saved = _micro(mode)
    assert saved.modelled, saved.notes
    assert any("training.compile" in n for n in saved.notes)
    (layers,) = (b for b in saved.blocks if b.name == "layers")
    traced = [
        c
        for c in _stored()
        if c["ep"] == 2
        and c["mode"] == mode
        and c["dtype"] == "bf16"
        and (c["batch"], c["seq"], c["experts"], c["top_k"]) == (2, 16, 8, 2)
    ]
    assert {c["routing"] for c in traced} >= {"seeded"}
    for c in traced:
        if c["routing"] == "balanced":
            assert [layers.bytes_each] * 2 == c["traced_bytes"], c["case"]
        else:  # seeded, collapsed
            assert sum(c["received"]) == 2 * 2 * 16 * 2
            assert 2 * layers.bytes_each == sum(c["traced_bytes"]), c["case"]


def test_full_checkpointing_under_ep_is_refused_quoting_what_torch_raised() -> None:
    """torch 2.13 fails on FullAC + compile under EP (stored: the error each rank raised);
    memplan refuses that setting, quoting the error."""
    failed = [c for c in _all_stored() if "error" in c]
    assert {c["mode"] for c in failed} == {"full"}
    for c in failed:
        assert all(c["error"]) and len(set(c["error"])) == 1
        assert c["error"][0].startswith("AssertionError: expected all tensors_saved_with_vc")
    saved = _micro("full")
    assert not saved.modelled
    assert failed[0]["error"][0] in saved.notes[0] and "training.compile" in saved.notes[0]


def test_full_checkpointing_under_ep_is_refused_with_tensor_parallelism_too() -> None:
    """Expert x tensor parallelism (with sequence parallelism, as torchtitan needs) took the
    TP rule's whole-model path, which never asked the MoE rule at E / EP experts: compile +
    FullAC was accepted there as 'each block keeps its input' although torch 2.13 fails on it
    without TP (stored) and it is not traced with TP. It is refused with the same reason."""
    cfg = qwen3_moe(1)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="bf16-mixed",
        training={
            "micro_batch_size": 2,
            "sequence_length": 16,
            "activation_checkpointing": "full",
            "compile": True,
        },
        parallelism={
            "engine": "fsdp2",
            "data": 2,
            "expert": 2,
            "tensor": 2,
            "sequence_parallel": True,
        },
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert not saved.modelled
    assert compiled_ep.FULL_AC_FAILS in saved.notes[0]


def test_compile_under_ep_and_float8_is_still_refused_with_the_reason() -> None:
    """torchao Float8 on a compiled MoE block is not traced (at any EP): refused, saying so."""
    cfg = qwen3_moe(1)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={"micro_batch_size": 2, "sequence_length": 16, "compile": True},
        parallelism={"engine": "fsdp2", "data": 2, "expert": 2},
        precision={"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert not saved.modelled
    assert "torchao Float8" in saved.notes[0] and "training.compile" in saved.notes[0]


def test_rule_tensors_counts_the_rule() -> None:
    """bench.rule_tensors is the rule's own tensor list, counted (the comparison recomputes
    nothing)."""
    case = {"batch": 2, "seq": 16, "experts": 8, "top_k": 2, "dtype": "bf16", "mode": "none",
            "moe_ffn": 48}  # fmt: skip
    kept = compiled_ep.qwen3_moe_ep_layer(
        **bench.DIMS, batch=2, seq=16, experts=8, top_k=2, dtype="bf16", ep=2, received=40,
        moe_inter=48, router="bf16",
    )  # fmt: skip
    assert bench.rule_tensors(case, 2, 40) == Counter((t.dtype, t.bytes) for t in kept)
