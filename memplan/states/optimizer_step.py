"""What a torch.optim step allocates on top of the optimizer states (memplan.states.terms):
its kernels' temporaries, and the fp32 gradients a step over fp32 master weights needs.

The torch engines (ddp, fsdp2) step a torch.optim optimizer; DeepSpeed and Megatron step
their own (memplan.states.engines.deepspeed.step, memplan.states.engines.megatron).
"""

from __future__ import annotations

from collections.abc import Sequence

from memplan.memory import Transient
from memplan.model.inventory import Inventory
from memplan.precision import dtype_bytes
from memplan.states.engines.base import StepCache, StepStates

# Temporaries of one torch.optim step (torch 2.13), measured with MemTracker on a real CPU step
# for every optimizer and kernel (tests/test_optimizers.py::test_step_temporaries_match_torch).
# foreach: how many full lists of updated-tensor-sized temporaries are alive at once.
#   adam/adamw/nadam/radam: one (`exp_avg_sq_sqrt = torch._foreach_sqrt(...)`, adam.py::
#   _multi_tensor_adam; the same in nadam.py, radam.py); adamax: `denom = torch._foreach_mul(
#   exp_infs, ...)` (adamax.py::_multi_tensor_adamax); rmsprop: `avg = torch._foreach_sqrt(
#   square_avgs)` (rmsprop.py::_multi_tensor_rmsprop); adafactor: `var_estimates`
#   (_adafactor.py::_multi_tensor_adafactor); adagrad: two, `std = torch._foreach_sqrt(
#   state_sums)` and `numerator = torch._foreach_mul(grads, minus_clr)` (adagrad.py::
#   _multi_tensor_adagrad). SGD (with or without momentum) updates in place.
FOREACH_LISTS = {
    "adam": 1,
    "adamw": 1,
    "nadam": 1,
    "radam": 1,
    "adamax": 1,
    "rmsprop": 1,
    "adafactor": 1,
    "adagrad": 2,
}
# for-loop (`_single_tensor_<opt>`): (temporaries of the tensor being updated, in its size;
# temporaries of the previous tensor still bound to a loop variable). A Python local such as
# `denom` keeps the previous iteration's tensor alive until the new one is assigned, so the peak
# is max_i(current x n_i + previous x n_(i-1)) over the tensors in step order.
#   adam/adamw/nadam: `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` makes two
#   (adam.py::_single_tensor_adam; nadam.py likewise) and `denom` survives: (2, 1).
#   radam: `exp_avg_sq.sqrt()` and its quotient, nothing bound across iterations: (2, 0).
#   adagrad: `std = state_sum.sqrt().add_(eps)` survives (adagrad.py::_single_tensor_adagrad);
#   rmsprop: `avg = square_avg.sqrt()` survives (rmsprop.py::_single_tensor_rmsprop): (1, 1).
#   adamax: `grad.abs().add_(eps)`, freed at once (adamax.py::_single_tensor_adamax): (1, 0).
#   adafactor: `var_estimate = row_var @ col_var` survives (_adafactor.py::
#   _single_tensor_adafactor): (1, 1), plus the row and column means of a >= 2-D tensor
#   (`row_mean`, `col_mean`), or `grad_squared` of a vector; those factor-sized and 1-D
#   survivors are left out (the 1-D ones are norm weights and biases).
FOR_LOOP_TEMPORARIES = {
    "adam": (2, 1),
    "adamw": (2, 1),
    "nadam": (2, 1),
    "radam": (2, 0),
    "adagrad": (1, 1),
    "rmsprop": (1, 1),
    "adamax": (1, 0),
    "adafactor": (1, 1),
}
# Fused kernels (memplan.optimizers.FUSED_OPTIMIZERS) make no temporaries (measured: 0 B).
OPTIM_FILES = {"adafactor": "_adafactor", "adamw": "adam"}  # AdamW subclasses Adam in 2.13
# Optimizer-state rows that are not one tensor per updated parameter (scalars, the fp32
# master copy, bitsandbytes' quantization maps and block scales): no foreach list spans them.
_NOT_PER_ELEMENT = frozenset(
    {"step", "mu_product", "master_weights", "qmap1", "qmap2", "absmax1", "absmax2"}
)
_EXPERTS = " (experts)"


def for_loop_peak(name: str, sizes: Sequence[int]) -> int:
    """Peak temporary elements of a for-loop step over tensors of `sizes` (in step order)."""
    current, previous = FOR_LOOP_TEMPORARIES.get(name, (0, 0))
    peak, before = 0, 0
    for n in sizes:
        peak = max(peak, current * n + previous * before)
        before = n
    return peak


