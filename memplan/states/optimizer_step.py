"""What a torch.optim step allocates on top of the optimizer states (memplan.states.terms):
its kernels' temporaries, and the fp32 gradients a step over fp32 master weights needs.

The torch engines (ddp, fsdp2) step a torch.optim optimizer; DeepSpeed and Megatron step
their own (memplan.states.engines.deepspeed.step, memplan.states.engines.megatron).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from memplan.memory import Transient
from memplan.model.inventory import Inventory
from memplan.optimizers import hf_adafactor_dtype, hf_adafactor_factors
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.base import StepCache, StepStates
from memplan.states.terms import own_dtype

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
# Optimizers whose foreach list is one full-size tensor per updated tensor whatever their state
# keeps: torch's Adafactor (`var_estimates = [row_var @ col_var ...]`, torch/optim/_adafactor.py::
# _multi_tensor_adafactor, 2.13), whose >= 2-D tensors keep only row and column factors, so
# the largest state row undercounts the list (measured: tests/test_activations_timeline.py::
# test_optimizer_step_temporaries, adafactor foreach).
FOREACH_FULL_SIZE = frozenset({"adafactor"})
# Fused kernels (memplan.optimizers.FUSED_OPTIMIZERS) make no temporaries (measured: 0 B).
OPTIM_FILES = {"adafactor": "_adafactor", "adamw": "adam"}  # AdamW subclasses Adam in 2.13
# Optimizer-state rows that are not one tensor per updated parameter (scalars, the fp32
# master copy, bitsandbytes' quantization maps and block scales): no foreach list spans them.
_NOT_PER_ELEMENT = frozenset(
    {"step", "mu_product", "RMS", "master_weights", "qmap1", "qmap2", "absmax1", "absmax2"}
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


# transformers' own Adafactor (`adafactor-hf`; transformers 5.25 optimization.py::
# Adafactor.step, lines 1216-1292) has one kernel, a loop over the parameters; each one's
# temporaries are freed before the next one's, except what a loop variable keeps. Per parameter
# of n elements, in its compute dtype (fp32 for 16-bit parameters: memplan.optimizers.
# hf_adafactor_dtype), at the step's two largest moments (measured with MemTracker on the real
# step: tests/test_optimizers.py::test_hf_adafactor_matches_transformers):
# - HF_ADAFACTOR_UPDATE: two n-element tensors alive at once. `update = (grad**2) +
#   group["eps"][0]` (:1261) holds `grad**2` while the sum is made; `update =
#   self._approx_sq_grad(...)` (:1270) makes `torch.mul(r_factor, c_factor)` (_approx_sq_grad,
#   :1200) while the previous `update` is alive; the same for `exp_avg_sq.rsqrt()` (:1276) of
#   an unfactored tensor and for `p_data_fp32.add_(-update)` (:1289).
# - HF_ADAFACTOR_FP32_COPIES: a 16-bit parameter adds `grad = grad.float()` (:1221) and
#   `p_data_fp32 = p_data_fp32.float()` (:1254), alive for its whole iteration.
# - factored tensors: `r_factor` (grad_shape[:-1] elements, :1198) and `c_factor`
#   (grad_shape[:-2] + grad_shape[-1:], :1199) are alive while `torch.mul` makes the product.
# - the previous tensor's `update` stays bound to the loop variable until `update = (grad**2)
#   + eps` (:1261) of the next tensor is assigned: n_previous beside that line's two tensors.
# Peak over tensors i: max((UPDATE + COPIES_i) x n_i + rows_i + cols_i,
#                          n_(i-1) + (UPDATE + COPIES_i) x n_i). 0-dim temporaries (`_rms`,
# the clip divisor) are not alive at either moment.
HF_ADAFACTOR_UPDATE = 2
HF_ADAFACTOR_FP32_COPIES = 2
HF_ADAFACTOR_SOURCE = "transformers/optimization.py::Adafactor.step, _approx_sq_grad (5.25)"


def hf_adafactor_peak(tensors: Sequence[tuple[tuple[int, ...], str]]) -> tuple[int, ...]:
    """The tensors alive at the peak of transformers' Adafactor step over `tensors` ((shape,
    dtype of the updated tensor), in step order), in bytes, in the order the step makes them:
    the rule above. Their sum is the step's peak temporary bytes."""
    peak: tuple[int, ...] = ()
    before: tuple[int, ...] = ()
    for shape, dtype in tensors:
        n = math.prod(shape)
        compute = hf_adafactor_dtype(dtype)
        width = dtype_bytes(compute)
        copies = (n * width,) * (HF_ADAFACTOR_FP32_COPIES if compute != dtype else 0)
        update = (n * width,) * HF_ADAFACTOR_UPDATE
        factors = hf_adafactor_factors(shape)
        # `update`, r_factor, c_factor, then torch.mul's product (:1261, :1198-1200)
        at_mul = (*copies, update[0], *(f * width for f in factors or ()), *update[1:])
        at_square = (*before, *copies, *update)  # the previous `update`, then :1261
        for moment in (at_mul, at_square):
            if sum(moment) > sum(peak):
                peak = moment
        before = (n * width,)
    return peak


