"""torchtitan's own Llama 3 and dense Qwen3 (`model.implementation: torchtitan`): memplan's rule
against the real models, the whole matrix, the Llama 3.1 8B figures of torchtitan's published
table, and `memplan estimate` of Qwen3-8B / 32B with torchtitan's model code beside
transformers'.

Part 1, `matrix`: torchtitan 0.3.0's Llama 3 built tiny on CPU (tests/torchtitan_probe.py:
dim 64, 4 heads, 2 k/v heads, ffn 192, vocab 256, sequence 16), forward + its cross-entropy
loss, what it holds for backward measured by the storages still alive, against
memplan.model.stacks.torchtitan, for fp32 and bf16 x none / full (FullAC) / selective-op
(SelectiveAC) x fused wqkv (0.3.0) or wq/wk/wv (9dec370) x batch 1 and 2 x 2 and 3 layers, and
every-Nth-layer full checkpointing at 3, 4 and 6 layers, N = 2 and 3.

Part 1b, `qwen3_matrix`: torchtitan 0.3.0's dense Qwen3Model built tiny the same way
(models/qwen3/__init__.py::_build_qwen3_layers: q_norm / k_norm, explicit head_dim, CosSinRoPE)
at two head layouts, heads x head_dim = 2 x dim with tied embeddings (the 0.6B / 4B / 32B
structure) and = dim untied (8B / 14B), over the same precision x recompute x fused x batch x
layers grid and every-Nth-layer full checkpointing; `qwen3_fake`: two blocks of Qwen3-0.6B,
8B and 32B at 2 x 8192 tokens, bf16, under FakeTensorMode.

Part 2, `llama31_8b`: `memplan estimate` of torchtitan Llama 3.1 8B, FSDP2 over 8 ranks, local
batch 2 x 8192, bf16-mixed AdamW, H100 (H100-94GB, the 96 GB card's catalogue entry),
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, for selective-op, full and none: the peak,
max reserved and the activations per layer, beside the published max reserved for per-op SAC
(82.4 GiB, shared/reference/published/torchtitan-llama3-h100.md, table 1).

Part 3, `qwen3_estimates`: `memplan estimate` of Qwen3-8B and Qwen3-32B (Hugging Face
config.json keys below), FSDP2 over 8 ranks (8B) and 32 ranks (32B), local batch 2 x 4096
(torchtitan 0.3.0 models/qwen3/config_registry.py::qwen3_32b's), bf16-mixed AdamW,
H100-80GB, expandable_segments, for none / full / selective-op with `model.implementation`
torchtitan and (none, full) transformers: peak allocated, max reserved and activations.

    PYTHONPATH=$PWD python benchmarks/torchtitan_activations.py   # ~2 min on 2 cores
    # writes benchmarks/results/torchtitan-activations.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
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
    DIM,
    FFN,
    HEADS,
    KV_HEADS,
    SEQ,
    VOCAB,
    Shape,
    held_bytes,
    held_bytes_fake,
)

OUT = ROOT / "benchmarks" / "results" / "torchtitan-activations.json"
GIB = 2**30
PUBLISHED_SELECTIVE_OP_GIB = 82.4


def tiny(layers: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
    }


QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
"""https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json, transcribed (huggingface.co is
not reachable here): every key as a verbatim copy vendored in a public test file
(QWEN3_8B_CONFIG_JSON; stored public-source file id 7900191062); its sizes are torchtitan
0.3.0 models/qwen3/__init__.py::_8b's."""

QWEN3_32B = {
    **QWEN3_8B,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "max_window_layers": 64,
    "num_attention_heads": 64,
    "num_hidden_layers": 64,
}
"""https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json's sizes (transcribed): hidden
5120, ffn 25600, 64 layers, 64 heads x 128, 8 k/v heads, vocab 151936, untied, as torchtitan
0.3.0 models/qwen3/__init__.py::_32b builds it; the other keys are 8B's."""


def qwen3_tiny(shape: Shape) -> dict[str, Any]:
    return {
        **tiny(shape.layers),
        "model_type": "qwen3",
        "hidden_size": shape.dim,
        "num_attention_heads": shape.heads,
        "head_dim": shape.head_dim,
        "tie_word_embeddings": shape.tied,
    }