def torch_optimizer_step(
    *, name: str, implementation: str, updated: int, sizes: Sequence[int], dtype: str
) -> Transient | None:
    """Temporaries of a torch.optim step: foreach keeps `FOREACH_LISTS[name]` full lists of
    `updated` elements; the for-loop keeps `FOR_LOOP_TEMPORARIES` of the tensor being updated
    and of the one before it (`sizes`, in step order); fused kernels make none."""
    if implementation == "fused":
        return None
    if implementation == "foreach":
        lists = FOREACH_LISTS.get(name, 0)
        elems = lists * updated
        formula = f"{lists} x {updated:,} updated elements (foreach lists)"
        where = f"_multi_tensor_{OPTIM_FILES.get(name, name).lstrip('_')}"
    else:
        current, previous = FOR_LOOP_TEMPORARIES.get(name, (0, 0))
        elems = for_loop_peak(name, sizes)
        formula = f"max over tensors of {current} x this + {previous} x previous = {elems:,}"
        where = f"_single_tensor_{OPTIM_FILES.get(name, name).lstrip('_')}"
    if not elems:
        return None
    return Transient(
        name="optimizer_step_temporaries",
        bytes=elems * dtype_bytes(dtype),
        phases=("optimizer_step",),
        formula=f"{formula} x {dtype_bytes(dtype)} B ({dtype})",
        source=f"torch/optim/{OPTIM_FILES.get(name, name)}.py::{where} (2.13)",
    )


def step_temporaries(states: StepStates, cache: StepCache, *, shards: int) -> Transient | None:
    """`torch_optimizer_step` over this rank's optimizer states: a foreach list spans every
    tensor the optimizer updates (the largest per-element state row; a state kept for dense
    and expert tensors as two rows, "exp_avg" and "exp_avg (experts)", is one list), and the
    for-loop steps the trainable tensors in order, each as one rank's 1 / `shards` of it."""
    per_state: dict[str, int] = {}
    for t in states.per_gpu.terms:
        if t.category == "optimizer_states" and t.name not in _NOT_PER_ELEMENT:
            key = t.name.removesuffix(_EXPERTS)
            per_state[key] = per_state.get(key, 0) + t.elements
    rows = [t.elements for t in states.per_gpu.terms if t.category == "optimizer_states"]
    inventory = states.inventory
    sizes = cache.get(
        ("updated sizes", inventory, shards), lambda: updated_sizes(inventory, shards)
    )
    return torch_optimizer_step(
        name=states.optimizer.name,
        implementation=states.optimizer.implementation,
        updated=max(per_state.values(), default=0) or max(rows, default=0),
        sizes=sizes,
        dtype=states.recipe.optimizer_states,
    )


def updated_sizes(inventory: Inventory, shards: int) -> tuple[int, ...]:
    """The tensors the optimizer steps (trainable and held by it: memplan.states.terms.stepped)
    in `model.parameters()` order (the order it steps them), each as ceil(numel / `shards`)
    elements."""
    return tuple(
        -(-t.numel // shards)
        for t in inventory.parameters
        if t.kind == "parameter" and t.trainable and t.stepped
    )


def master_gradients(elements: int, dtype: str) -> Transient:
    """A torch optimizer over fp32 master weights (a *-mixed recipe without DeepSpeed or
    Megatron) needs fp32 gradients: each 16-bit `.grad` is cast into its master's `.grad` for
    the step and dropped after it (memplan/verify/build.py::MasterWeights.step, the pattern of
    apex amp O2's master params)."""
    return Transient(
        name="master_gradients",
        bytes=elements * dtype_bytes(dtype),
        phases=("optimizer_step",),
        formula=f"{elements:,} master elements x {dtype_bytes(dtype)} B ({dtype})",
        source="memplan/verify/build.py::MasterWeights.step",
    )


def steps_masters(states: StepStates) -> bool:
    """Whether the optimizer steps master weights in a dtype other than the gradients' (so
    each gradient is cast for the step: master_gradients)."""
    master = states.recipe.master_weights
    return bool(master) and master != states.recipe.gradients


def rank_master_gradients(states: StepStates) -> Transient | None:
    """`master_gradients` over this rank's master weights (dense and expert rows), or None
    when the optimizer steps the parameters themselves."""
    master = states.recipe.master_weights
    if master is None or not steps_masters(states):
        return None
    masters = sum(
        t.elements
        for t in states.per_gpu.terms
        if t.name.removesuffix(_EXPERTS) == "master_weights"
    )
    return master_gradients(masters, master)
