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

Saved tensors of GPT-NeoX (`GPTNeoXForCausalLM`, Pythia) in transformers 5.24.

models/gpt_neox/modeling_gpt_neox.py: embed_in -> emb_dropout -> layers (input_layernorm,
query_key_value [fused, per head q|k|v], partial RoPE on the first rotary_dim dims, attention
core, dense, post_attention_dropout; parallel residual: post_attention_layernorm of the
layer's *input*, dense_h_to_4h, act, dense_4h_to_h, post_mlp_dropout) -> final_layer_norm ->
embed_out -> ForCausalLMLoss. Every dropout is `hidden_dropout` except the attention's.
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
from memplan.model.families.record import Family
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Config, Inventory, rotary_fraction

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


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/gpt_neox/modeling_gpt_neox.py"


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """GPT-NeoX's saved tensors, or why they are not modelled."""
    x = arch.extra
    act = str(x.get("hidden_act", "gelu"))
    parallel = bool(x.get("use_parallel_residual", True))
    h, a, d, inner, vocab = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )
    rot = int(x.get("rotary_dim", d))
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop_hidden = dropout_on(st, x, "hidden_dropout", default=0.0)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    embeddings = [kernels.embedding_indices("embed_in.indices", (b, s))]
    if drop_hidden:
        embeddings.append(kernels.dropout("emb_dropout.mask", (b, s, h), st.stream, st))
    rope = kernels.rotary_tables(s, rot, st.stream, SRC)

    layer = kernels.layer_norm("input_layernorm", t, h, st.stream, st)
    ln_out = kernels.layer_norm_dtype(st, st.stream)
    layer += kernels.linear_inputs(["attention.query_key_value"], t, h, ln_out, st)
    layer += kernels.weight_casts(
        [
            ("attention.query_key_value", (3 * h, h)),
            ("attention.dense", (h, h)),
            ("mlp.dense_h_to_4h", (inner, h)),
            ("mlp.dense_4h_to_h", (h, inner)),
        ],
        st,
    )
    # apply_rotary_pos_emb: cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass]) makes q and k
    # new tensors (promoted with cos's dtype); v stays a view of the query_key_value output.
    qk = promote(mm, st.stream)
    # eager reads only q's and v's dtypes; the layout flags are SDPA's.
    qkv = attention.Qkv(q=qk, k=qk, v=mm, q_contiguous=True)
    core = attention.core(
        st, heads, qkv, dropout_on=drop_attn, source=SRC + "::eager_attention_forward"
    )
    core = _value_is_qkv_view(core, t, h, mm)
    tail: list[Saved] = []
    if drop_hidden:
        tail.append(kernels.dropout("post_attention_dropout.mask", (b, s, h), mm, st))
    if parallel:
        # post_attention_layernorm reads the layer's input, which input_layernorm already
        # saved: only its mean and rstd are new.
        tail += kernels.layer_norm("post_attention_layernorm", t, h, st.stream, st)[1:]
        ln2_in = st.stream
    else:
        ln2_in = promote(st.stream, mm)
        tail += kernels.layer_norm("post_attention_layernorm", t, h, ln2_in, st)
    tail += kernels.linear_inputs(
        ["mlp.dense_h_to_4h"], t, h, kernels.layer_norm_dtype(st, ln2_in), st
    )
    mlp = mlp_act("mlp.act", t, inner, act, st, out_name="mlp.dense_4h_to_h")
    if mlp is None:
        return f"hidden_act {act!r} has no rule"
    tail += mlp
    if drop_hidden:
        tail.append(kernels.dropout("post_mlp_dropout.mask", (b, s, h), mm, st))

    post = promote(st.stream, mm)
    head = kernels.layer_norm_head("final_layer_norm", "embed_out", t, h, vocab, post, st)
    return Model(
        embeddings=tuple(embeddings),
        per_forward=tuple(rope),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
    )


def _value_is_qkv_view(
    core: attention.Core, tokens: int, hidden: int, dtype: str
) -> attention.Core:
    """v is a chunk of the query_key_value output, so whoever keeps v itself, 4-D (a fused SDPA
    kernel; a checkpoint of the core; a matmul at batch 1, attention.bmm_reshape_is_view)
    keeps that whole output [tokens, 3 x hidden]."""

    def widen(saved: tuple[Saved, ...]) -> tuple[Saved, ...]:
        return tuple(
            kernels.saved(
                "attention.query_key_value.output",
                (tokens, 3 * hidden),
                s.dtype,
                s.saved_by,
                s.source,
            )
            if s.name == "attn.value" and s.dtype == dtype and len(s.shape) == 4
            else s
            for s in saved
        )

    return attention.Core(
        core=widen(core.core), inputs=widen(core.inputs), output=core.output, views=core.views
    )


FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    tensors=build,
    saved=saved,
    peft_targets=("query_key_value",),
)
