"""Throughput of `memplan plan`'s search, measured in one run.

Target (issue 8): the full search for Llama-3.1-405B on 1,024 GPUs under 2 s on 2 cores.
Run: python benchmarks/plan_speed.py            # prints; writes benchmarks/results/plan-speed.json
(--no-write to only print). scripts/gen_readme.py quotes the file in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from memplan.config.load import load_spec
from memplan.model.load import load_inventory
from memplan.plan.search import plan

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 2.0
RUNS = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Throughput of memplan plan's search.")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    loaded = load_spec(ROOT / "configs" / "plan-llama-3.1-405b.yaml")
    inventory = load_inventory(loaded)
    times, result = [], None
    for _ in range(RUNS):
        # A fresh inventory object each run, so no cache survives from the previous one.
        inventory = load_inventory(loaded)
        start = time.perf_counter()
        result = plan(loaded.spec, inventory)
        times.append(time.perf_counter() - start)
    assert result is not None
    best = result.layouts[0] if result.layouts else None
    median = statistics.median(times)
    print(
        f"Llama-3.1-405B on {result.gpus} GPUs: {result.searched:,} layouts evaluated, "
        f"{len(result.layouts):,} fit, pruned {sum(result.pruned.values()):,}"
    )
    print(
        f"median {median:.2f} s over {len(times)} runs = {result.searched / median:,.0f} "
        f"layouts/s; {'meets' if median < TARGET_S else 'MISSES'} the {TARGET_S:.0f} s target"
    )
    if best:
        print(
            f"top layout: dp{best.data} tp{best.tensor} pp{best.pipeline} cp{best.context} "
            f"{best.engine} ZeRO-{best.zero_stage} mbs {best.micro_batch_size} "
            f"recompute {best.recompute}: {best.tokens_per_s:,.0f} tokens/s (model)"
        )
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks.stamp import stamp

        doc = {
            "stamp": stamp(),
            "spec": "configs/plan-llama-3.1-405b.yaml",
            "gpus": result.gpus,
            "searched": result.searched,
            "fit": len(result.layouts),
            "pruned": sum(result.pruned.values()),
            "runs_s": [round(t, 3) for t in times],
            "median_s": round(median, 3),
            "target_s": TARGET_S,
        }
        out = ROOT / "benchmarks" / "results" / "plan-speed.json"
        out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
