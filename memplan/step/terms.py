"""What one step reads of the saved tensors, and its transient terms in order.

`of_saved` looks up, once per saved-tensor object, what the timeline needs of the activations
alone (bytes alive at each phase, the activation terms, the communication buffers alive, the
decoder-layer micro-batches in flight); `transients` lists every transient term of a step
(the engine's, the activations', the layout's buffers, the allocator's rounding, fp8's and
QLoRA's weight copies), which memplan.step.timeline places in the phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.activations import Activations
from memplan.memo import IdentityMemo
from memplan.memory import Phase, Transient
from memplan.model.inventory import Inventory
from memplan.precision import Recipe
from memplan.states import fp8
from memplan.states.engines import STEPS
from memplan.states.engines.base import StepActivations, StepCache, StepStates
from memplan.step import transients as own

if TYPE_CHECKING:
    from memplan.step.timeline import StepSettings


@dataclass(frozen=True, slots=True)
class OfSaved:
    """What the step reads of one GPU's saved tensors alone (`of_saved`)."""

    activations: dict[Phase, int]
    """Bytes saved alive at each phase (`_activations_by_phase`)."""
    activation_terms: tuple[Transient, ...]
    """memplan.step.transients.activation_terms"""
    buffers: tuple[Transient, ...]
    """The communication buffers alive (`_alive_buffers`)."""
    layers_in_flight: int
    """Decoder-layer micro-batches held (StepActivations.layers_in_flight)."""


_OF_SAVED: IdentityMemo[OfSaved] = IdentityMemo(4096)
"""Per saved-tensor object: plan's layouts that differ only in what the saved tensors do not
depend on (engine, ZeRO stage, offload, ...) get the same Activations object from
memplan.activations (its memos), and ask again for each."""


def of_saved(saved: Activations) -> OfSaved:
    hit = _OF_SAVED.get((saved,), None)
    if hit is not None:
        return hit
    return _OF_SAVED.put(
        (saved,),
        None,
        OfSaved(
            activations=_activations_by_phase(saved),
            activation_terms=tuple(own.activation_terms(saved)),
            buffers=tuple(_alive_buffers(saved)),
            layers_in_flight=sum(
                b.count
                for b in saved.blocks
                if b.name.removeprefix("in_flight.").split(".", 1)[0] == "layers"
            )
            if saved.modelled
            else 0,
        ),
    )


def _activations_by_phase(saved: Activations) -> dict[Phase, int]:
    """Saved bytes alive at each phase: all of them at the loss; outside it everything but
    the current micro-batch's head and loss (pipeline ranks also hold the in_flight.*
    blocks of earlier micro-batches); none once backward is done."""
    kept = sum(b.bytes for b in saved.blocks if b.name not in ("head", "loss") and not b.on_host)
    return {
        "start": 0,
        "forward": kept,
        "loss": saved.bytes,
        "backward_start": saved.bytes,
        "backward": kept,
        "backward_end": 0,
        "optimizer_step": 0,
    }


def transients(
    step: StepSettings,
    states: StepStates,
    saved: Activations,
    cache: StepCache,
    *,
    of: OfSaved | None = None,
) -> list[Transient]:
    """Every transient term of the step, in this order: the engine's model-state buffers
    (remembered per StepStates: plan asks again for every micro-batch size and recompute
    option of a layout), the step's activation terms, the engine's terms beside the loss,
    the layout's communication buffers, the end of backward (the engine's, or the
    embedding's backward), the allocator's rounding, fp8's and QLoRA's weight copies.
    `of`: `of_saved(saved)`, when already looked up."""
    engine = STEPS[step.layout.engine]
    out = list(cache.get(("engine states", states), lambda: tuple(engine.states(states, cache))))
    if of is None:
        of = of_saved(saved)
    activation_terms = of.activation_terms
    acts = _engine_view(
        states.inventory,
        saved,
        activation_terms,
        step.recipe,
        cache,
        microbatches=step.accumulation_steps,
        layers_in_flight=of.layers_in_flight,
    )
    out += activation_terms
    lay = step.layout
    if lay.pipeline_outputs_held and saved.modelled:
        from memplan.activations import pipeline  # only pipelines need the schedules

        held = pipeline.torch_outputs_held(lay.schedule, lay.pipeline, step.accumulation_steps)
        out += own.pipeline_output_chunks(saved, held=held)
    out += engine.loss(states, acts)
    out += of.buffers
    out += engine.backward_end(states, acts, cache)
    if step.device == "cuda":
        shards = engine.storage_shards(step.layout)
        out += own.rounding(saved, states.inventory, step.recipe, cache, storage_shards=shards)
    if step.fp8 in fp8.TE_RECIPES:
        out.append(
            own.fp8_weights(
                states.inventory,
                engine=step.layout.engine,
                accumulation=step.accumulation_steps,
                gpu=step.gpu,
            )
        )
    out += own.qlora_dequantized(
        states.inventory,
        step.finetune,
        compute=step.recipe.compute,
        implementation=saved.implementation,
        parameters=step.recipe.parameters,
    )
    if step.layout.engine == "fsdp2":
        out += own.qlora_fsdp2_bias(
            states.inventory,
            step.finetune,
            compute=step.recipe.compute,
            parameters=step.recipe.parameters,
        )
    head = own.qlora_head_backward(states.inventory, step.finetune, saved, recipe=step.recipe)
    if head is not None:
        out.append(head)
    return [t for t in out if t.bytes > 0]


