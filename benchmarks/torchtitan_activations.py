"""torchtitan's own Llama 3 (`model.implementation: torchtitan`): memplan's rule against the real
model, the whole matrix, and the Llama 3.1 8B figures of torchtitan's published table.

Part 1, `matrix`: torchtitan 0.3.0's Llama 3 built tiny on CPU (tests/torchtitan_probe.py:
dim 64, 4 heads, 2 k/v heads, ffn 192, vocab 256, sequence 16), forward + its cross-entropy
loss, what it holds for backward measured by the storages still alive, against
memplan.model.stacks.torchtitan, for fp32 and bf16 x none / full (FullAC) / selective-op
(SelectiveAC) x fused wqkv (0.3.0) or wq/wk/wv (9dec370) x batch 1 and 2 x 2 and 3 layers, and
every-Nth-layer full checkpointing at 3, 4 and 6 layers, N = 2 and 3.

Part 2, `llama31_8b`: `memplan estimate` of torchtitan Llama 3.1 8B, FSDP2 over 8 ranks, local
batch 2 x 8192, bf16-mixed AdamW, H100 (H100-94GB, the 96 GB card's catalogue entry),
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, for selective-op, full and none: the peak,
max reserved and the activations per layer, beside the published max reserved for per-op SAC
(82.4 GiB, shared/reference/published/torchtitan-llama3-h100.md, table 1).

    PYTHONPATH=$PWD python benchmarks/torchtitan_activations.py   # ~1 min on 2 cores
    # writes benchmarks/results/torchtitan-activations.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
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
from memplan.report.estimate import estimate, setting_of  # noqa: E402
from tests.torchtitan_probe import (  # noqa: E402
    DIM,
    FFN,
    HEADS,
    KV_HEADS,
    SEQ,
    VOCAB,
    Shape,
    held_bytes,
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


def predicted(dtype: str, mode: str, shape: Shape, every: int) -> int:
    spec = validate(
        {
            "model": {"architecture": tiny(shape.layers), "implementation": "torchtitan"},
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
    arch = from_config(tiny(shape.layers)).architecture
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


def matrix() -> list[dict[str, Any]]:
    rows = []
    for dtype, mode, shape, every in cases():
        measured = held_bytes(dtype, mode, shape, every)
        memplan = predicted(dtype, mode, shape, every)
        rows.append(
            {
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


def main() -> None:
    start = time.time()
    rows = matrix()
    big = llama31_8b()
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
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "llama31_8b": big,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
