"""memplan.plan.workers: plan's search spread over forked processes gives one process's answer.

The reference is the search in one process (workers=1), the path the rest of the suite holds
against estimate and the engines: the same rows in the same order, the same prune counts in
the same order, the same replay checks, byte for byte in `plan --json`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.plan import workers
from memplan.plan.workers import deal, workers_help

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: the suite's process has imported torch, and the search never
# forks after that (workers_help). MIN_LAYOUTS is lowered so that a small search forks too.
SCRIPT = """
import json, sys
from pathlib import Path
from memplan.config.load import load_spec
from memplan.model.load import load_inventory
from memplan.plan import search, workers
from memplan.plan.json import plan_json

workers.MIN_LAYOUTS = 1
forks, replays = [], []
real, real_map, real_prefix = workers.ordered_map, workers.Pool.map, workers.Pool.prefix

def spy(each, groups, n, done=None, **kw):
    forks.append(sum(len(g) for g in groups))
    return real(each, groups, n, done, **kw)

def spy_map(self, each, groups, *args, **kw):
    forks.append(sum(len(g) for g in groups))
    return real_map(self, each, groups, *args, **kw)

def spy_prefix(self, items, ok, want):
    out = real_prefix(self, items, ok, want)
    replays.append(len(out))
    return out

search.ordered_map = spy
workers.Pool.map = spy_map
workers.Pool.prefix = spy_prefix
import time
# Answers joined in the items' order, not as the workers finish: later items finish first.
late_first = real(lambda x: time.sleep(0.05 * (6 - x)) or -x, [[0], [1], [2], [3], [4], [5]], 2)
forks.clear()  # ordered_map maps with a Pool too
loaded = load_spec(Path(sys.argv[1]))
if len(sys.argv) > 2:
    plan = loaded.spec.plan.model_copy(update={"gpus": int(sys.argv[2])})
    spec = loaded.spec.model_copy(update={"plan": plan})
else:
    spec = loaded.spec
inventory = load_inventory(loaded)
one = search.plan(spec, inventory, workers=1)
assert not forks and not replays, (forks, replays)
seen = []
two = search.plan(spec, inventory, workers=2, progress=lambda d, t: seen.append((d, t)))
print(json.dumps({
    "one": plan_json(one),
    "two": plan_json(two),
    "one_pruned": list(one.pruned.items()),
    "two_pruned": list(two.pruned.items()),
    "forks": forks,
    "replays": replays,
    "progress": seen,
    "torch": "torch" in sys.modules,
    "late_first": late_first,
}))
"""


def _both(spec: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, spec, *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    doc: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return doc


@pytest.mark.parametrize(
    ("spec", "gpus"),
    [
        ("configs/plan-llama-3-8b.yaml", None),
        # torch's pipeline schedules (interleaved, ZBV), torchtitan's wrapping, compile
        pytest.param("configs/plan-llama-3.1-8b-torchtitan.yaml", "64", marks=pytest.mark.slow),
    ],
)
def test_two_workers_answer_as_one_process(spec: str, gpus: str | None) -> None:
    doc = _both(spec, *([gpus] if gpus else []))
    forks = doc["forks"]
    # The search forked once; its workers replayed the rows shown (Pool.prefix), no fork more.
    assert isinstance(forks, list) and len(forks) == 1, forks
    replays = doc["replays"]
    assert isinstance(replays, list) and len(replays) == 1 and replays[0] >= 1, replays
    assert doc["torch"] is False
    assert doc["late_first"] == [0, -1, -2, -3, -4, -5]
    assert doc["one"] == doc["two"]
    assert doc["one_pruned"] == doc["two_pruned"]  # the counts in the same order too
    one = doc["one"]
    assert isinstance(one, dict) and one["layouts"], "some layout fits"
    progress = doc["progress"]
    assert isinstance(progress, list) and progress
    done = [d for d, _ in progress]
    assert done == sorted(done) and progress[-1][0] == progress[-1][1] == forks[0]


def test_deal_keeps_runs_together_and_numbers_items_in_order() -> None:
    """Pins behaviour: adjacent runs go to one task, about as many items each (a run goes
    where its middle item falls), the last task first; each item numbered by its place in the
    whole sequence (ordered_map joins the answers by those numbers)."""
    runs = [["a", "b"], ["c"], ["d", "e", "f"], ["g"]]
    assert deal(runs, 2) == [
        [(3, "d"), (4, "e"), (5, "f"), (6, "g")],
        [(0, "a"), (1, "b"), (2, "c")],
    ]
    assert deal(runs, 9) == [
        [(6, "g")],
        [(3, "d"), (4, "e"), (5, "f")],
        [(2, "c")],
        [(0, "a"), (1, "b")],
    ]
    assert deal([], 4) == []


def test_no_fork_for_one_worker_a_small_search_or_after_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pins behaviour: the cases the search stays in one process."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert workers_help(2, workers.MIN_LAYOUTS)
    assert not workers_help(1, 10_000)
    assert not workers_help(2, workers.MIN_LAYOUTS - 1)
    assert workers_help(2, 4, least=4)
    monkeypatch.setitem(sys.modules, "torch", object())
    assert not workers_help(2, 10_000)


DIES = """
import os
from memplan.errors import MemplanError
from memplan.plan import workers

try:
    workers.ordered_map(lambda x: os._exit(3) if x == 2 else x, [[1], [2], [3]], 2)
