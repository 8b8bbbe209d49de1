"""torch FSDP2 `fully_shard` (ZeRO-3, or ZeRO-2-like with reshard_after_forward=False)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.fsdp2.uniform import check_uniform_dtype
from memplan.states.layout import Layout
from memplan.states.terms import (
    SRC_FSDP2,
    Category,
    RankStates,
    Term,
    ceil_div,
    fmt,
    optimizer_terms_by_dtype_counted,
    own_dtype_of,
    relabel_shapes,
    term,
)


def fsdp2_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank`: torch.chunk's split, `ceil(dim0 / world)` rows per
    chunk, so trailing ranks may hold fewer or none. Source: SRC_FSDP2 (`torch.chunk`)."""
    chunk = ceil_div(dim0, world)
    return max(0, min(chunk, dim0 - rank * chunk))


# torchtitan 0.3.0 torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder: the routed experts
# of a MoE block are placed Shard(1) (their hidden dim, not the expert dim) when the ranks they
# are sharded over times EP exceed the expert count (`efsdp_ep_size > num_experts`, efsdp x EP
# under expert parallelism, the fsdp mesh without), "to avoid padding"; torch 2.13
# _fsdp_param.py::FSDPParam._init_sharded_param then requires an even split of that dim
# (NotImplementedError "FSDP does not support uneven sharding on dim 1") and pads nothing.
SRC_DIM1 = (
    "torchtitan 0.3.0 torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder (expert_shard_"
    "placement Shard(1) when efsdp x EP > num_experts); torch 2.13 _fsdp_param.py::"
    "FSDPParam._init_sharded_param (even dim-1 shards only)"
)


def dim1_experts(p: TensorSpec, world: int, wrap: str) -> bool:
    """Whether FSDP2 shards `p` on dim 1 (SRC_DIM1): torchtitan's wrapping, a routed-expert
    tensor [local experts, *, *] over more ranks than it has experts (local experts x EP =
    the expert count, `world` x EP = efsdp x EP)."""
    return wrap == "torchtitan" and p.role == "experts" and len(p.shape) == 3 and world > p.shape[0]


