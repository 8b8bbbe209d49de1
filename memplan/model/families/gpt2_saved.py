"""Saved tensors of GPT-2 (`GPT2LMHeadModel`) in transformers 5.24.

models/gpt2/modeling_gpt2.py: wte + wpe -> drop -> blocks (ln_1, c_attn [fused q/k/v],
attention core, c_proj, resid_dropout, residual, ln_2, c_fc, act, mlp.c_proj, dropout,
residual) -> ln_f -> lm_head (tied to wte) -> ForCausalLMLoss. `Conv1D` is
`torch.addmm(bias, x.view(-1, in), weight)` (pytorch_utils.py): it saves x and the weight.
"""

from __future__ import annotations

from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/gpt2/modeling_gpt2.py"
# GPT2Config defaults (configuration_gpt2.py): every dropout is 0.1, act gelu_new.
DROPOUT_DEFAULT = 0.1
DROPOUT_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")


def mlp_act(
    prefix: str, tokens: int, width: int, act: str, st: Setting, *, out_name: str = "mlp.c_proj"
) -> list[Saved] | None:
    """The MLP activation and the input of the linear after it, `out_name` (None: no rule
    for `act`)."""
    mm = st.matmul
    if act == "gelu_new":
        out = kernels.gelu_new(prefix, tokens, width, mm, st)
        return out + kernels.linear_inputs(
            [out_name], tokens, width, kernels.gelu_new_out(mm, st), st
        )
    saves_input = kernels.act_saves_input(act)
    if saves_input is None:
        return None
    c_proj = kernels.linear_inputs([out_name], tokens, width, mm, st)
    if not saves_input:
        return c_proj  # relu saves its output: the same storage c_proj saves
    return [kernels.saved(f"{prefix}.input", (tokens, width), mm, "GeluBackward0", SRC), *c_proj]


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """GPT-2's saved tensors, or why they are not modelled."""
    x = arch.extra
    if x.get("reorder_and_upcast_attn"):
        return "GPT-2 reorder_and_upcast_attn has no rule"
    act = str(x.get("activation_function", "gelu_new"))
    h, a, d, inner, vocab = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop_embd = dropout_on(st, x, "embd_pdrop", default=DROPOUT_DEFAULT)
    drop_attn = dropout_on(st, x, "attn_pdrop", default=DROPOUT_DEFAULT)
    drop_resid = dropout_on(st, x, "resid_pdrop", default=DROPOUT_DEFAULT)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    embeddings = [
        kernels.embedding_indices("wte.indices", (b, s)),
        kernels.embedding_indices("wpe.indices", (1, s)),  # position_ids [1, s]
    ]
    if drop_embd:
        embeddings.append(kernels.dropout("drop.mask", (b, s, h), st.stream, st))

    layer = kernels.layer_norm("ln_1", t, h, st.stream, st)
    ln_out = kernels.layer_norm_dtype(st, st.stream)
    layer += kernels.linear_inputs(["attn.c_attn"], t, h, ln_out, st)
    layer += kernels.weight_casts(
        [
            ("attn.c_attn", (h, 3 * h)),
            ("attn.c_proj", (h, h)),
            ("mlp.c_fc", (h, inner)),
            ("mlp.c_proj", (inner, h)),
        ],
        st,
    )
    qkv = attention.Qkv(q=mm, k=mm, v=mm, fused=True)
    core = attention.core(
        st,
        heads,
        qkv,
        dropout_on=drop_attn,
        source=SRC + "::eager_attention_forward",
        softmax_fp32=False,
        convert_to_query=False,
    )
    tail: list[Saved] = []
    if drop_resid:
        tail.append(kernels.dropout("attn.resid_dropout.mask", (b, s, h), mm, st))
    post = promote(st.stream, mm)
    tail += kernels.layer_norm("ln_2", t, h, post, st)
    tail += kernels.linear_inputs(["mlp.c_fc"], t, h, kernels.layer_norm_dtype(st, post), st)
    act_saved = mlp_act("mlp.act", t, inner, act, st)
    if act_saved is None:
        return f"activation_function {act!r} has no rule"
    tail += act_saved
    if drop_resid:
        tail.append(kernels.dropout("mlp.dropout.mask", (b, s, h), mm, st))

    head = kernels.layer_norm_head("ln_f", "lm_head", t, h, vocab, post, st)
    # GPT2Model passes the causal mask to each block positionally, so a checkpointed block
    # saves it: the eager mask [b, 1, s, s] in the stream dtype (SDPA's is None).
    mask = (
        (kernels.saved("checkpoint.causal_mask", (b, 1, s, s), st.stream, "Noop", SRC),)
        if st.attention == "eager"
        else ()
    )
    return Model(
        embeddings=tuple(embeddings),
        checkpoint_args=mask,
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
        notes=(dropout_note(st, x, DROPOUT_KEYS, "GPT2Config (0.1)"),),
    )
