"""torch FSDP1 (`FullyShardedDataParallel`) measured on gloo CPU ranks: the oracle memplan's
fsdp1 engine is held to (tests/test_fsdp1.py reads the file this writes).

    PYTHONPATH=. python benchmarks/fsdp1.py      # about 12 min on 2 cores
    # writes benchmarks/results/fsdp1.json

Each case is tests/fsdp1_probe.py's tiny Llama (hidden 60, 2 layers, vocabulary 251: neither
the per-tensor alignment nor the world sizes divide its flat parameters), wrapped as
accelerate 1.16 wraps it for transformers' Trainer with `fsdp_version: 1` (one FlatParameter
per LlamaDecoderLayer, the root's holding the embedding, the final norm and the head;
use_orig_params=True, limit_all_gathers=True, no backward prefetch), AdamW, two steps; per
rank the FlatParameters' sizes, the model states read from the objects after the second
optimizer step, and the peak of forward, backward and optimizer step of that step (torch's
MemTracker storage accounting, tests/fsdp1_probe.py::storage_tracker). Grid: 2 and 4 ranks x
FULL_SHARD, SHARD_GRAD_OP and NO_SHARD x bf16 MixedPrecision (param, reduce and buffer dtype
bf16 over an fp32 model, accelerate's `mixed_precision: bf16`) and fp32.

On CPU FSDP1 needs `device_id=torch.device("cpu")` (device_id=None raises "RuntimeError:
FSDP needs a non-CPU accelerator device, but no accelerator device is detected.",
torch 2.13 fsdp/_init_utils.py::_init_device_handle) and sync_module_states=False (True
raises "ValueError: The module has CPU parameters or buffers when `sync_module_states=True`,
which requires them to be on GPU.", _init_utils.py::_check_module_states_for_sync_module_
states); every rank builds the model from the same seed, so the broadcast changes nothing.
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

OUT = ROOT / "benchmarks" / "results" / "fsdp1.json"
GRID = [
    (world, strategy, precision)
    for world in (2, 4)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
    for precision in ("bf16", "fp32")
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    doc: dict[str, Any] = stamp()
    doc["model"] = CONFIG
    doc["cases"] = []
    for world, strategy, precision in GRID:
        t0 = time.time()
        case = measure(world, strategy, precision)
        case["seconds"] = round(time.time() - t0, 1)
        doc["cases"].append(case)
        print(f"{world} {strategy} {precision}: {case['seconds']} s", file=sys.stderr)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")  # each case as it is done


if __name__ == "__main__":
    main(sys.argv[1:])
