"""`model.implementation: torchtitan` on torchtitan's own MoE code: the Qwen3-MoE and
DeepSeek-V3 rules (memplan.model.stacks.torchtitan_moe, torchtitan_mla) against torchtitan
0.3.0's real Qwen3Model and DeepSeekV3Model built from their own layer factories on CPU, to the
byte (tests/torchtitan_probe.py measures), a subset of benchmarks/torchtitan_moe.py's matrix
(benchmarks/results/torchtitan-moe.json); the refusals; the report's model-code note. The rest
needs no torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from memplan import activations
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.settings import setting_of
from tests.conftest import make_spec, micro_batch_of


def qwen3_moe(layers: int = 2, *, experts: int = 8, top_k: int = 2) -> dict[str, Any]:
    """tests/torchtitan_probe.py's QWEN3_MOE_TINY as a Hugging Face qwen3_moe config."""
    return {
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": 48,
        "norm_topk_prob": True,
    }


def _spec(cfg: dict[str, Any], **overrides: Any) -> Any:
    parallelism = {"engine": "fsdp2", "data": 8, **overrides.pop("parallelism", {})}
    return make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism=parallelism,
        **overrides,
    )


def predicted(dtype: str, mode: str, *, layers: int, batch: int, every: int, fused: bool) -> int:
    from memplan.model.stacks import torchtitan

    cfg = qwen3_moe(layers)
    spec = _spec(
        cfg,
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
            "checkpoint_every": every,
        },
        hardware={"device": "cpu"},
    )
    arch = from_config(cfg).architecture
    assert arch is not None
    saved = torchtitan.saved(arch, setting_of(spec), fused_qkv=fused)
    assert saved.modelled, saved.notes
    return saved.bytes


CASES = [
    # dtype, mode, layers, batch, every, fused, routing
    ("bf16", "none", 2, 2, 1, True, "seeded"),
    ("fp32", "none", 1, 1, 1, True, "seeded"),  # experts in bf16: x and weight copies
    ("bf16", "full", 2, 2, 1, True, "seeded"),
    ("bf16", "selective-op", 2, 2, 1, True, "collapsed"),  # topk's fp32 values kept
    ("fp32", "selective-op", 2, 1, 1, False, "balanced"),
    ("bf16", "full", 4, 2, 2, True, "seeded"),
]


