"""memplan's DeepSpeed rules against DeepSpeed's real engine, ZeRO-0..3, ZeRO++ hpZ and MiCS,
on CPU gloo ranks.

    DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 pip install --no-deps --no-build-isolation \
        --target /tmp/ds0192 deepspeed==0.19.2     # MiCS's runs (below); once
    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/verify_deepspeed.py \
        --mics-deepspeed /tmp/ds0192
        # about 15 min on 2 cores; writes benchmarks/results/verify-deepspeed.json

Needs deepspeed 0.19.8 installed without its CUDA ops (DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1
pip install --no-deps --no-build-isolation deepspeed==0.19.8; pip install --no-deps hjson
msgpack ninja py-cpuinfo). Each case is the verify tests' tiny Llama (hidden 64, 2 layers,
vocabulary 1,041 that no world size divides, batch 2 x 16; tests/test_verify_support.py) with
AdamW, run through `memplan verify` (memplan.verify.runner.verify): deepspeed.initialize with
the config the spec implies (memplan.verify.deepspeed_engine.config), two optimizer steps of
two micro-batches, each rank's model states read from DeepSpeed's flat buffers, fp32
partitions and optimizer state, and compared with memplan's prediction for that rank. The
file keeps, per case and rank, predicted and measured bytes of every model-state row (and,
with hpZ, of its secondary partitions at the end of backward and of the optimizer step).

`--step` runs only the optimizer step's grid (about 3 min): ZeRO-0..3 in fp32 and bf16-mixed on
2 ranks, each rank's boundary engine.step() profiled allocation by allocation (memplan.verify.
deepspeed_engine.step_peak: the most bytes it allocates and holds at once, gloo's collective
staging left out) against memplan's step transients (memplan.verify.runner.deepspeed_step);
writes benchmarks/results/verify-deepspeed-step.json (ZeRO-3 measured, not predicted).

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/verify_deepspeed.py --step

hpZ (`zero_hpz_partition_size` 2) and MiCS (`mics_shard_size` 2) run on 4 ranks with
`stage3_param_persistence_threshold` 1,000, so that the tiny model's matrices are partitioned
and only its norms persist. MiCS was removed in DeepSpeed 0.19.7 (its config refuses the key),
and 0.19.3 to 0.19.6 hang at the first accumulation boundary on any shard group but the first
(stage3.py::partition_grads tests `contains_real_data` with the parameter's rank in the whole
data-parallel group, `_get_param_partition_rank`, so those ranks skip MiCS's replica
all-reduce that their partners in the first group enter); its cases run in a child process on
0.19.2, the last release before that change (`--mics-deepspeed DIR`: a `pip install --target`
of it, put first on the child's PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
# The hierarchical ZeRO-3 cases: 4 ranks in groups of 2, matrices partitioned (see above).
HIERARCHY_RANKS = 4
HPZ = {"zero_hpz_partition_size": 2, "stage3_param_persistence_threshold": 1000}
MICS = {"mics_shard_size": 2, "stage3_param_persistence_threshold": 1000}
MICS_DEEPSPEED = "0.19.2"
# --step: what the boundary engine.step() allocates, per rank (memplan.verify.result.
# STEP_TRANSIENT), on 2 ranks; written to verify-deepspeed-step.json.
STEP_RANKS = 2
STEP_TRANSIENT = "deepspeed step transient"  # memplan.verify.result.STEP_TRANSIENT


def case(
    precision: str, stage: int, ranks: int, deepspeed: dict[str, Any] | None = None
) -> dict[str, Any]:
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify
    from tests.test_verify_support import loaded

    spec = loaded(
        precision=precision,
        parallelism={
            "engine": "deepspeed",
            "zero_stage": stage,
            "data": ranks,
            "deepspeed": deepspeed or {},
        },
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
        if name not in ("activations", STEP_TRANSIENT)
    )
    import deepspeed as ds

    return {
        "precision": precision,
        "zero_stage": stage,
        "ranks": ranks,
        "deepspeed_config": deepspeed or {},
        "deepspeed": ds.__version__,
        "model_states_exact": exact,
        "ok": doc["ok"],
        "seconds": round(time.perf_counter() - start, 1),
        "per_rank": rows,
    }


def _report(out: dict[str, Any]) -> None:
    keys = " ".join(f"{k} {v}" for k, v in out["deepspeed_config"].items() if "threshold" not in k)
    print(
        f"{out['precision']:10} ZeRO-{out['zero_stage']} x{out['ranks']} {keys} "
        f"(deepspeed {out['deepspeed']}): model states "
        f"{'exact' if out['model_states_exact'] else 'DIFFER'} ({out['seconds']} s)",
        flush=True,
    )


def mics_case(precision: str, site: str) -> dict[str, Any]:
    """One MiCS case in a child process whose deepspeed is the one installed under `site`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, str(ROOT)])}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([precision, 3, HIERARCHY_RANKS, MICS])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"MiCS case failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(lines[-1])
    if out["deepspeed"] != MICS_DEEPSPEED:
        raise SystemExit(
            f"--mics-deepspeed holds deepspeed {out['deepspeed']}, not {MICS_DEEPSPEED}"
        )
    return out


