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

Saved tensors of GPT-J (`GPTJForCausalLM`) in transformers 5.24.

models/gptj/modeling_gptj.py: wte -> drop -> blocks (ln_1; attention: q/k/v_proj, RoPE on the
first rotary_dim dims of each head (`apply_rotary_pos_emb` repeats sin and cos per call),
q/k cat back, attention core, out_proj, resid_dropout; in parallel the MLP of the same ln_1
output: fc_in, act, fc_out, dropout; attn + mlp + residual) -> ln_f -> lm_head ->
ForCausalLMLoss. Every dropout defaults to 0 (GPTJConfig).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
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
from memplan.model.families.record import Family
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

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


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/gptj/modeling_gptj.py"


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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


FAMILY = Family(
    name="gptj",
    model_types=("gptj",),
    tensors=build,
    saved=saved,
    peft_targets=("q_proj", "v_proj"),
)
