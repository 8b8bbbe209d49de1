"""DeepSpeed ZeRO stages 0-3: flat 16-bit buffers, fp32 partitions, and their padding.

Read from deepspeedai/DeepSpeed 0.19.6 (commit edaa7221). Abbreviations in comments:
S12 = deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer.__init__,
S3 = deepspeed/runtime/zero/stage3.py::DeepSpeedZeroOptimizer_Stage3,
PP = deepspeed/runtime/zero/partition_parameters.py::Init._partition_param.
BF16_Optimizer (deepspeed/runtime/bf16_optimizer.py) and its selection are read from 0.19.8.
The defaults of the config keys are in deepspeed/runtime/zero/config.py::DeepSpeedZeroConfig.
Stage 3's rule, with MiCS and hpZ, is memplan.states.engines.deepspeed.zero3.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.layout import Layout
from memplan.states.terms import (
    EngineRule,
    RankStates,
    Term,
    fmt,
    grad_dtype,
    optimizer_terms,
    round_up,
    term,
    trainable,
    whole,
    whole_by_dtype,
)

SRC_S12 = "deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer.__init__ (0.19.6)"
SRC_S3 = "deepspeed/runtime/zero/stage3.py::DeepSpeedZeroOptimizer_Stage3 (0.19.6)"
SRC_PP = "deepspeed/runtime/zero/partition_parameters.py::Init._partition_param (0.19.6)"
SRC_FP16_OPT = "deepspeed/runtime/fp16/fused_optimizer.py::FP16_Optimizer.__init__ (0.19.6)"
SRC_BF16 = "deepspeed/runtime/bf16_optimizer.py::BF16_Optimizer._setup_for_real_optimizer (0.19.8)"
SRC_SELECT = "deepspeed/runtime/engine.py::_do_optimizer_sanity_check (0.19.8)"
SRC_HPZ = "deepspeed/runtime/zero/partition_parameters.py::Init._partition_param_sec (0.19.8)"
# MiCS: read at 0.19.6, the last release with it (0.19.7 removed it); run at 0.19.2, whose
# mics.py differs only in a boundary test, since 0.19.3-0.19.6 hang with more than one shard
# group (memplan/verify/refusals.py::_check_deepspeed says why).
SRC_MICS = (
    "deepspeed/runtime/zero/mics.py::MiCS_Init, MiCS_Optimizer (0.19.6; run at 0.19.2: "
    "benchmarks/results/verify-deepspeed.json)"
)
SRC_FUSED_ADAM = "deepspeed/ops/adam/fused_adam.py::FusedAdam.step (0.19.6): step is a Python int"

# S12: `nccl_start_alignment_factor = 2`, whatever the dtype; each group's flat buffer is
# padded to a multiple of 2 x world size (runtime/utils.py::align_dense_tensors).
NCCL_START_ALIGNMENT_FACTOR = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepSpeedKnobs:
    """The DeepSpeed config keys that change model-state bytes (their defaults)."""

    sub_group_size: int = 10**9
    """zero_optimization.sub_group_size: fp32 partition elements per optimizer sub-group."""
    stage3_param_persistence_threshold: int = 10**5
    """Parameters with numel <= this stay gathered on every rank (S3 / parameter_offload.py)."""
    pipeline: bool = False
    """The model is a PipelineModule (pipeline parallel): selects BF16_Optimizer at ZeRO-0."""
    offload_optimizer: str = "none"
    """zero_optimization.offload_optimizer.device: cpu keeps ZeRO-1 off BF16_Optimizer."""
    mics_shard_size: int = -1
    """zero_optimization.mics_shard_size: > 0 shards ZeRO-3's model states over groups of this
    many data ranks (MiCS, 0.19.6)."""
    zero_hpz_partition_size: int = 1
    """zero_optimization.zero_hpz_partition_size: > 1 adds ZeRO++'s secondary partition."""

    @classmethod
    def of(cls, layout: Layout) -> DeepSpeedKnobs:
        """The knobs of `layout` (its `deepspeed` config keys, pipeline and offload)."""
        return cls(
            sub_group_size=layout.deepspeed.sub_group_size,
            stage3_param_persistence_threshold=layout.deepspeed.stage3_param_persistence_threshold,
            pipeline=layout.pipeline > 1,
            offload_optimizer=layout.offload.optimizer,
            mics_shard_size=layout.deepspeed.mics_shard_size,
            zero_hpz_partition_size=layout.deepspeed.zero_hpz_partition_size,
        )


# The flat gradient buffer of BF16_Optimizer: allocated at init, zeroed after each step, never
# freed (memplan.states.engines.deepspeed.STEP keeps it alive in every phase).
FLAT_GRADIENT_BUFFER = "flat gradient buffer"

