"""GPT-J (model_type "gptj").

Layout of transformers 5.24 `models/gptj/modeling_gptj.py`: `GPTJModel` holds `wte` [V, H],
blocks `h.{i}` (`GPTJBlock`: ln_1, attn, mlp; attention and MLP run in parallel off one
LayerNorm), `ln_f` and `rotary_emb`. `GPTJAttention` has separate bias-free `k_proj`, `v_proj`,
`q_proj`, `out_proj` [H, H] (registered in that order); `GPTJMLP` is `fc_in` [n_inner, H] and
`fc_out` [H, n_inner] with bias, `n_inner: null` meaning 4 * H (`GPTJBlock.__init__`).
`GPTJForCausalLM.lm_head` is `nn.Linear(H, V)` *with* a bias; `tie_word_embeddings` (default False
in `configuration_gptj.py`) ties only its weight to `wte`.

Buffers: `rotary_emb.embed_positions` (`GPTJRotaryEmbedding`), the sin/cos table
`create_sinusoidal_positions(n_positions, rotary_dim or H)`: [n_positions, 2 * ceil(dim / 2)],
fp32 (built from an int64 `arange(...).float()`), non-persistent. `rotary_dim` absent means 64
(the class default); `rotary_dim: 0` means the whole hidden size (`config.rotary_dim or
config.hidden_size`; transformers 5 rejects null, memplan reads it as 0).

Class: `architectures[0]` when it is one of `_CLASSES`, else `GPTJForCausalLM`
(`AutoModelForCausalLM`). `GPTJForSequenceClassification` / `GPTJForQuestionAnswering` are the
generic heads of `modeling_layers.py` (`score` without bias, `qa_outputs` [2, H]).
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
    buffer,
    int_or,
    linear,
    resolve,
    stamp_layers,
)
from memplan.model.inventory import Inventory

# configuration_gptj.py: GPTJConfig defaults and attribute_map.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50400,
    "n_positions": 2048,
    "n_embd": 4096,
    "n_layer": 28,
    "n_head": 16,
    "rotary_dim": 64,
    "n_inner": None,
    "tie_word_embeddings": False,
}
_ALIASES = {
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}
_CLASSES = (
    "GPTJForCausalLM",
    "GPTJModel",
    "GPTJForSequenceClassification",
    "GPTJForQuestionAnswering",
)
_DEFAULT_CLASS = "GPTJForCausalLM"


def block(hidden: int, inner: int) -> Part:
    """One `GPTJBlock`, in registration order."""
    return (
        *layer_norm("ln_1", hidden),
        *linear("attn.k_proj", hidden, hidden, "attention", bias=False),
        *linear("attn.v_proj", hidden, hidden, "attention", bias=False),
        *linear("attn.q_proj", hidden, hidden, "attention", bias=False),
        *linear("attn.out_proj", hidden, hidden, "attention", bias=False),
        *linear("mlp.fc_in", inner, hidden, "mlp", bias=True),
        *linear("mlp.fc_out", hidden, inner, "mlp", bias=True),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, aliases=_ALIASES, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = cfg.int("n_embd")
    layers = cfg.int("n_layer")
    heads = cfg.int("n_head")
    vocab = cfg.int("vocab_size")
    positions = cfg.int("n_positions")
    inner = int_or(cfg, "n_inner", 4 * hidden)  # GPTJBlock: n_inner None -> 4 * n_embd
    rot = int_or(cfg, "rotary_dim", hidden) or hidden  # `config.rotary_dim or config.hidden_size`
    sincos = 2 * ((rot + 1) // 2)  # cat(sin, cos) of arange(0, dim, 2) frequencies

    backbone = [
        *embedding("wte", vocab, hidden),
        *stamp_layers([block(hidden, inner)] * layers, "h"),
        *layer_norm("ln_f", hidden),
        buffer(
            "rotary_emb.embed_positions",
            (positions, sincos),
            "rotary",
            dtype="fp32",
            persistent=False,
        ),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "GPTJ",
        prefix="transformer",
        backbone=backbone,
        embed="wte.weight",
        hidden=hidden,
        vocab=vocab,
        lm_bias=True,
    )
    arch = architecture(
        cfg,
        "gptj",
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=inner),
        max_positions=positions,
        extra={"model_class": cls, "rotary_dim": rot},
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)
