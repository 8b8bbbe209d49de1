"""Falcon (model_type "falcon").

Layout of transformers 5.24 `models/falcon/modeling_falcon.py`: `FalconModel` holds
`word_embeddings` [V, H], blocks `h.{i}` (`FalconDecoderLayer`), `ln_f` and `rotary_emb`.

`FalconAttention.query_key_value` fuses q, k and v; its output width is
- `new_decoder_architecture` (Falcon-40B/180B): (2 * num_kv_heads + heads) * head_dim,
- else `multi_query` (Falcon-7B, the class default): H + 2 * head_dim (one shared k/v head),
- else 3 * H;
then `dense` [H, H]. `FalconMLP` is `dense_h_to_4h` [ffn_hidden_size, H] and `dense_4h_to_h`
(`ffn_hidden_size: null` means 4 * H). All these Linears have a bias only when `bias`
(default False). head_dim is H // heads (`FalconConfig.head_dim`), `num_kv_heads: null` = heads.

The LayerNorms are registered after attention and MLP (`FalconDecoderLayer.__init__`):
- not `parallel_attn`: `post_attention_layernorm`, then `input_layernorm`;
- `parallel_attn` with `num_ln_in_parallel_attn == 2` (the default under
  `new_decoder_architecture`): `ln_attn`, `ln_mlp`;
- else one `input_layernorm`.

Buffers: `rotary_emb.inv_freq` / `original_inv_freq` (fp32, non-persistent) over head_dim dims
(`FalconRotaryEmbedding.compute_default_rope_parameters`; other rope types use
int(head_dim * partial_rotary_factor)). They exist even with `alibi: true`, which only changes the
forward. `lm_head` is tied to `word_embeddings` by default (`tie_word_embeddings: True` in
`configuration_falcon.py`). A legacy `n_embed` key overrides `hidden_size`.

Class: `architectures[0]` when it is one of `_CLASSES`, else `FalconForCausalLM`
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
    int_or,
    linear,
    present,
    resolve,
    rotary_buffers,
    rotary_dim,
    stamp_layers,
)
from memplan.model.inventory import Config, Inventory

# configuration_falcon.py: FalconConfig defaults. A null flag reads as False in the model code
# (`if config.multi_query:`), which `flag` reproduces.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65024,
    "hidden_size": 4544,
    "num_hidden_layers": 32,
    "num_attention_heads": 71,
    "num_ln_in_parallel_attn": None,
    "num_kv_heads": None,
    "alibi": False,
    "new_decoder_architecture": False,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "max_position_embeddings": 2048,
    "ffn_hidden_size": None,
    "tie_word_embeddings": True,
}
_CLASSES = (
    "FalconForCausalLM",
    "FalconModel",
    "FalconForSequenceClassification",
    "FalconForTokenClassification",
    "FalconForQuestionAnswering",
)
_DEFAULT_CLASS = "FalconForCausalLM"


def qkv_width(cfg: Config, hidden: int, heads: int, kv_heads: int) -> int:
    """Output features of `FalconAttention.query_key_value`."""
    head_dim = hidden // heads
    if flag(cfg, "new_decoder_architecture"):
        return (2 * kv_heads + heads) * head_dim
    if flag(cfg, "multi_query"):
        return hidden + 2 * head_dim
    return 3 * hidden


def effective_kv_heads(cfg: Config, heads: int, num_kv_heads: int) -> int:
    """K/V heads the attention actually has: 1 under old-style multi_query."""
    if flag(cfg, "new_decoder_architecture") or not flag(cfg, "multi_query"):
        return num_kv_heads
    return 1


def norms(cfg: Config, hidden: int) -> Part:
    """The LayerNorms of one `FalconDecoderLayer`, in registration order."""
    num_ln = present(cfg, "num_ln_in_parallel_attn")
    if num_ln is None and flag(cfg, "new_decoder_architecture"):
        num_ln = 2
    if not flag(cfg, "parallel_attn"):
        return (
            *layer_norm("post_attention_layernorm", hidden),
            *layer_norm("input_layernorm", hidden),
        )
    if num_ln == 2:
        return (*layer_norm("ln_attn", hidden), *layer_norm("ln_mlp", hidden))
    return layer_norm("input_layernorm", hidden)


def layer(cfg: Config, hidden: int, qkv: int, ffn: int) -> Part:
    """One `FalconDecoderLayer`, in registration order."""
    bias = flag(cfg, "bias")
    return (
        *linear("self_attention.query_key_value", qkv, hidden, "attention", bias=bias),
        *linear("self_attention.dense", hidden, hidden, "attention", bias=bias),
        *linear("mlp.dense_h_to_4h", ffn, hidden, "mlp", bias=bias),
        *linear("mlp.dense_4h_to_h", hidden, ffn, "mlp", bias=bias),
        *norms(cfg, hidden),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = int_or(cfg, "n_embed", cfg.int("hidden_size"))  # legacy n_embed wins
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    vocab = cfg.int("vocab_size")
    head_dim = hidden // heads
    num_kv_heads = int_or(cfg, "num_kv_heads", heads)
    ffn = int_or(cfg, "ffn_hidden_size", 4 * hidden)
    qkv = qkv_width(cfg, hidden, heads, num_kv_heads)

    backbone = [
        *embedding("word_embeddings", vocab, hidden),
        *stamp_layers([layer(cfg, hidden, qkv, ffn)] * layers, "h"),
        *layer_norm("ln_f", hidden),
        *rotary_buffers(
            "rotary_emb",
            # head_dim for the default rope; int(head_dim * partial_rotary_factor) for the others
            rotary_dim(rope_parameters(cfg), head_dim, default_is_partial=False),
            role="rotary",
        ),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "Falcon",
        prefix="transformer",
        backbone=backbone,
        embed="word_embeddings.weight",
        hidden=hidden,
        vocab=vocab,
    )
    dims = Dims(
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        heads=heads,
        kv_heads=effective_kv_heads(cfg, heads, num_kv_heads),
        head_dim=head_dim,
        inter=ffn,
    )
    arch = architecture(
        cfg,
        "falcon",
        dims,
        extra={
            "model_class": cls,
            "new_decoder_architecture": flag(cfg, "new_decoder_architecture"),
            "multi_query": flag(cfg, "multi_query"),
            "parallel_attn": flag(cfg, "parallel_attn"),
            "alibi": flag(cfg, "alibi"),
            "bias": flag(cfg, "bias"),
            "num_ln_in_parallel_attn": present(cfg, "num_ln_in_parallel_attn"),
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)
