"""The architecture families memplan models: one module each (its tensors, its saved-tensor
rule and its `Family` record, memplan.model.families.record), registered here.

Adding a family: write memplan/model/families/<family>.py ending in `FAMILY = Family(...)`,
and add it to FAMILIES below.
"""

from __future__ import annotations

from memplan.model.families import (
    bert,
    bloom,
    deepseek,
    falcon,
    gemma,
    gpt2,
    gpt_neox,
    gptj,
    llama,
    mixtral,
    olmo2,
    opt,
    phi3,
    qwen_moe,
    t5,
)
from memplan.model.families.record import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    mixtral.FAMILY,
    qwen_moe.FAMILY,
    gemma.FAMILY,
    gemma.GEMMA3,
    phi3.FAMILY,
    olmo2.FAMILY,
    deepseek.FAMILY,
    gpt2.FAMILY,
    gpt_neox.FAMILY,
    gptj.FAMILY,
    opt.FAMILY,
    bloom.FAMILY,
    falcon.FAMILY,
    bert.FAMILY,
    bert.ROBERTA,
    t5.FAMILY,
)

BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
"""config.json model_type -> its family."""


def family_of(model_type: str) -> Family | None:
    """The family that serves `model_type`, or None."""
    return BY_MODEL_TYPE.get(model_type)


def supported_model_types() -> list[str]:
    """Every model_type memplan builds an inventory for, sorted."""
    return sorted(BY_MODEL_TYPE)


def modelled_model_types() -> list[str]:
    """The model_types whose activations have a rule, sorted."""
    return sorted(t for t, f in BY_MODEL_TYPE.items() if f.modelled)


__all__ = [
    "BY_MODEL_TYPE",
    "FAMILIES",
    "Family",
    "family_of",
    "modelled_model_types",
    "supported_model_types",
]
