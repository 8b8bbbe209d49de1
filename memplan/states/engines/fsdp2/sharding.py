"""torch FSDP2 `fully_shard` (ZeRO-3, or ZeRO-2-like with reshard_after_forward=False)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from memplan.model.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.layout import Layout
from memplan.states.terms import (
    SRC_FSDP2,
    Category,
    RankStates,
    Term,
    by_dtype,
    ceil_div,
    fmt,
    optimizer_terms_by_dtype,
    term,
    trainable,
)


def fsdp2_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank`: torch.chunk's split, `ceil(dim0 / world)` rows per
    chunk, so trailing ranks may hold fewer or none. Source: SRC_FSDP2 (`torch.chunk`)."""
    chunk = ceil_div(dim0, world)
    return max(0, min(chunk, dim0 - rank * chunk))


def fsdp2(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """torch FSDP2 `fully_shard`: each tensor split on dim 0 like torch.chunk.

    The sharded parameter and its gradient live in a storage padded to the largest chunk on
    every rank (`padded_sharded_param_size`); the optimizer sees the unpadded local shard, so
    its states are not padded. Sharded parameters are kept in their original dtype, the
    fp32 master under a *-mixed recipe (MixedPrecisionPolicy.param_dtype makes the 16-bit
    copy only while unsharded), and the reduced gradient is cast back to it
    (`_fsdp_collectives.py::foreach_reduce`). Source: SRC_FSDP2.
    """
    at_rest = recipe.master_weights or recipe.parameters
    grad_dtype = recipe.gradient_accumulation or at_rest
    params = inventory.parameters
    train = trainable(params)
    # Frozen parameters are sharded like the others (fully_shard shards every parameter of
    # the module); only parameters with a gradient enter the reduce-scatter
    # (_fsdp_param_group.py::FSDPParamGroup.post_backward: `fsdp_params_with_grad`).
    common = [
        *_padded_terms("parameters", "parameters", at_rest, params, world),
        *_padded_terms("gradients", "gradients", grad_dtype, train, world),
    ]
    fsdp_recipe = _without_master(recipe, at_rest)

    # Ranks between two consecutive "breakpoints" (where some tensor's shard changes size)
    # see identical shards, so each class is computed once.
    breaks = {0, world}
    for p in params:
        if p.shape and p.shape[0]:  # a tensor with no rows gives every rank nothing
            chunk = ceil_div(p.shape[0], world)
            full = p.shape[0] // chunk
            breaks.update(r for r in (full, full + 1) if 0 < r < world)
    edges = sorted(breaks)
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        local: dict[tuple[int, ...], tuple[int, ...]] = {}  # layers repeat their shapes
        for shape in {p.shape for p in train}:
            local[shape] = (fsdp2_rows(shape[0], world, lo), *shape[1:]) if shape else shape
        shapes = [local[p.shape] for p in train]
        device, host = optimizer_terms_by_dtype(
            train,
            shapes,
            opt=opt,
            recipe=fsdp_recipe,
            layout=layout,
            view="local shards (unpadded)",
            source=SRC_FSDP2,
        )
        out.append(
            RankStates(ranks=tuple(range(lo, hi)), terms=(*common, *device), host_terms=tuple(host))
        )
    return out


def padded_elements(tensors: Iterable[TensorSpec], world: int) -> int:
    """Elements of one rank's padded dim-0 shards of `tensors`: ceil(dim0 / world) rows each,
    whatever the rank, 0-dim tensors whole (SRC_FSDP2: `padded_sharded_param_size`, the
    storage a sharded parameter and its gradient live in). The all-gather output and the
    unsharded parameters are world x this (memplan.states.engines.fsdp2.step)."""
    total = 0
    for p in tensors:
        row = p.numel // p.shape[0] if p.shape and p.shape[0] else 0
        total += ceil_div(p.shape[0], world) * row if p.shape else p.numel
    return total


def _padded_terms(
    category: Category,
    name: str,
    default: str,
    tensors: Sequence[TensorSpec],
    world: int,
) -> list[Term]:
    """One padded-shard row per held dtype (one row when every tensor follows the recipe; a
    tensor held in a fixed dtype has its gradient in that dtype too)."""
    groups = by_dtype(tensors, default) or {default: []}
    out = []
    for dtype, group in groups.items():
        elems = padded_elements(group, world)
        out.append(
            term(
                category,
                name,
                dtype,
                len(group),
                elems,
                f"{len(group)} tensors, sum of ceil(dim0 / {world}) rows = {fmt(elems)} "
                f"elements (padded to the largest chunk) x {dtype_bytes(dtype)} B ({dtype})",
                SRC_FSDP2,
            )
        )
    return out


def _without_master(recipe: Recipe, at_rest: str) -> Recipe:
    """FSDP2 has no separate master copy: the optimizer updates the at-rest shard."""
    return replace(recipe, master_weights=None, optimizer_states=at_rest)
