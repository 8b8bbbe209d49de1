"""One training step as a timeline: bytes alive on the most-loaded GPU at each phase, by
category, and the peak.

Phases of a steady-state step (step >= 2: optimizer states exist; gradients were freed by
`zero_grad(set_to_none=True)`, torch's default since 2.0):
  start           model states at rest
  forward         end of the last layer's forward: every layer's saved tensors
  loss            logits, their fp32 upcast and the log-softmax the loss saves
  backward_start  the loss's backward: two [tokens, vocab] fp32 gradients
  backward        the decoder layers' backward: the last layer's (the first to run) with every
                  saved tensor, the head's gradients and one layer's working set; or the
                  first layer's, where that holds more (the later layers' gradients made,
                  their saved tensors freed: the first_layer_backward term)
  backward_end    every gradient, no activations
  optimizer_step  the optimizer's temporaries
Memory alive grows and shrinks linearly between these points (layers free their activations
one by one while gradients appear), so the peak of the step is at one of them (inside the
layers' backward, at one of its two ends: the backward point counts the larger).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from memplan import memory
from memplan.activations import Activations
from memplan.config.finetune import FinetuneSpec
from memplan.config.spec import OptimizerSpec
from memplan.memory import PHASES, Phase, Transient
from memplan.model.inventory import Inventory
from memplan.precision import Recipe
from memplan.states.engines import STEPS, RankStates
from memplan.states.engines.base import StepCache, StepStates
from memplan.states.layout import Layout
from memplan.states.terms import grad_dtype, kept_gradient_bytes
from memplan.step.terms import OfSaved, cheap_backward_end, of_saved, transients
from memplan.step.transients import first_layer_backward

Category = Literal[
    "parameters", "gradients", "optimizer_states", "buffers", "activations", "transient"
]
CATEGORIES: tuple[Category, ...] = (
    "parameters",
    "gradients",
    "optimizer_states",
    "buffers",
    "activations",
    "transient",
)
LABELS: dict[Phase, str] = {
    "start": "after init",
    "forward": "forward",
    "loss": "at the loss",
    "backward_start": "backward (loss)",
    "backward": "backward (layers)",
    "backward_end": "backward end",
    "optimizer_step": "optimizer step",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    """Bytes alive at one phase of the step."""

    phase: Phase
    by_category: tuple[tuple[Category, int], ...]
    transients: tuple[str, ...]
    """Names of the transient terms alive."""

    @property
    def label(self) -> str:
        return LABELS[self.phase]

    total_bytes: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", sum(n for _, n in self.by_category))

    def of(self, category: Category) -> int:
        return dict(self.by_category)[category]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    points: tuple[Point, ...]
    transients: tuple[Transient, ...]
    cuda_context_bytes: int
    """CUDA context outside the allocator (0 on CPU)."""
    capacity_bytes: int | None
    reserved: Callable[[Timeline], int] | None = field(default=None, repr=False, compare=False)
    """Works out `reserved_bytes` (None on CPU): on demand, since plan never needs it."""

    @property
    def reserved_bytes(self) -> int | None:
        """What torch.cuda.memory_reserved() likely shows at the peak (None on CPU)."""
        return None if self.reserved is None else self.reserved(self)

    peak: Point = field(init=False, repr=False, compare=False)
    """The phase with the most bytes alive (the earliest on a tie)."""

    def __post_init__(self) -> None:
        # The points come in phase order, so max() keeps the earliest of equal totals.
        object.__setattr__(self, "peak", max(self.points, key=lambda p: p.total_bytes))

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    @property
    def usable_bytes(self) -> int | None:
        """GPU memory left after the CUDA context and the allocator's reserved segments."""
        if self.capacity_bytes is None:
            return None
        return _usable(
            self.capacity_bytes, self.cuda_context_bytes, self.reserved_bytes, self.peak_bytes
        )

    def transient_at(self, phase: Phase) -> tuple[Transient, ...]:
        return tuple(t for t in self.transients if phase in t.phases)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSettings:
    """What the timeline of a step is built from, besides the model states and the saved
    tensors: the spec's values it reads."""

    layout: Layout
    recipe: Recipe
    optimizer: OptimizerSpec
    accumulation_steps: int
    """training.gradient_accumulation_steps: micro-batches per optimizer step."""
    device: str
    """hardware.device: cuda, or cpu (no allocator rounding, no CUDA context)."""
    gpu: str | None
    """hardware.gpu, the catalogue name (fp8 weight copies depend on it)."""
    cuda_context_bytes: int | None
    """hardware.cuda_context; None: memory.CUDA_CONTEXT_BYTES."""
    fp8: str
    """precision.fp8: Transformer Engine's fp8 recipe, torchao's, or none."""
    finetune: FinetuneSpec
    fp8_all_gather: bool = False
    """precision.fp8_all_gather: FSDP2 all-gathers the Float8Linear weights in fp8."""
    fp8_precompute_scale: bool = False
    """precision.fp8_precompute_scale: their scales precomputed after the optimizer step."""
    zero_grad: str = "set_to_none"
    """training.zero_grad: set_to_none frees the gradients after the optimizer step; zero
    keeps them allocated through the next forward and backward (torch engines only:
    ZEROED_GRADIENT_ENGINES)."""

    def states(self, inventory: Inventory, per_gpu: RankStates) -> StepStates:
        """The model states of one GPU (`inventory`: its own model) as the engines read them."""
        return StepStates(
            inventory=inventory,
            per_gpu=per_gpu,
            layout=self.layout,
            recipe=self.recipe,
            optimizer=self.optimizer,
            device=self.device,
            fp8_all_gather=self.fp8_all_gather,
            fp8_precompute_scale=self.fp8_precompute_scale,
        )


