"""Which rank holds which bytes of the model states: one rule set per engine and ZeRO stage.

Every function here returns `RankStates` for each class of identical ranks, so that the
report can show the most-loaded rank to the byte and every rank when asked. The rules are
read from each engine's source (cited per function) and proved on torch.distributed ranks
by `memplan verify` and tests/test_sharding_torch.py.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

from memplan.models.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig, shared_state_tensors, state_tensors
from memplan.precision import Recipe, dtype_bytes

Category = Literal["parameters", "gradients", "optimizer_states", "buffers"]

SRC_ZERO_PAPER = "Rajbhandari et al. 2020, ZeRO (arXiv 1910.02054), sec. 5.1, Fig. 1"
SRC_DDP = "torch/nn/parallel/distributed.py (2.13): every rank holds a full replica"
SRC_ZERO_RO = (
    "torch/distributed/optim/zero_redundancy_optimizer.py::_partition_parameters (2.13)"
)
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

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def bytes_of(self, category: Category) -> int:
        return sum(t.bytes for t in self.terms if t.category == category)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """What the calculator needs to know about where the step runs."""

    engine: str
    data: int
    stage: int
    step_on_host: bool = False
    """torch.optim keeps the `step` scalar on the CPU unless fused or capturable."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """`a` rounded up to a multiple of `multiple`."""
    return ceil_div(a, multiple) * multiple


def _fmt(n: int) -> str:
    return f"{n:,}"


def _term(category: Category, name: str, dtype: str, tensors: int, elements: int,
          formula: str, source: str) -> Term:
    return Term(category=category, name=name, dtype=dtype, tensors=tensors, elements=elements,
                bytes=elements * dtype_bytes(dtype), formula=formula, source=source)


def _whole(category: Category, name: str, dtype: str, tensors: Sequence[TensorSpec],
           source: str) -> Term:
    elements = sum(t.numel for t in tensors)
    formula = f"{len(tensors)} tensors, {_fmt(elements)} elements x {dtype_bytes(dtype)} B ({dtype})"
    return _term(category, name, dtype, len(tensors), elements, formula, source)


@lru_cache(maxsize=4096)
def _states_of(opt: OptimizerConfig, shape: tuple[int, ...], dtype: str) -> tuple[tuple[str, str, int], ...]:
    return tuple((s.name, s.dtype, s.numel) for s in state_tensors(opt, shape, dtype))


def optimizer_terms(shapes: Iterable[tuple[int, ...]], *, opt: OptimizerConfig, recipe: Recipe,
                    placement: Placement, view: str, source: str) -> tuple[list[Term], list[Term]]:
    """Master weights and each named optimizer state over the tensors the optimizer updates.

    `shapes` are the local shapes this rank's optimizer sees (whole tensors, FSDP2 shards or
    flat partitions); `view` says which in the formula. Returns (device terms, host terms).
    """
    state_dtype = recipe.optimizer_states
    master_elems = 0
    count = 0
    acc: dict[tuple[str, str], list[int]] = {}
    for shape in shapes:
        count += 1
        n = 1
        for d in shape:
            n *= d
        master_elems += n
        for name, dtype, numel in _states_of(opt, shape, state_dtype):
            slot = acc.setdefault((name, dtype), [0, 0])
            slot[0] += 1
            slot[1] += numel
    device: list[Term] = []
    host: list[Term] = []
    if recipe.master_weights:
        device.append(_term(
            "optimizer_states", "master_weights", recipe.master_weights, count, master_elems,
            f"{count} {view}, {_fmt(master_elems)} elements x "
            f"{dtype_bytes(recipe.master_weights)} B ({recipe.master_weights})",
            SRC_ZERO_PAPER + ": fp32 master copy of the 16-bit parameters"))
    for (name, dtype), (tensors, elems) in acc.items():
        what = "0-dim scalars" if name in ("step", "mu_product") else view
        term = _term("optimizer_states", name, dtype, tensors, elems,
                     f"{tensors} {what}, {_fmt(elems)} elements x {dtype_bytes(dtype)} B ({dtype})",
                     f"{source}; state layout: memplan.optimizers.state_tensors({opt.name})")
        on_host = placement.step_on_host and name in ("step", "mu_product")
        (host if on_host else device).append(term)
    for shared in shared_state_tensors(opt):
        device.append(_term("optimizer_states", shared.name, shared.dtype, 1, shared.numel,
                            f"1 shared map, {shared.numel} elements x 4 B",
                            "bitsandbytes/optim/optimizer.py::Optimizer8bit.fill_qmap"))
    return device, host


def _grad_dtype(recipe: Recipe) -> str:
    """Gradients accumulate in the main_grad dtype when the recipe has one (Megatron)."""
    return recipe.gradient_accumulation or recipe.gradients


def buffer_terms(inventory: Inventory, recipe: Recipe) -> list[Term]:
    """Buffers are replicated on every rank by all engines; fixed-dtype ones keep their dtype."""
    terms: list[Term] = []
    by_dtype: dict[str, list[TensorSpec]] = {}
    for b in inventory.buffers:
        by_dtype.setdefault(b.dtype or recipe.parameters, []).append(b)
    for dtype, tensors in by_dtype.items():
        terms.append(_whole("buffers", "buffers", dtype, tensors,
                            "module buffers (register_buffer), replicated on every rank"))
    return terms


def replicated(inventory: Inventory, recipe: Recipe, opt: OptimizerConfig,
               placement: Placement) -> list[RankStates]:
    """Plain DDP (ZeRO stage 0): every rank holds everything. Source: SRC_DDP."""
    params = inventory.parameters
    terms = [
        _whole("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        _whole("gradients", "gradients", _grad_dtype(recipe), params, SRC_DDP),
    ]
    device, host = optimizer_terms((p.shape for p in params), opt=opt, recipe=recipe,
                                   placement=placement, view="tensors", source=SRC_DDP)
    return [RankStates(ranks=tuple(range(placement.data)), terms=(*terms, *device),
                       host_terms=tuple(host))]


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


def zero_redundancy(inventory: Inventory, recipe: Recipe, opt: OptimizerConfig,
                    placement: Placement) -> list[RankStates]:
    """DDP + ZeroRedundancyOptimizer (ZeRO-1): full parameters and gradients, whole-tensor
    optimizer states on the owning rank only. Source: SRC_ZERO_RO."""
    params = inventory.parameters
    common = [
        _whole("parameters", "parameters", recipe.parameters, params, SRC_DDP),
        _whole("gradients", "gradients", _grad_dtype(recipe), params, SRC_DDP),
    ]
    owned = zero_redundancy_partition([p.numel for p in params], placement.data)
    out = []
    for rank, indices in enumerate(owned):
        device, host = optimizer_terms(
            (params[i].shape for i in indices), opt=opt, recipe=recipe, placement=placement,
            view="owned tensors (largest first to the least-loaded rank)", source=SRC_ZERO_RO)
        out.append(RankStates(ranks=(rank,), terms=(*common, *device), host_terms=tuple(host)))
    return out


def fsdp2_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank`: torch.chunk's split, `ceil(dim0 / world)` rows per
    chunk, so trailing ranks may hold fewer or none. Source: SRC_FSDP2 (`torch.chunk`)."""
    chunk = ceil_div(dim0, world)
    return max(0, min(chunk, dim0 - rank * chunk))


