"""torchtitan's own Qwen3-MoE and DeepSeek-V3 (`model.implementation: torchtitan`, model_types
qwen3_moe and deepseek_v3): memplan's rules (memplan.model.stacks.torchtitan_moe,
torchtitan_mla) against torchtitan 0.3.0's real models, the whole matrix, and `memplan
estimate` of Qwen3-30B-A3B and DeepSeek-V3 with torchtitan's model code beside
transformers'.

Part 1, `matrix`: torchtitan 0.3.0's Qwen3Model built tiny on CPU from its own MoE layer
factory (tests/torchtitan_probe.py, models/qwen3/__init__.py::_build_qwen3_moe_layers: dim 64,
4 heads x head_dim 32, 2 k/v heads, vocab 256, sequence 16, the `standard` token dispatcher,
local at expert parallelism 1), forward + its cross-entropy loss, what it holds for backward
measured by the storages still alive, against the rule, for two expert shapes (8 experts, top 2,
expert hidden 48; 16 experts, top 4, hidden 24) x fp32 and bf16 x none / full (FullAC) /
selective-op (SelectiveAC) x fused wqkv or wq/wk/wv x batch 1 and 2 x 1, 2 and 3 layers, the
router seeded (its gate as torchtitan initialises it, seed 0); then every routing the rule
claims to hold for (seeded; torchtitan's `_debug_force_load_balance` round-robin; "collapsed":
every token sent to the same top_k experts, the others empty) over precision x recompute; and
every-Nth-layer full checkpointing (3, 4 and 6 layers, N = 2 and 3).

Part 1c, `deepseek_matrix`: torchtitan 0.3.0's DeepSeekV3Model built tiny on CPU
(tests/torchtitan_probe.py::deepseek_v3_config, models/deepseek_v3/__init__.py::
_build_dsv3_layers: MLA with kv_lora 32, nope 16, rope 8, v 16, 4 heads, dim 64; dense first
layers of hidden 128; 8 experts, top 2, expert hidden 24, 1 shared expert, sigmoid router with
4 groups of which 2 are kept, route_norm, route_scale 2.5; SDPA as the inner attention), for
fp32 and bf16 x none / full / selective-op x q_lora_rank 0 and 16 x batch 1 and 2 x 2 and 3
layers; then 4 layers with 0 or 2 dense layers, no groups, no route_norm, 2 shared experts, and
the three routings.

Part 1b, `fake`: two blocks of Qwen3-30B-A3B (torchtitan's `_30b_a3b`: dim 2048, 32 x 128
heads, 4 k/v heads, 128 experts, top 8, expert hidden 768, vocab 151936) at torchtitan's
config_registry.py::qwen3_30b_a3b local batch, 2 x 4096, bf16, under FakeTensorMode; and
four blocks of DeepSeek-V3 (torchtitan's `_671b`: three dense, one MoE) at 1 x 4096 on CPU.

Part 2, `estimates`: `memplan estimate` of Qwen3-30B-A3B (memplan's preset, the Hugging Face
config.json), FSDP2 over 64 ranks, local batch 2 x 4096 (qwen3_30b_a3b's), bf16-mixed AdamW,
H100-80GB, expandable_segments, for none / full / selective-op with `model.implementation`
torchtitan and (none, full) transformers: activations, peak allocated and max reserved; and
DeepSeek-V3 (memplan's preset), FSDP2 over 256 ranks, 1 x 4096, full checkpointing, with
torchtitan's code (refused on CUDA: the row records why) and transformers'.

    PYTHONPATH=$PWD python benchmarks/torchtitan_moe.py   # ~3 min on 2 cores
    # writes benchmarks/results/torchtitan-moe.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchtitan  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.model.stacks import torchtitan as rule  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from memplan.report.settings import setting_of  # noqa: E402
from tests.torchtitan_probe import (  # noqa: E402
    QWEN3_MOE_TINY,
    Mla,
    Shape,
    held_bytes,
    held_bytes_fake,
)

OUT = ROOT / "benchmarks" / "results" / "torchtitan-moe.json"
GIB = 2**30
EXPERT_SHAPES = ((8, 2, 48), (16, 4, 24))
"""(experts, top_k, expert hidden) of the tiny models: 1/4 and 1/4 of the experts per token,
the expert hidden below dim as in 30B-A3B (768 < 2048) and 235B-A22B (1536 < 4096)."""
ROUTINGS = ("seeded", "balanced", "collapsed")
QWEN3_30B_A3B = Shape(
    model="qwen3_moe",
    layers=2,
    batch=2,
    seq=4096,
    dim=2048,
    heads=32,
    kv_heads=4,
    head_dim=128,
    vocab=151936,
    experts=128,
    top_k=8,
    moe_ffn=768,
)
"""Two blocks of torchtitan 0.3.0's models/qwen3/__init__.py::_30b_a3b at 2 x 4096."""
DEEPSEEK_TINY = Shape(model="deepseek_v3", layers=2, ffn=128, experts=8, top_k=2, moe_ffn=24)
DEEPSEEK_V3 = Shape(
    model="deepseek_v3",
    layers=4,
    batch=1,
    seq=4096,
    dim=7168,
    heads=128,
    ffn=18432,
    vocab=129280,
    experts=256,
    top_k=8,
    moe_ffn=2048,
    mla=Mla(
        q_lora=1536, kv_lora=512, nope=128, rope=64, v_dim=128, dense_layers=3, groups=8, limited=4
    ),
)
"""Four blocks (three dense, one MoE) of torchtitan 0.3.0's models/deepseek_v3/__init__.py::
_671b at 1 x 4096."""


