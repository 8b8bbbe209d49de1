"""Phi-1 / phi-1.5 / phi-2 (model_type "phi").

Layout of transformers 5.25 `models/phi/modeling_phi.py`: `PhiModel` holds `embed_tokens`
[V, H], layers `layers.{i}` (`PhiDecoderLayer`: self_attn, mlp, input_layernorm), `rotary_emb`
and `final_layernorm`. `PhiAttention` has `q_proj` [heads x d, H], `k_proj` / `v_proj`
[kv_heads x d, H] and `dense` [H, heads x d], all with bias, and, with `qk_layernorm`,
`q_layernorm` / `k_layernorm` LayerNorms over head_dim; `PhiMLP` is `fc1` [I, H] and `fc2`
[H, I] with bias. `PhiForCausalLM.lm_head` has a bias and is untied by default
(`tie_word_embeddings: False` in `configuration_phi.py`). d is `head_dim` when the config sets
one, else H // heads; `num_key_value_heads: null` = heads.

Buffers: `rotary_emb.inv_freq` and `original_inv_freq`, fp32, non-persistent, over
`int(head_dim * partial_rotary_factor)` dims (PhiConfig.__post_init__ defaults the factor to
0.5).

Class: `architectures[0]` when it is one of `_CLASSES`, else `PhiForCausalLM`
(`AutoModelForCausalLM`).

Saved tensors of transformers' own Phi are not modelled; `model.implementation: litgpt`
models LitGPT's GPT for the phi-1_5 / phi-2 entries of litgpt 0.5.9 config.py
(memplan.model.stacks.litgpt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import (
    embedding,
    flag,
    layer_norm,
    pick_class,
    rope_parameters,
    with_class_head,
)
from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    assemble,
    divide_heads,
    linear,
    present,
    resolve,
    rotary_buffers,
    stamp_layers,
)
from memplan.model.families.record import Family
from memplan.model.inventory import Config, Inventory, rotary_fraction

# configuration_phi.py: PhiConfig defaults (transformers 5.25; phi-1.5's sizes).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 51200,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "qk_layernorm": False,
    "tie_word_embeddings": False,
}
_DEFAULT_ROTARY = 0.5  # PhiConfig.__post_init__: kwargs.setdefault("partial_rotary_factor", 0.5)
_CLASSES = (
    "PhiForCausalLM",
    "PhiModel",
    "PhiForSequenceClassification",
    "PhiForTokenClassification",
)
_DEFAULT_CLASS = "PhiForCausalLM"


def layer(hidden: int, inter: int, heads: int, kv_heads: int, d: int, *, qk_norm: bool) -> Part:
    """One `PhiDecoderLayer`, in registration order."""
    return (
        *linear("self_attn.q_proj", heads * d, hidden, "attention", bias=True),
        *linear("self_attn.k_proj", kv_heads * d, hidden, "attention", bias=True),
        *linear("self_attn.v_proj", kv_heads * d, hidden, "attention", bias=True),
        *linear("self_attn.dense", hidden, heads * d, "attention", bias=True),
        *(
            (*layer_norm("self_attn.q_layernorm", d), *layer_norm("self_attn.k_layernorm", d))
            if qk_norm
            else ()
        ),
        *linear("mlp.fc1", inter, hidden, "mlp", bias=True),
        *linear("mlp.fc2", hidden, inter, "mlp", bias=True),
        *layer_norm("input_layernorm", hidden),
    )


def rotary_dim(cfg: Config, head_dim: int) -> int:
    """PhiAttention.rotary_ndims: int(head_dim * partial_rotary_factor)."""
    factor = rope_parameters(cfg).get("partial_rotary_factor")
    if factor is None:
        factor = present(cfg, "partial_rotary_factor")
    if factor is None:
        factor = _DEFAULT_ROTARY
    return int(head_dim * rotary_fraction(factor))


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = cfg.int("hidden_size")
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    kv_heads = int(present(cfg, "num_key_value_heads") or heads)
    inter = cfg.int("intermediate_size")
    vocab = cfg.int("vocab_size")
    d = int(present(cfg, "head_dim") or divide_heads(cfg, hidden, heads))
    rot = rotary_dim(cfg, d)
    qk_norm = flag(cfg, "qk_layernorm")
    backbone = [
        *embedding("embed_tokens", vocab, hidden),
        *stamp_layers(
            [layer(hidden, inter, heads, kv_heads, d, qk_norm=qk_norm)] * layers, "layers"
        ),
        *rotary_buffers("rotary_emb", rot),
        *layer_norm("final_layernorm", hidden),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "Phi",
        prefix="model",
        backbone=backbone,
        embed="embed_tokens.weight",
        hidden=hidden,
        vocab=vocab,
        lm_bias=True,
    )
    dims = Dims(
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        inter=inter,
    )
    arch = architecture(
        cfg,
        "phi",
        dims,
        extra={"model_class": cls, "rotary_dim": rot, "qk_layernorm": qk_norm},
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


FAMILY = Family(
    name="phi",
    model_types=("phi",),
    tensors=build,
    saved=(
        "transformers' PhiForCausalLM is not modelled (model.implementation litgpt models "
        "LitGPT's GPT for phi-1.5 / phi-2)"
    ),
    peft_targets=("q_proj", "v_proj", "fc1", "fc2"),
)
