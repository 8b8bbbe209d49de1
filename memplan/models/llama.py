"""Llama and its close relatives: llama, mistral, qwen2, qwen3.

Layout of transformers 5.x `modeling_llama.py` (`LlamaForCausalLM`): embed_tokens, per layer
q/k/v/o projections, a gated SiLU MLP (gate/up/down), two RMSNorms, a final RMSNorm and an
untied lm_head. Mistral is identical (`modeling_mistral.py`), Qwen2 adds q/k/v biases
(`modeling_qwen2.py: Qwen2Attention`), Qwen3 adds per-head q_norm/k_norm
(`modeling_qwen3.py: Qwen3Attention`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.models.inventory import Architecture, Config, Inventory, TensorSpec, model_name

# model_type -> (q/k/v bias default, per-head q/k RMSNorm, tie_word_embeddings default)
# The tie defaults are each config class's __init__ default in transformers 5.x
# (configuration_{llama,mistral,qwen2,qwen3}.py).
_VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "llama": (False, False, False),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
    "qwen3": (False, True, False),
}


def rotary_buffers(prefix: str, rotary_dim: int) -> tuple[TensorSpec, ...]:
    """`inv_freq` and `original_inv_freq`: [rotary_dim / 2] fp32, non-persistent.

    Source: transformers 5.x `modeling_rope_utils.py` / `LlamaRotaryEmbedding.__init__`
    (`register_buffer("inv_freq", ..., persistent=False)` and the `original_inv_freq` copy).
    """
    half = rotary_dim // 2
    return tuple(
        TensorSpec(
            f"{prefix}.{name}", (half,), "buffer", dtype="fp32", persistent=False, role="rotary"
        )
        for name in ("inv_freq", "original_inv_freq")
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = Config(config, origin=origin)
    model_type = cfg.get("model_type", "llama")
    qkv_bias_default, qk_norm, tie_default = _VARIANTS[model_type]

    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", default=heads)
    head_dim = cfg.int("head_dim", default=hidden // heads)
    inter = cfg.int("intermediate_size")
    layers = cfg.int("num_hidden_layers")
    vocab = cfg.int("vocab_size")
    qkv_bias = cfg.bool("attention_bias", qkv_bias_default)
    o_bias = cfg.bool("attention_bias", False) if model_type != "qwen2" else False
    mlp_bias = cfg.bool("mlp_bias", False)
    tie = cfg.bool("tie_word_embeddings", tie_default)

    def linear(
        name: str, out_f: int, in_f: int, bias: bool, layer: int, role: str
    ) -> list[TensorSpec]:
        specs = [TensorSpec(f"{name}.weight", (out_f, in_f), layer=layer, role=role)]
        if bias:
            specs.append(TensorSpec(f"{name}.bias", (out_f,), layer=layer, role=role))
        return specs

    params: list[TensorSpec] = [
        TensorSpec("model.embed_tokens.weight", (vocab, hidden), role="embedding")
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        params += linear(
            f"{p}.self_attn.q_proj", heads * head_dim, hidden, qkv_bias, i, "attention"
        )
        params += linear(
            f"{p}.self_attn.k_proj", kv_heads * head_dim, hidden, qkv_bias, i, "attention"
        )
        params += linear(
            f"{p}.self_attn.v_proj", kv_heads * head_dim, hidden, qkv_bias, i, "attention"
        )
        params += linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim, o_bias, i, "attention")
        if qk_norm:
            params.append(
                TensorSpec(f"{p}.self_attn.q_norm.weight", (head_dim,), layer=i, role="norm")
            )
            params.append(
                TensorSpec(f"{p}.self_attn.k_norm.weight", (head_dim,), layer=i, role="norm")
            )
        params += linear(f"{p}.mlp.gate_proj", inter, hidden, mlp_bias, i, "mlp")
        params += linear(f"{p}.mlp.up_proj", inter, hidden, mlp_bias, i, "mlp")
        params += linear(f"{p}.mlp.down_proj", hidden, inter, mlp_bias, i, "mlp")
        params.append(TensorSpec(f"{p}.input_layernorm.weight", (hidden,), layer=i, role="norm"))
        params.append(
            TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), layer=i, role="norm")
        )
    params.append(TensorSpec("model.norm.weight", (hidden,), role="norm"))
    tied: tuple[tuple[str, str], ...] = ()
    if tie:
        tied = (("lm_head.weight", "model.embed_tokens.weight"),)
    else:
        params.append(TensorSpec("lm_head.weight", (vocab, hidden), role="head"))

    rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
    arch = Architecture(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=cfg.int("max_position_embeddings", default=0),
    )
    return Inventory(
        name=model_name(cfg, model_type),
        architecture=arch,
        parameters=tuple(params),
        buffers=rotary_buffers("model.rotary_emb", rotary_dim),
        tied=tied,
    )
