"""`training.compile` on torchtitan 0.3.0's Qwen3-MoE blocks under tensor parallelism at expert
parallelism 1 (memplan.model.forward.compiled_moe_tp; wired in compiled_tp.apply), against what
Inductor's min-cut partition keeps on torchtitan's real block on gloo ranks.

benchmarks/compile_moe_tp.py traces the grid (TP 2 and 4; sequence parallelism on and off;
bf16 / fp32; none / SelectiveAC; seeded and collapsed routing; 8, 16 and 48 experts) into
benchmarks/results/compile-moe-tp.json with tests/compile_tp_probe.py: the rule is checked
against every stored trace on every rank, the estimate's layer block against the traced bytes;
one case is traced again live (slow: two spawned ranks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_moe_tp as bench
from memplan.model.forward import compiled, compiled_moe_tp
from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of
from tests.test_torchtitan_moe import qwen3_moe

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-moe-tp.json"


def _all_stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _stored() -> list[dict[str, Any]]:
    """The traced cases memplan models (not the ones torch or torchtitan failed on, nor
    checkpointing none at TP 4: compiled_moe_tp.NONE_ABOVE_TP2)."""
    return [c for c in _all_stored() if "error" not in c and c["memplan"] == "modelled"]


def _mismatches() -> list[str]:
    out = []
    for case in _stored():
        for rank, kept in enumerate(case["kept"]):
            if bench.traced_tensors(kept) != bench.rule_tensors(case, case["tp"]):
                out.append(f"{case['case']} TP {case['tp']} rank {rank}")
    return out


def test_rule_matches_every_stored_trace_on_every_rank() -> None:
    """Every traced (case, rank): the rule's (dtype, bytes) multiset is exactly what Inductor's
    partition kept (stored traces)."""
    cases = _stored()
    assert {(c["tp"], c["mode"]) for c in cases} == {
        (2, "none"),
        (2, "selective-op"),
        (4, "selective-op"),
    }
    assert {c["sequence_parallel"] for c in cases} == {True, False}
    assert {c["mode"] for c in cases} == {"none", "selective-op"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    assert {c["routing"] for c in cases} == {"seeded", "collapsed"}
    assert {c["experts"] or 8 for c in cases} == {8, 16, 48}
    assert _mismatches() == []


def test_the_one_rank_set_on_the_slice_is_not_the_traced_set(monkeypatch: Any) -> None:
    """The comparison can fail: the one-rank compiled set on the rank's heads and expert width
    (compiled.qwen3_moe_layer, op_sac_moe_layer, nothing of TP's own) misses every stored
    trace on every rank (the token shard, the residual, the reduce-scatter, ffn_norm's
    output without SP) except SelectiveAC without SP, where TP adds nothing (traced)."""

    def one_rank(**kw: Any) -> tuple[Any, ...]:
        tp = kw.pop("tp")
        kw.pop("sequence_parallel")
        kw["heads"] //= tp
        kw["kv_heads"] //= tp
        if "moe_inter" in kw:
            kw["moe_inter"] //= tp
            return compiled.qwen3_moe_layer(**kw)
        return compiled.op_sac_moe_layer(**kw)

    monkeypatch.setattr(compiled_moe_tp, "layer", one_rank)
    monkeypatch.setattr(compiled_moe_tp, "op_sac_layer", one_rank)
    differs = [c for c in _stored() if c["mode"] == "none" or c["sequence_parallel"]]
    assert differs
    assert len(_mismatches()) == sum(len(c["kept"]) for c in differs)


def test_checkpointing_none_at_tp_4_is_refused_because_its_trace_differs() -> None:
    """At TP 4 with checkpointing none (SP on and off) the traced set is not the TP 2 rule's
    (the router's own [b, s / TP, .] copies): memplan refuses it, saying so, and the stored
    trace confirms the rule would be wrong there."""
    unruled = [c for c in _all_stored() if "error" not in c and c["memplan"] != "modelled"]
    assert {(c["tp"], c["mode"], c["sequence_parallel"]) for c in unruled} == {
        (4, "none", True),
        (4, "none", False),
    }
    for case in unruled:
        assert compiled_moe_tp.NONE_ABOVE_TP2 in bench.refused(case, case["tp"])
        for kept in case["kept"]:
            assert bench.traced_tensors(kept) != bench.rule_tensors(case, case["tp"])


def test_the_set_does_not_depend_on_the_routing() -> None:
    """At EP 1 every rank routes every token to its F / TP slice of every expert: the seeded
    router and every token on the same experts keep the same bytes (stored traces)."""
    by_routing: dict[str, list[int]] = {}
    for c in _stored():
        if c["tp"] == 2 and c["dtype"] == "bf16" and c["mode"] == "none" and not c["experts"]:
            if c["sequence_parallel"]:
                by_routing[c["routing"]] = c["traced_bytes"]
    assert by_routing["seeded"] == by_routing["collapsed"]


def test_estimate_keeps_the_traced_bytes_per_block() -> None:
    """The key wiring: `memplan estimate`'s layer block for each traced case (the probe's
    one-block Qwen3-MoE, torchtitan's code, compiled, under its TP) holds exactly the traced
    bytes of that rank; before compiled_moe_tp, every such layout was refused."""
    for case in _stored():
        spec, cfg = bench.tiny(case, case["tp"])
        micro = micro_batch_of(spec, from_config(cfg))
        assert micro.modelled, (case["case"], micro.notes[:1])
        layers = micro.block("layers")
        assert layers is not None
        assert layers.bytes_each == case["traced_bytes"][0], case["case"]


def test_what_torch_or_torchtitan_fails_on_is_quoted() -> None:
    """torchtitan's debug routing (moe_force_load_balance) failed on every rank with the error
    compiled_moe_tp.BALANCED_ERROR quotes; an expert width of 48 at TP 4 failed in torch's
    _grouped_mm on every rank, and memplan refuses that layout quoting the error."""
    failed = [c for c in _all_stored() if "error" in c]
    assert {(c["routing"], c["tp"]) for c in failed} == {("balanced", 2), ("seeded", 4)}
    for case in failed:
        says = bench.refused(case, case["tp"])
        for error in case["error"]:
            assert bench.quoted(error) in says, (case["case"], error[:200])


@pytest.mark.parametrize(
    ("what", "says"),
    [
        ("expert", "model_type 'qwen3_moe'"),
        ("width", "moe_intermediate_size 48 that TP 32 does not divide"),
        ("aligned", compiled_moe_tp.GROUPED_MM_STRIDE),
        ("float8", "Float8"),
    ],
)
def test_what_is_not_traced_stays_refused(what: str, says: str) -> None:
    """Not traced under TP, so refused with the reason: EP x TP compiled, an expert width TP
    does not divide or that torch's _grouped_mm rejects (48 / 4), torchao Float8 on the MoE
    block."""
    cfg = qwen3_moe(1, experts=4, top_k=2)
    parallelism: dict[str, Any] = {"engine": "fsdp2", "tensor": 2}
    precision: Any = "bf16-mixed"
    if what == "expert":
        parallelism = {**parallelism, "data": 2, "expert": 2}
    elif what == "aligned":
        cfg = {**cfg, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}
        parallelism["tensor"] = 4
    elif what == "width":
        cfg = {**cfg, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 2}
        parallelism["tensor"] = 32
    else:
        precision = {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision=precision,
        training={"micro_batch_size": 2, "sequence_length": 64, "compile": True},
        parallelism=parallelism,
        hardware={"device": "cpu"},
    )
    micro = micro_batch_of(spec, from_config(cfg))
    assert not micro.modelled
    assert says in micro.notes[0], micro.notes[0]


@pytest.mark.slow
def test_live_trace_matches_the_rule(tmp_path: Path) -> None:
    """torchtitan's Qwen3-MoE block under TP 2 with SP, no checkpointing, seeded routing,
    traced now on two spawned gloo ranks: each rank keeps the rule's set."""
    from tests.compile_tp_probe import Case, asdict, run

    case = Case("bf16", "none", True, model="qwen3_moe", routing="seeded")
    per_rank = [r[case.name] for r in run([case], tmp_path, world=2)]
    want = bench.rule_tensors(asdict(case), 2)
    for measured in per_rank:
        assert bench.traced_tensors(measured["kept"]) == want
