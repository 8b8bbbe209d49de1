"""The `--json` documents of `estimate`, `plan` and `verify`, as typed models: their one
definition.

The producers build these models and dump them: `memplan.report.json.estimate_json` and
`memplan.report.json.plan_json` (from a Report and a PlanResult) and
`memplan.verify.result.to_json`, so a document's keys, their order and their types are the
fields below. `memplan schema NAME` prints the JSON Schema of each (draft 2020-12),
`scripts/gen_docs.py` writes the same schemas to docs/schema/ and the field tables to
docs/json.md, and tests/test_schema.py validates real outputs against them. Building a model
validates it (strict: no coercion, unknown keys refused). All sizes are integer bytes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from memplan.config.spec import Engine
from memplan.states.terms import Category

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Doc(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True
    )


# --- memplan estimate --json -------------------------------------------------------------------


class ModelInfo(_Doc):
    """The model the spec names."""

    name: str
    """Display name: the config's `_name_or_path`, the preset, the file, or `N parameters`."""
    model_type: str | None
    """config.json `model_type`; null for a bare parameter count."""
    num_parameters: int
    """The model's parameters as `memplan inventory` counts them: elements over distinct
    parameter tensors (tied weights counted once), before finetune adds adapters or packs
    4-bit weights."""
    num_parameter_tensors: int
    """The model's distinct parameter tensors."""
    num_buffers: int
    """The model's buffer tensors (`register_buffer`)."""
    num_trainable_parameters: int
    """Elements of the parameters that train (all of them unless `finetune` freezes some)."""
    num_stored_elements: int
    """Parameter elements the job holds: num_parameters plus LoRA adapters, QLoRA's 4-bit
    weights counted as their packed uint8 elements (two weights each)."""


class PrecisionInfo(_Doc):
    """The precision recipe: the dtype each kind of tensor is kept in."""

    name: str
    """Preset name (`bf16-mixed`, ...) or `custom`."""
    parameters: str
    """Dtype of the parameters as the module holds them."""
    gradients: str
    """Dtype of `param.grad`."""
    master_weights: str | None
    """Dtype of the optimizer's weight copy; null when it updates the parameters in place."""
    optimizer_states: str
    """Dtype of per-element optimizer states (exp_avg, ...)."""
    gradient_accumulation: str | None
    """Dtype of a separate gradient-accumulation buffer (Megatron main_grad), or null."""
    compute: str
    """Dtype of the forward and backward math."""


class OptimizerInfo(_Doc):
    name: str
    """Optimizer name as the spec gives it (`adamw`, `sgd`, `adamw8bit`, ...)."""


class ParallelismInfo(_Doc):
    engine: Engine
    """deepspeed, fsdp2, ddp or megatron."""
    data: int
    """Data-parallel degree."""
    zero_stage: int
    """ZeRO stage with the engine's default filled in (0-3)."""
    pipeline: int
    """Pipeline stages (entries of `per_stage`)."""


class Row(_Doc):
    """One row of one rank's model states, exactly as the formula function built it."""

    category: Category
    """parameters, gradients, optimizer_states or buffers."""
    name: str
    """The row's name: the category, or an optimizer state (`exp_avg`, `master_weights`)."""
    dtype: str
    """Element dtype, or `mixed` when the row sums tensors of several dtypes."""
    tensors: int
    """Tensors (or shards, partitions) the row counts."""
    elements: int
    """Elements the row counts, padding included."""
    bytes: int
    """elements x the dtype's width."""
    formula: str
    """The arithmetic with this rank's values substituted."""
    source: str
    """Where the rule comes from: paper and section, or library file and function at a version."""


class PerGpu(_Doc):
    """The most-loaded GPU (rank `rank` of the most-loaded pipeline stage)."""

    rank: int
    """The first data-parallel rank of the most-loaded class."""
    parameters: int
    """Parameter bytes on this GPU."""
    gradients: int
    """Gradient bytes on this GPU."""
    optimizer_states: int
    """Optimizer-state bytes on this GPU (master weights included)."""
    optimizer_state_breakdown: dict[str, int]
    """Bytes of each optimizer state by name; they sum to `optimizer_states`."""
    buffers: int
    """Buffer bytes (replicated on every rank)."""
    activations: int
    """Bytes autograd saves for backward at the end of the forward pass (0 when not modelled)."""
    activations_modelled: bool
    """False when memplan has no activation rules for this model or layout."""
    transient: int
    """Temporary buffers alive at the peak (see `timeline`)."""
    peak: int
    """Most bytes alive at any phase of the step on this GPU."""
    rows: list[Row]
    """Model-state and buffer rows; their bytes sum to parameters + gradients +
    optimizer_states + buffers."""


