"""What plan's search and `assemble_within` work out of one evaluation before any report: each
pipeline stage's saved tensors, floor and totals under a memory budget, and the most-loaded
stage (`work_out`); plan's view of it (`peak_within`, `Peak`) and what a layout alone gives
(`prepare`, `Prepared`). Split from memplan.report.estimate, which builds the Report from
it. Pure: no I/O, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from memplan import activations as acts
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.sources import Inventory
from memplan.report import notes
from memplan.report.outside import alloc_conf
from memplan.report.settings import capacity_of, check_async_tp, setting_of, step_settings
from memplan.states import fp8
from memplan.states.engines import Term
from memplan.states.engines.base import StepCache, StepStates
from memplan.states.layout import Layout
from memplan.states.parallel import stage_inventories
from memplan.states.stages import StageStates
from memplan.step import timeline as tl


def saved_on_stage(
    trained: Inventory,
    micro: acts.Activations,
    step: tl.StepSettings,
    st: StageStates,
    checkpoint_every: int = 1,
) -> acts.Activations:
    """The saved tensors at its peak of one GPU of pipeline stage `st` (of TP rank
    `step.layout.tensor_rank`)."""
    return acts.on_rank(
        trained,
        micro,
        step.layout,
        st.stage,
        step.accumulation_steps,
        checkpoint_every=checkpoint_every,
    )


def stage_buffer_bytes(st: StageStates) -> int:
    return sum(t.bytes for t in st.buffers)


# eq=False: compared by identity, never by value (see memplan/report/result.py)
@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """What `assemble_within` works out from a spec's layout alone, not its training keys
    (plan evaluates each layout at several micro-batches, recomputation policies and compile
    flags: `prepare` once, then pass it to each)."""

    layout: Layout
    local: tuple[Inventory, ...]
    """Each stage's own model (stage_inventories)."""
    stages: list[StageStates]
    """The stages' states with fp8's scaling state among their buffers."""
    viewed: list[int]
    """_stages_to_view."""
    kept: Layout
    """`layout.keep(*acts.SAVED_FIELDS)`: what acts.micro_batch reads of it."""
    buffer_bytes: tuple[int, ...]
    """Each stage's buffers' bytes (stage_buffer_bytes)."""
    step_states: dict[int, StepStates] = field(default_factory=dict)
    """Each viewed stage's model states as the engines read them (StepSettings.states: the
    layout, precision, optimizer and device, none of them training keys), made by the first
    evaluation that reads them."""


def prepare(
    spec: Spec, trained: Inventory, stages: Sequence[StageStates], *, every_stage: bool = False
) -> Prepared:
    """`Prepared` for `spec`'s layout (its training keys are not read)."""
    layout = Layout.of(
        spec.parallelism, device=spec.hardware.device, implementation=spec.model.implementation
    )
    local = (
        stage_inventories(trained, layout)
        if trained.architecture is not None
        else (trained,) * len(stages)
    )
    staged = [_with_fp8_state(spec, st, local[st.stage]) for st in stages]
    return Prepared(
        layout=layout,
        local=local,
        stages=staged,
        viewed=_stages_to_view(staged, every_stage),
        kept=layout.keep(*acts.SAVED_FIELDS),
        buffer_bytes=tuple(stage_buffer_bytes(st) for st in staged),
    )


# eq=False: compared by identity, never by value (see memplan/report/result.py)
@dataclass(frozen=True, slots=True, eq=False)
class Peak:
    """What plan's search reads of an evaluation under its budget (`peak_within`): the same
    values as `assemble_within`'s Report of the same arguments, without its timeline's points,
    notes and views."""

    layout: Layout
    stages: tuple[StageStates, ...]
    """Report.stages"""
    activations: acts.Activations
    """Report.activations: the most-loaded stage's saved tensors."""
    peak_bytes: int
    """Report.peak_bytes"""
    usable_bytes: int | None
    """Report.usable_bytes (no allocator replayed: the timeline's packing bound)."""


