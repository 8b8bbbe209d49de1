"""torch FSDP1 (`FullyShardedDataParallel`): one FlatParameter per wrapped unit, as accelerate
wraps a transformers model (and Lightning's FSDPStrategy a LitGPT one).

Read from torch 2.13 torch/distributed/fsdp/_flat_param.py. Abbreviations in comments:
INIT = FlatParamHandle._init_flat_param_and_metadata, ALIGN = _get_aligned_numel,
SHARD = FlatParamHandle.shard / _get_shard, VIEWS = FlatParamHandle._use_sharded_views and
_use_sharded_grad_views. The wrapping is accelerate 1.16's for `fsdp_version: 1`
(utils/dataclasses.py::FullyShardedDataParallelPlugin.set_auto_wrap_policy:
TRANSFORMER_BASED_WRAP over the model's `_no_split_modules`, the decoder layer class) with
transformers 5.25's Trainer defaults (training_args.py::_fsdp_plugin_args: use_orig_params
true). Proved on gloo ranks by tests/test_fsdp1.py (benchmarks/results/fsdp1.json).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.layout import Layout
from memplan.states.terms import RankStates, Term, fmt, optimizer_terms_counted, term

SRC_FLAT = "torch/distributed/fsdp/_flat_param.py::FlatParamHandle._init_flat_param_and_metadata"
SRC_FSDP1 = f"{SRC_FLAT}, ::shard, ::_use_sharded_views (2.13)"
SRC_WRAP = (
    "accelerate 1.16 utils/dataclasses.py::FullyShardedDataParallelPlugin.set_auto_wrap_policy "
    "(TRANSFORMER_BASED_WRAP of `_no_split_modules`); transformers 5.25 training_args.py::"
    "_fsdp_plugin_args (use_orig_params true)"
)

# ALIGN: "This alignment constraint comes from TorchInductor": every original parameter of a
# FlatParameter starts at a multiple of 16 bytes of the unsharded (compute) dtype; INIT pads
# only with use_orig_params=True (`align_addresses = use_orig_params`).
ALIGNMENT_BYTES = 16

# The ZeRO stage each sharding strategy is (torch/distributed/fsdp/api.py::ShardingStrategy:
# FULL_SHARD "maps to ZeRO-3", SHARD_GRAD_OP "maps to ZeRO-2", NO_SHARD "maps to DDP").
STRATEGY = {3: "FULL_SHARD", 2: "SHARD_GRAD_OP", 0: "NO_SHARD"}


@dataclass(frozen=True, slots=True)
class FlatUnit:
    """One FlatParameter: the original parameters it flattens, with their places in it."""

    name: str
    """"root", or "layer N" (a decoder layer's own unit)."""
    numels: tuple[int, ...]
    """Each original parameter's elements, in the module's named_parameters order."""
    offsets: tuple[int, ...]
    """Where each one starts in the unsharded flat parameter (after alignment padding)."""
    padded: int
    """The unsharded flat parameter's elements: the parameters, the alignment padding before
    each one, and the padding to a multiple of the world size (INIT)."""
    shard: int
    """Each rank's sharded flat parameter (SHARD: padded / world, every rank the same; the
    whole of it under NO_SHARD)."""

    def local(self, rank: int) -> tuple[int, ...]:
        """Elements of each original parameter in `rank`'s shard: the view the optimizer sees
        (VIEWS; 0 for a parameter outside the shard, which then has no `.grad` and no
        optimizer state)."""
        lo, hi = rank * self.shard, (rank + 1) * self.shard
        return tuple(
            max(0, min(hi, off + n) - max(lo, off))
            for off, n in zip(self.offsets, self.numels, strict=True)
        )


def aligned_numel(compute_dtype: str) -> int:
    """ALIGN: 16 bytes in elements of the dtype the flat parameter is unsharded in
    (MixedPrecision.param_dtype, else the parameters' own)."""
    return ALIGNMENT_BYTES // dtype_bytes(compute_dtype)


def flat_unit(
    name: str, numels: tuple[int, ...], *, align: int, world: int, shard: bool
) -> FlatUnit:
    """INIT: before each parameter, padding to a multiple of `align` elements; at the end,
    padding to a multiple of `world` (both only with use_orig_params, `align` > 0); SHARD:
    torch.chunk of the padded flat parameter, one equal chunk per rank."""
    total = 0
    offsets = []
    for n in numels:
        if align > 0:
            total += -total % align
        offsets.append(total)
        total += n
    if align > 0:
        total += -total % world
    return FlatUnit(
        name=name,
        numels=numels,
        offsets=tuple(offsets),
        padded=total,
        shard=-(-total // world) if shard else total,
    )


def units_of(inventory: Inventory) -> tuple[tuple[str, tuple[TensorSpec, ...]], ...]:
    """The wrapped units: each decoder layer's parameters (transformer_auto_wrap_policy of the
    layer class), then the root holding every other parameter (the embeddings, the final norm,
    the head), each in the inventory's order (named_parameters: INIT walks named_modules()
    and each module's own parameters, the same order). Tied weights are listed once (INIT
    skips a shared parameter)."""
    layers: dict[int, list[TensorSpec]] = {}
    root: list[TensorSpec] = []
    for p in inventory.parameters:
        (root if p.layer is None else layers.setdefault(p.layer, [])).append(p)
    out = [("root", tuple(root))] if root else []
    out += [(f"layer {i}", tuple(ps)) for i, ps in sorted(layers.items())]
    return tuple(out)


@lru_cache(maxsize=256)
def flat_units(
    inventory: Inventory, compute_dtype: str, world: int, stage: int
) -> tuple[FlatUnit, ...]:
    """The FlatParameters of `inventory` over `world` ranks (cached per inventory)."""
    align = aligned_numel(compute_dtype)
    return tuple(
        flat_unit(name, tuple(p.numel for p in ps), align=align, world=world, shard=stage != 0)
        for name, ps in units_of(inventory)
    )


def check_supported(inventory: Inventory) -> None:
    """FSDP1 flattens one dtype per unit (INIT `_validate_tensors_to_flatten`: "Must flatten
    tensors with uniform dtype"); memplan models full training only."""
    odd = [p.name for p in inventory.parameters if p.dtype is not None or not p.trainable]
    if odd:
        raise MemplanError(
            f"engine fsdp1 is modelled for full training of a model held in one dtype; "
            f"{odd[0]} is frozen or held in its own dtype ({len(odd)} such tensors). Use "
            "engine: fsdp2 for fine-tuning (torch's fully_shard shards each tensor), or "
            "finetune.method: full.",
            field="parallelism.engine",
        )


def compute_dtype(recipe: Recipe) -> str:
    """The dtype the flat parameter is unsharded in: MixedPrecision.param_dtype (the recipe's
    parameter dtype under a *-mixed recipe, accelerate's `set_mixed_precision`), else the
    parameters' own."""
    return recipe.parameters


def fsdp1(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """torch FSDP1 with use_orig_params=True: each rank holds its shard of every unit's flat
    parameter and its gradient (both in the at-rest dtype: the fp32 master under a *-mixed
    recipe, MixedPrecision casting to param_dtype only while unsharded, and the reduced
    gradient cast back, _runtime_utils.py::_cast_grad_to_param_dtype); torch.optim sees the
    original parameters as 1-D views of the shard (VIEWS), so each rank keeps per-element
    states over its unpadded pieces and one `step` per parameter with a piece.

    A parameter the loss never reaches (TensorSpec.gradient False) is counted like the others:
    its slice of the flat gradient is there, and after the backward FSDP1 marks every original
    parameter that requires grad as having one (torch 2.13 fsdp/_flat_param.py::
    FlatParamHandle._reset_is_grad_none: "if a parameter requires gradient, then it will
    surely receive a gradient"), so `_use_sharded_grad_views` gives it a `.grad` view and
    torch.optim a state."""
    check_supported(inventory)
    at_rest = recipe.master_weights or recipe.parameters
    units = flat_units(inventory, compute_dtype(recipe), world, layout.stage)
    shard = sum(u.shard for u in units)
    strategy = STRATEGY.get(layout.stage, "FULL_SHARD")
    how = (
        f"{len(units)} flat parameters ({strategy}), sum of padded / {world}"
        if layout.stage
        else f"{len(units)} flat parameters (NO_SHARD), padded whole"
    )
    common = [
        _row("parameters", at_rest, len(units), shard, how),
        _row("gradients", at_rest, len(units), shard, how),
    ]
    fsdp_recipe = replace(recipe, master_weights=None, optimizer_states=at_rest)
    # Consecutive ranks whose pieces are the same multiset share one class (each rank's own
    # shard decides its optimizer's tensors; NO_SHARD: every rank the whole).
    classes: list[tuple[tuple[tuple[tuple[int, ...], int], ...], list[int]]] = []
    for rank in range(world):
        if not layout.stage and classes:
            classes[-1][1].append(rank)
            continue
        pieces: Counter[tuple[int, ...]] = Counter((n,) for u in units for n in u.local(rank) if n)
        key = tuple(sorted(pieces.items()))
        if classes and classes[-1][0] == key:
            classes[-1][1].append(rank)
        else:
            classes.append((key, [rank]))
    out = []
    for shapes, ranks in classes:
        device, host = optimizer_terms_counted(
            dict(shapes),
            opt=opt,
            recipe=fsdp_recipe,
            layout=layout,
            view="1-D views of the shard (use_orig_params)",
            source=f"{SRC_FSDP1}; {SRC_WRAP}",
        )
        out.append(RankStates(ranks=tuple(ranks), terms=(*common, *device), host_terms=tuple(host)))
    return out


def _row(category: str, dtype: str, units: int, elements: int, how: str) -> Term:
    return term(
        category,  # type: ignore[arg-type]
        category,
        dtype,
        units,
        elements,
        f"{how} = {fmt(elements)} elements x {dtype_bytes(dtype)} B ({dtype})",
        f"{SRC_FSDP1}; {SRC_WRAP}",
    )


def local_sizes(inventory: Inventory, units: tuple[FlatUnit, ...], rank: int) -> tuple[int, ...]:
    """Each parameter's piece in `rank`'s shard, in the inventory's (model.parameters())
    order, the pieces of 0 elements left out: the tensors torch.optim steps there (VIEWS)."""
    local: dict[str, int] = {}
    for (_, params), unit in zip(units_of(inventory), units, strict=True):
        for p, n in zip(params, unit.local(rank), strict=True):
            local[p.name] = n
    return tuple(local[p.name] for p in inventory.parameters if local[p.name])