def step_grid() -> None:
    """What DeepSpeed's boundary engine.step() allocates above the level it started at, against
    memplan's step transients (memplan.states.engines.deepspeed.step.ALLOCATED_IN_STEP)."""
    import deepspeed

    cases = []
    for precision in PRECISIONS:
        for stage in STAGES:
            out = case(precision, stage, STEP_RANKS)
            ranks = [r[STEP_TRANSIENT] for r in out["per_rank"]]
            # ZeRO-3: measured, not predicted (memplan.verify.runner.deepspeed_step)
            residue = [
                None if r["predicted"] is None else r["measured"] - r["predicted"] for r in ranks
            ]
            cases.append(
                {
                    "precision": precision,
                    "zero_stage": stage,
                    "ranks": STEP_RANKS,
                    "deepspeed": out["deepspeed"],
                    "model_states_exact": out["model_states_exact"],
                    "seconds": out["seconds"],
                    "step_transient": ranks,
                    "residue_bytes": residue,
                }
            )
            print(
                f"{precision:10} ZeRO-{stage} x{STEP_RANKS}: step transient "
                f"{[(r['predicted'], r['measured']) for r in ranks]} residue {residue} "
                f"({out['seconds']} s)",
                flush=True,
            )
            path = ROOT / "benchmarks" / "results" / "verify-deepspeed-step.json"
            doc = {"stamp": stamp(deepspeed=deepspeed.__version__), "cases": cases}
            path.write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote benchmarks/results/verify-deepspeed-step.json")


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mics-deepspeed", help="a pip --target install of deepspeed 0.19.2")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--step",
        action="store_true",
        help="only the optimizer step's transient, ZeRO-0..3 x fp32/bf16-mixed on 2 ranks",
    )
    args = parser.parse_args()
    if args.step:
        step_grid()
        return
    if args.child:  # one case, printed as JSON (mics_case's child)
        print(json.dumps(case(*json.loads(args.child))), flush=True)
        return
    if not args.mics_deepspeed:
        parser.error("--mics-deepspeed DIR is needed for the MiCS cases (see the docstring)")
    import deepspeed

    cases = []
    for precision in PRECISIONS:
        for stage in STAGES:
            for ranks in RANKS:
                cases.append(case(precision, stage, ranks))
                _report(cases[-1])
    for precision in PRECISIONS:
        cases.append(case(precision, 3, HIERARCHY_RANKS, HPZ))
        _report(cases[-1])
    for precision in PRECISIONS:
        cases.append(mics_case(precision, args.mics_deepspeed))
        _report(cases[-1])
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
