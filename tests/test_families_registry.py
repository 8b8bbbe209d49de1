"""The family registry (memplan.model.families): every family is one record, complete, and the
only place a model_type's facts live.

The `test_structure_*` tests check the registry's shape (no oracle: they prove nothing is
missing or duplicated). The `test_peft_*` tests compare the records with peft's own tables
(an independent oracle: peft 0.21.2's code)."""

from __future__ import annotations

import ast
import importlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from memplan.model.families import (
    BY_MODEL_TYPE,
    FAMILIES,
    REGISTRY,
    Family,
    family_of,
    supported_model_types,
)
from memplan.model.load import find_inventory
from memplan.model.sources import from_config

ROOT = Path(__file__).resolve().parent.parent
FAMILY_DIR = ROOT / "memplan" / "model" / "families"


def test_structure_every_family_is_complete() -> None:
    """Tensors, a saved rule or an explicit not-modelled reason, and peft's default targets
    (PEFT_HAS_NONE, the empty tuple, where peft has none) on every record."""
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for f in FAMILIES:
        assert f.model_types, f.name
        assert callable(f.tensors), f.name
        assert callable(f.saved) or (isinstance(f.saved, str) and f.saved), f.name
        assert isinstance(f.peft_targets, tuple), f.name
        assert all(isinstance(t, str) and t for t in f.peft_targets), f.name
        assert set(f.peft_moe) <= set(f.model_types), f.name
        # LoRA / frozen activations and TP refusals refine a rule that exists.
        assert f.lora_ends is None or f.modelled, f.name
        assert not f.tp_refusal or f.modelled, f.name


def test_structure_each_model_type_has_one_family() -> None:
    counts = Counter(t for f in FAMILIES for t in f.model_types)
    assert [t for t, n in counts.items() if n > 1] == []
    assert sorted(counts) == supported_model_types() == sorted(BY_MODEL_TYPE)


def test_structure_registry_names_every_record() -> None:
    """The registry that imports a family's module on lookup names, for each record, exactly
    the model_types the record serves, and every family module of the folder is in it."""
    for module, attribute, model_types in REGISTRY:
        record = getattr(importlib.import_module(f"memplan.model.families.{module}"), attribute)
        assert isinstance(record, Family), (module, attribute)
        assert record.model_types == model_types, (module, attribute)
    records = [
        (p.stem, name)
        for p in sorted(FAMILY_DIR.glob("*.py"))
        if not p.stem.startswith("_") and p.stem != "record"
        for name, value in vars(importlib.import_module(f"memplan.model.families.{p.stem}")).items()
        if isinstance(value, Family)
    ]
    assert sorted(records) == sorted((m, a) for m, a, _ in REGISTRY)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_structure_each_model_type_builds_itself(model_type: str) -> None:
    """The family's builder, given only the model_type, builds a model of that type."""
    inventory = from_config({"model_type": model_type})
    assert inventory.architecture is not None
    assert inventory.architecture.model_type == model_type


def _model_types_in(folder: Path) -> set[str]:
    out = set()
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("model_type"), str):
            out.add(data["model_type"])
    return out


@pytest.mark.parametrize(
    "folder",
    [ROOT / "tests" / "data" / "hf-configs", ROOT / "memplan" / "model" / "presets"],
    ids=["tests-data-hf-configs", "presets"],
)
def test_structure_shipped_model_types_resolve(folder: Path) -> None:
    """Every config shipped with memplan (the presets) or its tests (the hf-configs, copies of
    the shared reference configs) names a registered model_type, or (a flagship preset without
    a hand family) ships its stored inventory (memplan.model.stored), so no preset needs torch."""
    found = _model_types_in(folder)
    assert found
    unserved = []
    for path in sorted(folder.glob("*.json")):
        config = json.loads(path.read_text())
        mt = config.get("model_type") if isinstance(config, dict) else None
        if isinstance(mt, str) and family_of(mt) is None and find_inventory(config) is None:
            unserved.append(path.name)
    assert unserved == []


def test_structure_no_family_imports_a_sibling() -> None:
    """A family module imports shared helpers (underscored modules, the record, model/forward),
    never another family."""
    families = {p.stem for p in FAMILY_DIR.glob("*.py") if not p.stem.startswith("_")}
    families -= {"record"}
    for path in sorted(FAMILY_DIR.glob("*.py")):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module.rsplit(".", 1)[-1]} | {a.name for a in node.names}
                if node.module.startswith("memplan.model.families"):
                    assert not (names & families) - {path.stem}, f"{path.name}: {node.module}"


def test_structure_no_model_type_string_tests_outside_the_families() -> None:
    """A family's quirks are data on its record: no stage tests a model_type by name."""
    pattern = re.compile(r"model_type\s*(==|!=|in)\s*[\"'(]")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "memplan").rglob("*.py"))
        if FAMILY_DIR not in path.parents
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_peft_targets_are_peft_defaults() -> None:
    """Each model_type's `peft_targets` are peft's default target_modules (none where peft
    has none), looked up as peft does: by the built config's model_type (`model.config.
    model_type`, peft 0.21.2 tuners_utils.py: "gpt2" for a config that said "gpt-sw3")."""
    constants = pytest.importorskip("peft.utils.constants")
    transformers = pytest.importorskip("transformers")
    mapping = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, family in BY_MODEL_TYPE.items():
        built = getattr(transformers.CONFIG_MAPPING[model_type], "model_type", model_type)
        assert family.peft_targets == tuple(mapping.get(built, ())), model_type


def test_peft_moe_conversion_is_peft_s() -> None:
    """Each model_type's `peft_moe` is the mapping peft's _convert_peft_config_moe applies
    (None where it returns early)."""
    conversion = pytest.importorskip("peft.utils.transformers_weight_conversion")
    for model_type, family in BY_MODEL_TYPE.items():
        base = conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type)
        applies = (
            base is not None
            and bool(conversion._MOE_TARGET_MODULE_MAPPING.get(base))
            and bool(conversion._MOE_FUSED_TARGETS.get(base))
        )
        assert family.peft_moe.get(model_type) == (base if applies else None), model_type


def test_transformers_aliases_are_served_by_their_config_class_family() -> None:
    """A model_type transformers maps to another type's config class (CONFIG_MAPPING, e.g.
    "gpt-sw3" -> GPT2Config) builds that type's model, so the family serving the class's own
    model_type serves it too (an independent oracle: transformers 5.25's mapping). Without
    it the meta build reported the class's model_type and the thin inventory it reads met that
    family's rule: gpt-sw3's MLP width read as 0, its activations 48% low."""
    transformers = pytest.importorskip("transformers")
    aliases = {}
    for key in transformers.CONFIG_MAPPING.keys():
        own = getattr(transformers.CONFIG_MAPPING[key], "model_type", key)
        if own != key and family_of(own) is not None:
            aliases[key] = own
    assert aliases  # gpt-sw3 today
    for key, own in aliases.items():
        family = family_of(key)
        assert family is not None and family is family_of(own), (key, own)
