"""What `memplan plan` finds: each layout that fits (`Candidate`) and the search's whole answer
(`PlanResult`), as memplan.plan.search returns them and plan/json.py and the CLI show them."""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.config.parallelism import ParallelismSpec
from memplan.plan.steptime import StepTime


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One layout that fits, with its memory and estimated time."""

    data: int
    tensor: int
    pipeline: int
    context: int
    expert: int
    engine: str
    zero_stage: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    recompute: str
    offload: str
    layers_per_stage: tuple[int, ...] | None
    virtual_stages: int
    """Model chunks per pipeline rank (> 1: Megatron's interleaved 1F1B schedule)."""
    sequence_parallel: bool
    schedule: str
    implementation: str
    """Whose model code the row's activations are (model.implementation)."""
    fsdp_wrap: str | None
    """FSDP2's grouping as the row's layout resolves it; None for other engines."""
    compile: bool
    peak_bytes: int
    headroom_bytes: int
    time: StepTime
    tokens_per_step: int
    parallelism: ParallelismSpec = field(repr=False, compare=False)
    """The layout as a spec's `parallelism` (with the micro-batch, recomputation and
    accumulation above, `row_spec` gives the spec `memplan estimate` reproduces it from)."""
    not_modelled: tuple[str, ...] = ()
    """The terms this row's figure leaves out (memplan.report.notes.NOT_MODELLED), for the
    rows plan shows (replayed as estimate would); its fit is before them."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total_s


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    gpus: int
    global_batch_size: int
    budget_bytes: int
    capacity_bytes: int
    layouts: tuple[Candidate, ...]
    """Fitting layouts, fastest first (all of them; `top` says how many to show)."""
    searched: int
    pruned: dict[str, int]
    suggestion: str = ""
    top: int = 10
    notes: tuple[str, ...] = field(default_factory=tuple)