def peak_within(
    spec: Spec,
    trained: Inventory,
    stages: Sequence[StageStates],
    *,
    budget: int | None = None,
    cache: StepCache | None = None,
    prepared: Prepared | None = None,
    likely_fits: bool = False,
) -> Peak | None:
    """`assemble_within(spec, model, trained, stages, budget=budget, cache=cache,
    prepared=prepared)` as plan's search reads it (`Peak`): None where that is None, the
    same checks made (it raises what that raises). `likely_fits`: the caller expects every
    viewed stage's peak under `budget` (`work_out`'s `floors`: the same answer, less work
    when it is right)."""
    w = work_out(
        spec,
        trained,
        stages,
        budget=budget,
        every_stage=False,
        cache=cache,
        prepared=prepared,
        floors=not likely_fits,
    )
    if w is None:
        return None
    top = w.prepared.stages[w.index]
    saved = w.views[w.index][0]
    notes.sequence_notes(spec, trained, [v[0] for v in w.views.values()])  # what it refuses
    alloc_conf(spec.hardware.alloc_conf)  # checked as assemble_within checks it
    worked = w.worked[w.index]
    return Peak(
        layout=w.prepared.layout,
        stages=tuple(w.prepared.stages),
        activations=saved,
        peak_bytes=worked.peak_bytes,
        usable_bytes=tl.usable_bytes(
            w.step,
            worked,
            per_gpu=top.per_gpu,
            buffer_bytes=w.prepared.buffer_bytes[w.index],
            saved=saved,
            capacity_bytes=w.capacity,
        ),
    )


@dataclass(frozen=True, slots=True, eq=False)
class Worked:
    """What `work_out` works out for `assemble_within` and `peak_within`."""

    setting: acts.Setting
    capacity: int | None
    prepared: Prepared
    step: tl.StepSettings
    cache: StepCache
    shared: dict[int, tl.StepParts]
    """Each viewed stage's tl.parts."""
    worked: dict[int, tl.StepTotals]
    """Each viewed stage's tl.totals."""
    views: dict[int, tuple[acts.Activations, int]]
    """Each viewed stage's saved tensors and peak."""
    index: int
    """The most-loaded viewed stage."""