@pytest.mark.parametrize(("dtype", "mode", "layers", "batch", "every", "fused", "routing"), CASES)
def test_qwen3_moe_rule_matches_torchtitan_to_the_byte(
    dtype: str, mode: str, layers: int, batch: int, every: int, fused: bool, routing: str
) -> None:
    """Independent oracle: torchtitan's own Qwen3-MoE (router, local token reordering,
    GroupedExperts, its FullAC / SelectiveAC) run on CPU, under the routing the rule claims to
    hold for (any: at expert parallelism 1 every routed tensor has tokens x top_k rows)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.torchtitan_probe import QWEN3_MOE_TINY, held_bytes

    shape = replace(QWEN3_MOE_TINY, layers=layers, batch=batch, fused_qkv=fused, routing=routing)
    with pytest.warns(UserWarning, match="CPU autocast"):  # the router's fp32 autocast
        measured = held_bytes(dtype, mode, shape, every)
    assert predicted(dtype, mode, layers=layers, batch=batch, every=every, fused=fused) == measured


def test_qwen3_moe_estimate_names_the_model_code() -> None:
    cfg = qwen3_moe()
    report = estimate(_spec(cfg), from_config(cfg))
    assert report.activations.modelled and report.activations.implementation == "torchtitan"
    assert any("Qwen3-MoE model code" in n for n in report.activations.notes)


@pytest.mark.parametrize(
    ("change", "parallelism", "words"),
    [
        ({"mlp_only_layers": [0]}, {}, "dense layers"),
        ({"decoder_sparse_step": 2}, {}, "dense layers"),
        ({"norm_topk_prob": False}, {}, "norm_topk_prob"),
        ({}, {"data": 4, "context": 2}, "context parallelism"),
        ({}, {"data": 4, "expert": 2, "tensor": 2}, "Can not redistribute from S(1) to P(sum)"),
        ({}, {"data": 4, "expert": 2, "expert_capacity_factor": 1.0}, "dropless"),
    ],
)
def test_qwen3_moe_refusals_name_what_is_not_covered(
    change: dict[str, Any], parallelism: dict[str, int], words: str
) -> None:
    cfg = {**qwen3_moe(), **change}
    saved = micro_batch_of(_spec(cfg, parallelism=parallelism), from_config(cfg))
    assert not saved.modelled and saved.implementation == "torchtitan"
    assert words in saved.notes[0]


def test_compile_is_modelled_at_ep1_and_under_ep() -> None:
    """training.compile on Qwen3-MoE: traced at expert parallelism 1 (tests/test_compile_moe.py)
    and under EP, its all-to-all dispatcher compiled (tests/test_compile_moe_ep.py)."""
    cfg = qwen3_moe()
    saved = micro_batch_of(_spec(cfg, training={"compile": True}), from_config(cfg))
    assert saved.modelled
    spec = _spec(cfg, training={"compile": True}, parallelism={"data": 4, "expert": 2})
    saved = micro_batch_of(spec, from_config(cfg))
    assert saved.modelled, saved.notes


def test_pin_qwen3_30b_a3b_router_on_cuda_runs_in_fp32() -> None:
    """Pinning (the rule's arithmetic, from torchtitan's source): on CUDA the router's gate
    runs under autocast fp32 (moe.py::TokenChoiceTopKRouter.forward), so one Qwen3-30B-A3B
    block at 2 x 4096 tokens, bf16, saves an fp32 copy of ffn_norm's output and of the gate's
    weight [128, 2048] instead of the bf16 output, and the router's scores in fp32; on CPU
    (autocast disabled for fp32, measured above) the same tensors are bf16."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory

    def layer(device: str) -> dict[str, int]:
        hardware = {"gpu": "H100-80GB"} if device == "cuda" else {"device": "cpu"}
        loaded = validate(
            {
                "model": {"preset": "qwen3-30b-a3b", "implementation": "torchtitan"},
                "precision": "bf16-mixed",
                "optimizer": {"name": "adamw"},
                "training": {"micro_batch_size": 2, "sequence_length": 4096},
                "parallelism": {"engine": "fsdp2", "data": 64},
                "hardware": hardware,
            }
        )
        saved = activations.predict(load_inventory(loaded), setting_of(loaded.spec))
        block = saved.block("layers")
        assert block is not None and block.count == 48
        return {t.name: t.bytes for t in block.tensors if t.name.startswith("moe.router")}

    t = 2 * 4096
    assert layer("cuda") == {
        "moe.router.gate.input_fp32": t * 2048 * 4,
        "moe.router.gate.weight_fp32": 128 * 2048 * 4,
        "moe.router.softmax": t * 128 * 4,
        "moe.router.topk_indices": t * 8 * 8,
        "moe.router.topk_scores": t * 8 * 4,
        "moe.router.topk_sum": t * 4,
    }
    assert layer("cpu") == {
        "moe.router.gate.input": t * 2048 * 2,
        "moe.router.softmax": t * 128 * 2,
        "moe.router.topk_indices": t * 8 * 8,
        "moe.router.topk_scores": t * 8 * 2,
        "moe.router.topk_sum": t * 2,
    }


def deepseek_v3(layers: int = 3, **mla: Any) -> dict[str, Any]:
    """tests/torchtitan_probe.py's DeepSeek-V3 shape (Shape(model="deepseek_v3"), Mla) as a
    Hugging Face deepseek_v3 config."""
    m = {"q_lora": 0, "dense_layers": 1, "groups": 4, "limited": 2, "route_norm": True, **mla}
    return {
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "norm_topk_prob": m["route_norm"],
        "q_lora_rank": m["q_lora"] or None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "first_k_dense_replace": m["dense_layers"],
        "n_shared_experts": 1,
        "n_group": m["groups"] or None,
        "topk_group": m["limited"] or None,
        "routed_scaling_factor": 2.5,
    }


DEEPSEEK_CASES = [
    # dtype, mode, batch, q_lora, dense layers, routing
    ("bf16", "none", 2, 16, 1, "seeded"),
    ("fp32", "none", 1, 0, 1, "seeded"),  # fp32 at batch 1: v's bmm saves wkv_b's output
    ("bf16", "selective-op", 2, 0, 1, "collapsed"),  # the group topks' outputs kept
    ("fp32", "full", 2, 16, 2, "balanced"),
]


