"""The idle share of a pipeline schedule, found by running its action lists: every rank does
its actions in order, each as soon as the one it needs from a neighbouring stage is done (a
stage's forward waits for the previous stage's forward of the same micro-batch; a backward for
the next stage's input backward, or the loss on the last stage). Communication takes no time
here (memplan.plan.steptime counts the point-to-point transfers apart).

Action costs follow the 6N FLOPs of a training token (PaLM, Chowdhery et al. 2022, arXiv
2204.02311, appendix B): a forward 2N, a backward 4N, split evenly between the input backward
(I) and the weight backward (W), as the zero-bubble paper takes them (Qi et al. 2024, arXiv
2401.10241, sec. 2: T_F = T_B = T_W). With these, Schedule1F1B's lists give the 1F1B bubble
(P - 1) / m (tests/test_schedule_time.py, on torch's own lists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from memplan.activations.pipeline import zbv_order

COST = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}
"""Forward, input backward, weight backward and full backward (I + W), in forwards."""

Action = tuple[int, str, int]
"""(stage, "F" / "I" / "W" / "B", micro-batch)."""


def idle_share(orders: Mapping[int, Sequence[Action | None]], stages: int) -> float:
    """(makespan - busiest rank's work) / that work, for the ranks' action lists `orders`
    (None: an empty slot, skipped) over `stages` pipeline stages."""
    idle, work = idle_time(orders, stages)
    return idle / work


def idle_time(orders: Mapping[int, Sequence[Action | None]], stages: int) -> tuple[float, float]:
    """(makespan - busiest rank's work, that work), in forwards (COST), for the ranks'
    action lists `orders` run as the module docstring says."""
    lists = [[a for a in acts if a is not None] for acts in orders.values()]
    span = 1 + max((a[2] for acts in lists for a in acts), default=0)

    def key(stage: int, kind: str, mb: int) -> int:  # an action's slot in `done`
        return (stage * 4 + _KINDS[kind]) * span + mb

    # Per action: its slot, the slot it waits for (-1: none), its cost, and the slot of the
    # input backward a full backward also is (-1: none).
    plans = [
        [
            (
                key(stage, kind, mb),
                -1 if (dep := _needs(stage, kind, mb, stages)) is None else key(*dep),
                COST[kind],
                key(stage, "I", mb) if kind == "B" else -1,
            )
            for stage, kind, mb in acts
        ]
        for acts in lists
    ]
    done = [-1.0] * (stages * 4 * span)  # finish time per action; -1: not run yet
    at = [0] * len(plans)
    clock = [0.0] * len(plans)
    left = sum(map(len, plans))
    while left:
        moved = False
        for r, plan in enumerate(plans):
            i, now = at[r], clock[r]
            while i < len(plan):
                slot, need, cost, also = plan[i]
                if need >= 0:
                    ready = done[need]
                    if ready < 0:
                        break
                    now = max(now, ready)
                now += cost
                done[slot] = now
                if also >= 0:  # a full backward is also the input backward the previous
                    done[also] = now  # stage waits for
                i += 1
            if i != at[r]:
                left -= i - at[r]
                at[r], clock[r] = i, now
                moved = True
        if not moved:
            raise ValueError("the action lists deadlock: a rank waits on an action never run")
    work = max(sum(COST[a[1]] for a in acts) for acts in lists)
    return max(clock) - work, work


_KINDS = {"F": 0, "I": 1, "W": 2, "B": 3}


def _needs(stage: int, kind: str, mb: int, stages: int) -> tuple[int, str, int] | None:
    """The action of another stage this one waits for (its own earlier actions come first
    on its rank's list)."""
    if kind == "F":
        return (stage - 1, "F", mb) if stage > 0 else None
    if kind in ("I", "B"):
        return (stage + 1, "I", mb) if stage < stages - 1 else (stage, "F", mb)
    return None  # W: after its own I, earlier on the same rank


@lru_cache(maxsize=256)
def zbv_idle_share(p: int, m: int) -> float:
    """torch's ScheduleZBVZeroBubble (2P stages in a V: rank r holds stages r and 2P - 1 - r;
    memplan.activations.pipeline.zbv_order), run by `idle_time`.

    Only min(m, 2P) micro-batches are run: past 2P the lists differ only by more rounds of
    the stable phase (F, I, W of both chunks on every rank), which add 6 forwards of work to
    every rank and no idle time, so the idle time of 2P micro-batches is that of m. Running
    all m is O(P m): 393,216 actions, seconds, for P = 32 and m = 2,048, which plan meets.
    tests/test_schedule_time.py holds the shortcut to the full run for every P <= 12 and
    m <= 8P, and a few larger."""
    run = min(m, 2 * p)
    idle, work = _zbv_idle_time(p, run)
    return idle / (work / run * m)  # every rank's work: 6 forwards per micro-batch


@lru_cache(maxsize=256)
def _zbv_idle_time(p: int, run: int) -> tuple[float, float]:
    """`idle_time` of ScheduleZBVZeroBubble's lists over `run` micro-batches (zbv_idle_share:
    every m >= 2P runs 2P, so plan's many accumulation counts share a few of these)."""
    orders = {
        r: [
            None if a is None else (r if a[0] == 0 else 2 * p - 1 - r, a[1], a[2])
            for a in zbv_order(p, r, run)
        ]
        for r in range(p)
    }
    return idle_time(orders, 2 * p)
