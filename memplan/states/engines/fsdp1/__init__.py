"""torch FSDP1 `FullyShardedDataParallel`, wrapped as accelerate wraps a transformers model:
who holds which model states (sharding), the buffers its step adds (step), and the hooks
that put them into the step's timeline (STEP)."""

from __future__ import annotations

from memplan.errors import MemplanError
from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states import optimizer_step
from memplan.states.engines.base import (
    EngineStep,
    GradientLife,
    StepActivations,
    StepCache,
    StepStates,
    embedding_backward,
)
from memplan.states.engines.fsdp1 import offload
from memplan.states.engines.fsdp1.accumulation import (
    accumulated_gradients,
    new_gradients_beside_kept,
)
from memplan.states.engines.fsdp1.sharding import FlatUnit, compute_dtype, flat_units, local_sizes
from memplan.states.engines.fsdp1.step import root_gradient_pieces, step_buffers


def offloaded(states: StepStates) -> bool:
    """CPUOffload(offload_params=True): parallelism.offload.parameters cpu (the optimizer
    follows the parameters to the host; memplan.config.parallelism checks the rest)."""
    return states.layout.offload.parameters != "none"


def _units(states: StepStates) -> tuple[FlatUnit, ...]:
    layout = states.layout
    return flat_units(states.inventory, compute_dtype(states.recipe), layout.data, layout.stage)


def _state_transients(states: StepStates, cache: StepCache) -> list[Transient]:
    """The torch.optim step over a rank's 1-D pieces of the original parameters, in
    model.parameters() order (memplan.states.optimizer_step.torch_optimizer_step; under a
    sharded strategy each rank's own pieces, fsdp1.sharding.local_sizes). The pieces differ
    from rank to rank far more than the model states do (a rank may hold a whole matrix
    where another holds slivers), so the rank whose step holds the most counts: the job's
    peak, not the most-loaded rank's alone (benchmarks/results/fsdp1.json: on 4 ranks the
    for-loop step of rank 1 holds 47 KB more than rank 0's, whose states are 52 B more)."""
    if offloaded(states):
        # CPUOffload: the optimizer steps the host shards (memplan.states.engines.fsdp1.offload);
        # its temporaries are host memory, not the GPU's
        return []
    if states.optimizer.name == "adafactor-hf":
        temporaries = optimizer_step.step_temporaries(states, cache, shards=1)
        return [temporaries] if temporaries is not None else []
    layout, units = states.layout, _units(states)
    per_element = [
        t.elements
        for t in states.per_gpu.terms
        if t.category == "optimizer_states" and t.name not in ("step", "mu_product")
    ]

    def worst() -> list[Transient]:
        ranks = range(layout.data) if layout.stage else range(1)
        every = dict.fromkeys(local_sizes(states.inventory, units, r) for r in ranks)
        steps = [
            optimizer_step.torch_optimizer_step(
                name=states.optimizer.name,
                implementation=states.optimizer.implementation,
                updated=max(per_element, default=0),
                sizes=sizes,
                dtype=states.recipe.optimizer_states,
            )
            for sizes in every
        ]
        made = [t for t in steps if t is not None]
        return [max(made, key=lambda t: t.bytes)] if made else []

    key = (
        "fsdp1 step",
        states.inventory,
        units,
        states.optimizer,
        states.recipe.optimizer_states,
        max(per_element, default=0),
    )
    return cache.get(key, worst)


