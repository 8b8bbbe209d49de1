"""GPT-2 (model_type "gpt2").

Layout of transformers 5.24 `models/gpt2/modeling_gpt2.py`: `GPT2Model` holds `wte` [V, H],
`wpe` [n_positions, H], blocks `h.{i}` (`GPT2Block`: ln_1, attn, ln_2, [crossattention,
ln_cross_attn], mlp) and `ln_f`. `GPT2Attention` and `GPT2MLP` use `Conv1D`
(`pytorch_utils.py`), whose weight is [in, out], the transpose of `nn.Linear`: `c_attn` [H, 3H]
(fused q, k, v), `c_proj` [H, H], `c_fc` [H, n_inner], `mlp.c_proj` [n_inner, H].
`n_inner: null` means 4 * H (`GPT2Block.__init__`).

Class: `architectures[0]` when it is one of `_CLASSES`, else `GPT2LMHeadModel` (what both
`AutoModelForCausalLM` and `AutoModelForPreTraining` build). `lm_head` is tied to `wte` when
`tie_word_embeddings` (default True in `configuration_gpt2.py`).

Buffers: none. transformers 5.x dropped the `attn.bias` causal-mask and `attn.masked_bias`
buffers that 4.x registered in every `GPT2Attention` (the mask is built per forward).

Saved tensors of GPT-2 (`GPT2LMHeadModel`) in transformers 5.24.

models/gpt2/modeling_gpt2.py: wte + wpe -> drop -> blocks (ln_1, c_attn [fused q/k/v],
attention core, c_proj, resid_dropout, residual, ln_2, c_fc, act, mlp.c_proj, dropout,
residual) -> ln_f -> lm_head (tied to wte) -> ForCausalLMLoss. `Conv1D` is
`torch.addmm(bias, x.view(-1, in), weight)` (pytorch_utils.py): it saves x and the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import (
    causal_head,
    conv1d,
    embedding,
    flag,
    head_kind,
    layer_norm,
    num_labels,
    pick_class,
    with_causal_head,
)
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
from memplan.model.families.record import Family, ModelEnds
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Config, Inventory

# configuration_gpt2.py: GPT2Config defaults and attribute_map.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "summary_use_proj": True,
    "summary_proj_to_labels": True,
}
_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}
_CLASSES = (
    "GPT2LMHeadModel",
    "GPT2Model",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)
_DEFAULT_CLASS = "GPT2LMHeadModel"


def attention_tensors(prefix: str, hidden: int, *, cross: bool) -> Part:
    """`GPT2Attention`: c_attn [H, 3H]; cross-attention: c_attn [H, 2H] (k, v) and q_attn [H, H]."""
    if cross:
        return (
            *conv1d(f"{prefix}.c_attn", hidden, 2 * hidden, "attention"),
            *conv1d(f"{prefix}.q_attn", hidden, hidden, "attention"),
            *conv1d(f"{prefix}.c_proj", hidden, hidden, "attention"),
        )
    return (
        *conv1d(f"{prefix}.c_attn", hidden, 3 * hidden, "attention"),
        *conv1d(f"{prefix}.c_proj", hidden, hidden, "attention"),
    )


def block(hidden: int, inner: int, *, cross: bool) -> Part:
    """One `GPT2Block`, in registration order."""
    cross_part: Part = ()
    if cross:
        cross_part = (
            *attention_tensors("crossattention", hidden, cross=True),
            *layer_norm("ln_cross_attn", hidden),
        )
    return (
        *layer_norm("ln_1", hidden),
        *attention_tensors("attn", hidden, cross=False),
        *layer_norm("ln_2", hidden),
        *cross_part,
        *conv1d("mlp.c_fc", hidden, inner, "mlp"),
        *conv1d("mlp.c_proj", inner, hidden, "mlp"),
    )


def double_heads_summary(cfg: Config, hidden: int) -> Part:
    """`GPT2DoubleHeadsModel.multiple_choice_head` (`GPT2SequenceSummary`).

    The class sets `config.num_labels = 1`, so with `summary_use_proj` and
    `summary_proj_to_labels` the projection is [1, H], else [H, H]; none without
    `summary_use_proj`.
    """
    if not flag(cfg, "summary_use_proj"):
        return ()
    out = 1 if flag(cfg, "summary_proj_to_labels") else hidden
    return linear("multiple_choice_head.summary", out, hidden, "head", bias=True)


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, aliases=_ALIASES, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = cfg.int("n_embd")
    layers = cfg.int("n_layer")
    heads = cfg.int("n_head")
    vocab = cfg.int("vocab_size")
    positions = cfg.int("n_positions")
    inner = int_or(cfg, "n_inner", 4 * hidden)  # GPT2Block: n_inner None -> 4 * hidden
    cross = flag(cfg, "add_cross_attention")
    tie = flag(cfg, "tie_word_embeddings")

    backbone = [
        *embedding("wte", vocab, hidden),
        *embedding("wpe", positions, hidden, "position"),
        *stamp_layers([block(hidden, inner, cross=cross)] * layers, "h"),
        *layer_norm("ln_f", hidden),
    ]
    if cls == "GPT2DoubleHeadsModel":
        kind = "lm"
        head: Part = (
            *causal_head("lm", hidden=hidden, vocab=vocab, labels=0),
            *double_heads_summary(cfg, hidden),
        )
    else:
        kind = head_kind(cls, "GPT2")
        head = causal_head(kind, hidden=hidden, vocab=vocab, labels=num_labels(cfg))
    tensors, tied = with_causal_head(
        kind=kind, prefix="transformer", backbone=backbone, embed="wte.weight", head=head, tie=tie
    )
    arch = architecture(
        cfg,
        str(config.get("model_type", "gpt2")),  # "gpt-sw3" builds GPT-2 too (FAMILY below)
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=inner),
        max_positions=positions,
        extra={"model_class": cls, "add_cross_attention": cross},
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/gpt2/modeling_gpt2.py"
# GPT2Config defaults (configuration_gpt2.py): every dropout is 0.1, act gelu_new.
DROPOUT_DEFAULT = 0.1
DROPOUT_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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


FAMILY = Family(
    name="gpt2",
    # transformers 5.25 models/auto/configuration_auto.py maps "gpt-sw3" to GPT2Config (and
    # modeling_auto.py to GPT2LMHeadModel): GPT-2 under another model_type
    # (tests/test_families_registry.py holds the aliases to transformers' mapping).
    model_types=("gpt2", "gpt-sw3"),
    tensors=build,
    saved=saved,
    peft_targets=("c_attn",),
    # models/gpt2/modeling_gpt2.py: the attention and MLP projections are Conv1D.
    conv1d=frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    lora_ends=ModelEnds(
        layer="gpt2",
        embeddings=(("wte", "transformer.wte"), ("wpe", "transformer.wpe")),
        final_norm="transformer.ln_f",
        final_prefix="ln_f",
        rms_norm=False,
    ),
)
