"""What every engine rule shares: the rows of one rank's model states, and optimizer states
summed over the tensors a rank's optimizer updates."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from memplan.models.inventory import Inventory, TensorSpec
from memplan.optimizers import OptimizerConfig, shared_state_tensors, state_tensors
from memplan.precision import Recipe, dtype_bytes

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


EngineRule = Callable[[Inventory, Recipe, OptimizerConfig, Placement], list[RankStates]]


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


def optimizer_terms(
    shapes: Iterable[tuple[int, ...]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    placement: Placement,
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
    state_dtype = recipe.optimizer_states
    by_shape = Counter(shapes)  # models repeat shapes: work out each one's states once
    count = sum(by_shape.values())
    master_elems = sum(math.prod(shape) * k for shape, k in by_shape.items())
    acc: dict[tuple[str, str], list[int]] = {}
    for shape, k in by_shape.items():
        for name, dtype, numel in _states_of(opt, shape, state_dtype):
            if step_is_int and name == "step":
                continue
            slot = acc.setdefault((name, dtype), [0, 0])
            slot[0] += k
            slot[1] += numel * k
    device: list[Term] = []
    host: list[Term] = []
    if recipe.master_weights:
        device.append(
            term(
                "optimizer_states",
                "master_weights",
                recipe.master_weights,
                count,
                master_elems,
                f"{count} {view}, {fmt(master_elems)} elements x "
                f"{dtype_bytes(recipe.master_weights)} B ({recipe.master_weights})",
                SRC_ZERO_PAPER + ": fp32 master copy of the 16-bit parameters",
            )
        )
    for (name, dtype), (tensors, elems) in acc.items():
        what = "0-dim scalars" if name in ("step", "mu_product") else view
        row = term(
            "optimizer_states",
            name,
            dtype,
            tensors,
            elems,
            f"{tensors} {what}, {fmt(elems)} elements x {dtype_bytes(dtype)} B ({dtype})",
            f"{source}; state layout: memplan.optimizers.state_tensors({opt.name})",
        )
        on_host = placement.step_on_host and name in ("step", "mu_product")
        (host if on_host else device).append(row)
    for shared in shared_state_tensors(opt):
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


def grad_dtype(recipe: Recipe) -> str:
    """Gradients accumulate in the main_grad dtype when the recipe has one (Megatron)."""
    return recipe.gradient_accumulation or recipe.gradients


def buffer_terms(inventory: Inventory, recipe: Recipe) -> list[Term]:
    """Buffers are replicated on every rank by all engines; fixed-dtype ones keep their dtype."""
    terms: list[Term] = []
    by_dtype: dict[str, list[TensorSpec]] = {}
    for b in inventory.buffers:
        by_dtype.setdefault(b.dtype or recipe.parameters, []).append(b)
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