def config(shape: Shape) -> dict[str, Any]:
    """`shape` as the Hugging Face qwen3_moe or deepseek_v3 config memplan reads."""
    if shape.model == "deepseek_v3":
        m = shape.mla
        return {
            "model_type": "deepseek_v3",
            "hidden_size": shape.dim,
            "intermediate_size": shape.ffn,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.heads,
            "vocab_size": shape.vocab,
            "max_position_embeddings": max(128, shape.seq),
            "tie_word_embeddings": False,
            "n_routed_experts": shape.experts,
            "num_experts_per_tok": shape.top_k,
            "moe_intermediate_size": shape.moe_ffn,
            "norm_topk_prob": m.route_norm,
            "q_lora_rank": m.q_lora or None,
            "kv_lora_rank": m.kv_lora,
            "qk_nope_head_dim": m.nope,
            "qk_rope_head_dim": m.rope,
            "v_head_dim": m.v_dim,
            "first_k_dense_replace": m.dense_layers,
            "n_shared_experts": m.shared,
            "n_group": m.groups or None,
            "topk_group": m.limited or None,
            "routed_scaling_factor": m.route_scale,
        }
    return {
        "model_type": "qwen3_moe",
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": max(128, shape.seq),
        "tie_word_embeddings": False,
        "num_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
        "moe_intermediate_size": shape.moe_ffn,
        "norm_topk_prob": True,
    }


def predicted(dtype: str, mode: str, shape: Shape, every: int = 1) -> int:
    spec = validate(
        {
            "model": {"architecture": config(shape), "implementation": "torchtitan"},
            "precision": "fp32" if dtype == "fp32" else "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": shape.batch,
                "sequence_length": shape.seq,
                "activation_checkpointing": mode,
                "checkpoint_every": every,
            },
            "parallelism": {"engine": "fsdp2", "data": 8},
            "hardware": {"device": "cpu"},
        }
    ).spec
    arch = from_config(config(shape)).architecture
    assert arch is not None
    saved = rule.saved(arch, setting_of(spec), fused_qkv=shape.fused_qkv)
    assert saved.modelled, saved.notes
    return saved.bytes


def cases() -> list[tuple[str, str, Shape, int]]:
    out = []
    for experts, top_k, moe_ffn in EXPERT_SHAPES:
        base = replace(QWEN3_MOE_TINY, experts=experts, top_k=top_k, moe_ffn=moe_ffn)
        for dtype in ("fp32", "bf16"):
            for mode in ("none", "full", "selective-op"):
                for fused in (True, False):
                    for batch in (1, 2):
                        for layers in (1, 2, 3):
                            shape = replace(base, layers=layers, batch=batch, fused_qkv=fused)
                            out.append((dtype, mode, shape, 1))
                for routing in ROUTINGS[1:]:
                    out.append((dtype, mode, replace(base, routing=routing), 1))
            for layers in (3, 4, 6):
                for every in (2, 3):
                    out.append((dtype, "full", replace(base, layers=layers), every))
    return out


def deepseek_cases() -> list[tuple[str, str, Shape, int]]:
    out = []
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "full", "selective-op"):
            for q_lora in (0, 16):
                for batch in (1, 2):
                    for layers in (2, 3):
                        mla = replace(DEEPSEEK_TINY.mla, q_lora=q_lora)
                        shape = replace(DEEPSEEK_TINY, layers=layers, batch=batch, mla=mla)
                        out.append((dtype, mode, shape, 1))
            for mla in (
                Mla(dense_layers=0),
                Mla(dense_layers=2),
                Mla(groups=0, limited=0),
                Mla(route_norm=False),
                Mla(q_lora=16, shared=2),
            ):
                out.append((dtype, mode, replace(DEEPSEEK_TINY, layers=4, mla=mla), 1))
            for routing in ROUTINGS[1:]:
                out.append((dtype, mode, replace(DEEPSEEK_TINY, routing=routing), 1))
        out.append((dtype, "full", replace(DEEPSEEK_TINY, layers=4, mla=Mla(dense_layers=0)), 2))
    return out


