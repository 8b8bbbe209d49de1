"""torch FSDP1 with CPUOffload(offload_params=True), and NO_SHARD with gradient accumulation,
measured on gloo CPU ranks: the oracle of memplan's fsdp1 offload rule
(memplan.states.engines.fsdp1.offload) and of NO_SHARD under no_sync()
(memplan.states.engines.fsdp1.accumulation); tests/test_fsdp1_offload.py reads the file this
writes.

    PYTHONPATH=. python benchmarks/fsdp1_offload.py   # about 9 min on 2 cores
    # writes benchmarks/results/fsdp1-offload.json

Each case is tests/fsdp1_probe.py's tiny Llama wrapped as benchmarks/fsdp1.py wraps it. With
`offload` the probe pins nothing (a CPU-only torch cannot pin: tests/fsdp1_probe.py::
pin_memory_as_copy) and the compute device is the CPU too, so what a GPU run keeps on the
host (`host_bytes`: each rank's `_local_shard`, `_cpu_grad` and optimizer states) is read
from FSDP1's objects and the rest of each phase's peak is what the GPU would hold. Grid:
2 ranks x FULL_SHARD, SHARD_GRAD_OP, NO_SHARD x bf16 MixedPrecision and fp32 with offload;
FULL_SHARD bf16 with offload and 2 micro-batches; NO_SHARD x bf16 and fp32 with 2 and 3
micro-batches (no offload); with offload, one rank x bf16 and fp32, and FULL_SHARD x bf16 and
fp32 x backward prefetch pre and post on 2 ranks.
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

OUT = ROOT / "benchmarks" / "results" / "fsdp1-offload.json"
# (strategy, precision, accumulation, offload)
GRID = [
    *[
        (strategy, precision, 1, True)
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
        for precision in ("bf16", "fp32")
    ],
    ("FULL_SHARD", "bf16", 2, True),
    *[("NO_SHARD", precision, n, False) for precision in ("bf16", "fp32") for n in (2, 3)],
]
# (world, strategy, precision, backward prefetch): the offload cases memplan refuses or
# lifts beside the grid above (issue 19): one rank (FSDP1 runs NO_SHARD there:
# torch/distributed/fsdp/_init_utils.py::_init_core_state, `world_size == 1`),
# and FULL_SHARD with BACKWARD_PRE and BACKWARD_POST.
MORE = [
    *[(1, "FULL_SHARD", precision, "none") for precision in ("bf16", "fp32")],
    *[(2, "FULL_SHARD", precision, p) for precision in ("bf16", "fp32") for p in ("pre", "post")],
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    doc: dict[str, Any] = stamp()
    doc["model"] = CONFIG
    doc["cases"] = []
    for strategy, precision, accumulation, offload in GRID:
        t0 = time.time()
        case = measure(2, strategy, precision, accumulation=accumulation, offload=offload)
        case["seconds"] = round(time.time() - t0, 1)
        doc["cases"].append(case)
        print(
            f"2 {strategy} {precision} x{accumulation} offload={offload}: {case['seconds']} s",
            file=sys.stderr,
        )
        a.out.write_text(json.dumps(doc, indent=1) + "\n")  # each case as it is done
    for world, strategy, precision, prefetch in MORE:
        t0 = time.time()
        case = measure(world, strategy, precision, prefetch=prefetch, offload=True)
        case["seconds"] = round(time.time() - t0, 1)
        doc["cases"].append(case)
        print(
            f"{world} {strategy} {precision} {prefetch} offload: {case['seconds']} s",
            file=sys.stderr,
        )
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