def predicted(dtype: str, mode: str, shape: Shape, every: int) -> int:
    cfg = qwen3_tiny(shape) if shape.model == "qwen3" else tiny(shape.layers)
    spec = validate(
        {
            "model": {"architecture": cfg, "implementation": "torchtitan"},
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
    arch = from_config(cfg).architecture
    assert arch is not None
    saved = rule.saved(arch, setting_of(spec), fused_qkv=shape.fused_qkv)
    assert saved.modelled, saved.notes
    return saved.bytes


def cases() -> list[tuple[str, str, Shape, int]]:
    out = []
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "full", "selective-op"):
            for fused in (True, False):
                for batch in (1, 2):
                    for layers in (2, 3):
                        out.append((dtype, mode, Shape(layers, batch, SEQ, fused), 1))
        for layers in (3, 4, 6):
            for every in (2, 3):
                out.append((dtype, "full", Shape(layers, 2, SEQ, True), every))
    return out


QWEN3_HEADS = ((32, True), (16, False))
"""(head_dim, tied) at dim 64, 4 heads: heads x head_dim = 2 x dim tied (Qwen3 0.6B, 4B: 16 x
128 on 1024, 32 x 128 on 2560; 32B untied, 64 x 128 on 5120) and = dim untied (8B, 14B)."""


def qwen3_cases() -> list[tuple[str, str, Shape, int]]:
    out = []
    for head_dim, tied in QWEN3_HEADS:
        for dtype, mode, shape, every in cases():
            out.append(
                (
                    dtype,
                    mode,
                    replace(shape, model="qwen3", head_dim=head_dim, tied=tied),
                    every,
                )
            )
    return out


def matrix(which: list[tuple[str, str, Shape, int]]) -> list[dict[str, Any]]:
    rows = []
    for dtype, mode, shape, every in which:
        measured = held_bytes(dtype, mode, shape, every)
        memplan = predicted(dtype, mode, shape, every)
        qwen = {"head_dim": shape.head_dim, "tied": shape.tied} if shape.model == "qwen3" else {}
        rows.append(
            {
                **qwen,
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


def spec_8b(mode: str) -> dict[str, Any]:
    return {
        "model": {"preset": "llama-3.1-8b", "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 8192,
            "activation_checkpointing": mode,
        },
        "parallelism": {"engine": "fsdp2", "data": 8},
        "hardware": {"gpu": "H100-94GB", "alloc_conf": "expandable_segments:True"},
    }


def llama31_8b() -> list[dict[str, Any]]:
    rows = []
    for mode in ("selective-op", "full", "none"):
        loaded = validate(spec_8b(mode))
        inv = load_inventory(loaded)
        report = estimate(loaded.spec, inv)
        saved = report.activations
        layers = saved.block("layers")
        assert layers is not None and inv.architecture is not None
        unfused = rule.saved(inv.architecture, setting_of(loaded.spec), fused_qkv=False)
        unfused_layers = unfused.block("layers")
        assert unfused_layers is not None
        reserved = report.peak_reserved
        assert reserved is not None
        row: dict[str, Any] = {
            "checkpointing": mode,
            "activations": saved.bytes,
            "activations_per_layer": layers.bytes_each,
            "activations_per_layer_9dec370_wq_wk_wv": unfused_layers.bytes_each,
            "peak_allocated": report.peak_bytes,
            "peak_reserved": reserved,
            "peak_reserved_gib": round(reserved / GIB, 2),
        }
        if mode == "selective-op":
            pub = PUBLISHED_SELECTIVE_OP_GIB
            row["published_max_reserved_gib"] = pub
            row["error_vs_published"] = round((reserved / GIB - pub) / pub, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


QWEN3_FAKE = {
    "0.6B": Shape(2, 2, 8192, True, 1024, 16, 8, 3072, 151936, "qwen3", 128, True),
    "8B": Shape(2, 2, 8192, True, 4096, 32, 8, 12288, 151936, "qwen3", 128, False),
    "32B": Shape(2, 2, 8192, True, 5120, 64, 8, 25600, 151936, "qwen3", 128, False),
}
"""Two blocks of torchtitan 0.3.0 models/qwen3/__init__.py::_0_6b, _8b and _32b at 2 x 8192."""


def qwen3_fake() -> list[dict[str, Any]]:
    rows = []
    for flavor, shape in QWEN3_FAKE.items():
        cfg = {**qwen3_tiny(shape), "intermediate_size": shape.ffn, "vocab_size": shape.vocab}
        cfg["num_key_value_heads"] = shape.kv_heads
        for mode in ("none", "full", "selective-op"):
            spec = validate(
                {
                    "model": {"architecture": cfg, "implementation": "torchtitan"},
                    "precision": "bf16-mixed",
                    "optimizer": {"name": "adamw"},
                    "training": {
                        "micro_batch_size": shape.batch,
                        "sequence_length": shape.seq,
                        "activation_checkpointing": mode,
                    },
                    "parallelism": {"engine": "fsdp2", "data": 8},
                    "hardware": {"device": "cpu"},
                }
            ).spec
            arch = from_config(cfg).architecture
            assert arch is not None
            memplan = rule.saved(arch, setting_of(spec)).bytes
            measured = held_bytes_fake("bf16", mode, shape)
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


def spec_qwen3(config: dict[str, Any], mode: str, implementation: str, data: int) -> dict[str, Any]:
    return {
        "model": {"architecture": config, "implementation": implementation},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
        },
        "parallelism": {"engine": "fsdp2", "data": data},
        "hardware": {"gpu": "H100-80GB", "alloc_conf": "expandable_segments:True"},
    }


def qwen3_estimates() -> list[dict[str, Any]]:
    rows = []
    for name, config, data in (("Qwen3-8B", QWEN3_8B, 8), ("Qwen3-32B", QWEN3_32B, 32)):
        for implementation, modes in (
            ("torchtitan", ("none", "full", "selective-op")),
            ("transformers", ("none", "full")),
        ):
            for mode in modes:
                loaded = validate(spec_qwen3(config, mode, implementation, data))
                report = estimate(loaded.spec, load_inventory(loaded))
                saved = report.activations
                assert saved.modelled, saved.notes
                layers = saved.block("layers")
                assert layers is not None
                reserved = report.peak_reserved
                assert reserved is not None
                row = {
                    "model": name,
                    "implementation": implementation,
                    "checkpointing": mode,
                    "data": data,
                    "activations": saved.bytes,
                    "activations_per_layer": layers.bytes_each,
                    "peak_allocated": report.peak_bytes,
                    "peak_reserved": reserved,
                    "peak_reserved_gib": round(reserved / GIB, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    start = time.time()
    rows = matrix(cases())
    qwen3_rows = matrix(qwen3_cases())
    fake = qwen3_fake()
    big = llama31_8b()
    qwen3_big = qwen3_estimates()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_activations.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": getattr(torchtitan, "__version__", "0.3.0"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows),
            "exact": sum(r["exact"] for r in rows),
            "qwen3_cases": len(qwen3_rows) + len(fake),
            "qwen3_exact": sum(r["exact"] for r in (*qwen3_rows, *fake)),
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "qwen3_matrix": qwen3_rows,
        "qwen3_fake": fake,
        "llama31_8b": big,
        "qwen3_estimates": qwen3_big,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
