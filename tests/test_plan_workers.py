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
forks = []
real = workers.ordered_map

def spy(each, groups, n, done=None):
    forks.append(sum(len(g) for g in groups))
    return real(each, groups, n, done)

search.ordered_map = spy
import time
# Answers joined in the items' order, not as the workers finish: later items finish first.
late_first = real(lambda x: time.sleep(0.05 * (6 - x)) or -x, [[0], [1], [2], [3], [4], [5]], 2)
loaded = load_spec(Path(sys.argv[1]))
if len(sys.argv) > 2:
    plan = loaded.spec.plan.model_copy(update={"gpus": int(sys.argv[2])})
    spec = loaded.spec.model_copy(update={"plan": plan})
else:
    spec = loaded.spec
inventory = load_inventory(loaded)
one = search.plan(spec, inventory, workers=1)
assert not forks, forks
seen = []
two = search.plan(spec, inventory, workers=2, progress=lambda d, t: seen.append((d, t)))
print(json.dumps({
    "one": plan_json(one),
    "two": plan_json(two),
    "one_pruned": list(one.pruned.items()),
    "two_pruned": list(two.pruned.items()),
    "forks": forks,
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
    assert isinstance(forks, list) and len(forks) >= 2, "the search and the replays forked"
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
    """Where multiprocessing has no working sem_open (some containers), making the pool fails
    with OSError: the search goes on in one process instead of failing."""
    import concurrent.futures

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", refuse)
    seen: list[int] = []
    assert workers.ordered_map(lambda x: -x, [[1], [2, 3]], 2, seen.append) == [-1, -2, -3]
    assert seen == [3]
