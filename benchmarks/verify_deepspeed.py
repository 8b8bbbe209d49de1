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
writes benchmarks/results/verify-deepspeed-step.json.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/verify_deepspeed.py --step

`--step-hierarchy` (about 10 min) measures the same step under hpZ and MiCS on 4 ranks (below),
fp32 and bf16-mixed, and each once more with every parameter persistent
(`stage3_param_persistence_threshold` 10**6: the step's end, where `_post_step` re-gathers the
whole model, hpZ's persistent secondary partitions still alive, is then its peak: memplan.
verify.runner.deepspeed_step); its rows join the --step file's (each with its own stamp),
whose 2-rank rows it leaves as they are.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/verify_deepspeed.py --step-hierarchy \
        --mics-deepspeed /tmp/ds0192

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
# --step-hierarchy's extra cases: every parameter persistent (numel <= 10**6 > the largest,
# the 1,041 x 64 embedding), so that the step's end, not its gradient copy, is its peak.
HPZ_ALL_PERSISTENT = {"zero_hpz_partition_size": 2, "stage3_param_persistence_threshold": 10**6}
MICS_ALL_PERSISTENT = {"mics_shard_size": 2, "stage3_param_persistence_threshold": 10**6}
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


def mics_case(precision: str, site: str, deepspeed: dict[str, Any] = MICS) -> dict[str, Any]:
    """One MiCS case in a child process whose deepspeed is the one installed under `site`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, str(ROOT)])}
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            json.dumps([precision, 3, HIERARCHY_RANKS, deepspeed]),
        ],
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


STEP_RESULTS = ROOT / "benchmarks" / "results" / "verify-deepspeed-step.json"


def _step_row(out: dict[str, Any]) -> dict[str, Any]:
    """One case's step transients per rank, from `case`'s output."""
    ranks = [r[STEP_TRANSIENT] for r in out["per_rank"]]
    residue = [None if r["predicted"] is None else r["measured"] - r["predicted"] for r in ranks]
    row = {
        "precision": out["precision"],
        "zero_stage": out["zero_stage"],
        "ranks": out["ranks"],
        "deepspeed": out["deepspeed"],
        "model_states_exact": out["model_states_exact"],
        "seconds": out["seconds"],
        "step_transient": ranks,
        "residue_bytes": residue,
    }
    if out["deepspeed_config"]:
        row["deepspeed_config"] = out["deepspeed_config"]
    keys = " ".join(f"{k} {v}" for k, v in out["deepspeed_config"].items())
    print(
        f"{out['precision']:10} ZeRO-{out['zero_stage']} x{out['ranks']} {keys} (deepspeed "
        f"{out['deepspeed']}): step transient {[(r['predicted'], r['measured']) for r in ranks]} "
        f"residue {residue} ({out['seconds']} s)",
        flush=True,
    )
    return row


def _write_step(doc: dict[str, Any]) -> None:
    STEP_RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def step_grid() -> None:
    """What DeepSpeed's boundary engine.step() allocates above the level it started at, against
    memplan's step transients (memplan.states.engines.deepspeed.step.ALLOCATED_IN_STEP); the
    file's hierarchical rows (--step-hierarchy) are kept."""
    import deepspeed

    old = json.loads(STEP_RESULTS.read_text()) if STEP_RESULTS.exists() else {"cases": []}
    kept = [c for c in old["cases"] if c.get("deepspeed_config")]
    cases = []
    for precision in PRECISIONS:
        for stage in STAGES:
            cases.append(_step_row(case(precision, stage, STEP_RANKS)))
            doc = {"stamp": stamp(deepspeed=deepspeed.__version__), "cases": cases + kept}
            _write_step(doc)
    print(f"wrote {STEP_RESULTS.relative_to(ROOT)}")


def step_hierarchy(mics_site: str) -> None:
    """The step under hpZ (deepspeed installed here) and MiCS (0.19.2 under `mics_site`) on
    HIERARCHY_RANKS ranks, replacing the file's hierarchical rows and keeping the rest."""
    import deepspeed

    doc = json.loads(STEP_RESULTS.read_text())
    flat = [c for c in doc["cases"] if not c.get("deepspeed_config")]
    cases: list[dict[str, Any]] = []
    for precision in PRECISIONS:
        for config in (HPZ, HPZ_ALL_PERSISTENT):
            cases.append(_step_row(case(precision, 3, HIERARCHY_RANKS, config)))
            cases[-1]["stamp"] = stamp(deepspeed=deepspeed.__version__)
    for precision in PRECISIONS:
        for config in (MICS, MICS_ALL_PERSISTENT):
            cases.append(_step_row(mics_case(precision, mics_site, config)))
            cases[-1]["stamp"] = stamp(deepspeed=MICS_DEEPSPEED)
    _write_step({**doc, "cases": flat + cases})
    print(f"wrote {STEP_RESULTS.relative_to(ROOT)}")


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
    parser.add_argument(
        "--step-hierarchy",
        action="store_true",
        help="only the optimizer step under hpZ and MiCS on 4 ranks (needs --mics-deepspeed)",
    )
    args = parser.parse_args()
    if args.step:
        step_grid()
        return
    if args.step_hierarchy:
        if not args.mics_deepspeed:
            parser.error("--step-hierarchy needs --mics-deepspeed DIR (see the docstring)")
        step_hierarchy(args.mics_deepspeed)
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