class SavedTensor(_Doc):
    """One storage autograd keeps for backward."""

    name: str
    """What it is, relative to its block (`self_attn.softmax`)."""
    shape: list[int]
    """Shape in elements."""
    dtype: str
    """Element dtype."""
    bytes: int
    """numel x the dtype's width."""
    saved_by: str
    """The autograd node that saves it (the first, when several share the storage)."""
    source: str
    """The kernel or modeling file the rule is read from."""


class ActivationBlock(_Doc):
    """Saved tensors of one part of the model (embeddings, decoder layers, head, loss)."""

    name: str
    """`embeddings`, `layers`, `head`, `loss`, ..."""
    count: int
    """How many times the block repeats (decoder layers); 1 otherwise."""
    bytes_each: int
    """Bytes one copy holds at the end of the forward pass."""
    bytes: int
    """count x bytes_each."""
    recompute_bytes: int
    """With checkpointing: bytes one copy re-creates while its backward runs."""
    on_host: bool
    """Offloaded to pinned host memory (not counted on the GPU)."""
    tensors: list[SavedTensor]
    """What one copy of the block saves."""


class ActivationsInfo(_Doc):
    """The activations of one forward pass on the most-loaded GPU."""

    modelled: bool
    """False when memplan has no rules for this family or layout: every number is then 0."""
    bytes: int
    """Bytes saved for backward on the GPU at the end of the forward pass."""
    host_bytes: int
    """Saved bytes offloaded to host memory."""
    logits_bytes: int
    """The logits tensor [batch, seq, vocab] in the matmul dtype."""
    loss_upcast_bytes: int
    """The fp32 copy of the logits the loss makes."""
    blocks: list[ActivationBlock]
    """Saved tensors by block."""
    notes: list[str]
    """What the activation rules assumed or could not model."""


class TimelinePhase(_Doc):
    """Bytes alive at one phase of the step, by category."""

    phase: str
    """start, forward, loss, backward_start, backward, backward_end or optimizer_step."""
    label: str
    """The phase in words."""
    total: int
    """Sum of the categories below."""
    parameters: int
    """Parameter bytes alive."""
    gradients: int
    """Gradient bytes alive."""
    optimizer_states: int
    """Optimizer-state bytes alive."""
    buffers: int
    """Buffer bytes alive."""
    activations: int
    """Saved-activation bytes alive."""
    transient: int
    """Transient-buffer bytes alive."""
    transients: list[str]
    """Names of the transient buffers alive at this phase."""


class TimelinePeak(_Doc):
    phase: str
    """The phase with the most bytes alive (the earliest on a tie)."""
    label: str
    """That phase in words."""
    bytes: int
    """Bytes alive at the peak phase (= per_gpu.peak)."""


class TransientRow(_Doc):
    """A temporary buffer of the step."""

    name: str
    """What the buffer is."""
    bytes: int
    """Its size."""
    phases: list[str]
    """The phases it is alive at."""
    formula: str
    """The arithmetic with this run's values substituted."""
    source: str
    """Where the rule comes from."""


class TimelineInfo(_Doc):
    """One training step as bytes alive per phase on the most-loaded GPU."""

    phases: list[TimelinePhase]
    """Every phase of the step, in order."""
    peak: TimelinePeak
    """The phase with the most bytes alive."""
    transients: list[TransientRow]
    """Every temporary buffer of the step."""
    cuda_context_bytes: int
    """CUDA context outside the allocator (0 on CPU)."""
    reserved_bytes: int | None
    """What torch.cuda.memory_reserved() likely shows at the peak (null on CPU)."""
    usable_bytes: int | None
    """GPU memory left after the CUDA context and the reserved segments (null without a
    capacity)."""


