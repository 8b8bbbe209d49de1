"""What every engine rule shares: the rows of one rank's model states, and optimizer states
summed over the tensors a rank's optimizer updates."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, cast

from memplan.model.inventory import Inventory, TensorSpec
from memplan.optimizers import (
    PAGED_SUFFIX,
    OptimizerConfig,
    is_paged_state,
    shared_state_tensors,
    state_tensors,
)
from memplan.precision import Recipe, dtype_bytes
from memplan.states.layout import Layout

Category = Literal["parameters", "gradients", "optimizer_states", "buffers"]

SRC_ZERO_PAPER = "Rajbhandari et al. 2020, ZeRO (arXiv 1910.02054), sec. 5.1, Fig. 1"
SRC_DDP = "torch/nn/parallel/distributed.py (2.13): every rank holds a full replica"
SRC_ZERO_RO = "torch/distributed/optim/zero_redundancy_optimizer.py::_partition_parameters (2.13)"
SRC_FSDP2 = (
    "torch/distributed/fsdp/_fully_shard/_fsdp_param.py::FSDPParam._init_sharded_param (2.13)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Term:
    """One row of one rank's model states: a category, or one named optimizer state."""

    category: Category
    name: str
    dtype: str
    """A dtype name, or "mixed" when the row sums tensors of several dtypes."""
    tensors: int
    elements: int
    bytes: int
    formula: str
    """The arithmetic with this rank's values substituted."""
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStates:
    """The model states held by each of `ranks` (they hold the same bytes)."""

    ranks: tuple[int, ...]
    terms: tuple[Term, ...]
    host_terms: tuple[Term, ...] = ()
    """States the engine keeps in host memory (e.g. torch's CPU `step` scalars on CUDA runs)."""
    tensor_ranks: tuple[int, ...] = ()
    """The tensor-parallel ranks that hold these states (empty: every TP rank; they differ only
    where torch's DTensor splits a vocabulary TP does not divide,
    memplan.states.parallel.vocab_rows)."""

    total_bytes: int = field(init=False, repr=False)
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", sum(t.bytes for t in self.terms))

    def __hash__(self) -> int:
        """Worked out once: a StepCache key (memplan.states.engines.base.StepStates) that plan
        looks up for every micro-batch size and recompute option of a layout."""
        if self._hash is None:
            key = (self.ranks, self.terms, self.host_terms, self.tensor_ranks)
            object.__setattr__(self, "_hash", hash(key))
        return cast(int, self._hash)

    def bytes_of(self, category: Category) -> int:
        return sum(t.bytes for t in self.terms if t.category == category)


EngineRule = Callable[[Inventory, Recipe, OptimizerConfig, Layout, int], list[RankStates]]
"""An engine's sharding rule: (the tensors, recipe, optimizer, layout, and the size of the
group it shards them over: `Layout.data_shards` for dense tensors, `Layout.expert_data` for
experts) -> every class of identical ranks of that group."""


def step_on_host(layout: Layout, opt: OptimizerConfig) -> bool:
    """Whether torch.optim keeps the `step` scalars in host memory: a CPU tensor unless
    capturable or fused (torch/optim/adam.py::_init_group, 2.13), so on a CUDA run of a torch
    optimizer (engines ddp and fsdp2) they live on the host."""
    return layout.engine in ("ddp", "fsdp2", "fsdp1") and layout.device == "cuda" and not opt.fused


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """`a` rounded up to a multiple of `multiple`."""
    return ceil_div(a, multiple) * multiple


def fmt(n: int) -> str:
    return f"{n:,}"


def term(
    category: Category,
    name: str,
    dtype: str,
    tensors: int,
    elements: int,
    formula: str,
    source: str,
) -> Term:
    return Term(
        category=category,
        name=name,
        dtype=dtype,
        tensors=tensors,
        elements=elements,
        bytes=elements * dtype_bytes(dtype),
        formula=formula,
        source=source,
    )


def whole(
    category: Category, name: str, dtype: str, tensors: Sequence[TensorSpec], source: str
) -> Term:
    elements = sum(t.numel for t in tensors)
    formula = f"{len(tensors)} tensors, {fmt(elements)} elements x {dtype_bytes(dtype)} B ({dtype})"
    return term(category, name, dtype, len(tensors), elements, formula, source)


@lru_cache(maxsize=4096)
def _states_of(
    opt: OptimizerConfig, shape: tuple[int, ...], dtype: str
) -> tuple[tuple[str, str, int], ...]:
    return tuple((s.name, s.dtype, s.numel) for s in state_tensors(opt, shape, dtype))


