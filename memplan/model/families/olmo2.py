"""OLMo 2: llama-like, with norms after attention and MLP and full-width q/k norms.

A module of its own because its layer differs from Llama's in three places at once.
Source: transformers 5.24 models/olmo2/modeling_olmo2.py:
- Olmo2Attention: q/k/v/o (bias = `attention_bias`), then `q_norm` RMSNorm over the whole
  q projection [heads * head_dim] and `k_norm` over k [kv_heads * head_dim] (Qwen3 and
  Gemma 3 norm per head instead).
- Olmo2DecoderLayer: self_attn, mlp (Olmo2MLP gate/up/down, no bias), post_attention_layernorm,
  post_feedforward_layernorm; no input_layernorm.
Defaults: configuration_olmo2.py: Olmo2Config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
from memplan.model.inventory import Inventory

# Olmo2Config dataclass defaults (transformers 5.24); num_key_value_heads None -> heads.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, DEFAULTS, origin=origin)
    dims = read_dims(cfg)
    bias = cfg.bool("attention_bias", False)

    layer: Part = (
        *self_attention(dims, qkv_bias=bias, o_bias=bias),
        *norm("self_attn.q_norm", dims.heads * dims.head_dim),
        *norm("self_attn.k_norm", dims.kv_heads * dims.head_dim),
        *gated_mlp("mlp", dims.hidden, dims.inter),
        *norm("post_attention_layernorm", dims.hidden),
        *norm("post_feedforward_layernorm", dims.hidden),
    )
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_emb(cfg, dims.head_dim))
    arch = architecture(cfg, "olmo2", dims)
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)