class RankClass(_Doc):
    """Data-parallel ranks that hold the same bytes."""

    ranks: list[int]
    """The data-parallel ranks of the class."""
    tensor_ranks: list[int]
    """The tensor-parallel ranks that hold these bytes: every TP rank, unless torch's DTensor
    (engine fsdp2 or ddp) splits a vocabulary TP does not divide, leaving the last TP ranks
    fewer rows (torch.chunk): then each class of TP ranks has its own entries, TP rank 0's
    first."""
    parameters: int
    """Parameter bytes on each of them."""
    gradients: int
    """Gradient bytes on each of them."""
    optimizer_states: int
    """Optimizer-state bytes on each of them."""
    total: int
    """parameters + gradients + optimizer_states."""
    activations: int
    """Bytes these ranks save for backward (per_gpu.activations, but over their own
    vocabulary rows for the LM head's logits and loss)."""


class StageInfo(_Doc):
    """One pipeline stage's most-loaded rank."""

    stage: int
    """Pipeline stage index."""
    layers: list[int]
    """Decoder layers the stage holds."""
    num_parameters: int
    """Parameter elements the stage holds (after tensor/expert slicing)."""
    parameters: int
    """Parameter bytes on the stage's most-loaded rank."""
    gradients: int
    """Gradient bytes on that rank."""
    optimizer_states: int
    """Optimizer-state bytes on that rank."""
    model_states: int
    """Model-state bytes of the stage's most-loaded rank, buffers included."""
    activations: int | None
    """Bytes that rank saves for backward at its peak, micro-batches in flight included."""
    peak: int | None
    """That rank's peak (its timeline's highest phase); the report's most-loaded stage is the
    one with the highest."""


class PerHost(_Doc):
    """Host (CPU) memory."""

    total: int
    """One node: the most-loaded rank's host bytes x the ranks on a node,
    min(gpus_per_node, world size)."""
    per_rank: int
    """The most-loaded GPU's rank."""
    gpus_per_node: int
    """hardware.gpus_per_node."""
    ranks_per_node: int
    """Ranks on one node, what total multiplies: min(gpus_per_node, world size)."""
    rows: list[Row]
    """What that rank keeps in host memory (optimizer scalars, offloaded states)."""
    nvme: int
    """Bytes offloaded to NVMe by that rank."""
    memory_bytes: int | None
    """hardware.host_memory, or null."""
    fits: bool | None
    """total <= memory_bytes; null without hardware.host_memory."""


class HardwareInfo(_Doc):
    gpu: str | None
    """The catalog GPU, or null."""
    memory_bytes: int | None
    """GPU memory (hardware.memory, else the catalog's); null when neither is given."""
    fits: bool | None
    """true when verdict is "fits", false when it is "does_not_fit" or
    "model_states_do_not_fit"; null without a capacity, and null when verdict is
    "model_states_fit_activations_unknown" (a peak without activations is partial: no yes)."""
    headroom_bytes: int | None
    """The usable memory left, as the report prints it: memory_bytes - CUDA context - what the
    allocator likely reserves at the peak (timeline.usable_bytes; negative when it does not
    fit); null without a capacity."""
    verdict: (
        Literal[
            "fits",
            "does_not_fit",
            "model_states_fit_activations_unknown",
            "model_states_do_not_fit",
        ]
        | None
    )
    """The one verdict the table, this document and `plan` share (memplan.report.estimate.verdict):
    from headroom_bytes and whether activations are modelled; null without a capacity."""


class RulesInfo(_Doc):
    """The library versions memplan's rules describe (memplan/versions.py)."""

    torch: str
    """torch (major.minor) the activation, SDPA-kernel and FSDP2 rules describe."""
    transformers: str
    """transformers (major.minor) whose activation rules were used: the spec's
    model.transformers_version, else the installed release, else the newest rules'."""
    engines: dict[str, str]
    """Engine library -> the version the engine (sharding) rules were read from."""


