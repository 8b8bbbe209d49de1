"""`training.compile` on torchtitan 0.3.0's Qwen3-MoE blocks (memplan.model.forward.compiled.
qwen3_moe_layer, op_sac_moe_layer; wired in memplan.model.stacks.torchtitan), against what
Inductor's min-cut partition keeps on torchtitan's real block.

benchmarks/compile_moe.py traces the grid (shapes, the three routings, bf16 / fp32, the router
as on CPU and as CUDA autocast runs it, none / SelectiveAC / FullAC, the expert counts either
side of where the router's softmax is kept as two statistics) into benchmarks/results/
compile-moe.json: the rule is checked against every stored trace here, one case is traced again
live (about 10 s), and the estimate's layer block is checked against the stored traces' bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_moe as bench
from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-moe.json"


def _stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _counter(rows: list[list[Any]]) -> Counter[tuple[str, int]]:
    return Counter({(dtype, n): count for dtype, n, count in rows})


def test_rule_matches_every_stored_trace() -> None:
    """Each traced case (Inductor's partition of torchtitan's real Qwen3-MoE block, stored) is
    the rule's tensor set at that shape, dtype, router and checkpointing: the same (dtype, bytes
    per token) multiset and the same constants (offsets, weight casts)."""
    cases = _stored()
    assert {c["routing"] for c in cases} == {"seeded", "balanced", "collapsed"}
    assert {c["mode"] for c in cases} == {"none", "selective-op", "full"}
    assert {c["cuda_router"] for c in cases} == {True, False}
    assert {c["dtype"] for c in cases} == {"bf16", "fp32"}
    assert {c["dims"]["experts"] for c in cases} >= {9, 10, 46, 47, 128}
    assert {c["cuda_router"] for c in cases if c["shape"] == "qwen3-30b-a3b"} == {True, False}
    for case in cases:
        per_token, constants = bench.rule_tensors(
            case["dims"], case["dtype"], case["mode"], case["cuda_router"]
        )
        assert _counter(case["traced"]) == per_token, case
        assert _counter(case["traced_constants"]) == constants, case


def test_routing_does_not_change_the_partition() -> None:
    """At expert parallelism 1 every routed tensor has tokens x top_k rows: the three routings
    trace to the same kept set (stored traces)."""
    by_routing: dict[tuple[Any, ...], list[Any]] = {}
    for c in _stored():
        key = (c["shape"], c["dtype"], c["mode"], c["cuda_router"])
        by_routing.setdefault(key, []).append((c["routing"], c["traced"]))
    compared = [v for v in by_routing.values() if len(v) > 1]
    assert len(compared) >= 3
    for variants in compared:
        assert len({json.dumps(traced) for _, traced in variants}) == 1, variants


def test_torchtitan_qwen3_moe_block_saves_what_inductor_partition_keeps() -> None:
    """torchtitan 0.3.0's Qwen3-MoE block compiled and traced now, bf16, CPU router."""
    pytest.importorskip("torchtitan.models.qwen3")
    shape = bench.SHAPES["e8k2"]
    traced = bench.traced(shape, "bf16", "none", "seeded", False)
    assert traced == bench.rule_tensors(shape, "bf16", "none", False)


def qwen3_moe(experts: int = 8, top_k: int = 2) -> dict[str, Any]:
    """bench.SHAPES["e8k2"] as a Hugging Face qwen3_moe config, two layers."""
    return {
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 256, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "num_experts": experts, "num_experts_per_tok": top_k,
        "moe_intermediate_size": 48, "norm_topk_prob": True,
    }  # fmt: skip


def _micro(cfg: dict[str, Any], **training: Any) -> Any:
    device = training.pop("device", "cpu")
    parallelism = {"engine": "fsdp2", "data": 8, **training.pop("parallelism", {})}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={"micro_batch_size": 2, "sequence_length": 32, "compile": True, **training},
        parallelism=parallelism,
        hardware={"device": device} if device == "cpu" else {"gpu": "H100-80GB"},
    )
    return micro_batch_of(spec, from_config(cfg))


@pytest.mark.parametrize(
    ("device", "experts", "mode"),
    [
        ("cpu", 8, "none"),
        ("cuda", 8, "none"),
        ("cuda", 8, "selective-op"),
        ("cpu", 8, "full"),
        ("cuda", 128, "none"),
    ],
)
def test_estimate_keeps_the_traced_block(device: str, experts: int, mode: str) -> None:
    """`estimate` with training.compile on torchtitan's Qwen3-MoE: each layer block holds the
    bytes the stored trace of the same block keeps (per token x 2 x 32 + constants); CUDA's
    router is the fp32 one. Without the rule this setting was refused."""
    top_k = 8 if experts == 128 else 2
    cuda = device == "cuda"
    (case,) = (
        c
        for c in _stored()
        if c["dims"]["experts"] == experts
        and c["dims"]["hidden"] == 64
        and c["dims"]["top_k"] == top_k
        and c["dtype"] == "bf16"
        and c["mode"] == mode
        and c["routing"] == "seeded"
        and c["cuda_router"] == (cuda and mode == "none")
    )
    saved = _micro(qwen3_moe(experts, top_k), activation_checkpointing=mode, device=device)
    assert saved.modelled, saved.notes
    traced = sum(n * k for _, n, k in case["traced"]) * 2 * 32
    traced += sum(n * k for _, n, k in case["traced_constants"])
    (layers,) = (b for b in saved.blocks if b.name == "layers")
    assert layers.bytes_each == traced
    assert any("training.compile" in n for n in saved.notes)


def test_compile_under_expert_parallelism_is_modelled() -> None:
    """Refused before memplan.model.forward.compiled_ep (tests/test_compile_moe_ep.py)."""
    saved = _micro(qwen3_moe(), parallelism={"data": 4, "expert": 2})
    assert saved.modelled, saved.notes


def test_estimate_of_qwen3_30b_a3b_keeps_its_traced_block() -> None:
    """memplan's Qwen3-30B-A3B preset with torchtitan's code, compiled, on an H100 (the fp32
    router): each layer block holds what the stored trace of one block at the model's full
    widths keeps, at 2 x 32 tokens."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory

    (case,) = (c for c in _stored() if c["shape"] == "qwen3-30b-a3b" and c["cuda_router"])
    loaded = validate(
        {
            "model": {"preset": "qwen3-30b-a3b", "implementation": "torchtitan"},
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 2, "sequence_length": 32, "compile": True},
            "parallelism": {"engine": "fsdp2", "data": 64},
            "hardware": {"gpu": "H100-80GB"},
        }
    )
    saved = micro_batch_of(loaded.spec, load_inventory(loaded))
    assert saved.modelled, saved.notes
    traced = sum(n * k for _, n, k in case["traced"]) * 2 * 32
    traced += sum(n * k for _, n, k in case["traced_constants"])
    (layers,) = (b for b in saved.blocks if b.name == "layers")
    assert layers.count == 48 and layers.bytes_each == traced
