"""`training.compile` on torchtitan 0.3.0's DeepSeek-V3 blocks (memplan.model.forward.
compiled_mla; wired in memplan.model.stacks.torchtitan), against what Inductor's min-cut
partition keeps on torchtitan's real blocks.

benchmarks/compile_mla.py traces the grid (the dense and the MoE block, q_lora_rank 0 and > 0,
with and without node-limited groups, route_norm and shared experts, top 2, 6 and 8, the three
routings, bf16 / fp32, none / SelectiveAC / FullAC, at three (batch, sequence) sizes) into
benchmarks/results/compile-mla.json: the rule is checked against every stored trace here, one
case is traced again live (about 15 s), and the estimate's layer blocks are checked against
the stored traces' bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_mla as bench
from memplan.model.forward import compiled_mla
from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-mla.json"


def _stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _counters(case: dict[str, Any]) -> list[Counter[tuple[str, int]]]:
    """The stored trace's (dtype, bytes) multiset at each size, less zero-byte tensors."""
    return [bench.held(Counter({(dt, n): c for dt, n, c in size})) for size in case["traced"]]


def test_rule_matches_every_stored_trace() -> None:
    """Each traced case (Inductor's partition of torchtitan's real DeepSeek-V3 block, stored)
    is the rule's tensor set at that shape, layer, dtype and checkpointing, at each of the
    three traced sizes: the same multiset of (dtype, bytes)."""
    cases = _stored()
    assert {c["layer"] for c in cases} == {"dense", "moe"}
    assert {c["mode"] for c in cases} == {"none", "selective-op", "full"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    assert {c["routing"] for c in cases} == {"seeded", "balanced", "collapsed"}
    assert {c["dims"]["q_lora"] > 0 for c in cases} == {True, False}
    assert {c["dims"]["groups"] > 0 for c in cases} == {True, False}
    assert {c["dims"]["top_k"] for c in cases} >= {2, 6, 8}
    for case in cases:
        assert [tuple(s) for s in case["sizes"]] == bench.SIZES
        want = bench.rule_tensors(
            case["dims"], case["layer"], case["dtype"], case["mode"], case["routing"]
        )
        assert _counters(case) == want, case


def test_routing_does_not_change_the_partition() -> None:
    """At expert parallelism 1 every routed tensor has tokens x top_k rows: the three routings
    trace to the same kept set (stored traces). Not under SelectiveAC with torchtitan's
    balanced debug routing, whose round-robin indices replace topk's (bench.rule_tensors)."""
    by_routing: dict[tuple[Any, ...], list[Any]] = {}
    for c in _stored():
        if (c["routing"], c["mode"]) == ("balanced", "selective-op"):
            continue
        key = (c["shape"], c["layer"], c["dtype"], c["mode"])
        by_routing.setdefault(key, []).append(c["traced"])
    compared = [v for v in by_routing.values() if len(v) > 1]
    assert len(compared) >= 3
    for variants in compared:
        assert len({json.dumps(t) for t in variants}) == 1


@pytest.mark.parametrize(
    "case", [("base", "moe", "bf16", "none"), ("qlora", "moe", "fp32", "none")]
)
def test_dropping_any_tensor_breaks_the_match(case: tuple[str, str, str, str]) -> None:
    """The comparison is tight: the rule less any one of its tensors no longer matches the
    stored trace at (2, 16)."""
    shape, layer, dtype, mode = case
    (stored,) = (
        c
        for c in _stored()
        if (c["shape"], c["layer"], c["dtype"], c["mode"], c["routing"])
        == (shape, layer, dtype, mode, "seeded")
    )
    traced = _counters(stored)[1]
    b, s = bench.SIZES[1]
    dims = stored["dims"]
    mla = compiled_mla.Mla(**{k: dims[k] for k in compiled_mla.Mla.__slots__})
    moe = compiled_mla.Moe(
        experts=dims["experts"],
        top_k=dims["top_k"],
        inter=dims["moe_inter"],
        shared_inter=dims["moe_inter"] * dims["shared"],
        route_norm=dims["route_norm"],
    )
    kept = compiled_mla.moe_layer(batch=b, seq=s, mla=mla, moe=moe, dtype=dtype)
    assert Counter((t.dtype, t.bytes) for t in kept) == traced
    for i in range(len(kept)):
        less = kept[:i] + kept[i + 1 :]
        assert Counter((t.dtype, t.bytes) for t in less) != traced, kept[i].name


@pytest.mark.slow
def test_torchtitan_deepseek_v3_block_saves_what_inductor_partition_keeps() -> None:
    """torchtitan 0.3.0's DeepSeek-V3 MoE block compiled and traced now, bf16, seeded (about
    11 s: three sizes; slow: the default run checks the rule against the 57 stored traces, and
    test_compile_moe's live trace keeps the tracer itself exercised)."""
    pytest.importorskip("torchtitan.models.deepseek_v3")
    shape = bench.SHAPES["base"]
    traced = bench.traced(shape, "moe", "bf16", "none", "seeded")
    assert traced == bench.rule_tensors(shape, "moe", "bf16", "none")


def _micro(cfg: dict[str, Any], *, batch: int = 2, seq: int = 16, **training: Any) -> Any:
    precision = training.pop("precision", "bf16-mixed")
    parallelism = {"engine": "fsdp2", "data": 8, **training.pop("parallelism", {})}
    device = training.pop("device", "cpu")
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision=precision,
        training={"micro_batch_size": batch, "sequence_length": seq, "compile": True, **training},
        parallelism=parallelism,
        hardware={"device": "cpu"} if device == "cpu" else {"gpu": "H100-80GB"},
    )
    return micro_batch_of(spec, from_config(cfg))


