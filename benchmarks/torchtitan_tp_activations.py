"""torchtitan's Llama 3 and dense Qwen3 under tensor (+ sequence) parallelism: memplan's rule
(memplan.activations.torchtitan_parallel) against the real models on 2 gloo ranks, per rank.

torchtitan 0.3.0's Llama 3 built tiny on CPU (tests/torchtitan_probe.py: dim 64, 4 heads, 2 k/v
heads, ffn 192, sequence 16, batch 2, SDPA), sharded with torchtitan's TP plan
(tests/torchtitan_tp_probe.py: 9dec370's apply_tp on 0.3.0's modules, its vocabulary-parallel
embedding and _LossParallelCrossEntropy), checkpointing applied after TP, forward + loss; what
each rank holds for backward (the storages still alive, DTensors by their local tensor) against
`memplan estimate`'s activations for the same spec (engine fsdp2, tensor 2), for fp32 and bf16
x none / full / selective-op x sequence parallelism on and off x fused wqkv (0.3.0) or wq/wk/wv
(9dec370), a vocabulary TP does not divide (255: 128 and 127 rows), and loss parallel off.
Then torchtitan 0.3.0's own TP (its sharding configs and Module.parallelize, DTensor backend:
tests/torchtitan_tp_probe.py::own_tp) on its Qwen3 (q_norm / k_norm on head shards, heads x
head_dim = 2 x dim) and on its Llama 3, fp32 and bf16 x none / full / selective-op x SP on and
off x wqkv or wq/wk/wv.

    PYTHONPATH=$PWD python benchmarks/torchtitan_tp_activations.py   # ~3 min on 2 cores
    # writes benchmarks/results/torchtitan-tp-activations.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchtitan  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.activations import torchtitan_parallel  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.conftest import make_spec  # noqa: E402
from tests.torchtitan_probe import BATCH, DIM, FFN, HEADS, KV_HEADS, SEQ  # noqa: E402
from tests.torchtitan_tp_probe import WORLD, Case, run  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-tp-activations.json"


def config(case: Case) -> dict[str, Any]:
    if case.model == "qwen3":
        shape = case.shape
        return {
            **config(Case(case.dtype, case.mode, layers=case.layers, vocab=case.vocab)),
            "model_type": "qwen3",
            "hidden_size": shape.dim,
            "num_attention_heads": shape.heads,
            "head_dim": shape.head_dim,
            "tie_word_embeddings": shape.tied,
        }
    return {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": case.layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": case.vocab,
        "max_position_embeddings": 128,
    }


def predicted(case: Case, rank: int, tensor: int = WORLD) -> int:
    """memplan's activations of TP rank `rank` for `case` (engine fsdp2: torchtitan's model in
    the compute dtype; `fused_qkv` False is 9dec370's wq, wk, wv)."""
    spec = make_spec(
        model={"architecture": config(case), "implementation": "torchtitan"},
        precision="fp32" if case.dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "activation_checkpointing": case.mode,
        },
        parallelism={
            "engine": "fsdp2",
            "data": 2,
            "tensor": tensor,
            "sequence_parallel": case.sequence_parallel,
            "loss_parallel": case.loss_parallel,
        },
        hardware={"device": "cpu"},
    )
    arch = from_config(config(case)).architecture
    assert arch is not None
    lay = layout_of(spec).for_tensor_rank(rank)
    saved = torchtitan_parallel.micro_batch(arch, setting_of(spec), lay, fused_qkv=case.fused_qkv)
    assert saved.modelled, saved.notes
    return saved.bytes


CASES = (
    [
        Case(d, m, sp, fused)
        for d in ("fp32", "bf16")
        for m in ("none", "full", "selective-op")
        for sp in (True, False)
        for fused in (True, False)
    ]
    + [Case("bf16", m, True, True, vocab=255) for m in ("none", "selective-op")]
    + [
        Case("bf16", m, sp, True, loss_parallel=False)
        for m in ("none", "full")
        for sp in (True, False)
    ]
    + [
        Case(d, m, sp, fused, model=model, plan="0.3.0")
        for model in ("qwen3", "llama")
        for d in ("fp32", "bf16")
        for m in ("none", "full", "selective-op")
        for sp in (True, False)
        for fused in (True, False)
    ]
)


def main() -> None:
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        ranks = run(CASES, Path(out))
    rows = []
    for case in CASES:
        for r in range(WORLD):
            rows.append(
                {
                    "case": case.name,
                    "rank": r,
                    "measured_bytes": ranks[r][case.name],
                    "memplan_bytes": predicted(case, r),
                }
            )
    exact = sum(row["measured_bytes"] == row["memplan_bytes"] for row in rows)
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_tp_activations.py",
        "torch": torch.__version__,
        "torchtitan": getattr(torchtitan, "__version__", "0.3.0"),
        "platform": platform.platform(),
        "seconds": round(time.time() - start, 1),
        "exact": f"{exact} of {len(rows)}",
        "rows": rows,
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{exact} of {len(rows)} rank-cases to the byte; wrote {OUT}")
    for row in rows:
        if row["measured_bytes"] != row["memplan_bytes"]:
            print("  differs:", row)


if __name__ == "__main__":
    main()
