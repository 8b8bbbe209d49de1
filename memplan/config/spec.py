"""The user's spec: pydantic v2 models, frozen, unknown keys refused.

Every field has a documented default, so the smallest useful spec names a model, and the rest
follows. Loading from YAML (with line numbers for errors) lives in `memplan.config.load`.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from memplan import versions
from memplan.hardware import ALIASES, CATALOG, nearest
from memplan.optimizers import NOT_FUSED_OPTIMIZERS, OptimizerConfig, OptimizerName
from memplan.precision import PRESETS, DType, Recipe

# Upper bounds on what a spec may say. Counts and sizes fit torch's int64 (shapes, numel,
# bytes), which also keeps every product of them far inside a float for the tables. Parallel
# degrees stay within what the calculator can list rank by rank in well under a second.
MAX_COUNT = 2**63 - 1
"""Largest count or size in bytes a spec may give (int64)."""
MAX_DEGREE = 2**16
"""Largest degree of one kind of parallelism, and of GPUs per node: 65,536."""

PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Degree = Annotated[int, Field(gt=0, le=MAX_DEGREE)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class ModelSpec(Frozen):
    """Which model: exactly one of the sources below."""

    hf_config: Path | None = None
    """Path to a Hugging Face config.json (relative to the spec file)."""
    preset: str | None = None
    """Name of a config shipped under configs/ (e.g. `llama-3-8b`)."""
    architecture: dict[str, Any] | None = None
    """config.json fields written inline (must include `model_type`)."""
    num_parameters: PositiveInt | None = None
    """A plain parameter count: model states only, no activations. `7000000000`, `7e9`
    (which YAML reads as text) or `7B` (K, M, B, T)."""
    safetensors: Path | None = None
    """A `.safetensors` file, its `model.safetensors.index.json`, or their directory (relative
    to the spec file): tensor names, shapes and dtypes from the headers, never the weights; a
    config.json beside it adds the architecture."""
    hf_id: str | None = None
    """A Hugging Face repo id (`org/name`): its config.json from the local Hugging Face cache,
    offline (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    transformers_version: str | None = None
    """The transformers release the model runs under (`"5.24"`), where memplan's activation
    rules differ between releases (Falcon). Default: the installed transformers, else the
    release the rules describe (memplan.versions.RULES_TRANSFORMERS)."""

    @field_validator("transformers_version", mode="before")
    @classmethod
    def _transformers_version(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, float | int) and not isinstance(value, bool):
            # YAML reads 5.30 as the number 5.3: only a string keeps the minor version.
            raise ValueError('write the version as a string, e.g. "5.24" (quoted)')
        if not isinstance(value, str):
            return value  # pydantic says what is wrong with it
        try:
            version = versions.major_minor(value)
        except ValueError as err:
            raise ValueError(str(err)) from None
        if versions.parse(version) < versions.parse(versions.OLDEST_TRANSFORMERS):
            raise ValueError(
                f"memplan's activation rules describe transformers "
                f"{versions.OLDEST_TRANSFORMERS} to {versions.RULES_TRANSFORMERS}; leave "
                "transformers_version out for the installed release or the newest rules"
            )
        return version

    @field_validator("hf_config", "safetensors")
    @classmethod
    def _no_nul(cls, value: Path | None) -> Path | None:
        if value is not None and "\0" in str(value):
            raise ValueError("a path cannot contain a NUL character")
        return value

    @field_validator("num_parameters", mode="before")
    @classmethod
    def _count(cls, value: Any) -> Any:
        """`7e9` and `7B` as numbers: YAML 1.1 reads `7e9` (no dot) as a string."""
        if not isinstance(value, str):
            return value
        m = _COUNT.match(value)
        if m is None:
            return value  # pydantic says what is wrong with it
        number = Decimal(m.group(1)) * _COUNT_UNITS[(m.group(2) or "").upper()]
        if number != number.to_integral_value():
            raise ValueError(f"{value!r} is not a whole number of parameters")
        return int(number)

    @field_validator("hf_id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        # huggingface_hub/utils/_validators.py::validate_repo_id: `[org/]name` of word
        # characters, `-` and `.`, no `--` or `..`, at most 96 characters.
        if value is not None and (
            not _REPO_ID.match(value) or "--" in value or ".." in value or len(value) > 96
        ):
            raise ValueError(
                f"{value!r} is not a Hugging Face repo id; write it as org/name, "
                "e.g. mistralai/Mixtral-8x7B-v0.1"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        given = [k for k in MODEL_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(
                f"give exactly one of {', '.join(MODEL_SOURCES[:-1])} or {MODEL_SOURCES[-1]} "
                f"(got {what})"
            )
        return self


MODEL_SOURCES = ("hf_config", "preset", "architecture", "safetensors", "hf_id", "num_parameters")
"""The keys of `model:`, one of which names the model."""
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([kKmMbBtT])?\s*$")
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


class PrecisionTable(Frozen):
    """An explicit precision recipe, or a preset with some dtypes overridden."""

    preset: str | None = None
    """Start from this preset (fp32, bf16, amp-bf16, bf16-mixed, ...); fields below override it."""
    parameters: DType | None = None
    gradients: DType | None = None
    master_weights: DType | Literal["none"] | None = None
    optimizer_states: DType | None = None
    gradient_accumulation: DType | Literal["none"] | None = None
    """A separate fp32 gradient-accumulation buffer (Megatron main_grad): `fp32`."""
    compute: DType | None = None
    fp8: Literal["none", "delayed", "current"] = "none"
    """fp8 GEMMs with NVIDIA Transformer Engine in the decoder layers: `delayed` scaling (TE's
    default recipe, an amax history per quantizer) or `current` scaling (memplan.states.fp8)."""
    fp8_amax_history: PositiveInt = 1024
    """DelayedScaling.amax_history_len."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(
                f"unknown precision preset {value!r}; choose one of {', '.join(PRESETS)}"
            )
        return value

    def recipe(self) -> Recipe:
        return _recipe(self)

    def _build(self) -> Recipe:
        base = PRESETS[self.preset or "fp32"]
        params = self.parameters or base.parameters

        def none_if(value: str | None, default: str | None) -> str | None:
            if value is None:
                return default
            return None if value == "none" else value

        return Recipe(
            name=self.preset
            if self.preset
            and self.model_copy(update={"fp8": "none", "fp8_amax_history": 1024})
            == PrecisionTable(preset=self.preset)
            else "custom",
            parameters=params,
            gradients=self.gradients or base.gradients,
            master_weights=none_if(self.master_weights, base.master_weights),
            optimizer_states=self.optimizer_states or base.optimizer_states,
            gradient_accumulation=none_if(self.gradient_accumulation, base.gradient_accumulation),
            compute=self.compute or base.compute,
            autocast=base.autocast,
            description=base.description if self.preset else "custom recipe",
        )


@lru_cache(maxsize=64)
def _recipe(table: PrecisionTable) -> Recipe:
    """The recipe of a (frozen, hashable) precision table, built once: plan asks for it for
    every layout."""
    return table._build()


class OptimizerSpec(Frozen):
    """The optimizer, by torch.optim name (plus lion and bitsandbytes 8-bit Adam)."""

    name: OptimizerName = "adamw"
    momentum: float = Field(0.0, ge=0)
    """SGD/RMSprop momentum (torch default 0: no momentum buffer)."""
    amsgrad: bool = False
    """Adam/AdamW: keep max_exp_avg_sq."""
    centered: bool = False
    """RMSprop: keep grad_avg."""
    implementation: Literal["foreach", "fused", "for_loop"] = "foreach"
    """torch.optim kernel: foreach (the CUDA default), fused, or for_loop (the CPU default)."""

    @model_validator(mode="after")
    def _fused_exists(self) -> OptimizerSpec:
        if self.implementation == "fused" and self.name in NOT_FUSED_OPTIMIZERS:
            raise ValueError(
                f"torch.optim has no fused {self.name} (2.13: fused=True is accepted by adam, "
                "adamw, sgd and adagrad only; the others raise TypeError): set "
                "implementation: foreach or for_loop"
            )
        return self

    def config(self) -> OptimizerConfig:
        return OptimizerConfig(
            name=self.name,
            momentum=self.momentum,
            amsgrad=self.amsgrad,
            centered=self.centered,
            fused=self.implementation == "fused",
        )


class TrainingSpec(Frozen):
    """The shape of one training step."""

    micro_batch_size: PositiveInt = 1
    """Sequences per GPU per forward pass."""
    sequence_length: PositiveInt = 2048
    """Tokens per sequence."""
    gradient_accumulation_steps: PositiveInt = 1
    """Micro-batches per optimizer step (changes time, not the per-step peak)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """transformers `attn_implementation`: sdpa (its default; flash/memory-efficient kernels
    keep no S x S scores) or eager (keeps the softmax of every head)."""
    dropout: bool | None = None
    """Dropout in training: null follows the config's probabilities; true/false forces it."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute in backward: none; selective (the attention core, Megatron's
    --recompute-activations); full (each decoder layer keeps only its input)."""
    activation_offload: bool = False
    """Checkpointed layer inputs in pinned host memory (transformers
    `activation_checkpointing_enable(offload=True)`); needs activation_checkpointing: full."""
    zero_grad: Literal["set_to_none", "zero"] = "set_to_none"
    """How the trainer clears gradients after the optimizer step: set_to_none (torch's
    default since 2.0) frees them; zero (`zero_grad(set_to_none=False)`, torch before 2.0 and
    some trainers) keeps them allocated through the next forward and backward."""

    @model_validator(mode="after")
    def _offload_needs_full(self) -> TrainingSpec:
        if self.activation_offload and self.activation_checkpointing != "full":
            raise ValueError(
                "activation_offload moves the inputs that full checkpointing keeps: set "
                "activation_checkpointing: full (or activation_offload: false)"
            )
        return self


Engine = Literal["deepspeed", "fsdp2", "ddp", "megatron"]


class DeepSpeedSpec(Frozen):
    """DeepSpeed `zero_optimization` keys that change memory (DeepSpeed's own names and
    defaults: deepspeed/runtime/zero/config.py::DeepSpeedZeroConfig, 0.19.6; checked against
    0.19.8 in tests/data/deepspeed_zero_defaults.json)."""

    sub_group_size: PositiveInt = 10**9
    """Elements per fp32 optimizer sub-group (ZeRO-3)."""
    stage3_param_persistence_threshold: int = Field(10**5, ge=0)
    """ZeRO-3 keeps parameters with numel <= this gathered on every rank."""
    reduce_bucket_size: PositiveInt = 500_000_000
    """Elements in the gradient reduction (IPG) bucket, allocated in the gradient dtype
    (stage_1_and_2.py / stage3.py `torch.empty(reduce_bucket_size)`)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with backward. None: DeepSpeed's default, which depends on
    the stage (config.py::DeepSpeedZeroConfig.overlap_comm_valid: True for stage 3, else
    False); stage 1/2 then keep two reduction buckets instead of one."""
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0)
    """ZeRO-3 elements gathered ahead of the module that needs them."""
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0)
    """ZeRO-3 cap on gathered (full) parameter elements resident per rank."""


class OffloadSpec(Frozen):
    """What lives in host (or NVMe) memory instead of on the GPU (ZeRO-Offload/Infinity,
    FSDP CPUOffload)."""

    optimizer: Literal["none", "cpu", "nvme"] = "none"
    """fp32 master weights, optimizer states and fp32 gradient partitions."""
    parameters: Literal["none", "cpu", "nvme"] = "none"
    """Sharded parameters (ZeRO-3 / FSDP2 only)."""
    pin_memory: bool = True
    """Host buffers are page-locked (DeepSpeed `pin_memory`, FSDP2 CPUOffloadPolicy default)."""


class ParallelismSpec(Frozen):
    """How the job is spread over GPUs. Degrees left out are 1; world size is
    data x tensor x pipeline x context (expert ranks are carved out of data)."""

    engine: Engine = "ddp"
    """ddp (torch DistributedDataParallel; ZeroRedundancyOptimizer at zero_stage 1), fsdp2
    (torch fully_shard), deepspeed (ZeRO) or megatron (Megatron-LM DDP; zero_stage 1 = its
    distributed optimizer). Default: torch's own engines, which `memplan verify` runs as is:
    ddp (what torchrun, the HF Trainer and accelerate run with no FSDP or DeepSpeed config;
    plain single-GPU training at data 1), or fsdp2 when zero_stage is 2 or 3."""
    data: Degree = 1
    """Data-parallel degree (ranks that hold a replica or a shard of the model states)."""
    zero_stage: int | None = Field(None, ge=0, le=3)
    """ZeRO stage 0-3; default: 0 for deepspeed, ddp and megatron, 3 for fsdp2."""
    tensor: Degree = 1
    """Tensor-parallel degree (Megatron column/row-parallel linears, vocab-parallel embedding)."""
    sequence_parallel: bool = False
    """Split the activations TP leaves replicated (norms, dropout) over the TP ranks."""
    pipeline: Degree = 1
    """Pipeline-parallel degree."""
    schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    """Pipeline schedule: how many micro-batches each stage keeps in flight."""
    virtual_stages: Degree = 1
    """Model chunks per pipeline rank (the interleaved schedule)."""
    layers_per_stage: tuple[PositiveInt, ...] | None = None
    """An explicit split of the layers over the (virtual) stages; else an even split."""
    expert: Degree = 1
    """Expert-parallel degree (MoE): each rank holds num_experts / expert of each MoE layer."""
    context: Degree = 1
    """Context-parallel degree (ring attention / Megatron CP): the sequence is split."""
    expert_capacity_factor: float | None = Field(None, gt=0, le=1024)
    """MoE expert capacity factor (Megatron --moe-expert-capacity-factor with
    --moe-pad-expert-input-to-capacity): each expert's token buffer is padded to
    ceil(tokens x top_k / experts x factor). None: dropless, balanced routing assumed."""
    make_vocab_size_divisible_by: PositiveInt = 128
    """Megatron pads the vocabulary to a multiple of this x tensor (its default, 128); torch's
    own tensor parallelism (engine fsdp2 or ddp) does not pad
    (memplan.states.layout.Layout.vocab_multiple)."""
    gradient_as_bucket_view: bool = False
    """torch DDP `gradient_as_bucket_view` (default False): True makes each `.grad` a view into
    DDP's flat allreduce buckets, saving one gradient-sized copy (torch/nn/parallel/
    distributed.py::DistributedDataParallel docstring, 2.13). Used with engine ddp."""
    offload: OffloadSpec = OffloadSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """DeepSpeed config keys (used when engine is deepspeed)."""

    @model_validator(mode="before")
    @classmethod
    def _default_engine(cls, data: Any) -> Any:
        """No engine named: torch's, ddp for ZeRO stage 0/1 and fsdp2 for 2/3."""
        if isinstance(data, dict) and data.get("engine") is None:
            stage = data.get("zero_stage")
            sharded = str(stage).strip() in ("2", "3")  # YAML may give the stage as text
            data = {**data, "engine": "fsdp2" if sharded else "ddp"}
        return data

    @model_validator(mode="after")
    def _stage_fits_engine(self) -> ParallelismSpec:
        if self.engine == "fsdp2" and self.zero_stage in (0, 1):
            raise ValueError(
                "fsdp2 shards parameters, so it runs ZeRO stage 3 (reshard_after_forward=True) "
                "or 2 (reshard_after_forward=False); for stage 0 or 1 use engine: ddp"
            )
        if self.engine == "ddp" and self.zero_stage in (2, 3):
            raise ValueError(
                "torch DDP offers ZeRO stage 0 (plain DDP) or 1 (ZeroRedundancyOptimizer); "
                "for stage 2 or 3 use engine: deepspeed or fsdp2"
            )
        if self.engine == "megatron" and self.zero_stage not in (None, 0, 1):
            raise ValueError(
                "Megatron-LM shards optimizer states only (zero_stage 1: "
                "--use-distributed-optimizer); for stage 2 or 3 use engine: deepspeed or fsdp2"
            )
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ValueError("the interleaved schedule needs virtual_stages >= 2")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ValueError("virtual_stages > 1 needs schedule: interleaved")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "sequence_parallel splits activations over tensor ranks: set tensor > 1"
            )
        if self.engine == "fsdp2" and "nvme" in (self.offload.optimizer, self.offload.parameters):
            # torch/distributed/fsdp/_fully_shard/_fsdp_api.py (2.13): FSDP2's only offload
            # policy is CPUOffloadPolicy; there is no NVMe tier (DeepSpeed ZeRO-Infinity has one).
            raise ValueError("FSDP2 offloads to CPU only (CPUOffloadPolicy): use cpu, not nvme")
        if self.offload.parameters != "none" and self.stage != 3:
            raise ValueError("parameter offload needs sharded parameters: zero_stage 3")
        if self.offload.optimizer != "none" and self.engine == "deepspeed" and self.stage == 0:
            # DeepSpeed config docs, zero_optimization.offload_optimizer: "Valid only with
            # stage 1, 2 and 3" (the offload lives in the ZeRO optimizers).
            raise ValueError("DeepSpeed offloads the optimizer with zero_stage 1, 2 or 3, not 0")
        return self

    @property
    def world_size(self) -> int:
        """GPUs in the job: data x tensor x pipeline x context."""
        return self.data * self.tensor * self.pipeline * self.context

    @property
    def stage(self) -> int:
        """The ZeRO stage with the engine's default filled in."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 3 if self.engine == "fsdp2" else 0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_UNIT = {
    None: 1,
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}


def parse_bytes(value: int | str) -> int:
    """`80GiB`, `80 GB`, `85899345920` -> bytes. Units: B, KiB..TiB (binary), KB..TB (decimal)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '80GiB'")
    if isinstance(value, int):
        out = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 80GiB, 40 GB or 85899345920")
        # Decimal, not float: exact, and a thousand-digit number does not become inf.
        out = int(Decimal(match.group(1)) * _UNIT[match.group(2)])
    if out <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    if out > MAX_COUNT:
        raise ValueError(f"a size must be at most {MAX_COUNT:,} bytes (8 EiB)")
    return out


class HardwareSpec(Frozen):
    """The accelerator (optional): a catalog name or an explicit memory size."""

    gpu: str | None = None
    """A name from `memplan.hardware.CATALOG` (A100-80GB, H100-80GB, ...)."""
    memory: int | None = None
    """GPU memory in bytes; accepts strings such as `80GiB` (binary) or `80GB` (decimal)."""
    gpus_per_node: Degree = 8
    """GPUs per host: host memory is summed over the ranks of one node."""
    host_memory: int | None = None
    """CPU memory per node in bytes (accepts `2TiB`, `512GB`): checked when offloading."""
    cuda_context: int | None = None
    """Bytes the CUDA context takes outside the allocator (default: memplan.activations'
    assumed figure; measure yours with nvidia-smi minus torch.cuda.memory_reserved())."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where the step runs (kernels save different activations on CPU and CUDA)."""
    alloc_conf: str = ""
    """PYTORCH_CUDA_ALLOC_CONF the job runs with (e.g. `expandable_segments:True`; empty:
    torch's defaults): the caching allocator's replay (memplan.step.allocator) follows it.
    Checked by memplan.step.alloc_conf.AllocConf.parse when the estimate runs."""
    cuda_version: Literal[11, 12, 13] = 12
    """CUDA major version of the torch build: picks the measured CUDA context
    (memplan.step.device.cuda_context)."""
    cuda_lazy_loading: bool = True
    """CUDA_MODULE_LOADING=LAZY (the default since CUDA 11.7); false: eager loading adds every
    kernel image to the CUDA context."""
    nccl_nvls: bool = True
    """NCCL_NVLS_ENABLE: NVLink SHARP buffers on NVSwitch systems (Hopper and later) with
    more than 2 GPUs of a communicator in the node; false drops them."""

    @field_validator("memory", "host_memory", "cuda_context", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        value = ALIASES.get(value, value) if value is not None else None
        if value is not None and value not in CATALOG:
            raise ValueError(
                f"unknown gpu {value!r}{nearest(value, CATALOG)}; known: {', '.join(CATALOG)}; "
                "or give hardware.memory: 48GB (the memory nvidia-smi reports)"
            )
        return value


class PlanSpec(Frozen):
    """`memplan plan`: the cluster, the batch, and the constraints of the layout search."""

    gpus: Degree | None = None
    """GPUs in the job (default: nodes x hardware.gpus_per_node)."""
    nodes: Degree | None = None
    global_batch_size: PositiveInt | None = None
    """Sequences per optimizer step."""
    global_batch_tokens: PositiveInt | None = None
    """Tokens per optimizer step (alternative to global_batch_size)."""
    tensor: PositiveInt | None = None
    """Fix the tensor-parallel degree."""
    max_tensor: PositiveInt | None = None
    """Largest tensor degree searched (default: GPUs per node, so TP stays inside a node)."""
    max_pipeline: PositiveInt | None = None
    max_context: PositiveInt = 8
    max_virtual_stages: PositiveInt = 4
    """Largest number of model chunks per pipeline rank searched (Megatron's interleaved 1F1B
    schedule, tried in powers of two); 1 searches plain 1F1B only."""
    engines: tuple[Engine, ...] = ("deepspeed", "fsdp2", "megatron", "ddp")
    """Engines the search may use."""
    micro_batch_sizes: tuple[PositiveInt, ...] = (1, 2, 4, 8, 16)
    allow_recompute: bool = True
    allow_offload: bool = False
    reserve: int = 0
    """Bytes to leave free on every GPU (accepts `4GiB`)."""
    top: PositiveInt = 10
    """Layouts shown."""
    mfu: float = Field(0.40, gt=0, le=1)
    """Assumed model-FLOPs utilisation for the step-time estimate."""
    intra_node_bandwidth: int | None = None
    """Bytes/s per GPU inside a node, one direction (default: the GPU catalog's)."""
    inter_node_bandwidth: int | None = None
    """Bytes/s per GPU between nodes, one direction (default: the GPU catalog's)."""

    @field_validator("reserve", "intra_node_bandwidth", "inter_node_bandwidth", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        if value is None or value == 0:
            return value  # type: ignore[no-any-return]
        return parse_bytes(value)

    @model_validator(mode="after")
    def _one_batch(self) -> PlanSpec:
        if self.global_batch_size and self.global_batch_tokens:
            raise ValueError("give global_batch_size or global_batch_tokens, not both")
        return self


FinetuneMethod = Literal["full", "lora", "qlora"]
_ADAPTER_KEYS = (
    "rank",
    "alpha",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "dropout",
    "bias",
    "autocast_adapter_dtype",
)
_QLORA_KEYS = ("quant_type", "double_quant", "skip_modules", "prepare_kbit")


class FinetuneSpec(Frozen):
    """What is trained: every parameter (`full`), LoRA adapters on a frozen model (`lora`,
    peft's LoraConfig), or LoRA on a 4-bit quantized model (`qlora`: transformers'
    BitsAndBytesConfig + peft). Names and defaults are peft's and transformers' own
    (peft 0.21 tuners/lora/config.py::LoraConfig; transformers 5.24
    utils/quantization_config.py::BitsAndBytesConfig), except where noted."""

    method: FinetuneMethod = "full"
    """full: every parameter trains; lora: peft LoRA adapters, the model frozen; qlora: the
    same on a bitsandbytes 4-bit base."""
    rank: PositiveInt = 8
    """LoRA rank r (peft `r`, default 8): lora_A is [r, in], lora_B [out, r]."""
    alpha: PositiveInt = 8
    """peft `lora_alpha` (default 8): scales the update, changes no memory."""
    target_modules: tuple[str, ...] | str | None = None
    """Modules that get adapters, by peft's rules: a list of names (a module matches when its
    name equals one or ends with `.name`), a string (a regex that must match the whole module
    name), or `all-linear`. Default: peft's list for the model type (q_proj/v_proj for Llama,
    c_attn for GPT-2)."""
    exclude_modules: tuple[str, ...] | str | None = None
    """Modules never targeted, matched like target_modules (peft `exclude_modules`)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full beside the adapters (peft keeps the original frozen and adds a
    trainable copy); a module matches when its name ends with the entry."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """peft `lora_dropout` (default 0): > 0 keeps a dropout mask per adapted module."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """peft `bias`: which biases train (none; every `.bias`; those of adapted modules)."""
    autocast_adapter_dtype: bool = True
    """peft get_peft_model(autocast_adapter_dtype=True): bf16/fp16 adapters are made fp32."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """qlora: `bnb_4bit_quant_type`. memplan defaults to the QLoRA paper's nf4
    (transformers' own default is fp4)."""
    double_quant: bool = True
    """qlora: `bnb_4bit_use_double_quant` (quantize the absmax too). memplan defaults to the
    QLoRA paper's true (transformers' own default is false)."""
    skip_modules: tuple[str, ...] | None = None
    """qlora: `llm_int8_skip_modules`, modules kept unquantized; default: transformers'
    choice (the output embedding, tied weights and the last module)."""
    prepare_kbit: bool = True
    """qlora: peft `prepare_model_for_kbit_training` was called (casts every non-quantized
    16-bit parameter to fp32)."""
    freeze: tuple[str, ...] = ()
    """Parameters that do not train, as fnmatch patterns over their names (shell-style:
    `*` any characters dots included, `?` one, `[0-9]` one digit), e.g.
    `model.embed_tokens.*`, `model.layers.[0-9].*`."""

    @model_validator(mode="after")
    def _keys_fit_method(self) -> FinetuneSpec:
        given = self.model_fields_set
        if self.method == "full":
            stray = [k for k in (*_ADAPTER_KEYS, *_QLORA_KEYS) if k in given]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but method is full; set method: lora (or qlora) "
                    "to train adapters"
                )
        if self.method == "lora":
            stray = [k for k in _QLORA_KEYS if k in given]
            if stray:
                raise ValueError(f"{', '.join(stray)} apply to method: qlora only")
        return self


class Spec(Frozen):
    """A whole memplan spec."""

    model: ModelSpec
    precision: PrecisionTable = PrecisionTable(preset="bf16-mixed")
    """A preset name (`bf16-mixed`) or a table (see `memplan.precision.PRESETS`)."""
    optimizer: OptimizerSpec = OptimizerSpec()
    training: TrainingSpec = TrainingSpec()
    parallelism: ParallelismSpec = ParallelismSpec()
    hardware: HardwareSpec = HardwareSpec()
    plan: PlanSpec | None = None
    """Only for `memplan plan`: what to search."""
    finetune: FinetuneSpec = FinetuneSpec()
    """What trains: full fine-tuning (default), LoRA or QLoRA, and frozen parameters."""

    @field_validator("precision", mode="before")
    @classmethod
    def _preset_name(cls, value: Any) -> Any:
        """A bare name is shorthand for `{preset: name}`."""
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(
                    f"unknown precision preset {value!r}{nearest(value, PRESETS)}; "
                    f"choose one of {', '.join(PRESETS)} or give a table"
                )
            return {"preset": value}
        return value

    def recipe(self) -> Recipe:
        """The precision recipe with the preset resolved."""
        return self.precision.recipe()
