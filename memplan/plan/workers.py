"""Plan's search over several processes: the layouts are independent, so a large search is
split into tasks that forked copies of the search evaluate, and their answers are joined in
the layouts' own order (the same rows, counts and order as one process).

The workers share no cache, so each task goes where its layouts' cached work already is:
the caller names each run's domain (plan: its tensor degree), each worker owns whole domains
(`homes`) and takes another's tasks, from the far end, only once its own are done. The 405B
search on 2 workers made 345-353 micro-batch activations so (one process: 268), against
472-476 with the tasks dealt to whichever worker was free (concurrent.futures, before).
The workers then stay (`Pool`) and replay the rows plan shows with those caches warm, one row
at a time to each idle worker (`Pool.prefix`), where a second fork of the parent, whose caches
the search never filled, spent 0.69 s of CPU on the 405B search's 11 replays against 0.37 s.

Only where it helps and is safe: Linux's `fork` (the workers inherit the search and the
function they run; only the tasks' answers are pickled), more than one worker, a search
large enough to repay the fork (MIN_LAYOUTS), and torch not imported in this process (a fork
after torch has started its threads can hang: `memplan plan` imports torch only to trace a
profile, and then searches in one process)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Hashable, Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any, TypeVar, cast

from memplan.errors import MemplanError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

T = TypeVar("T")
R = TypeVar("R")

MIN_LAYOUTS = 64
"""The fewest layouts a search spreads over workers. Measured on 2 cores: a layout costs 3 to
7 ms to evaluate (the 405B search's 1,226 layouts in 3.3 s, plan-llama-3-8b's 210 in 1.4-1.7
s), starting the pool and joining its answers 20-40 ms; 64 layouts are 0.2-0.4 s of work."""
SHARES = 32
"""Tasks per worker: small enough that a worker that has run out of its own domains' tasks
takes a short one off another's tail, so that the workers finish together although layouts
differ in cost (the 405B search's TP-8 layouts cost 4x its TP-1 ones). Measured on the 405B
search, 2 workers: with 8, the workers' evaluation CPU came out 1.37 s and 1.22 s (the last
stolen task a quarter of a second long); with 32, 1.12-1.19 s and 1.17-1.24 s."""
MAX_WORKERS = 16
"""At most this many workers by default (`--jobs` sets any number): beyond them the largest
shipped search, the 405B's 1,226 layouts, would be dealt in tasks of one or two layouts."""


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
"""The function the forked workers apply (set before they fork: inherited, never pickled)."""
_AFTER: Callable[[Any], Any] | None = None
"""The function they apply to single items once their tasks are done (`Pool.prefix`)."""


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
    process). `ordered_map` deals each domain's runs so and takes its tasks in the items'
    order."""
    total = sum(len(g) for g in groups) or 1
    out: list[list[tuple[int, T]]] = [[] for _ in range(min(tasks, len(groups)))]
    n = 0
    for group in groups:
        # The task its middle item falls in, of len(out) of equal item counts.
        task = min(len(out) - 1, (2 * n + len(group)) * len(out) // (2 * total))
        out[task].extend((n + k, item) for k, item in enumerate(group))
        n += len(group)
    return [task for task in reversed(out) if task]


def homes(
    tasks: Sequence[Sequence[tuple[int, Any]]], workers: int, domains: Sequence[Hashable]
) -> list[list[int]]:
    """Each worker's own tasks (numbers into `tasks`, in the order it takes them): whole
    domains (`domains[k]`: task k's), the largest first to the worker with the fewest items,
    so that the items that share a worker's caches stay on one worker; a worker that runs out
    of its own takes the others' last untaken tasks (`_next`)."""
    size: dict[Hashable, int] = {}
    for task, key in zip(tasks, domains, strict=True):
        size[key] = size.get(key, 0) + len(task)
    load = [0] * workers
    owner: dict[Hashable, int] = {}
    for key in sorted(size, key=lambda k: -size[k]):  # stable: the first of equals first
        w = load.index(min(load))
        owner[key] = w
        load[w] += size[key]
    return [[k for k, key in enumerate(domains) if owner[key] == w] for w in range(workers)]


def _next(me: int, order: list[list[int]], taken: Any) -> int | None:
    """The task worker `me` takes next (with the lock held): its own first untaken one, else
    the last untaken one of the worker with the most left; None when every task is taken."""
    for k in order[me]:
        if not taken[k]:
            return k
    left = [[k for k in own if not taken[k]] for own in order]
    most = max(left, key=len)
    return most[-1] if most else None


def _work(
    me: int,
    order: list[list[int]],
    tasks: list[Any],
    taken: Any,
    lock: Any,
    conn: Any,
    requests: Any,
) -> None:
    """A forked worker: takes tasks (`_next`) until none is left and sends each answer, then
    says it is idle and answers `_AFTER` of each item the parent sends (`Pool.prefix`: the
    caches its tasks made still warm) until the parent sends None; or sends the error that
    stopped it."""
    try:
        while True:
            with lock:
                k = _next(me, order, taken)
                if k is None:
                    break
                taken[k] = 1
            conn.send(("ok", _apply(tasks[k])))
        conn.send(("idle", None))
        while True:
            try:
                request = requests.recv()
            except EOFError:  # the parent is gone
                break
            if request is None:
                break
            assert _AFTER is not None
            i, item = request
            conn.send(("after", (i, _AFTER(item))))
    except Exception as err:  # sent to the parent, which raises it
        try:
            conn.send(("error", err))
        except Exception:
            conn.send(("error", RuntimeError(traceback.format_exc())))
    finally:
        conn.close()


class Pool:
    """Forked workers for one search: `map` answers the search's items in their order, and
    the workers then stay, with the caches their tasks made, to answer `prefix`'s items one
    by one (plan's replays of the rows it shows) until `close` (or the `with` block's end).
    A pool whose `map` did not fork (no working semaphores) has `started` False."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.started = False
        self._running: dict[Any, Any] = {}  # answer pipe -> process
        self._requests: dict[Any, Any] = {}  # answer pipe -> request pipe
        self._idle: list[Any] = []  # answer pipes of the workers waiting for an item

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(clean=exc[0] is None)

    def map(
        self,
        each: Callable[[T], R],
        groups: Sequence[Sequence[T]],
        done: Callable[[int], object] | None = None,
        domain: Callable[[Sequence[T]], Hashable] | None = None,
        after: Callable[[Any], Any] | None = None,
    ) -> list[R]:
        """`each` of every item of `groups`, in their order: `ordered_map`'s answer. The
        workers apply `after` to `prefix`'s items later."""
        import multiprocessing

        global _EACH, _AFTER
        assert not self.started, "a pool maps once"
        tasks, domains = _dealt(groups, self.workers, domain)
        ctx = multiprocessing.get_context("fork")
        try:
            lock = ctx.Lock()
            taken = ctx.RawArray("b", len(tasks))
        except (OSError, ImportError, NotImplementedError):
            # No working semaphores here (sem_open: some containers, a missing /dev/shm): the
            # items are answered in this process, as with one worker.
            out = [each(item) for group in groups for item in group]
            if done is not None:
                done(len(out))
            return out
        order = homes(tasks, min(self.workers, len(tasks)), domains)
        answers: dict[int, Any] = {}
        _EACH, _AFTER = each, after
        self.started = True
        try:
            for me in range(len(order)):
                receive, send = ctx.Pipe(duplex=False)
                ask, request = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_work, args=(me, order, tasks, taken, lock, send, ask))
                proc.daemon = True
                proc.start()
                send.close()
                ask.close()
                self._running[receive] = proc
                self._requests[receive] = request
            total = sum(len(g) for g in groups)
            while len(answers) < total:
                for kind, answer in self._receive():
                    if kind == "ok":
                        answers.update(cast("list[tuple[int, Any]]", answer))
                        if done is not None:
                            done(len(answers))
        finally:
            _EACH = _AFTER = None
        return [answers[i] for i in range(len(answers))]

    def prefix(self, items: Sequence[Any], ok: Callable[[Any], bool], want: int) -> list[Any]:
        """`after` of the shortest prefix of `items` whose answers hold `want` that are `ok`
        (all of `items` when fewer are), in their order: what answering them one by one
        until `want` are ok gives. An item goes to an idle worker only while the answers so
        far and those under way cannot make `want`, so none is answered in vain."""
        answers: dict[int, Any] = {}
        waiting: dict[Any, int] = {}  # answer pipe -> item under way
        passed = sent = 0
        while True:
            while self._idle and sent < len(items) and passed + len(waiting) < want:
                conn = self._idle.pop()
                self._requests[conn].send((sent, items[sent]))
                waiting[conn] = sent
                sent += 1
            if not waiting and (sent == len(items) or passed >= want):
                return [answers[i] for i in range(sent)]
            if not self._running:
                raise _died()
            # An answer under way, or a worker not yet idle (its tasks' last answer came).
            for kind, answer in self._receive(waiting):
                if kind == "after":
                    i, value = answer
                    answers[i] = value
                    passed += bool(ok(value))

    def _receive(self, waiting: dict[Any, int] | None = None) -> list[tuple[str, Any]]:
        """The messages of the workers ready now ("ok" tasks, "after" answers), an "idle"
        worker noted in `_idle` (and removed from `waiting`); a worker's error raised, a
        dead worker a MemplanError (never a wait for an answer that cannot come)."""
        from multiprocessing.connection import wait

        out: list[tuple[str, Any]] = []
        for ready in wait(list(self._running)):
            conn = cast("Connection[Any, Any]", ready)
            try:
                kind, answer = conn.recv()
            except EOFError:  # the worker died: it only ends when closed
                proc = self._running.pop(conn)
                proc.join()
                raise _died() from None
            if kind == "error":
                raise cast(BaseException, answer)
            if kind in ("idle", "after"):
                self._idle.append(conn)
                if waiting is not None:
                    waiting.pop(conn, None)
            out.append((kind, answer))
        return out

    def close(self, clean: bool = True) -> None:
        """Ends the workers: each told to stop (`clean`) or terminated, and joined."""
        for conn, proc in self._running.items():
            if clean and proc.is_alive():
                try:
                    self._requests[conn].send(None)
                except OSError:
                    proc.terminate()
            else:
                proc.terminate()
        for conn, proc in self._running.items():
            proc.join()
            conn.close()
            self._requests[conn].close()
        self._running.clear()
        self._requests.clear()
        self._idle.clear()


