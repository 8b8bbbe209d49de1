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

    python benchmarks/published_layouts.py            # about 20 s on 2 cores; writes
                                                      # benchmarks/results/published-layouts.json

scripts/gen_readme.py turns that file into the README's agreement sentence.

Pure memplan: no torch needed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.config.load import validate
from memplan.config.spec import Spec
from memplan.model.load import load_inventory
from memplan.model.sources import Inventory
from memplan.plan.result import PlanResult
from memplan.plan.search import plan
from memplan.plan.space import pipeline_split
from memplan.report.estimate import estimate

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


# Whose model code the activations are: transformers' LlamaForCausalLM (memplan's default), or
# Megatron-Core's GPTModel with Transformer Engine's fused modules (model.implementation
# megatron-core, megatron_spec te: its TP split proved on gloo ranks with the local spec,
# benchmarks/megatron_activations.py; context parallelism not modelled for it yet).
CODES: dict[str, dict[str, str]] = {
    "transformers": {},
    "megatron-core te": {"implementation": "megatron-core", "megatron_spec": "te"},
}
TOP = 5
"""Issue 21's ranking check: is Meta's layout among plan's first TOP rows?"""


def base(row: Row, code: str = "transformers") -> dict[str, object]:
    return {
        "model": {"preset": "llama-3.1-405b", **CODES[code]},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {"sequence_length": row.seq, "attention": "sdpa"},
        "hardware": {"gpu": "H100-80GB", "gpus_per_node": 8},
    }


def plan_spec(row: Row, code: str = "transformers") -> Spec:
    doc = base(row, code) | {
        "plan": {
            "gpus": row.gpus,
            "global_batch_size": row.global_batch,
            "engines": ["megatron"],
            "max_context": 16,
        }
    }
    return validate(doc).spec


def meta_spec(row: Row, recompute: str, virtual: int, code: str = "transformers") -> Spec:
    doc = base(row, code)
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


def layout(c: Any) -> dict[str, Any]:
    return {
        "data": c.data,
        "tensor": c.tensor,
        "pipeline": c.pipeline,
        "virtual_stages": c.virtual_stages,
        "context": c.context,
        "zero_stage": c.zero_stage,
        "micro_batch_size": c.micro_batch_size,
        "recompute": c.recompute,
        "compile": c.compile,
        "peak_bytes": c.peak_bytes,
        "step_s": c.time.total_s,
    }


def describe(result: PlanResult, row: Row) -> dict[str, Any]:
    """Print memplan's top layouts and where Meta's degrees rank; return the same as data."""

    def degrees(c: object) -> str:
        return (
            f"dp{c.data} tp{c.tensor} pp{c.pipeline}x{c.virtual_stages} cp{c.context} "  # type: ignore[attr-defined]
            f"ZeRO-{c.zero_stage} mbs{c.micro_batch_size} {c.recompute:<9} "  # type: ignore[attr-defined]
            f"{'compiled' if c.compile else 'eager   '} "  # type: ignore[attr-defined]
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
    return {
        "top": [layout(c) for c in result.layouts[:3]],
        "fitting": len(result.layouts),
        "meta_rank": ranks[0][0] if ranks else None,
        "in_top": bool(ranks) and ranks[0][0] <= TOP,
        "pruned": dict(result.pruned),
    }


def run(code: str) -> list[dict[str, Any]]:
    """Every row of META planned and measured with `code`'s activations."""
    inventory: Inventory | None = None
    rows: list[dict[str, Any]] = []
    for row in META:
        spec = plan_spec(row, code)
        if inventory is None:
            inventory = load_inventory(validate(base(row, code)))
        print(
            f"\n[{code}] {row.gpus:,} GPUs, sequence {row.seq:,}, global batch "
            f"{row.global_batch:,}: Meta used TP{row.tp} CP{row.cp} PP{row.pp} DP{row.dp}"
        )
        result = plan(spec, inventory, suggest=False)
        record: dict[str, Any] = {
            "gpus": row.gpus,
            "sequence": row.seq,
            "global_batch": row.global_batch,
            "meta": {"tensor": row.tp, "context": row.cp, "pipeline": row.pp, "data": row.dp},
            **describe(result, row),
        }
        record["meta_layout_peak_bytes"] = {}
        for virtual in (1, 2):
            peaks = []
            for recompute in ("none", "selective", "full"):
                report = estimate(meta_spec(row, recompute, virtual, code), inventory)
                if not report.activations.modelled:
                    peaks.append(f"{recompute} not modelled")
                    continue
                peaks.append(
                    f"{recompute} {report.peak_bytes / GIB:6.1f} GiB (stage {report.stage})"
                )
                record["meta_layout_peak_bytes"][f"{recompute}, {virtual} chunk(s)"] = (
                    report.peak_bytes
                )
            print(f"  memplan on Meta's layout, {virtual} chunk(s)/rank: " + ", ".join(peaks))
        saved = estimate(meta_spec(row, "none", 1, code), inventory).activations
        layer = saved.block("layers")
        if layer is not None and saved.modelled:
            # theoretical_memory_usage.py::compute_activation_memory (SP + selective
            # recompute): s b h (18 + 4 ffn / h) / t bytes per layer, Korthikanti's Table 2
            # with a 4h GELU MLP.
            s, h, ffn = row.seq // row.cp, 16384, 53248
            megatron = s * h * (18 + 4 * ffn / h) / row.tp
            print(
                f"  one layer, one micro-batch: memplan {layer.bytes_each / GIB:.3f} GiB, "
                f"Megatron's formula {megatron / GIB:.3f} GiB "
                f"(x{layer.bytes_each / megatron:.2f})"
            )
            record["layer_bytes"] = {"memplan": layer.bytes_each, "megatron_formula": megatron}
        else:
            record["not_modelled"] = next(iter(saved.notes), "")
            print(f"  Meta's layout: {record['not_modelled']}")
        rows.append(record)
    return rows


def main() -> None:
    start = time.perf_counter()
    runs = {code: run(code) for code in CODES}
    seconds = time.perf_counter() - start
    for code, rows in runs.items():
        hits = sum(r["in_top"] for r in rows)
        print(f"[{code}] Meta's layout in plan's top {TOP}: {hits} of {len(rows)} rows")
    print(f"\n{seconds:.1f} s")
    sys.path.insert(0, str(ROOT))
    from benchmarks.stamp import stamp

    doc = {
        "stamp": stamp(seconds=round(seconds, 1)),
        "source": "The Llama 3 Herd of Models (arXiv 2407.21783), Table 4 and section 3.3.2",
        "top": TOP,
        "rows": runs["transformers"],
        "rows_megatron_core_te": runs["megatron-core te"],
    }
    out = ROOT / "benchmarks" / "results" / "published-layouts.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
