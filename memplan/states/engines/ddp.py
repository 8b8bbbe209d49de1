"""torch DDP (ZeRO-0) and DDP + ZeroRedundancyOptimizer (ZeRO-1)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import replace

from memplan.model.inventory import Inventory
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe
from memplan.states.layout import Layout
from memplan.states.terms import (
    SRC_DDP,
    SRC_ZERO_RO,
    RankStates,
    ceil_div,
    grad_dtype,
    optimizer_terms,
    optimizer_terms_by_dtype,
    own_dtype,
    trainable,
    whole,
    whole_by_dtype,
)


def replicated(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """Plain DDP (ZeRO stage 0): every rank holds everything; frozen parameters have no
    gradient (the reducer buckets only `requires_grad` parameters:
    distributed.py::DistributedDataParallel._build_params_for_reducer). Source: SRC_DDP."""
    params = inventory.parameters
    train = trainable(params)
    terms = [
        *whole_by_dtype("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        *whole_by_dtype("gradients", "gradients", grad_dtype(recipe), train, SRC_DDP),
    ]
    device, host = optimizer_terms_by_dtype(
        train,
        [p.shape for p in train],
        opt=opt,
        recipe=recipe,
        layout=layout,
        view="tensors",
        source=SRC_DDP,
    )
    return [RankStates(ranks=tuple(range(world)), terms=(*terms, *device), host_terms=tuple(host))]


def zero_redundancy_partition(numels: Sequence[int], world: int) -> list[list[int]]:
    """Indices of the tensors each rank's ZeroRedundancyOptimizer owns.

    torch/distributed/optim/zero_redundancy_optimizer.py::_partition_parameters (2.13): the
    group's tensors sorted by numel, largest first (a stable sort), each given to the rank
    with the smallest total so far (`_get_min_index`: the lowest such rank).
    """
    order = sorted(range(len(numels)), key=lambda i: numels[i], reverse=True)
    heap = [(0, rank) for rank in range(world)]
    owned: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        size, rank = heapq.heappop(heap)
        owned[rank].append(i)
        heapq.heappush(heap, (size + numels[i], rank))
    return owned


def zero_redundancy(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """DDP + ZeroRedundancyOptimizer (ZeRO-1): full parameters and gradients, whole-tensor
    optimizer states on the owning rank only; the optimizer is given the trainable
    parameters, so only they are partitioned. Source: SRC_ZERO_RO."""
    params = inventory.parameters
    train = trainable(params)
    common = [
        *whole_by_dtype("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        *whole_by_dtype("gradients", "gradients", grad_dtype(recipe), train, SRC_DDP),
    ]
    if recipe.master_weights:
        # ZeroRedundancyOptimizer partitions optimizer *state* only: the tensors it updates
        # (here the fp32 masters of a *-mixed recipe) are broadcast back to every rank after
        # each step (`_sync_params`), so every rank keeps all of them. Measured by
        # `memplan verify` on 2 and 4 gloo ranks.
        common.append(
            whole(
                "optimizer_states",
                "master_weights",
                recipe.master_weights,
                [p for p in train if own_dtype(p, recipe) is None],
                SRC_ZERO_RO + "::_sync_params: updated tensors are broadcast",
            )
        )
        recipe = replace(recipe, master_weights=None)
    if inventory.is_bare_count:
        # A bare parameter count is one stand-in tensor: whole-tensor assignment would put it
        # all on rank 0, so split it evenly (the ZeRO paper's Psi / N_d) instead.
        share = ceil_div(inventory.num_parameters, world)
        device, host = optimizer_terms(
            [(share,)],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view="even share of the count",
            source=SRC_ZERO_RO,
        )
        ranks = tuple(range(world))
        return [RankStates(ranks=ranks, terms=(*common, *device), host_terms=tuple(host))]
    owned = zero_redundancy_partition([p.numel for p in train], world)
    out = []
    for rank, indices in enumerate(owned):
        device, host = optimizer_terms_by_dtype(
            [train[i] for i in indices],
            [train[i].shape for i in indices],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view="owned tensors (largest first to the least-loaded rank)",
            source=SRC_ZERO_RO,
        )
        out.append(RankStates(ranks=(rank,), terms=(*common, *device), host_terms=tuple(host)))
    return out
