"""Saved tensors of BERT (`BertForMaskedLM`) in transformers 5.24.

models/bert/modeling_bert.py: embeddings (word + token_type + position, LayerNorm, dropout) ->
layers (query/key/value, attention core, output.dense, dropout, LayerNorm(x + residual),
intermediate.dense, act, output.dense, dropout, LayerNorm(x + residual)) -> cls.predictions
(transform.dense, act, LayerNorm, decoder tied to word_embeddings) -> the model's
`loss_function` (loss/loss_utils.py::ForMaskedLMLoss: `logits.float()`, labels as given).
Post-LayerNorm: each layer's output is a LayerNorm output.
Bidirectional without padding: no attention mask.
"""

from __future__ import annotations

from memplan.model.families.gpt2_saved import mlp_act
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_note, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/bert/modeling_bert.py"
# BertConfig defaults (configuration_bert.py): both dropouts 0.1, act gelu.
DROPOUT_DEFAULT = 0.1
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
MASKED_LM = ("BertForMaskedLM",)


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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