def hf_adafactor_step(tensors: Sequence[tuple[tuple[int, ...], str]]) -> Transient | None:
    """`hf_adafactor_peak` as the step's transient (None when nothing is updated)."""
    parts = hf_adafactor_peak(tensors)
    if not parts:
        return None
    peak = sum(parts)
    return Transient(
        name="optimizer_step_temporaries",
        bytes=peak,
        phases=("optimizer_step",),
        formula=(
            f"max over {len(tensors)} tensors of ({HF_ADAFACTOR_UPDATE} + "
            f"{HF_ADAFACTOR_FP32_COPIES} fp32 copies if 16-bit) x this + its row and column "
            f"factors, or the previous `update` + that = {peak:,} B"
        ),
        source=HF_ADAFACTOR_SOURCE,
        parts=parts,
    )


def updated_tensors(
    inventory: Inventory, recipe: Recipe
) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The trainable tensors in `model.parameters()` order, each as (shape, dtype of the
    tensor the optimizer updates: its own fixed dtype, else the master or parameter dtype)."""
    held = recipe.master_weights or recipe.parameters
    return tuple(
        (t.shape, own_dtype(t, recipe) or held)
        for t in inventory.parameters
        if t.kind == "parameter" and t.trainable and t.gradient  # terms.SRC_NO_GRADIENT
    )


def step_temporaries(states: StepStates, cache: StepCache, *, shards: int) -> Transient | None:
    """`torch_optimizer_step` over this rank's optimizer states: a foreach list spans every
    tensor the optimizer updates (the largest per-element state row; a state kept for dense
    and expert tensors as two rows, "exp_avg" and "exp_avg (experts)", is one list), and the
    for-loop steps the trainable tensors in order, each as one rank's 1 / `shards` of it.
    transformers' Adafactor (`adafactor-hf`) steps whole tensors (`shards` is 1: it does not
    run on FSDP2, memplan.states.stages) with its own rule (`hf_adafactor_step`)."""
    if states.optimizer.name == "adafactor-hf":
        inventory, recipe = states.inventory, states.recipe
        return cache.get(
            ("hf adafactor step", inventory, recipe),
            lambda: hf_adafactor_step(updated_tensors(inventory, recipe)),
        )
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
    name, implementation = states.optimizer.name, states.optimizer.implementation
    full_size = name in FOREACH_FULL_SIZE and implementation == "foreach"
    updated = max(per_state.values(), default=0) or max(rows, default=0)
    if full_size:
        updated_sizes_here = _updated_tensors_here(states, sizes)
        updated = sum(updated_sizes_here)
    step = torch_optimizer_step(
        name=name,
        implementation=implementation,
        updated=updated,
        sizes=sizes,
        dtype=states.recipe.optimizer_states,
    )
    if step is None or not full_size:
        return step
    # one tensor per updated tensor, each allocated by the foreach op: the replay places each
    width = dtype_bytes(states.recipe.optimizer_states)
    lists = FOREACH_LISTS[name]
    return replace(step, parts=tuple(n * width for n in updated_sizes_here) * lists)


def _updated_tensors_here(states: StepStates, sizes: Sequence[int]) -> tuple[int, ...]:
    """The elements of each tensor this rank's optimizer updates: every trainable tensor
    under DDP, the largest ZeroRedundancyOptimizer partition under ZeRO-1 (memplan.states.
    engines.ddp.zero_redundancy_partition; `per_gpu` is the most-loaded rank)."""
    layout = states.layout
    if layout.engine != "ddp" or layout.stage != 1 or layout.data <= 1:
        return tuple(sizes)
    from memplan.states.engines.ddp import zero_redundancy_partition

    owned = zero_redundancy_partition(sizes, layout.data)
    largest = max(owned, key=lambda indices: sum(sizes[i] for i in indices))
    return tuple(sizes[i] for i in sorted(largest))


def updated_sizes(inventory: Inventory, shards: int) -> tuple[int, ...]:
    """The tensors the optimizer steps (trainable, held by it, with a gradient:
    memplan.states.terms.stepped)
    in `model.parameters()` order (the order it steps them), each as ceil(numel / `shards`)
    elements."""
    return tuple(
        -(-t.numel // shards)
        for t in inventory.parameters
        if t.kind == "parameter" and t.trainable and t.stepped and t.gradient
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
    # A master whose parameter the loss never reaches (TensorSpec.gradient False) gets no
    # gradient to cast (memplan/verify/build.py: `master.grad = None if p.grad is None`); engine
    # ddp, the one caller, keeps every master whole on every rank.
    unreached = sum(
        t.numel
        for t in states.inventory.parameters
        if t.trainable and t.stepped and not t.gradient and own_dtype(t, states.recipe) is None
    )
    return master_gradients(masters - unreached, master)
