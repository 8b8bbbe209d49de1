"""Saved tensors of GPT-NeoX (`GPTNeoXForCausalLM`, Pythia) in transformers 5.24.

models/gpt_neox/modeling_gpt_neox.py: embed_in -> emb_dropout -> layers (input_layernorm,
query_key_value [fused, per head q|k|v], partial RoPE on the first rotary_dim dims, attention
core, dense, post_attention_dropout; parallel residual: post_attention_layernorm of the
layer's *input*, dense_h_to_4h, act, dense_4h_to_h, post_mlp_dropout) -> final_layer_norm ->
embed_out -> ForCausalLMLoss. Every dropout is `hidden_dropout` except the attention's.
"""

from __future__ import annotations

from memplan.model.families.gpt2_saved import mlp_act
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/gpt_neox/modeling_gpt_neox.py"


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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

    return attention.Core(core=widen(core.core), inputs=widen(core.inputs), output=core.output)
