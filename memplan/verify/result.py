"""What a verify run found: predicted vs measured bytes per category, per rank. Pure (no torch).

A `Row` compares one category. Model states (parameters, gradients, every optimizer state,
buffers) must match to the byte; activations within 1% and the peak within 3% (relative to
the prediction). A category the calculator does not model yet is shown, never failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from memplan.report.schema import verify as schema

# Tolerances of issue 6, relative to the predicted bytes. Model states are counted tensor by
# tensor on both sides, so any difference is a bug; activations depend on kernel choices
# (1%); the CUDA peak also holds allocator rounding and workspaces (3%).
EXACT = 0.0
ACTIVATIONS_TOLERANCE = 0.01
PEAK_TOLERANCE = 0.03

# DeepSpeed ZeRO++ hpZ's secondary partitions, measured by memplan.verify.deepspeed_engine
# against the step's transients (memplan.states.engines.deepspeed.step.hpz_secondary): at the
# end of a micro-batch's backward, and at the end of the optimizer step.
HPZ_BACKWARD = "hpz_secondary (backward)"
HPZ_STEP = "hpz_secondary (optimizer step)"
# DeepSpeed's boundary engine.step() on CPU: the most bytes it allocates and holds at once
# (memplan.verify.deepspeed_engine.step_peak), against the step's transients
# (memplan.verify.runner.deepspeed_step_on_gloo).
STEP_TRANSIENT = "deepspeed step transient"
# What that row allows beyond its terms: the step's 0-dim tensors (gradient norms, the overflow
# flag, the loss scale), which memplan does not count one by one; at most 252 B in
# benchmarks/results/verify-deepspeed-step.json.
STEP_SCALAR_SLACK = 1024
ENGINE_ROWS = (HPZ_BACKWARD, HPZ_STEP, STEP_TRANSIENT)

# The categories every table shows, in order. Optimizer states by name follow
# `optimizer_states` (the order the calculator lists them).
MODEL_STATE_CATEGORIES = ("parameters", "gradients", "optimizer_states")


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One category on one rank."""

    name: str
    """`parameters`, `gradients`, `optimizer_states`, a state name (`exp_avg`), `buffers`,
    `activations` or `peak`."""
    predicted: int | None
    """Bytes memplan predicts, or None when the calculator does not model it yet."""
    measured: int | None
    """Bytes measured on real (or fake) tensors, or None when this run cannot measure it."""
    tolerance: float
    """Allowed |measured - predicted| as a fraction of predicted (0.0: to the byte)."""
    state: bool = False
    """True for one named optimizer state (a sub-row of `optimizer_states`)."""
    slack: int = 0
    """Allowed |measured - predicted| in bytes on top of `tolerance` (STEP_SCALAR_SLACK)."""
    enforced: bool = True
    """False when the prediction is knowingly incomplete (the peak before transient buffers
    are modelled): both figures are shown, the tolerance is not applied."""

    @property
    def checked(self) -> bool:
        return self.enforced and self.predicted is not None and self.measured is not None

    @property
    def delta(self) -> int | None:
        """measured - predicted, in bytes."""
        if self.predicted is None or self.measured is None:
            return None
        return self.measured - self.predicted

    @property
    def ratio(self) -> float | None:
        """measured / predicted (None when either is missing or predicted is 0)."""
        if self.predicted is None or self.measured is None or self.predicted == 0:
            return None
        return self.measured / self.predicted

    @property
    def ok(self) -> bool | None:
        """Within tolerance, or None when the row is not checked."""
        delta = self.delta
        if delta is None or self.predicted is None or not self.enforced:
            return None
        return abs(delta) <= self.tolerance * self.predicted + self.slack


