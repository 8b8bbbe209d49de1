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

from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    linear,
    norm,
    read_dims,
    resolve,
    rope_parameters,
    rotary_buffers,
    rotary_dim,
)
from memplan.model.inventory import Inventory

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
    dims = read_dims(cfg)
    hidden, inter, q_out = dims.hidden, dims.inter, dims.heads * dims.head_dim

    layer: Part = (
        *linear("self_attn.o_proj", hidden, q_out, "attention"),
        *linear(
            "self_attn.qkv_proj", q_out + 2 * dims.kv_heads * dims.head_dim, hidden, "attention"
        ),
        *linear("mlp.gate_up_proj", 2 * inter, hidden, "mlp"),
        *linear("mlp.down_proj", hidden, inter, "mlp"),
        *norm("input_layernorm", hidden),
        *norm("post_attention_layernorm", hidden),
    )
    rot = rotary_dim(rope_parameters(cfg.data), dims.head_dim, default_is_partial=True)
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_buffers("model.rotary_emb", rot))
    arch = architecture(
        cfg,
        "phi3",
        dims,
        extra={
            "fused_qkv": True,
            "fused_gate_up": True,
            "sliding_window": cfg.get("sliding_window"),
            "rotary_dim": rot,
        },
    )
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)
