"""DeepSpeed ZeRO stages 0-3: who holds which model states (sharding), the buffers its step
adds (step), and the hooks that put them into the step's timeline (STEP)."""

from __future__ import annotations

from memplan.memory import Transient
from memplan.states.engines.base import EngineStep, GradientLife, StepCache, StepStates
from memplan.states.engines.deepspeed import step
from memplan.states.engines.deepspeed.sharding import (
    FLAT_GRADIENT_BUFFER,
    selects_bf16_optimizer,
)


def is_flat_gradient_buffer(name: str) -> bool:
    """BF16_Optimizer's flat gradient buffer row, the dense group's or the experts'."""
    return name.removesuffix(" (experts)") == FLAT_GRADIENT_BUFFER


def _state_transients(states: StepStates, cache: StepCache) -> list[Transient]:
    """The gradients' way to the optimizer: BF16_Optimizer's all-reduce of its flat buffers
    (no ZeRO reduction bucket: the dense group's, then the experts', one at a time) or the
    ZeRO reduction bucket; ZeRO-3's gathered parameters; the fp32 gradient partition the
    optimizer steps with."""
    layout, recipe, inventory = states.layout, states.recipe, states.inventory
    ds, zero = layout.deepspeed, layout.stage
    bf16_optimizer = selects_bf16_optimizer(
        zero, recipe, pipeline=layout.pipeline > 1, offload_optimizer=layout.offload.optimizer
    )
    out: list[Transient | None] = []
    if bf16_optimizer:
        flats = [t for t in states.per_gpu.terms if is_flat_gradient_buffer(t.name)]
        if flats:
            flat = max(flats, key=lambda t: t.elements)
            largest = max((p.numel for p in inventory.parameters if p.trainable), default=0)
            out.append(
                step.bf16_grad_reduce(
                    padded=flat.elements,
                    largest=largest,
                    accumulate=flat.dtype,
                    communication=ds.communication_data_type or recipe.parameters,
                )
            )
    else:
        out.append(
            step.reduce_bucket(
                stage=zero,
                reduce_bucket_size=ds.reduce_bucket_size,
                dtype=step.reduce_bucket_dtype(
                    stage=zero,
                    parameters=recipe.parameters,
                    accumulate=recipe.gradient_accumulation,
                    communication=ds.communication_data_type,
                ),
                overlap_comm=ds.overlap_comm,
            )
        )
    if zero == 3 and ds.zero_hpz_partition_size > 1:
        threshold = ds.stage3_param_persistence_threshold
        out += step.hpz_secondary(
            ((p.numel, p.numel <= threshold) for p in inventory.parameters if p.trainable),
            world=layout.data,
            hpz=ds.zero_hpz_partition_size,
            dtype=recipe.parameters,
        )
    if zero == 3 and layout.data > 1:
        out.append(
            step.zero3_live_parameters(
                cache.get(("modules", inventory), lambda: step.module_sizes(inventory)),
                dtype=recipe.parameters,
                prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                max_live_parameters=ds.stage3_max_live_parameters,
            )
        )
    masters = sum(t.elements for t in states.per_gpu.terms if t.name == "master_weights")
    partition = masters or -(-inventory.num_parameters // layout.data)
    largest = max((p.numel for p in inventory.parameters if p.trainable), default=0)
    out.append(
        step.step_grads(
            stage=zero,
            partition=partition,
            sub_group=ds.sub_group_size,
            grad=recipe.gradient_accumulation or recipe.gradients,
            bf16_optimizer=bf16_optimizer,
            parameters=recipe.parameters,
            # the largest gradient piece the norm casts: a whole tensor within the partition
            # (stage 1/2), or one rank's share of it (stage 3: every tensor is partitioned)
            largest_piece=-(-largest // layout.data) if zero == 3 else min(largest, partition),
        )
    )
    return [t for t in out if t is not None]


def _gradients(states: StepStates, cache: StepCache) -> GradientLife:
    """BF16_Optimizer's flat gradient buffer is allocated at init and never freed; ZeRO-3
    keeps its gradient partitions in `grad_partitions_flat_buffer`, zeroed, never freed
    (memplan.states.engines.deepspeed.sharding). ZeRO-2's gradient rows are
    `grads_in_partition`, one flat buffer allocated whole at the first parameter's copy into
    it (deepspeed 0.19.8 runtime/zero/stage_1_and_2.py::copy_grads_in_partition,
    `torch.empty(total_size)`), not layer by layer: the first decoder layer's backward holds
    no more of them than the backward point (its timeline keeps the head's share there)."""
    held = sum(t.bytes for t in states.per_gpu.terms if is_flat_gradient_buffer(t.name))
    return GradientLife(
        held_bytes=held, whole_run=states.layout.stage == 3, layer_by_layer=states.layout.stage != 2
    )


STEP = EngineStep(states=_state_transients, gradients=_gradients)
