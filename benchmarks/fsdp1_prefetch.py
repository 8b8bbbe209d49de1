"""torch FSDP1 with backward prefetch (BACKWARD_PRE, torch's and Lightning's default, and
BACKWARD_POST), measured on gloo CPU ranks: the oracle of memplan's
`parallelism.fsdp1_backward_prefetch` (memplan.states.engines.fsdp1.prefetch;
tests/test_fsdp1_prefetch.py reads the file this writes).

    PYTHONPATH=. python benchmarks/fsdp1_prefetch.py   # about 4 min on 2 cores
    # writes benchmarks/results/fsdp1-prefetch.json

Each case is tests/fsdp1_probe.py's tiny Llama wrapped as benchmarks/fsdp1.py wraps it but
with `backward_prefetch` set, AdamW, two steps; per rank the model states after the second
step and the peak of its forward, backward and optimizer step. Grid: 2 ranks x FULL_SHARD x
bf16 MixedPrecision and fp32 x pre and post; SHARD_GRAD_OP bf16 pre (nothing to prefetch);
FULL_SHARD bf16 pre with 3 decoder layers.
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

OUT = ROOT / "benchmarks" / "results" / "fsdp1-prefetch.json"
GRID = [
    ("FULL_SHARD", "bf16", "pre", 2),
    ("FULL_SHARD", "fp32", "pre", 2),
    ("FULL_SHARD", "bf16", "post", 2),
    ("FULL_SHARD", "fp32", "post", 2),
    ("SHARD_GRAD_OP", "bf16", "pre", 2),
    ("FULL_SHARD", "bf16", "pre", 3),
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    doc: dict[str, Any] = stamp()
    doc["model"] = CONFIG
    doc["cases"] = []
    for strategy, precision, prefetch, layers in GRID:
        t0 = time.time()
        case = measure(2, strategy, precision, layers=layers, prefetch=prefetch)
        case["seconds"] = round(time.time() - t0, 1)
        doc["cases"].append(case)
        print(f"{strategy} {precision} {prefetch} {layers}: {case['seconds']} s", file=sys.stderr)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")  # each case as it is done


if __name__ == "__main__":
    main(sys.argv[1:])
