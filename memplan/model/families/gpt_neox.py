"""GPT-NeoX and Pythia (model_type "gpt_neox").

Layout of transformers 5.24 `models/gpt_neox/modeling_gpt_neox.py`: `GPTNeoXModel` holds
`embed_in` [V, H], layers `layers.{i}` (`GPTNeoXLayer`: input_layernorm, post_attention_layernorm,
attention, mlp), `final_layer_norm` and `rotary_emb`. `GPTNeoXAttention` fuses q, k and v into
`query_key_value` [3H, H] and projects back with `dense` [H, H], both with bias when
`attention_bias` (default True); `GPTNeoXMLP` is `dense_h_to_4h` [I, H] and `dense_4h_to_h`
[H, I] with bias. `GPTNeoXForCausalLM.embed_out` of 4.x is `lm_head` in 5.x, untied by default
(`tie_word_embeddings: False` in `configuration_gpt_neox.py`).

Buffers: `rotary_emb.inv_freq` and `original_inv_freq`, fp32, non-persistent, over
`int(head_dim * partial_rotary_factor)` dims
(`GPTNeoXRotaryEmbedding.compute_default_rope_parameters`); the factor comes from
`rope_parameters` / `rope_scaling`, else the legacy `rotary_pct` key, else 0.25
(`GPTNeoXConfig.convert_rope_params_to_dict`).

Class: `architectures[0]` when it is one of `_CLASSES`, else `GPTNeoXForCausalLM`
(`AutoModelForCausalLM`).
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
    linear,
    present,
    resolve,
    rotary_buffers,
    stamp_layers,
)
from memplan.model.inventory import Config, Inventory, rotary_fraction

# configuration_gpt_neox.py: GPTNeoXConfig defaults.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50432,
    "hidden_size": 6144,
    "num_hidden_layers": 44,
    "num_attention_heads": 64,
    "intermediate_size": 24576,
    "max_position_embeddings": 2048,
    "attention_bias": True,
    "tie_word_embeddings": False,
}
_DEFAULT_ROTARY_PCT = 0.25  # GPTNeoXConfig.convert_rope_params_to_dict: rotary_pct default
_CLASSES = (
    "GPTNeoXForCausalLM",
    "GPTNeoXModel",
    "GPTNeoXForSequenceClassification",
    "GPTNeoXForTokenClassification",
    "GPTNeoXForQuestionAnswering",
)
_DEFAULT_CLASS = "GPTNeoXForCausalLM"


def layer(hidden: int, inter: int, *, bias: bool) -> Part:
    """One `GPTNeoXLayer`, in registration order."""
    return (
        *layer_norm("input_layernorm", hidden),
        *layer_norm("post_attention_layernorm", hidden),
        *linear("attention.query_key_value", 3 * hidden, hidden, "attention", bias=bias),
        *linear("attention.dense", hidden, hidden, "attention", bias=bias),
        *linear("mlp.dense_h_to_4h", inter, hidden, "mlp", bias=True),
        *linear("mlp.dense_4h_to_h", hidden, inter, "mlp", bias=True),
    )


def rotary_dim(cfg: Config, head_dim: int) -> int:
    """int(head_dim * partial_rotary_factor): every rope type of this family honours the factor."""
    factor = rope_parameters(cfg).get("partial_rotary_factor")
    if factor is None:
        factor = present(cfg, "rotary_pct")
    if factor is None:
        factor = _DEFAULT_ROTARY_PCT
    return int(head_dim * rotary_fraction(factor))


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = cfg.int("hidden_size")
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    inter = cfg.int("intermediate_size")
    vocab = cfg.int("vocab_size")
    head_dim = hidden // heads  # GPTNeoXAttention: head_size = hidden_size // num_attention_heads
    # compute_default_rope_parameters reads `config.head_dim` when a config sets one.
    rot = rotary_dim(cfg, int(present(cfg, "head_dim") or head_dim))
    bias = flag(cfg, "attention_bias")

    backbone = [
        *embedding("embed_in", vocab, hidden),
        *stamp_layers([layer(hidden, inter, bias=bias)] * layers, "layers"),
        *layer_norm("final_layer_norm", hidden),
        *rotary_buffers("rotary_emb", rot, role="rotary"),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "GPTNeoX",
        prefix="gpt_neox",
        backbone=backbone,
        embed="embed_in.weight",
        hidden=hidden,
        vocab=vocab,
    )
    arch = architecture(
        cfg,
        "gpt_neox",
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=inter),
        extra={
            "model_class": cls,
            "rotary_dim": rot,
            "use_parallel_residual": cfg.get("use_parallel_residual", True),
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)