def matrix(which: list[tuple[str, str, Shape, int]]) -> list[dict[str, Any]]:
    rows = []
    for dtype, mode, shape, every in which:
        measured = held_bytes(dtype, mode, shape, every)
        memplan = predicted(dtype, mode, shape, every)
        deepseek = {}
        if shape.model == "deepseek_v3":
            m = shape.mla
            deepseek = {
                "q_lora": m.q_lora,
                "dense_layers": m.dense_layers,
                "shared": m.shared,
                "groups": m.groups,
                "route_norm": m.route_norm,
            }
        rows.append(
            {
                "model": shape.model,
                **deepseek,
                "experts": shape.experts,
                "top_k": shape.top_k,
                "moe_ffn": shape.moe_ffn,
                "routing": shape.routing,
                "dtype": dtype,
                "checkpointing": mode,
                "checkpoint_every": every,
                "layers": shape.layers,
                "batch": shape.batch,
                "fused_qkv": shape.fused_qkv,
                "measured": measured,
                "memplan": memplan,
                "exact": measured == memplan,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fake() -> list[dict[str, Any]]:
    rows = []
    for flavor, shape in (
        ("Qwen3-30B-A3B, 2 blocks, 2 x 4096", QWEN3_30B_A3B),
        ("DeepSeek-V3, 3 dense + 1 MoE blocks, 1 x 4096", DEEPSEEK_V3),
    ):
        rows += _fake(flavor, shape)
    return rows


def _fake(flavor: str, shape: Shape) -> list[dict[str, Any]]:
    rows = []
    for mode in ("none", "full", "selective-op"):
        measured = held_bytes_fake("bf16", mode, shape)
        memplan = predicted("bf16", mode, shape)
        rows.append(
            {
                "flavor": flavor,
                "checkpointing": mode,
                "measured": measured,
                "memplan": memplan,
                "exact": measured == memplan,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spec_of(preset: str, mode: str, implementation: str, batch: int, data: int) -> dict[str, Any]:
    return {
        "model": {"preset": preset, "implementation": implementation},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": batch,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
        },
        "parallelism": {"engine": "fsdp2", "data": data},
        "hardware": {"gpu": "H100-80GB", "alloc_conf": "expandable_segments:True"},
    }


ESTIMATES = (
    ("Qwen3-30B-A3B", "qwen3-30b-a3b", "torchtitan", ("none", "full", "selective-op"), 2, 64),
    ("Qwen3-30B-A3B", "qwen3-30b-a3b", "transformers", ("none", "full"), 2, 64),
    ("DeepSeek-V3", "deepseek-v3", "torchtitan", ("full",), 1, 256),
    ("DeepSeek-V3", "deepseek-v3", "transformers", ("full",), 1, 256),
)


def estimates() -> list[dict[str, Any]]:
    rows = []
    for name, preset, implementation, modes, batch, data in ESTIMATES:
        for mode in modes:
            loaded = validate(spec_of(preset, mode, implementation, batch, data))
            report = estimate(loaded.spec, load_inventory(loaded))
            saved = report.activations
            if not saved.modelled:
                rows.append(
                    {
                        "model": name,
                        "implementation": implementation,
                        "checkpointing": mode,
                        "data": data,
                        "activations_modelled": False,
                        "why": saved.notes[0],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            layers = saved.block("layers")
            assert layers is not None
            reserved = report.peak_reserved
            assert reserved is not None
            row = {
                "model": name,
                "implementation": implementation,
                "checkpointing": mode,
                "data": data,
                "activations_modelled": True,
                "activation_source": saved.source,
                "activations": saved.bytes,
                "activations_gib": round(saved.bytes / GIB, 2),
                "activations_per_layer": layers.bytes_each,
                "peak_allocated": report.peak_bytes,
                "peak_allocated_gib": round(report.peak_bytes / GIB, 2),
                "peak_reserved": reserved,
                "peak_reserved_gib": round(reserved / GIB, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    warnings.filterwarnings("ignore", message="In CPU autocast")  # the router's fp32 autocast
    start = time.time()
    rows = matrix(cases())
    deepseek = matrix(deepseek_cases())
    big = fake()
    est = estimates()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_moe.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": getattr(torchtitan, "__version__", "0.3.0"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows) + len(deepseek) + len(big),
            "exact": sum(r["exact"] for r in (*rows, *deepseek, *big)),
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "deepseek_matrix": deepseek,
        "fake": big,
        "estimates": est,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
