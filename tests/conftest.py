"""Shared test helpers: a spec factory with overrides, and paths to test data."""

from __future__ import annotations

import ast
import copy
import importlib
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.config.spec import Spec
from memplan.model.forward.tensors import Activations
from memplan.model.inventory import Inventory
from memplan.model.sources import from_config

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent

# Libraries only memplan/verify/ uses: a test module that needs one at its top (an import, or
# `pytest.importorskip`) has its tests marked `torch`; `make test-min` (-m "not torch") runs the
# rest, with or without torch installed.
TORCH_LIBRARIES = frozenset({"torch", "transformers", "peft"})


def _needs_at_top(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported, modules importorskip-ed) by the module body of a test file."""
    imported: set[str] = set()
    skipped: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Expr | ast.Assign) and isinstance(node.value, ast.Call):
            call = node.value
            name = call.func.attr if isinstance(call.func, ast.Attribute) else None
            if name == "importorskip" and call.args and isinstance(call.args[0], ast.Constant):
                skipped.add(str(call.args[0].value).split(".")[0])
    return imported, skipped


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


_TESTS = sorted(Path(__file__).parent.glob("test_*.py"))
_NEEDS = {p.name: _needs_at_top(p) for p in _TESTS}

# Without torch, modules that import it at their top are not collected at all (the others
# skip themselves through pytest.importorskip).
collect_ignore = (
    []
    if _importable("torch")
    else [name for name, (imported, _) in _NEEDS.items() if imported & TORCH_LIBRARIES]
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        imported, skipped = _NEEDS.get(item.path.name, (set(), set()))
        if (imported | skipped) & TORCH_LIBRARIES:
            item.add_marker(pytest.mark.torch)


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


def micro_batch_of(spec: Spec, inventory: Inventory) -> Activations:
    """memplan.activations.micro_batch for a spec, unpacked as memplan.report.estimate does."""
    from memplan import activations
    from memplan.report.settings import layout_of, setting_of

    return activations.micro_batch(inventory, setting_of(spec), layout_of(spec), spec.finetune)


def on_rank_of(spec: Spec, inventory: Inventory, micro: Activations, rank: int) -> Activations:
    """memplan.activations.on_rank for a spec's layout and gradient accumulation steps."""
    from memplan import activations
    from memplan.report.settings import layout_of

    steps = spec.training.gradient_accumulation_steps
    return activations.on_rank(inventory, micro, layout_of(spec), rank, steps)


@pytest.fixture(autouse=True)
def _private_profile_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> None:
    """Profiles traced by a test (estimate and plan trace one for a model with no rule) go to a
    folder of that test, never the user's ~/.cache/memplan nor another test's: what a test
    sees does not depend on the order tests run in. A test that sets MEMPLAN_CACHE itself
    (monkeypatch) wins."""
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path_factory.mktemp("memplan-cache")))
