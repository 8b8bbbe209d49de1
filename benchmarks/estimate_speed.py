"""Median wall time of `memplan estimate` beside `python -c pass`, measured in one run.

Target (issue 3): under 300 ms on a 2-core machine. Run: python benchmarks/estimate_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 300


def median_ms(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--spec", default="configs/llama-3-8b.yaml")
    args = parser.parse_args()
    baseline = median_ms([sys.executable, "-c", "pass"], args.runs)
    rows = [("python -c pass", baseline)]
    for flags in ([], ["--json"]):
        argv = [sys.executable, "-m", "memplan", "estimate", args.spec, *flags]
        rows.append((" ".join(["memplan estimate", args.spec, *flags]), median_ms(argv, args.runs)))
    print(f"median of {args.runs} runs (wall clock, one process each)")
    for name, ms in rows:
        print(f"  {ms:8.1f} ms  {ms / baseline:5.1f}x python  {name}")
    worst = max(ms for _, ms in rows[1:])
    verdict = "meets" if worst < TARGET_MS else "MISSES"
    print(f"slowest estimate {worst:.1f} ms: {verdict} the {TARGET_MS} ms target")


if __name__ == "__main__":
    main()
