"""The step's timeline replayed through the caching allocator: what
`torch.cuda.max_memory_reserved()` shows, per phase and over the step, and what nvidia-smi shows
on top of it (memplan.step.device).

`events` turns one GPU's timeline (memplan.step.timeline) into the allocations and frees of
an init and two training steps; `replay` runs them through memplan.step.allocator (the second
step's reserved bytes are what `max_memory_reserved()` shows in a steady-state run).

What the event order assumes (the timeline's own phases, made into a sequence):
- Init: every parameter, optimizer-state and buffer row is one allocation (a row stands for
  many tensors: their per-tensor 512-byte rounding is the timeline's allocator_rounding_states
  term, itself one allocation; the 2 MiB rounding of each large tensor's own segment is not
  replayed). Gradients alive in every phase (an engine's buffers kept for the run, and
  `training.zero_grad: zero`'s kept gradients) are allocated here too, as one block: torch
  makes zero_grad's kept gradients in the first backward, so the replay packs them tighter
  than a first step would. Optimizer states are allocated at init, as DeepSpeed does;
  torch.optim makes them lazily in the first step() (the same bytes, placed differently).
- Each phase starts by freeing what the timeline no longer holds there, then allocates what
  it newly holds (frees before allocations: the timeline's points are the moments between
  ops, so the replay's allocated bytes reach each point's total and never exceed it by more
  than the 512-byte rounding of each block).
- Forward: non-layered blocks (embeddings, in-flight micro-batches of a pipeline rank) first,
  then each decoder layer's saved tensors one by one, its forward working set allocated before
  them and freed after; a fully checkpointed layer's saved tensors (its inputs: the previous
  layer's output, made once that layer's working set is freed) come before its working set
  instead, so they fill the holes below it as the real forward's do. At the loss: the head's
  saved tensors (the final norm's, the output layer's input: the forward makes them before the
  logits; the loss phase's momentary buffers, the all-gather output of that input under
  sequence parallelism, are freed right after them), the logits and their fp32 copy (the
  phase's transients), then the loss's saved tensors. (Both orders are the real step's:
  torchtitan's 70B TP 8 row, traced op by op, benchmarks/torchtitan_70b_trace.py.)
- Backward, layer by layer from the last: the backward working set, the layer's saved tensors
  freed, its gradients allocated (the layer's share of the parameters: equal per layer of the
  block), the working set freed. The head's gradients come before the first layer, the rest
  (embeddings) at the end of backward; an engine that makes its gradients after backward
  (FSDP2's root group) makes them at the optimizer step, as the timeline says.
- Each working set is the tensors its term names (Transient.parts, in the order the step makes
  them: memplan.step.transients.working_sets), one allocation each, so that the allocator can
  place them in free blocks smaller than their sum as it places the real step's tensors (as
  one block as large as their sum, torch's default allocator needs a segment of that size:
  the 70B TP 8 row replayed 79.89 GiB against 70.54-70.79 when its traced step is replayed op
  by op, benchmarks/torchtitan_70b_trace.py); all of them are freed at the layer's end.
- Transients other than the two working sets are one allocation each (`pieces` equal ones for
  a term of several tensors, such as the eager loss's two gradients), made at the first phase
  they are alive in and freed when a phase no longer holds them; those alive in every phase
  are allocated at init.
- Streams: every allocation is on the compute stream but for the buffers an engine makes on
  its own streams (a transient's `stream`, and the step's gradients on the engine's
  `gradient_stream`: FSDP2's reduce-scatter output, its flat all-gather outputs); each stream
  keeps its own pool (memplan.step.allocator). A `momentary` transient is made as its phase
  begins, before the phase's transients, and freed after them. No CUDA graphs, no
  `record_stream`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from memplan.activations import Activations, Block
from memplan.memory import COMPUTE_STREAM, PHASES, Phase, Transient
from memplan.model.inventory import Inventory
from memplan.states.engines import RankStates, Term
from memplan.step.alloc_conf import AllocConf
from memplan.step.allocator import Event, Replay
from memplan.step.allocator import replay as run_allocator
from memplan.step.timeline import Timeline

FORWARD_WORKING_SET = "forward_working_set"
BACKWARD_WORKING_SET = "backward_working_set"
# The replay rounds every saved tensor itself (AllocConf.round_size), so the timeline's term
# for that rounding would count it twice.
ROUNDED_BY_REPLAY = frozenset({"allocator_rounding_activations"})
# The replay walks the layers' backward itself (layers_backward: each layer's saved tensors
# freed, its gradients made), so the timeline's excess of the first layer's backward over the
# backward point (memplan.step.transients.first_layer_backward) would count it twice.
WALKED_BY_REPLAY = frozenset({"first_layer_backward"})
STEPS = 2
"""Steps replayed after init: the second is the steady state max_memory_reserved() shows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseReserved:
    """One phase of the replayed (second) step."""

    phase: Phase
    peak_allocated: int
    """The most bytes the allocator handed out during the phase."""
    peak_reserved: int
    """The most bytes it held in segments during the phase (reserved never shrinks without
    empty_cache, so this is the step's reserved so far)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocatorView:
    """What the caching allocator holds over the step, replayed."""

    conf: AllocConf
    peak_allocated: int
    """max_memory_allocated() of the replay (every block rounded by the allocator)."""
    peak_reserved: int
    """max_memory_reserved(): segments the allocator holds at its highest."""
    fragmentation: int
    """peak_reserved minus the most bytes allocated while reserved stood at its peak."""
    phases: tuple[PhaseReserved, ...]
    events: int
    """Allocations and frees replayed."""
    alloc_retries: int
    """Allocations that found no room within `limit` until the allocator freed its cached
    segments and tried again (torch.cuda.memory_stats()["num_alloc_retries"]): each one a
    cudaFree of every cached segment and a device synchronize, slow when it repeats."""
    out_of_memory: bool
    """The replay within `limit` ran out of memory (the allocator's retry included): the
    figures are then the unlimited replay's."""
    limit: int | None
    """Bytes the allocator could have (capacity minus the terms outside it); None: unlimited."""
    reserved_by_stream: tuple[tuple[str, int], ...] = ()
    """Each stream's own highest reserved bytes (the compute stream first): the engine's side
    streams keep their own pools, which the compute stream never reuses."""


def _layer_gradient_share(inventory: Inventory) -> float:
    """Share of the parameters inside decoder layers (their gradients are made layer by layer
    in backward)."""
    total = inventory.num_parameters
    if not total:
        return 0.0
    return sum(t.numel for t in inventory.parameters if t.layer is not None) / total


def _inputs_only(block: Block) -> bool:
    """A fully checkpointed layer: it keeps only its checkpointed region's inputs (the rules
    name them `checkpoint.*`), which exist before the layer runs: the previous layer's output,
    made at that layer's end once its working set is freed (torch/utils/checkpoint.py: the
    non-reentrant checkpoint saves the region's inputs and nothing it makes)."""
    return bool(block.recompute) and all(t.name.startswith("checkpoint.") for t in block.tensors)


class _Events:
    """The event list and what is alive, by id."""

    def __init__(self) -> None:
        self.out: list[Event] = []
        self.live: dict[Hashable, int] = {}

    def alloc(
        self,
        key: Hashable,
        nbytes: int,
        pieces: int = 1,
        stream: str = COMPUTE_STREAM,
        parts: Sequence[int] = (),
    ) -> None:
        """`nbytes` as `pieces` allocations (the last one takes the remainder) on `stream`, or
        as one allocation per non-empty size of `parts` (which sum to `nbytes`)."""
        if nbytes > 0:
            if parts:
                sizes = [n for n in parts if n > 0]
            else:
                each = nbytes // pieces
                sizes = [each] * (pieces - 1) + [nbytes - each * (pieces - 1)]
            for i, n in enumerate(sizes):
                event = ("alloc", (key, i), n)
                self.out.append(event if stream == COMPUTE_STREAM else (*event, stream))
            self.live[key] = len(sizes)

    def alloc_term(self, key: Hashable, term: Transient) -> None:
        """A transient term as the tensors it is (`parts`, else `pieces`) on its stream."""
        self.alloc(key, term.bytes, term.pieces, term.stream, term.parts)

    def free(self, key: Hashable) -> None:
        pieces = self.live.pop(key, None)
        for i in range(pieces or 0):
            self.out.append(("free", (key, i)))


def events(
    timeline: Timeline,
    *,
    per_gpu: RankStates,
    buffers: Sequence[Term],
    saved: Activations,
    inventory: Inventory,
    steps: int = STEPS,
    gradient_stream: str = COMPUTE_STREAM,
) -> list[Event]:
    """The allocations and frees of init and `steps` training steps on this GPU (phase
    markers ("phase", name) at each phase of the last step), in the order the module's
    docstring states; the gradients each step makes on `gradient_stream`."""
    step_events = _StepEvents(timeline, saved, inventory, gradient_stream)
    step_events.init(per_gpu, buffers)
    for step in range(1, steps + 1):
        step_events.step(step, last=step == steps)
    return step_events.ev.out


class _StepEvents:
    """The event stream of one GPU's steps: what is alive, and each phase's allocations."""

    def __init__(
        self, timeline: Timeline, saved: Activations, inventory: Inventory, gradient_stream: str
    ) -> None:
        self.ev = _Events()
        self.gradient_stream = gradient_stream
        self.momentary = [t for t in timeline.transients if t.momentary is not None]
        points = {p.phase: p for p in timeline.points}
        self.grads = {phase: points[phase].of("gradients") for phase in PHASES}
        self.always_grads = min(self.grads.values())
        self.per_phase = {phase: set(points[phase].transients) for phase in PHASES}
        skipped = ROUNDED_BY_REPLAY | WALKED_BY_REPLAY
        self.terms = [t for t in timeline.transients if t.name not in skipped]
        self.by_name = {t.name: t for t in self.terms}
        self.layered = [b for b in saved.blocks if b.layered and not b.on_host]
        self.cycled = {FORWARD_WORKING_SET, BACKWARD_WORKING_SET} if self.layered else set()
        self.whole = [t for t in self.terms if set(t.phases) == set(PHASES)]
        self.placed = {t.name for t in self.whole}
        resident = [b for b in saved.blocks if not b.on_host and not b.layered]
        self.at_loss = [b for b in resident if b.name in ("head", "loss")]
        self.kept = [b for b in resident if b.name not in ("head", "loss")]
        # Blocks are keyed by their place in saved.blocks: names repeat (LoRA's frozen and
        # trained decoder layers are two "layers" blocks).
        self.place = {id(b): i for i, b in enumerate(saved.blocks)}
        layer_count = sum(b.count for b in self.layered)
        share = _layer_gradient_share(inventory) if layer_count else 0.0
        # Each layer's gradients: its share of all the gradients made in the step, but no more
        # than the timeline adds between the backward point and the end of backward.
        rest = max(self.grads["backward_end"] - self.grads["backward"], 0)
        made = max(self.grads.values()) - self.always_grads
        self.per_layer_grad = min(rest, int(made * share)) // layer_count if layer_count else 0
        self.grad_blocks: list[tuple[Hashable, int]] = []

    def init(self, per_gpu: RankStates, buffers: Sequence[Term]) -> None:
        """Model states, gradients alive in every phase, transients alive in every phase."""
        for i, row in enumerate((*per_gpu.terms, *buffers)):
            if row.category != "gradients":
                self.ev.alloc(("state", i, row.name), row.bytes)
        self.ev.alloc(("gradients", "always"), self.always_grads)
        for t in self.whole:
            self.ev.alloc(("transient", t.name), t.bytes, stream=t.stream)

    def step(self, step: int, *, last: bool) -> None:
        """One training step, phase by phase (markers on the `last` step)."""
        for phase in PHASES:
            if last:
                self.ev.out.append(("phase", phase))
            moment = [t for t in self.momentary if t.momentary == phase]
            for t in moment:
                self.ev.alloc(("momentary", step, t.name), t.bytes, stream=t.stream)
            if phase == "loss":
                # The head's saved tensors (the final norm's, the output layer's input) exist
                # before the logits and the loss's transients: the forward makes them first.
                # The loss phase's momentary buffers are the head's (its sequence-parallel
                # input's all-gather output), freed once that input is copied out.
                self.blocks(step, [b for b in self.at_loss if b.name == "head"], free=False)
                for t in moment:
                    self.ev.free(("momentary", step, t.name))
                moment = []
            self.transients_to(phase)
            for t in moment:
                self.ev.free(("momentary", step, t.name))
            if phase == "backward":  # the loss's and the head's tensors go first
                self.blocks(step, self.at_loss, free=True)
            elif phase == "backward_end":
                self.blocks(step, self.kept, free=True)
            self.set_gradients(step, self.grads[phase])
            if phase == "forward":
                self.blocks(step, self.kept, free=False)
                self.layers_forward(step)
            elif phase == "loss":
                self.blocks(step, [b for b in self.at_loss if b.name != "head"], free=False)
            elif phase == "backward":
                self.layers_backward(step)

    def set_gradients(self, step: int, target: int) -> None:
        """Free the newest gradient blocks, then allocate, until `target` bytes (beyond those
        alive in every phase) are alive."""
        target -= self.always_grads
        current = sum(n for _, n in self.grad_blocks)
        while self.grad_blocks and current > target:
            key, n = self.grad_blocks.pop()
            self.ev.free(key)
            current -= n
        if target > current:
            key = ("gradients", step, len(self.grad_blocks))
            self.ev.alloc(key, target - current, stream=self.gradient_stream)
            self.grad_blocks.append((key, target - current))

    def transients_to(self, phase: Phase) -> None:
        """Free the transients `phase` does not hold, then allocate those it does."""
        moving = [t for t in self.terms if t.name not in self.placed and t.name not in self.cycled]
        for t in moving:
            key = ("transient", t.name)
            if phase not in t.phases and key in self.ev.live:
                self.ev.free(key)
        for t in moving:
            if phase in t.phases and ("transient", t.name) not in self.ev.live:
                self.ev.alloc_term(("transient", t.name), t)

    def blocks(self, step: int, blocks: Sequence[Block], *, free: bool) -> None:
        for b in blocks:
            for c in range(b.count):
                (self.free_block if free else self.alloc_block)(step, b, c)

    def alloc_block(self, step: int, block: Block, copy: int) -> None:
        """Each saved tensor of one copy of `block`: _Events.alloc of one piece on the compute
        stream, written out (the replay's most frequent event)."""
        place, out, live = self.place[id(block)], self.ev.out, self.ev.live
        for j, tensor in enumerate(block.tensors):
            if tensor.bytes > 0:
                key = ("saved", step, place, copy, j)
                out.append(("alloc", (key, 0), tensor.bytes))
                live[key] = 1

    def free_block(self, step: int, block: Block, copy: int) -> None:
        """alloc_block's tensors freed: _Events.free of each, written out."""
        place, out, live = self.place[id(block)], self.ev.out, self.ev.live
        for j in range(len(block.tensors)):
            key = ("saved", step, place, copy, j)
            if live.pop(key, None):
                out.append(("free", (key, 0)))

    def working_set(self, name: str, phase: Phase) -> Transient | None:
        """A working set the replay allocates once per layer, if the phase holds it."""
        t = self.by_name.get(name)
        held = name in self.per_phase[phase] and name in self.cycled
        return t if t is not None and held else None

    def layers_forward(self, step: int) -> None:
        """Each layer's saved tensors, its forward working set alive while it runs; a fully
        checkpointed layer's saved inputs before it (`_inputs_only`)."""
        fws = self.working_set(FORWARD_WORKING_SET, "forward")
        for b in self.layered:
            first = _inputs_only(b)
            for c in range(b.count):
                key = ("fws", step, self.place[id(b)], c)
                if first:
                    self.alloc_block(step, b, c)
                if fws is not None:
                    self.ev.alloc_term(key, fws)
                if not first:
                    self.alloc_block(step, b, c)
                if fws is not None:
                    self.ev.free(key)

    def layers_backward(self, step: int) -> None:
        """Last layer first: its backward working set, its saved tensors freed, its gradients
        made."""
        bws = self.working_set(BACKWARD_WORKING_SET, "backward")
        for b in reversed(self.layered):
            for c in reversed(range(b.count)):
                key = ("bws", step, self.place[id(b)], c)
                if bws is not None:
                    self.ev.alloc_term(key, bws)
                self.free_block(step, b, c)
                grad = ("gradients", step, "layer", self.place[id(b)], c)
                self.ev.alloc(grad, self.per_layer_grad, stream=self.gradient_stream)
                if self.per_layer_grad:
                    self.grad_blocks.append((grad, self.per_layer_grad))
                if bws is not None:
                    self.ev.free(key)


def replay(
    timeline: Timeline,
    *,
    per_gpu: RankStates,
    buffers: Sequence[Term],
    saved: Activations,
    inventory: Inventory,
    conf: AllocConf,
    limit: int | None,
    gradient_stream: str = COMPUTE_STREAM,
) -> AllocatorView:
    """The step replayed through the allocator configured by `conf`, within `limit` bytes
    (the GPU's capacity minus what lives outside the allocator; None: unlimited). When the
    replay runs out of memory within the limit, the figures are the unlimited replay's (what
    the step would need), and `out_of_memory` says so."""
    sequence = events(
        timeline,
        per_gpu=per_gpu,
        buffers=buffers,
        saved=saved,
        inventory=inventory,
        gradient_stream=gradient_stream,
    )
    result: Replay = run_allocator(sequence, conf, capacity=limit)
    oom = result.oom is not None
    retries = result.alloc_retries
    if oom:
        result = run_allocator(sequence, conf)
    by_name = {m.name: m for m in result.phases}
    phases = tuple(
        PhaseReserved(
            phase=phase,
            peak_allocated=by_name[phase].peak_allocated,
            peak_reserved=by_name[phase].peak_reserved,
        )
        for phase in PHASES
    )
    return AllocatorView(
        conf=conf,
        peak_allocated=result.peak_allocated,
        peak_reserved=result.peak_reserved,
        fragmentation=result.fragmentation,
        phases=phases,
        events=sum(1 for e in sequence if e[0] != "phase"),
        alloc_retries=retries,
        out_of_memory=oom,
        limit=limit,
        reserved_by_stream=tuple((str(k), v) for k, v in result.peak_reserved_by_stream),
    )