def cheap_backward_end(
    step: StepSettings, states: StepStates, saved: Activations, cache: StepCache, of: OfSaved
) -> list[Transient]:
    """The terms of the engine's end of backward (EngineStep.backward_end, which `transients`
    lists) that cost little to work out, each one of those it returns, for
    memplan.step.timeline.floor_bytes: under FSDP2 with pipelining, the stage's unsharded
    gradients accumulated over the micro-batches (memplan.states.engines.fsdp2._backward_end
    returns fsdp2.pipeline.accumulated_gradients' terms first, on every path), worked out from
    the same engine view `transients` makes. Other engines: none. In the 405B search these
    gradients alone lift 523 of the 792 FSDP2 evaluations whose floor was under the budget
    and whose timeline peaked above it."""
    if states.layout.engine != "fsdp2" or states.layout.pipeline <= 1:
        return []
    from memplan.states.engines.fsdp2 import pipeline  # FSDP2's modules only where used

    # accumulated_gradients reads of the engine view only the decoder layer's saved bytes,
    # the micro-batches and those in flight: the view `_engine_view` makes, less its
    # embedding's backward and working sets (not read).
    layers = saved.block("layers") if saved.modelled else None
    acts = StepActivations(
        loss_fp32=saved.upcast_bytes or saved.logits_bytes,
        embedding_backward=None,
        layer=None if layers is None else layers.bytes_each,
        microbatches=step.accumulation_steps,
        layers_in_flight=of.layers_in_flight,
    )
    return [t for t in pipeline.accumulated_gradients(states, acts) if t.bytes > 0]


def _alive_buffers(saved: Activations) -> list[Transient]:
    """The layout's communication buffers that are alive: those beside a block only where
    that block is saved."""
    return [t for t in saved.buffers if t.beside is None or saved.block(t.beside) is not None]


def _engine_view(
    inventory: Inventory,
    saved: Activations,
    terms: Sequence[Transient],
    recipe: Recipe,
    cache: StepCache | None = None,
    *,
    microbatches: int = 1,
    layers_in_flight: int = 0,
) -> StepActivations:
    """The activation side of the step as the engines' terms need it (`terms`: the step's
    activation terms; `microbatches`, `layers_in_flight`: StepActivations')."""
    embedding = None
    if saved.modelled and saved.block("embeddings") is not None:
        embedding = own.embedding_backward(inventory, saved, recipe.gradients, cache)
    loss_fp32 = saved.upcast_bytes or saved.logits_bytes
    layers = saved.block("layers") if saved.modelled else None
    if layers is None:
        return StepActivations(
            loss_fp32=loss_fp32,
            embedding_backward=embedding,
            layer=None,
            microbatches=microbatches,
            layers_in_flight=layers_in_flight,
        )
    by_name = {t.name: t.bytes for t in terms}
    return StepActivations(
        loss_fp32=loss_fp32,
        embedding_backward=embedding,
        layer=layers.bytes_each,
        forward_working_set=by_name.get("forward_working_set", 0),
        logits_gradient=by_name.get("logits_gradient", 0),
        backward_working_set=by_name.get("backward_working_set", 0),
        hidden_gradient=saved.hidden_bytes,
        microbatches=microbatches,
        layers_in_flight=layers_in_flight,
    )
