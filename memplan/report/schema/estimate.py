"""`memplan estimate --json`: the report of one training step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memplan.config.parallelism import Engine
from memplan.report.schema.base import Doc
from memplan.states.terms import Category


class ModelInfo(Doc):
    """The model the spec names."""

    name: str = Field(
        description=(
            "Display name: the config's `_name_or_path`, the preset, the file, or `N parameters`."
        )
    )
    model_type: str | None = Field(
        description="config.json `model_type`; null for a bare parameter count."
    )
    num_parameters: int = Field(
        description=(
            "The model's parameters as `memplan inventory` counts them: elements over distinct "
            "parameter tensors (tied weights counted once), before finetune adds adapters or "
            "packs 4-bit weights."
        )
    )
    num_parameter_tensors: int = Field(description="The model's distinct parameter tensors.")
    num_buffers: int = Field(description="The model's buffer tensors (`register_buffer`).")
    num_trainable_parameters: int = Field(
        description=(
            "Elements of the parameters that train (all of them unless `finetune` freezes some)."
        )
    )
    num_stored_elements: int = Field(
        description=(
            "Parameter elements the job holds: num_parameters plus LoRA adapters, QLoRA's 4-bit "
            "weights counted as their packed uint8 elements (two weights each)."
        )
    )


class PrecisionInfo(Doc):
    """The precision recipe: the dtype each kind of tensor is kept in."""

    name: str = Field(description="Preset name (`bf16-mixed`, ...) or `custom`.")
    parameters: str = Field(description="Dtype of the parameters as the module holds them.")
    gradients: str = Field(description="Dtype of `param.grad`.")
    master_weights: str | None = Field(
        description=(
            "Dtype of the optimizer's weight copy; null when it updates the parameters in place."
        )
    )
    optimizer_states: str = Field(
        description="Dtype of per-element optimizer states (exp_avg, ...)."
    )
    gradient_accumulation: str | None = Field(
        description=(
            "Dtype of a separate gradient-accumulation buffer (Megatron main_grad), or null."
        )
    )
    compute: str = Field(description="Dtype of the forward and backward math.")


class OptimizerInfo(Doc):
    name: str = Field(
        description="Optimizer name as the spec gives it (`adamw`, `sgd`, `adamw8bit`, ...)."
    )


class ParallelismInfo(Doc):
    engine: Engine = Field(description="deepspeed, fsdp2, ddp, megatron or fsdp1.")
    data: int = Field(description="Data-parallel degree.")
    zero_stage: int = Field(description="ZeRO stage with the engine's default filled in (0-3).")
    pipeline: int = Field(description="Pipeline stages (entries of `per_stage`).")
    reduce_dtype: str | None = Field(
        None,
        description=(
            "FSDP2's reduce_dtype as resolved (torchtitan's fp32 filled in); null: the "
            "gradients' dtype."
        ),
    )
    fsdp_wrap: str = Field(
        "layers",
        description="FSDP2's parameter groups as resolved: `layers` or `torchtitan`.",
    )
    data_replicate: int = Field(
        1, description="HSDP's replicate degree (1: FSDP2 over all data ranks)."
    )
    zero_hpz_partition_size: int = Field(
        1,
        description=(
            "DeepSpeed ZeRO++ hpZ: ranks of the secondary parameter partition's group (1: off)."
        ),
    )
    mics_shard_size: int = Field(
        -1,
        description="DeepSpeed MiCS: ranks each shard group spans (-1 or 0: off).",
    )
    async_tp: bool = Field(
        False,
        description=(
            "torch's micro-pipelined TP (parallelism.async_tp): its symmetric-memory workspace "
            "is a `per_gpu.device_terms` entry, `symmetric_memory_workspace`."
        ),
    )


class Row(Doc):
    """One row of one rank's model states, exactly as the formula function built it."""

    category: Category = Field(description="parameters, gradients, optimizer_states or buffers.")
    name: str = Field(
        description=(
            "The row's name: the category, or an optimizer state (`exp_avg`, `master_weights`)."
        )
    )
    dtype: str = Field(
        description="Element dtype, or `mixed` when the row sums tensors of several dtypes."
    )
    tensors: int = Field(description="Tensors (or shards, partitions) the row counts.")
    elements: int = Field(description="Elements the row counts, padding included.")
    bytes: int = Field(description="elements x the dtype's width.")
    formula: str = Field(description="The arithmetic with this rank's values substituted.")
    source: str = Field(
        description=(
            "Where the rule comes from: paper and section, or library file and function at a "
            "version."
        )
    )


