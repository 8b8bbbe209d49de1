"""The spec's `finetune:` section: full fine-tuning, LoRA or QLoRA, and frozen parameters
(peft's and transformers' own names and defaults); LitGPT's adapter and adapter_v2
(litgpt's own names and defaults, under model.implementation litgpt only)."""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from memplan.config.base import Frozen, PositiveInt

FinetuneMethod = Literal["full", "lora", "qlora", "adapter", "adapter_v2"]
LITGPT_ADAPTERS = ("adapter", "adapter_v2")
"""LitGPT's own fine-tuning methods (litgpt 0.5.9 finetune/adapter.py, finetune/adapter_v2.py),
modelled under model.implementation litgpt only."""
_ADAPTER_KEYS = (
    "rank",
    "alpha",
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "modules_to_save",
    "dropout",
    "bias",
    "autocast_adapter_dtype",
)
_QLORA_KEYS = (
    "quant_type",
    "double_quant",
    "skip_modules",
    "prepare_kbit",
    "bnb_version",
    "quant_storage",
    "stable_embedding",
)
_PREFIX_KEYS = ("adapter_prompt_length", "adapter_start_layer")


class FinetuneSpec(Frozen):
    """What is trained: every parameter (`full`), LoRA adapters on a frozen model (`lora`,
    peft's LoraConfig), or LoRA on a 4-bit quantized model (`qlora`: transformers'
    BitsAndBytesConfig + peft). Names and defaults are peft's and transformers' own
    (peft 0.21 tuners/lora/config.py::LoraConfig; transformers 5.24
    utils/quantization_config.py::BitsAndBytesConfig), except where noted."""

    method: FinetuneMethod = "full"
    """full: every parameter trains; lora: peft LoRA adapters, the model frozen; qlora: the
    same on a bitsandbytes 4-bit base; adapter / adapter_v2 (model.implementation litgpt
    only): LitGPT's LLaMA-Adapter (litgpt/adapter.py: a learned prefix and gate per layer from
    adapter_start_layer) and LLaMA-Adapter v2 (litgpt/adapter_v2.py: that, plus a bias and
    scale on every Linear and the norms trained), every other parameter frozen."""
    rank: PositiveInt = 8
    """LoRA rank r (peft `r`, default 8): lora_A is [r, in], lora_B [out, r]."""
    alpha: PositiveInt = 8
    """peft `lora_alpha` (default 8): scales the update, changes no memory."""
    target_modules: tuple[str, ...] | str | None = None
    """Modules that get adapters, by peft's rules: a list of names (a module matches when its
    name equals one or ends with `.name`), a string (a regex that must match the whole module
    name), or `all-linear`. Default: peft's list for the model type (q_proj/v_proj for Llama,
    c_attn for GPT-2)."""
    target_parameters: tuple[str, ...] | None = None
    """Parameters adapted in place by peft's lora.ParamWrapper (peft `target_parameters`), a
    list of parameter names: a parameter matches when its name equals an entry or ends with
    `.entry` (no regex), e.g. `mlp.experts.down_proj` (fused 3-D experts), `mlp.gate.weight`
    (an MoE router). 2-D or 3-D parameters only; lora_dropout must be 0. Beside
    target_modules, both apply (a module may not be targeted by both); without it, peft still
    adds its default target_modules for the model type, except on the MoE models it converts
    (Mixtral, Qwen3-MoE), where set target_modules: [] to adapt only the parameters."""
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
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = "uint8"
    """qlora: `bnb_4bit_quant_storage`, the dtype of the tensor the packed 4-bit codes are
    stored in (transformers' default uint8): n values take (n + 1) // (2 x its width)
    elements of it (bitsandbytes _ops.py::quantize_4bit), the same bytes. HF's FSDP-QLoRA
    recipe sets it to the load dtype (transformers docs "FSDP QLoRA")."""
    bnb_version: str | None = None
    """qlora: the bitsandbytes release the job runs, as a quoted string ("0.41.1"); default:
    the one memplan's rules describe (0.50; litgpt 0.5.9's `extra` asks >=0.45.2,<0.45.5 on
    Linux). Before 0.43.2 every 4-bit matmul keeps its input for backward
    (autograd/_functions.py::MatMul4Bit.forward `ctx.tensors = (A, B)`; dropped by
    bitsandbytes PR #1270), modelled under model.implementation litgpt."""
    stable_embedding: bool | None = None
    """qlora under model.implementation litgpt: whether finetune/lora.py::main swaps the
    embedding (`transformer.wte`) for bitsandbytes' StableEmbedding after building its
    PagedAdamW (litgpt PR #1770, commit ae798aba, 2024-10-04, first tagged v0.5.0). None: true,
    as litgpt >= 0.5.0 runs (0.5.9, the release memplan models): the new embedding and its
    LayerNorm get gradients but no optimizer state, the optimizer's param_groups keep the
    replaced weight, and every layer's input requires grad. false: the embedding stays the
    frozen model's (no gradient, no optimizer state, its output needs no grad), as litgpt
    <= 0.4.13 and lit-gpt (2023, e.g. commit 8641822 finetune/lora.py::main) ran."""
    adapter_prompt_length: PositiveInt = 10
    """adapter / adapter_v2: positions of the learned prefix each adapted layer attends to
    (litgpt 0.5.9 adapter.py::Config `adapter_prompt_length`, default 10): `adapter_wte` is
    an Embedding [adapter_prompt_length, hidden]."""
    adapter_start_layer: int = Field(2, ge=0)
    """adapter / adapter_v2: the first layer with a prefix (adapter.py::Config
    `adapter_start_layer`, default 2): layers from it on get `adapter_wte` and
    `gating_factor`."""
    freeze: tuple[str, ...] = ()
    """Parameters that do not train, as fnmatch patterns over their names (shell-style:
    `*` any characters dots included, `?` one, `[0-9]` one digit), e.g.
    `model.embed_tokens.*`, `model.layers.[0-9].*`."""

    @field_validator("target_parameters", mode="before")
    @classmethod
    def _target_parameters(cls, value: Any) -> Any:
        if isinstance(value, str):
            # peft 0.21.2 tuners/lora/config.py::LoraConfig.__post_init__ raises TypeError
            raise ValueError(
                f"give a list of parameter names, e.g. [{value}]: peft takes no string here "
                "(no regex; LoraConfig raises '`target_parameters` must be a list of strings "
                "or None')"
            )
        return value

    @field_validator("bnb_version", mode="before")
    @classmethod
    def _bnb_version(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            # YAML reads 0.50 as the number 0.5: only a string keeps the version.
            raise ValueError('write the version as a string, e.g. "0.41.1" (quoted)')
        if bnb_release(value) is None:
            raise ValueError(f"{value!r} is not a version (expected MAJOR.MINOR[.PATCH])")
        return value.strip()

    @model_validator(mode="after")
    def _keys_fit_method(self) -> "FinetuneSpec":
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
        if self.method in LITGPT_ADAPTERS:
            stray = [k for k in (*_ADAPTER_KEYS, *_QLORA_KEYS, "freeze") if k in given]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but method is {self.method}: LitGPT's "
                    f"finetune/{self.method}.py trains its own adapter parameters "
                    "(adapter_prompt_length, adapter_start_layer), not LoRA, QLoRA or freeze "
                    "patterns"
                )
        else:
            stray = [k for k in _PREFIX_KEYS if k in given]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but method is {self.method}; they apply to "
                    "method: adapter or adapter_v2 (LitGPT's)"
                )
        return self


BNB_KEEPS_INPUT_BEFORE = (0, 43, 2)
"""bitsandbytes' MatMul4Bit keeps its input A for backward before 0.43.2 (0.41.1
autograd/_functions.py::MatMul4Bit.forward: `ctx.tensors = (A, B)` when any input needs
grad; commit 9e75374 "fix QLoRA mem bug: delete useless buffered activation" (#1270), first
tagged 0.43.2, keeps `(None, B)`)."""


def bnb_release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of "0.41.1" or "0.43" (patch 0); None when not a version."""
    parts = version.strip().split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    major, minor, patch = (int(p) for p in (*parts, "0")[:3])
    return major, minor, patch


def bnb_keeps_input(ft: FinetuneSpec) -> bool:
    """Whether the job's bitsandbytes keeps each 4-bit matmul's input (BNB_KEEPS_INPUT_BEFORE);
    False for memplan's default release."""
    release = bnb_release(ft.bnb_version) if ft.bnb_version else None
    return release is not None and release < BNB_KEEPS_INPUT_BEFORE
