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
    done: dict[tuple[int, str, int], float] = {}
    lists = {r: [a for a in acts if a is not None] for r, acts in orders.items()}
    at = dict.fromkeys(lists, 0)
    clock = dict.fromkeys(lists, 0.0)
    left = sum(len(v) for v in lists.values())
    while left:
        moved = False
        for r, acts in lists.items():
            while at[r] < len(acts):
                stage, kind, mb = acts[at[r]]
                need = _needs(stage, kind, mb, stages)
                if need is not None and need not in done:
                    break
                start = max(clock[r], done[need] if need is not None else 0.0)
                clock[r] = done[stage, "B" if kind == "B" else kind, mb] = start + COST[kind]
                if kind == "B":  # a full backward is also the input backward the previous
                    done[stage, "I", mb] = clock[r]  # stage waits for
                at[r] += 1
                left -= 1
                moved = True
        if not moved:
            raise ValueError("the action lists deadlock: a rank waits on an action never run")
    work = max(sum(COST[a[1]] for a in acts) for acts in lists.values())
    return (max(clock.values()) - work) / work


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
    memplan.activations.pipeline.zbv_order), run by `idle_share`."""
    orders = {
        r: [
            None if a is None else (r if a[0] == 0 else 2 * p - 1 - r, a[1], a[2])
            for a in zbv_order(p, r, m)
        ]
        for r in range(p)
    }
    return idle_share(orders, 2 * p)