@lru_cache(maxsize=64)
def elementwise(opt: OptimizerConfig, dtype: str) -> bool:
    """Whether `opt`'s state for a 1-D tensor is only per-element tensors and per-tensor
    scalars (Adam, SGD, ...; not bitsandbytes' block-wise absmax or paged state): then the
    `optimizer_terms` of 1-D pieces depend only on how many pieces and their total size."""
    if opt.is_paged:
        return False
    probes = [state_tensors(opt, (n,), dtype) for n in (1000, 4099)]
    names = [[s.name for s in p] for p in probes]
    return names[0] == names[1] and all(
        s.shape in ((n,), ()) for n, p in zip((1000, 4099), probes, strict=True) for s in p
    )


def optimizer_terms(
    shapes: Iterable[tuple[int, ...]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
    step_is_int: bool = False,
) -> tuple[list[Term], list[Term]]:
    """Master weights and each named optimizer state over the tensors the optimizer updates.

    `shapes` are the local shapes this rank's optimizer sees (whole tensors, FSDP2 shards or
    flat partitions); `view` says which in the formula. `step_is_int` drops the `step` tensor
    for optimizers that count steps in a Python int (DeepSpeed FusedAdam). Returns (device
    terms, host terms).
    """
    return optimizer_terms_counted(
        Counter(shapes),  # models repeat shapes: work out each one's states once
        opt=opt,
        recipe=recipe,
        layout=layout,
        view=view,
        source=source,
        step_is_int=step_is_int,
    )


def master_term(count: int, elements: int, dtype: str, view: str) -> Term:
    """The master weights row: `count` tensors of `elements` in all, held in `dtype`."""
    return term(
        "optimizer_states",
        "master_weights",
        dtype,
        count,
        elements,
        f"{count} {view}, {fmt(elements)} elements x {dtype_bytes(dtype)} B ({dtype})",
        SRC_ZERO_PAPER + ": fp32 master copy of the 16-bit parameters",
    )


def optimizer_terms_counted(
    by_shape: Mapping[tuple[int, ...], int],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
    step_is_int: bool = False,
) -> tuple[list[Term], list[Term]]:
    """`optimizer_terms` of the tensors `by_shape` counts (local shape -> how many, in the
    order the shapes first appear: `Counter(shapes)`), for callers that count once and
    reuse the counts."""
    state_dtype = recipe.optimizer_states
    host_step = step_on_host(layout, opt)
    count = sum(by_shape.values())
    master_elems = sum(math.prod(shape) * k for shape, k in by_shape.items())
    acc: dict[tuple[str, str], list[int]] = {}
    for shape, k in by_shape.items():
        for name, dtype, numel in _states_of(opt, shape, state_dtype):
            if step_is_int and name == "step":
                continue
            if is_paged_state(opt, name, numel, device=layout.device):
                name += PAGED_SUFFIX
            slot = acc.setdefault((name, dtype), [0, 0])
            slot[0] += k
            slot[1] += numel * k
    device: list[Term] = []
    host: list[Term] = []
    if recipe.master_weights:
        device.append(master_term(count, master_elems, recipe.master_weights, view))
    for (name, dtype), (tensors, elems) in acc.items():
        what = "0-dim scalars" if name in ("step", "mu_product") else view
        paged = name.endswith(PAGED_SUFFIX)
        row = term(
            "optimizer_states",
            name,
            dtype,
            tensors,
            elems,
            f"{tensors} {what}, {fmt(elems)} elements x {dtype_bytes(dtype)} B ({dtype})"
            + ("; unified memory (cudaMallocManaged), not GPU-allocator memory" if paged else ""),
            f"{source}; state layout: memplan.optimizers.state_tensors({opt.name})"
            + ("; paging: memplan.optimizers.is_paged_state" if paged else ""),
        )
        on_host = paged or (host_step and name in ("step", "mu_product"))
        (host if on_host else device).append(row)
    # bitsandbytes makes the qmaps with the first 8-bit state (optim/optimizer.py::
    # Optimizer2State.init_state: fill_qmap for uint8 states only): none where every tensor is
    # below min_8bit_size and keeps 32-bit states (measured: benchmarks/qlora_verify.py).
    eight_bit = any(dtype == "uint8" for _, dtype in acc)
    for shared in shared_state_tensors(opt) if eight_bit else ():
        device.append(
            term(
                "optimizer_states",
                shared.name,
                shared.dtype,
                1,
                shared.numel,
                f"1 shared map, {shared.numel} elements x 4 B",
                "bitsandbytes/optim/optimizer.py::Optimizer8bit.fill_qmap",
            )
        )
    return device, host


# Fine-tuning (memplan.model.finetune.lora): a frozen parameter (`requires_grad=False`) has no
# gradient and no optimizer state on any engine, but its bytes stay. Each engine's rule for
# where the frozen bytes live is in its module. Training scripts give the optimizer the trainable
# parameters only (transformers trainer.py::Trainer.create_optimizer: `p.requires_grad`;
# torch.optim keeps no state for a parameter whose .grad stays None either way).
SRC_FROZEN = (
    "memplan.model.finetune.lora: frozen tensors (requires_grad=False) keep only their parameter"
)


def trainable(params: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The parameters that require grad: they get gradients (and, unless not `stepped`,
    optimizer states), but for those the loss never reaches (`graded`: torch autograd makes
    none; a flat gradient buffer still covers them)."""
    return tuple(p for p in params if p.trainable)


# A trainable parameter the optimizer was never given (`TensorSpec.stepped` False) keeps its
# gradient but has no optimizer state and no update: an optimizer keeps state only for the
# tensors of its param_groups (torch/optim/optimizer.py::Optimizer; bitsandbytes 0.50
# optim/optimizer.py::Optimizer8bit.step loops `self.param_groups`), and its zero_grad clears
# only theirs (torch/optim/optimizer.py::Optimizer.zero_grad, 2.13), so autograd's `.grad`
# of such a parameter stays allocated (accumulating) to the end.
SRC_NOT_STEPPED = (
    "torch 2.13 optim/optimizer.py::Optimizer.zero_grad and bitsandbytes 0.50 optim/"
    "optimizer.py::Optimizer8bit.step: state and zero_grad cover the param_groups only"
)


def stepped(params: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The parameters the optimizer updates: trainable, held by it (`TensorSpec.stepped`,
    SRC_NOT_STEPPED) and given a gradient by the loss (`TensorSpec.gradient`, SRC_NO_GRADIENT:
    torch.optim makes no state for a parameter whose `.grad` is None). Only engine ddp models a
    trainable parameter outside the optimizer (memplan.model.stacks.litgpt_qlora refuses the
    others)."""
    return tuple(p for p in params if p.trainable and p.stepped and p.gradient)


# A trainable parameter the loss never reaches (`TensorSpec.gradient` False: DeepSeek-V3.2's
# indexer, run under @torch.no_grad) keeps `.grad` None: autograd's engine only calls the
# AccumulateGrad nodes the loss's graph reaches, so none is ever allocated, and torch.optim
# (torch 2.13 optim/adam.py::Adam._init_group, which AdamW subclasses in optim/adamw.py; SGD
# and the others likewise) initialises state only `if p.grad is not None`, so it has no state
# either. Under DDP (find_unused_parameters=True, which such a model needs) the reducer leaves
# a globally unused parameter's grad untouched (torch/csrc/distributed/c10d/reducer.cpp::
# Reducer::copy_bucket_to_grad, `global_unused`), though its bucket still has the slot. Engines
# that shard per parameter (FSDP2) follow it; those whose flat buffers cover every parameter
# (FSDP1, DeepSpeed, Megatron) keep its bytes (each engine's module says so).
SRC_NO_GRADIENT = (
    "torch 2.13 optim/adam.py::Adam._init_group (state only if p.grad is not None) and "
    "reducer.cpp::Reducer::copy_bucket_to_grad (a globally unused grad left untouched)"
)


def graded(params: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The parameters that hold a gradient under torch autograd: trainable and reached from
    the loss (`TensorSpec.gradient`, SRC_NO_GRADIENT)."""
    return tuple(p for p in params if p.trainable and p.gradient)


def by_dtype(params: Iterable[TensorSpec], default: str) -> dict[str, list[TensorSpec]]:
    """Tensors grouped by the dtype they are held in: their own (a fixed dtype, e.g. QLoRA's
    uint8 packed weights or peft's fp32 adapters) or `default` (the recipe's), in order."""
    out: dict[str, list[TensorSpec]] = {}
    for p in params:
        out.setdefault(p.dtype or default, []).append(p)
    return out


def whole_by_dtype(
    category: Category, name: str, default: str, tensors: Sequence[TensorSpec], source: str
) -> list[Term]:
    """`whole` per held dtype: one row when every tensor follows the recipe (the usual case),
    one row per dtype otherwise. An empty `tensors` gives one zero row."""
    groups = by_dtype(tensors, default) or {default: []}
    return [whole(category, name, dtype, group, source) for dtype, group in groups.items()]


def own_dtype(t: TensorSpec, recipe: Recipe) -> str | None:
    """The fixed dtype a trainable tensor is held and updated in, when it differs from the
    recipe's parameter dtype (then it has no master copy); None otherwise."""
    return own_dtype_of(t.dtype, recipe)


def own_dtype_of(dtype: str | None, recipe: Recipe) -> str | None:
    """`own_dtype` of a tensor whose fixed dtype is `dtype` (None: the recipe's)."""
    return dtype if dtype and dtype != recipe.parameters else None


def optimizer_terms_by_dtype(
    tensors: Sequence[TensorSpec],
    shapes: Sequence[tuple[int, ...]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
    step_is_int: bool = False,
) -> tuple[list[Term], list[Term]]:
    """`optimizer_terms` over trainable tensors of mixed held dtypes; `shapes[i]` is the local
    shape of `tensors[i]`. Tensors held in a fixed dtype (peft's fp32 adapters in a bf16
    model) are updated in place: torch.optim keeps their states like them
    (`torch.zeros_like(p)`) and there is no master copy. Rows of the same name and dtype
    are merged."""
    groups: dict[str | None, Counter[tuple[int, ...]]] = {}
    for t, shape in zip(tensors, shapes, strict=True):
        fixed = own_dtype(t, recipe)
        groups.setdefault(fixed, Counter())[shape] += 1
    return optimizer_terms_by_dtype_counted(
        groups,
        opt=opt,
        recipe=recipe,
        layout=layout,
        view=view,
        source=source,
        step_is_int=step_is_int,
    )


def held_optimizer_terms(
    held: Sequence[TensorSpec],
    shapes: Sequence[tuple[int, ...]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
) -> tuple[list[Term], list[Term]]:
    """`optimizer_terms_by_dtype` of the tensors a torch.optim optimizer holds (`held`, with
    their local `shapes`): master weights for every one (the mixed-precision wrapper copies
    every parameter it is given: memplan/verify/build.py), the optimizer's own states only for
    those the loss gives a gradient (`TensorSpec.gradient`, SRC_NO_GRADIENT)."""
    pairs = [(t, s) for t, s in zip(held, shapes, strict=True) if t.gradient]
    if len(pairs) == len(held) or not recipe.master_weights:
        return optimizer_terms_by_dtype(
            [t for t, _ in pairs],
            [s for _, s in pairs],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view=view,
            source=source,
        )
    device, host = optimizer_terms_by_dtype(
        [t for t, _ in pairs],
        [s for _, s in pairs],
        opt=opt,
        recipe=replace(recipe, master_weights=None),
        layout=layout,
        view=view,
        source=source,
    )
    masters = [s for t, s in zip(held, shapes, strict=True) if own_dtype(t, recipe) is None]
    elements = sum(math.prod(s) for s in masters)
    row = master_term(len(masters), elements, recipe.master_weights, view)
    return [row, *device], host


def shape_counts_by_dtype(
    tensors: Iterable[TensorSpec], recipe: Recipe
) -> dict[str | None, dict[tuple[int, ...], int]]:
    """The groups `optimizer_terms_by_dtype` makes of `tensors` (by `own_dtype`, in order),
    each counting the tensors' own shapes (in first-appearance order): a rule that gives
    every tensor of one shape the same local shape counts once and relabels the counts per
    rank class (`relabel_shapes`)."""
    groups: dict[str | None, dict[tuple[int, ...], int]] = {}
    for t in tensors:
        counts = groups.setdefault(own_dtype(t, recipe), {})
        counts[t.shape] = counts.get(t.shape, 0) + 1
    return groups


def relabel_shapes(
    counts: Mapping[tuple[int, ...], int], local: Mapping[tuple[int, ...], tuple[int, ...]]
) -> dict[tuple[int, ...], int]:
    """`counts` with each shape replaced by `local[shape]`, counts of shapes that become the
    same added: what `Counter` of the tensors' local shapes gives, in the same order (a local
    shape first appears where the first of the shapes it comes from does)."""
    out: dict[tuple[int, ...], int] = {}
    for shape, k in counts.items():
        mine = local[shape]
        out[mine] = out.get(mine, 0) + k
    return out


def optimizer_terms_by_dtype_counted(
    groups: Mapping[str | None, Mapping[tuple[int, ...], int]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
    step_is_int: bool = False,
) -> tuple[list[Term], list[Term]]:
    """`optimizer_terms_by_dtype` of the local shapes counted per held dtype (None: the
    recipe's), as `shape_counts_by_dtype` groups them."""
    if list(groups) in ([], [None]):
        return optimizer_terms_counted(
            groups.get(None, {}),
            opt=opt,
            recipe=recipe,
            layout=layout,
            view=view,
            source=source,
            step_is_int=step_is_int,
        )
    device: list[Term] = []
    host: list[Term] = []
    for fixed, group in groups.items():
        own = (
            recipe
            if fixed is None
            else replace(recipe, master_weights=None, optimizer_states=fixed)
        )
        d, h = optimizer_terms_counted(
            group,
            opt=opt,
            recipe=own,
            layout=layout,
            view=view if fixed is None else f"{view} held in {fixed}",
            source=source,
            step_is_int=step_is_int,
        )
        device += d
        host += h
    return merge_terms(device), merge_terms(host)


def merge_terms(terms: Sequence[Term]) -> list[Term]:
    """Rows with the same category, name and dtype summed into one (first position kept);
    shared terms (bitsandbytes qmaps) counted once."""
    out: dict[tuple[str, str, str], Term] = {}
    for t in terms:
        key = (t.category, t.name, t.dtype)
        if key not in out:
            out[key] = t
        elif t.name in _SHARED_NAMES:
            continue
        else:
            a = out[key]
            out[key] = replace(
                a,
                tensors=a.tensors + t.tensors,
                elements=a.elements + t.elements,
                bytes=a.bytes + t.bytes,
                formula=f"{a.formula} + {t.formula}",
            )
    return list(out.values())


_SHARED_NAMES = frozenset({"qmap1", "qmap2"})


def grad_dtype(recipe: Recipe) -> str:
    """Gradients accumulate in the main_grad dtype when the recipe has one (Megatron)."""
    return recipe.gradient_accumulation or recipe.gradients


def kept_gradient_bytes(inventory: Inventory, gradients: str) -> int:
    """Bytes of the gradients no optimizer clears: the trainable parameters it does not hold
    (`stepped` False, SRC_NOT_STEPPED), alive in every phase from the second step on (their
    `.grad` accumulates across steps), in the dtype ddp's gradients row gives them (their
    own, or `gradients`: grad_dtype of the recipe)."""
    return sum(
        t.numel * dtype_bytes(t.dtype or gradients)
        for t in inventory.parameters
        if t.trainable and t.gradient and not t.stepped
    )


def buffer_terms(inventory: Inventory, recipe: Recipe, *, engine: str = "") -> list[Term]:
    """Buffers are replicated on every rank by all engines; fixed-dtype ones keep their dtype.
    The others are in the dtype the module is held in: the recipe's parameter dtype, but under
    FSDP2 the at-rest (master) dtype, since the model is built in it and
    MixedPrecisionPolicy casts parameters only, never buffers
    (torch/distributed/fsdp/_fully_shard/_fsdp_api.py::MixedPrecisionPolicy, 2.13): Gemma's
    0-dim `embed_scale` stays fp32 under bf16-mixed."""
    held = recipe.parameters
    if engine == "fsdp2" and recipe.master_weights:
        held = recipe.master_weights
    # FSDP1 under accelerate's MixedPrecision(buffer_dtype=param dtype) casts every buffer,
    # fixed-dtype ones too (torch 2.13 fsdp/_runtime_utils.py::_cast_buffers_to_dtype_and_device
    # from _root_pre_forward; accelerate 1.16 FullyShardedDataParallelPlugin.set_mixed_precision).
    cast_all = engine == "fsdp1" and recipe.master_weights is not None
    terms: list[Term] = []
    by_dtype: dict[str, list[TensorSpec]] = {}
    for b in inventory.buffers:
        by_dtype.setdefault(held if cast_all else (b.dtype or held), []).append(b)
    for dtype, tensors in by_dtype.items():
        terms.append(
            whole(
                "buffers",
                "buffers",
                dtype,
                tensors,
                "module buffers (register_buffer), replicated on every rank",
            )
        )
    return terms


def group_ranks(
    per_rank: Iterable[RankStates], key: Callable[[RankStates], object]
) -> list[RankStates]:
    """Merge consecutive single-rank states with equal `key` into classes (linear time)."""
    groups: list[tuple[RankStates, list[int]]] = []
    for states in per_rank:
        if groups and key(groups[-1][0]) == key(states):
            groups[-1][1].append(states.ranks[0])
        else:
            groups.append((states, [states.ranks[0]]))
    return [replace(states, ranks=tuple(ranks)) for states, ranks in groups]
