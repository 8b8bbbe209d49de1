"""The user's spec: pydantic v2 models, frozen, unknown keys refused.

Every field has a documented default, so the smallest useful spec names a model, and the rest
follows. Loading from YAML (with line numbers for errors) lives in `memplan.config.load`.
"""

import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from memplan import versions
from memplan.config.base import Frozen, Implementation, PositiveInt
from memplan.config.finetune import LITGPT_ADAPTERS, FinetuneSpec
from memplan.config.machine import HardwareSpec
from memplan.config.parallelism import ParallelismSpec
from memplan.config.plan import PlanSpec
from memplan.hardware import nearest
from memplan.optimizers import (
    LOOP_ONLY_OPTIMIZERS,
    NOT_FUSED_OPTIMIZERS,
    OptimizerConfig,
    OptimizerName,
)
from memplan.precision import PRESETS, DType, Recipe


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
    implementation: Implementation = "transformers"
    """Whose model code runs the forward: `transformers` (its modeling files, the default),
    `torchtitan` (torchtitan's own model code, which saves other tensors and runs under
    torchtitan's FSDP2 defaults: `reduce_dtype` fp32), `litgpt` (LitGPT 0.5.9's
    `litgpt.model.GPT` with its Llama configs and the chunked loss of its training scripts,
    run by Lightning Fabric; one device or data parallelism) or `megatron-core` (Megatron-Core
    0.12's GPTModel built Llama-like, in the compute dtype as Megatron's Float16Module runs it;
    its layer spec is `megatron_spec`). The report names it."""
    megatron_spec: Literal["local", "te"] | None = None
    """With `implementation: megatron-core`, the layer spec GPTModel is built with: `local`
    (get_gpt_layer_local_spec: torch RMSNorm, ColumnParallelLinear / RowParallelLinear and the
    unfused DotProductAttention, which keeps the [batch, heads, seq, seq] softmax; the
    default) or `te` (get_gpt_layer_with_transformer_engine_spec: the norm fused into the QKV
    and FC1 linears, TEDotProductAttention's flash / fused attention; CUDA only). Only with
    megatron-core."""
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
    def _megatron_spec_needs_megatron(self) -> "ModelSpec":
        if self.megatron_spec is not None and self.implementation != "megatron-core":
            raise ValueError(
                "megatron_spec picks Megatron-Core's layer spec: set implementation: "
                f"megatron-core (or leave megatron_spec out; implementation is "
                f"{self.implementation!r})"
            )
        return self

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSpec":
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
    fp8: Literal["none", "delayed", "current", "torchao-tensorwise", "torchao-rowwise"] = "none"
    """fp8 GEMMs in the decoder layers: NVIDIA Transformer Engine with `delayed` scaling (TE's
    default recipe, an amax history per quantizer) or `current` scaling (memplan.states.fp8);
    or torchao's Float8Linear (torchao.float8.convert_to_float8_training, as torchtitan's
    `Float8LinearConverter` converts every Linear of the blocks) with dynamic `tensorwise` or
    `rowwise` scaling (Float8LinearConfig.from_recipe_name, torchao 0.18): no scaling state,
    the layers save their 16-bit inputs as without fp8 (memplan.model.forward.compiled)."""
    fp8_amax_history: PositiveInt = 1024
    """DelayedScaling.amax_history_len."""
    fp8_all_gather: bool = False
    """With `fp8: torchao-tensorwise` under FSDP2 (parallelism.engine: fsdp2): torchao's
    Float8LinearConfig(enable_fsdp_float8_all_gather=True), torchtitan's
    `--float8.enable_fsdp_float8_all_gather` (on only where FSDP shards: dp_shard > 1). FSDP2
    all-gathers each Float8Linear weight in fp8, 1 B per element instead of the
    MixedPrecisionPolicy.param_dtype (memplan.states.engines.fsdp2.fp8)."""
    fp8_precompute_scale: bool = False
    """With `fp8_all_gather`: torchao's precompute_float8_dynamic_scale_for_fsdp after each
    optimizer step (torchtitan's `--float8.precompute_float8_dynamic_scale_for_fsdp`): one fp32
    scale per Float8Linear kept between steps (a note gives its bytes; the cast of each weight
    shard holds no more than without it)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(
                f"unknown precision preset {value!r}; choose one of {', '.join(PRESETS)}"
            )
        return value

    @model_validator(mode="after")
    def _fp8_all_gather_needs_tensorwise(self) -> "PrecisionTable":
        if self.fp8_all_gather and self.fp8 != "torchao-tensorwise":
            raise ValueError(
                f"fp8_all_gather is torchao's enable_fsdp_float8_all_gather, which supports "
                f"tensorwise scaling only (torchao 0.18 float8/config.py::Float8LinearConfig."
                f"__post_init__): set fp8: torchao-tensorwise (it is {self.fp8!r}), or "
                "fp8_all_gather: false"
            )
        if self.fp8_precompute_scale and not self.fp8_all_gather:
            raise ValueError(
                "fp8_precompute_scale precomputes the scales of the weights FSDP2 all-gathers "
                "in fp8 (torchao precompute_float8_dynamic_scale_for_fsdp; torchtitan applies it "
                "only with enable_fsdp_float8_all_gather): set fp8_all_gather: true, or "
                "fp8_precompute_scale: false"
            )
        return self

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
            and self.model_copy(
                update={
                    "fp8": "none",
                    "fp8_amax_history": 1024,
                    "fp8_all_gather": False,
                    "fp8_precompute_scale": False,
                }
            )
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
    """The optimizer, by torch.optim name (plus lion, bitsandbytes 8-bit Adam and its paged
    32-bit Adam, and adafactor-hf: transformers' own Adafactor as the HF Trainer's
    `optim="adafactor"` builds it)."""

    name: OptimizerName = "adamw"
    momentum: float = Field(0.0, ge=0)
    """SGD/RMSprop momentum (torch default 0: no momentum buffer)."""
    amsgrad: bool = False
    """Adam/AdamW: keep max_exp_avg_sq."""
    centered: bool = False
    """RMSprop: keep grad_avg."""
    implementation: Literal["foreach", "fused", "for_loop"] = "foreach"
    """torch.optim kernel: foreach (the CUDA default), fused, or for_loop (the CPU default).
    adafactor-hf has one kernel, a loop: foreach and for_loop both mean it."""

    @model_validator(mode="after")
    def _fused_exists(self) -> "OptimizerSpec":
        if self.implementation == "fused" and self.name in LOOP_ONLY_OPTIMIZERS:
            raise ValueError(
                f"{self.name} (transformers.optimization.Adafactor) has no fused kernel: its "
                "step is one Python loop over the parameters (transformers 5.25 "
                "optimization.py::Adafactor.step): set implementation: foreach or for_loop "
                "(both mean that loop)"
            )
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
    activation_checkpointing: Literal["none", "selective", "full", "selective-op"] = "none"
    """Recompute in backward: none; selective (the attention core, Megatron's
    --recompute-activations); full (each decoder layer keeps only its input); selective-op
    (torchtitan's per-op selective checkpointing, `SelectiveAC`: each block keeps its input and
    the outputs of every odd-numbered matmul and of the attention kernel; needs
    model.implementation: torchtitan)."""
    checkpoint_every: PositiveInt = 1
    """With activation_checkpointing: full, checkpoint only every Nth decoder layer (layers
    N-1, 2N-1, ...; the others keep all their activations): torchtitan's
    `selective_ac_option: "N"` (layer SAC, torchtitan 9dec370 parallelize_llama.py::
    _apply_ac_to_transformer_block). Default 1: every layer."""
    activation_offload: bool = False
    """Checkpointed layer inputs in pinned host memory (transformers
    `activation_checkpointing_enable(offload=True)`); needs activation_checkpointing: full."""
    compile: bool = False
    """Each decoder layer runs under torch.compile (Inductor), as torchtitan's
    `compile.enable` compiles each TransformerBlock (embeddings and head stay eager; the loss
    too unless `compile_loss`):
    a layer saves what AOTAutograd's min-cut partitioner keeps (memplan.model.forward.compiled:
    transformers' llama, mistral, qwen2, qwen3 and olmo2 layers, torchtitan's Llama 3 and dense
    Qwen3 blocks; checkpointing none or full, and torchtitan's selective-op) instead of the
    eager tensors; elsewhere (MoE layers, SDPA's non-flash kernels, ...) transformers' eager
    set stands, with a note, and torchtitan's code is refused with the reason."""
    compile_loss: bool | None = None
    """With `compile: true` and `model.implementation: torchtitan`, whether the loss is compiled
    too: torchtitan 0.3.0 compiles it by default (config/configs.py::CompileConfig.components
    ["model", "loss"]; components/loss.py::BaseLoss._maybe_compile), so its cross entropy keeps
    the 16-bit logits and two fp32 [tokens] statistics instead of an fp32 log-softmax
    (memplan.model.stacks.torchtitan). torchtitan 9dec370 (Dec 2024) compiled the blocks only:
    set false for it. None: torchtitan 0.3.0's default (true with compile)."""
    zero_grad: Literal["set_to_none", "zero"] = "set_to_none"
    """How the trainer clears gradients after the optimizer step: set_to_none (torch's
    default since 2.0) frees them; zero (`zero_grad(set_to_none=False)`, torch before 2.0 and
    some trainers) keeps them allocated through the next forward and backward."""
    softmax_saves_input: bool = False
    """torch before 1.11 keeps softmax's and log_softmax's input for their backward as well as
    their output (torch 1.10.0's generated SoftmaxBackward0 / LogSoftmaxBackward0 hold
    `self_` and `result_`; 1.11 holds `self_scalar_type`: pytorch/pytorch#64000, fixed by
    #66018): true adds every such input to the saved activations (eager attention: one
    [batch, heads, seq, seq] tensor per layer). Modelled from traced profiles (memplan.verify.
    trace.forward); false: torch 1.11 and later."""

    @model_validator(mode="after")
    def _offload_needs_full(self) -> "TrainingSpec":
        if self.activation_offload and self.activation_checkpointing != "full":
            raise ValueError(
                "activation_offload moves the inputs that full checkpointing keeps: set "
                "activation_checkpointing: full (or activation_offload: false)"
            )
        return self

    @model_validator(mode="after")
    def _compile_loss_needs_compile(self) -> "TrainingSpec":
        if self.compile_loss and not self.compile:
            raise ValueError(
                "compile_loss compiles the loss beside the compiled layers: set compile: true "
                "(or leave compile_loss out)"
            )
        return self

    @model_validator(mode="after")
    def _every_needs_full(self) -> "TrainingSpec":
        if self.checkpoint_every > 1 and self.activation_checkpointing != "full":
            raise ValueError(
                "checkpoint_every picks which layers full checkpointing recomputes: set "
                "activation_checkpointing: full (or checkpoint_every: 1)"
            )
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

    @model_validator(mode="after")
    def _litgpt_adapters_need_litgpt(self) -> "Spec":
        method = self.finetune.method
        if method in LITGPT_ADAPTERS and self.model.implementation != "litgpt":
            raise ValueError(
                f"finetune.method {method} is LitGPT's (litgpt 0.5.9 finetune/{method}.py, "
                f"its litgpt.{method} GPT): set model.implementation: litgpt (it is "
                f"{self.model.implementation!r}); peft's adapters under transformers are "
                "method: lora or qlora"
            )
        if self.finetune.target_parameters and self.model.implementation == "litgpt":
            raise ValueError(
                "finetune.target_parameters is peft's (LoraConfig.target_parameters): LitGPT's "
                "LoRA (litgpt 0.5.9 lora.py::Config) adapts Linear layers by its lora_* flags "
                "only (finetune.target_modules); drop target_parameters under "
                "model.implementation: litgpt"
            )
        if self.finetune.stable_embedding is not None and self.model.implementation != "litgpt":
            raise ValueError(
                "finetune.stable_embedding is LitGPT's QLoRA embedding swap (litgpt "
                "finetune/lora.py::main, from v0.5.0): set model.implementation: litgpt (it is "
                f"{self.model.implementation!r}) or leave stable_embedding out"
            )
        return self

    def recipe(self) -> Recipe:
        """The precision recipe with the preset resolved."""
        return self.precision.recipe()
