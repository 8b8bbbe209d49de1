"""The `memplan estimate --json` and `memplan plan --json` documents, built as the models of
memplan.report.schema: the keys, their order and their types are defined there once (the same
models print the JSON Schemas), and here only which figure of a Report or a PlanResult fills
each field. Building a model validates it (strict: no coercion), so a producer and its schema
cannot drift apart.

`estimate --json` itself takes a faster road to the same bytes: `estimate_json` runs the same
builders with every model replaced by `dict` (PLAIN), so that the CLI neither imports the
document models nor validates them (17 ms of its start: benchmarks/estimate_speed.py). That
holds only while every builder passes every field of its model, in the model's order, as the
JSON value the model would dump (lists, not tuples; str, int, bool, None): tests/test_json_fast.py
checks `estimate_json(r) == dump(estimate_document(r))`, key order and types included, on every
shipped config and preset, and `estimate_document` (validated) stays the contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memplan import versions

if TYPE_CHECKING:
    from memplan.activations import Activations, Block, Saved
    from memplan.memory import Transient
    from memplan.model.inventory import Inventory, TensorSpec
    from memplan.report.result import Report
    from memplan.report.schema import estimate as s
    from memplan.report.schema.base import Doc
    from memplan.states.engines import RankStates, Term
    from memplan.states.stages import StageStates
    from memplan.step.timeline import Point, Timeline


def dump(document: Doc) -> dict[str, Any]:
    """A document model as the JSON the CLI prints."""
    return document.model_dump(mode="json")


class _Plain:
    """memplan.report.schema.estimate with every model replaced by `dict`: `PLAIN.Row(...)` is
    the dict of the fields as given, in the order given (the fast road of `estimate_json`)."""

    def __getattr__(self, name: str) -> Callable[..., dict[str, Any]]:
        return dict


PLAIN: Any = _Plain()


# --- memplan estimate --json ---------------------------------------------------------------------


def estimate_json(report: Report) -> dict[str, Any]:
    """The `memplan estimate --json` document (schema: memplan.report.schema.EstimateReport):
    what `dump(estimate_document(report))` gives, built as plain dicts (see the module
    docstring)."""
    document: dict[str, Any] = _estimate(report, PLAIN)
    return document


def estimate_document(report: Report) -> s.EstimateReport:
    """`report` as the EstimateReport model, section by section (validated)."""
    from memplan.report.schema import estimate as models

    document: s.EstimateReport = _estimate(report, models)
    return document


def _estimate(report: Report, s: Any) -> Any:
    """`report` as the EstimateReport document, each model built by `s`: the module
    memplan.report.schema.estimate, or PLAIN."""
    return s.EstimateReport(
        model=_model(report, s),
        precision=_precision(report, s),
        optimizer=s.OptimizerInfo(name=report.optimizer.name),
        parallelism=s.ParallelismInfo(
            engine=report.layout.engine,
            data=report.layout.data,
            zero_stage=report.layout.stage,
            pipeline=len(report.stages),
            reduce_dtype=report.layout.reduce_dtype,
            fsdp_wrap=report.layout.fsdp_groups,
            data_replicate=report.layout.data_replicate,
            zero_hpz_partition_size=report.layout.deepspeed.zero_hpz_partition_size,
            mics_shard_size=report.layout.deepspeed.mics_shard_size,
            async_tp=report.layout.async_tp,
        ),
        per_gpu=_per_gpu(report, s),
        activations=_activations(report.activations, s),
        timeline=_timeline(report.timeline, s),
        ranks=[_rank(r, report, s) for r in report.ranks],
        per_stage=[
            _stage(st, peaks, s)
            for st, peaks in zip(report.stages, report.stage_peaks, strict=True)
        ],
        per_host=_per_host(report, s),
        hardware=s.HardwareInfo(
            gpu=report.gpu,
            memory_bytes=report.capacity_bytes,
            fits=report.fits,
            headroom_bytes=report.usable_bytes,
            verdict=report.verdict,
            not_modelled=list(report.not_modelled),
        ),
        notes=list(report.notes),
        rules=s.RulesInfo(
            torch=versions.RULES_TORCH,
            transformers=report.rules_transformers,
            engines=dict(versions.ENGINES),
        ),
    )


def _model(report: Report, s: Any) -> Any:
    m = report.model
    return s.ModelInfo(
        name=m.name,
        model_type=m.model_type,
        num_parameters=m.num_parameters,
        num_parameter_tensors=m.num_parameter_tensors,
        num_buffers=m.num_buffers,
        num_trainable_parameters=m.num_trainable_parameters,
        num_stored_elements=m.num_stored_elements,
    )


def _precision(report: Report, s: Any) -> Any:
    r = report.recipe
    return s.PrecisionInfo(
        name=r.name,
        parameters=r.parameters,
        gradients=r.gradients,
        master_weights=r.master_weights,
        optimizer_states=r.optimizer_states,
        gradient_accumulation=r.gradient_accumulation,
        compute=r.compute,
    )


def _row(term: Term, s: Any) -> Any:
    return s.Row(
        category=term.category,
        name=term.name,
        dtype=term.dtype,
        tensors=term.tensors,
        elements=term.elements,
        bytes=term.bytes,
        formula=term.formula,
        source=term.source,
    )


def _per_gpu(report: Report, s: Any) -> Any:
    gpu, alloc = report.per_gpu, report.allocator
    # Rows that share a name (bitsandbytes' uint8 state1 and its fp32 absmax both named
    # state1) are summed, so the breakdown always adds up to optimizer_states.
    states: dict[str, int] = {}
    for t in gpu.terms:
        if t.category == "optimizer_states":
            states[t.name] = states.get(t.name, 0) + t.bytes
    return s.PerGpu(
        rank=gpu.ranks[0],
        parameters=gpu.bytes_of("parameters"),
        gradients=gpu.bytes_of("gradients"),
        optimizer_states=gpu.bytes_of("optimizer_states"),
        optimizer_state_breakdown=states,
        buffers=report.buffer_bytes,
        activations=report.activations_bytes,
        activations_modelled=report.activations.modelled,
        transient=report.transient_bytes,
        peak=report.peak_bytes,
        peak_reserved=report.peak_reserved,
        fragmentation=None if alloc is None else alloc.fragmentation,
        alloc_retries=None if alloc is None else alloc.alloc_retries,
        reserved_by_phase=[]
        if alloc is None
        else [
            s.ReservedPhase(
                phase=p.phase, peak_allocated=p.peak_allocated, peak_reserved=p.peak_reserved
            )
            for p in alloc.phases
        ],
        reserved_by_stream={} if alloc is None else dict(alloc.reserved_by_stream),
        device_used=report.device_used,
        device_terms=[
            s.DeviceTermRow(name=t.name, bytes=t.bytes, formula=t.formula, source=t.source)
            for t in report.device_terms
        ],
        rows=[_row(t, s) for t in (*gpu.terms, *report.buffers)],
    )


def _saved(t: Saved, s: Any) -> Any:
    return s.SavedTensor(
        name=t.name,
        shape=list(t.shape),
        dtype=t.dtype,
        bytes=t.bytes,
        saved_by=t.saved_by,
        source=t.source,
    )


def _block(b: Block, s: Any) -> Any:
    return s.ActivationBlock(
        name=b.name,
        count=b.count,
        bytes_each=b.bytes_each,
        bytes=b.bytes,
        recompute_bytes=b.recompute_bytes,
        on_host=b.on_host,
        tensors=[_saved(t, s) for t in b.tensors],
    )


def _activations(saved: Activations, s: Any) -> Any:
    return s.ActivationsInfo(
        modelled=saved.modelled,
        bytes=saved.bytes,
        host_bytes=saved.host_bytes,
        logits_bytes=saved.logits_bytes,
        loss_upcast_bytes=saved.upcast_bytes,
        blocks=[_block(b, s) for b in saved.blocks],
        notes=list(saved.notes),
        source=saved.source if saved.modelled else "none",
        profile_versions=dict(saved.versions) if saved.source == "profile" else None,
        implementation=saved.implementation,
        megatron_spec=saved.megatron_spec,
    )


def _phase(p: Point, s: Any) -> Any:
    return s.TimelinePhase(
        phase=p.phase,
        label=p.label,
        total=p.total_bytes,
        parameters=p.of("parameters"),
        gradients=p.of("gradients"),
        optimizer_states=p.of("optimizer_states"),
        buffers=p.of("buffers"),
        activations=p.of("activations"),
        transient=p.of("transient"),
        transients=list(p.transients),
    )


def _transient(t: Transient, s: Any) -> Any:
    return s.TransientRow(
        name=t.name,
        bytes=t.bytes,
        phases=list(t.phases),
        formula=t.formula,
        source=t.source,
        stream=t.stream,
        momentary=t.momentary,
    )


def _timeline(timeline: Timeline, s: Any) -> Any:
    peak = timeline.peak
    return s.TimelineInfo(
        phases=[_phase(p, s) for p in timeline.points],
        peak=s.TimelinePeak(phase=peak.phase, label=peak.label, bytes=peak.total_bytes),
        transients=[_transient(t, s) for t in timeline.transients],
        cuda_context_bytes=timeline.cuda_context_bytes,
        reserved_bytes=timeline.reserved_bytes,
        usable_bytes=timeline.usable_bytes,
    )


def _rank(states: RankStates, report: Report, s: Any) -> Any:
    tp = dict(report.degrees)["tp"]
    tensor_ranks = list(states.tensor_ranks) or list(range(tp))
    return s.RankClass(
        ranks=list(states.ranks),
        tensor_ranks=tensor_ranks,
        parameters=states.bytes_of("parameters"),
        gradients=states.bytes_of("gradients"),
        optimizer_states=states.bytes_of("optimizer_states"),
        total=states.total_bytes,
        activations=report.tensor_view(tensor_ranks[0]).activations_bytes,
    )


def _stage(stage: StageStates, peaks: tuple[int, int] | None, s: Any) -> Any:
    gpu = stage.per_gpu
    return s.StageInfo(
        stage=stage.stage,
        layers=list(stage.layers),
        num_parameters=stage.num_parameters,
        parameters=gpu.bytes_of("parameters"),
        gradients=gpu.bytes_of("gradients"),
        optimizer_states=gpu.bytes_of("optimizer_states"),
        model_states=stage.model_state_bytes,
        activations=None if peaks is None else peaks[0],
        peak=None if peaks is None else peaks[1],
    )


def _per_host(report: Report, s: Any) -> Any:
    per_node, capacity = report.host_bytes_per_node, report.host_capacity_bytes
    return s.PerHost(
        total=per_node,
        per_rank=report.host_bytes,
        gpus_per_node=report.gpus_per_node,
        ranks_per_node=report.ranks_per_node,
        rows=[_row(t, s) for t in report.per_gpu.host_terms],
        nvme=sum(t.bytes for t in report.stages[report.stage].nvme),
        memory_bytes=capacity,
        fits=None if capacity is None else per_node <= capacity,
    )


# --- memplan inventory --json --------------------------------------------------------------------


def inventory_json(inventory: Inventory, dtype: str) -> dict[str, Any]:
    """The `memplan inventory --json` document (schema: memplan.report.schema.InventoryReport);
    `dtype` is the recipe's parameter dtype, for tensors without their own."""

    from memplan.model.sources import counts
    from memplan.report.schema import inventory as schema

    def tensor(t: TensorSpec) -> schema.InventoryTensor:
        return schema.InventoryTensor(
            name=t.name, shape=list(t.shape), dtype=t.dtype or dtype, numel=t.numel
        )

    big = counts.largest_tensor(inventory)
    layer = counts.largest_layer(inventory)
    return schema.InventoryReport(
        name=inventory.name,
        num_parameters=inventory.num_parameters,
        num_parameter_tensors=len(inventory.parameters),
        num_non_embedding_parameters=counts.non_embedding_parameters(inventory),
        num_active_parameters=counts.active_parameters(inventory),
        num_active_non_embedding_parameters=counts.active_parameters(inventory, embeddings=False),
        active_parameters_definition=counts.ACTIVE_DEFINITION,
        largest_tensor=None
        if big is None
        else schema.LargestTensor(name=big.name, shape=list(big.shape), numel=big.numel),
        largest_layer=None
        if layer is None
        else schema.LargestLayer(layer=layer[0], num_parameters=layer[1]),
        tied=[list(pair) for pair in inventory.tied],
        parameters=[tensor(t) for t in inventory.parameters],
        buffers=[
            schema.InventoryBuffer(**tensor(t).model_dump(), persistent=t.persistent)
            for t in inventory.buffers
        ],
        notes=list(inventory.notes),
    ).model_dump(mode="json")