# hpZ's secondary partition of the frozen parameters: kept for the whole run (stage3).
HPZ_FROZEN = "hpZ secondary partition (frozen)"


def selects_bf16_optimizer(
    stage: int, recipe: Recipe, *, pipeline: bool, offload_optimizer: str
) -> bool:
    """Whether DeepSpeed wraps the optimizer in BF16_Optimizer (SRC_SELECT): a bf16 model
    with fp32 gradient accumulation (`data_types.grad_accum_dtype`) at ZeRO stage 1 without
    CPU optimizer offload (`zero_cpu_offload()` is `offload_optimizer.device == cpu`), or a
    bf16 model accumulating in bf16 (the default: the model's dtype) at stage 0 under
    pipeline parallelism. Every other case keeps its ZeRO or FP16_Optimizer rule."""
    if recipe.parameters != "bf16":
        return False
    accumulate_in = recipe.gradient_accumulation or recipe.parameters
    if stage == 1:
        return accumulate_in == "fp32" and offload_optimizer != "cpu"
    return stage == 0 and pipeline and accumulate_in == "bf16"


def _int_step(opt: OptimizerConfig) -> bool:
    """DeepSpeed's own optimizers for these names count steps in a Python int
    (engine.py::_configure_basic_optimizer picks FusedAdam / FusedLion)."""
    return opt.name in ("adam", "adamw", "lion")


def _master_dtype(recipe: Recipe) -> str:
    """DeepSpeed always keeps its own copy of the partition in the master dtype; without a
    *-mixed recipe that copy is in the optimizer-state dtype (S12: `.to(master dtype)`)."""
    return recipe.master_weights or recipe.optimizer_states


def _flat_optimizer(
    shapes: Sequence[tuple[int, ...]],
    *,
    opt: OptimizerConfig,
    recipe: Recipe,
    layout: Layout,
    view: str,
    source: str,
) -> tuple[list[Term], list[Term]]:
    ds_recipe = replace(recipe, master_weights=_master_dtype(recipe))
    return optimizer_terms(
        shapes,
        opt=opt,
        recipe=ds_recipe,
        layout=layout,
        view=view,
        source=source,
        step_is_int=_int_step(opt),
    )


