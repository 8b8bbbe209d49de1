"""`memplan plan --json`: the layouts that fit, fastest first."""

from __future__ import annotations

from pydantic import Field

from memplan.config.parallelism import Engine
from memplan.report.schema.base import Doc


class StepTimeBreakdown(Doc):
    """Seconds per part of the estimated step (memplan.plan.steptime: a ranking model)."""

    compute: float = Field(description="Matmul time at the assumed MFU.")
    bubble: float = Field(description="Pipeline bubble.")
    tensor: float = Field(description="Tensor-parallel collectives left exposed.")
    pipeline: float = Field(description="Pipeline send/receive.")
    data: float = Field(
        description="Data-parallel gradient reduction and ZeRO gathers left exposed."
    )
    expert: float = Field(description="Expert-parallel all-to-all.")
    context: float = Field(description="Context-parallel exchanges.")
    offload: float = Field(description="Host-device copies of offloaded states.")


class LayoutPeak(Doc):
    peak: int = Field(description="The layout's predicted peak bytes on its most-loaded GPU.")


class PlanLayout(Doc):
    """One layout that fits."""

    data: int = Field(description="Data-parallel degree.")
    tensor: int = Field(description="Tensor-parallel degree.")
    pipeline: int = Field(description="Pipeline-parallel degree.")
    context: int = Field(description="Context-parallel degree.")
    expert: int = Field(description="Expert-parallel degree.")
    engine: Engine = Field(description="deepspeed, fsdp2, ddp, megatron or fsdp1.")
    zero_stage: int = Field(description="ZeRO stage (0-3).")
    micro_batch_size: int = Field(description="Sequences per GPU per forward pass.")
    gradient_accumulation_steps: int = Field(description="Micro-batches per optimizer step.")
    recompute: str = Field(
        description="none, selective, selective-op (torchtitan's per-op policy) or full."
    )
    offload: str = Field(description="none or cpu (optimizer offload).")
    layers_per_stage: list[int] | None = Field(
        description=(
            "An uneven pipeline split (one entry per model chunk), or null for an even one."
        )
    )
    virtual_stages: int = Field(
        description=(
            "Model chunks per pipeline rank: > 1 is an interleaved 1F1B schedule (Megatron's "
            "or torch's), 2 also torch's zbv."
        )
    )
    sequence_parallel: bool = Field(
        default=False,
        description="Sequence parallelism with TP (the row spec's parallelism.sequence_parallel).",
    )
    schedule: str = Field(
        default="1f1b",
        description=(
            "The pipeline schedule (parallelism.schedule): 1f1b, interleaved, or zbv "
            "(torch's ScheduleZBVZeroBubble, engines ddp and fsdp2)."
        ),
    )
    implementation: str = Field(
        default="transformers",
        description="Whose model code the activations are (model.implementation).",
    )
    fsdp_wrap: str | None = Field(
        default=None,
        description="FSDP2's fully_shard groups (parallelism.fsdp_wrap); null: not FSDP2.",
    )
    pipeline_return_outputs: bool | None = Field(
        default=None,
        description=(
            "torch.distributed.pipelining's step(return_outputs=...) of the row "
            "(parallelism.pipeline_return_outputs): false unless the spec sets it; null: not a "
            "torch-pipelined row (engines ddp and fsdp2 with pipeline > 1)."
        ),
    )
    compile: bool = Field(
        default=False, description="training.compile of the row's spec (torch.compile)."
    )
    per_gpu: LayoutPeak = Field(description="Memory of the layout's most-loaded GPU.")
    headroom_bytes: int = Field(
        description=(
            "The usable memory left, as `estimate`'s timeline computes it "
            "(timeline.usable_bytes: a packing bound of reserved, not the allocator replay "
            "behind estimate's hardware.headroom_bytes, which plan leaves out of its search) "
            "minus plan.reserve: budget_bytes - what the allocator likely reserves at the peak."
        )
    )
    not_modelled: list[str] = Field(
        default_factory=list,
        description=(
            "Memory terms the row's figure leaves out and that would add to it, as estimate's "
            "hardware.not_modelled for the row's spec: its fit is before them. Filled for the "
            "rows plan shows (replayed as estimate would); empty for the others."
        ),
    )
    step_time_s: float = Field(description="Estimated seconds per optimizer step.")
    tokens_per_s: float = Field(description="Tokens per second of the whole job at that step time.")
    step_time_breakdown_s: StepTimeBreakdown = Field(description="The step time by part.")


class PlanReport(Doc):
    """`memplan plan SPEC --json`: the layouts that fit, fastest first."""

    gpus: int = Field(description="GPUs planned for.")
    global_batch_size: int = Field(description="Sequences per optimizer step.")
    budget_bytes: int = Field(
        description=(
            "GPU memory a layout may use: capacity minus the CUDA context (outside the allocator) "
            "minus plan.reserve; a layout fits when the allocator's likely reserve at its peak is "
            "within it (the same verdict as `estimate`)."
        )
    )
    capacity_bytes: int = Field(description="Memory of one GPU.")
    notes: list[str] = Field(
        description=(
            "What the plan assumed, one sentence each (e.g. whose speed ranks the layouts)."
        )
    )
    layouts: list[PlanLayout] = Field(description="The fastest `plan.top` layouts.")
    num_fitting: int = Field(description="All layouts that fit (layouts lists the first plan.top).")
    searched: int = Field(description="Layouts evaluated.")
    pruned: dict[str, int] = Field(description="Layouts skipped, by reason.")
    message: str = Field(description="When nothing fits: what would; else empty.")