except MemplanError as err:
    print("error:", err.field, err)
"""


def test_a_worker_that_dies_ends_the_search_with_an_error_not_a_wait() -> None:
    """multiprocessing.Pool waits forever for the answer of a killed worker; the search
    says what happened and how to search without workers instead."""
    done = subprocess.run(
        [sys.executable, "-c", DIES],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.startswith("error: --jobs "), done.stdout + done.stderr
    assert "`--jobs 1`" in done.stdout


def test_without_semaphores_the_items_are_answered_in_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where multiprocessing has no working sem_open (some containers), making the workers'
    lock fails with OSError: the search goes on in one process instead of failing."""
    import multiprocessing.context

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(multiprocessing.context.BaseContext, "Lock", refuse)
    seen: list[int] = []
    assert workers.ordered_map(lambda x: -x, [[1], [2, 3]], 2, seen.append) == [-1, -2, -3]
    assert seen == [3]


def test_homes_keep_each_domain_on_one_worker_largest_first() -> None:
    """Pins behaviour: a worker owns whole domains (the items that share its caches), the
    largest domain first to the worker with the fewest items; tasks in the items' order."""
    tasks = [[(0, "a")], [(1, "b"), (2, "c")], [(3, "d")], [(4, "e")], [(5, "f"), (6, "g")]]
    domains = ["x", "y", "y", "z", "z"]
    # y (3 items) -> worker 0, z (3) -> worker 1, then x (1) to the first of the two
    # equally loaded, worker 0.
    assert workers.homes(tasks, 2, domains) == [[0, 1, 2], [3, 4]]
    assert workers.homes(tasks, 1, domains) == [[0, 1, 2, 3, 4]]


def test_a_worker_out_of_its_own_tasks_takes_the_far_end_of_the_longest_queue() -> None:
    """Pins behaviour: own tasks first, in order; then the last untaken task of the worker
    with the most left (the farthest from where its owner works); None when all are taken."""
    order = [[0, 1], [2, 3, 4], [5]]
    taken = [0] * 6
    assert workers._next(0, order, taken) == 0
    taken[0] = taken[1] = taken[5] = 1
    assert workers._next(0, order, taken) == 4
    assert workers._next(2, order, taken) == 4
    taken[2] = taken[3] = taken[4] = 1
    assert workers._next(1, order, taken) is None


def test_dealt_tasks_never_span_two_domains_and_number_items_in_order() -> None:
    """Each task's items are of one domain, numbered by their place in the whole sequence,
    and every item is dealt once."""
    groups = [[("a", 1)], [("a", 2), ("a", 3)], [("b", 4)], [("b", 5)], [("c", 6)]]
    tasks, domains = workers._dealt(groups, 2, lambda g: g[0][0])
    assert sorted(i for t in tasks for i, _ in t) == list(range(6))
    for task, name in zip(tasks, domains, strict=True):
        assert {item[0] for _, item in task} == {name}
        assert all(item[1] == i + 1 for i, item in task)


RAISES = """
from memplan.plan import workers

def each(x):
    if x == 5:
        raise ValueError("item five")
    return x

try:
    workers.ordered_map(each, [[1], [2], [3], [4], [5], [6]], 2, domain=lambda g: g[0] % 2)
except ValueError as err:
    print("raised:", err)
print("answers:", workers.ordered_map(lambda x: -x, [[1], [2, 3], [4]], 2, domain=len))
"""


def test_an_error_in_a_worker_is_raised_by_the_search_and_answers_keep_their_order() -> None:
    """A worker's exception reaches the caller (as concurrent.futures re-raised it before);
    with domains dealt to the workers, the answers still come in the items' order."""
    done = subprocess.run(
        [sys.executable, "-c", RAISES],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.splitlines() == ["raised: item five", "answers: [-1, -2, -3, -4]"], (
        done.stdout + done.stderr
    )


PREFIX = """
import json, sys
from memplan.plan import workers

def after(x):
    with open(sys.argv[1], "a") as log:  # each item the workers answer
        log.write(f"{x}\\n")
    return (x % 3 != 0, -x)

with workers.Pool(2) as pool:
    mapped = pool.map(lambda x: 10 * x, [[1], [2, 3]], after=after)
    seven = pool.prefix(list(range(1, 20)), lambda a: a[0], 5)
    none = pool.prefix([1, 2], lambda a: a[0], 0)
    short = pool.prefix([3, 6, 4], lambda a: a[0], 2)
print(json.dumps([mapped, seven, none, short]))
"""


def test_the_pool_answers_the_shortest_prefix_and_no_item_in_vain(tmp_path: Path) -> None:
    """Pool.prefix gives what answering the items one by one until `want` are ok gives (the
    rows plan replays: those before the p.top-th that fits), and never sends a worker an
    item past them: 1..7 hold the five not divisible by 3, so 8..19 are never answered."""
    log = tmp_path / "answered"
    done = subprocess.run(
        [sys.executable, "-c", PREFIX, str(log)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    mapped, seven, none, short = json.loads(done.stdout.splitlines()[-1])
    assert mapped == [10, 20, 30]
    assert seven == [[x % 3 != 0, -x] for x in range(1, 8)]
    assert none == []
    assert short == [[False, -3], [False, -6], [True, -4]]  # fewer ok than wanted: all
    assert sorted(int(x) for x in log.read_text().split()) == sorted([*range(1, 8), 3, 6, 4])
