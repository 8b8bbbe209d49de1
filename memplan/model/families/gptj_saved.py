"""Saved tensors of GPT-J (`GPTJForCausalLM`) in transformers 5.24.

models/gptj/modeling_gptj.py: wte -> drop -> blocks (ln_1; attention: q/k/v_proj, RoPE on the
first rotary_dim dims of each head (`apply_rotary_pos_emb` repeats sin and cos per call),
q/k cat back, attention core, out_proj, resid_dropout; in parallel the MLP of the same ln_1
output: fc_in, act, fc_out, dropout; attn + mlp + residual) -> ln_f -> lm_head ->
ForCausalLMLoss. Every dropout defaults to 0 (GPTJConfig).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.families.gpt2_saved import mlp_act
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/gptj/modeling_gptj.py"


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """GPT-J's saved tensors, or why they are not modelled."""
    x = arch.extra
    act = str(x.get("activation_function", "gelu_new"))
    h, a, d, inner, vocab = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )
    rot = int(x.get("rotary_dim", 64))
    if rot > d:
        return "GPT-J with rotary_dim beyond head_dim (rotary_dim 0 or null) has no rule"
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop_embd = dropout_on(st, x, "embd_pdrop", default=0.0)
    drop_attn = dropout_on(st, x, "attn_pdrop", default=0.0)
    drop_resid = dropout_on(st, x, "resid_pdrop", default=0.0)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    embeddings = [kernels.embedding_indices("wte.indices", (b, s))]
    if drop_embd:
        embeddings.append(kernels.dropout("drop.mask", (b, s, h), st.stream, st))

    layer = kernels.layer_norm("ln_1", t, h, st.stream, st)
    ln_out = kernels.layer_norm_dtype(st, st.stream)
    layer += kernels.linear_inputs(
        ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"], t, h, ln_out, st
    )
    layer += kernels.weight_casts(
        [
            ("attn.k_proj", (a * d, h)),
            ("attn.v_proj", (a * d, h)),
            ("attn.q_proj", (a * d, h)),
            ("attn.out_proj", (h, a * d)),
            ("mlp.fc_in", (inner, h)),
            ("mlp.fc_out", (h, inner)),
        ],
        st,
    )
    # apply_rotary_pos_emb(k_rot), then (q_rot): each call repeat_interleaves sin and cos to
    # [1, s, 1, rotary_dim] (new tensors, the embeddings' dtype) and the multiplies save them.
    layer += [
        kernels.saved(f"attn.rotary.{p}_{n}", (1, s, 1, rot), st.stream, "MulBackward0", SRC)
        for p in ("key", "query")
        for n in ("cos", "sin")
    ]
    qk = promote(mm, st.stream)  # cat([rotated, pass]): new [b, s, heads, d] tensors
    if st.attention == "eager":
        # eager_attention_forward: matmul(query.to(fp32), key.to(fp32)^T) (autocast casts them
        # back to its dtype), softmax in the scores' dtype, `.to(value.dtype)`.
        core = attention.eager(
            st,
            heads,
            attention.Qkv(q=qk, k=qk, v=mm),
            softmax_fp32=True,
            convert_to_query=False,
            dropout_on=drop_attn,
            source=SRC + "::eager_attention_forward",
        )
        qk_mm = mm if st.autocast else kernels.FP32
        core = replace(
            core,
            core=tuple(
                replace(s, dtype=qk_mm) if s.name in ("attn.query", "attn.key_t") else s
                for s in core.core
            ),
        )
    else:
        core = attention.sdpa(st, heads, attention.Qkv(q=qk, k=qk, v=mm), dropout_on=drop_attn)

    tail: list[Saved] = []
    if drop_resid:
        tail.append(kernels.dropout("attn.resid_dropout.mask", (b, s, h), mm, st))
    mlp = mlp_act("mlp.act", t, inner, act, st, out_name="mlp.fc_out")
    if mlp is None:
        return f"activation_function {act!r} has no rule"
    tail += mlp
    if drop_resid:
        tail.append(kernels.dropout("mlp.dropout.mask", (b, s, h), mm, st))

    post = promote(st.stream, mm)  # attn + mlp outputs + residual
    head = kernels.layer_norm_head("ln_f", "lm_head", t, h, vocab, post, st)
    return Model(
        embeddings=tuple(embeddings),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
    )
