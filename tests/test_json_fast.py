"""`memplan estimate --json` builds its document as plain dicts (memplan.report.json.
estimate_json: the builders with every model replaced by `dict`), so that the CLI neither
imports nor validates the document models. The contract stays the models: the oracle here is
the model path, `dump(estimate_document(report))` (pydantic builds every model in strict mode
and dumps it in its field order), and the fast path must equal it to the key order and the
Python type of every value, and print the same bytes. tests/test_schema.py validates the CLI's
own output against the models and the JSON Schema as before.

Cases: every shipped config, every preset, and layouts that fill the sections the shipped
configs leave empty (pipeline stages, tensor and sequence parallelism on fsdp2 and megatron,
a MoE under expert parallelism, host offload).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from memplan.config.load import LoadedSpec, load_spec, validate
from memplan.model.load import load_inventory, presets
from memplan.report.estimate import estimate
from memplan.report.json import dump, estimate_document, estimate_json
from tests.conftest import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "plan" not in p.name)

BASE: dict[str, Any] = {"training": {"sequence_length": 512}, "precision": "bf16-mixed"}
LAYOUTS: dict[str, dict[str, Any]] = {
    "llama-fsdp2-tp-sp": {
        "model": {"preset": "llama-3.1-8b"},
        "parallelism": {"engine": "fsdp2", "data": 4, "tensor": 2, "sequence_parallel": True},
    },
    "llama-megatron-pp": {
        "model": {"preset": "llama-3.1-8b"},
        "parallelism": {"engine": "megatron", "data": 2, "tensor": 2, "pipeline": 4},
    },
    "mixtral-megatron-ep": {
        "model": {"preset": "mixtral-8x7b"},
        "parallelism": {"engine": "megatron", "data": 4, "expert": 4},
    },
    "llama-zero3-offload": {
        "model": {"preset": "llama-3.1-8b"},
        "parallelism": {
            "engine": "deepspeed",
            "zero_stage": 3,
            "data": 8,
            "offload": {"optimizer": "cpu", "parameters": "cpu"},
        },
    },
}


def differs(fast: Any, model: Any, path: str = "$") -> str | None:
    """Where `fast` and `model` part: a type, a key (or its order), a length or a value."""
    if type(fast) is not type(model):
        return f"{path}: {type(fast).__name__} {fast!r:.80} vs {type(model).__name__} {model!r:.80}"
    if isinstance(fast, dict):
        if list(fast) != list(model):
            return f"{path}: keys {list(fast)} vs {list(model)}"
        return next((d for k in fast if (d := differs(fast[k], model[k], f"{path}.{k}"))), None)
    if isinstance(fast, list):
        if len(fast) != len(model):
            return f"{path}: {len(fast)} items vs {len(model)}"
        pairs = enumerate(zip(fast, model, strict=True))
        return next((d for i, (f, m) in pairs if (d := differs(f, m, f"{path}[{i}]"))), None)
    return None if fast == model else f"{path}: {fast!r} vs {model!r}"


def check(loaded: LoadedSpec) -> None:
    report = estimate(loaded.spec, load_inventory(loaded))
    fast = estimate_json(report)
    model = dump(estimate_document(report))
    assert differs(fast, model) is None, differs(fast, model)
    assert json.dumps(fast, indent=2) == json.dumps(model, indent=2)


@pytest.mark.parametrize("config", CONFIGS)
def test_fast_document_equals_the_models_on_shipped_configs(config: str) -> None:
    check(load_spec(ROOT / "configs" / config))


def test_fast_document_equals_the_models_on_every_preset() -> None:
    for preset in presets():
        check(validate({**BASE, "model": {"preset": preset}}))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fast_document_equals_the_models_on_other_layouts(name: str) -> None:
    check(validate({**BASE, **LAYOUTS[name]}))


def test_differs_finds_a_tuple_a_key_order_and_a_bool() -> None:
    """The comparison is strict enough to catch what `==` alone would let through."""
    assert differs({"a": (1,)}, {"a": [1]}) is not None
    assert differs({"a": 1, "b": 2}, {"b": 2, "a": 1}) is not None
    assert differs({"a": True}, {"a": 1}) is not None
    assert differs({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}) is None


def test_the_json_path_imports_no_document_model() -> None:
    """What the fast road is for: `estimate_json` needs memplan.report.schema not at all."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from memplan.config.load import load_spec\n"
        "from memplan.model.load import load_inventory\n"
        "from memplan.report.estimate import estimate\n"
        "from memplan.report.json import estimate_json\n"
        "loaded = load_spec(Path('configs/llama-3-8b.yaml'))\n"
        "estimate_json(estimate(loaded.spec, load_inventory(loaded)))\n"
        "print(sorted(m for m in sys.modules if m.startswith('memplan.report.schema')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
