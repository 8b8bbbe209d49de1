"""The calculator: a frozen spec and a model inventory in, a report out. Pure: no I/O, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
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
    layout_of,
    setting_of,
)
from memplan.report.worked import (
    Prepared,
    saved_on_stage,
    stage_buffer_bytes,
    work_out,
)
from memplan.states.engines import STEPS, RankStates
from memplan.states.engines.base import StepCache
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
        buffer_bytes=stage_buffer_bytes(st),
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
    w = work_out(
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
        saved = saved_on_stage(inventory, micro, rank_step, top, setting.checkpoint_every)
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
