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

from memplan.models.decoder import (
    EMBED,
    Part,
    assemble,
    attention,
    divide_heads,
    gated_mlp,
    int_or,
    norm,
    param,
    resolve,
    rope_parameters,
    rotary_buffers,
    rotary_dim,
    stamp_layers,
)
from memplan.models.inventory import Architecture, Inventory, model_name

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

    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = int_or(cfg, "num_key_value_heads", heads)
    head_dim = int_or(cfg, "head_dim", divide_heads(cfg, hidden, heads))
    inter = cfg.int("intermediate_size")
    layers = cfg.int("num_hidden_layers")
    vocab = cfg.int("vocab_size")
    if model_type in ("llama", "qwen3"):
        qkv_bias = o_bias = cfg.bool("attention_bias", False)
    else:
        qkv_bias, o_bias = model_type == "qwen2", False  # mistral: none; qwen2: q/k/v only
    mlp_bias = model_type == "llama" and cfg.bool("mlp_bias", False)

    layer: Part = attention(
        "self_attn",
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
    )
    if model_type == "qwen3":
        layer += norm("self_attn.q_norm", head_dim) + norm("self_attn.k_norm", head_dim)
    layer += gated_mlp("mlp", hidden, inter, bias=mlp_bias)
    layer += norm("input_layernorm", hidden) + norm("post_attention_layernorm", hidden)

    rope = rope_parameters(cfg.data)
    tensors = [
        param(EMBED, (vocab, hidden), "embedding"),
        *stamp_layers([layer] * layers),
        *norm("model.norm", hidden),
        *rotary_buffers("model.rotary_emb", rotary_dim(rope, head_dim, default_is_partial=False)),
    ]
    extra: dict[str, Any] = {}
    if model_type != "llama":
        # Sliding windows change the attention mask, never a tensor shape.
        use_window = model_type == "mistral" or cfg.bool("use_sliding_window", False)
        extra["sliding_window"] = cfg.get("sliding_window") if use_window else None
    arch = Architecture(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=cfg.int("max_position_embeddings"),
        extra=extra,
    )
    return assemble(
        name=model_name(cfg, model_type),
        architecture=arch,
        tensors=tensors,
        tie=cfg.bool("tie_word_embeddings", False),
        hidden=hidden,
        vocab=vocab,
    )
