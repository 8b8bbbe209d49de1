"""torch DDP (ZeRO-0) and DDP + ZeroRedundancyOptimizer (ZeRO-1): who holds which model
states, and what the step adds (DDP's gradient buckets, torch.optim's temporaries)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import replace

from memplan.memory import ALWAYS, Transient
from memplan.model.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states import optimizer_step
from memplan.states.engines import dtensor_tp
from memplan.states.engines.base import EngineStep, StepActivations, StepCache, StepStates
from memplan.states.layout import Layout
from memplan.states.terms import (
    SRC_DDP,
    SRC_ZERO_RO,
    RankStates,
    ceil_div,
    grad_dtype,
    graded,
    held_optimizer_terms,
    optimizer_terms,
    own_dtype,
    whole,
    whole_by_dtype,
)


def replicated(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """Plain DDP (ZeRO stage 0): every rank holds everything; frozen parameters have no
    gradient (the reducer buckets only `requires_grad` parameters:
    distributed.py::DistributedDataParallel._build_params_for_reducer); a trainable parameter
    the optimizer does not hold has a gradient and no state (terms.stepped); one the loss never
    reaches has neither, bar its master copy (terms.graded, terms.held_optimizer_terms).
    Source: SRC_DDP."""
    params = inventory.parameters
    terms = [
        *whole_by_dtype("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        *whole_by_dtype("gradients", "gradients", grad_dtype(recipe), graded(params), SRC_DDP),
    ]
    held = _held(params)
    device, host = held_optimizer_terms(
        held,
        [p.shape for p in held],
        opt=opt,
        recipe=recipe,
        layout=layout,
        view="tensors",
        source=SRC_DDP,
    )
    return [RankStates(ranks=tuple(range(world)), terms=(*terms, *device), host_terms=tuple(host))]


def _held(params: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The parameters in the optimizer's param_groups: trainable and `stepped` (with a gradient
    or not: terms.stepped leaves out those without)."""
    return [p for p in params if p.trainable and p.stepped]


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
    parameters it holds (terms.stepped), so only they are partitioned, whether the loss gives
    them a gradient or not (`_partition_parameters` sorts every parameter of the param_groups);
    those it does not get no state (terms.held_optimizer_terms). Source: SRC_ZERO_RO."""
    params = inventory.parameters
    updated = _held(params)
    common = [
        *whole_by_dtype("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        *whole_by_dtype("gradients", "gradients", grad_dtype(recipe), graded(params), SRC_DDP),
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
                [p for p in updated if own_dtype(p, recipe) is None],
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
    owned = zero_redundancy_partition([p.numel for p in updated], world)
    out = []
    for rank, indices in enumerate(owned):
        device, host = held_optimizer_terms(
            [updated[i] for i in indices],
            [updated[i].shape for i in indices],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view="owned tensors (largest first to the least-loaded rank)",
            source=SRC_ZERO_RO,
        )
        out.append(RankStates(ranks=(rank,), terms=(*common, *device), host_terms=tuple(host)))
    return out


# torch DDP: bucket_cap_mb=25 (torch/nn/parallel/distributed.py::DistributedDataParallel).
DDP_BUCKET_CAP_MB = 25


def ddp_buckets(grad_bytes: int, *, as_bucket_view: bool) -> Transient | None:
    """torch DDP copies every gradient into flat allreduce buckets allocated once, at
    construction, for all parameters (bucket_cap_mb, default 25 MiB, sets their number, not
    their total): a second gradient-sized buffer, alive for the whole run. Source:
    torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets and the
    DistributedDataParallel docstring (`gradient_as_bucket_view=True` "can reduce peak memory
    usage, where the saved memory size will be equal to the total gradients size")."""
    if as_bucket_view or grad_bytes == 0:
        return None
    return Transient(
        name="ddp_gradient_buckets",
        bytes=grad_bytes,
        phases=ALWAYS,
        formula=f"{grad_bytes:,} B: one copy of every gradient ({DDP_BUCKET_CAP_MB} MiB buckets)",
        source="torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets",
    )


def _state_transients(states: StepStates, cache: StepCache) -> list[Transient]:
    """DDP's buckets (one process trains without a DDP wrapper), then the torch.optim step's
    temporaries and master gradients (memplan.states.optimizer_step)."""
    layout = states.layout
    out = []
    if layout.data > 1:
        # The buckets cover every parameter that requires grad, those the loss never reaches
        # too (reducer.cpp::Reducer::initialize_buckets; terms.SRC_NO_GRADIENT).
        unreached = sum(
            t.numel * dtype_bytes(t.dtype or grad_dtype(states.recipe))
            for t in states.inventory.parameters
            if t.trainable and not t.gradient
        )
        out.append(
            ddp_buckets(
                states.per_gpu.bytes_of("gradients") + unreached,
                as_bucket_view=layout.gradient_as_bucket_view,
            )
        )
    out.append(optimizer_step.step_temporaries(states, cache, shards=1))
    out.append(optimizer_step.rank_master_gradients(states))
    return [t for t in out if t is not None]


def _loss_transients(states: StepStates, acts: StepActivations) -> list[Transient]:
    """Under DTensor TP: loss_parallel's third tensor, and the master gradient of the whole
    embedding when the optimizer steps master weights (memplan.states.engines.dtensor_tp)."""
    if states.layout.tensor <= 1:
        return []
    out: list[Transient] = []
    if states.layout.vocab_parallel_loss:
        out += [
            dtensor_tp.loss_parallel_log_softmax(acts.loss_fp32),
            dtensor_tp.loss_parallel_gradient(acts.loss_fp32),
        ]
    master = states.recipe.master_weights
    extra = sum(
        t.elements for t in states.per_gpu.terms if t.name == dtensor_tp.WHOLE_EMBEDDING_GRADIENT
    )
    if optimizer_step.steps_masters(states) and extra and master is not None:
        out.append(dtensor_tp.whole_embedding_master_gradient(extra, dtype_bytes(master)))
    return out


STEP = EngineStep(
    states=_state_transients,
    loss=_loss_transients,
    storage_shards=lambda layout: 1,
)