def fsdp2(inventory: Inventory, recipe: Recipe, opt: OptimizerConfig,
          placement: Placement) -> list[RankStates]:
    """torch FSDP2 `fully_shard`: each tensor split on dim 0 like torch.chunk.

    The sharded parameter and its gradient live in a storage padded to the largest chunk on
    every rank (`padded_sharded_param_size`); the optimizer sees the unpadded local shard, so
    its states are not padded. Sharded parameters are kept in their original dtype, the
    fp32 master under a *-mixed recipe (MixedPrecisionPolicy.param_dtype makes the 16-bit
    copy only while unsharded), and the reduced gradient is cast back to it
    (`_fsdp_collectives.py::foreach_reduce`). Source: SRC_FSDP2.
    """
    world = placement.data
    at_rest = recipe.master_weights or recipe.parameters
    grad_dtype = recipe.gradient_accumulation or at_rest
    params = inventory.parameters
    padded_elems = 0
    for p in params:
        row = p.numel // p.shape[0] if p.shape and p.shape[0] else 0
        padded_elems += ceil_div(p.shape[0], world) * row if p.shape else p.numel
    n = len(params)
    padded_formula = (f"{n} tensors, sum of ceil(dim0 / {world}) rows = {_fmt(padded_elems)} "
                      f"elements (padded to the largest chunk)")
    common = [
        _term("parameters", "parameters", at_rest, n, padded_elems,
              f"{padded_formula} x {dtype_bytes(at_rest)} B ({at_rest})", SRC_FSDP2),
        _term("gradients", "gradients", grad_dtype, n, padded_elems,
              f"{padded_formula} x {dtype_bytes(grad_dtype)} B ({grad_dtype})", SRC_FSDP2),
    ]
    fsdp_recipe = _without_master(recipe, at_rest)

    # Ranks between two consecutive "breakpoints" (where some tensor's shard changes size)
    # see identical shards, so each class is computed once.
    breaks = {0, world}
    for p in params:
        if p.shape:
            chunk = ceil_div(p.shape[0], world)
            full = p.shape[0] // chunk
            breaks.update(r for r in (full, full + 1) if 0 < r < world)
    edges = sorted(breaks)
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        shapes = [
            (fsdp2_rows(p.shape[0], world, lo), *p.shape[1:]) if p.shape else p.shape
            for p in params
        ]
        device, host = optimizer_terms(shapes, opt=opt, recipe=fsdp_recipe, placement=placement,
                                       view="local shards (unpadded)", source=SRC_FSDP2)
        out.append(RankStates(ranks=tuple(range(lo, hi)), terms=(*common, *device),
                              host_terms=tuple(host)))
    return out


def _without_master(recipe: Recipe, at_rest: str) -> Recipe:
    """FSDP2 has no separate master copy: the optimizer updates the at-rest shard."""
    return replace(recipe, master_weights=None, optimizer_states=at_rest)


def deepspeed(stage: int) -> Callable[[Inventory, Recipe, OptimizerConfig, Placement], list[RankStates]]:
    raise NotImplementedError
