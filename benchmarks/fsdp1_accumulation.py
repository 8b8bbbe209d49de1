"""torch FSDP1 with gradient accumulation as accelerate runs it, measured on gloo CPU ranks:
the oracle of memplan's fsdp1 accumulation rule (memplan.states.engines.fsdp1.accumulation;
tests/test_fsdp1_accumulation.py reads the file this writes).

    PYTHONPATH=. python benchmarks/fsdp1_accumulation.py   # about 5 min on 2 cores
    # writes benchmarks/results/fsdp1-accumulation.json

Each case is tests/fsdp1_probe.py's tiny Llama wrapped as benchmarks/fsdp1.py wraps it, two
optimizer steps of `accumulation` micro-batches each, every micro-batch but the last inside
FSDP1's no_sync() (accelerate 1.16 Accelerator.accumulate, sync_each_batch False). Per rank:
the model states after the second step, the peak of each micro-batch's forward and backward
and of the optimizer step, and what FSDP1 holds after each backward but the last (each
FlatParameter's `.grad`, its allocated unsharded parameter). Grid: 2 ranks x FULL_SHARD and
SHARD_GRAD_OP x bf16 MixedPrecision and fp32 x accumulation 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from tests.fsdp1_probe import CONFIG, measure  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "fsdp1-accumulation.json"
GRID = [
    (2, strategy, precision, accumulation)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP")
    for precision in ("bf16", "fp32")
    for accumulation in (2, 3)
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    doc: dict[str, Any] = stamp()
    doc["model"] = CONFIG
    doc["cases"] = []
    for world, strategy, precision, accumulation in GRID:
        t0 = time.time()
        case = measure(world, strategy, precision, accumulation=accumulation)
        case["seconds"] = round(time.time() - t0, 1)
        doc["cases"].append(case)
        print(
            f"{world} {strategy} {precision} x{accumulation}: {case['seconds']} s", file=sys.stderr
        )
        a.out.write_text(json.dumps(doc, indent=1) + "\n")  # each case as it is done


if __name__ == "__main__":
    main(sys.argv[1:])
