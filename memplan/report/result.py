"""What an estimate holds: the Report of one training step per rank, its model summary, its
per-TP-rank views, and the one verdict the table, `--json` and `plan` share. Built by
memplan.report.estimate.

ModelSummary, TensorRankView and Report are compared by identity (`eq=False`): nothing
compares or hashes them (the documents are compared: memplan.report.json), and a dataclass's
generated __eq__ and __hash__ are two functions compiled at import in every `memplan estimate`
(issue 21). The same holds for memplan.report.worked.Prepared and
memplan.config.load.LoadedSpec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memplan import activations as acts
from memplan import versions
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe
from memplan.report import notes as said
from memplan.states.engines import RankStates, Term
from memplan.states.layout import Layout
from memplan.states.stages import StageStates
from memplan.step import device
from memplan.step import replay as rp
from memplan.step import timeline as tl

Verdict = Literal[
    "fits", "does_not_fit", "model_states_fit_activations_unknown", "model_states_do_not_fit"
]
VERDICT_TEXT: dict[Verdict, str] = {
    "fits": "fits",
    "does_not_fit": "does NOT fit",
    "model_states_fit_activations_unknown": "model states fit; activations unknown",
    "model_states_do_not_fit": "model states alone do NOT fit",
}


def verdict(*, usable_bytes: int | None, activations_modelled: bool) -> Verdict | None:
    """The one fit verdict `estimate` (table and JSON) and `plan` give: from the memory left
    (estimate: capacity - device_used, the replayed reserved bytes plus the terms outside the
    allocator, Report.usable_bytes; plan: capacity - CUDA context - the packing bound of
    reserved, memplan.step.timeline.Timeline.usable_bytes, minus any reserve the user keeps
    free) and whether the peak includes activations. Without activations the peak is a
    partial figure (model states and transients only), so it can say that model states do not
    fit, never that the step fits. None without a capacity."""
    if usable_bytes is None:
        return None
    if activations_modelled:
        return "fits" if usable_bytes >= 0 else "does_not_fit"
    return (
        "model_states_fit_activations_unknown" if usable_bytes >= 0 else "model_states_do_not_fit"
    )


def fits_of(v: Verdict | None) -> bool | None:
    """`hardware.fits`: True only for a full "fits", False when it does not fit (model states
    alone are enough to say so), None without a capacity or when activations are unknown."""
    if v is None or v == "model_states_fit_activations_unknown":
        return None
    return v == "fits"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ModelSummary:
    name: str
    model_type: str | None
    num_parameters: int
    """Elements over distinct parameter tensors (tied weights counted once)."""
    num_parameter_tensors: int
    num_buffers: int
    num_trainable_parameters: int
    """Elements of the parameters that train (all of them unless finetune freezes some)."""
    num_stored_elements: int
    """Parameter elements the job holds: num_parameters, plus LoRA adapters, with QLoRA's
    4-bit weights as packed uint8 elements (two weights each)."""
    num_stored_tensors: int
    """Parameter tensors the job holds (adapters included)."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TensorRankView:
    """One class of TP ranks of the most-loaded stage that hold the same vocabulary rows
    (torch's DTensor gives the last TP ranks fewer rows of a vocabulary TP does not divide:
    memplan.states.parallel.vocab_rows), with its own activations and timeline."""

    tensor_ranks: tuple[int, ...]
    per_gpu: RankStates
    """The class's most-loaded data-parallel rank."""
    activations_bytes: int
    """Its saved tensors (the LM head's logits and loss over its vocabulary rows)."""
    peak_bytes: int
    """Its timeline's highest phase."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Report:
    """Everything `memplan estimate` says, in bytes."""

    model: ModelSummary
    recipe: Recipe
    optimizer: OptimizerConfig
    layout: Layout
    """The layout the step runs on (memplan.states.layout)."""
    stages: tuple[StageStates, ...]
    """Every pipeline stage (one when there is no pipeline parallelism)."""
    stage: int
    """The most-loaded stage (highest peak): `ranks`, `per_gpu`, `buffers`, `activations` and
    `timeline` are its."""
    stage_peaks: tuple[tuple[int, int] | None, ...]
    """Per stage: (activation bytes, peak bytes) of its most-loaded GPU; None for an interior
    stage `assemble(every_stage=False)` skipped."""
    ranks: tuple[RankStates, ...]
    """Each class of identical data-parallel ranks of the most-loaded stage, in rank order;
    where TP ranks differ (`RankStates.tensor_ranks`), each class of TP ranks' in turn, TP
    rank 0's first."""
    per_gpu: RankStates
    """The most-loaded rank's class (largest total; the lowest rank on a tie)."""
    buffers: tuple[Term, ...]
    degrees: tuple[tuple[str, int], ...]
    """The layout's parallel degrees, (name, degree): dp, tp, pp, cp, ep."""
    gpus_per_node: int
    ranks_per_node: int
    """Ranks that share one node's host memory: min(gpus_per_node, world size) (a one-GPU job
    has one rank on its node, however many GPUs the node has)."""
    host_capacity_bytes: int | None
    """hardware.host_memory: CPU memory of one node."""
    activations_bytes: int
    """Bytes autograd holds for backward at the end of the forward pass, loss included
    (memplan.activations); 0 when not modelled."""
    transient_bytes: int
    """Transient buffers alive at the peak (memplan.step.timeline)."""
    activations: acts.Activations
    """The saved tensors behind `activations_bytes`, by block."""
    timeline: tl.Timeline
    """Bytes alive at each phase of the step, by category."""
    capacity_bytes: int | None
    gpu: str | None
    notes: tuple[str, ...]
    rules_transformers: str = versions.RULES_TRANSFORMERS
    """The transformers release whose activation rules were used (memplan.versions)."""
    tensor_views: tuple[TensorRankView, ...] = ()
    """Each class of TP ranks that differ, TP rank 0's (the report's own figures) first;
    empty when every TP rank holds the same bytes."""
    allocator: rp.AllocatorView | None = None
    """The most-loaded GPU's step replayed through the caching allocator (memplan.step.replay);
    None on CPU, and in plan's search (which keeps the timeline's packing bound)."""
    device_terms: tuple[device.DeviceTerm, ...] = ()
    alloc_conf_text: str = ""
    """hardware.alloc_conf as given (empty: torch's defaults)."""
    """GPU memory outside the allocator (memplan.step.device): the CUDA context, NCCL
    buffers; empty on CPU."""

    def states_of(self, rank: int, tensor_rank: int = 0) -> RankStates:
        """The model states of data-parallel rank `rank` on TP rank `tensor_rank`."""
        return next(
            s
            for s in self.ranks
            if rank in s.ranks and (not s.tensor_ranks or tensor_rank in s.tensor_ranks)
        )

    def tensor_view(self, tensor_rank: int) -> TensorRankView:
        """The class of TP ranks `tensor_rank` belongs to (the report's own figures when
        every TP rank is the same)."""
        for view in self.tensor_views:
            if tensor_rank in view.tensor_ranks:
                return view
        return TensorRankView(
            tensor_ranks=(tensor_rank,),
            per_gpu=self.per_gpu,
            activations_bytes=self.activations_bytes,
            peak_bytes=self.peak_bytes,
        )

    @property
    def buffer_bytes(self) -> int:
        return sum(t.bytes for t in self.buffers)

    @property
    def model_state_bytes(self) -> int:
        return self.per_gpu.total_bytes + self.buffer_bytes

    @property
    def peak_bytes(self) -> int:
        """Bytes alive at the step's peak on the most-loaded GPU: the timeline's highest
        phase (not the sum of each category's maximum: gradients, activations and transient
        buffers peak at different phases)."""
        return self.timeline.peak_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory held for one GPU's rank (optimizer scalars on CPU, offload, offloaded
        activations)."""
        return sum(t.bytes for t in self.per_gpu.host_terms) + self.activations.host_bytes

    @property
    def host_bytes_per_node(self) -> int:
        """Host memory of one node: the most-loaded rank's host bytes x the ranks on a node
        (an upper bound when ranks differ)."""
        most = max(sum(t.bytes for t in r.host_terms) for s in self.stages for r in s.ranks)
        return (most + self.activations.host_bytes) * self.ranks_per_node

    @property
    def peak_reserved(self) -> int | None:
        """torch.cuda.max_memory_reserved(), replayed; None without a replay."""
        return None if self.allocator is None else self.allocator.peak_reserved

    @property
    def device_used(self) -> int | None:
        """What nvidia-smi shows at the peak: peak_reserved + the terms outside the
        allocator; None without a replay."""
        if self.allocator is None:
            return None
        return device.device_used_bytes(self.allocator.peak_reserved, self.device_terms)

    @property
    def usable_bytes(self) -> int | None:
        """GPU memory left at the peak: capacity - device_used; without a replay (CPU, plan's
        search) the timeline's capacity - CUDA context - packing bound of reserved
        (memplan.step.timeline.Timeline.usable_bytes). None without a capacity."""
        used = self.device_used
        if used is None or self.capacity_bytes is None:
            return self.timeline.usable_bytes
        return self.capacity_bytes - used

    @property
    def verdict(self) -> Verdict | None:
        return verdict(
            usable_bytes=self.usable_bytes, activations_modelled=self.activations.modelled
        )

    @property
    def fits(self) -> bool | None:
        return fits_of(self.verdict)

    @property
    def not_modelled(self) -> tuple[str, ...]:
        """The memory terms the notes say this figure leaves out (memplan.report.notes.
        NOT_MODELLED): a "fits" beside them is on a partial figure, and says so."""
        return said.not_modelled(self.notes)