def ordered_map(
    each: Callable[[T], R],
    groups: Sequence[Sequence[T]],
    workers: int,
    done: Callable[[int], object] | None = None,
    domain: Callable[[Sequence[T]], Hashable] | None = None,
) -> list[R]:
    """`each` of every item of `groups`, in their order, worked out by `workers` forked
    processes: `deal`'s tasks of the groups of each `domain` (groups whose items share
    caches; None: all one), each worker taking its own domains' tasks first (`homes`) and
    then the others' last ones; `done(n)` after each task with the items answered so far.
    A worker that dies (killed for memory, say) ends the call with a MemplanError, never a
    wait for an answer that cannot come; an error raised in a worker is raised here."""
    with Pool(workers) as pool:
        return pool.map(each, groups, done, domain)


def _died() -> MemplanError:
    return MemplanError(
        "a worker process of the search ended abruptly (killed for lack of memory?): "
        "`--jobs 1` searches in this process alone.",
        field="--jobs",
    )


def _dealt(
    groups: Sequence[Sequence[T]], workers: int, domain: Callable[[Sequence[T]], Hashable] | None
) -> tuple[list[list[tuple[int, T]]], list[Hashable]]:
    """The tasks of `ordered_map` in the items' order, none across two domains (about
    workers x SHARES in all, each domain's share by its items), and each task's domain."""
    key = domain or (lambda _: None)
    total = sum(len(g) for g in groups) or 1
    tasks: list[list[tuple[int, T]]] = []
    domains: list[Hashable] = []
    n = 0
    for name, run in groupby(groups, key=key):
        runs = list(run)
        items = sum(len(g) for g in runs)
        share = max(1, round(workers * SHARES * items / total))
        for task in reversed(deal(runs, share)):
            tasks.append([(n + i, item) for i, item in task])
            domains.append(name)
        n += items
    return tasks, domains
