"""T5 and T5 v1.1 (model_type "t5"), encoder-decoder.

Layout of transformers 5.24 `models/t5/modeling_t5.py`: `T5ForConditionalGeneration` holds
`shared` [V, d_model], an `encoder` and a `decoder` `T5Stack` (each: `embed_tokens`, blocks
`block.{i}`, `final_layer_norm`) and `lm_head` [V, d_model].

- `T5Block.layer` is a ModuleList: `layer.0` `T5LayerSelfAttention` (`SelfAttention` q, k, v
  [heads * d_kv, d_model], o [d_model, heads * d_kv], all bias-free, + `layer_norm`); in the
  decoder `layer.1` `T5LayerCrossAttention` (`EncDecAttention`, same shapes, + `layer_norm`);
  last `T5LayerFF` (`DenseReluDense` + `layer_norm`).
- `relative_attention_bias` [relative_attention_num_buckets, heads] exists only in block 0 of
  each stack, self-attention only (`T5Stack`: `has_relative_attention_bias=bool(i == 0)`).
- `DenseReluDense` is `T5DenseActDense` (wi [d_ff, d_model], wo [d_model, d_ff]) or, when
  `feed_forward_proj` is "gated-<act>" (T5 v1.1, flan-t5: "gated-gelu"), `T5DenseGatedActDense`
  (wi_0, wi_1, wo) (`T5Config.__post_init__`: `is_gated_act`).
- `T5LayerNorm` is an RMSNorm: weight only.
- `num_decoder_layers: null` means `num_layers` (`T5Config.__post_init__`, "default = symmetry";
  see `decoder_default` for the `num_hidden_layers` alias).

Tying: `T5Config.__post_init__` in 5.x forces `tie_word_embeddings = True` (a saved `false`, as
in T5 v1.1 configs, now only turns off decoder-output scaling), so `encoder.embed_tokens`,
`decoder.embed_tokens` and `lm_head` are all the `shared` tensor.

Layer index: blocks are numbered in execution order, encoder 0 .. num_layers - 1, then decoder
num_layers .. num_layers + num_decoder_layers - 1. `Architecture.num_layers` is the encoder's
count (as in `T5Config.num_layers`); `extra["num_decoder_layers"]` the decoder's. No buffers.

Class: `architectures[0]` when it is one of `_CLASSES`, else `T5ForConditionalGeneration`
(what `AutoModelForSeq2SeqLM` and `AutoModelForPreTraining` build).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import embedding, join, num_labels, pick_class, prefixed
from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    assemble,
    int_or,
    linear,
    param,
    resolve,
    stamp_layers,
)
from memplan.model.families.record import Family
from memplan.model.inventory import Config, Inventory, TensorSpec

# configuration_t5.py: T5Config defaults and attribute_map.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "relu",
}
_ALIASES = {
    "hidden_size": "d_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "head_dim": "d_kv",
}
# class -> (stacks, head). T5ForTokenClassification wraps a T5EncoderModel and
# T5ForSequenceClassification a T5Model under `transformer.`.
_CLASSES: dict[str, tuple[str, str]] = {
    "T5ForConditionalGeneration": ("encoder-decoder", "lm"),
    "T5Model": ("encoder-decoder", "base"),
    "T5EncoderModel": ("encoder", "base"),
    "T5ForSequenceClassification": ("encoder-decoder", "classification"),
    "T5ForTokenClassification": ("encoder", "token"),
    "T5ForQuestionAnswering": ("encoder-decoder", "qa"),
}
_DEFAULT_CLASS = "T5ForConditionalGeneration"


def rms_norm(name: str, dim: int) -> Part:
    """`T5LayerNorm`: weight [dim], no bias."""
    return (param(f"{name}.weight", (dim,), "norm"),)


def attention(prefix: str, d_model: int, inner: int, *, buckets: int, heads: int) -> Part:
    """`T5Attention` q, k, v, o (+ `relative_attention_bias` when `buckets`)."""
    relative: Part = ()
    if buckets:
        relative = embedding(f"{prefix}.relative_attention_bias", buckets, heads, "position")
    return (
        *linear(f"{prefix}.q", inner, d_model, "attention", bias=False),
        *linear(f"{prefix}.k", inner, d_model, "attention", bias=False),
        *linear(f"{prefix}.v", inner, d_model, "attention", bias=False),
        *linear(f"{prefix}.o", d_model, inner, "attention", bias=False),
        *relative,
    )


def feed_forward(prefix: str, d_model: int, d_ff: int, *, gated: bool) -> Part:
    """`T5LayerFF`: `DenseReluDense` (gated: wi_0, wi_1, wo; else wi, wo) + `layer_norm`."""
    dense = f"{prefix}.DenseReluDense"
    if gated:
        ins = (
            *linear(f"{dense}.wi_0", d_ff, d_model, "mlp", bias=False),
            *linear(f"{dense}.wi_1", d_ff, d_model, "mlp", bias=False),
        )
    else:
        ins = linear(f"{dense}.wi", d_ff, d_model, "mlp", bias=False)
    return (
        *ins,
        *linear(f"{dense}.wo", d_model, d_ff, "mlp", bias=False),
        *rms_norm(f"{prefix}.layer_norm", d_model),
    )


def block(cfg: Config, *, decoder: bool, relative: bool) -> Part:
    """One `T5Block` (encoder or decoder), with the relative bias when `relative` (block 0)."""
    d_model = cfg.int("d_model")
    heads = cfg.int("num_heads")
    inner = heads * cfg.int("d_kv")
    buckets = cfg.int("relative_attention_num_buckets") if relative else 0
    self_attn = (
        *attention("layer.0.SelfAttention", d_model, inner, buckets=buckets, heads=heads),
        *rms_norm("layer.0.layer_norm", d_model),
    )
    cross: Part = ()
    if decoder:
        cross = (
            *attention("layer.1.EncDecAttention", d_model, inner, buckets=0, heads=heads),
            *rms_norm("layer.1.layer_norm", d_model),
        )
    ff = f"layer.{2 if decoder else 1}"
    gated = str(cfg.get("feed_forward_proj")).split("-")[0] == "gated"  # T5Config.is_gated_act
    return (*self_attn, *cross, *feed_forward(ff, d_model, cfg.int("d_ff"), gated=gated))


def stack(
    cfg: Config, name: str, count: int, *, decoder: bool, layer_offset: int
) -> list[TensorSpec]:
    """A `T5Stack` without its `embed_tokens` (always the `shared` tensor)."""
    first = block(cfg, decoder=decoder, relative=True)
    rest = block(cfg, decoder=decoder, relative=False)
    return [
        *stamp_layers(
            [first if i == 0 else rest for i in range(count)],
            f"{name}.block",
            layer_offset=layer_offset,
        ),
        *rms_norm(f"{name}.final_layer_norm", cfg.int("d_model")),
    ]


def decoder_default(config: Mapping[str, Any]) -> int:
    """`num_decoder_layers` when absent: the `num_layers` key, else the class default (6).

    `T5Config.__post_init__` copies `num_layers` before `attribute_map` applies, so a config that
    says only `num_hidden_layers: 2` gets a 2-block encoder and a 6-block decoder in
    transformers 5.24.
    """
    value = config.get("num_layers")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(_DEFAULTS["num_layers"])


def head(kind: str, cfg: Config, d_model: int) -> Part:
    """The task head of the class (the lm_head is always tied, so never listed)."""
    labels = num_labels(cfg)
    if kind == "classification":  # T5ClassificationHead
        return (
            *linear("classification_head.dense", d_model, d_model, "head", bias=True),
            *linear("classification_head.out_proj", labels, d_model, "head", bias=True),
        )
    if kind == "token":
        return linear("classifier", labels, d_model, "head", bias=True)
    if kind == "qa":  # T5ForQuestionAnswering: nn.Linear(hidden_size, num_labels)
        return linear("qa_outputs", labels, d_model, "head", bias=True)
    return ()


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, aliases=_ALIASES, origin=origin)
    cls, notes = pick_class(cfg, tuple(_CLASSES), _DEFAULT_CLASS, why="AutoModelForSeq2SeqLM")
    stacks, kind = _CLASSES[cls]
    d_model = cfg.int("d_model")
    enc_layers = cfg.int("num_layers")
    dec_layers = int_or(cfg, "num_decoder_layers", decoder_default(config))
    vocab = cfg.int("vocab_size")

    body = [*embedding("shared", vocab, d_model)]
    body += stack(cfg, "encoder", enc_layers, decoder=False, layer_offset=0)
    aliases = ["encoder.embed_tokens.weight"]
    if stacks == "encoder-decoder":
        body += stack(cfg, "decoder", dec_layers, decoder=True, layer_offset=enc_layers)
        aliases.append("decoder.embed_tokens.weight")
    if kind == "lm":
        aliases.append("lm_head.weight")
    # The heads with their own module around the T5Model / T5EncoderModel.
    root = "transformer" if kind in ("classification", "token") else ""
    tensors = [*prefixed(body, root), *head(kind, cfg, d_model)]
    tied = [(join(root, alias), join(root, "shared.weight")) for alias in aliases]

    if config.get("tie_word_embeddings") is False:
        notes += (
            "tie_word_embeddings: false has no effect on the layout: transformers 5.x "
            "T5Config always ties lm_head to shared (the flag only turns off output scaling).",
        )
    dims = Dims.mha(
        hidden=d_model,
        layers=enc_layers,
        vocab=vocab,
        heads=cfg.int("num_heads"),
        inter=cfg.int("d_ff"),
        head_dim=cfg.int("d_kv"),
    )
    arch = architecture(
        cfg,
        "t5",
        dims,
        max_positions=0,  # relative position buckets: no learned positions
        extra={
            "model_class": cls,
            "num_decoder_layers": dec_layers if stacks == "encoder-decoder" else 0,
            "d_kv": cfg.int("d_kv"),
            "feed_forward_proj": str(cfg.get("feed_forward_proj")),
            "relative_attention_num_buckets": cfg.int("relative_attention_num_buckets"),
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


FAMILY = Family(
    name="t5",
    model_types=("t5",),
    tensors=build,
    saved="no rule for encoder-decoder models (their decoder layers cross-attend)",
    peft_targets=("q", "v"),
)
