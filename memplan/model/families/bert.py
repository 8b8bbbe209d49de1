"""BERT and RoBERTa (model_types "bert" and "roberta"), encoder-only.

One module for both because transformers 5.24 builds them from the same parts:
`models/roberta/modeling_roberta.py` copies `BertSelfAttention`, `BertLayer`, `BertEncoder` and
`BertPooler` (`# Copied from` / modular), so a layer is identical. They differ in three places,
each a function below: the embedding registration order (`RobertaEmbeddings` registers
`position_embeddings` last), the masked-LM head (`BertOnlyMLMHead` `cls.predictions.*` vs
`RobertaLMHead` `lm_head.*`) and the sequence-classification head (`BertForSequenceClassification`:
pooler + `classifier`; `RobertaClassificationHead`: `classifier.dense` + `classifier.out_proj`,
no pooler).

Layout (`models/bert/modeling_bert.py`): `BertEmbeddings` word [V, H], position [P, H],
token_type [type_vocab_size, H] embeddings and a LayerNorm; layers `encoder.layer.{i}`
(`BertLayer`: attention.self query/key/value [H, H], attention.output dense + LayerNorm,
[crossattention, same shapes, when `add_cross_attention`], intermediate.dense [I, H],
output.dense [H, I] + LayerNorm; every Linear has a bias); `pooler.dense` [H, H] when the class
keeps it (`add_pooling_layer`, see `_BERT_CLASSES`).

MLM heads: `BertLMPredictionHead` registers transform (dense, LayerNorm), `decoder` [V, H] with
bias, and its own `bias` [V]; with `tie_word_embeddings` (default True in both config classes)
`decoder.weight` is the word embedding and `decoder.bias` is the head's `bias`
(`_tied_weights_keys`), so both are aliases; untied, both are listed.

Buffers (both families): `embeddings.position_ids` and `embeddings.token_type_ids`, [1, P]
int64, non-persistent (`BertEmbeddings.__init__`).

Class: `architectures[0]` when memplan knows it, else the class `AutoModelForCausalLM` builds
(`BertLMHeadModel`, `RobertaForCausalLM`: MLM-style heads without a pooler), the class memplan's
meta inventory, its traced profiles and `memplan verify` build for a config naming none
(memplan/verify/trace/meta.py::_model_class, memplan/verify/build.py::build_model), so that the
three describe one model. (`AutoModelForPreTraining`'s `BertForPreTraining` adds the pooler and
the next-sentence head, and its loss needs `next_sentence_label` beside `labels`.)

Saved tensors of BERT (`BertForMaskedLM`) in transformers 5.24.

models/bert/modeling_bert.py: embeddings (word + token_type + position, LayerNorm, dropout) ->
layers (query/key/value, attention core, output.dense, dropout, LayerNorm(x + residual),
intermediate.dense, act, output.dense, dropout, LayerNorm(x + residual)) -> cls.predictions
(transform.dense, act, LayerNorm, decoder tied to word_embeddings) -> the model's
`loss_function` (loss/loss_utils.py::ForMaskedLMLoss: `logits.float()`, labels as given).
Post-LayerNorm: each layer's output is a LayerNorm output.
Bidirectional without padding: no attention mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families._classic import (
    embedding,
    flag,
    join,
    layer_norm,
    num_labels,
    pick_class,
    prefixed,
)
from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    assemble,
    buffer,
    linear,
    param,
    resolve,
    stamp_layers,
)
from memplan.model.families.record import Family
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Config, Inventory

# configuration_bert.py / configuration_roberta.py defaults (they differ in vocab_size only).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_ROBERTA_VOCAB = 50265

# class -> (keeps the pooler, head). The pooler follows each class's
# `BertModel(config, add_pooling_layer=...)` call in modeling_bert.py / modeling_roberta.py.
_BERT_CLASSES: dict[str, tuple[bool, str]] = {
    "BertForPreTraining": (True, "pretraining"),
    "BertForMaskedLM": (False, "mlm"),
    "BertLMHeadModel": (False, "mlm"),
    "BertForNextSentencePrediction": (True, "nsp"),
    "BertForSequenceClassification": (True, "classifier"),
    "BertForMultipleChoice": (True, "choice"),
    "BertForTokenClassification": (False, "classifier"),
    "BertForQuestionAnswering": (False, "qa"),
    "BertModel": (True, "base"),
}
_ROBERTA_CLASSES: dict[str, tuple[bool, str]] = {
    "RobertaForMaskedLM": (False, "mlm"),
    "RobertaForCausalLM": (False, "mlm"),
    "RobertaForSequenceClassification": (False, "roberta_classifier"),
    "RobertaForMultipleChoice": (True, "choice"),
    "RobertaForTokenClassification": (False, "classifier"),
    "RobertaForQuestionAnswering": (False, "qa"),
    "RobertaModel": (True, "base"),
}


def embeddings(vocab: int, hidden: int, positions: int, types: int, *, roberta: bool) -> Part:
    """`BertEmbeddings` / `RobertaEmbeddings` parameters and buffers, in registration order."""
    position = embedding("embeddings.position_embeddings", positions, hidden, "position")
    body = (
        *embedding("embeddings.word_embeddings", vocab, hidden),
        *(() if roberta else position),
        *embedding("embeddings.token_type_embeddings", types, hidden),
        *layer_norm("embeddings.LayerNorm", hidden),
        *(position if roberta else ()),
    )
    ids = tuple(
        buffer(f"embeddings.{name}", (1, positions), role, dtype="int64", persistent=False)
        for name, role in (("position_ids", "position"), ("token_type_ids", "embedding"))
    )
    return (*body, *ids)


def attention_tensors(prefix: str, hidden: int) -> Part:
    """`BertAttention` (self- or cross-): query, key, value, output dense, output LayerNorm."""
    return (
        *linear(f"{prefix}.self.query", hidden, hidden, "attention", bias=True),
        *linear(f"{prefix}.self.key", hidden, hidden, "attention", bias=True),
        *linear(f"{prefix}.self.value", hidden, hidden, "attention", bias=True),
        *linear(f"{prefix}.output.dense", hidden, hidden, "attention", bias=True),
        *layer_norm(f"{prefix}.output.LayerNorm", hidden),
    )


def layer(hidden: int, inter: int, *, cross: bool) -> Part:
    """One `BertLayer` / `RobertaLayer`, in registration order."""
    return (
        *attention_tensors("attention", hidden),
        *(attention_tensors("crossattention", hidden) if cross else ()),
        *linear("intermediate.dense", inter, hidden, "mlp", bias=True),
        *linear("output.dense", hidden, inter, "mlp", bias=True),
        *layer_norm("output.LayerNorm", hidden),
    )


def mlm_head(prefix: str, hidden: int, vocab: int, *, roberta: bool) -> Part:
    """`BertLMPredictionHead` (`cls.predictions`) or `RobertaLMHead` (`lm_head`), untied.

    The head's own `bias` [V] comes first: `named_parameters()` visits a module's own tensors
    before its children's.
    """
    dense, norm = ("dense", "layer_norm") if roberta else ("transform.dense", "transform.LayerNorm")
    return (
        param(f"{prefix}.bias", (vocab,), "head"),
        *linear(f"{prefix}.{dense}", hidden, hidden, "head", bias=True),
        *layer_norm(f"{prefix}.{norm}", hidden),
        *linear(f"{prefix}.decoder", vocab, hidden, "head", bias=True),
    )


def head(kind: str, cfg: Config, hidden: int, vocab: int, *, roberta: bool) -> Part:
    """The task head of the class, names from the model root."""
    labels = num_labels(cfg)
    mlm_prefix = "lm_head" if roberta else "cls.predictions"
    nsp = linear("cls.seq_relationship", 2, hidden, "head", bias=True)  # BertOnlyNSPHead
    if kind == "pretraining":
        return (*mlm_head(mlm_prefix, hidden, vocab, roberta=roberta), *nsp)
    if kind == "mlm":
        return mlm_head(mlm_prefix, hidden, vocab, roberta=roberta)
    if kind == "nsp":
        return nsp
    if kind == "classifier":
        return linear("classifier", labels, hidden, "head", bias=True)
    if kind == "choice":
        return linear("classifier", 1, hidden, "head", bias=True)  # one score per choice
    if kind == "qa":
        # BertForQuestionAnswering: nn.Linear(hidden_size, config.num_labels) in 5.x (not 2).
        return linear("qa_outputs", labels, hidden, "head", bias=True)
    if kind == "roberta_classifier":
        return (
            *linear("classifier.dense", hidden, hidden, "head", bias=True),
            *linear("classifier.out_proj", labels, hidden, "head", bias=True),
        )
    return ()


def tie_mlm_head(
    task_head: Part, *, root: str, roberta: bool, tie: bool
) -> tuple[Part, tuple[tuple[str, str], ...]]:
    """The head without its tied tensors, and the (alias, owner) pairs.

    `_tied_weights_keys` of the MLM classes: `decoder.weight` -> the word embedding,
    `decoder.bias` -> the head's own `bias`; applied only with `tie_word_embeddings`
    (`PreTrainedModel.get_expanded_tied_weights_keys`).
    """
    if not tie:
        return task_head, ()
    prefix = "lm_head" if roberta else "cls.predictions"
    owners = {
        f"{prefix}.decoder.weight": join(root, "embeddings.word_embeddings.weight"),
        f"{prefix}.decoder.bias": f"{prefix}.bias",
    }
    kept = tuple(t for t in task_head if t.name not in owners)
    return kept, tuple(owners.items())


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    model_type = str(config.get("model_type", "bert"))
    roberta = model_type == "roberta"
    defaults = {**_DEFAULTS, "vocab_size": _ROBERTA_VOCAB} if roberta else _DEFAULTS
    cfg = resolve(config, defaults, origin=origin)
    classes = _ROBERTA_CLASSES if roberta else _BERT_CLASSES
    default_class = "RobertaForCausalLM" if roberta else "BertLMHeadModel"
    cls, notes = pick_class(cfg, tuple(classes), default_class, why="AutoModelForCausalLM")
    pooler, kind = classes[cls]
    hidden = cfg.int("hidden_size")
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    inter = cfg.int("intermediate_size")
    vocab = cfg.int("vocab_size")
    positions = cfg.int("max_position_embeddings")
    cross = flag(cfg, "add_cross_attention")
    if cross and not flag(cfg, "is_decoder"):
        raise MemplanError(
            f"{origin}: add_cross_attention needs is_decoder: true ({cls} refuses to build a "
            "cross-attention layer in an encoder); set is_decoder or drop add_cross_attention.",
            field="add_cross_attention",
        )

    backbone = [
        *embeddings(vocab, hidden, positions, cfg.int("type_vocab_size"), roberta=roberta),
        *stamp_layers([layer(hidden, inter, cross=cross)] * layers, "encoder.layer"),
        *(linear("pooler.dense", hidden, hidden, "pooler", bias=True) if pooler else ()),
    ]
    root = "" if kind == "base" else model_type
    tie = kind in ("mlm", "pretraining") and flag(cfg, "tie_word_embeddings")
    task_head, tied = tie_mlm_head(
        head(kind, cfg, hidden, vocab, roberta=roberta), root=root, roberta=roberta, tie=tie
    )
    tensors = [*prefixed(backbone, root), *task_head]

    arch = architecture(
        cfg,
        model_type,
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=inter),
        max_positions=positions,
        extra={
            "model_class": cls,
            "type_vocab_size": cfg.int("type_vocab_size"),
            "is_decoder": flag(cfg, "is_decoder"),
            "add_cross_attention": cross,
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/bert/modeling_bert.py"
# BertConfig defaults (configuration_bert.py): both dropouts 0.1, act gelu.
DROPOUT_DEFAULT = 0.1
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
MASKED_LM = ("BertForMaskedLM",)


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """BERT's saved tensors (masked-LM head), or why they are not modelled."""
    x = arch.extra
    cls = str(x.get("model_class", "BertForMaskedLM"))
    if cls not in MASKED_LM or x.get("is_decoder"):
        return f"{cls} (only the encoder with BertForMaskedLM's head has rules)"
    act = str(x.get("hidden_act", "gelu"))
    h, a, d, inner, vocab = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
    )
    b, s, t = st.batch, st.sequence, st.tokens
    mm, stream = st.matmul, st.stream
    drop_hidden = dropout_on(st, x, "hidden_dropout_prob", default=DROPOUT_DEFAULT)
    drop_attn = dropout_on(st, x, "attention_probs_dropout_prob", default=DROPOUT_DEFAULT)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    # position_ids are a slice of a buffer (excluded); token_type_ids a gathered [1, s] copy.
    embeddings: list[Saved] = [
        kernels.embedding_indices("word_embeddings.indices", (b, s)),
        kernels.embedding_indices("token_type_embeddings.indices", (1, s)),
        *kernels.layer_norm("embeddings.LayerNorm", t, h, stream, st),
    ]
    if drop_hidden:
        embeddings.append(kernels.dropout("embeddings.dropout.mask", (b, s, h), stream, st))
    x_dtype = kernels.layer_norm_dtype(st, stream)

    layer = kernels.linear_inputs(
        ["attention.self.query", "attention.self.key", "attention.self.value"], t, h, x_dtype, st
    )
    layer += kernels.weight_casts(
        [
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("intermediate.dense", (inner, h)),
            ("output.dense", (h, inner)),
        ],
        st,
    )
    qkv = attention.Qkv(q=mm, k=mm, v=mm)
    core = attention.core(
        st,
        heads,
        qkv,
        dropout_on=drop_attn,
        source=SRC + "::eager_attention_forward",
        softmax_fp32=False,
        convert_to_query=None,
        mask_added=False,
    )
    tail: list[Saved] = []
    residual = promote(mm, x_dtype)
    if drop_hidden:
        tail.append(kernels.dropout("attention.output.dropout.mask", (b, s, h), mm, st))
    tail += kernels.layer_norm("attention.output.LayerNorm", t, h, residual, st)
    ln = kernels.layer_norm_dtype(st, residual)
    tail += kernels.linear_inputs(["intermediate.dense"], t, h, ln, st)
    mlp = mlp_act("intermediate.act", t, inner, act, st, out_name="output.dense")
    if mlp is None:
        return f"hidden_act {act!r} has no rule"
    tail += mlp
    if drop_hidden:
        tail.append(kernels.dropout("output.dropout.mask", (b, s, h), mm, st))
    tail += kernels.layer_norm("output.LayerNorm", t, h, promote(mm, ln), st)
    out_dtype = kernels.layer_norm_dtype(st, promote(mm, ln))

    head = kernels.linear_inputs(["cls.predictions.transform.dense"], t, h, out_dtype, st)
    saves_input = kernels.act_saves_input(act)
    if saves_input is None:
        return f"hidden_act {act!r} has no rule in the MLM head"
    if saves_input:  # relu saves its output, the LayerNorm's input below
        head.append(kernels.saved("cls.predictions.transform.act.input", (t, h), mm, "Gelu", SRC))
    head += kernels.layer_norm("cls.predictions.transform.LayerNorm", t, h, mm, st)
    head_ln = kernels.layer_norm_dtype(st, mm)
    head += kernels.linear_inputs(["cls.predictions.decoder"], t, h, head_ln, st)
    head += kernels.weight_casts(
        [("cls.predictions.transform.dense", (h, h)), ("cls.predictions.decoder", (vocab, h))], st
    )
    return Model(
        embeddings=tuple(embeddings),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
        shifted=False,
        notes=(dropout_note(st, x, DROPOUT_KEYS, "BertConfig (0.1)"),),
    )


FAMILY = Family(
    name="bert",
    model_types=("bert",),
    tensors=build,
    saved=saved,
    peft_targets=("query", "value"),
    tp_refusal="activations not modelled for BERT under tensor parallelism",
)

ROBERTA = Family(
    name="roberta",
    model_types=("roberta",),
    tensors=build,
    saved="no rule yet: BERT's is measured on BertForMaskedLM only",
    peft_targets=("query", "value"),
)
