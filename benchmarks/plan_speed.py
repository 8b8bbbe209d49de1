"""Throughput of `memplan plan`'s search, measured in one run.

Target (issue 8): the full search for Llama-3.1-405B on 1,024 GPUs under 2 s on 2 cores.
Run: python benchmarks/plan_speed.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from memplan.load import load_inventory, load_spec
from memplan.plan import plan

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def main() -> None:
    loaded = load_spec(ROOT / "configs" / "plan-llama-3.1-405b.yaml")
    inventory = load_inventory(loaded)
    times, result = [], None
    for _ in range(3):
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


if __name__ == "__main__":
    main()