class ReservedPhase(Doc):
    """One phase of the replayed step (memplan.step.replay)."""

    phase: str = Field(description="The timeline's phase (timeline.phases[].phase).")
    peak_allocated: int = Field(
        description="Most bytes the allocator handed out in the phase (512-byte blocks)."
    )
    peak_reserved: int = Field(description="Most bytes its segments held in the phase.")


class DeviceTermRow(Doc):
    """One block of GPU memory outside torch's caching allocator."""

    name: str = Field(description="`cuda_context`, `nccl_data_ring`, ...")
    bytes: int = Field(description="Bytes on this GPU.")
    formula: str = Field(description="How the bytes were worked out.")
    source: str = Field(description="Where the figure comes from (measured, NCCL source, ...).")


class PerGpu(Doc):
    """The most-loaded GPU (rank `rank` of the most-loaded pipeline stage)."""

    rank: int = Field(description="The first data-parallel rank of the most-loaded class.")
    parameters: int = Field(description="Parameter bytes on this GPU.")
    gradients: int = Field(description="Gradient bytes on this GPU.")
    optimizer_states: int = Field(
        description="Optimizer-state bytes on this GPU (master weights included)."
    )
    optimizer_state_breakdown: dict[str, int] = Field(
        description="Bytes of each optimizer state by name; they sum to `optimizer_states`."
    )
    buffers: int = Field(description="Buffer bytes (replicated on every rank).")
    activations: int = Field(
        description=(
            "Bytes autograd saves for backward at the end of the forward pass (0 when not "
            "modelled)."
        )
    )
    activations_modelled: bool = Field(
        description="False when memplan has no activation rules for this model or layout."
    )
    transient: int = Field(description="Temporary buffers alive at the peak (see `timeline`).")
    peak: int = Field(description="Most bytes alive at any phase of the step on this GPU.")
    peak_reserved: int | None = Field(
        description=(
            "torch.cuda.max_memory_reserved(): the step's allocations and frees (init and two "
            "steps) replayed through torch 2.13's caching allocator under hardware.alloc_conf "
            "(memplan.step.replay); null on CPU."
        )
    )
    fragmentation: int | None = Field(
        description=(
            "peak_reserved minus the most bytes allocated while reserved stood at its peak: "
            "cached memory no tensor used at the tightest moment; null on CPU."
        )
    )
    alloc_retries: int | None = Field(
        description=(
            "Allocations the replay could fit only after freeing the allocator's cached "
            "segments (torch.cuda.memory_stats()['num_alloc_retries']; each a cudaFree and a "
            "synchronize); null on CPU."
        )
    )
    reserved_by_phase: list[ReservedPhase] = Field(
        description="The replayed second step, phase by phase (empty on CPU)."
    )
    reserved_by_stream: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Each CUDA stream's own highest reserved bytes in the replay: 'compute' (the "
            "default stream) and the engine's side streams (FSDP2: fsdp2_all_gather_copy_in, "
            "fsdp2_reduce_scatter), whose freed blocks only that stream reuses; empty on CPU."
        ),
    )
    device_used: int | None = Field(
        description=(
            "What nvidia-smi shows for the process at the peak: peak_reserved + the terms "
            "outside the allocator (device_terms); null on CPU. The verdict is judged on it."
        )
    )
    device_terms: list[DeviceTermRow] = Field(
        description=(
            "GPU memory outside the caching allocator: the CUDA context and NCCL's "
            "communicator buffers (memplan.step.device); empty on CPU."
        )
    )
    rows: list[Row] = Field(
        description=(
            "Model-state and buffer rows; their bytes sum to parameters + gradients + "
            "optimizer_states + buffers."
        )
    )


