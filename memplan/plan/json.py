"""The `memplan plan --json` document, built as the memplan.report.schema models (one
definition of its keys, order and types; memplan.report.json does the same for estimate)."""

from __future__ import annotations

from typing import Any, cast

from memplan.config.parallelism import Engine
from memplan.plan.result import Candidate, PlanResult
from memplan.report.json import dump
from memplan.report.schema import plan as s


def plan_json(result: PlanResult) -> dict[str, Any]:
    """The `memplan plan --json` document (schema: memplan.report.schema.PlanReport)."""
    return dump(plan_document(result))


def plan_document(result: PlanResult) -> s.PlanReport:
    """`result` as the PlanReport model: its first `top` layouts."""
    return s.PlanReport(
        gpus=result.gpus,
        global_batch_size=result.global_batch_size,
        budget_bytes=result.budget_bytes,
        capacity_bytes=result.capacity_bytes,
        notes=list(result.notes),
        layouts=[_layout(c) for c in result.layouts[: result.top]],
        num_fitting=len(result.layouts),
        searched=result.searched,
        pruned=dict(result.pruned),
        message=result.suggestion,
    )


def _layout(c: Candidate) -> s.PlanLayout:
    time = c.time
    return s.PlanLayout(
        data=c.data,
        tensor=c.tensor,
        pipeline=c.pipeline,
        context=c.context,
        expert=c.expert,
        engine=cast(Engine, c.engine),  # validated: strict Literal
        zero_stage=c.zero_stage,
        micro_batch_size=c.micro_batch_size,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        recompute=c.recompute,
        offload=c.offload,
        layers_per_stage=list(c.layers_per_stage) if c.layers_per_stage else None,
        virtual_stages=c.virtual_stages,
        sequence_parallel=c.sequence_parallel,
        schedule=c.schedule,
        implementation=c.implementation,
        fsdp_wrap=c.fsdp_wrap,
        pipeline_return_outputs=c.parallelism.pipeline_return_outputs,
        compile=c.compile,
        per_gpu=s.LayoutPeak(peak=c.peak_bytes),
        headroom_bytes=c.headroom_bytes,
        not_modelled=list(c.not_modelled),
        step_time_s=time.total_s,
        tokens_per_s=c.tokens_per_s,
        step_time_breakdown_s=s.StepTimeBreakdown(
            compute=time.compute_s,
            bubble=time.bubble_s,
            tensor=time.tensor_s,
            pipeline=time.pipeline_s,
            data=time.data_s,
            expert=time.expert_s,
            context=time.context_s,
            offload=time.offload_s,
        ),
    )
