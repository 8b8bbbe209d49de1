"""The calculator: a frozen spec and a model inventory in, a report out. Pure: no I/O, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from memplan import activations as acts
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.sources import Inventory
from memplan.report import notes
from memplan.report.outside import alloc_conf, outside_allocator
from memplan.report.result import ModelSummary, Report, TensorRankView
from memplan.report.settings import (
    capacity_of,
    check_async_tp,
    layout_of,
    setting_of,
    step_settings,
)
from memplan.states import fp8
from memplan.states.engines import STEPS, RankStates, Term
from memplan.states.engines.base import StepCache, StepStates
from memplan.states.layout import Layout
from memplan.states.parallel import stage_inventories
from memplan.states.stages import StageStates, stage_states
from memplan.step import device
from memplan.step import replay as rp
from memplan.step import timeline as tl


@lru_cache(maxsize=64)
def summary(inventory: Inventory, trained: Inventory | None = None) -> ModelSummary:
    """The model's counts: `inventory` is the model as `memplan inventory` lists it, `trained`
    what the job holds (finetune.apply: LoRA adapters added, 4-bit weights packed two to a
    uint8 element). Cached per inventory object: plan assembles thousands of reports of one
    inventory."""
    held = inventory if trained is None else trained
    return ModelSummary(
        name=inventory.name,
        model_type=inventory.architecture.model_type if inventory.architecture else None,
        num_parameters=inventory.num_parameters,
        num_parameter_tensors=len(inventory.parameters),
        num_buffers=len(inventory.buffers),
        num_trainable_parameters=finetune.num_trainable(held.parameters),
        num_stored_elements=held.num_parameters,
        num_stored_tensors=len(held.parameters),
    )


def _saved_on(
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


def _buffer_bytes(st: StageStates) -> int:
    return sum(t.bytes for t in st.buffers)


def _timeline_of(
    step: tl.StepSettings,
    capacity: int | None,
    cache: StepCache,
    st: StageStates,
    per_gpu: RankStates,
    local: Inventory,
    saved: acts.Activations,
    shared: tl.StepParts | None = None,
    worked: tl.StepTotals | None = None,
) -> tl.Timeline:
    """The step's timeline of one GPU of stage `st` holding `per_gpu`'s states and `saved`
    (`shared`: what its floor already worked out, tl.parts; `worked`: its tl.totals)."""
    return tl.build(
        step,
        local,
        per_gpu=per_gpu,
        buffer_bytes=_buffer_bytes(st),
        saved=saved,
        capacity_bytes=capacity,
        cache=cache,
        shared=shared,
        worked=worked,
    )


def _check_torchtitan_tied_pipeline(spec: Spec, trained: Inventory) -> None:
    """torchtitan refuses to build a model whose output weight is tied to its embedding under
    pipeline parallelism (torchtitan 0.3.0 models/common/decoder.py::Decoder.Config.
    update_from_config: NotImplementedError "Weight tying is not supported with Pipeline
    Parallel."); memplan says so instead of estimating a job that cannot start."""
    if spec.model.implementation == "torchtitan" and spec.parallelism.pipeline > 1 and trained.tied:
        raise MemplanError(
            "torchtitan does not run a model whose lm_head is tied to its embedding under "
            "pipeline parallelism (0.3.0 models/common/decoder.py::Decoder.Config."
            'update_from_config: "Weight tying is not supported with Pipeline Parallel."): '
            "set parallelism.pipeline: 1, or model.implementation: transformers.",
            field="parallelism.pipeline",
        )


def model_states(spec: Spec, trained: Inventory) -> list[StageStates]:
    """Parameters, gradients and optimizer states of every stage and rank class; `trained` is
    the inventory the job trains (`finetune.apply`)."""
    _check_torchtitan_tied_pipeline(spec, trained)
    return stage_states(
        trained, recipe=spec.recipe(), opt=spec.optimizer.config(), layout=layout_of(spec)
    )


def estimate(spec: Spec, inventory: Inventory) -> Report:
    """Account one training step, tensor by tensor, per rank."""
    trained = finetune.apply(spec, inventory)
    return assemble(spec, inventory, trained, model_states(spec, trained))


def assemble(
    spec: Spec,
    model: Inventory,
    trained: Inventory,
    stages: Sequence[StageStates],
    *,
    every_stage: bool = True,
    cache: StepCache | None = None,
) -> Report:
    """The report from the model states of every stage (plan reuses them across layouts
    that differ only in what does not change them: micro-batch, recomputation, and passes
    one `cache` for its whole search; without one, this call has its own). `model` is the
    inventory as given, `trained` what the job trains (`finetune.apply` of it).

    Each pipeline rank gets its own activations and timeline; the most-loaded is the one with
    the highest peak. `every_stage=False` (plan) skips the interior ranks another interior rank
    dominates: same layers and model states but fewer micro-batches in flight, and the
    tensor-rank views and the allocator replay.
    """
    report = assemble_within(
        spec, model, trained, stages, every_stage=every_stage, cache=cache, replay=every_stage
    )
    assert report is not None  # no budget, nothing to prune
    return report


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
    """Each stage's buffers' bytes (_buffer_bytes)."""
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
        buffer_bytes=tuple(_buffer_bytes(st) for st in staged),
    )