class SavedTensor(Doc):
    """One storage autograd keeps for backward."""

    name: str = Field(description="What it is, relative to its block (`self_attn.softmax`).")
    shape: list[int] = Field(description="Shape in elements.")
    dtype: str = Field(description="Element dtype.")
    bytes: int = Field(description="numel x the dtype's width.")
    saved_by: str = Field(
        description="The autograd node that saves it (the first, when several share the storage)."
    )
    source: str = Field(description="The kernel or modeling file the rule is read from.")


class ActivationBlock(Doc):
    """Saved tensors of one part of the model (embeddings, decoder layers, head, loss)."""

    name: str = Field(description="`embeddings`, `layers`, `head`, `loss`, ...")
    count: int = Field(
        description="How many times the block repeats (decoder layers); 1 otherwise."
    )
    bytes_each: int = Field(description="Bytes one copy holds at the end of the forward pass.")
    bytes: int = Field(description="count x bytes_each.")
    recompute_bytes: int = Field(
        description="With checkpointing: bytes one copy re-creates while its backward runs."
    )
    on_host: bool = Field(description="Offloaded to pinned host memory (not counted on the GPU).")
    tensors: list[SavedTensor] = Field(description="What one copy of the block saves.")


class ActivationsInfo(Doc):
    """The activations of one forward pass on the most-loaded GPU."""

    modelled: bool = Field(
        description=(
            "False when memplan has no rules for this family or layout: every number is then 0."
        )
    )
    bytes: int = Field(
        description="Bytes saved for backward on the GPU at the end of the forward pass."
    )
    host_bytes: int = Field(description="Saved bytes offloaded to host memory.")
    logits_bytes: int = Field(
        description="The logits tensor [batch, seq, vocab] in the matmul dtype."
    )
    loss_upcast_bytes: int = Field(description="The fp32 copy of the logits the loss makes.")
    blocks: list[ActivationBlock] = Field(description="Saved tensors by block.")
    notes: list[str] = Field(description="What the activation rules assumed or could not model.")
    source: Literal["rule", "profile", "none"] = Field(
        description=(
            "Where the saved tensors come from: a family's hand rule, a traced profile "
            "(`memplan profile`), or none (not modelled)."
        )
    )
    profile_versions: dict[str, str] | None = Field(
        description="torch and transformers the profile was traced with; null unless a profile."
    )
    implementation: Literal["transformers", "torchtitan", "litgpt", "megatron-core"] = Field(
        description=(
            "Whose model code the saved tensors are of (model.implementation): transformers' "
            "modeling files, torchtitan's own model code, LitGPT's (litgpt.model.GPT) or "
            "Megatron-Core's GPTModel."
        )
    )
    megatron_spec: Literal["local", "te"] | None = Field(
        default=None,
        description=(
            "Megatron-Core's layer spec (model.megatron_spec: local or te) when implementation "
            "is megatron-core; null otherwise."
        ),
    )


class TimelinePhase(Doc):
    """Bytes alive at one phase of the step, by category."""

    phase: str = Field(
        description=(
            "start, forward, loss, backward_start, backward, backward_end or optimizer_step."
        )
    )
    label: str = Field(description="The phase in words.")
    total: int = Field(description="Sum of the categories below.")
    parameters: int = Field(description="Parameter bytes alive.")
    gradients: int = Field(description="Gradient bytes alive.")
    optimizer_states: int = Field(description="Optimizer-state bytes alive.")
    buffers: int = Field(description="Buffer bytes alive.")
    activations: int = Field(description="Saved-activation bytes alive.")
    transient: int = Field(description="Transient-buffer bytes alive.")
    transients: list[str] = Field(description="Names of the transient buffers alive at this phase.")


class TimelinePeak(Doc):
    phase: str = Field(description="The phase with the most bytes alive (the earliest on a tie).")
    label: str = Field(description="That phase in words.")
    bytes: int = Field(description="Bytes alive at the peak phase (= per_gpu.peak).")