class EstimateReport(_Doc):
    """`memplan estimate SPEC --json`: memory of one training step."""

    model: ModelInfo
    """The model the spec names."""
    precision: PrecisionInfo
    """The precision recipe."""
    optimizer: OptimizerInfo
    """The optimizer."""
    parallelism: ParallelismInfo
    """The layout."""
    per_gpu: PerGpu
    """The most-loaded GPU."""
    activations: ActivationsInfo
    """Saved activations, tensor by tensor."""
    timeline: TimelineInfo
    """Bytes alive per phase of the step."""
    ranks: list[RankClass]
    """Every class of identical data-parallel ranks of the most-loaded stage, in rank order."""
    per_stage: list[StageInfo]
    """One entry per pipeline stage."""
    per_host: PerHost
    """Host (CPU) memory."""
    hardware: HardwareInfo
    """The GPU and whether the step fits it."""
    notes: list[str]
    """What the estimate assumed or left out, one sentence each."""
    rules: RulesInfo
    """The library versions the rules describe."""


# --- memplan plan --json ---------------------------------------------------------------------


class StepTimeBreakdown(_Doc):
    """Seconds per part of the estimated step (memplan.plan.steptime: a ranking model)."""

    compute: float
    """Matmul time at the assumed MFU."""
    bubble: float
    """Pipeline bubble."""
    tensor: float
    """Tensor-parallel collectives left exposed."""
    pipeline: float
    """Pipeline send/receive."""
    data: float
    """Data-parallel gradient reduction and ZeRO gathers left exposed."""
    expert: float
    """Expert-parallel all-to-all."""
    context: float
    """Context-parallel exchanges."""
    offload: float
    """Host-device copies of offloaded states."""


class LayoutPeak(_Doc):
    peak: int
    """The layout's predicted peak bytes on its most-loaded GPU."""


class PlanLayout(_Doc):
    """One layout that fits."""

    data: int
    """Data-parallel degree."""
    tensor: int
    """Tensor-parallel degree."""
    pipeline: int
    """Pipeline-parallel degree."""
    context: int
    """Context-parallel degree."""
    expert: int
    """Expert-parallel degree."""
    engine: Engine
    """deepspeed, fsdp2, ddp or megatron."""
    zero_stage: int
    """ZeRO stage (0-3)."""
    micro_batch_size: int
    """Sequences per GPU per forward pass."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    recompute: str
    """none, selective or full."""
    offload: str
    """none or cpu (optimizer offload)."""
    layers_per_stage: list[int] | None
    """An uneven pipeline split (one entry per model chunk), or null for an even one."""
    virtual_stages: int
    """Model chunks per pipeline rank: > 1 is Megatron's interleaved 1F1B schedule."""
    per_gpu: LayoutPeak
    """Memory of the layout's most-loaded GPU."""
    headroom_bytes: int
    """The usable memory left, as `estimate` computes it (hardware.headroom_bytes) minus
    plan.reserve: budget_bytes - what the allocator likely reserves at the peak."""
    step_time_s: float
    """Estimated seconds per optimizer step."""
    tokens_per_s: float
    """Tokens per second of the whole job at that step time."""
    step_time_breakdown_s: StepTimeBreakdown
    """The step time by part."""


class PlanReport(_Doc):
    """`memplan plan SPEC --json`: the layouts that fit, fastest first."""

    gpus: int
    """GPUs planned for."""
    global_batch_size: int
    """Sequences per optimizer step."""
    budget_bytes: int
    """GPU memory a layout may use: capacity minus the CUDA context (outside the allocator)
    minus plan.reserve; a layout fits when the allocator's likely reserve at its peak is within
    it (the same verdict as `estimate`)."""
    capacity_bytes: int
    """Memory of one GPU."""
    notes: list[str]
    """What the plan assumed, one sentence each (e.g. whose speed ranks the layouts)."""
    layouts: list[PlanLayout]
    """The fastest `plan.top` layouts."""
    num_fitting: int
    """All layouts that fit (layouts lists the first plan.top)."""
    searched: int
    """Layouts evaluated."""
    pruned: dict[str, int]
    """Layouts skipped, by reason."""
    message: str
    """When nothing fits: what would; else empty."""


# --- memplan verify --json -------------------------------------------------------------------


