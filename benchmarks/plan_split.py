"""Where `memplan plan`'s time goes for Llama-3.1-405B on 1,024 GPUs (issue 21), CPU seconds.

Wraps (never changes) the search's pieces and sums the process time spent in each over one
search (fresh inventory, after an untimed run): the model states per layout, the evaluations
(`_Search._report`) split by outcome (fits, or pruned over the budget), the step timelines
those evaluations build and, inside them, the transient terms (`timeline.transients`), the
candidates' step times, and the replay check of the rows shown. It answers what skipping the
exact timeline of a fitting row could save at most: an upper bound on its peak still needs
every transient term, so only the timeline's other work (and the reserve) could go.
Run: python benchmarks/plan_split.py   # prints; writes benchmarks/results/plan-split.json
(--no-write to only print).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memplan.config.load import load_spec
from memplan.model.load import load_inventory
from memplan.plan import search
from memplan.report.estimate import model_states
from memplan.step import timeline as tl

ROOT = Path(__file__).resolve().parent.parent


def _timed(sums: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            sums[key] = sums.get(key, 0.0) + time.process_time() - start

    return wrapped


def split() -> dict[str, Any]:
    loaded = load_spec(ROOT / "configs" / "plan-llama-3.1-405b.yaml")
    search.plan(loaded.spec, load_inventory(loaded))  # untimed: imports, module caches
    sums: dict[str, float] = {}
    counts = {"fit": 0, "over": 0}
    report, build, transients = search._Search._report, tl.build, tl.transients

    def evaluation(self: search._Search, *args: Any, **kwargs: Any) -> Any:
        before = dict(sums)
        start = time.process_time()
        out = report(self, *args, **kwargs)
        spent = time.process_time() - start
        kind = "fit" if out is not None and out.peak_bytes <= self.budget else "over"
        counts[kind] += 1
        sums[f"evaluations_{kind}"] = sums.get(f"evaluations_{kind}", 0.0) + spent
        for part in ("timelines", "transients"):
            delta = sums.get(part, 0.0) - before.get(part, 0.0)
            sums[f"{part}_{kind}"] = sums.get(f"{part}_{kind}", 0.0) + delta
        return out

    patches: list[tuple[Any, str, Any]] = [
        (search._Search, "_report", evaluation),
        (search._Search, "_candidate", _timed(sums, "candidates", search._Search._candidate)),
        (search, "model_states", _timed(sums, "model_states", model_states)),
        (search, "_checked_by_replay", _timed(sums, "replay_check", search._checked_by_replay)),
        (tl, "build", _timed(sums, "timelines", build)),
        (tl, "transients", _timed(sums, "transients", transients)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        inventory = load_inventory(loaded)
        start = time.process_time()
        result = search.plan(loaded.spec, inventory)
        total = time.process_time() - start
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    keys = (
        "model_states",
        "evaluations_fit",
        "timelines_fit",
        "transients_fit",
        "evaluations_over",
        "timelines_over",
        "candidates",
        "replay_check",
    )
    return {
        "spec": "configs/plan-llama-3.1-405b.yaml",
        "searched": result.searched,
        "fit": len(result.layouts),
        "evaluations": counts,
        "total_cpu_s": round(total, 3),
        "cpu_s": {k: round(sums.get(k, 0.0), 3) for k in keys},
        "share": {k: round(sums.get(k, 0.0) / total, 3) for k in keys},
        "fit_timeline_besides_transients_s": round(
            sums.get("timelines_fit", 0.0) - sums.get("transients_fit", 0.0), 3
        ),
        "note": "model_states includes the replay check's own; replay_check its evaluation",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Where memplan plan's time goes.")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    doc = split()
    print(json.dumps(doc, indent=1))
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks.stamp import stamp

        out = ROOT / "benchmarks" / "results" / "plan-split.json"
        out.write_text(json.dumps({"stamp": stamp(), **doc}, indent=1) + "\n")


if __name__ == "__main__":
    main()