def _backward_end(states: StepStates, acts: StepActivations, cache: StepCache) -> list[Transient]:
    """FSDP1's buffers over more than one rank with a sharded strategy (fsdp1.step), else the
    embedding's backward."""
    layout, recipe = states.layout, states.recipe
    accumulating = acts.microbatches > 1 and layout.data > 1
    if accumulating and offloaded(states):
        raise MemplanError(
            f"engine fsdp1 with offload and {acts.microbatches} micro-batches per step is not "
            "modelled: under no_sync() FSDP1 keeps the unsharded gradients on the GPU and "
            "offloads them only after the last micro-batch (torch/distributed/fsdp/"
            "fully_sharded_data_parallel.py::no_sync), and writes the original parameters' "
            "gradients back into the host shard (_flat_param.py::_writeback_orig_params), "
            "which a CPU run measures differently from a GPU's (2 gloo ranks, FULL_SHARD bf16, "
            "2 micro-batches: the rule 27% short of the forward peak and 8% to 12% of the "
            "backward's, benchmarks/results/fsdp1-offload.json). Set "
            "training.gradient_accumulation_steps: 1, or offload to none.",
            field="training.gradient_accumulation_steps",
        )
    prefetch = layout.fsdp1_backward_prefetch
    if layout.data > 1 and prefetch != "none" and layout.stage == 0:
        raise MemplanError(
            f"engine fsdp1 with fsdp1_backward_prefetch {prefetch} and NO_SHARD (zero_stage 0) "
            "is not modelled: not measured (benchmarks/results/fsdp1-prefetch.json runs "
            "FULL_SHARD and SHARD_GRAD_OP without offload). Set "
            "parallelism.fsdp1_backward_prefetch: none.",
            field="parallelism.fsdp1_backward_prefetch",
        )
    if layout.data > 1 and prefetch != "none" and offloaded(states) and layout.stage != 3:
        # FULL_SHARD with offload and prefetch: measured (fsdp1-offload.json, 2 ranks)
        raise MemplanError(
            f"engine fsdp1 with fsdp1_backward_prefetch {prefetch}, offload and SHARD_GRAD_OP "
            "(zero_stage 2) is not modelled: not measured (benchmarks/results/"
            "fsdp1-offload.json runs offload with prefetch under FULL_SHARD only). Set "
            "parallelism.fsdp1_backward_prefetch: none, or zero_stage 3.",
            field="parallelism.fsdp1_backward_prefetch",
        )
    if layout.data <= 1:
        return embedding_backward(states, acts, cache)
    if layout.stage == 0 and not recipe.master_weights:
        units = _units(states)
        pieces = root_gradient_pieces(units, param=recipe.parameters)
        kept = new_gradients_beside_kept(units, param=recipe.parameters) if accumulating else []
        embedding = acts.embedding_backward
        if pieces is None or (embedding is not None and embedding.bytes >= pieces.bytes):
            return embedding_backward(states, acts, cache) + kept
        return [pieces, *kept]
    units, param = _units(states), compute_dtype(recipe)
    buffers = step_buffers(
        units,
        stage=layout.stage,
        world=layout.data,
        param=param,
        at_rest=recipe.master_weights or recipe.parameters,
        embedding_backward=acts.embedding_backward,
        layer_done=_layer_done(acts),
        accumulating=accumulating,
        prefetch=layout.fsdp1_backward_prefetch,
        gloo=states.device == "cpu",
    )
    if accumulating:
        buffers += accumulated_gradients(units, param=param)
    if offloaded(states):
        buffers += _offload_buffers(states, acts, units)
    return buffers


def _offload_buffers(
    states: StepStates, acts: StepActivations, units: tuple[FlatUnit, ...]
) -> list[Transient]:
    """What CPUOffload keeps on the compute device besides step_buffers'
    (memplan.states.engines.fsdp1.offload): the sharded gradients until the end of backward;
    on a GPU the host shard's copy beside each all-gather, on CPU ranks (the compute device is
    the host) FULL_SHARD's gradient shards from each pre-backward instead."""
    recipe, layout = states.recipe, states.layout
    at_rest = recipe.master_weights or recipe.parameters
    out = offload.device_gradients(units, at_rest=at_rest)
    if states.device == "cpu":
        if layout.stage == 3:
            out += offload.cpu_writeback(
                units, at_rest=at_rest, prefetch=layout.fsdp1_backward_prefetch
            )
        return out
    layer = acts.layer or 0
    return out + offload.shard_copies(
        [u for u in units if u.name != "root"],
        at_rest=at_rest,
        forward_room=layer + acts.forward_working_set,
        backward_room=acts.backward_working_set,
        stage=layout.stage,
    )


def _layer_done(acts: StepActivations) -> int:
    """What a decoder layer's backward has freed by its post-backward hook, against the
    timeline's backward point (every layer's saved tensors and the backward working set): its
    own saved tensors and its working set, less the input gradient it leaves (as FSDP2's
    memplan.states.engines.fsdp2.moments.layer_backward counts it)."""
    if acts.layer is None:
        return 0
    return acts.layer + max(0, acts.backward_working_set - acts.hidden_gradient)


def _gradients(states: StepStates, cache: StepCache) -> GradientLife:
    """With a sharded strategy over more than one rank, each unit's sharded gradient is made
    in its post-backward, the root's last (its shard of the at-rest gradient); with
    gradient accumulation only in the last micro-batch's (the earlier ones run under
    no_sync(): memplan.states.engines.fsdp1.accumulation), so none is alive before the last
    backward (`pipelined`: the same life as torch pipelining's gradients; it changes
    nothing at one micro-batch). The sharded units' gradients are made per layer, but the
    first decoder layer's backward is not walked for them (memplan.step.transients.
    first_layer_backward counts autograd's gradients only): their layers' unsharded
    parameters (UNSHARDED_LAYERS under SHARD_GRAD_OP) go per layer too, and no verify run
    measures that moment yet."""
    layout = states.layout
    if offloaded(states):
        return GradientLife()  # on the host (the device's: fsdp1.offload.device_gradients)
    if layout.data <= 1 or (layout.stage == 0 and not states.recipe.master_weights):
        return GradientLife()
    root = next((u for u in _units(states) if u.name == "root"), None)
    at_rest = states.recipe.master_weights or states.recipe.parameters
    return GradientLife(
        post_backward_bytes=root.shard * dtype_bytes(at_rest) if root else 0, pipelined=True
    )


STEP = EngineStep(
    states=_state_transients,
    backward_end=_backward_end,
    gradients=_gradients,
)
