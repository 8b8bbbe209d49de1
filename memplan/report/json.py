"""The `memplan estimate --json` document, built from a Report (schema: memplan.report.schema,
docs/json.md). Kept apart from the calculator so estimate.py holds the arithmetic only;
`memplan.report.estimate.to_json` stays the public name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan import activations as acts
from memplan import versions
from memplan.states.engines import RankStates, Term
from memplan.states.stages import StageStates
from memplan.step import timeline as tl

if TYPE_CHECKING:
    from memplan.report.estimate import Report


def _term_json(term: Term) -> dict[str, Any]:
    return {
        "category": term.category,
        "name": term.name,
        "dtype": term.dtype,
        "tensors": term.tensors,
        "elements": term.elements,
        "bytes": term.bytes,
        "formula": term.formula,
        "source": term.source,
    }


def _rank_json(states: RankStates, report: Report) -> dict[str, Any]:
    tp = dict(report.degrees)["tp"]
    tensor_ranks = list(states.tensor_ranks) or list(range(tp))
    return {
        "ranks": list(states.ranks),
        "tensor_ranks": tensor_ranks,
        "parameters": states.bytes_of("parameters"),
        "gradients": states.bytes_of("gradients"),
        "optimizer_states": states.bytes_of("optimizer_states"),
        "total": states.total_bytes,
        "activations": report.tensor_view(tensor_ranks[0]).activations_bytes,
    }


def _stage_json(stage: StageStates, peaks: tuple[int, int] | None) -> dict[str, Any]:
    gpu = stage.per_gpu
    return {
        "stage": stage.stage,
        "layers": list(stage.layers),
        "num_parameters": stage.num_parameters,
        "parameters": gpu.bytes_of("parameters"),
        "gradients": gpu.bytes_of("gradients"),
        "optimizer_states": gpu.bytes_of("optimizer_states"),
        "model_states": stage.model_state_bytes,
        "activations": None if peaks is None else peaks[0],
        "peak": None if peaks is None else peaks[1],
    }


def to_json(report: Report) -> dict[str, Any]:
    """The `--json` document (schema: docs/json.md). Keys are a public contract."""
    gpu = report.per_gpu
    # Rows that share a name (bitsandbytes' uint8 state1 and its fp32 absmax both named
    # state1) are summed, so the breakdown always adds up to optimizer_states.
    states: dict[str, int] = {}
    for t in gpu.terms:
        if t.category == "optimizer_states":
            states[t.name] = states.get(t.name, 0) + t.bytes
    return {
        "model": {
            "name": report.model.name,
            "model_type": report.model.model_type,
            "num_parameters": report.model.num_parameters,
            "num_parameter_tensors": report.model.num_parameter_tensors,
            "num_buffers": report.model.num_buffers,
            "num_trainable_parameters": report.model.num_trainable_parameters,
            "num_stored_elements": report.model.num_stored_elements,
        },
        "precision": {
            "name": report.recipe.name,
            "parameters": report.recipe.parameters,
            "gradients": report.recipe.gradients,
            "master_weights": report.recipe.master_weights,
            "optimizer_states": report.recipe.optimizer_states,
            "gradient_accumulation": report.recipe.gradient_accumulation,
            "compute": report.recipe.compute,
        },
        "optimizer": {"name": report.optimizer.name},
        "parallelism": {
            "engine": report.placement.engine,
            "data": report.placement.data,
            "zero_stage": report.placement.stage,
            "pipeline": len(report.stages),
        },
        "per_gpu": {
            "rank": gpu.ranks[0],
            "parameters": gpu.bytes_of("parameters"),
            "gradients": gpu.bytes_of("gradients"),
            "optimizer_states": gpu.bytes_of("optimizer_states"),
            "optimizer_state_breakdown": states,
            "buffers": report.buffer_bytes,
            "activations": report.activations_bytes,
            "activations_modelled": report.activations.modelled,
            "transient": report.transient_bytes,
            "peak": report.peak_bytes,
            "rows": [_term_json(t) for t in (*gpu.terms, *report.buffers)],
        },
        "activations": acts.to_json(report.activations),
        "timeline": tl.to_json(report.timeline),
        "ranks": [_rank_json(r, report) for r in report.ranks],
        "per_stage": [
            _stage_json(st, peaks)
            for st, peaks in zip(report.stages, report.stage_peaks, strict=True)
        ],
        "per_host": {
            "total": report.host_bytes_per_node,
            "per_rank": report.host_bytes,
            "gpus_per_node": report.gpus_per_node,
            "ranks_per_node": report.ranks_per_node,
            "rows": [_term_json(t) for t in gpu.host_terms],
            "nvme": sum(t.bytes for t in report.stages[report.stage].nvme),
            "memory_bytes": report.host_capacity_bytes,
            "fits": None
            if report.host_capacity_bytes is None
            else report.host_bytes_per_node <= report.host_capacity_bytes,
        },
        "hardware": {
            "gpu": report.gpu,
            "memory_bytes": report.capacity_bytes,
            "fits": report.fits,
            "headroom_bytes": report.usable_bytes,
            "verdict": report.verdict,
        },
        "notes": list(report.notes),
        "rules": versions.rules_json(report.rules_transformers),
    }