@pytest.mark.parametrize(("dtype", "mode", "batch", "q_lora", "dense", "routing"), DEEPSEEK_CASES)
def test_deepseek_v3_rule_matches_torchtitan_to_the_byte(
    dtype: str, mode: str, batch: int, q_lora: int, dense: int, routing: str
) -> None:
    """Independent oracle: torchtitan's own DeepSeek-V3 (MLA, dense first layers, sigmoid
    router with node-limited groups, shared experts) run on CPU."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.deepseek_v3")
    from memplan.model.stacks import torchtitan
    from tests.torchtitan_probe import Mla, Shape, held_bytes

    mla = Mla(q_lora=q_lora, dense_layers=dense)
    shape = Shape(
        model="deepseek_v3",
        layers=3,
        batch=batch,
        ffn=128,
        experts=8,
        top_k=2,
        moe_ffn=24,
        mla=mla,
        routing=routing,
    )
    with pytest.warns(UserWarning, match="CPU autocast"):
        measured = held_bytes(dtype, mode, shape)
    cfg = deepseek_v3(3, q_lora=q_lora, dense_layers=dense)
    spec = _spec(
        cfg,
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
        },
        hardware={"device": "cpu"},
    )
    arch = from_config(cfg).architecture
    assert arch is not None
    saved = torchtitan.saved(arch, setting_of(spec))
    assert saved.modelled, saved.notes
    assert saved.bytes == measured
    kinds = [b.name for b in saved.blocks if b.layered]
    assert kinds[0] == "layers.dense" and saved.layer_order[:dense] == ("layers.dense",) * dense


@pytest.mark.parametrize(
    ("experts", "moe_ffn", "q_lora"),
    [
        (8, 8, 0),  # the shared expert's w1 and w3: [8, 64], the gate's shape
        (40, 24, 0),  # wkv_a: kv_lora 32 + rope 8 = 40 rows
        (16, 24, 16),  # wq_a: q_lora 16 rows
    ],
)
def test_deepseek_v3_selective_op_recomputes_every_mm_of_the_gates_shape(
    experts: int, moe_ffn: int, q_lora: int
) -> None:
    """Independent oracle: torchtitan's real DeepSeek-V3 under SelectiveAC, where a matmul's
    weight has the router gate's shape [experts, hidden]: `_wrap_block` matches
    force_recompute_mm_shapes_by_fqns by shape, so that mm is recomputed and not counted,
    which moves every later mm's parity. Before the rule matched by shape these were off by
    -1,024, -16,384 and +21,504 bytes."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.deepseek_v3")
    from memplan.model.stacks import torchtitan
    from tests.torchtitan_probe import Mla, Shape, held_bytes

    shape = Shape(
        model="deepseek_v3",
        layers=3,
        batch=2,
        ffn=128,
        experts=experts,
        top_k=2,
        moe_ffn=moe_ffn,
        mla=Mla(q_lora=q_lora),
        routing="seeded",
    )
    with pytest.warns(UserWarning, match="CPU autocast"):
        measured = held_bytes("bf16", "selective-op", shape)
    cfg = deepseek_v3(3, q_lora=q_lora)
    cfg.update(n_routed_experts=experts, moe_intermediate_size=moe_ffn)
    training = {
        "micro_batch_size": 2,
        "sequence_length": 16,
        "activation_checkpointing": "selective-op",
    }
    spec = _spec(cfg, precision="bf16-mixed", training=training, hardware={"device": "cpu"})
    arch = from_config(cfg).architecture
    assert arch is not None
    assert torchtitan.saved(arch, setting_of(spec)).bytes == measured


def test_deepseek_v3_refusals_name_what_is_not_covered() -> None:
    """On CUDA (the inner attention's kernel for MLA's unequal head dims is not established),
    layer SAC over two layer kinds, and context parallelism (TP is modelled)."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory

    loaded = validate(
        {
            "model": {"preset": "deepseek-v3", "implementation": "torchtitan"},
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 1, "sequence_length": 4096},
            "parallelism": {"engine": "fsdp2", "data": 256},
            "hardware": {"gpu": "H100-80GB"},
        }
    )
    saved = activations.predict(load_inventory(loaded), setting_of(loaded.spec))
    assert not saved.modelled and "on CUDA is not modelled" in saved.notes[0]
    cpu = {"device": "cpu"}
    cfg = deepseek_v3(4)
    training = {"activation_checkpointing": "full", "checkpoint_every": 2}
    saved = micro_batch_of(_spec(cfg, hardware=cpu, training=training), from_config(cfg))
    assert not saved.modelled and "two layer kinds" in saved.notes[0], saved.notes
    cp = _spec(cfg, hardware=cpu, parallelism={"data": 4, "context": 2})
    saved = micro_batch_of(cp, from_config(cfg))
    assert not saved.modelled and "context parallelism" in saved.notes[0]