def stage0(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    """No ZeRO. With a 16-bit recipe DeepSpeed wraps the optimizer in FP16_Optimizer: a flat
    16-bit buffer, per-parameter 16-bit grads, and a full flat fp32 master the optimizer
    updates as one tensor (SRC_FP16_OPT). Otherwise the optimizer sees every parameter."""
    accumulate_in = recipe.gradient_accumulation
    if accumulate_in and accumulate_in != recipe.parameters:
        # deepspeed/runtime/engine.py::_do_optimizer_sanity_check (0.19.8): without ZeRO, a
        # model dtype that differs from grad_accum_dtype raises NotImplementedError ("unsupported
        # mix"); BF16_Optimizer (bf16 + fp32 accumulation) is selected for ZeRO stage 1.
        raise MemplanError(
            f"DeepSpeed without ZeRO (zero_stage 0) cannot accumulate {recipe.parameters} "
            f"gradients in {accumulate_in} (engine.py::_do_optimizer_sanity_check raises "
            "NotImplementedError); use zero_stage 1, which selects BF16_Optimizer for bf16 with "
            "fp32 accumulation, or drop precision.gradient_accumulation.",
            field="precision.gradient_accumulation",
        )
    params = inventory.parameters
    train = trainable(params)
    terms = [
        *whole_by_dtype("parameters", "parameters", recipe.parameters, params, SRC_FP16_OPT),
        whole("gradients", "gradients", grad_dtype(recipe), train, SRC_FP16_OPT),
    ]
    if recipe.master_weights:
        shapes = [(sum(p.numel for p in train),)]
        device, host = _flat_optimizer(
            shapes,
            opt=opt,
            recipe=recipe,
            layout=layout,
            view="flat fp32 master",
            source=SRC_FP16_OPT,
        )
    else:
        device, host = optimizer_terms(
            (p.shape for p in train),
            opt=opt,
            recipe=recipe,
            layout=layout,
            view="tensors",
            source=SRC_FUSED_ADAM,
            step_is_int=_int_step(opt),
        )
    return [RankStates(ranks=tuple(range(world)), terms=(*terms, *device), host_terms=tuple(host))]


def stage12_partition(num_elements: int, world: int) -> tuple[int, int]:
    """(padded flat elements, partition elements per rank) of one param group (S12)."""
    padded = round_up(num_elements, NCCL_START_ALIGNMENT_FACTOR * world)
    return padded, padded // world


def grads_in_partition(numels: list[int], world: int, partition: int) -> list[int]:
    """Per rank: elements of the stage-2 `grads_in_partition` buffer.

    S12::copy_grads_in_partition allocates the *whole* numel of every parameter that overlaps
    the rank's partition [r*P, (r+1)*P), so a parameter across a boundary counts on both.
    The part of a partition past the last parameter (the flat buffer's alignment padding) is
    a zero tensor of its own: `get_flat_partition` appends `torch.zeros(partition_size -
    current_size)` to the last data rank's list and hands a rank with no parameter a zero
    buffer of the whole partition (stage_1_and_2.py::DeepSpeedZeroOptimizer.
    get_flat_partition, 0.19.8; measured with DeepSpeed's engine on 3 gloo ranks,
    benchmarks/results/verify-deepspeed.json).
    """
    ends = list(accumulate(numels))
    starts = [e - n for e, n in zip(ends, numels, strict=True)]
    prefix = [0, *ends]
    out = []
    for rank in range(world):
        lo, hi = rank * partition, (rank + 1) * partition
        first = bisect.bisect_right(ends, lo)  # first parameter ending after lo
        last = bisect.bisect_left(starts, hi)  # first parameter starting at or after hi
        padding = max(0, hi - max(lo, ends[-1] if ends else 0))
        out.append((prefix[last] - prefix[first] if last > first else 0) + padding)
    return out


def stage12(stage: int) -> EngineRule:
    def rule(
        inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
    ) -> list[RankStates]:
        """ZeRO-1/2: the 16-bit flat buffer is full (padded) on every rank; each rank's optimizer
        updates its fp32 partition as one flat tensor. Stage 1 keeps every full 16-bit `.grad`
        between micro-steps; stage 2 keeps only `grads_in_partition` (SRC_S12)."""
        # Only `requires_grad` parameters enter the flat bit16 groups (S12: the
        # `trainable_parameters` of each param group); frozen ones stay ordinary module
        # parameters, whole on every rank. A parameter the loss never reaches
        # (TensorSpec.gradient False) keeps its place in the flat buffers and the fp32
        # partition: stage_1_and_2.py::get_flat_partition fills a None `.grad` with zeros, so
        # its gradient and optimizer-state bytes stay counted.
        params = trainable(inventory.parameters)
        frozen = [p for p in inventory.parameters if not p.trainable]
        n = sum(p.numel for p in params)
        padded, part = stage12_partition(n, world)
        p_dtype, g_dtype = recipe.parameters, grad_dtype(recipe)
        flat = term(
            "parameters",
            "parameters",
            p_dtype,
            len(params),
            padded,
            f"flat buffer: {fmt(n)} elements padded to a multiple of "
            f"{NCCL_START_ALIGNMENT_FACTOR} x {world} = {fmt(padded)} x "
            f"{dtype_bytes(p_dtype)} B ({p_dtype})",
            SRC_S12,
        )
        device, host = _flat_optimizer(
            [(part,)],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view=f"flat partition ({fmt(padded)} / {world})",
            source=SRC_S12,
        )
        held = whole_by_dtype("parameters", "frozen parameters", p_dtype, frozen, SRC_S12)
        flat_terms: tuple[Term, ...] = (flat, *held) if frozen else (flat,)
        if stage == 1:
            grads = whole(
                "gradients",
                "gradients",
                g_dtype,
                params,
                SRC_S12 + ": stage 1 keeps each full 16-bit .grad until the boundary",
            )
            return [
                RankStates(
                    ranks=tuple(range(world)),
                    terms=(*flat_terms, grads, *device),
                    host_terms=tuple(host),
                )
            ]
        if inventory.is_bare_count:
            # A bare parameter count has no tensor boundaries: count the partition itself (the
            # ZeRO paper's 2 Psi / N_d), not the one stand-in tensor that overlaps every rank.
            per_rank = [part] * world
        else:
            per_rank = grads_in_partition([p.numel for p in params], world, part)
        # group_ranks(per-rank states, key=the gradients row's elements) without building the
        # states of every rank: a class is a run of ranks with equal `per_rank`, its row and
        # states made once, for its first rank (a row per class, not per rank: the rows of
        # its other ranks were dropped by group_ranks unread).
        runs: list[list[int]] = []
        for rank, elems in enumerate(per_rank):
            if runs and per_rank[runs[-1][0]] == elems:
                runs[-1].append(rank)
            else:
                runs.append([rank])
        out = []
        for ranks in runs:
            rank, elems = ranks[0], per_rank[ranks[0]]
            grads = term(
                "gradients",
                "gradients",
                g_dtype,
                len(params),
                elems,
                f"grads_in_partition: whole parameters overlapping elements "
                f"[{fmt(rank * part)}, {fmt((rank + 1) * part)}) = {fmt(elems)} x "
                f"{dtype_bytes(g_dtype)} B ({g_dtype})",
                SRC_S12 + "::copy_grads_in_partition",
            )
            out.append(
                RankStates(
                    ranks=tuple(ranks),
                    terms=(*flat_terms, grads, *device),
                    host_terms=tuple(host),
                )
            )
        return out

    return rule


def bf16_optimizer(offload_optimizer: str) -> EngineRule:
    def rule(
        inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
    ) -> list[RankStates]:
        """BF16_Optimizer (SRC_BF16), per rank and param group: the bf16 flat buffer
        `bf16_groups_flat`, padded to a multiple of 2 x world, that the parameters point into;
        autograd's own bf16 `.grad` of each parameter (kept between micro-steps, set to None by
        zero_grad after the step); `fp32_groups_gradients_flat`, a buffer as long as the padded
        flat buffer in the accumulation dtype, into which each backward adds the `.grad`s
        (`_update_hp_grad`); and `fp32_groups_flat_partition`, this rank's 1 / world of the
        flat buffer in fp32 (`.clone().float()`, whatever the recipe), the only tensor the
        wrapped optimizer updates, so its states are one flat partition too."""
        if offload_optimizer == "nvme":
            raise MemplanError(
                "DeepSpeed selects BF16_Optimizer for a bf16 model with fp32 gradient "
                f"accumulation at zero_stage 1 ({SRC_SELECT} tests only for CPU offload), and "
                "BF16_Optimizer has no optimizer offload: memplan does not model an NVMe offload "
                "that DeepSpeed ignores. Set parallelism.offload.optimizer to none or cpu.",
                field="parallelism.offload.optimizer",
            )
        params = trainable(inventory.parameters)  # bf16_optimizer.py: is_optimized_parameter
        frozen = [p for p in inventory.parameters if not p.trainable]
        n = sum(p.numel for p in params)
        # `_flatten_dense_tensors_aligned(..., nccl_start_alignment_factor * world)`, the
        # same alignment as stage 1/2 (runtime/utils.py::align_dense_tensors).
        padded, part = stage12_partition(n, world)
        p_dtype = recipe.parameters
        acc_dtype = recipe.gradient_accumulation or p_dtype  # engine.py::get_data_types
        terms = [
            term(
                "parameters",
                "parameters",
                p_dtype,
                len(params),
                padded,
                f"bf16_groups_flat: {fmt(n)} elements padded to a multiple of "
                f"{NCCL_START_ALIGNMENT_FACTOR} x {world} = {fmt(padded)} x "
                f"{dtype_bytes(p_dtype)} B ({p_dtype})",
                SRC_BF16,
            ),
            *(
                whole_by_dtype("parameters", "frozen parameters", p_dtype, frozen, SRC_BF16)
                if frozen
                else ()
            ),
            whole(
                "gradients",
                "gradients",
                p_dtype,
                params,
                "torch autograd: each parameter's .grad in its own dtype; "
                "bf16_optimizer.py::clear_lp_grads zeroes them before each backward",
            ),
            term(
                "gradients",
                FLAT_GRADIENT_BUFFER,
                acc_dtype,
                1,
                padded,
                f"fp32_groups_gradients_flat: zeros_like(bf16_groups_flat, grad_acc_dtype) = "
                f"{fmt(padded)} x {dtype_bytes(acc_dtype)} B ({acc_dtype})",
                SRC_BF16,
            ),
        ]
        fp32 = replace(recipe, master_weights="fp32", optimizer_states="fp32")
        device, host = _flat_optimizer(
            [(part,)],
            opt=opt,
            recipe=fp32,
            layout=layout,
            view=f"fp32_groups_flat_partition ({fmt(padded)} / {world})",
            source=SRC_BF16,
        )
        return [
            RankStates(ranks=tuple(range(world)), terms=(*terms, *device), host_terms=tuple(host))
        ]

    return rule


def rule_for(stage: int, knobs: DeepSpeedKnobs) -> EngineRule:
    base: EngineRule
    if stage == 0:
        base = stage0
    elif stage in (1, 2):
        base = stage12(stage)
    else:
        # ZeRO-3's rule imports this module's knobs and sources: imported here, not above.
        from memplan.states.engines.deepspeed.zero3 import stage3

        return stage3(knobs)
    if stage == 2:
        return base
    bf16 = bf16_optimizer(knobs.offload_optimizer)

    def rule(
        inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
    ) -> list[RankStates]:
        selected = selects_bf16_optimizer(
            stage, recipe, pipeline=knobs.pipeline, offload_optimizer=knobs.offload_optimizer
        )
        return (bf16 if selected else base)(inventory, recipe, opt, layout, world)

    return rule
