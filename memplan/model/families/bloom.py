"""BLOOM (model_type "bloom").

Layout of transformers 5.24 `models/bloom/modeling_bloom.py`: `BloomModel` holds
`word_embeddings` [V, H], `word_embeddings_layernorm`, blocks `h.{i}` (`BloomBlock`:
input_layernorm, self_attention, post_attention_layernorm, mlp) and `ln_f`. `BloomAttention`
fuses q, k and v into `query_key_value` [3H, H] (bias) and projects back with `dense` [H, H]
(bias); `BloomMLP` is `dense_h_to_4h` [4H, H] and `dense_4h_to_h` [H, 4H], both with bias (the
4 is hard-coded). `lm_head` is tied to `word_embeddings` by default (`tie_word_embeddings: True`
in `configuration_bloom.py`).

Positions are ALiBi slopes computed per forward (`build_alibi_tensor`): no position embedding,
no buffers. A legacy `n_embed` key overrides `hidden_size` (`BloomConfig.__post_init__`).

Class: `architectures[0]` when it is one of `_CLASSES`, else `BloomForCausalLM`
(`AutoModelForCausalLM`).

Saved tensors of BLOOM (`BloomForCausalLM`) in transformers 5.24.

models/bloom/modeling_bloom.py: word_embeddings -> word_embeddings_layernorm -> blocks
(input_layernorm, query_key_value [fused, per head q|k|v], its own attention: `alibi.baddbmm(q,
k^T)` (the ALiBi bias is not saved), + causal mask, softmax in fp32 cast back to q's dtype,
attention_dropout, bmm with v, dense, dropout_add; post_attention_layernorm, dense_h_to_4h,
BloomGelu (a custom autograd Function that saves its input), dense_4h_to_h, dropout_add) ->
ln_f -> lm_head -> ForCausalLMLoss. BLOOM has no sdpa path (`_supports_sdpa` is False):
transformers runs this attention whatever is requested by default (an explicit sdpa raises).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import embedding, layer_norm, pick_class, with_class_head
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
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

# configuration_bloom.py: BloomConfig defaults and attribute_map.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 250880,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 8,
    "tie_word_embeddings": True,
}
_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
_MLP_RATIO = 4  # BloomMLP: nn.Linear(hidden_size, 4 * hidden_size)
_CLASSES = (
    "BloomForCausalLM",
    "BloomModel",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)
_DEFAULT_CLASS = "BloomForCausalLM"


def block(hidden: int) -> Part:
    """One `BloomBlock`, in registration order."""
    inter = _MLP_RATIO * hidden
    return (
        *layer_norm("input_layernorm", hidden),
        *linear("self_attention.query_key_value", 3 * hidden, hidden, "attention", bias=True),
        *linear("self_attention.dense", hidden, hidden, "attention", bias=True),
        *layer_norm("post_attention_layernorm", hidden),
        *linear("mlp.dense_h_to_4h", inter, hidden, "mlp", bias=True),
        *linear("mlp.dense_4h_to_h", hidden, inter, "mlp", bias=True),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, aliases=_ALIASES, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = int_or(cfg, "n_embed", cfg.int("hidden_size"))  # legacy n_embed wins
    layers = cfg.int("n_layer")
    heads = cfg.int("n_head")
    vocab = cfg.int("vocab_size")

    backbone = [
        *embedding("word_embeddings", vocab, hidden),
        *layer_norm("word_embeddings_layernorm", hidden),
        *stamp_layers([block(hidden)] * layers, "h"),
        *layer_norm("ln_f", hidden),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "Bloom",
        prefix="transformer",
        backbone=backbone,
        embed="word_embeddings.weight",
        hidden=hidden,
        vocab=vocab,
    )
    arch = architecture(
        cfg,
        "bloom",
        Dims.mha(hidden=hidden, layers=layers, vocab=vocab, heads=heads, inter=_MLP_RATIO * hidden),
        max_positions=0,  # ALiBi: no learned or rotary positions, no length limit
        extra={"model_class": cls, "alibi": True},
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/bloom/modeling_bloom.py"
SRC_CHECKPOINT_CORE = "torch/utils/checkpoint.py::_NoopSaveInputs (inputs of the checkpointed core)"


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """BLOOM's saved tensors, or why they are not modelled."""
    x = arch.extra
    if int(x.get("pretraining_tp", 1)) > 1 and x.get("slow_but_exact"):
        return "BLOOM with slow_but_exact pretraining_tp slices has no rule"
    h, a, d, vocab = arch.hidden_size, arch.num_attention_heads, arch.head_dim, arch.vocab_size
    inner = arch.intermediate_size  # BloomMLP: dense_h_to_4h, 4 x hidden
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop_hidden = dropout_on(st, x, "hidden_dropout", default=0.0)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)

    embeddings: list[Saved] = [kernels.embedding_indices("word_embeddings.indices", (b, s))]
    embeddings += kernels.layer_norm("word_embeddings_layernorm", t, h, st.stream, st)
    stream = kernels.layer_norm_dtype(st, st.stream)

    layer = kernels.layer_norm("input_layernorm", t, h, stream, st)
    ln_out = kernels.layer_norm_dtype(st, stream)
    layer += kernels.linear_inputs(["self_attention.query_key_value"], t, h, ln_out, st)
    layer += kernels.weight_casts(
        [
            ("self_attention.query_key_value", (3 * a * d, h)),
            ("self_attention.dense", (h, a * d)),
            ("mlp.dense_h_to_4h", (inner, h)),
            ("mlp.dense_4h_to_h", (h, inner)),
        ],
        st,
    )
    # baddbmm saves q and k reshaped (copies of views of the fused output), then the llama-style
    # softmax(..., dtype=float32).to(q.dtype), dropout, bmm with v (a copy) and the merged heads.
    core = attention.eager(
        st,
        heads,
        attention.Qkv(q=mm, k=mm, v=mm),
        softmax_fp32=True,
        convert_to_query=True,
        dropout_on=drop_attn,
        source=SRC + "::BloomAttention.forward",
    )
    # q, k and v are views of the fused output: a checkpoint of the core keeps that storage.
    fused = kernels.saved(
        "self_attention.query_key_value.output", (t, 3 * a * d), mm, "Noop", SRC_CHECKPOINT_CORE
    )
    core = attention.Core(core=core.core, inputs=(fused,), output=core.output, views=core.views)
    tail: list[Saved] = []
    if drop_hidden:
        tail.append(kernels.dropout("self_attention.dropout_add.mask", (b, s, h), mm, st))
    post = promote(stream, mm)
    tail += kernels.layer_norm("post_attention_layernorm", t, h, post, st)
    tail += kernels.linear_inputs(
        ["mlp.dense_h_to_4h"], t, h, kernels.layer_norm_dtype(st, post), st
    )
    mlp = mlp_act("mlp.gelu_impl", t, inner, "gelu", st, out_name="mlp.dense_4h_to_h")
    assert mlp is not None
    tail += mlp
    if drop_hidden:
        tail.append(kernels.dropout("mlp.dropout_add.mask", (b, s, h), mm, st))

    head = kernels.layer_norm_head("ln_f", "lm_head", t, h, vocab, post, st)
    note = ""
    if st.attention == "sdpa":
        note = "BLOOM has no sdpa attention in transformers: its own eager attention is modelled."
    return Model(
        embeddings=tuple(embeddings),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
        notes=(note,),
        backward_temporaries=gelu_back_temporaries(t, inner, mm),
    )


