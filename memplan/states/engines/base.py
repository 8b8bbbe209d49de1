"""What an engine adds to a training step besides its model states, and what that is worked
out from.

Each engine module describes its step with one `EngineStep` (memplan.states.engines.STEPS,
keyed by engine name): the buffers its model states imply (gradient buckets, gathered
parameters, the optimizer step's temporaries), its terms beside the loss, its end of backward,
when its gradients are alive, and which tensors the allocator rounds one by one.
memplan.step.timeline calls the hooks in that order and places the terms on the phases of
the step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from memplan.config.spec import OptimizerSpec
from memplan.memory import COMPUTE_STREAM, Transient
from memplan.model.inventory import Inventory
from memplan.precision import Recipe
from memplan.states.layout import Layout
from memplan.states.terms import RankStates

T = TypeVar("T")
_MISSING = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class StepStates:
    """One rank's model states and the inputs they came from: everything an engine's step
    terms depend on. A value (the inventory compares by identity): equal inputs give equal
    terms, so it keys StepCache."""

    inventory: Inventory
    """The rank's own model: its pipeline stage and tensor-parallel shard."""
    per_gpu: RankStates
    """The rank's model states (the most-loaded rank of its class)."""
    layout: Layout
    """The parallel layout (engine, ZeRO stage, degrees, offload, DeepSpeed and DDP knobs)."""
    recipe: Recipe
    optimizer: OptimizerSpec
    """The optimizer and its torch.optim kernel (foreach, for_loop or fused)."""
    device: str
    """Where the step runs: cuda, or cpu (gloo collectives)."""
    fp8_all_gather: bool = False
    """precision.fp8_all_gather: FSDP2 all-gathers the Float8Linear weights in fp8
    (memplan.states.engines.fsdp2.fp8)."""
    fp8_precompute_scale: bool = False
    """precision.fp8_precompute_scale: the scales of those weights precomputed."""
    _hash: int | None = field(default=None, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        """Worked out once (its optimizer is a pydantic model, slow to hash): plan looks the
        same StepStates up in its StepCache several times per timeline."""
        if self._hash is None:
            key = (
                self.inventory,
                self.per_gpu,
                self.layout,
                self.recipe,
                self.optimizer,
                self.device,
                self.fp8_all_gather,
                self.fp8_precompute_scale,
            )
            object.__setattr__(self, "_hash", hash(key))
        return cast(int, self._hash)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepActivations:
    """The activation side of the step as the engines' terms need it, in bytes on this rank
    (memplan.step.transients makes the terms these come from)."""

    loss_fp32: int
    """One [tokens, vocab] fp32 tensor of the loss: the logits' fp32 upcast, or the logits
    when there is none."""
    embedding_backward: Transient | None
    """The step's last op of backward, the embedding's gradient (None when not modelled)."""
    layer: int | None
    """One decoder layer's saved tensors; None when no decoder layer is modelled here."""
    forward_working_set: int = 0
    logits_gradient: int = 0
    backward_working_set: int = 0
    """The backward point's working set inside a decoder layer's backward: alive only
    while the layer's autograd ops run."""
    hidden_gradient: int = 0
    """One hidden-state gradient [tokens, hidden]: a layer's input gradient, what is left of
    the working set once the layer's backward is done."""
    microbatches: int = 1
    """Micro-batches per optimizer step (training.gradient_accumulation_steps: a pipeline's
    micro-batches)."""
    layers_in_flight: int = 0
    """Decoder-layer micro-batches whose saved tensors this rank holds at its peak (the
    running one's included; memplan.activations.pipeline.stage)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GradientLife:
    """When an engine's gradient rows are alive (the default: as autograd makes them, in
    backward, until zero_grad after the step)."""

    held_bytes: int = 0
    """Gradient bytes allocated at init and never freed: alive in every phase."""
    whole_run: bool = False
    """The other gradients live in a buffer kept for the whole run too."""
    post_backward_bytes: int | None = None
    """Not None: the engine makes its (sharded) gradients in each parameter group's
    post-backward, none while the last layer runs backward, and these bytes (the root
    group's) only after the whole backward."""
    pipelined: bool = False
    """torch.distributed.pipelining over FSDP2: the gradients are made only after the last
    micro-batch (stage.py::perform_reduce_grad), so the pipeline's micro-batches (gradient
    accumulation) do not keep them alive from the forward on
    (memplan.states.engines.fsdp2.pipeline)."""
    layer_by_layer: bool = True
    """The gradients autograd makes in backward (post_backward_bytes None) appear layer by
    layer and stay: the first decoder layer's backward holds the later layers'
    (memplan.step.transients.first_layer_backward). False where they are not made per layer
    (DeepSpeed ZeRO-2's grads_in_partition: one flat buffer)."""


def no_terms(states: StepStates, acts: StepActivations) -> list[Transient]:
    return []


def embedding_backward(
    states: StepStates, acts: StepActivations, cache: StepCache
) -> list[Transient]:
    """The end of backward of an engine that adds nothing there: the embedding's backward."""
    return [acts.embedding_backward] if acts.embedding_backward is not None else []


def autograd_gradients(states: StepStates, cache: StepCache) -> GradientLife:
    return GradientLife()


def no_storages(layout: Layout) -> int | None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStep:
    """One engine's part of a training step, as hooks memplan.step.timeline calls in order."""

    states: Callable[[StepStates, StepCache], list[Transient]]
    """Buffers the model states alone decide (gradient buckets, gathered parameters, the
    optimizer step's temporaries): the timeline remembers them per StepStates."""
    loss: Callable[[StepStates, StepActivations], list[Transient]] = no_terms
    """Terms beside the loss's (DTensor TP's loss_parallel backward, ...)."""
    backward_end: Callable[[StepStates, StepActivations, StepCache], list[Transient]] = (
        embedding_backward
    )
    """The end of backward: the embedding's backward, or the engine's own moment there."""
    gradients: Callable[[StepStates, StepCache], GradientLife] = autograd_gradients
    """When the gradient rows are alive (the default: as autograd makes them)."""
    storage_shards: Callable[[Layout], int | None] = no_storages
    """Engines that keep one storage per parameter tensor: how many ways each is split (each
    rank's piece of a tensor of n elements taken as ceil(n / this)); None for engines
    whose states are flat buffers (their per-tensor rounding is negligible)."""
    gradient_stream: str = COMPUTE_STREAM
    """The CUDA stream the gradients a step makes are allocated on (memplan.step.replay puts
    them in that stream's allocator pool): autograd's, unless the engine makes them itself."""


class StepCache:
    """Values derived from the inputs of a step, remembered while one `estimate` or one
    `plan` search runs (plan evaluates thousands of layouts of one model, and the per-tensor
    sums need not be redone for each). Keys are values: tuples of a name and the inputs the
    value depends on (an Inventory compares by identity, and the cache holds it, so a key
    never outlives its inventory)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Hashable, object] = {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value under `key`, `compute()`d the first time."""
        value = self._values.get(key, _MISSING)
        if value is _MISSING:
            value = self._values[key] = compute()
        return cast(T, value)
