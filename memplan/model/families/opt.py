"""OPT (model_type "opt").

Layout of transformers 5.24 `models/opt/modeling_opt.py`: `OPTModel.decoder` (`OPTDecoder`)
holds, in this order, `embed_tokens` [V, word_embed_proj_dim], `embed_positions`
(`OPTLearnedPositionalEmbedding`: [max_position_embeddings + 2, H], the 2 being its fixed
`offset`), `project_out` [word_embed_proj_dim, H] and `project_in` [H, word_embed_proj_dim]
(both bias-free, only when word_embed_proj_dim != H, as in OPT-350m), `final_layer_norm` (only
when `do_layer_norm_before` and not `_remove_final_layer_norm`), then layers `layers.{i}`
(`OPTDecoderLayer`: self_attn k/v/q/out_proj [H, H], self_attn_layer_norm, fc1 [ffn_dim, H],
fc2 [H, ffn_dim], final_layer_norm). Linear biases follow `enable_bias`, LayerNorm weights
`layer_norm_elementwise_affine` (both default True). `word_embed_proj_dim: null` means H
(`OPTConfig.__post_init__`).

Heads see word_embed_proj_dim, not H: `OPTForCausalLM.lm_head` [V, word_embed_proj_dim],
tied to `embed_tokens` by default (`tie_word_embeddings: True`), `score`
[num_labels, word_embed_proj_dim], `qa_outputs` [2, word_embed_proj_dim].

Class: `architectures[0]` when it is one of `_CLASSES`, else `OPTForCausalLM`
(`AutoModelForCausalLM`). No buffers.

Saved tensors of OPT (`OPTForCausalLM`) in transformers 5.24.

models/opt/modeling_opt.py: embed_tokens, embed_positions (learned, indices = cumsum of a
ones mask - 1 + offset 2: a new int64 tensor), project_in (when word_embed_proj_dim differs
from hidden), sum -> layers (self_attn_layer_norm, q/k/v_proj, q scaled, attention core,
out_proj, dropout, residual, final_layer_norm, fc1, act, fc2, dropout, residual) ->
final_layer_norm -> project_out -> lm_head -> ForCausalLMLoss. Pre-norm layers
(`do_layer_norm_before`, every OPT but OPT-350m) only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import (
    embedding,
    flag,
    layer_norm,
    pick_class,
    prefixed,
    with_class_head,
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
from memplan.model.families.record import Family
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

# configuration_opt.py: OPTConfig defaults.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50272,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "ffn_dim": 3072,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": True,
    "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None,
    "num_attention_heads": 12,
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
}
_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset: ids shifted by 2 (fairseq padding)
_CLASSES = ("OPTForCausalLM", "OPTModel", "OPTForSequenceClassification", "OPTForQuestionAnswering")
_DEFAULT_CLASS = "OPTForCausalLM"


def layer(hidden: int, ffn: int, *, bias: bool, affine: bool) -> Part:
    """One `OPTDecoderLayer`, in registration order."""
    return (
        *linear("self_attn.k_proj", hidden, hidden, "attention", bias=bias),
        *linear("self_attn.v_proj", hidden, hidden, "attention", bias=bias),
        *linear("self_attn.q_proj", hidden, hidden, "attention", bias=bias),
        *linear("self_attn.out_proj", hidden, hidden, "attention", bias=bias),
        *layer_norm("self_attn_layer_norm", hidden, affine=affine),
        *linear("fc1", ffn, hidden, "mlp", bias=bias),
        *linear("fc2", hidden, ffn, "mlp", bias=bias),
        *layer_norm("final_layer_norm", hidden, affine=affine),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = cfg.int("hidden_size")
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    ffn = cfg.int("ffn_dim")
    vocab = cfg.int("vocab_size")
    positions = cfg.int("max_position_embeddings")
    proj = int_or(cfg, "word_embed_proj_dim", hidden)
    bias = flag(cfg, "enable_bias")
    affine = flag(cfg, "layer_norm_elementwise_affine")
    final_norm = flag(cfg, "do_layer_norm_before") and not flag(cfg, "_remove_final_layer_norm")

    projections: Part = ()
    if proj != hidden:
        projections = (
            *linear("project_out", proj, hidden, "projection", bias=False),
            *linear("project_in", hidden, proj, "projection", bias=False),
        )
    decoder = [
        *embedding("embed_tokens", vocab, proj),
        *embedding("embed_positions", positions + _POSITION_OFFSET, hidden, "position"),
        *projections,
        *(layer_norm("final_layer_norm", hidden, affine=affine) if final_norm else ()),
        *stamp_layers([layer(hidden, ffn, bias=bias, affine=affine)] * layers, "layers"),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "OPT",
        prefix="model",
        backbone=prefixed(decoder, "decoder"),
        embed="decoder.embed_tokens.weight",
        hidden=proj,
        vocab=vocab,
    )
    arch = architecture(
        cfg,
        "opt",
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=ffn),
        max_positions=positions,
        extra={
            "model_class": cls,
            "word_embed_proj_dim": proj,
            "do_layer_norm_before": flag(cfg, "do_layer_norm_before"),
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/opt/modeling_opt.py"
# OPTConfig defaults (configuration_opt.py).
DROPOUT_DEFAULT = 0.1


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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


FAMILY = Family(
    name="opt", model_types=("opt",), tensors=build, saved=saved, peft_targets=("q_proj", "v_proj")
)
