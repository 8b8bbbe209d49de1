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
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = int_or(cfg, "num_key_value_heads", heads)
    head_dim = int_or(cfg, "head_dim", divide_heads(cfg, hidden, heads))
    inter = cfg.int("intermediate_size")
    layers = cfg.int("num_hidden_layers")
    vocab = cfg.int("vocab_size")
    bias = cfg.bool("attention_bias", False)

    layer: Part = (
        *attention(
            "self_attn",
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            qkv_bias=bias,
            o_bias=bias,
        ),
        *norm("self_attn.q_norm", heads * head_dim),
        *norm("self_attn.k_norm", kv_heads * head_dim),
        *gated_mlp("mlp", hidden, inter),
        *norm("post_attention_layernorm", hidden),
        *norm("post_feedforward_layernorm", hidden),
    )
    rope = rope_parameters(cfg.data)
    tensors = [
        param(EMBED, (vocab, hidden), "embedding"),
        *stamp_layers([layer] * layers),
        *norm("model.norm", hidden),
        *rotary_buffers("model.rotary_emb", rotary_dim(rope, head_dim, default_is_partial=False)),
    ]
    arch = Architecture(
        model_type="olmo2",
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=cfg.int("max_position_embeddings"),
    )
    return assemble(
        name=model_name(cfg, "olmo2"),
        architecture=arch,
        tensors=tensors,
        tie=cfg.bool("tie_word_embeddings", False),
        hidden=hidden,
        vocab=vocab,
    )
