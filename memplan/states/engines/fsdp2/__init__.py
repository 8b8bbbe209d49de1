"""torch FSDP2 `fully_shard`: who holds which model states (sharding), the buffers it holds at
each phase of a step (step), its end of backward over DTensor tensor parallelism (tp), and
the hooks that put them into the step's timeline (STEP)."""

from __future__ import annotations

from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states import optimizer_step
from memplan.states.engines import dtensor_tp
from memplan.states.engines.base import (
    EngineStep,
    GradientLife,
    StepActivations,
    StepCache,
    StepStates,
    embedding_backward,
)
from memplan.states.engines.fsdp2 import fp8, pipeline, tp
from memplan.states.engines.fsdp2.buffers import (
    ALL_GATHER_STREAM,
    REDUCE_SCATTER_STREAM,
    OwnDtypes,
)
from memplan.states.engines.fsdp2.groups import fsdp2_root_gradients, groups_of
from memplan.states.engines.fsdp2.step import shard_dtype, step_buffers


def _state_transients(states: StepStates, cache: StepCache) -> list[Transient]:
    """The torch.optim step over this rank's shards (memplan.states.optimizer_step)."""
    temporaries = optimizer_step.step_temporaries(states, cache, shards=states.layout.fsdp_world)
    return [temporaries] if temporaries is not None else []


def _loss_transients(states: StepStates, acts: StepActivations) -> list[Transient]:
    """Under DTensor TP: loss_parallel's third tensor (memplan.states.engines.dtensor_tp)."""
    if states.layout.tensor <= 1 or not states.layout.vocab_parallel_loss:
        return []
    return [
        dtensor_tp.loss_parallel_log_softmax(acts.loss_fp32),
        dtensor_tp.loss_parallel_gradient(acts.loss_fp32),
    ]


def _backward_end(states: StepStates, acts: StepActivations, cache: StepCache) -> list[Transient]:
    """FSDP2's buffers over more than one data rank (`step_buffers`: its end of backward is the
    embedding's backward or the root's reduce-scatter, whichever holds more), and under
    DTensor TP the end-of-backward terms of memplan.states.engines.fsdp2.tp. On a one-rank
    mesh under TP the root's post-backward comes after the embedding's backward and holds
    more; without either it is the embedding's backward. Under pipelining, the stage's
    accumulated unsharded gradients (fsdp2.pipeline) come on top."""
    layout, recipe = states.layout, states.recipe
    accumulated = pipeline.accumulated_gradients(states, acts)
    if layout.fsdp_world <= 1 and layout.tensor <= 1:
        return embedding_backward(states, acts, cache) + accumulated
    groups = groups_of(states, cache)
    out = accumulated
    if layout.fsdp_world > 1:
        out += step_buffers(
            groups,
            world=layout.fsdp_world,
            param=recipe.parameters,
            grad=recipe.gradients,
            shard=shard_dtype(recipe),
            reshard=layout.stage == 3,
            gloo=states.device == "cpu",
            acts=acts,
            reduce=layout.reduce_dtype,
            # torchtitan's trainer computes the loss outside the model's forward
            # (torchtitan/trainer.py::Trainer.forward_backward_step, 0.3.0).
            loss_in_forward=layout.implementation != "torchtitan",
            replicate=layout.data_replicate,
            # memplan verify's MixedPrecisionPolicy sets param_dtype only under master
            # weights (memplan/verify/rank.py::_wrap).
            cast=recipe.master_weights is not None,
        )
        if states.fp8_all_gather:
            out += fp8.layer_cast_terms(
                states.inventory.parameters,
                layout.fsdp_world,
                param=recipe.parameters,
                precompute=states.fp8_precompute_scale,
                stream=ALL_GATHER_STREAM,
                wrap=layout.fsdp_groups,
                expert_parallel=layout.expert > 1,
                tensor=layout.tensor,
            )
    if layout.tensor > 1:
        out += tp.backward_end(
            states.inventory,
            groups,
            world=layout.fsdp_world,
            param=dtype_bytes(recipe.parameters),
            grad=dtype_bytes(recipe.gradients),
            reduce=dtype_bytes(layout.reduce_dtype) if layout.reduce_dtype else None,
            # As step_buffers' `cast`: the policy sets param_dtype only under master weights.
            own=OwnDtypes(
                param_dtype=recipe.parameters if recipe.master_weights is not None else None,
                reduce_dtype=layout.reduce_dtype,
            ),
        )
    return out


def _gradients(states: StepStates, cache: StepCache) -> GradientLife:
    """On more than one rank FSDP2 makes each group's sharded gradients in its post-backward,
    the root's last (fsdp2_root_gradients); one rank reduces nothing. Under pipelining
    every sharded gradient is made after the last micro-batch (fsdp2.pipeline). Over several
    ranks the layers' backward, k layers' sharded gradients made and their saved tensors
    freed, is walked by FSDP2's own term (moments.layer_backward), not by the timeline's
    first_layer_backward (memplan.step.timeline._first_layer_backward)."""
    if states.layout.pipeline > 1:
        return GradientLife(
            post_backward_bytes=states.per_gpu.bytes_of("gradients"), pipelined=True
        )
    if states.layout.fsdp_world <= 1:
        return GradientLife()
    root = fsdp2_root_gradients(groups_of(states, cache), shard=shard_dtype(states.recipe))
    return GradientLife(post_backward_bytes=root)


STEP = EngineStep(
    states=_state_transients,
    loss=_loss_transients,
    backward_end=_backward_end,
    gradients=_gradients,
    storage_shards=lambda layout: layout.fsdp_world,
    # The sharded gradients are views (or the cast) of foreach_reduce's output, made on the
    # reduce-scatter stream (memplan.states.engines.fsdp2.step, REDUCE_SCATTER_STREAM).
    gradient_stream=REDUCE_SCATTER_STREAM,
)