class TransientRow(Doc):
    """A temporary buffer of the step."""

    name: str = Field(description="What the buffer is.")
    bytes: int = Field(description="Its size.")
    phases: list[str] = Field(description="The phases it is alive at.")
    formula: str = Field(description="The arithmetic with this run's values substituted.")
    source: str = Field(description="Where the rule comes from.")
    stream: str = Field(
        default="compute",
        description=(
            "The CUDA stream it is allocated on ('compute': the default stream; FSDP2's "
            "fsdp2_all_gather_copy_in and fsdp2_reduce_scatter)."
        ),
    )
    momentary: str | None = Field(
        default=None,
        description=(
            "For a buffer alive only for a moment as this phase begins (below the phase's "
            "peak, so `phases` is empty): the phase; the allocator replay makes it there."
        ),
    )


class TimelineInfo(Doc):
    """One training step as bytes alive per phase on the most-loaded GPU."""

    phases: list[TimelinePhase] = Field(description="Every phase of the step, in order.")
    peak: TimelinePeak = Field(description="The phase with the most bytes alive.")
    transients: list[TransientRow] = Field(description="Every temporary buffer of the step.")
    cuda_context_bytes: int = Field(description="CUDA context outside the allocator (0 on CPU).")
    reserved_bytes: int | None = Field(
        description="What torch.cuda.memory_reserved() likely shows at the peak (null on CPU)."
    )
    usable_bytes: int | None = Field(
        description=(
            "GPU memory left after the CUDA context and the reserved segments (null without a "
            "capacity)."
        )
    )


class RankClass(Doc):
    """Data-parallel ranks that hold the same bytes."""

    ranks: list[int] = Field(description="The data-parallel ranks of the class.")
    tensor_ranks: list[int] = Field(
        description=(
            "The tensor-parallel ranks that hold these bytes: every TP rank, unless torch's "
            "DTensor (engine fsdp2 or ddp) splits a vocabulary TP does not divide, leaving the "
            "last TP ranks fewer rows (torch.chunk): then each class of TP ranks has its own "
            "entries, TP rank 0's first."
        )
    )
    parameters: int = Field(description="Parameter bytes on each of them.")
    gradients: int = Field(description="Gradient bytes on each of them.")
    optimizer_states: int = Field(description="Optimizer-state bytes on each of them.")
    total: int = Field(description="parameters + gradients + optimizer_states.")
    activations: int = Field(
        description=(
            "Bytes these ranks save for backward (per_gpu.activations, but over their own "
            "vocabulary rows for the LM head's logits and loss)."
        )
    )


class StageInfo(Doc):
    """One pipeline stage's most-loaded rank."""

    stage: int = Field(description="Pipeline stage index.")
    layers: list[int] = Field(description="Decoder layers the stage holds.")
    num_parameters: int = Field(
        description="Parameter elements the stage holds (after tensor/expert slicing)."
    )
    parameters: int = Field(description="Parameter bytes on the stage's most-loaded rank.")
    gradients: int = Field(description="Gradient bytes on that rank.")
    optimizer_states: int = Field(description="Optimizer-state bytes on that rank.")
    model_states: int = Field(
        description="Model-state bytes of the stage's most-loaded rank, buffers included."
    )
    activations: int | None = Field(
        description=(
            "Bytes that rank saves for backward at its peak, micro-batches in flight included."
        )
    )
    peak: int | None = Field(
        description=(
            "That rank's peak (its timeline's highest phase); the report's most-loaded stage is "
            "the one with the highest."
        )
    )


