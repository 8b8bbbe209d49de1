"""DeepSeek-V3's plan with traced profiles under tensor parallelism (issues 19/21).

DeepSeek-V3 has no hand activation rule: its activations come from profiles traced from
transformers' model code. Before profiles of one TP rank's slice existed, every layout with
tensor or context parallelism was pruned as "activations not modelled" (1,071 of the search's
evaluations, 39 fitting: benchmarks/results/plan-speed.json). This runs benchmarks/
plan_speed.py's DeepSeek-V3 search (2,048 H100s) twice, in a fresh profile cache (MEMPLAN_CACHE
in a temporary folder, so every trace is timed):

- before: the whole model's profiles only (what `memplan plan` traced until now; CP and EP
  layouts at TP 1 are read from them);
- after: also the profile of every TP rank slice the search tries
  (memplan.plan.search.tensor_slices), as `memplan plan` now traces them,

and records the evaluations searched, pruned as "activations not modelled", and fitting, with
the trace times.

Run: python benchmarks/plan_tp_profiles.py   # writes benchmarks/results/plan-tp-profiles.json
(--no-write to only print).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.plan_speed import DEEPSEEK  # noqa: E402

PRUNED = "activations not modelled for this layout"


def run(slices: bool) -> dict[str, object]:
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.plan.search import plan, tensor_slices
    from memplan.plan.space import recompute_options
    from memplan.verify.trace import traced_profiles

    loaded = validate(DEEPSEEK)
    settings = loaded.spec.plan
    assert settings is not None
    inventory = load_inventory(loaded)
    wanted = tensor_slices(loaded.spec, inventory) if slices else ()
    start = time.perf_counter()
    inventory, lines = traced_profiles(
        loaded, inventory, checkpointing=recompute_options(settings), tensor_slices=wanted
    )
    traced_s = time.perf_counter() - start
    start = time.perf_counter()
    result = plan(loaded.spec, inventory)
    plan_s = time.perf_counter() - start
    failed = [line for line in lines if "not traced" in line]
    out = {
        "tensor_slices": [list(s) for s in wanted],
        "traces": len(lines) - len(failed),
        "trace_failures": failed,
        "trace_s": round(traced_s, 1),
        "plan_s": round(plan_s, 2),
        "searched": result.searched,
        "pruned_activations_not_modelled": result.pruned.get(PRUNED, 0),
        "fit": len(result.layouts),
        "best": (
            {
                k: getattr(result.layouts[0], k)
                for k in ("data", "tensor", "pipeline", "context", "expert", "engine")
            }
            if result.layouts
            else None
        ),
    }
    print(("after " if slices else "before ") + json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEMPLAN_CACHE"] = cache
        before = run(slices=False)
        after = run(slices=True)
    if not args.no_write:
        from benchmarks.stamp import stamp

        doc = {"stamp": stamp(), "spec": DEEPSEEK, "before": before, "after": after}
        out = ROOT / "benchmarks" / "results" / "plan-tp-profiles.json"
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
