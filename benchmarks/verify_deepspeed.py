"""memplan's DeepSpeed rules against DeepSpeed's real engine, ZeRO-0..3, on CPU gloo ranks.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/verify_deepspeed.py
        # about 3 min on 2 cores; writes benchmarks/results/verify-deepspeed.json

Needs deepspeed 0.19.8 installed without its CUDA ops (DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1
pip install --no-deps --no-build-isolation deepspeed==0.19.8; pip install --no-deps hjson
msgpack ninja py-cpuinfo). Each case is the verify tests' tiny Llama (hidden 64, 2 layers,
vocabulary 1,041 that no world size divides, batch 2 x 16; tests/test_verify_support.py) with
AdamW, run through `memplan verify` (memplan.verify.runner.verify): deepspeed.initialize with
the config the spec implies (memplan.verify.deepspeed_engine.config), two optimizer steps of
two micro-batches, each rank's model states read from DeepSpeed's flat buffers, fp32
partitions and optimizer state, and compared with memplan's prediction for that rank. The
file keeps, per case and rank, predicted and measured bytes of every model-state row.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

PRECISIONS = ("fp32", "bf16-mixed")
STAGES = (0, 1, 2, 3)
RANKS = (2, 3)
MODEL_STATES = ("parameters", "gradients", "optimizer_states", "buffers")


def case(precision: str, stage: int, ranks: int) -> dict[str, Any]:
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify
    from tests.test_verify_support import loaded

    spec = loaded(
        precision=precision,
        parallelism={"engine": "deepspeed", "zero_stage": stage, "data": ranks},
    )
    start = time.perf_counter()
    result = verify(spec, Options(), lambda _rank, _what: None)
    doc = to_json(result)
    rows: list[dict[str, Any]] = []
    for rank in doc["ranks"]:
        rows.append(
            {
                name: {"predicted": row["predicted"], "measured": row["measured"]}
                for name, row in rank.items()
                if name != "peak"
            }
        )
    exact = all(
        r[name]["predicted"] == r[name]["measured"]
        for r in rows
        for name in r
        if name != "activations"
    )
    return {
        "precision": precision,
        "zero_stage": stage,
        "ranks": ranks,
        "model_states_exact": exact,
        "ok": doc["ok"],
        "seconds": round(time.perf_counter() - start, 1),
        "per_rank": rows,
    }


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    cases = []
    for precision in PRECISIONS:
        for stage in STAGES:
            for ranks in RANKS:
                out = case(precision, stage, ranks)
                print(
                    f"{precision:10} ZeRO-{stage} x{ranks}: model states "
                    f"{'exact' if out['model_states_exact'] else 'DIFFER'} ({out['seconds']} s)",
                    flush=True,
                )
                cases.append(out)
    doc = {
        "stamp": stamp(deepspeed=deepspeed.__version__),
        "cases": cases,
        "all_exact": all(c["model_states_exact"] for c in cases),
    }
    path = ROOT / "benchmarks" / "results" / "verify-deepspeed.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
