"""Throughput of `memplan plan`'s search, measured in one run.

Targets (issue 21; issue 8 asked 2 s for the first): the full search for Llama-3.1-405B on 1,024
GPUs under 1 s, and DeepSeek-V3 (671B, MoE with expert parallelism) on 2,048 GPUs under 2 s, on
2 cores. DeepSeek-V3 has no hand activation rule: its profiles are traced (torch and
transformers needed) in an untimed first run, in a subprocess, and read from memplan's cache in
the timed ones (so this process never imports torch, after which the search would not fork).
Each search is timed as `memplan plan` runs it, on every CPU (memplan.plan.workers.
default_workers), and in one process (`--jobs 1`), with the cyclic garbage collector off as
the CLI runs (results before commit 'benchmark: GC off' timed it on: ~15% more CPU); CPU
seconds include the workers'.
Run: python benchmarks/plan_speed.py            # prints; writes benchmarks/results/plan-speed.json
(--no-write to only print). `--baseline DIR` also times the memplan in DIR (a checkout, e.g.
`git archive HEAD | tar -x -C DIR`): both checkouts then run as subprocesses, alternated
ROUNDS times, and both are recorded (wall and CPU seconds: the machine may be shared).
scripts/gen_readme.py quotes the file in the README.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from memplan.config.load import load_spec
from memplan.model.load import load_inventory
from memplan.plan.search import plan

try:  # a --baseline checkout may predate the workers and the identity memos
    from memplan.memo import IdentityMemo
    from memplan.plan.workers import default_workers
except ImportError:  # pragma: no cover

    class IdentityMemo:  # type: ignore[no-redef]
        pass

    def default_workers() -> int:
        return 1


ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.0
DEEPSEEK_TARGET_S = 2.0
RUNS = 3
ROUNDS = 2
"""With --baseline: the before / after subprocess pairs, alternated."""


def cold() -> None:
    """Empty memplan's in-process memo tables (functools caches of its modules' functions and
    classes' methods, and its IdentityMemo tables) before a timed run, so that every run pays
    what `memplan plan` pays in a fresh process (before, runs after the first found
    ScheduleZBVZeroBubble's idle shares and the pipeline in-flight counts already worked out:
    3.5-4.4 s against 5.3-6.1 s)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("memplan") or module is None:
            continue
        for value in list(vars(module).values()):
            for obj in (value, *vars(value).values()) if isinstance(value, type) else (value,):
                clear = None if isinstance(obj, type) else getattr(obj, "cache_clear", None)
                if callable(clear) and (
                    getattr(obj, "__module__", None) == name or isinstance(obj, IdentityMemo)
                ):
                    clear()


DEEPSEEK = {
    "model": {"preset": "deepseek-v3"},
    "precision": "bf16-mixed",
    "training": {"sequence_length": 4096},
    "hardware": {"gpu": "H100-80GB", "gpus_per_node": 8},
    "plan": {"gpus": 2048, "global_batch_size": 4096},
}


def searched(spec: Any, inventory: Any, workers: int) -> tuple[Any, float, float]:
    """One cold search: its result, wall seconds and CPU seconds (this process's and its
    workers')."""
    import inspect

    cold()
    kwargs = {"workers": workers} if "workers" in inspect.signature(plan).parameters else {}
    # As `memplan plan` runs it: memplan.cli.app.main turns the cyclic garbage collector off
    # for the whole command (its workers inherit that). The earlier runs' garbage is collected
    # first, untimed.
    gc.collect()
    gc.disable()
    try:
        before = os.times()
        start = time.perf_counter()
        result = plan(spec, inventory, **kwargs)
        wall = time.perf_counter() - start
        after = os.times()
    finally:
        gc.enable()
    cpu = sum(after[:4]) - sum(before[:4])  # user + system, this process and reaped children
    return result, wall, cpu


def one_process(times: list[float], cpu: list[float]) -> dict[str, object]:
    return {
        "runs_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "cpu_s": [round(t, 3) for t in cpu],
        "median_cpu_s": round(statistics.median(cpu), 3),
    }


