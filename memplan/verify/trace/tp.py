"""One tensor-parallel rank's slice of a model, as a config the tracer builds (issues 19/21).

A hand-ruled family is predicted under TP at the slice one rank runs (memplan.activations.
layout.local_architecture: heads, key/value heads and intermediate sizes / TP, the rank's
vocabulary rows), which equals a real DTensor TP rank to the byte (tests/test_tp_activations_
real.py). A model without a rule gets the same principle through its profile: the profile of
the TP-local config (`local_config`), traced as a model of its own and keyed by the TP degree
and the vocabulary rows (memplan.model.profile.Key.tensor, .vocab_rows).

The slice is sound only where the model code reads its head width from `config.head_dim`:
code that derives it as hidden_size // num_attention_heads would trace heads twice as wide, so
`local_config` refuses a config without `head_dim` and `check_heads` a built model whose
attention modules hold another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers

from memplan.errors import MemplanError

SPLIT_KEYS = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size_mlp",  # Llama 4: its dense layers' MLP (intermediate_size: the experts')
)
"""Config widths one TP rank holds 1 / TP of (memplan.activations.layout.local_architecture,
plus Llama 4's dense MLP width)."""


def local_config(config: Mapping[str, Any], tensor: int, vocab_rows: int) -> dict[str, Any]:
    """`config` (a config.json mapping) as one TP rank of `tensor` ranks runs it: SPLIT_KEYS
    / tensor, head_dim pinned to the whole model's, `vocab_rows` vocabulary rows. One
    MemplanError when the slice is not sound."""
    model_type = config.get("model_type")
    cfg = _config(config)
    head_dim = getattr(cfg, "head_dim", None)
    why = ""
    if not isinstance(config.get("num_attention_heads"), int):
        why = (
            "its config.json has no top-level num_attention_heads (a nested text model, or "
            "other names for the widths)"
        )
    elif not isinstance(head_dim, int):
        # transformers' convention where the config leaves head_dim out; the built model must
        # then show it reads the pinned value (check_heads with `required`)
        head_dim = int(cfg.hidden_size) // int(config["num_attention_heads"])
    unknown = sorted(
        k
        for k, v in config.items()
        if isinstance(v, int)
        and not isinstance(v, bool)
        and ("heads" in k or "intermediate" in k)
        and k not in SPLIT_KEYS
    )
    if not why and unknown:
        why = f"its config has widths memplan does not know how TP splits ({', '.join(unknown)})"
    local = dict(config)
    for key in SPLIT_KEYS:
        value = config.get(key)
        if why or not isinstance(value, int) or isinstance(value, bool):
            continue
        if value % tensor:
            why = f"{key} {value} is not divisible by tensor {tensor}"
            continue
        local[key] = value // tensor
    if why:
        raise MemplanError(
            f"activations of {model_type!r} under tensor parallelism are not traced: {why}.",
            field="parallelism.tensor",
        )
    local["head_dim"] = head_dim
    local["vocab_size"] = vocab_rows
    pad = local.get("pad_token_id")
    if isinstance(pad, int) and pad >= vocab_rows:
        # nn.Embedding refuses a padding_idx past its rows; the padding row only masks the
        # embedding's gradient, never a saved tensor (the trace's inputs are token 0).
        local["pad_token_id"] = None
    return local


def pinned_without_key(config: Mapping[str, Any]) -> bool:
    """Whether `local_config` pinned a head_dim the whole config's class does not give (then
    the model built from the slice must show it reads it: `check_heads(..., required=True)`)."""
    return not isinstance(getattr(_config(config), "head_dim", None), int)


def _config(config: Mapping[str, Any]) -> Any:
    model_type = config.get("model_type")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    try:
        return transformers.AutoConfig.for_model(str(model_type), **kwargs)
    except (KeyError, ValueError) as err:
        raise MemplanError(f"transformers cannot build model_type {model_type!r}: {err}") from None


def check_heads(model: torch.nn.Module, head_dim: int, *, required: bool = False) -> None:
    """Refuse a TP-local model whose attention modules hold a head width other than the whole
    model's `head_dim` (code that derives it from hidden_size // num_attention_heads); with
    `required` (the whole config had no head_dim), also one where no module holds it."""
    seen = False
    for name, module in model.named_modules():
        width = getattr(module, "head_dim", None)
        seen = seen or width == head_dim
        if isinstance(width, int) and width != head_dim:
            raise MemplanError(
                f"activations of {type(model).__name__} under tensor parallelism are not "
                f"traced: its module {name} computes head_dim {width} on one TP rank's slice "
                f"(the whole model's is {head_dim}): the code does not read config.head_dim.",
                field="parallelism.tensor",
            )
    if required and not seen:
        raise MemplanError(
            f"activations of {type(model).__name__} under tensor parallelism are not traced: "
            "its config has no head_dim and no module of the model shows the head width it "
            "uses, so slicing its heads could trace other widths.",
            field="parallelism.tensor",
        )