class VerifySetup(_Doc):
    """What ran."""

    model: str
    """Display name of the model."""
    model_type: str | None
    """config.json `model_type`."""
    num_parameters: int
    """Parameter elements of the full model."""
    device: Literal["cpu", "cuda"]
    """cpu or cuda."""
    fake: bool
    """FakeTensorMode: no real memory."""
    engine: Engine
    """ddp or fsdp2 (the engines torch runs itself)."""
    zero_stage: int
    """ZeRO stage (0-3)."""
    ranks: int
    """Processes run (torch.distributed world size, or 1)."""
    distributed: bool
    """Ranks on torch.distributed."""
    precision: str
    """Precision recipe name."""
    optimizer: str
    """Optimizer name."""
    optimizer_implementation: str
    """torch.optim kernel: foreach, fused or for_loop."""
    layers: int
    """Decoder layers built."""
    full_layers: int
    """Decoder layers of the spec's model."""
    micro_batch_size: int
    """Sequences per forward pass."""
    sequence_length: int
    """Tokens per sequence."""
    attention: str
    """The attention implementation transformers ran (`config._attn_implementation`): eager
    when training.attention is eager; for sdpa, transformers' default (sdpa, or eager for a
    class without sdpa support)."""
    activation_checkpointing: Literal["none", "selective", "full"]
    """training.activation_checkpointing as built: full (transformers'
    activation_checkpointing_enable, non-reentrant) or selective (each attention core under
    torch.utils.checkpoint)."""
    activation_offload: bool
    """training.activation_offload: the checkpointed layer inputs in pinned host memory."""
    dropout: bool | None
    """training.dropout: true/false forced on the config's dropout probabilities; null: the
    config's own."""
    use_cache: bool
    """transformers' key/value cache during the step (always false: a training step keeps
    none)."""
    steps: int
    """Training steps run; the last one is measured."""
    torch: str
    """torch version."""
    transformers: str
    """transformers version."""


class VerifyRow(_Doc):
    """One category on one rank."""

    predicted: int | None
    """memplan's bytes; null when the calculator does not model the category."""
    measured: int | None
    """Bytes measured on real (or fake) tensors; null when the run cannot measure it."""
    delta: int | None
    """measured - predicted."""
    ratio: float | None
    """measured / predicted (null when either is null or predicted is 0)."""
    tolerance: float
    """Allowed |delta| / predicted: 0.0 for model states, 0.01 activations, 0.03 peak."""
    checked: bool
    """Both sides are known, so the row is held to its tolerance."""
    ok: bool | None
    """Within tolerance; null when the row is not checked."""


class AllocatorPhase(_Doc):
    """CUDA allocator counters at the end of one phase of the measured step."""

    name: str
    """The phase of the step (forward, backward, optimizer step, ...)."""
    allocated: int
    """torch.cuda.memory_allocated() at the end of the phase."""
    max_allocated: int
    """torch.cuda.max_memory_allocated() during the phase."""
    reserved: int
    """torch.cuda.memory_reserved() at the end of the phase."""


class FullDepthRow(_Doc):
    predicted: int | None
    """The prediction at the model's full depth."""
    extrapolated: int | None
    """The K-layer measurement extrapolated with the measured per-layer bytes."""


class VerifyReport(_Doc):
    """`memplan verify SPEC --json`: predicted against measured bytes."""

    ok: bool
    """Every checked row on every rank is within its tolerance (exit code 0, else 3)."""
    setup: VerifySetup
    """What ran."""
    rank: int
    """The rank `categories` describes: the one memplan predicts to be the most loaded."""
    categories: dict[str, VerifyRow]
    """Category (parameters, gradients, optimizer_states, each state by name, buffers,
    activations, peak) -> row, for `rank`."""
    ranks: list[dict[str, VerifyRow]] | None = None
    """Present with several ranks: ranks[i] is rank i's categories."""
    phases: list[AllocatorPhase] | None = None
    """Present on CUDA: allocator counters per phase."""
    full_depth: dict[str, FullDepthRow] | None = None
    """Present with --layers K: category -> full-depth prediction and extrapolation."""
    failures: list[str]
    """One sentence per row out of tolerance."""
    notes: list[str]
    """What the run could not check, or how it measured."""
    warnings: list[str] = []
    """Installed torch or transformers whose major.minor differs from the versions the rules
    describe (also printed on stderr)."""


DOCUMENTS: dict[str, type[_Doc]] = {
    "estimate": EstimateReport,
    "plan": PlanReport,
    "verify": VerifyReport,
}
"""Command -> the model of its `--json` document."""


def json_schema(command: str) -> dict[str, Any]:
    """The JSON Schema of `memplan COMMAND --json` (draft 2020-12)."""
    model = DOCUMENTS[command]
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        **model.model_json_schema(),
    }