def warm_deepseek() -> None:
    """Trace DeepSeek-V3's profiles into memplan's cache (what the untimed first run of
    `memplan plan` does), in this process: `--warm`'s subprocess."""
    from memplan.config.load import validate
    from memplan.plan.search import tensor_slices
    from memplan.plan.space import recompute_options
    from memplan.verify.trace import traced_profiles

    loaded = validate(DEEPSEEK)
    settings = loaded.spec.plan
    assert settings is not None
    inventory = load_inventory(loaded)
    traced_profiles(
        loaded,
        inventory,
        checkpointing=recompute_options(settings),
        tensor_slices=tensor_slices(loaded.spec, inventory),
    )


def deepseek() -> dict[str, object]:
    """DeepSeek-V3 on 2,048 GPUs: its activation profiles traced first (untimed, in a
    subprocess), then the search timed RUNS times on every CPU and RUNS times in one
    process."""
    subprocess.run([sys.executable, __file__, "--warm"], check=True)
    from memplan.config.load import validate
    from memplan.plan.search import tensor_slices
    from memplan.plan.space import recompute_options
    from memplan.verify.trace import traced_profiles

    loaded = validate(DEEPSEEK)
    settings = loaded.spec.plan
    assert settings is not None
    inventory = load_inventory(loaded)
    inventory, _ = traced_profiles(  # as `memplan plan` traces them (its TP slices too)
        loaded,
        inventory,
        checkpointing=recompute_options(settings),
        tensor_slices=tensor_slices(loaded.spec, inventory),
    )
    workers = default_workers()
    forks = "torch" not in sys.modules
    times, cpu, alone, alone_cpu, result = [], [], [], [], None
    for _ in range(RUNS):
        for n, wall, cpus in ((workers, times, cpu), (1, alone, alone_cpu)):
            result, t, c = searched(loaded.spec, inventory, n)
            wall.append(t)
            cpus.append(c)
    assert result is not None
    median = statistics.median(times)
    print(
        f"DeepSeek-V3 on {result.gpus} GPUs: {result.searched:,} layouts evaluated, "
        f"{len(result.layouts):,} fit; median {median:.2f} s on {workers} workers (CPU "
        f"{statistics.median(cpu):.2f} s), {statistics.median(alone):.2f} s in one process "
        f"({'meets' if median < DEEPSEEK_TARGET_S else 'MISSES'} the "
        f"{DEEPSEEK_TARGET_S:.0f} s target)"
    )
    return {
        "workers": workers,
        "forked": forks and workers > 1,
        "one_process": one_process(alone, alone_cpu),
        "spec": DEEPSEEK,
        "gpus": result.gpus,
        "searched": result.searched,
        "fit": len(result.layouts),
        "pruned": dict(result.pruned),
        "runs_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "cpu_s": [round(t, 3) for t in cpu],
        "median_cpu_s": round(statistics.median(cpu), 3),
        "target_s": DEEPSEEK_TARGET_S,
    }


