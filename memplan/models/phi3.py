"""Phi-3 (and Phi-3.5-mini, Phi-4-mini): llama-like, with fused projections.

Source: transformers 5.24 models/phi3/modeling_phi3.py:
- Phi3Attention: `o_proj` [H, heads*hd] registered before `qkv_proj` [heads*hd + 2*kv*hd, H];
  no biases; head_dim = config.head_dim if set, else hidden // heads.
- Phi3MLP: `gate_up_proj` [2I, H] (gate and up stacked) and `down_proj` [H, I], no biases.
- Phi3DecoderLayer: self_attn, mlp, input_layernorm, post_attention_layernorm (the two
  resid dropouts hold no tensors).
- Phi3RotaryEmbedding.compute_default_rope_parameters: unlike Llama, the default rope rotates
  int(head_dim * partial_rotary_factor) dims (Phi-4-mini uses 0.75); `su`/`yarn` rope types
  are renamed `longrope` by Phi3Config, with the same inv_freq size.
Defaults: configuration_phi3.py: Phi3Config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.models.decoder import (
    EMBED,
    Part,
    assemble,
    divide_heads,
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

# Phi3Config dataclass defaults (transformers 5.24); num_key_value_heads None -> heads.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "sliding_window": None,
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

    qkv_out = heads * head_dim + 2 * kv_heads * head_dim
    layer: Part = (
        *linear("self_attn.o_proj", hidden, heads * head_dim, "attention"),
        *linear("self_attn.qkv_proj", qkv_out, hidden, "attention"),
        *linear("mlp.gate_up_proj", 2 * inter, hidden, "mlp"),
        *linear("mlp.down_proj", hidden, inter, "mlp"),
        *norm("input_layernorm", hidden),
        *norm("post_attention_layernorm", hidden),
    )
    rope = rope_parameters(cfg.data)
    rot = rotary_dim(rope, head_dim, default_is_partial=True)
    tensors = [
        param(EMBED, (vocab, hidden), "embedding"),
        *stamp_layers([layer] * layers),
        *norm("model.norm", hidden),
        *rotary_buffers("model.rotary_emb", rot),
    ]
    arch = Architecture(
        model_type="phi3",
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=cfg.int("max_position_embeddings"),
        extra={
            "fused_qkv": True,
            "fused_gate_up": True,
            "sliding_window": cfg.get("sliding_window"),
            "rotary_dim": rot,
        },
    )
    return assemble(
        name=model_name(cfg, "phi3"),
        architecture=arch,
        tensors=tensors,
        tie=cfg.bool("tie_word_embeddings", False),
        hidden=hidden,
        vocab=vocab,
    )