@pytest.mark.parametrize(
    ("mode", "dtype", "batch", "seq"),
    [
        ("none", "bf16", 2, 16),
        ("none", "fp32", 1, 32),
        ("none", "fp32", 2, 16),
        ("selective-op", "bf16", 2, 16),
        ("selective-op", "fp32", 1, 16),
        ("full", "bf16", 1, 32),
    ],
)
def test_estimate_keeps_the_traced_blocks(mode: str, dtype: str, batch: int, seq: int) -> None:
    """`estimate` with training.compile on a tiny torchtitan DeepSeek-V3 (bench.deepseek_v3,
    the traced base shape: one dense layer, one MoE layer): each layer kind's block holds the
    bytes the stored trace of the same block keeps at that size. Without the rule this setting
    was refused ("training.compile for torchtitan's DeepSeek-V3 is not modelled")."""
    precision = "bf16-mixed" if dtype == "bf16" else "fp32"
    saved = _micro(
        bench.deepseek_v3(), batch=batch, seq=seq, precision=precision,
        activation_checkpointing=mode,
    )  # fmt: skip
    assert saved.modelled, saved.notes
    size = bench.SIZES.index((batch, seq))
    for name, layer in (("layers.dense", "dense"), ("layers", "moe")):
        (case,) = (
            c
            for c in _stored()
            if (c["shape"], c["layer"], c["dtype"], c["mode"], c["routing"])
            == ("base", layer, dtype, mode, "seeded")
        )
        (block,) = (b for b in saved.blocks if b.name == name)
        assert block.count == 1
        assert block.bytes_each == case["traced_bytes"][size], (name, case["traced"][size])
    assert any("training.compile" in n for n in saved.notes)


@pytest.mark.parametrize(
    ("training", "reason"),
    [
        ({"precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"}}, "Float8"),
        ({"device": "cuda"}, "CUDA"),
    ],
)
def test_untraced_settings_stay_refused_with_the_reason(
    training: dict[str, Any], reason: str
) -> None:
    saved = _micro(bench.deepseek_v3(), **training)
    assert not saved.modelled
    assert reason in saved.notes[0]
