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

from memplan.model.families import _llama_decoder
from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    fused_experts,
    linear,
    norm,
    read_dims,
    resolve,
    rotary_emb,
    self_attention,
)
from memplan.model.families.record import Family, ModelEnds
from memplan.model.inventory import Inventory

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
    dims = read_dims(cfg)
    experts = cfg.int("num_local_experts")
    top_k = cfg.int("num_experts_per_tok")

    layer: Part = (
        *self_attention(dims, qkv_bias=False, o_bias=False),
        *linear("mlp.gate", experts, dims.hidden, "router"),
        *fused_experts("mlp.experts", experts, dims.hidden, dims.inter),
        *norm("input_layernorm", dims.hidden),
        *norm("post_attention_layernorm", dims.hidden),
    )
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_emb(cfg, dims.head_dim))
    arch = architecture(
        cfg,
        "mixtral",
        dims,
        experts=experts,
        top_k=top_k,
        extra={
            "moe_intermediate_size": dims.inter,
            "moe_layers": tuple(range(dims.layers)),
            "sliding_window": cfg.get("sliding_window"),
        },
    )
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    tensors=build,
    saved=_llama_decoder.saved,  # Llama's layer with the sparse MoE MLP
    # peft's listed default, never applied under transformers 5: peft converts the MoE config
    # (peft_moe) before it fills in defaults and raises NoMatchingPeftModuleError, as memplan
    # does (memplan.model.finetune.targets._refuse_moe_default).
    peft_targets=("q_proj", "v_proj"),
    peft_moe={"mixtral": "mixtral"},
    lora_ends=ModelEnds(
        layer="llama",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
        moe={"mixtral": "routed"},
    ),
)
