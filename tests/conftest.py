"""Shared test helpers: a spec factory with overrides, and paths to test data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from memplan.load import validate
from memplan.models import from_config
from memplan.spec import Spec

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent

# A Llama-shaped model small enough to build for real in tests (1,041-token vocabulary so
# that no world size up to 8 divides it).
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1041,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def make_spec(**overrides: Any) -> Spec:
    """A valid spec (tiny Llama, AdamW, bf16-mixed, one rank) with sections overridden."""
    base: dict[str, Any] = {
        "model": {"architecture": TINY_LLAMA},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 1, "sequence_length": 32},
        "parallelism": {"data": 1},
    }
    merged = deep_merge(base, overrides)
    if "model" in overrides:  # a model is replaced whole: its sources are exclusive
        merged["model"] = overrides["model"]
    return validate(merged).spec


@pytest.fixture
def tiny_inventory():  # type: ignore[no-untyped-def]
    return from_config(TINY_LLAMA)