def _dim1_rows(p: TensorSpec, world: int) -> int:
    """Dim 1 of torchtitan's own expert weight behind `p`, checked to split evenly over
    `world`: w1_EFD / w3_EFD [E, F, D] are transformers' fused gate_up_proj [E, 2F, D] halves,
    w2_EDF [E, D, F] its down_proj (models/common/moe.py::GroupedExperts)."""
    rows = p.shape[1] // 2 if p.name.endswith("gate_up_proj") else p.shape[1]
    if rows % world:
        raise MemplanError(
            f"torchtitan shards each routed expert weight on dim 1 over the {world} ranks that "
            f"shard the experts (more ranks than the layer's {p.shape[0]} local experts), and "
            f"torch FSDP2 refuses an uneven dim-1 split: {p.name} has {rows} rows there "
            f"({SRC_DIM1}). Use a data (or expert) degree whose expert-sharding ranks divide "
            f"{rows}.",
            field="parallelism.data",
        )
    return rows


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
    check_uniform_dtype(inventory, held=at_rest, wrap=layout.fsdp_groups, experts=layout.expert > 1)
    grad_dtype = recipe.gradient_accumulation or at_rest
    # What every rank's shards depend on, per tensor, counted once per inventory (plan shards
    # the same stage inventories over many data degrees and ZeRO stages).
    counted = _counted(inventory)
    wrap = layout.fsdp_groups
    dim1 = (
        {shape: p for shape, p in counted.experts_3d.items() if world > shape[0]}
        if wrap == "torchtitan"
        else {}
    )  # dim1_experts of each tensor: the last tensor of each shape, in first-seen order
    for p in dim1.values():
        _dim1_rows(p, world)
    # Frozen parameters are sharded like the others (fully_shard shards every parameter of
    # the module); only parameters with a gradient enter the reduce-scatter
    # (_fsdp_param_group.py::FSDPParamGroup.post_backward: `fsdp_params_with_grad`), which
    # leaves out those the loss never reaches (TensorSpec.gradient) too.
    common = [
        *_padded_counted("parameters", "parameters", at_rest, counted.parameters, world, wrap),
        *_padded_counted("gradients", "gradients", grad_dtype, counted.trainable, world, wrap),
    ]
    fsdp_recipe = _without_master(recipe, at_rest)

    # Ranks between two consecutive "breakpoints" (where some tensor's shard changes size)
    # see identical shards, so each class is computed once.
    breaks = {0, world}
    for shape in counted.shapes:
        if shape in dim1:
            continue  # an even dim-1 split: every rank the same
        if shape and shape[0]:  # a tensor with no rows gives every rank nothing
            chunk = ceil_div(shape[0], world)
            full = shape[0] // chunk
            breaks.update(r for r in (full, full + 1) if 0 < r < world)
    edges = sorted(breaks)
    # A tensor's local shape follows from its shape alone, so each rank class relabels the
    # counts of (held dtype, shape): the same groups and order as optimizer_terms_by_dtype of
    # every trainable tensor's local shape (DeepSeek-V3's 909 tensors have 16 shapes).
    counts: dict[str | None, dict[tuple[int, ...], int]] = {}
    for (dtype, shape, _), k in counted.trainable.items():
        group = counts.setdefault(own_dtype_of(dtype, fsdp_recipe), {})
        group[shape] = group.get(shape, 0) + k
    distinct = {shape for _, shape, _ in counted.trainable}
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        local: dict[tuple[int, ...], tuple[int, ...]] = {}
        for shape in distinct:
            if shape in dim1:
                local[shape] = (shape[0], shape[1] // world, *shape[2:])
                continue
            local[shape] = (fsdp2_rows(shape[0], world, lo), *shape[1:]) if shape else shape
        device, host = optimizer_terms_by_dtype_counted(
            {fixed: relabel_shapes(group, local) for fixed, group in counts.items()},
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


def padded_elements(tensors: Iterable[TensorSpec], world: int, wrap: str = "layers") -> int:
    """Elements of one rank's padded dim-0 shards of `tensors`: ceil(dim0 / world) rows each,
    whatever the rank, 0-dim tensors whole (SRC_FSDP2: `padded_sharded_param_size`, the
    storage a sharded parameter and its gradient live in); under torchtitan's wrapping
    (`wrap`), routed experts over more ranks than experts an even dim-1 share (SRC_DIM1). The
    all-gather output and the unsharded parameters are world x this
    (memplan.states.engines.fsdp2.step)."""
    total = 0
    titan = wrap == "torchtitan"
    for p in tensors:
        shape = p.shape
        if not shape:
            total += p.numel
        elif titan and p.role == "experts" and len(shape) == 3 and world > shape[0]:
            total += p.numel // world  # dim1_experts, inlined: plan calls this per layout
        elif shape[0]:
            total += -(-shape[0] // world) * (p.numel // shape[0])
    return total


@dataclass(frozen=True, slots=True, eq=False)
class _Counts:
    """An inventory's parameters as FSDP2's rule reads them, counted (read-only dicts)."""

    parameters: dict[tuple[str | None, tuple[int, ...], bool], int]
    """(fixed dtype or None, shape, a 3-D routed-expert tensor) -> how many parameters, in
    the order each key first appears."""
    trainable: dict[tuple[str | None, tuple[int, ...], bool], int]
    """The same over the trainable parameters the loss gives a gradient (`TensorSpec.gradient`:
    FSDP2 shards each parameter on its own, so one the loss never reaches keeps its sharded
    `.grad` None and gets no optimizer state, terms.SRC_NO_GRADIENT)."""
    experts_3d: dict[tuple[int, ...], TensorSpec]
    """The last 3-D routed-expert tensor of each shape (shapes in first-seen order): those
    `dim1_experts` may shard on dim 1."""
    shapes: tuple[tuple[int, ...], ...]
    """Every parameter shape, once."""


@lru_cache(maxsize=1024)
def _counted(inventory: Inventory) -> _Counts:
    """`inventory`'s `_Counts` (cached per inventory, hashed by identity: stage_inventories
    and split_experts give plan's layouts the same objects)."""
    params: dict[tuple[str | None, tuple[int, ...], bool], int] = {}
    train: dict[tuple[str | None, tuple[int, ...], bool], int] = {}
    experts_3d: dict[tuple[int, ...], TensorSpec] = {}
    for p in inventory.parameters:
        expert_3d = p.role == "experts" and len(p.shape) == 3
        key = (p.dtype, p.shape, expert_3d)
        params[key] = params.get(key, 0) + 1
        if p.trainable and p.gradient:  # sharded grad None: terms.SRC_NO_GRADIENT
            train[key] = train.get(key, 0) + 1
        if expert_3d:
            experts_3d[p.shape] = p
    shapes = tuple(dict.fromkeys(shape for _, shape, _ in params))
    return _Counts(parameters=params, trainable=train, experts_3d=experts_3d, shapes=shapes)


def _padded_one(shape: tuple[int, ...], expert_3d: bool, world: int, titan: bool) -> int:
    """`padded_elements` of one tensor of `shape` (`expert_3d`: a 3-D routed-expert tensor;
    `titan`: torchtitan's wrapping)."""
    numel = math.prod(shape)
    if not shape:
        return numel
    if titan and expert_3d and world > shape[0]:
        return numel // world
    return ceil_div(shape[0], world) * (numel // shape[0]) if shape[0] else 0


def _padded_counted(
    category: Category,
    name: str,
    default: str,
    counts: dict[tuple[str | None, tuple[int, ...], bool], int],
    world: int,
    wrap: str,
) -> list[Term]:
    """One padded-shard row per held dtype (one row when every tensor follows the recipe; a
    tensor held in a fixed dtype has its gradient in that dtype too): by_dtype of the
    tensors `counts` counts, each group's `padded_elements`."""
    titan = wrap == "torchtitan"
    groups: dict[str, list[int]] = {}
    for (dtype, shape, expert_3d), k in counts.items():
        group = groups.setdefault(dtype or default, [0, 0])
        group[0] += k
        group[1] += k * _padded_one(shape, expert_3d, world, titan)
    out = []
    for dtype, (tensors, elems) in (groups or {default: [0, 0]}).items():
        out.append(
            term(
                category,
                name,
                dtype,
                tensors,
                elems,
                f"{tensors} tensors, sum of ceil(dim0 / {world}) rows = {fmt(elems)} "
                f"elements (padded to the largest chunk) x {dtype_bytes(dtype)} B ({dtype})",
                SRC_FSDP2,
            )
        )
    return out


def _without_master(recipe: Recipe, at_rest: str) -> Recipe:
    """FSDP2 has no separate master copy: the optimizer updates the at-rest shard."""
    return replace(recipe, master_weights=None, optimizer_states=at_rest)
