"""`training.compile` on torchtitan 0.3.0's dense blocks under tensor parallelism
(memplan.model.forward.compiled_tp; wired in memplan.activations.torchtitan_parallel), against
what Inductor's min-cut partition keeps on torchtitan's real block on gloo ranks.

benchmarks/compile_tp.py traces the grid (TP 2 and 4; sequence parallelism on and off; Llama 3
and dense Qwen3; bf16 / fp32; none / SelectiveAC / FullAC) into benchmarks/results/compile-tp.json
with tests/compile_tp_probe.py: the rule is checked against every stored trace on every rank,
the estimate's layer block against the traced bytes, the refusals against the errors torch and
torchtitan raised; one case is traced again live (slow: two spawned ranks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_tp as bench
from memplan.model.forward import compiled_tp
from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of

TINY_TORCHTITAN_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
"""tests/torchtitan_probe.py's Llama (dim 64, 4 heads of 16, 2 k/v heads, FFN 192) as a Hugging
Face llama config."""
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-tp.json"


def _all_stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _stored() -> list[dict[str, Any]]:
    """The traced cases (not the ones torch or torchtitan failed on)."""
    return [c for c in _all_stored() if "error" not in c]


def _mismatches() -> list[str]:
    """Each stored (case, rank) whose traced kept set is not the rule's."""
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
    assert {c["tp"] for c in cases} == {2, 4}
    assert {c["sequence_parallel"] for c in cases} == {True, False}
    assert {c["mode"] for c in cases} == {"none", "selective-op"}
    assert {c["model"] for c in cases} == {"llama", "qwen3"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    assert _mismatches() == []


def test_a_dropped_tensor_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison fails on every stored trace, on every rank, when the rule drops the
    tensor TP adds (the residual sum under none, the reduce-scatter or w2's output under
    SelectiveAC) or, without SP, wo's gathered weight."""
    layer, sac = compiled_tp.layer, compiled_tp.op_sac_layer
    dropped = ("attention.residual", "attention.wo.reduce_scatter", "feed_forward.w2_out")

    def without(fn: Any) -> Any:
        return lambda **kw: tuple(t for t in fn(**kw) if t.name not in dropped)

    monkeypatch.setattr(compiled_tp, "layer", without(layer))
    monkeypatch.setattr(compiled_tp, "op_sac_layer", without(sac))
    assert len(_mismatches()) == sum(len(c["kept"]) for c in _stored())


def test_the_sequence_shard_and_the_gathered_weight_are_measured() -> None:
    """What makes the TP rule differ from the single-rank one, read from the traces
    themselves: under SP the block's input has sequence / TP rows while the norms' gathered
    outputs have the whole sequence; without SP a token-independent tensor of wo's whole
    weight [hidden, heads x head_dim] is kept (the same bytes at 32 and 128 tokens)."""
    for case in _stored():
        if case["model"] != "llama" or case["mode"] != "none" or case["heads"]:
            continue
        shapes = [tuple(s) for _, _, s, _ in case["kept"][0]]
        tokens = case["batch"] * case["seq"]
        whole_weight = (64, 64)  # dim x heads x head_dim of the probe's Llama (4 x 16)
        if case["sequence_parallel"]:
            assert (case["batch"], case["seq"] // case["tp"], 64) in shapes
            assert shapes.count((tokens, 64)) == 2  # attention_norm's, ffn_norm's gathered
            assert whole_weight not in shapes
        else:
            assert whole_weight in shapes


def test_estimate_keeps_the_traced_bytes_per_block() -> None:
    """The key wiring: `memplan estimate`'s layer block for each traced case (the probe's
    one-block model, torchtitan's code, compiled, under its TP) holds exactly the traced bytes
    of that rank; before compiled_tp, every such layout was refused."""
    for case in _stored():
        spec, cfg = bench.tiny(case, case["tp"])
        micro = micro_batch_of(spec, from_config(cfg))
        assert micro.modelled, (case["case"], micro.notes[:1])
        layers = micro.block("layers")
        assert layers is not None
        assert layers.bytes_each == case["traced_bytes"][0], case["case"]


def test_what_torch_or_torchtitan_fails_on_is_quoted() -> None:
    """2 k/v heads at TP 4 (torchtitan's fused wqkv view) is refused, quoting the error; FullAC
    under TP (torch 2.13's AOTAutograd wrapper) stays modelled as eager, since torchtitan's
    published rows ran it, with a note that quotes the error: every rank failed, and what
    memplan says quotes each rank's error."""
    failed = [c for c in _all_stored() if "error" in c]
    assert {c["mode"] for c in failed} >= {"full"}
    assert any(c["tp"] == 4 and not c["heads"] for c in failed)
    for case in failed:
        spec, cfg = bench.tiny(case, case["tp"])
        micro = micro_batch_of(spec, from_config(cfg))
        assert micro.modelled == (case["mode"] == "full"), case["case"]
        says = bench.refused(case, case["tp"])
        for error in case["error"]:
            assert bench.quoted(error) in says, (case["case"], error[:200])


def test_float8_stays_refused_under_tp() -> None:
    """Not traced under TP, so refused with the reason: torchao Float8 (Qwen3-MoE under TP:
    tests/test_compile_moe_tp.py)."""
    precision: Any = {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"}
    spec = make_spec(
        model={"architecture": TINY_TORCHTITAN_LLAMA, "implementation": "torchtitan"},
        precision=precision,
        training={"micro_batch_size": 2, "sequence_length": 16, "compile": True},
        parallelism={"engine": "fsdp2", "tensor": 2},
        hardware={"device": "cpu"},
    )
    micro = micro_batch_of(spec, from_config(TINY_TORCHTITAN_LLAMA))
    assert not micro.modelled
    assert "compiled blocks under tensor parallelism" in micro.notes[0]
    assert "Float8" in micro.notes[0]


def _counter(kept: list[list[Any]]) -> Counter[tuple[str, int]]:
    return bench.traced_tensors(kept)


@pytest.mark.slow
def test_live_trace_matches_the_rule(tmp_path: Path) -> None:
    """torchtitan's Llama block under TP 2 with SP and SelectiveAC, traced now on two spawned
    gloo ranks: each rank keeps the rule's set."""
    from tests.compile_tp_probe import Case, asdict, run

    case = Case("bf16", "selective-op", True)
    per_rank = [r[case.name] for r in run([case], tmp_path, world=2)]
    want = bench.rule_tensors(asdict(case), 2)
    for measured in per_rank:
        assert _counter(measured["kept"]) == want
