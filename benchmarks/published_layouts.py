"""memplan plan's choices against the layouts Meta published for Llama-3.1-405B.

Source: "The Llama 3 Herd of Models" (arXiv 2407.21783), Table 4, "Scaling configurations and
MFU for each stage of Llama 3 405B pre-training" (H100-80GB, 16M tokens per batch):

    GPUs    TP  CP  PP  DP   seq      batch/DP
    8,192   8   1   16  64   8,192    32
    16,384  8   1   16  128  8,192    16
    16,384  8   16  16  8    131,072  16

Section 3.3.2 adds: interleaved 1F1B pipeline schedule, the first and the last stage one layer
short, micro-batch size 1 (sequences per micro-batch), bf16 with fp32 gradient accumulation and
optimizer state sharded over data-parallel ranks.

For each row this runs `memplan plan` (Megatron engine: the closest open implementation of that
recipe) and prints memplan's top layouts, where Meta's degrees rank among the fitting ones, and
memplan's peak for Meta's exact layout with each recompute option. Run:

    python benchmarks/published_layouts.py            # about 20 s on 2 cores

Pure memplan: no torch needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from memplan.estimate import estimate
from memplan.load import load_inventory, validate
from memplan.models import Inventory
from memplan.plan import PlanResult, pipeline_split, plan
from memplan.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@dataclass(frozen=True)
class Row:
    gpus: int
    tp: int
    cp: int
    pp: int
    dp: int
    seq: int
    batch_per_dp: int

    @property
    def global_batch(self) -> int:
        return self.dp * self.batch_per_dp


META = (
    Row(8192, 8, 1, 16, 64, 8192, 32),
    Row(16384, 8, 1, 16, 128, 8192, 16),
    Row(16384, 8, 16, 16, 8, 131072, 16),
)


def base(row: Row) -> dict[str, object]:
    return {
        "model": {"preset": "llama-3.1-405b"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {"sequence_length": row.seq, "attention": "sdpa"},
        "hardware": {"gpu": "H100-80GB", "gpus_per_node": 8},
    }


def plan_spec(row: Row) -> Spec:
    doc = base(row) | {
        "plan": {
            "gpus": row.gpus,
            "global_batch_size": row.global_batch,
            "engines": ["megatron"],
            "max_context": 16,
        }
    }
    return validate(doc).spec


def meta_spec(row: Row, recompute: str, virtual: int) -> Spec:
    doc = base(row)
    doc["training"] = {
        "sequence_length": row.seq,
        "attention": "sdpa",
        "micro_batch_size": 1,
        "gradient_accumulation_steps": row.batch_per_dp,
        "activation_checkpointing": recompute,
    }
    doc["parallelism"] = {
        "engine": "megatron",
        "zero_stage": 1,
        "data": row.dp,
        "tensor": row.tp,
        "sequence_parallel": True,
        "context": row.cp,
        "pipeline": row.pp,
        "schedule": "interleaved" if virtual > 1 else "1f1b",
        "virtual_stages": virtual,
        "layers_per_stage": list(pipeline_split(126, row.pp * virtual) or ()),
    }
    return validate(doc).spec


def describe(result: PlanResult, row: Row) -> None:
    def degrees(c: object) -> str:
        return (
            f"dp{c.data} tp{c.tensor} pp{c.pipeline}x{c.virtual_stages} cp{c.context} "  # type: ignore[attr-defined]
            f"ZeRO-{c.zero_stage} mbs{c.micro_batch_size} {c.recompute:<9} "  # type: ignore[attr-defined]
            f"peak {c.peak_bytes / GIB:5.1f} GiB step {c.time.total_s:6.2f} s"  # type: ignore[attr-defined]
        )

    for i, c in enumerate(result.layouts[:3], 1):
        print(f"  memplan #{i}: {degrees(c)}")
    ranks = [
        (i, c)
        for i, c in enumerate(result.layouts, 1)
        if (c.tensor, c.context, c.pipeline, c.data) == (row.tp, row.cp, row.pp, row.dp)
    ]
    if ranks:
        i, c = ranks[0]
        print(f"  Meta's degrees first appear at #{i} of {len(result.layouts)}: {degrees(c)}")
    else:
        print(f"  Meta's degrees are not among the {len(result.layouts)} fitting layouts")


def main() -> None:
    inventory: Inventory | None = None
    start = time.perf_counter()
    for row in META:
        spec = plan_spec(row)
        if inventory is None:
            inventory = load_inventory(validate(base(row)))
        print(
            f"\n{row.gpus:,} GPUs, sequence {row.seq:,}, global batch {row.global_batch:,}: "
            f"Meta used TP{row.tp} CP{row.cp} PP{row.pp} DP{row.dp}"
        )
        result = plan(spec, inventory, suggest=False)
        describe(result, row)
        layer = estimate(meta_spec(row, "none", 1), inventory).activations.block("layers")
        assert layer is not None
        # theoretical_memory_usage.py::compute_activation_memory (SP + selective recompute):
        # s b h (18 + 4 ffn / h) / t bytes per layer, Korthikanti's Table 2 with a 4h GELU MLP.
        s, h, ffn = row.seq // row.cp, 16384, 53248
        megatron = s * h * (18 + 4 * ffn / h) / row.tp
        print(
            f"  one layer, one micro-batch: memplan {layer.bytes_each / GIB:.3f} GiB, Megatron's "
            f"formula {megatron / GIB:.3f} GiB (x{layer.bytes_each / megatron:.2f})"
        )
        for virtual in (1, 2):
            peaks = []
            for recompute in ("none", "selective", "full"):
                report = estimate(meta_spec(row, recompute, virtual), inventory)
                peaks.append(
                    f"{recompute} {report.peak_bytes / GIB:6.1f} GiB (stage {report.stage})"
                )
            print(f"  memplan on Meta's layout, {virtual} chunk(s)/rank: " + ", ".join(peaks))
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
