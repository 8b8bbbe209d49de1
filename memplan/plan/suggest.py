"""When nothing fits: what would (memplan.plan.search.plan's `suggestion`). Each hint is a
search of its own, first-fit (`_fits`), run with `suggest=False` so hints do not recurse."""

from __future__ import annotations

from collections import Counter

from memplan.config.base import MAX_DEGREE
from memplan.config.plan import PlanSpec
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.inventory import Inventory
from memplan.plan.search import plan


def _fits(spec: Spec, inventory: Inventory, p: PlanSpec, gpus: int) -> bool:
    """Whether some layout of `gpus` GPUs fits (the search stops at the first that does)."""
    try:
        result = plan(
            spec.model_copy(
                update={"plan": p.model_copy(update={"gpus": gpus, "nodes": None, "top": 1})}
            ),
            inventory,
            suggest=False,
            first=True,
        )
    except MemplanError:
        return False
    return bool(result.layouts)


SMALLEST_TRIES = 64
"""GPU counts `_suggest` tries, from its lower bound up, for the smallest that fits."""


def _smallest(spec: Spec, inventory: Inventory, p: PlanSpec, lowest: int, skip: int) -> int | None:
    """The smallest GPU count from `lowest` (a count below it cannot hold the model states)
    that fits the job as given (its global batch kept), `skip` aside; None when none of
    SMALLEST_TRIES counts does."""
    for gpus in range(lowest, min(lowest + SMALLEST_TRIES, MAX_DEGREE + 1)):
        if gpus != skip and _fits(spec, inventory, p, gpus):
            return gpus
    return None


def what_would_fit(
    spec: Spec,
    inventory: Inventory,
    p: PlanSpec,
    gpus: int,
    states_bytes: int,
    budget: int,
    pruned: Counter[str],
) -> str:
    """Why nothing fits on `gpus` GPUs, and what would: optimizer offload, recomputation, or
    the smallest GPU count that fits (`states_bytes`: one full replica's model states)."""
    if not any(reason.startswith("does not fit") for reason in pruned):
        head = (
            f"No layout of {gpus:,} GPUs can run this job: every one was pruned before its "
            "memory was worked out (the reasons: `pruned`)."
        )
    else:
        head = f"Nothing fits the budget on {gpus:,} GPUs."
    hints = []
    if not p.allow_offload and _fits(
        spec, inventory, p.model_copy(update={"allow_offload": True}), gpus
    ):
        hints.append("allow optimizer offload (plan.allow_offload: true)")
    if not p.allow_recompute and _fits(
        spec, inventory, p.model_copy(update={"allow_recompute": True}), gpus
    ):
        hints.append("allow activation recomputation (plan.allow_recompute: true)")
    # Every layout splits one replica's model states over at most all its GPUs: fewer than
    # states / budget GPUs cannot hold them (without offload, which moves them to the host).
    lowest = 1 if p.allow_offload else max(1, -(-states_bytes // budget))
    smallest = _smallest(spec, inventory, p, lowest, gpus)
    if smallest is not None:
        hints.append(
            f"use {smallest:,} GPUs, the smallest count that fits this job (its global batch "
            f"kept; every count from {lowest:,} searched, fewer cannot hold the model states)"
        )
        if smallest < gpus:
            above = _smallest(spec, inventory, p, gpus + 1, gpus)
            if above is not None:
                hints[-1] += f", or {above:,}, the nearest count above {gpus:,} that fits"
    else:
        last = lowest + SMALLEST_TRIES - 1
        hints.append(
            f"no GPU count from {lowest:,} (fewer cannot hold the model states) to {last:,} "
            "fits: a larger GPU, optimizer offload, or another global batch"
        )
    return f"{head} To fit: " + "; or ".join(hints) + "."
