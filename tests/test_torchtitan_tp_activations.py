"""torchtitan's Llama 3 and dense Qwen3 under tensor (+ sequence) parallelism and context
parallelism (memplan.activations.torchtitan_parallel).

The oracle for TP is torchtitan 0.3.0's own model sharded with torchtitan's TP plan on 2 gloo
ranks (tests/torchtitan_tp_probe.py), per rank, to the byte; the whole matrix (60 rank-cases:
fp32/bf16 x none/full/selective-op x SP on/off x wqkv or wq/wk/wv, and a vocabulary TP does not
divide, loss parallel off) is benchmarks/torchtitan_tp_activations.py (benchmarks/results/
torchtitan-tp-activations.json); here a representative subset in one 2-rank run. Ring attention
(CP) needs CUDA kernels: its part is pinned to the source. Needs `pip install torchtitan==0.3.0`
and its imports (spmd_types, tyro, einops, docstring_parser, torch_checkpointing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan import activations
from memplan.activations import torchtitan_parallel, torchtitan_pipeline
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.settings import layout_of, setting_of
from tests.conftest import make_spec, micro_batch_of

LLAMA_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
}


@pytest.mark.slow
def test_tp_rule_matches_torchtitan_on_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.llama3")
    from benchmarks.torchtitan_tp_activations import predicted
    from tests.torchtitan_tp_probe import Case, run

    cases = [
        Case("bf16", "full", True),
        Case("bf16", "selective-op", True, vocab=255),
        Case("fp32", "selective-op", False, fused_qkv=False),
        # torchtitan 0.3.0's own Qwen3 sharding (q_norm / k_norm on head shards)
        Case("bf16", "none", True, model="qwen3", plan="0.3.0"),
    ]
    ranks = run(cases, tmp_path)
    for case in cases:
        for r, measured in enumerate(ranks):
            assert predicted(case, r) == measured[case.name], (case.name, r)


def spec_70b(**parallelism: Any) -> Any:
    return make_spec(
        model={"architecture": LLAMA_70B, "implementation": "torchtitan"},
        training={
            "micro_batch_size": 16,
            "sequence_length": 8192,
            "activation_checkpointing": "full",
        },
        parallelism={"engine": "fsdp2", "data": 32, **parallelism},
    )


def test_pin_70b_tp8_sp_full_ac_block_input_is_the_sequence_shard() -> None:
    """Pinning (the rule's arithmetic): Llama 3.1 70B, TP 8 + SP, full AC, local batch 16 x
    8192 (published table 4): each block keeps its input [16, 8192 / 8, 8192] bf16; the loss
    keeps log_probs [16 x 8192, 128256 / 8] fp32 and the labels."""
    saved = micro_batch_of(spec_70b(tensor=8, sequence_parallel=True), from_config(LLAMA_70B))
    assert saved.modelled, saved.notes
    layers = saved.block("layers")
    assert layers is not None and layers.count == 80
    assert layers.bytes_each == 16 * 1024 * 8192 * 2
    loss = saved.block("loss")
    assert loss is not None
    assert loss.bytes_each == 16 * 8192 * 16032 * 4 + 16 * 8192 * 8


def test_without_sequence_parallel_the_block_input_is_whole() -> None:
    sp = micro_batch_of(spec_70b(tensor=8, sequence_parallel=True), from_config(LLAMA_70B))
    whole = micro_batch_of(spec_70b(tensor=8), from_config(LLAMA_70B))
    a, b = sp.block("layers"), whole.block("layers")
    assert a is not None and b is not None
    assert b.bytes_each == 8 * a.bytes_each


def test_pin_cp_saves_the_single_gpu_rule_at_sequence_over_cp() -> None:
    """Pinning (held by the source, ring attention runs on CUDA only): under CP 4 a rank saves
    what one GPU saves at sequence / 4, and torch's ring attention adds its transients."""
    cfg = {**LLAMA_70B, "num_hidden_layers": 2}
    inv = from_config(cfg)
    cp = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={
            "micro_batch_size": 1,
            "sequence_length": 32768,
            "activation_checkpointing": "none",
        },
        parallelism={"engine": "fsdp2", "data": 2, "context": 4},
    )
    one = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={
            "micro_batch_size": 1,
            "sequence_length": 8192,
            "activation_checkpointing": "none",
        },
        parallelism={"engine": "fsdp2", "data": 8},
    )
    split = micro_batch_of(cp, inv)
    assert split.modelled, split.notes
    assert split.bytes == activations.predict(inv, setting_of(one)).bytes
    names = [b.name for b in split.buffers]
    assert names == ["context_parallel_ring_forward", "context_parallel_ring_backward"]
    kv = 2 * 8192 * 8 * 128
    assert split.buffers[0].bytes == (2 + 4) * kv * 2 + 2 * 8192 * 64 * 128 * 4


