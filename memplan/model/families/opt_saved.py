"""Saved tensors of OPT (`OPTForCausalLM`) in transformers 5.24.

models/opt/modeling_opt.py: embed_tokens, embed_positions (learned, indices = cumsum of a
ones mask - 1 + offset 2: a new int64 tensor), project_in (when word_embed_proj_dim differs
from hidden), sum -> layers (self_attn_layer_norm, q/k/v_proj, q scaled, attention core,
out_proj, dropout, residual, final_layer_norm, fc1, act, fc2, dropout, residual) ->
final_layer_norm -> project_out -> lm_head -> ForCausalLMLoss. Pre-norm layers
(`do_layer_norm_before`, every OPT but OPT-350m) only.
"""

from __future__ import annotations

from memplan.model.families.gpt2_saved import mlp_act
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/opt/modeling_opt.py"
# OPTConfig defaults (configuration_opt.py).
DROPOUT_DEFAULT = 0.1


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """OPT's saved tensors, or why they are not modelled."""
    x = arch.extra
    if not x.get("do_layer_norm_before", True):
        return "OPT with post-norm layers (do_layer_norm_before: false, OPT-350m) has no rule"
    act = str(x.get("activation_function", "relu"))
    h, a, d, ffn, vocab = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )
    proj = int(x.get("word_embed_proj_dim", h))
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop = dropout_on(st, x, "dropout", default=DROPOUT_DEFAULT)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    embeddings = [
        kernels.embedding_indices("embed_tokens.indices", (b, s)),
        kernels.embedding_indices("embed_positions.indices", (b, s)),
    ]
    if proj != h:
        embeddings += kernels.linear_inputs(["project_in"], t, proj, st.stream, st)
        embeddings += kernels.weight_casts([("project_in", (h, proj))], st)
    stream = promote(st.stream, mm) if proj != h else st.stream  # inputs_embeds + pos_embeds

    layer = kernels.layer_norm("self_attn_layer_norm", t, h, stream, st)
    ln_out = kernels.layer_norm_dtype(st, stream)
    layer += kernels.linear_inputs(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], t, h, ln_out, st
    )
    layer += kernels.weight_casts(
        [
            ("self_attn.k_proj", (a * d, h)),
            ("self_attn.v_proj", (a * d, h)),
            ("self_attn.q_proj", (a * d, h)),
            ("self_attn.out_proj", (h, a * d)),
            ("fc1", (ffn, h)),
            ("fc2", (h, ffn)),
        ],
        st,
    )
    # q_proj(x) * scaling multiplies by a Python float: nothing saved, q stays in mm.
    qkv = attention.Qkv(q=mm, k=mm, v=mm)
    core = attention.core(
        st,
        heads,
        qkv,
        dropout_on=drop_attn,
        source=SRC + "::eager_attention_forward",
    )

    tail: list[Saved] = []
    if drop:
        tail.append(kernels.dropout("dropout.attn_mask", (b, s, h), mm, st))
    post = promote(stream, mm)
    tail += kernels.layer_norm("final_layer_norm", t, h, post, st)
    tail += kernels.linear_inputs(["fc1"], t, h, kernels.layer_norm_dtype(st, post), st)
    mlp = mlp_act("activation_fn", t, ffn, act, st, out_name="fc2")
    if mlp is None:
        return f"activation_function {act!r} has no rule"
    tail += mlp
    if drop:
        tail.append(kernels.dropout("dropout.mlp_mask", (t, h), mm, st))

    head = kernels.layer_norm("final_layer_norm", t, h, post, st)
    head_in = kernels.layer_norm_dtype(st, post)
    if proj != h:
        head += kernels.linear_inputs(["project_out"], t, h, head_in, st)
        head += kernels.weight_casts([("project_out", (proj, h))], st)
        head_in = mm
    head += kernels.linear_inputs(["lm_head"], t, proj, head_in, st)
    head += kernels.weight_casts([("lm_head", (vocab, proj))], st)
    return Model(
        embeddings=tuple(embeddings),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
        notes=(dropout_note(st, x, ("dropout",), "OPT"),),
    )
