"""How a spec, its model and its estimate feed the step-time model (memplan.plan.steptime): the
model's shape, the GPU's links and one rank's work."""

from __future__ import annotations

from memplan.config.plan import PlanSpec
from memplan.config.spec import Spec
from memplan.hardware import CATALOG
from memplan.model.inventory import Inventory
from memplan.plan.steptime import (
    COMPILE_SPEEDUP_CODE,
    FLOAT8_SPEEDUP_RECIPES,
    Link,
    Shape,
    StepTime,
    Work,
    step_time,
)
from memplan.precision import dtype_bytes
from memplan.report.result import Report
from memplan.report.worked import Peak
from memplan.states.engines.megatron import main_grad_dtype


def shape_of(inventory: Inventory, spec: Spec, global_batch: int) -> Shape:
    arch = inventory.architecture
    assert arch is not None  # checked by plan()
    experts = sum(t.numel for t in inventory.parameters if t.role == "experts")
    active = inventory.num_parameters - experts
    if arch.num_experts:
        active += experts * arch.num_experts_per_token // arch.num_experts
    moe_layers = len({t.layer for t in inventory.parameters if t.role == "experts"})
    return Shape(
        parameters=active,
        total_parameters=inventory.num_parameters,
        layers=arch.num_layers,
        moe_layers=moe_layers,
        hidden=arch.hidden_size,
        attention_width=arch.num_attention_heads * arch.head_dim,
        kv_width=arch.num_key_value_heads * arch.head_dim,
        top_k=arch.num_experts_per_token,
        sequence=spec.training.sequence_length,
        global_batch=global_batch,
        intermediate=arch.intermediate_size,
    )


def link_of(spec: Spec, plan: PlanSpec) -> Link:
    gpu = CATALOG[spec.hardware.gpu] if spec.hardware.gpu else CATALOG["H100-80GB"]
    return Link(
        peak_flops=gpu.bf16_flops,
        gpus_per_node=spec.hardware.gpus_per_node,
        mfu=plan.mfu,
        intra_bytes_per_s=plan.intra_node_bandwidth or gpu.intra_node_bytes_per_s,
        inter_bytes_per_s=plan.inter_node_bandwidth or gpu.inter_node_bytes_per_s,
    )


def work_of(
    spec: Spec, report: Report | Peak, mbs: int, recompute: str, compiled: bool | None = None
) -> Work:
    """What one rank of `report`'s layout computes and communicates per step (`report`: an
    estimate, or what plan's search reads of one; `compiled`: training.compile of the row,
    default the spec's)."""
    recipe = spec.recipe()
    per_rank = max(s.num_parameters for s in report.stages)
    engine = report.layout.engine
    grad_dtype = main_grad_dtype(recipe) if engine == "megatron" else recipe.gradients
    compiled = (
        spec.training.compile if compiled is None else compiled
    ) and spec.model.implementation in COMPILE_SPEEDUP_CODE
    return Work(
        micro_batch=mbs,
        recompute=recompute,
        grad_bytes=per_rank * dtype_bytes(grad_dtype),
        param_bytes=per_rank * dtype_bytes(recipe.parameters),
        compiled=compiled,
        float8=compiled and spec.precision.fp8 in FLOAT8_SPEEDUP_RECIPES,
    )


def spec_step_time(spec: Spec, inventory: Inventory, report: Report) -> StepTime:
    """The step-time model (memplan.plan.steptime) of `spec` as `memplan estimate` reads it
    (`report`: its estimate): the global batch is micro-batch x accumulation x data ranks."""
    t = spec.training
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * report.layout.data
    work = work_of(spec, report, t.micro_batch_size, t.activation_checkpointing)
    return step_time(
        shape_of(inventory, spec, global_batch),
        report.layout,
        work,
        link_of(spec, spec.plan or PlanSpec()),
    )