def test_torchtitan_refuses_expert_parallelism() -> None:
    cfg = dict(LLAMA_70B)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": 8, "expert": 2},
    )
    arch = from_config(cfg).architecture
    assert arch is not None
    saved = torchtitan_parallel.micro_batch(arch, setting_of(spec), layout_of(spec))
    assert not saved.modelled and "expert parallelism" in saved.notes[0]


def test_estimate_runs_for_torchtitan_tp_sp() -> None:
    report = estimate(spec_70b(tensor=8, sequence_parallel=True), from_config(LLAMA_70B))
    assert report.activations.modelled
    assert report.activations.implementation == "torchtitan"


@pytest.mark.parametrize(("layers", "every"), [(6, 2), (8, 3)])
def test_pipeline_rank_checkpoints_every_nth_of_its_own_blocks(layers: int, every: int) -> None:
    """torchtitan's layer SAC under PP: each rank's process counts the blocks it wraps from 1
    (9dec370 `ptd_checkpoint_wrapper._count`). Oracle: torchtitan's real model built with the
    last rank's blocks and checkpointed the same way (tests/torchtitan_probe.py, which counts
    the blocks of the model it builds), less the embedding's token ids the last rank does not
    hold; the last rank of 1F1B keeps one micro-batch in flight."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.llama3")
    from tests.test_torchtitan_activations import tiny
    from tests.torchtitan_probe import Shape, held_bytes

    cfg = tiny(layers)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="bf16-mixed",
        training={
            "micro_batch_size": 2,
            "sequence_length": 16,
            "activation_checkpointing": "full",
            "checkpoint_every": every,
            "gradient_accumulation_steps": 2,
        },
        parallelism={"engine": "fsdp2", "data": 2, "pipeline": 2},
        hardware={"device": "cpu"},
    )
    inv = from_config(cfg)
    ranks = activations.for_stages(inv, setting_of(spec), layout_of(spec), spec.finetune, 2)
    last = ranks[-1]
    assert last.modelled, last.notes
    assert last.block("embeddings") is None
    stage_layers = layers // 2
    measured = held_bytes("bf16", "full", Shape(layers=stage_layers), every)
    assert last.bytes == measured - 2 * 16 * 8  # the token ids, int64


def test_pin_checkpointed_per_chunk_counts_across_a_ranks_chunks() -> None:
    """Pinning (9dec370's counter, read from the source): a rank with two chunks of 3 blocks
    and every 2 checkpoints its 2nd, 4th and 6th: one in the first chunk, two in the second."""
    assert torchtitan_pipeline.checkpointed_per_chunk((3, 3), 2) == (1, 2)
    assert torchtitan_pipeline.checkpointed_per_chunk((4,), 3) == (1,)


def test_estimate_runs_for_torchtitan_pipeline_with_checkpoint_every() -> None:
    spec = make_spec(
        model={"architecture": LLAMA_70B, "implementation": "torchtitan"},
        training={
            "micro_batch_size": 1,
            "sequence_length": 8192,
            "activation_checkpointing": "full",
            "checkpoint_every": 2,
            "gradient_accumulation_steps": 4,
        },
        parallelism={
            "engine": "fsdp2",
            "data": 2,
            "tensor": 8,
            "pipeline": 4,
            "sequence_parallel": True,
        },
    )
    report = estimate(spec, from_config(LLAMA_70B))
    assert report.activations.modelled, report.activations.notes
    assert any("layer SAC on this pipeline rank" in n for n in report.activations.notes)