def work_out(
    spec: Spec,
    trained: Inventory,
    stages: Sequence[StageStates],
    *,
    budget: int | None,
    every_stage: bool,
    cache: StepCache | None,
    prepared: Prepared | None,
    floors: bool = True,
) -> Worked | None:
    """Each viewed stage's saved tensors and totals, and the most-loaded of them; None as
    `assemble_within` gives None (its docstring).

    `floors` False (with a budget): the caller expects a fit, whose every floor is worked
    out in vain (a floor only ends an evaluation early, and no floor is above its stage's
    peak: tests/test_plan_floor.py). Then every viewed stage's totals are worked out
    without the floors first; where each stage's activations are modelled and each peak is
    under the budget, that is the answer the floors give (each floor is under its peak);
    anything else (a peak above the budget, an error, a stage not modelled) goes on as with
    the floors, in their order, reusing the totals already worked out (each the same value):
    the same None, value or error."""
    check_async_tp(spec)  # reads training.compile: checked for every spec
    setting = setting_of(spec)
    capacity = capacity_of(spec)
    if prepared is None:
        prepared = prepare(spec, trained, stages, every_stage=every_stage)
    layout, local, viewed = prepared.layout, prepared.local, prepared.viewed
    stages = prepared.stages
    micro = acts.micro_batch(trained, setting, layout, spec.finetune, kept=prepared.kept)
    step = step_settings(spec, layout)
    cache = StepCache() if cache is None else cache
    buffer_bytes = prepared.buffer_bytes
    # Each viewed stage's saved tensors, worked out when first read: a floor above the budget
    # ends the evaluation before the later stages' are needed (nothing in them raises).
    saved_on: dict[int, acts.Activations] = {}

    def saved_of(i: int) -> acts.Activations:
        if i not in saved_on:
            saved_on[i] = saved_on_stage(trained, micro, step, stages[i], setting.checkpoint_every)
        return saved_on[i]

    # What a stage's floor and its timeline both work out, made once (tl.parts).
    shared: dict[int, tl.StepParts] = {}

    def parts_of(i: int) -> tl.StepParts:
        if i not in shared:
            states = prepared.step_states.get(i)
            if states is None:
                states = prepared.step_states[i] = step.states(
                    local[stages[i].stage], stages[i].per_gpu
                )
            shared[i] = tl.parts(
                step,
                local[stages[i].stage],
                per_gpu=stages[i].per_gpu,
                saved=saved_of(i),
                cache=cache,
                states=states,
            )
        return shared[i]

    # Each viewed stage's peak (tl.totals); the Timeline only of the highest.
    worked: dict[int, tl.StepTotals] = {}

    def totals_of(i: int) -> tl.StepTotals:
        if i not in worked:
            worked[i] = tl.totals(
                step,
                local[stages[i].stage],
                per_gpu=stages[i].per_gpu,
                buffer_bytes=buffer_bytes[i],
                saved=saved_on[i],
                cache=cache,
                shared=parts_of(i),
            )
        return worked[i]

    def finished() -> Worked:
        """The worked stages, the highest peak's (the first of equals) the report's."""
        views = {i: (saved_on[i], worked[i].peak_bytes) for i in viewed}
        return Worked(
            setting=setting,
            capacity=capacity,
            prepared=prepared,
            step=step,
            cache=cache,
            shared=shared,
            worked=worked,
            views=views,
            index=max(views, key=lambda i: (views[i][1], -i)),
        )

    if not floors and budget is not None:
        try:
            for i in viewed:
                if not saved_of(i).modelled or totals_of(i).peak_bytes > budget:
                    break
            else:  # every viewed stage modelled and under the budget: what the floors give
                return finished()
        except MemplanError:
            pass  # raised again below, where the floors' order reaches it
        # A wrong guess: the floors' path below, with the totals already worked out.
    # A stage without modelled activations is not pruned here: plan says so instead.
    floor_of: dict[int, int] = {}
    if budget is not None:
        for i in viewed:
            if not saved_of(i).modelled:
                continue
            floor_of[i] = tl.floor_bytes(
                step,
                local[stages[i].stage],
                per_gpu=stages[i].per_gpu,
                buffer_bytes=buffer_bytes[i],
                saved=saved_on[i],
                cache=cache,
                shared=parts_of(i),
            )
            if floor_of[i] > budget:
                return None
    for i in viewed:
        saved_of(i)
    # With a budget and every viewed stage's activations modelled, the first timeline that
    # peaks above the budget settles it (the report's peak is its highest stage's, and plan
    # reads nothing else of a report over the budget): None, as for a floor. The stages are
    # built highest floor first, the likeliest to.
    settle = budget is not None and len(floor_of) == len(viewed)
    order = sorted(viewed, key=lambda i: -floor_of[i]) if settle else viewed
    for i in order:
        peak = totals_of(i).peak_bytes
        if settle and budget is not None and peak > budget:
            alloc_conf(spec.hardware.alloc_conf)  # checked as below
            return None
    return finished()


def _stages_to_view(stages: Sequence[StageStates], every_stage: bool) -> list[int]:
    """The pipeline stages whose GPU gets its own activations and timeline: all of them, or
    (plan, `every_stage=False`) the first, the last and one interior stage per distinct
    (layers, model states, per-GPU bytes): interior stages alike differ only in micro-batches
    in flight, fewer further down, so the first of them dominates."""
    out: list[int] = []
    seen: set[tuple[object, ...]] = set()
    for i, st in enumerate(stages):
        if not every_stage and 0 < i < len(stages) - 1:
            key = (st.layers and len(st.layers), st.model_state_bytes, st.per_gpu.total_bytes)
            if key in seen:
                continue
            seen.add(key)
        out.append(i)
    return out


def _with_fp8_state(spec: Spec, st: StageStates, local: Inventory) -> StageStates:
    """The stage with Transformer Engine's fp8 scaling state among its buffers
    (memplan.states.fp8)."""
    p = spec.precision
    if p.fp8 not in fp8.TE_RECIPES:
        return st
    if spec.hardware.device != "cuda":
        raise MemplanError(
            "fp8 runs Transformer Engine's fp8 GEMMs, which need a CUDA GPU (Hopper or "
            "newer): set hardware.device: cuda or precision.fp8: none.",
            field="precision.fp8",
        )
    gemms, n, formula = fp8.scaling_state(
        local.parameters, recipe=p.fp8, amax_history_len=p.fp8_amax_history
    )
    row = Term(
        category="buffers",
        name="fp8_scaling_state",
        dtype="fp32",
        tensors=gemms,
        elements=n // 4,
        bytes=n,
        formula=formula,
        source=fp8.SRC_META,
    )
    return replace(st, buffers=(*st.buffers, row))