class PerHost(Doc):
    """Host (CPU) memory."""

    total: int = Field(
        description=(
            "One node: the most-loaded rank's host bytes x the ranks on a node, "
            "min(gpus_per_node, world size)."
        )
    )
    per_rank: int = Field(description="The most-loaded GPU's rank.")
    gpus_per_node: int = Field(description="hardware.gpus_per_node.")
    ranks_per_node: int = Field(
        description="Ranks on one node, what total multiplies: min(gpus_per_node, world size)."
    )
    rows: list[Row] = Field(
        description="What that rank keeps in host memory (optimizer scalars, offloaded states)."
    )
    nvme: int = Field(description="Bytes offloaded to NVMe by that rank.")
    memory_bytes: int | None = Field(description="hardware.host_memory, or null.")
    fits: bool | None = Field(
        description="total <= memory_bytes; null without hardware.host_memory."
    )


class HardwareInfo(Doc):
    gpu: str | None = Field(description="The catalog GPU, or null.")
    memory_bytes: int | None = Field(
        description=(
            "GPU memory (hardware.memory, else the catalog's); null when neither is given."
        )
    )
    fits: bool | None = Field(
        description=(
            'true when verdict is "fits", false when it is "does_not_fit" or '
            '"model_states_do_not_fit"; null without a capacity, and null when verdict is '
            '"model_states_fit_activations_unknown" (a peak without activations is partial: no '
            "yes)."
        )
    )
    headroom_bytes: int | None = Field(
        description=(
            "The memory left at the peak, as the report prints it: memory_bytes - "
            "per_gpu.device_used (the replayed reserved bytes plus the CUDA context and NCCL "
            "buffers; negative when it does not fit); null without a capacity. Before issue 20 "
            "it was memory_bytes - CUDA context - a packing bound of reserved "
            "(timeline.usable_bytes, still given there)."
        )
    )
    verdict: (
        Literal[
            "fits",
            "does_not_fit",
            "model_states_fit_activations_unknown",
            "model_states_do_not_fit",
        ]
        | None
    ) = Field(
        description=(
            "The one verdict the table, this document and `plan` share "
            "(memplan.report.result.verdict): from headroom_bytes and whether activations are "
            "modelled; null without a capacity."
        )
    )
    not_modelled: list[str] = Field(
        default_factory=list,
        description=(
            "Memory terms the notes say the figure leaves out and that would add to it "
            "(memplan.report.notes.NOT_MODELLED: torchao's fp8 casts where not counted, the "
            "CUDA memory-efficient kernel's padded sliding-window mask, DeepSpeed Ulysses' "
            'all-to-all buffers); empty when none. A "fits" beside any of them is on a '
            "partial figure: the table says so after the verdict."
        ),
    )


class RulesInfo(Doc):
    """The library versions memplan's rules describe (memplan/versions.py)."""

    torch: str = Field(
        description="torch (major.minor) the activation, SDPA-kernel and FSDP2 rules describe."
    )
    transformers: str = Field(
        description=(
            "transformers (major.minor) whose activation rules were used: the spec's "
            "model.transformers_version, else the installed release, else the newest rules'."
        )
    )
    engines: dict[str, str] = Field(
        description="Engine library -> the version the engine (sharding) rules were read from."
    )


class EstimateReport(Doc):
    """`memplan estimate SPEC --json`: memory of one training step."""

    model: ModelInfo = Field(description="The model the spec names.")
    precision: PrecisionInfo = Field(description="The precision recipe.")
    optimizer: OptimizerInfo = Field(description="The optimizer.")
    parallelism: ParallelismInfo = Field(description="The layout.")
    per_gpu: PerGpu = Field(description="The most-loaded GPU.")
    activations: ActivationsInfo = Field(description="Saved activations, tensor by tensor.")
    timeline: TimelineInfo = Field(description="Bytes alive per phase of the step.")
    ranks: list[RankClass] = Field(
        description=(
            "Every class of identical data-parallel ranks of the most-loaded stage, in rank order."
        )
    )
    per_stage: list[StageInfo] = Field(description="One entry per pipeline stage.")
    per_host: PerHost = Field(description="Host (CPU) memory.")
    hardware: HardwareInfo = Field(description="The GPU and whether the step fits it.")
    notes: list[str] = Field(
        description="What the estimate assumed or left out, one sentence each."
    )
    rules: RulesInfo = Field(description="The library versions the rules describe.")