GELU_BACK_HELD = 4
"""Tensors of the GELU's input size bloom_gelu_back holds at its most beyond its gradient
input and its result (the two the backward working set's estimate counts), its own input
(the saved one) aside: transformers 5.25 models/bloom/modeling_bloom.py::bloom_gelu_back
(GeLUFunction.backward) runs `tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))`
then `ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) +
0.5 * (1 + tanh_out)`, one op at a time, each intermediate freed when the next op has read
it. At `0.1070322243 * (x * x)` five are alive: tanh_out (a local until the return),
`0.5 * x`, `1 - tanh_out * tanh_out`, `x * x` and its product; with the gradient, six,
four more than the estimate's two (tests/test_bloom_gelu_back.py runs it on real tensors; a
tiny BLOOM's real step, fp32, 2 x 32 tokens, peaks in it, 3.2% over the estimate without
them, 0.6% under it with them)."""


def gelu_back_temporaries(tokens: int, inner: int, dtype: str) -> tuple[Saved, ...]:
    """bloom_gelu_back's temporaries beyond the estimate's two: GELU_BACK_HELD x [t, 4h] in
    the dtype of the GELU's input (the matmul dtype: dense_h_to_4h's output)."""
    return tuple(
        kernels.saved(
            f"mlp.gelu_impl.backward.temporary{i}",
            (tokens, inner),
            dtype,
            "GeLUFunctionBackward",
            SRC + "::bloom_gelu_back",
        )
        for i in range(GELU_BACK_HELD)
    )


FAMILY = Family(
    name="bloom",
    model_types=("bloom",),
    tensors=build,
    saved=saved,
    peft_targets=("query_key_value",),
)
