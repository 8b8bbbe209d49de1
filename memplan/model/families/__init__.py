"""The architecture families memplan models: one module each (its tensors, its saved-tensor
rule and its `Family` record, memplan.model.families.record), registered here.

Adding a family: write memplan/model/families/<family>.py ending in `FAMILY = Family(...)`,
and add its model_types to REGISTRY below (tests/test_families_registry.py checks that the
registry names exactly the model_types each record serves).

A family's module is imported when a model of its type is looked up (`family_of`), not when
this package is: `memplan estimate` on a Llama spec imports the Llama family only (issue 21).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from memplan.model.families.record import Family

REGISTRY: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("llama", "FAMILY", ("llama", "mistral", "qwen2", "qwen3")),
    ("mixtral", "FAMILY", ("mixtral",)),
    ("qwen_moe", "FAMILY", ("qwen2_moe", "qwen3_moe")),
    ("gemma", "FAMILY", ("gemma", "gemma2", "gemma3_text")),
    ("gemma", "GEMMA3", ("gemma3",)),
    ("phi3", "FAMILY", ("phi3",)),
    ("phi", "FAMILY", ("phi",)),
    ("olmo2", "FAMILY", ("olmo2",)),
    ("deepseek", "FAMILY", ("deepseek_v2", "deepseek_v3")),
    ("gpt2", "FAMILY", ("gpt2", "gpt-sw3")),
    ("gpt_neox", "FAMILY", ("gpt_neox",)),
    ("gptj", "FAMILY", ("gptj",)),
    ("opt", "FAMILY", ("opt",)),
    ("bloom", "FAMILY", ("bloom",)),
    ("falcon", "FAMILY", ("falcon",)),
    ("bert", "FAMILY", ("bert",)),
    ("bert", "ROBERTA", ("roberta",)),
    ("t5", "FAMILY", ("t5",)),
)
"""(module under memplan.model.families, its record's name, the model_types it serves), in
the order the docs list the families."""

_WHERE: dict[str, tuple[str, str]] = {t: (m, a) for m, a, types in REGISTRY for t in types}
_LOADED: dict[tuple[str, str], Family] = {}


def _record(module: str, attribute: str) -> Family:
    """The record `attribute` of memplan.model.families.`module`, its module imported once."""
    record = _LOADED.get((module, attribute))
    if record is None:
        record = getattr(import_module(f"{__name__}.{module}"), attribute)
        assert isinstance(record, Family), (module, attribute)
        _LOADED[module, attribute] = record
    return record


def family_of(model_type: str) -> Family | None:
    """The family that serves `model_type`, or None (imports that family's module only)."""
    where = _WHERE.get(model_type)
    return None if where is None else _record(*where)


def all_families() -> tuple[Family, ...]:
    """Every family's record, in REGISTRY order (imports every family module)."""
    return tuple(_record(m, a) for m, a, _ in REGISTRY)


def supported_model_types() -> list[str]:
    """Every model_type memplan builds an inventory for, sorted."""
    return sorted(_WHERE)


def modelled_model_types() -> list[str]:
    """The model_types whose activations have a rule, sorted."""
    return sorted(t for f in all_families() if f.modelled for t in f.model_types)


if TYPE_CHECKING:
    FAMILIES: tuple[Family, ...]
    """Every family's record (all_families())."""
    BY_MODEL_TYPE: dict[str, Family]
    """config.json model_type -> its family."""


def __getattr__(name: str) -> Any:
    """FAMILIES and BY_MODEL_TYPE, built on first use (they import every family module)."""
    if name == "FAMILIES":
        return all_families()
    if name == "BY_MODEL_TYPE":
        return {t: f for f in all_families() for t in f.model_types}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BY_MODEL_TYPE",
    "FAMILIES",
    "REGISTRY",
    "Family",
    "all_families",
    "family_of",
    "modelled_model_types",
    "supported_model_types",
]