def assemble_within(
    spec: Spec,
    model: Inventory,
    trained: Inventory,
    stages: Sequence[StageStates],
    *,
    budget: int | None = None,
    every_stage: bool = False,
    replay: bool = False,
    cache: StepCache | None = None,
    prepared: Prepared | None = None,
) -> Report | None:
    """`assemble` for plan: None when some viewed stage with modelled activations has a
    floor (memplan.step.timeline.floor_bytes: its timeline's points without the transient
    terms) above `budget`, so that no peak can be under it: found before any timeline is
    built; and, where every viewed stage's activations are modelled, when some viewed stage's
    timeline peaks above `budget` (the report's peak would). `replay` replays the most-loaded
    stage through the caching allocator (estimate's verdict) even where `every_stage` is off.
    `prepared`: `prepare(spec, trained, stages, every_stage=every_stage)` of a spec with the
    same layout, when already worked out."""
    w = _worked(
        spec,
        trained,
        stages,
        budget=budget,
        every_stage=every_stage,
        cache=cache,
        prepared=prepared,
    )
    if w is None:
        return None
    setting, capacity, step, cache = w.setting, w.capacity, w.step, w.cache
    layout, local, stages = w.prepared.layout, w.prepared.local, w.prepared.stages
    views, index = w.views, w.index
    top = stages[index]
    saved = views[index][0]
    timeline = _timeline_of(
        step,
        capacity,
        cache,
        top,
        top.per_gpu,
        local[top.stage],
        saved,
        w.shared[index],
        w.worked[index],
    )
    tensor_views = (
        _tensor_views(spec, trained, step, capacity, cache, top, saved.bytes, timeline)
        if every_stage
        else ()
    )
    conf = alloc_conf(spec.hardware.alloc_conf)  # checked even where nothing is replayed
    allocator: rp.AllocatorView | None = None
    terms: tuple[device.DeviceTerm, ...] = ()
    if replay and spec.hardware.device == "cuda":
        arch = trained.architecture
        terms = outside_allocator(spec, layout, hidden=None if arch is None else arch.hidden_size)
        limit = None if capacity is None else capacity - sum(t.bytes for t in terms)
        allocator = rp.replay(
            timeline,
            per_gpu=top.per_gpu,
            buffers=top.buffers,
            saved=saved,
            inventory=local[top.stage],
            conf=conf,
            limit=limit,
            gradient_stream=STEPS[layout.engine].gradient_stream,
        )
    said = (
        list(trained.notes)
        + list(saved.notes)
        + notes.fp8_notes(spec, local[top.stage], saved)
        + notes.sequence_notes(spec, trained, [v[0] for v in views.values()])
        + notes.engine_notes(layout)
        + notes.zero_grad_notes(spec, layout)
        + notes.allocator_notes(allocator)
    )
    return Report(
        model=summary(model, trained),
        recipe=spec.recipe(),
        optimizer=spec.optimizer.config(),
        layout=layout,
        stages=tuple(stages),
        stage=top.stage,
        stage_peaks=tuple(
            (views[i][0].bytes, views[i][1]) if i in views else None for i in range(len(stages))
        ),
        ranks=top.ranks,
        per_gpu=top.per_gpu,
        buffers=top.buffers,
        degrees=(
            ("dp", layout.data),
            ("tp", layout.tensor),
            ("pp", layout.pipeline),
            ("cp", layout.context),
            ("ep", layout.expert),
        ),
        gpus_per_node=spec.hardware.gpus_per_node,
        ranks_per_node=min(spec.hardware.gpus_per_node, layout.world_size),
        host_capacity_bytes=spec.hardware.host_memory,
        activations_bytes=saved.bytes,
        transient_bytes=timeline.peak.of("transient"),
        activations=saved,
        timeline=timeline,
        capacity_bytes=capacity,
        gpu=spec.hardware.gpu,
        notes=tuple(said),
        rules_transformers=setting.transformers,
        tensor_views=tensor_views,
        allocator=allocator,
        device_terms=terms,
        alloc_conf_text=spec.hardware.alloc_conf,
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
    viewed stage's peak under `budget` (`_worked`'s `floors`: the same answer, less work
    when it is right)."""
    w = _worked(
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
class _Worked:
    """What `_worked` works out for `assemble_within` and `peak_within`."""

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


def _worked(
    spec: Spec,
    trained: Inventory,
    stages: Sequence[StageStates],
    *,
    budget: int | None,
    every_stage: bool,
    cache: StepCache | None,
    prepared: Prepared | None,
    floors: bool = True,
) -> _Worked | None:
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
            saved_on[i] = _saved_on(trained, micro, step, stages[i], setting.checkpoint_every)
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

    if not floors and budget is not None:
        try:
            for i in viewed:
                if not saved_of(i).modelled or totals_of(i).peak_bytes > budget:
                    break
            else:  # every viewed stage modelled and under the budget: what the floors give
                views = {i: (saved_on[i], worked[i].peak_bytes) for i in viewed}
                return _Worked(
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
    views = {i: (saved_on[i], worked[i].peak_bytes) for i in viewed}
    index = max(views, key=lambda i: (views[i][1], -i))
    return _Worked(
        setting=setting,
        capacity=capacity,
        prepared=prepared,
        step=step,
        cache=cache,
        shared=shared,
        worked=worked,
        views=views,
        index=index,
    )


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


def _tensor_views(
    spec: Spec,
    inventory: Inventory,
    step: tl.StepSettings,
    capacity: int | None,
    cache: StepCache,
    top: StageStates,
    activations_bytes: int,
    timeline: tl.Timeline,
) -> tuple[TensorRankView, ...]:
    """The most-loaded stage's classes of TP ranks (memplan.states.stages tags each rank class
    with its TP ranks where they differ), each with its own activations and timeline: the LM
    head's logits and loss cover that class's vocabulary rows. Empty when no class differs
    (plan, which compares layouts by their most-loaded rank only, does not ask)."""
    groups = list(dict.fromkeys(r.tensor_ranks for r in top.ranks if r.tensor_ranks))
    if len(groups) < 2:
        return ()
    views = [
        TensorRankView(
            tensor_ranks=groups[0],
            per_gpu=top.per_gpu,
            activations_bytes=activations_bytes,
            peak_bytes=timeline.peak_bytes,
        )
    ]
    setting = setting_of(spec)
    for group in groups[1:]:
        mine = [r for r in top.ranks if r.tensor_ranks == group]
        per_gpu = max(mine, key=lambda r: (r.total_bytes, -r.ranks[0]))
        rank_layout = step.layout.for_tensor_rank(group[0])
        rank_step = replace(step, layout=rank_layout)
        local = stage_inventories(inventory, rank_layout)[top.stage]
        micro = acts.micro_batch(inventory, setting, rank_layout, spec.finetune)
        saved = _saved_on(inventory, micro, rank_step, top, setting.checkpoint_every)
        rank_timeline = _timeline_of(rank_step, capacity, cache, top, per_gpu, local, saved)
        views.append(
            TensorRankView(
                tensor_ranks=group,
                per_gpu=per_gpu,
                activations_bytes=saved.bytes,
                peak_bytes=rank_timeline.peak_bytes,
            )
        )
    return tuple(views)


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
