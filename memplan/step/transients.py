"""Transient buffers and overheads of a training step: named terms, each with its source and
the phases of the step in which it is alive (see memplan.step.timeline).

Not activations, but they live here beside them: they are what the step allocates on top of the
model states (memplan.states.engines) and the saved tensors (memplan.activations).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from memplan.memory import ALWAYS, BACKWARD, FORWARD_BACKWARD, Transient
from memplan.model.inventory import Inventory, TensorSpec
from memplan.precision import dtype_bytes

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


def deepspeed_ipg_bucket(
    *, stage: int, reduce_bucket_size: int, dtype: str, overlap_comm: bool | None
) -> Transient | None:
    """DeepSpeed's reduction (IPG) bucket: `torch.empty(reduce_bucket_size, dtype)`.

    Stage 1/2 (stage_1_and_2.py::setup_buckets): allocated at the first gradient hook of a
    backward, released at its epilogue, doubled with overlap_comm (default off for 1/2).
    Stage 3 (stage3.py::DeepSpeedZeroOptimizer_Stage3): allocated at init and kept; in the
    communication dtype. Stage 0 has none (the engine all-reduces flat buffers).
    """
    if stage == 0:
        return None
    overlap = overlap_comm if overlap_comm is not None else stage == 3
    copies = 2 if overlap and stage < 3 else 1
    n_bytes = copies * reduce_bucket_size * dtype_bytes(dtype)
    phases = ALWAYS if stage == 3 else BACKWARD
    where = "stage3.py (at init)" if stage == 3 else "stage_1_and_2.py::setup_buckets"
    return Transient(
        name="deepspeed_reduce_bucket",
        bytes=n_bytes,
        phases=phases,
        formula=f"{copies} x reduce_bucket_size {reduce_bucket_size:,} x "
        f"{dtype_bytes(dtype)} B ({dtype})",
        source=f"deepspeed/runtime/zero/{where} (0.19.6)",
    )


def module_sizes(inventory: Inventory) -> tuple[int, int]:
    """(elements of the largest decoder layer, of the largest tensor outside the layers)."""
    return _largest_layer(inventory.parameters), _largest_root(inventory.parameters)


def zero3_live_parameters(
    modules: tuple[int, int], *, dtype: str, prefetch_bucket_size: int, max_live_parameters: int
) -> Transient:
    """ZeRO-3 gathers each module's parameters for its forward and backward, prefetching up to
    stage3_prefetch_bucket_size elements ahead, never holding more than
    stage3_max_live_parameters. Alive: the largest module (a decoder layer, or the embedding /
    LM head) plus one prefetch bucket, capped. Source: deepspeed/runtime/zero/
    partitioned_param_coordinator.py::PartitionedParameterCoordinator.fetch_sub_module (0.19.6)."""
    biggest = max(modules)
    live = min(biggest + prefetch_bucket_size, max(max_live_parameters, biggest))
    return Transient(
        name="zero3_gathered_parameters",
        bytes=live * dtype_bytes(dtype),
        phases=FORWARD_BACKWARD,
        formula=f"min({biggest:,} (largest module) + {prefetch_bucket_size:,} prefetch, "
        f"max_live {max_live_parameters:,}) elements x {dtype_bytes(dtype)} B ({dtype})",
        source="deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.6)",
    )


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


def megatron_main_grads(elements: int) -> Transient:
    """Megatron with 16-bit main_grad (fp16): the step casts each main_grad to an fp32 grad of
    its fp32 main parameter (`main_param.grad = model_param.main_grad.float()`), this rank's
    main parameters' worth, alive through the step. Source: megatron/core/optimizer/
    optimizer.py::Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads and
    distrib_optimizer.py::DistributedOptimizer._copy_model_grads_to_main_grads (core_r0.12)."""
    return Transient(
        name="megatron_fp32_main_grads",
        bytes=elements * dtype_bytes("fp32"),
        phases=("optimizer_step",),
        formula=f"{elements:,} main-parameter elements x 4 B (main_grad.float())",
        source="megatron/core/optimizer/optimizer.py::_copy_model_grads_to_main_grads (core_r0.12)",
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


def deepspeed_bf16_grad_reduce(
    *, padded: int, largest: int, accumulate: str, communication: str = "bf16"
) -> Transient:
    """BF16_Optimizer's gradient path after each backward, one temporary at a time: first
    `_update_hp_grad` adds every bf16 `.grad` into the flat buffer through
    `lp.grad.to(grad_acc_dtype)`, a cast of one parameter (the largest: `largest` elements);
    then, at the boundary, the engine all-reduces the whole flat buffer as one bucket
    (engine.py::buffered_allreduce_fallback -> allreduce_bucket: `_flatten_dense_tensors` of
    one tensor is a view) cast to the communication dtype, `tensor.to(communication_data_type)`,
    bf16 for a bf16 model unless `communication_data_type` is set (engine.py::
    communication_data_type). Neither copy exists when the buffer is already in that dtype.
    Counted in the optimizer_step phase: it runs after the backward, with the gradients and
    states alive and no activations, and before the step (memplan has no phase between)."""
    wide = dtype_bytes(accumulate) if accumulate != "bf16" else 0
    cast = largest * wide
    comm = padded * dtype_bytes(communication) if accumulate != communication else 0
    return Transient(
        name="deepspeed_bf16_grad_reduce",
        bytes=max(cast, comm),
        phases=("optimizer_step",),
        formula=f"max({largest:,} x {wide} B (largest .grad cast to {accumulate}), "
        f"{padded:,} x {dtype_bytes(communication) if comm else 0} B (flat {accumulate} "
        f"gradient buffer cast to {communication} for the all-reduce))",
        source="deepspeed/runtime/bf16_optimizer.py::BF16_Optimizer._update_hp_grad; "
        "deepspeed/runtime/engine.py::DeepSpeedEngine.allreduce_bucket (0.19.8)",
    )


def deepspeed_step_grads(
    *, stage: int, partition: int, sub_group: int, grad: str, bf16_optimizer: bool = False
) -> Transient:
    """DeepSpeed converts this rank's gradient partition to fp32 for the optimizer, one group
    (stage 1/2) or sub-group (stage 3) at a time: a flattened 16-bit copy plus its fp32 cast.
    Source: stage_1_and_2.py::DeepSpeedZeroOptimizer.step, stage3.py::
    _prepare_fp32_grad_for_sub_group (0.19.6).

    Stage 0 with 16-bit gradients steps through FP16_Optimizer (engine.py::
    _do_optimizer_sanity_check picks FP16/DDP_BFLOAT16 when model and accumulation dtypes agree,
    0.19.8): `_flatten_dense_tensors([p.grad.to(fp32) for p in group])`, an fp32 copy of every
    gradient plus the flat fp32 result, 4 + 4 B per element (fp16/fused_optimizer.py::
    FP16_Optimizer.step, 0.19.8).

    BF16_Optimizer (`bf16_optimizer`) hands the optimizer its slice of the flat gradient
    buffer, `grad_partition.to(fp32)` only when that buffer is not fp32 (a partition x 4 B
    copy, set to None after the step), otherwise the slice itself (bf16_optimizer.py::
    BF16_Optimizer.step, 0.19.8)."""
    if bf16_optimizer:
        per = dtype_bytes("fp32") if grad != "fp32" else 0
        return Transient(
            name="deepspeed_fp32_gradient_partition",
            bytes=partition * per,
            phases=("optimizer_step",),
            formula=f"{partition:,} elements x 4 B (grad_partition.to(fp32))"
            if per
            else "fp32_groups_gradient_flat_partition is a view: no copy",
            source="deepspeed/runtime/bf16_optimizer.py::BF16_Optimizer.step (0.19.8)",
        )
    if stage == 0 and grad != "fp32":
        return Transient(
            name="deepspeed_fp32_gradient_partition",
            bytes=partition * 2 * dtype_bytes("fp32"),
            phases=("optimizer_step",),
            formula=f"{partition:,} elements x (4 + 4) B (fp32 copies + flat fp32 gradient)",
            source="deepspeed/runtime/fp16/fused_optimizer.py::FP16_Optimizer.step (0.19.8)",
        )
    elems = min(partition, sub_group) if stage == 3 else partition
    per = dtype_bytes(grad) + dtype_bytes("fp32") if grad != "fp32" else 0
    return Transient(
        name="deepspeed_fp32_gradient_partition",
        bytes=elems * per,
        phases=("optimizer_step",),
        formula=f"{elems:,} elements x ({dtype_bytes(grad)} + 4) B"
        if per
        else "gradients already fp32: no copy",
        source="deepspeed/runtime/zero/stage_1_and_2.py::step, stage3.py (0.19.6)",
    )


def _largest_layer(params: Iterable[TensorSpec]) -> int:
    sizes: dict[int, int] = {}
    for t in params:
        if t.layer is not None:
            sizes[t.layer] = sizes.get(t.layer, 0) + t.numel
    return max(sizes.values(), default=0)


def _largest_root(params: Iterable[TensorSpec]) -> int:
    return max((t.numel for t in params if t.layer is None), default=0)