@dataclass(frozen=True, slots=True, kw_only=True)
class RankResult:
    """Every category on one rank."""

    rank: int
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase:
    """CUDA allocator counters at the end of one phase of the last step (bytes)."""

    name: str
    allocated: int
    """torch.cuda.memory_allocated() at the end of the phase."""
    max_allocated: int
    """torch.cuda.max_memory_allocated() during the phase (reset at its start)."""
    reserved: int
    """torch.cuda.memory_reserved() at the end of the phase."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """A whole verify run."""

    setup: dict[str, Any]
    """What ran: model, device, engine, ZeRO stage, ranks, precision, optimizer, layers, fake."""
    ranks: tuple[RankResult, ...]
    """One entry per rank, index = rank."""
    most_loaded: int
    """The rank memplan predicts to be the most loaded (its rows are the headline)."""
    phases: tuple[Phase, ...] = ()
    """CUDA runs: allocator counters per phase of the last step, most-loaded rank."""
    full_depth: tuple[Row, ...] = ()
    """With --layers K: the full-depth prediction beside the K-layer measurement extrapolated
    with the measured per-layer bytes (shown, not checked)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = ()
    """Installed torch/transformers that differ (major.minor) from what the rules describe."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.ranks)

    @property
    def headline(self) -> RankResult:
        return self.ranks[self.most_loaded]

    def failures(self) -> list[str]:
        """`rank 1: exp_avg predicted 4,096 B, measured 4,100 B` for each row out of tolerance."""
        out = []
        for rank in self.ranks:
            for row in rank.rows:
                if row.ok is False:
                    where = f"rank {rank.rank}: " if len(self.ranks) > 1 else ""
                    out.append(
                        f"{where}{row.name} predicted {row.predicted:,} B, measured "
                        f"{row.measured:,} B (tolerance {row.tolerance:.0%}"
                        + (f" + {row.slack:,} B)" if row.slack else ")")
                    )
        return out


def rows_for(
    *,
    predicted: dict[str, int | None],
    measured: dict[str, int | None],
    state_names: Iterable[str],
    peak_enforced: bool = True,
) -> tuple[Row, ...]:
    """Rows in display order: model states, each optimizer state, buffers, activations, peak.

    A state measured but not predicted (or the reverse) still gets a row, so an unexpected
    tensor shows up as a failure rather than disappearing.
    """
    names = list(dict.fromkeys(state_names))
    rows = [
        Row(name=c, predicted=predicted.get(c), measured=measured.get(c), tolerance=EXACT)
        for c in MODEL_STATE_CATEGORIES
    ]
    for name in names:
        rows.append(
            Row(
                name=name,
                predicted=predicted.get(name, 0),
                measured=measured.get(name, 0),
                tolerance=EXACT,
                state=True,
            )
        )
    rows.append(
        Row(
            name="buffers",
            predicted=predicted.get("buffers"),
            measured=measured.get("buffers"),
            tolerance=EXACT,
        )
    )
    for name in ENGINE_ROWS:
        if name in predicted or name in measured:
            rows.append(
                Row(
                    name=name,
                    predicted=predicted.get(name),
                    measured=measured.get(name),
                    tolerance=EXACT,
                    slack=STEP_SCALAR_SLACK if name == STEP_TRANSIENT else 0,
                )
            )
    rows.append(
        Row(
            name="activations",
            predicted=predicted.get("activations"),
            measured=measured.get("activations"),
            tolerance=ACTIVATIONS_TOLERANCE,
        )
    )
    rows.append(
        Row(
            name="peak",
            predicted=predicted.get("peak"),
            measured=measured.get("peak"),
            tolerance=PEAK_TOLERANCE,
            enforced=peak_enforced,
        )
    )
    return tuple(rows)


def _row(row: Row) -> schema.VerifyRow:
    return schema.VerifyRow(
        predicted=row.predicted,
        measured=row.measured,
        delta=row.delta,
        ratio=row.ratio,
        tolerance=row.tolerance,
        checked=row.checked,
        ok=row.ok,
        slack_bytes=row.slack,
    )


def _categories(rank: RankResult) -> dict[str, schema.VerifyRow]:
    return {row.name: _row(row) for row in rank.rows}


def to_json(result: VerifyResult) -> dict[str, Any]:
    """The `memplan verify --json` document, built as memplan.report.schema.VerifyReport. The
    keys `ranks` (several ranks), `phases` (CUDA) and `full_depth` (--layers) are left unset,
    so left out of the document, when the run has none."""
    shapes: dict[str, Any] = {}
    if len(result.ranks) > 1:
        shapes["ranks"] = [_categories(r) for r in result.ranks]
    if result.phases:
        shapes["phases"] = [
            schema.AllocatorPhase(
                name=p.name,
                allocated=p.allocated,
                max_allocated=p.max_allocated,
                reserved=p.reserved,
            )
            for p in result.phases
        ]
    if result.full_depth:
        shapes["full_depth"] = {
            r.name: schema.FullDepthRow(predicted=r.predicted, extrapolated=r.measured)
            for r in result.full_depth
        }
    document = schema.VerifyReport(
        ok=result.ok,
        setup=schema.VerifySetup.model_validate(result.setup),
        rank=result.most_loaded,
        categories=_categories(result.headline),
        **shapes,
        failures=result.failures(),
        notes=list(result.notes),
        warnings=list(result.warnings),
    )
    return document.model_dump(mode="json", exclude_unset=True)
