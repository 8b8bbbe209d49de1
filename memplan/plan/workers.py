"""Plan's search over several processes: the layouts are independent, so a large search is
split into chunks that forked copies of the search evaluate, and their answers are joined in
the layouts' own order (the same rows, counts and order as one process).

Only where it helps and is safe: Linux's `fork` (the workers inherit the search and the
function they run; only the tasks' layouts and their answers are pickled), more than one
worker, a search large enough to repay the fork (MIN_LAYOUTS), and torch not imported in this
process (a fork after torch has started its threads can hang: `memplan plan` imports torch
only to trace a profile, and then searches in one process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memplan.errors import MemplanError

T = TypeVar("T")
R = TypeVar("R")

MIN_LAYOUTS = 64
"""The fewest layouts a search spreads over workers. Measured on 2 cores: a layout costs 3 to
7 ms to evaluate (the 405B search's 1,226 layouts in 3.3 s, plan-llama-3-8b's 210 in 1.4-1.7
s), starting the pool and joining its answers 20-40 ms; 64 layouts are 0.2-0.4 s of work."""
SHARES = 8
"""Tasks per worker: enough that the workers finish together although layouts differ in
cost (the 405B search's layouts in sixteen tasks of about equal count: the TP-8 pipelines
cost the most, dealt first)."""
MAX_WORKERS = 16
"""At most this many workers by default: the 405B search, the largest shipped, then gets
about 10 layouts per task (1,226 over 16 x SHARES); more workers would fork for tasks too
small to repay it. `--jobs` sets any number."""


def available() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """`memplan plan`'s worker count when --jobs is not given: every CPU, at most
    MAX_WORKERS."""
    return min(available(), MAX_WORKERS)


def workers_help(workers: int, items: int, least: int | None = None) -> bool:
    """Whether `items` pieces of work (layouts, unless `least` says how many are worth a
    fork) go to `workers` forked processes."""
    return (
        workers > 1
        and items >= (MIN_LAYOUTS if least is None else least)
        and sys.platform == "linux"
        and "torch" not in sys.modules
    )


_EACH: Callable[[Any], Any] | None = None
"""The function the forked workers apply (set before the pool forks them: inherited, never
pickled)."""


def _apply(task: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    assert _EACH is not None
    return [(i, _EACH(item)) for i, item in task]


def deal(groups: Sequence[Sequence[T]], tasks: int) -> list[list[tuple[int, T]]]:
    """`groups` (runs of adjacent items, numbered in order across the groups) split into at
    most `tasks` tasks of adjacent groups, about as many items each (a group goes where its
    middle item falls), each item with its number; the last task first. Neighbouring runs
    share the workers' caches: plan's runs of one tensor degree share model states and stage
    inventories (the 405B search on 2 workers made 254-266 model states and 159-167 stage
    inventories, against 370 and 264 with the runs dealt round robin, 217 and 132 in one
    process). Plan's costliest runs, the tensor-parallel pipelines, come last in its order:
    they start first, and the short ones even out the end."""
    total = sum(len(g) for g in groups) or 1
    out: list[list[tuple[int, T]]] = [[] for _ in range(min(tasks, len(groups)))]
    n = 0
    for group in groups:
        # The task its middle item falls in, of len(out) of equal item counts.
        task = min(len(out) - 1, (2 * n + len(group)) * len(out) // (2 * total))
        out[task].extend((n + k, item) for k, item in enumerate(group))
        n += len(group)
    return [task for task in reversed(out) if task]


def ordered_map(
    each: Callable[[T], R],
    groups: Sequence[Sequence[T]],
    workers: int,
    done: Callable[[int], object] | None = None,
) -> list[R]:
    """`each` of every item of `groups`, in their order, worked out by `workers` forked
    processes (`deal`); `done(n)` after each task with the items answered so far. A worker
    that dies (killed for memory, say) ends the call with a MemplanError, never a wait for
    an answer that cannot come (concurrent.futures notices the death: BrokenProcessPool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    global _EACH
    tasks = deal(groups, workers * SHARES)
    try:
        pool = ProcessPoolExecutor(
            min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork")
        )
    except (OSError, ImportError, NotImplementedError):
        # No working semaphores here (sem_open: some containers, a missing /dev/shm): the
        # items are answered in this process, as with one worker.
        out = [each(item) for group in groups for item in group]
        if done is not None:
            done(len(out))
        return out
    answers: dict[int, Any] = {}
    _EACH = each
    try:
        with pool:
            for future in as_completed([pool.submit(_apply, task) for task in tasks]):
                answers.update(future.result())
                if done is not None:
                    done(len(answers))
    except BrokenProcessPool as err:
        raise MemplanError(
            "a worker process of the search ended abruptly (killed for lack of memory?): "
            "`--jobs 1` searches in this process alone.",
            field="--jobs",
        ) from err
    finally:
        _EACH = None
    return [answers[i] for i in range(len(answers))]
