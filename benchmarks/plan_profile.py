"""Where `memplan plan`'s one-process search of Llama-3.1-405B on 1,024 GPUs spends its time.

Issue 21 asks this search in under 1 s; benchmarks/plan_speed.py times it. This script splits
one cold, one-process run (garbage collector off, as the CLI runs) by what each evaluation
of a (layout, micro-batch, recomputation, compile) ended as: a fit (every viewed stage's
totals and the top stage's timeline made), pruned at its floor (memplan.step.timeline.
floor_bytes, before any totals), or pruned at its totals (every viewed stage's floor, then
totals until one exceeds the budget); the model states per layout and the allocator replays
of the rows shown are timed apart. It also counts the fitting micro-batches of each
(layout, recomputation, compile): how many evaluations a search that found each one's
largest fitting micro-batch by bisection would save.

The timers wrap memplan's functions in this process (a few microseconds each), so the parts
sum to a little more than an untimed run; a replay's time includes its row's model states,
counted in both lines. Run: python benchmarks/plan_profile.py [SPEC]
(prints only).
"""

from __future__ import annotations

import gc
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from memplan.config.load import load_spec
from memplan.model.load import load_inventory
from memplan.plan import search as s
from memplan.step import timeline as tl

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else ROOT / "configs" / "plan-llama-3.1-405b.yaml"
    loaded = load_spec(path)
    inventory = load_inventory(loaded)
    seconds: defaultdict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    totals_made = [0]
    fits: defaultdict[tuple[object, ...], list[int]] = defaultdict(list)

    def timed(name: str, f: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                seconds[name] += time.process_time() - start
                count[name] += 1

        return run

    totals = tl.totals

    def counted_totals(*args: Any, **kwargs: Any) -> Any:
        totals_made[0] += 1
        return totals(*args, **kwargs)

    setattr(tl, "totals", counted_totals)  # noqa: B010 (monkeypatched, as below)
    report = s._Search._report

    def evaluation(self: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        totals_made[0] = 0
        start = time.process_time()
        out = report(self, spec, *args, **kwargs)
        if out is None:
            kind = "pruned at its totals" if totals_made[0] else "pruned at its floor"
        else:
            kind = "fit" if out.peak_bytes <= self.budget else "over the budget"
            par = spec.parallelism
            mbs, recompute, compiled = args[2], args[3], args[4]
            fits[(par.model_dump_json(), par.engine, recompute, compiled)].append(mbs)
        seconds[kind] += time.process_time() - start
        count[kind] += 1
        return out

    setattr(s._Search, "_report", evaluation)  # noqa: B010
    for name, label in (
        ("model_states", "model states (per layout)"),
        ("_replay_fits", "allocator replay of a shown row"),
    ):
        setattr(s, name, timed(label, getattr(s, name)))
    gc.collect()
    gc.disable()
    start = time.process_time()
    result = s.plan(loaded.spec, inventory, workers=1)
    total = time.process_time() - start
    gc.enable()
    print(f"{path.name}: {result.searched:,} evaluations, {len(result.layouts):,} fit")
    print(f"{'part':36} {'n':>6} {'CPU s':>7} {'ms each':>8} {'share':>6}")
    for name in sorted(seconds, key=lambda k: -seconds[k]):
        each = 1000 * seconds[name] / count[name]
        print(
            f"{name:36} {count[name]:>6,} {seconds[name]:>7.3f} {each:>8.3f} "
            f"{seconds[name] / total:>6.0%}"
        )
    rest = total - sum(seconds.values())
    print(f"{'the rest (layouts, candidates, ...)':36} {'':>6} {rest:>7.3f}")
    print(f"{'search + replays':36} {'':>6} {total:>7.3f}")
    by = Counter(len(v) for v in fits.values())
    print("fitting micro-batches per (layout, recompute, compile):", dict(sorted(by.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
