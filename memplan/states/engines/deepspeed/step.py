"""DeepSpeed's buffers in a training step, on top of its model states
(memplan.states.engines.deepspeed.sharding): the gradient reduction bucket, ZeRO-3's gathered
parameters, BF16_Optimizer's gradient path and the fp32 gradients the optimizer steps with.
Read from deepspeedai/DeepSpeed 0.19.6 (BF16_Optimizer and FP16_Optimizer: 0.19.8).
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.memory import ALWAYS, BACKWARD, FORWARD_BACKWARD, Phase, Transient
from memplan.model.inventory import Inventory, TensorSpec
from memplan.precision import dtype_bytes
from memplan.states.engines.deepspeed.zero3 import hpz_secondary_elements


def reduce_bucket_dtype(
    *, stage: int, parameters: str, accumulate: str | None, communication: str | None
) -> str:
    """The dtype DeepSpeed allocates its reduction (IPG) bucket in, read at 0.19.8.

    Stage 1/2 (stage_1_and_2.py::DeepSpeedZeroOptimizer.setup_buckets): `dtype=self.
    _gradient_reduction_buffer_dtype()`, the accumulation dtype when `use_grad_accum_attribute`
    (stage 1, whose gradients are not partitioned, with `data_types.grad_accum_dtype` other
    than the model's: ZeRO-1 stages its fp32 accumulator there) and otherwise the model's dtype
    (`self.dtype`, the parameters'); one bucket per communication dtype, one without autocast.
    0.19.6 allocated the model's dtype in every case. Stage 3 (stage3.py::
    DeepSpeedZeroOptimizer_Stage3._setup_for_real_optimizer): one bucket per communication dtype
    (`ipg_buckets` keyed by `{self.communication_data_type}`), allocated in that dtype: the
    config's `communication_data_type`, else the model's dtype (engine.py::
    communication_data_type), whatever the accumulation dtype."""
    if stage == 3:
        return communication or parameters
    if stage == 1 and accumulate and accumulate != parameters:
        return accumulate
    return parameters


def reduce_bucket(
    *, stage: int, reduce_bucket_size: int, dtype: str, overlap_comm: bool | None
) -> Transient | None:
    """DeepSpeed's reduction (IPG) bucket: `torch.empty(reduce_bucket_size, dtype)`, in the
    dtype `reduce_bucket_dtype` gives.

    Stage 1/2 (stage_1_and_2.py::setup_buckets): allocated at the first gradient hook of a
    backward, released at its epilogue, doubled with overlap_comm (default off for 1/2).
    Stage 3 (stage3.py::DeepSpeedZeroOptimizer_Stage3): allocated at init and kept. Stage 0
    has none (the engine all-reduces flat buffers).
    """
    if stage == 0:
        return None
    overlap = overlap_comm if overlap_comm is not None else stage == 3
    copies = 2 if overlap and stage < 3 else 1
    n_bytes = copies * reduce_bucket_size * dtype_bytes(dtype)
    phases = ALWAYS if stage == 3 else BACKWARD
    where = (
        "stage3.py::_setup_for_real_optimizer (at init)"
        if stage == 3
        else "stage_1_and_2.py::setup_buckets"
    )
    return Transient(
        name="deepspeed_reduce_bucket",
        bytes=n_bytes,
        phases=phases,
        formula=f"{copies} x reduce_bucket_size {reduce_bucket_size:,} x "
        f"{dtype_bytes(dtype)} B ({dtype})",
        source=f"deepspeed/runtime/zero/{where} (0.19.8)",
    )


# hpZ's secondary partition of the trainable parameters, alive from the forward on (below).
HPZ_SECONDARY = "deepspeed_hpz_secondary_partition"
HPZ_SECONDARY_PERSISTENT = "deepspeed_hpz_secondary_partition_persistent"
HPZ_SOURCE = (
    "deepspeed/runtime/zero/partition_parameters.py::Init._partition, _partition_param_sec; "
    "stage3.py::DeepSpeedZeroOptimizer_Stage3.step, _post_step, invalidate_secondary_tensor "
    "(0.19.8)"
)


def hpz_secondary(
    numels: Iterable[tuple[int, bool]], *, world: int, hpz: int, dtype: str
) -> list[Transient]:
    """ZeRO++ hpZ's secondary partition of the trainable parameters, `(numel, persistent)`
    each, in the model's dtype (`torch.empty(secondary_partition_size, dtype=param.dtype)`;
    per parameter `ceil(numel / world) x world / hpz` elements, sharding.
    hpz_secondary_elements).

    When it exists (HPZ_SOURCE): `Init._partition` makes a parameter's secondary partition
    whenever it releases a gathered (AVAILABLE) parameter that has none, copying it from the
    whole parameter; every optimizer step ends by dropping those of the trainable parameters
    (`_post_step` -> `invalidate_secondary_tensor`: `param.ds_secondary_tensor = None`). So
    after a step none exists; the next forward re-creates each non-persistent parameter's as
    it releases its module, and the backward's all-gathers read them (over the hpZ group) until
    the step. A persistent parameter (numel <= stage3_param_persistence_threshold) is never
    released in forward or backward: it gets one only when the step starts
    (`step` -> `_partition_all_parameters` releases every parameter), until `_post_step`.
    Frozen parameters keep theirs for the whole run (a model-state row, sharding.HPZ_FROZEN)."""
    released = persistent = 0
    for numel, persists in numels:
        elems = hpz_secondary_elements(numel, world, hpz)
        if persists:
            persistent += elems
        else:
            released += elems
    width = dtype_bytes(dtype)
    phases: tuple[Phase, ...] = (*FORWARD_BACKWARD, "backward_end", "optimizer_step")
    formula = (
        f"sum over the {{what}} trainable parameters of ceil(numel / {world}) x {world} / "
        f"{hpz} = {{elems:,}} elements x {width} B ({dtype})"
    )
    return [
        Transient(
            name=HPZ_SECONDARY,
            bytes=released * width,
            phases=phases,
            formula=formula.format(what="non-persistent", elems=released),
            source=HPZ_SOURCE,
        ),
        Transient(
            name=HPZ_SECONDARY_PERSISTENT,
            bytes=persistent * width,
            phases=("optimizer_step",),
            formula=formula.format(what="persistent", elems=persistent),
            source=HPZ_SOURCE,
        ),
    ]


# The step's transients that DeepSpeed allocates inside the boundary engine.step() (the rest
# exist before it: the reduction bucket and BF16_Optimizer's all-reduce belong to the
# backward's epilogue, ZeRO-3's gathered parameters to forward and backward, hpZ's released
# secondaries to the forward). memplan verify measures what engine.step() allocates on CPU
# (memplan.verify.deepspeed_engine.step_peak) against their sum.
FP32_GRADIENT_PARTITION = "deepspeed_fp32_gradient_partition"
ALLOCATED_IN_STEP = frozenset({FP32_GRADIENT_PARTITION, HPZ_SECONDARY_PERSISTENT})


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


def bf16_grad_reduce(
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


def step_grads(
    *,
    stage: int,
    partition: int,
    sub_group: int,
    grad: str,
    bf16_optimizer: bool = False,
    parameters: str = "",
    largest_piece: int = 0,
) -> Transient:
    """DeepSpeed converts this rank's gradient partition to fp32 for the optimizer, one group
    (stage 1/2) or sub-group (stage 3) at a time (SRC_STEP_GRADS, 0.19.8):
    `self.flatten(averaged_gradients).to(fp32)`, a flat copy in the gradients' dtype (made
    whatever that dtype, fp32 included: `flatten_dense_tensors` concatenates) plus its fp32
    cast when that dtype is not fp32; both are alive until the cast returns. Under ZeRO-2 with
    fp32 accumulation of a 16-bit model the gradients already sit in one compact flat fp32
    partition (`_use_compact_grad_partition_buffer`): its view is used, no copy. Before that,
    the gradient norm (get_grad_norm_direct) casts each gradient piece of the partition to
    fp64 (NORM_DTYPE) in turn: `largest_piece` elements x 8 B, freed before the flatten. The
    two moments follow each other: the term is the larger. Measured on CPU gloo ranks for
    ZeRO-1/2 (benchmarks/verify_deepspeed.py --step).

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
    if stage == 0:
        return Transient(
            name=FP32_GRADIENT_PARTITION,
            bytes=0,
            phases=("optimizer_step",),
            formula="fp32 gradients, no wrapper: the optimizer steps the parameters' .grad",
            source="deepspeed/runtime/engine.py::_configure_optimizer (0.19.8)",
        )
    elems = min(partition, sub_group) if stage == 3 else partition
    compact = stage in (1, 2) and grad == "fp32" and parameters not in ("fp32", "")
    flat = 0 if compact else elems * dtype_bytes(grad)
    cast = elems * dtype_bytes("fp32") if grad != "fp32" else 0
    norm = largest_piece * dtype_bytes(NORM_DTYPE)
    prepared = (
        "compact fp32 buffer: a view, no copy"
        if compact
        else (
            f"{elems:,} x {dtype_bytes(grad)} B (flatten)"
            + (f" + {elems:,} x 4 B (.to(fp32))" if cast else "")
        )
    )
    return Transient(
        name=FP32_GRADIENT_PARTITION,
        bytes=max(norm, flat + cast),
        phases=("optimizer_step",),
        formula=f"max({largest_piece:,} x {dtype_bytes(NORM_DTYPE)} B (largest gradient piece "
        f"cast to {NORM_DTYPE} for the norm), {prepared})",
        source=SRC_STEP_GRADS,
    )


# Gradient norms accumulate in fp64 (deepspeed/runtime/zero/utils.py::get_norm_dtype, 0.19.8:
# `torch.double` wherever the accelerator supports fp64, CUDA and CPU included).
NORM_DTYPE = "fp64"
SRC_STEP_GRADS = (
    "deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer.step, get_grad_norm_direct, "
    "_get_preflattened_grad_partition; stage3.py::_prepare_fp32_grad_for_sub_group, "
    "_get_norm_groups; zero/utils.py::get_norm_dtype (0.19.8)"
)


def _largest_layer(params: Iterable[TensorSpec]) -> int:
    sizes: dict[int, int] = {}
    for t in params:
        if t.layer is not None:
            sizes[t.layer] = sizes.get(t.layer, 0) + t.numel
    return max(sizes.values(), default=0)


def _largest_root(params: Iterable[TensorSpec]) -> int:
    return max((t.numel for t in params if t.layer is None), default=0)