# The engines whose gradients are the parameters' .grad tensors that the trainer's
# optimizer.zero_grad() clears (torch/optim/optimizer.py::Optimizer.zero_grad, set_to_none
# default True since torch 2.0). DeepSpeed clears its own gradient partitions inside
# engine.step() and Megatron keeps its gradient buffer for the whole run (GradientLife), so
# the trainer's choice changes nothing there.
ZEROED_GRADIENT_ENGINES = frozenset({"ddp", "fsdp2", "fsdp1"})


@dataclass(frozen=True, slots=True)
class StepParts:
    """What `floor_bytes` and `build` of the same arguments both work out (plan asks the
    floor of a stage, then builds its timeline: `parts` makes them once)."""

    states: StepStates
    gradients: dict[Phase, int]
    of: OfSaved
    """What the step reads of the saved tensors alone (memplan.step.terms.of_saved)."""
    held: tuple[int, int]
    """The rank's parameters' and optimizer states' bytes (the same at every phase),
    remembered per StepStates."""

    @property
    def activations(self) -> dict[Phase, int]:
        return self.of.activations


def parts(
    step: StepSettings,
    inventory: Inventory,
    *,
    per_gpu: RankStates,
    saved: Activations,
    cache: StepCache,
    states: StepStates | None = None,
) -> StepParts:
    """The pieces of one GPU's step that `floor_bytes` and `build` share (`states`:
    `step.states(inventory, per_gpu)`, when already made)."""
    if states is None:
        states = step.states(inventory, per_gpu)
    of = of_saved(saved)
    return StepParts(
        states=states,
        gradients=cache.get(
            ("gradients", states, step.accumulation_steps > 1, step.zero_grad),
            lambda: _gradients(step, states, cache),
        ),
        of=of,
        held=cache.get(
            ("held", states),
            lambda: (
                states.per_gpu.bytes_of("parameters"),
                states.per_gpu.bytes_of("optimizer_states"),
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class StepTotals:
    """A timeline's numbers before its points are made (`totals`): plan asks every viewed
    stage's peak, and builds the Timeline of the highest only (its rows are made then)."""

    terms: tuple[Transient, ...]
    """Every transient term (`transients`)."""
    resident: tuple[int, int, int]
    """Parameters, optimizer states and buffers: the same bytes at every phase."""
    gradients: dict[Phase, int]
    activations: dict[Phase, int]
    transient: dict[Phase, int]
    """Bytes of the terms alive at each phase."""
    peak_bytes: int
    """The most bytes alive at any phase (Timeline.peak_bytes)."""

    @property
    def peak_phase(self) -> Phase:
        """The phase with the most bytes alive, the earliest on a tie (Timeline.peak's)."""
        moving = {p: self.gradients[p] + self.activations[p] + self.transient[p] for p in PHASES}
        return max(PHASES, key=moving.__getitem__)

    def row(self, phase: Phase) -> tuple[tuple[Category, int], ...]:
        """Bytes alive per category at `phase` (Point.by_category)."""
        params, opt, buffers = self.resident
        return (
            ("parameters", params),
            ("gradients", self.gradients[phase]),
            ("optimizer_states", opt),
            ("buffers", buffers),
            ("activations", self.activations[phase]),
            ("transient", self.transient[phase]),
        )


def totals(
    step: StepSettings,
    inventory: Inventory,
    *,
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
    cache: StepCache,
    shared: StepParts | None = None,
) -> StepTotals:
    """`build`'s numbers (`shared`: `parts` of the same arguments, when already worked
    out)."""
    if shared is None:
        shared = parts(step, inventory, per_gpu=per_gpu, saved=saved, cache=cache)
    terms = tuple(transients(step, shared.states, saved, cache, of=shared.of))
    gradients = shared.gradients
    late = _first_layer_backward(step, shared, saved, cache)
    if late is not None:
        terms += (late,)
    activations = shared.activations
    # Each phase's transient bytes (the terms alive there: `alive`, where a timeline is built).
    transient = dict.fromkeys(PHASES, 0)
    for t in terms:
        for phase in t.phases:
            transient[phase] += t.bytes
    resident = (*shared.held, buffer_bytes)
    moving = max(gradients[p] + activations[p] + transient[p] for p in PHASES)
    return StepTotals(
        terms=terms,
        resident=resident,
        gradients=gradients,
        activations=activations,
        transient=transient,
        peak_bytes=sum(resident) + moving,
    )


def build(
    step: StepSettings,
    inventory: Inventory,
    *,
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
    capacity_bytes: int | None,
    cache: StepCache,
    shared: StepParts | None = None,
    worked: StepTotals | None = None,
) -> Timeline:
    """The step's timeline on the most-loaded GPU (`inventory`: its own model); `shared`:
    `parts` of the same arguments, `worked`: their `totals`, when already worked out."""
    if worked is None:
        worked = totals(
            step,
            inventory,
            per_gpu=per_gpu,
            buffer_bytes=buffer_bytes,
            saved=saved,
            cache=cache,
            shared=shared,
        )
    # The transient terms alive at each phase, in the terms' order.
    alive: dict[Phase, list[str]] = {phase: [] for phase in PHASES}
    for t in worked.terms:
        for phase in t.phases:
            alive[phase].append(t.name)
    points = tuple(
        Point(phase=phase, by_category=worked.row(phase), transients=tuple(alive[phase]))
        for phase in PHASES
    )
    cuda = step.device == "cuda"
    return Timeline(
        points=points,
        transients=worked.terms,
        cuda_context_bytes=_context_bytes(step),
        capacity_bytes=capacity_bytes,
        reserved=(
            (
                lambda tl: _reserved(
                    tl.peak.phase,
                    dict(tl.peak.by_category),
                    tl.transients,
                    per_gpu,
                    buffer_bytes,
                    saved,
                )
            )
            if cuda
            else None
        ),
    )


def usable_bytes(
    step: StepSettings,
    worked: StepTotals,
    *,
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
    capacity_bytes: int | None,
) -> int | None:
    """`build(...).usable_bytes` of the same arguments (`worked`: their `totals`), without
    making the timeline's points (plan reads nothing else of a layout that fits)."""
    if capacity_bytes is None:
        return None
    reserved = None
    if step.device == "cuda":
        phase = worked.peak_phase
        by_category = dict(worked.row(phase))
        reserved = _reserved(phase, by_category, worked.terms, per_gpu, buffer_bytes, saved)
    return _usable(capacity_bytes, _context_bytes(step), reserved, worked.peak_bytes)


def _context_bytes(step: StepSettings) -> int:
    """The CUDA context outside the allocator (Timeline.cuda_context_bytes): 0 on the CPU."""
    if step.device != "cuda":
        return 0
    return memory.CUDA_CONTEXT_BYTES if step.cuda_context_bytes is None else step.cuda_context_bytes


def _usable(capacity: int, context: int, reserved: int | None, peak: int) -> int:
    """Timeline.usable_bytes: capacity less the CUDA context and the reserved segments (the
    peak's bytes where none are worked out)."""
    return capacity - context - (reserved if reserved is not None else peak)


def floor_bytes(
    step: StepSettings,
    inventory: Inventory,
    *,
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
    cache: StepCache,
    shared: StepParts | None = None,
) -> int:
    """Bytes no timeline `build` (of the same arguments) peaks under: its points with only
    the transient terms that cost little (the rest are never negative), each one `totals`
    counts at the same phases. Plan prunes a layout on it before building any timeline.
    `shared`: `parts` of the same arguments."""
    if shared is None:
        shared = parts(step, inventory, per_gpu=per_gpu, saved=saved, cache=cache)
    states = shared.states
    gradients = shared.gradients
    activations = shared.activations
    # The transient terms that cost little: the engine's model-state buffers (remembered
    # per StepStates), the step's activation terms, the layout's communication buffers and
    # the cheap part of the engine's end of backward (FSDP2's pipelined gradients).
    engine = STEPS[step.layout.engine]
    some = (
        *cache.get(("engine states", states), lambda: tuple(engine.states(states, cache))),
        *shared.of.activation_terms,
        *shared.of.buffers,
        *cheap_backward_end(step, states, saved, cache, shared.of),
    )
    resident = sum(shared.held) + buffer_bytes
    moving = {phase: gradients[phase] + activations[phase] for phase in PHASES}
    for t in some:
        for phase in t.phases:
            moving[phase] += t.bytes
    return resident + max(moving.values())


def _gradients(step: StepSettings, states: StepStates, cache: StepCache) -> dict[Phase, int]:
    """Gradient bytes alive at each phase. Without gradient accumulation they appear in
    backward (at the backward point only the head's: _head_fraction; the later layers' by
    the first layer's backward, counted apart: _first_layer_backward) and go at zero_grad
    after the step (zero_grad: zero keeps them); gradient accumulation keeps them across
    micro-batches; the engine may keep them for the whole run, hold some from init, or make
    them only in its post-backward (EngineStep.gradients)."""
    life = STEPS[step.layout.engine].gradients(states, cache)
    # Gradients of trainable tensors the optimizer does not hold: never cleared, every phase.
    kept = cache.get(
        ("kept gradients", states.inventory, grad_dtype(states.recipe)),
        lambda: kept_gradient_bytes(states.inventory, grad_dtype(states.recipe)),
    )
    grads = states.per_gpu.bytes_of("gradients") - life.held_bytes - kept
    alive: tuple[Phase, ...] = ("backward", "backward_end", "optimizer_step")
    zeroed = step.zero_grad == "zero" and step.layout.engine in ZEROED_GRADIENT_ENGINES
    if life.whole_run or zeroed:
        # zero_grad(set_to_none=False) fills the gradients with zeros and keeps them: from the
        # second step on they are alive in every phase, like a buffer kept for the run.
        alive = PHASES
    elif step.accumulation_steps > 1 and not life.pipelined:
        alive = PHASES[1:]
    inventory = states.inventory
    head = int(grads * cache.get(("head", inventory), lambda: _head_fraction(inventory)))
    out: dict[Phase, int] = {}
    late = life.post_backward_bytes
    for phase in PHASES:
        g = grads if phase in alive else 0
        if alive[0] == "backward" and phase == "backward":
            g = head if late is None else 0
        elif alive[0] == "backward" and phase == "backward_end" and late is not None:
            g = grads - late
        out[phase] = g + life.held_bytes + kept
    return out


def _first_layer_backward(
    step: StepSettings, shared: StepParts, saved: Activations, cache: StepCache
) -> Transient | None:
    """The backward's worst moment inside the decoder layers, where it is the first layer's
    (memplan.step.transients.first_layer_backward: its excess over the backward point), for
    the engines whose gradients autograd makes layer by layer (GradientLife: no
    post-backward gradients, layer_by_layer). FSDP2 over several ranks walks its layers'
    backward in its own term (memplan.states.engines.fsdp2.moments.layer_backward: k layers'
    sharded gradients less their saved tensors); FSDP1's sharded units are not walked
    (memplan.states.engines.fsdp1._gradients); an engine whose gradients are all alive at
    the backward point (gradient accumulation, a buffer kept for the run, zero_grad: zero)
    makes none between it and the end of backward, so the first layer's holds less."""
    states = shared.states

    def walks() -> bool:
        life = STEPS[step.layout.engine].gradients(states, cache)
        return life.post_backward_bytes is None and life.layer_by_layer

    if not cache.get(("layer by layer", states), walks):
        return None
    return first_layer_backward(
        states.inventory, saved, shared.gradients, cuda=step.device == "cuda", cache=cache
    )


def _head_fraction(inventory: Inventory) -> float:
    """Share of the gradients that exist when the first decoder layer's backward starts:
    the LM head and final norm (and the embedding, when the head is tied to it)."""
    total = inventory.num_parameters
    if not total:
        return 0.0
    tied = bool(inventory.tied)
    head = sum(
        t.numel
        for t in inventory.parameters
        if t.layer is None and (t.role != "embedding" or tied) and t.role != "position"
    )
    return head / total


def _reserved(
    phase: Phase,
    by_category: dict[Category, int],
    transients: tuple[Transient, ...],
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
) -> int:
    """torch.cuda.memory_reserved() at the peak, likely: the peak's blocks packed into the
    allocator's segments (memory.segment_bytes; a lower bound). Model-state rows and transient
    terms count as one block each, saved tensors one block per tensor. `phase`: the peak's,
    `by_category`: its bytes alive (Point.by_category), `transients`: every transient term."""
    sizes = [t.bytes for t in per_gpu.terms] + [buffer_bytes]
    if by_category["gradients"] < per_gpu.bytes_of("gradients"):
        sizes = [t.bytes for t in per_gpu.terms if t.category != "gradients"] + [buffer_bytes]
        sizes.append(by_category["gradients"])
    sizes += [t.bytes for t in transients if phase in t.phases]
    parts = [memory.segment_parts(sizes)]
    if by_category["activations"]:
        for b in saved.blocks:
            if b.on_host or (phase in ("forward", "backward") and b.name in ("head", "loss")):
                continue
            parts.append(memory.segment_parts((t.bytes for t in b.tensors), b.count))
    total = tuple(sum(p[i] for p in parts) for i in range(3))
    return max(memory.pack((total[0], total[1], total[2])), sum(by_category.values()))
