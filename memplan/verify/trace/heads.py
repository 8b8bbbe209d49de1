"""The head a config.json's `architectures` names, and the loss inputs transformers takes for it.

Language-model heads (CausalLM, MaskedLM, LMHead) take `labels = input_ids`. The other heads a
profile traces, with the labels each one's loss reads (transformers/loss/loss_utils.py at 5.25):

- *ForSequenceClassification: `labels` [batch], int64 class ids when num_labels > 1
  (`ForSequenceClassificationLoss`: single_label_classification, cross entropy over
  [batch, num_labels]); float [batch] when num_labels == 1 (regression, MSE);
- *ForTokenClassification: `labels` [batch, sequence] int64 (`ForTokenClassification`: the
  logits upcast to fp32, cross entropy per token);
- *ForQuestionAnswering: `start_positions` and `end_positions` [batch] int64
  (`ForQuestionAnsweringLoss`: cross entropy over the sequence, start and end).

Used by the trace (memplan.verify.trace.profile) and by verify (memplan.verify.build /
rank), so both build and run the same head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

LM = ("CausalLM", "MaskedLM", "LMHead")
OTHER = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
}


def kind_of_name(name: str) -> str | None:
    """ "lm", one of OTHER's kinds, or None for a class name."""
    if any(k in name for k in LM):
        return "lm"
    return next((kind for suffix, kind in OTHER.items() if name.endswith(suffix)), None)


def head_class(config: Mapping[str, Any]) -> tuple[str, Any | None]:
    """The head kind and the transformers class of the first `architectures` entry that names
    one transformers exports (None: the caller's default, a causal LM)."""
    import transformers

    for name in config.get("architectures") or ():
        kind = kind_of_name(str(name))
        cls = getattr(transformers, str(name), None)
        if kind is not None and cls is not None:
            return kind, cls
    return "lm", None


def loss_inputs(
    kind: str, ids: torch.Tensor, num_labels: int, *, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The model's keyword inputs beside `input_ids` for its loss: zeros under fake tensors
    (`generator` None), random valid targets on real ones."""
    b, s = ids.shape

    def targets(shape: tuple[int, ...], high: int) -> torch.Tensor:
        if generator is None:
            return torch.zeros(shape, dtype=torch.int64, device=ids.device)
        return torch.randint(0, high, shape, generator=generator).to(ids.device)

    if kind == "lm":
        return {"labels": ids.clone()}
    if kind == "sequence_classification":
        if num_labels == 1:
            return {"labels": targets((b,), 2).to(torch.float32)}
        return {"labels": targets((b,), num_labels)}
    if kind == "token_classification":
        return {"labels": targets((b, s), num_labels)}
    if kind == "question_answering":
        return {"start_positions": targets((b,), s), "end_positions": targets((b,), s)}
    raise ValueError(f"head kind {kind!r}")
