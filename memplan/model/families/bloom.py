"""BLOOM (model_type "bloom").

Layout of transformers 5.24 `models/bloom/modeling_bloom.py`: `BloomModel` holds
`word_embeddings` [V, H], `word_embeddings_layernorm`, blocks `h.{i}` (`BloomBlock`:
input_layernorm, self_attention, post_attention_layernorm, mlp) and `ln_f`. `BloomAttention`
fuses q, k and v into `query_key_value` [3H, H] (bias) and projects back with `dense` [H, H]
(bias); `BloomMLP` is `dense_h_to_4h` [4H, H] and `dense_4h_to_h` [H, 4H], both with bias (the
4 is hard-coded). `lm_head` is tied to `word_embeddings` by default (`tie_word_embeddings: True`
in `configuration_bloom.py`).

Positions are ALiBi slopes computed per forward (`build_alibi_tensor`): no position embedding,
no buffers. A legacy `n_embed` key overrides `hidden_size` (`BloomConfig.__post_init__`).

Class: `architectures[0]` when it is one of `_CLASSES`, else `BloomForCausalLM`
(`AutoModelForCausalLM`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import embedding, layer_norm, pick_class, with_class_head
from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    assemble,
    int_or,
    linear,
    resolve,
    stamp_layers,
)
from memplan.model.inventory import Inventory

# configuration_bloom.py: BloomConfig defaults and attribute_map.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 250880,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 8,
    "tie_word_embeddings": True,
}
_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
_MLP_RATIO = 4  # BloomMLP: nn.Linear(hidden_size, 4 * hidden_size)
_CLASSES = (
    "BloomForCausalLM",
    "BloomModel",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)
_DEFAULT_CLASS = "BloomForCausalLM"


def block(hidden: int) -> Part:
    """One `BloomBlock`, in registration order."""
    inter = _MLP_RATIO * hidden
    return (
        *layer_norm("input_layernorm", hidden),
        *linear("self_attention.query_key_value", 3 * hidden, hidden, "attention", bias=True),
        *linear("self_attention.dense", hidden, hidden, "attention", bias=True),
        *layer_norm("post_attention_layernorm", hidden),
        *linear("mlp.dense_h_to_4h", inter, hidden, "mlp", bias=True),
        *linear("mlp.dense_4h_to_h", hidden, inter, "mlp", bias=True),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, aliases=_ALIASES, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = int_or(cfg, "n_embed", cfg.int("hidden_size"))  # legacy n_embed wins
    layers = cfg.int("n_layer")
    heads = cfg.int("n_head")
    vocab = cfg.int("vocab_size")

    backbone = [
        *embedding("word_embeddings", vocab, hidden),
        *layer_norm("word_embeddings_layernorm", hidden),
        *stamp_layers([block(hidden)] * layers, "h"),
        *layer_norm("ln_f", hidden),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "Bloom",
        prefix="transformer",
        backbone=backbone,
        embed="word_embeddings.weight",
        hidden=hidden,
        vocab=vocab,
    )
    arch = architecture(
        cfg,
        "bloom",
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=_MLP_RATIO * hidden),
        max_positions=0,  # ALiBi: no learned or rotary positions, no length limit
        extra={"model_class": cls, "alibi": True},
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)
