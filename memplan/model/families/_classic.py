"""Building blocks of the pre-Llama families (gpt2, gpt_neox, gptj, opt, bloom, falcon, bert, t5).

Why a module of its own: these families are assembled from the same few `torch.nn` modules
(`nn.Linear`, GPT-2's `Conv1D`, `nn.LayerNorm`, `nn.Embedding`) and from the same task heads
(`*ForSequenceClassification`, `*ForTokenClassification`, `*ForQuestionAnswering`), and they
read config.json the same way (keys over the config class's defaults, `attribute_map` aliases,
`num_labels` from `id2label`). Each family module describes one block *template* (names relative
to the block) and `decoder.stamp_layers` repeats it per block index, so an inventory is a list
comprehension, not a model. What they share with the decoder families (`param`, `linear`,
`norm`, `resolve`, rotary buffers, layer stamping, ...) lives in `decoder`; this module holds
the rest.

Order matters: tensors are listed in `nn.Module` registration order, the order of
`model.named_parameters()` / `model.named_buffers()` (pre-order: a module's own tensors, then
its children's); `decoder.assemble` splits one ordered list into parameters and buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memplan.model.families._decoder import Part, linear, norm, param, present
from memplan.model.inventory import Config, TensorSpec


def flag(cfg: Config, key: str) -> bool:
    """A boolean config attribute as the model code tests it (`if config.x:`): null is False."""
    value = present(cfg, key)
    return bool(value) if value is not None else False


def num_labels(cfg: Config) -> int:
    """`config.num_labels`: len(id2label) when given, else the `num_labels` key, else 2.

    Source: transformers 5.24 `configuration_utils.py: PreTrainedConfig.__post_init__` ("Keep the
    default value of `num_labels=2`") and the `num_labels` property (`len(self.id2label)`).
    """
    id2label = cfg.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    return cfg.int("num_labels", default=2)


def conv1d(name: str, in_features: int, out_features: int, role: str) -> Part:
    """GPT-2 `Conv1D(nf=out, nx=in)` (pytorch_utils.py): weight [in, out] (transposed), bias."""
    return (
        param(f"{name}.weight", (in_features, out_features), role),
        param(f"{name}.bias", (out_features,), role),
    )


def layer_norm(name: str, dim: int, *, affine: bool = True, bias: bool = True) -> Part:
    """`nn.LayerNorm(dim, elementwise_affine, bias)`: weight and bias [dim], none without affine."""
    return norm(name, dim, bias=bias) if affine else ()


def embedding(name: str, num_embeddings: int, dim: int, role: str = "embedding") -> Part:
    """`nn.Embedding(num_embeddings, dim)`: weight [num_embeddings, dim]."""
    return (param(f"{name}.weight", (num_embeddings, dim), role),)


def rope_parameters(cfg: Config) -> dict[str, Any]:
    """The RoPE dict as transformers 5.24 `convert_rope_params_to_dict` resolves it.

    Legacy `rope_scaling` wins over `rope_parameters` (both may be absent).
    """
    found = present(cfg, "rope_scaling") or present(cfg, "rope_parameters") or {}
    return dict(found) if isinstance(found, Mapping) else {}


def prefixed(part: Iterable[TensorSpec], prefix: str) -> list[TensorSpec]:
    """`part` with `{prefix}.` in front of every name (nothing when `prefix` is empty)."""
    if not prefix:
        return list(part)
    return [
        TensorSpec(f"{prefix}.{t.name}", t.shape, t.kind, t.dtype, t.persistent, t.layer, t.role)
        for t in part
    ]


def join(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` alone for a base model (empty prefix)."""
    return f"{prefix}.{name}" if prefix else name


def pick_class(
    cfg: Config, supported: Sequence[str], default: str, *, why: str
) -> tuple[str, tuple[str, ...]]:
    """The model class transformers builds: `architectures[0]` when memplan knows it.

    Else `default` (`why` says which Auto class picks it) and a note saying so.
    """
    archs = cfg.get("architectures")
    if isinstance(archs, Sequence) and not isinstance(archs, str) and archs:
        name = str(archs[0])
        if name in supported:
            return name, ()
        return default, (
            f"architectures[0] = {name} is not one of the classes memplan lays out "
            f"({', '.join(supported)}); counted as {default}.",
        )
    return default, (f"no architectures in the config: counted as {default} ({why}).",)


# The task heads every decoder-only family of this group defines, by class-name suffix.
# transformers 5.24: `*ForCausalLM` / `GPT2LMHeadModel` (`lm_head = nn.Linear(H, V, bias=False)`),
# `*ForSequenceClassification` (`score = nn.Linear(H, num_labels, bias=False)`),
# `*ForTokenClassification` (`classifier = nn.Linear(H, num_labels)`),
# `*ForQuestionAnswering` (`qa_outputs = nn.Linear(H, 2)`), and the bare `*Model` (no head, no
# prefix: its tensors are named from the backbone's root).
HEAD_KINDS: dict[str, str] = {
    "ForCausalLM": "lm",
    "LMHeadModel": "lm",
    "ForSequenceClassification": "score",
    "ForTokenClassification": "token",
    "ForQuestionAnswering": "qa",
    "Model": "base",
}


def head_kind(class_name: str, stem: str) -> str:
    """ "lm", "score", "token", "qa" or "base" for `class_name` = `stem` + a `HEAD_KINDS` suffix."""
    return HEAD_KINDS[class_name.removeprefix(stem)]


def causal_head(kind: str, *, hidden: int, vocab: int, labels: int, lm_bias: bool = False) -> Part:
    """The head tensors of a decoder-only model class (names from the model root)."""
    if kind == "lm":
        return linear("lm_head", vocab, hidden, "head", bias=lm_bias)
    if kind == "score":
        return linear("score", labels, hidden, "head", bias=False)
    if kind == "token":
        return linear("classifier", labels, hidden, "head", bias=True)
    if kind == "qa":
        return linear("qa_outputs", 2, hidden, "head", bias=True)
    return ()


def with_causal_head(
    *,
    kind: str,
    prefix: str,
    backbone: Iterable[TensorSpec],
    embed: str,
    head: Part,
    tie: bool,
) -> tuple[list[TensorSpec], tuple[tuple[str, str], ...]]:
    """Backbone under `prefix` (none for a bare model) then `head`; a tied lm_head is an alias.

    With `tie_word_embeddings`, transformers 5.24 `PreTrainedModel.tie_weights` makes
    `lm_head.weight` the embedding's tensor (`_tied_weights_keys = {"lm_head.weight": embed}`);
    `named_parameters()` then lists it once, under the embedding. Other heads are never tied.
    """
    root = "" if kind == "base" else prefix
    tensors = prefixed(backbone, root)
    tied: tuple[tuple[str, str], ...] = ()
    for t in head:
        if kind == "lm" and tie and t.name == "lm_head.weight":
            tied = (("lm_head.weight", join(root, embed)),)
        else:
            tensors.append(t)
    return tensors, tied


def with_class_head(
    cfg: Config,
    cls: str,
    stem: str,
    *,
    prefix: str,
    backbone: Iterable[TensorSpec],
    embed: str,
    hidden: int,
    vocab: int,
    lm_bias: bool = False,
) -> tuple[list[TensorSpec], tuple[tuple[str, str], ...]]:
    """`with_causal_head` for class `cls` (`stem` + a `HEAD_KINDS` suffix): its `causal_head`,
    `num_labels` from the config, lm_head tied per `tie_word_embeddings`."""
    kind = head_kind(cls, stem)
    return with_causal_head(
        kind=kind,
        prefix=prefix,
        backbone=backbone,
        embed=embed,
        head=causal_head(kind, hidden=hidden, vocab=vocab, labels=num_labels(cfg), lm_bias=lm_bias),
        tie=flag(cfg, "tie_word_embeddings"),
    )