def llama() -> dict[str, object]:
    """Llama-3.1-405B on 1,024 GPUs, timed RUNS times (wall and CPU seconds)."""
    loaded = load_spec(ROOT / "configs" / "plan-llama-3.1-405b.yaml")
    workers = default_workers()
    forks = "torch" not in sys.modules
    times, cpu, alone, alone_cpu, result = [], [], [], [], None
    for _ in range(RUNS):
        for n, wall, cpus in ((workers, times, cpu), (1, alone, alone_cpu)):
            # A fresh inventory object each run, so no cache survives from the previous one.
            result, t, c = searched(loaded.spec, load_inventory(loaded), n)
            wall.append(t)
            cpus.append(c)
    assert result is not None
    best = result.layouts[0] if result.layouts else None
    median = statistics.median(times)
    print(
        f"Llama-3.1-405B on {result.gpus} GPUs: {result.searched:,} layouts evaluated, "
        f"{len(result.layouts):,} fit, pruned {sum(result.pruned.values()):,}"
    )
    print(
        f"median {median:.2f} s on {workers} workers (CPU {statistics.median(cpu):.2f} s) over "
        f"{len(times)} runs = {result.searched / median:,.0f} layouts/s "
        f"({statistics.median(alone):.2f} s in one process); "
        f"{'meets' if median < TARGET_S else 'MISSES'} the {TARGET_S:.1f} s target"
    )
    if best:
        print(
            f"top layout: dp{best.data} tp{best.tensor} pp{best.pipeline} cp{best.context} "
            f"{best.engine} ZeRO-{best.zero_stage} mbs {best.micro_batch_size} "
            f"recompute {best.recompute}: {best.tokens_per_s:,.0f} tokens/s (model)"
        )
    return {
        "workers": workers,
        "forked": forks and workers > 1,
        "one_process": one_process(alone, alone_cpu),
        "spec": "configs/plan-llama-3.1-405b.yaml",
        "gpus": result.gpus,
        "searched": result.searched,
        "fit": len(result.layouts),
        "pruned": sum(result.pruned.values()),
        "runs_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "cpu_s": [round(t, 3) for t in cpu],
        "median_cpu_s": round(statistics.median(cpu), 3),
        "target_s": TARGET_S,
    }


def timed(directory: Path) -> dict[str, Any]:
    """This benchmark's timings with the memplan package of `directory` (its own `--times`
    run in a subprocess whose import path starts there)."""
    env = {**os.environ, "PYTHONPATH": str(directory.resolve())}
    done = subprocess.run(
        [sys.executable, __file__, "--times"], env=env, capture_output=True, text=True, check=True
    )
    doc: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return doc


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several `--times` documents of one checkout as one: every run's seconds and their
    medians, for the 405B search and for DeepSeek-V3's."""

    def pooled(parts: list[dict[str, Any]]) -> dict[str, Any]:
        wall = [t for p in parts for t in p["runs_s"]]
        cpu = [t for p in parts for t in p["cpu_s"]]
        alone = [p["one_process"] for p in parts if "one_process" in p]
        return {
            **parts[-1],
            "runs_s": wall,
            "cpu_s": cpu,
            "median_s": round(statistics.median(wall), 3),
            "median_cpu_s": round(statistics.median(cpu), 3),
            **({"one_process": pooled(alone)} if alone else {}),
        }

    return {**pooled(runs), "deepseek_v3": pooled([r["deepseek_v3"] for r in runs])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Throughput of memplan plan's search.")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout, timed alternately with this one"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"with --baseline: before / after pairs, alternated (default {ROUNDS})",
    )
    parser.add_argument("--times", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm:
        warm_deepseek()
        return
    doc: dict[str, Any]
    if args.times:  # --baseline's subprocesses: the timings as one JSON line, nothing written
        doc = llama()
        doc["deepseek_v3"] = deepseek()
        print(json.dumps(doc))
        return
    if args.baseline is None:
        doc = llama()
        doc["deepseek_v3"] = deepseek()
    else:
        # Before and after alternate, each its own subprocess, ROUNDS times: on a shared
        # machine whose speed drifts, neither side always runs first or on a warmer CPU.
        befores, afters = [], []
        for _ in range(args.rounds):
            befores.append(timed(args.baseline))
            afters.append(timed(ROOT))
        before, doc = merged(befores), merged(afters)
        for name, d in (("baseline " + str(args.baseline), before), ("this checkout", doc)):
            print(
                f"{name}: Llama-3.1-405B median {d['median_s']} s (CPU {d['median_cpu_s']} s) "
                f"over {len(d['runs_s'])} runs; DeepSeek-V3 median "
                f"{d['deepseek_v3']['median_s']} s (CPU {d['deepseek_v3']['median_cpu_s']} s)"
            )
        doc["baseline"] = {"directory": str(args.baseline), **before}
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from benchmarks.stamp import stamp

        out = ROOT / "benchmarks" / "results" / "plan-speed.json"
        out.write_text(json.dumps({"stamp": stamp(), **doc}, indent=1) + "\n")


if __name__ == "__main__":
    main()
