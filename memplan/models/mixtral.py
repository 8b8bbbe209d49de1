"""Mixtral: Mistral attention, every layer a sparse MoE of SwiGLU experts, no shared expert.

Source: transformers 5.24 models/mixtral/modeling_mixtral.py:
- MixtralAttention: q/k/v/o without bias; head_dim = config.head_dim or hidden // heads.
- MixtralSparseMoeBlock: `gate` = MixtralTopKRouter (weight [E, H], model dtype) registered
  before `experts` = MixtralExperts (fused `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]).
- MixtralDecoderLayer: self_attn, mlp, input_layernorm, post_attention_layernorm.
Config defaults: configuration_mixtral.py: MixtralConfig (`num_experts` is an alias of
`num_local_experts` through its attribute_map).
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
    fused_experts,
    int_or,
    linear,
    norm,
    param,
    resolve,
    rope_parameters,
    rotary_buffers,
    rotary_dim,
    stamp_layers,
)
from memplan.models.inventory import Architecture, Inventory, model_name

# MixtralConfig dataclass defaults (transformers 5.24); head_dim None -> hidden // heads.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "max_position_embeddings": 4096 * 32,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
}
ALIASES = {"num_experts": "num_local_experts"}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, DEFAULTS, aliases=ALIASES, origin=origin)
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = int_or(cfg, "num_key_value_heads", heads)
    head_dim = int_or(cfg, "head_dim", divide_heads(cfg, hidden, heads))
    inter = cfg.int("intermediate_size")
    layers = cfg.int("num_hidden_layers")
    vocab = cfg.int("vocab_size")
    experts = cfg.int("num_local_experts")
    top_k = cfg.int("num_experts_per_tok")

    layer: Part = (
        *attention(
            "self_attn",
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            qkv_bias=False,
            o_bias=False,
        ),
        *linear("mlp.gate", experts, hidden, "router"),
        *fused_experts("mlp.experts", experts, hidden, inter),
        *norm("input_layernorm", hidden),
        *norm("post_attention_layernorm", hidden),
    )
    rope = rope_parameters(cfg.data)
    tensors = [
        param(EMBED, (vocab, hidden), "embedding"),
        *stamp_layers([layer] * layers),
        *norm("model.norm", hidden),
        *rotary_buffers("model.rotary_emb", rotary_dim(rope, head_dim, default_is_partial=False)),
    ]
    arch = Architecture(
        model_type="mixtral",
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        num_experts=experts,
        num_experts_per_token=top_k,
        max_position_embeddings=cfg.int("max_position_embeddings"),
        extra={
            "moe_intermediate_size": inter,
            "moe_layers": tuple(range(layers)),
            "sliding_window": cfg.get("sliding_window"),
        },
    )
    return assemble(
        name=model_name(cfg, "mixtral"),
        architecture=arch,
        tensors=tensors,
        tie=cfg.bool("tie_word_embeddings", False),
        hidden=hidden,
        vocab=vocab,
    )
