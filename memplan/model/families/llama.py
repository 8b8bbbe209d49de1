"""Llama and its dense relatives that share its layer: llama, mistral, qwen2, qwen3.

Source (module layout and names): transformers 5.24
- models/llama/modeling_llama.py: LlamaForCausalLM, LlamaModel, LlamaDecoderLayer,
  LlamaAttention (q/k/v/o, bias = `attention_bias` on all four), LlamaMLP (gate/up/down,
  bias = `mlp_bias`), LlamaRMSNorm, LlamaRotaryEmbedding.
- models/mistral/modeling_mistral.py: MistralAttention, MistralMLP: no biases at all.
- models/qwen2/modeling_qwen2.py: Qwen2Attention: q/k/v always `bias=True`, o_proj never
  (the config has no `attention_bias`; a stray one in config.json is ignored); Qwen2MLP: no bias.
- models/qwen3/modeling_qwen3.py: Qwen3Attention: bias = `attention_bias` on all four, plus
  per-head `q_norm`/`k_norm` RMSNorms of size head_dim after o_proj.
Every attention reads `head_dim` from the config when it is set, else hidden // heads.
Defaults for absent keys are the config classes' (configuration_<family>.py, same version);
tests/test_models_modern.py checks each table against the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families import _llama_decoder
from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    gated_mlp,
    norm,
    read_dims,
    resolve,
    rotary_emb,
    self_attention,
)
from memplan.model.families.record import Family, ModelEnds
from memplan.model.forward.assemble import Model
from memplan.model.forward.tensors import Setting
from memplan.model.inventory import Architecture, Inventory

# Keys read below, with each config class's dataclass default in transformers 5.24.
# head_dim None -> hidden_size // num_attention_heads (LlamaConfig/MistralConfig __post_init__;
# Qwen2Config has no head_dim field, Qwen2Attention falls back the same way). Qwen3Config's
# head_dim defaults to 128 whatever hidden_size is. num_key_value_heads None -> heads.
_COMMON: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "head_dim": None, "attention_bias": False, "mlp_bias": False},
    "mistral": {
        **_COMMON,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    },
    "qwen2": {
        **_COMMON,
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "qwen3": {
        **_COMMON,
        "vocab_size": 151936,
        "intermediate_size": 22016,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    model_type = str(config.get("model_type", "llama"))
    cfg = resolve(config, DEFAULTS[model_type], origin=origin)
    dims = read_dims(cfg)
    if model_type in ("llama", "qwen3"):
        qkv_bias = o_bias = cfg.bool("attention_bias", False)
    else:
        qkv_bias, o_bias = model_type == "qwen2", False  # mistral: none; qwen2: q/k/v only
    mlp_bias = model_type == "llama" and cfg.bool("mlp_bias", False)

    layer: Part = (
        *self_attention(dims, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=model_type == "qwen3"),
        *gated_mlp("mlp", dims.hidden, dims.inter, bias=mlp_bias),
        *norm("input_layernorm", dims.hidden),
        *norm("post_attention_layernorm", dims.hidden),
    )
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_emb(cfg, dims.head_dim))
    extra: dict[str, Any] = {}
    if model_type != "llama":
        # Sliding windows change the attention mask, never a tensor shape.
        use_window = model_type == "mistral" or cfg.bool("use_sliding_window", False)
        extra["sliding_window"] = cfg.get("sliding_window") if use_window else None
    arch = architecture(cfg, model_type, dims, extra=extra)
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """The saved tensors of the Llama-style decoder (memplan.model.families._llama_decoder);
    Qwen3 adds per-head q_norm/k_norm."""
    return _llama_decoder.saved(arch, st, tied=tied, qk_norm=arch.model_type == "qwen3")


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    tensors=build,
    saved=saved,
    peft_targets=("q_proj", "v_proj"),
    lora_ends=ModelEnds(
        layer="llama",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
    ),
    dtensor_tp=True,
)
