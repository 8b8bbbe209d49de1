"""A config.json as a transformers model on the meta device (no memory, no download): what a
user of the peer tools would hand them. Needs torch and transformers (the bench env has both).
"""

from __future__ import annotations

import warnings
from typing import Any


def hf_config(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(config)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def meta_model(config: dict[str, Any], *, head: bool = True) -> Any:
    """AutoModelForCausalLM (head=True) or AutoModel (the base model, as `accelerate
    estimate-memory` builds it) in float32 on the meta device."""
    import torch
    import transformers

    auto: Any = transformers.AutoModelForCausalLM if head else transformers.AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return auto.from_config(hf_config(config), dtype=torch.float32)


def parameter_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, largest module's own parameters) of the causal-LM model.

    Tied weights count once. DeepSpeed's `model_to_params` dedupes by `data_ptr()`, which
    is 0 for every meta tensor (field notes), so dedupe by identity instead; the largest
    "layer" is DeepSpeed's: the most parameters one module holds itself (recurse=False).
    """
    model = meta_model(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return int(total), int(largest)
