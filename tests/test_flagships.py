"""The flagship presets, the inventories and profiles memplan ships for them, and the stored
inventory that lets `estimate` serve a model without a hand-written family without torch.

Oracles: transformers' own meta-device build of each shipped preset (the stored inventory must
equal it tensor by tensor), `memplan.model.profile.config_hash` of the config as the user wrote
it (the key `estimate` looks a profile up by), and `sys.modules` of a real `memplan estimate`
process. benchmarks/flagships.py builds the shipped files and the README table
(benchmarks/results/flagships.json); these tests check a representative part.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model import stored
from memplan.model.load import PRESET_DIR, PROFILE_DIR, find_inventory
from memplan.model.profile import config_hash
from tests.conftest import ROOT

SHIPPED_INVENTORIES = sorted(PROFILE_DIR.glob("*.inventory.json"))
SHIPPED_PROFILES = sorted(p for p in PROFILE_DIR.glob("*.json") if p not in SHIPPED_INVENTORIES)


def presets_by_hash() -> dict[str, str]:
    out = {}
    for file in PRESET_DIR.glob("*.json"):
        out[config_hash(json.loads(file.read_text()))] = file.stem
    return out


def tiny_gpt_oss() -> dict[str, Any]:
    """gpt-oss-120b's preset, narrowed: its rope_scaling dict is what GptOssConfig edits in
    place (it adds rope_theta), the case that hid profiles from estimate."""
    config = json.loads((PRESET_DIR / "gpt-oss-120b.json").read_text())
    return {
        **config,
        "hidden_size": 64,
        "intermediate_size": 64,
        "head_dim": 16,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "experts_per_token": 2,
        "vocab_size": 256,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4,
    }


def rows(inventory: Any) -> list[tuple[Any, ...]]:
    return [
        (t.name, t.shape, t.kind, t.dtype, t.persistent, t.layer, t.role, t.trainable, t.gradient)
        for t in (*inventory.parameters, *inventory.buffers)
    ]


def test_shipped_files_are_keyed_to_a_shipped_preset_and_small() -> None:
    """Every shipped file belongs to a preset as it is now (no orphan left by an edited config)
    and the package stays small (the shipped profiles and inventories together under 1 MiB)."""
    hashes = presets_by_hash()
    assert SHIPPED_PROFILES and SHIPPED_INVENTORIES
    for file in (*SHIPPED_PROFILES, *SHIPPED_INVENTORIES):
        doc = json.loads(file.read_text())
        digest = doc["key"]["config_hash"] if "key" in doc else doc["config_hash"]
        assert digest in hashes, f"{file.name}: no preset has config hash {digest[:12]}"
    total = sum(f.stat().st_size for f in (*SHIPPED_PROFILES, *SHIPPED_INVENTORIES))
    assert total < 2**20, total


@pytest.mark.parametrize("file", SHIPPED_INVENTORIES, ids=lambda p: p.name.split("-")[0])
def test_shipped_inventory_equals_the_meta_build(file: Path) -> None:
    """Independent oracle: transformers (installed version) builds the preset on the meta device;
    the shipped inventory must list the same tensors, tied aliases and architecture. A new
    transformers release that changes a model shows up here, named: rerun
    benchmarks/flagships.py."""
    pytest.importorskip("transformers")
    from memplan.verify.trace.meta import inventory_from_config

    preset = presets_by_hash()[json.loads(file.read_text())["config_hash"]]
    config = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    kept = find_inventory(config)
    assert kept is not None
    built = inventory_from_config(copy.deepcopy(config), origin=preset)
    assert rows(kept) == rows(built)
    assert kept.tied == built.tied
    assert kept.architecture == built.architecture
    assert kept.num_parameters == built.num_parameters


def test_profile_is_keyed_by_the_config_as_given(tmp_path: Path) -> None:
    """The trace must not key its profile by the config transformers edited in place
    (GptOssConfig adds rope_theta to rope_scaling): estimate hashes the file's config."""
    pytest.importorskip("transformers")
    from memplan.verify.trace.profile import build

    config = tiny_gpt_oss()
    before = copy.deepcopy(config)
    doc = build(config, stream="bf16", matmul="bf16", autocast=False, attention="eager")
    assert config == before
    assert doc["key"]["config_hash"] == config_hash(before)


def test_stored_inventory_round_trips_a_meta_build() -> None:
    pytest.importorskip("transformers")
    from memplan.verify.trace import stored as writer
    from memplan.verify.trace.meta import inventory_from_config

    config = tiny_gpt_oss()
    doc = json.loads(json.dumps(writer.document(config)))
    back = stored.from_document(doc, origin="test")
    built = inventory_from_config(copy.deepcopy(config))
    assert doc["config_hash"] == config_hash(config)
    assert rows(back) == rows(built)
    assert back.architecture == built.architecture
    assert any("stored" in note for note in back.notes)


def test_a_broken_stored_inventory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match=r"x\.inventory\.json is not a memplan stored"):
        stored.from_document({"schema": 1, "name": "m"}, origin=str(tmp_path / "x.inventory.json"))
    with pytest.raises(MemplanError, match="schema 9"):
        stored.from_document({"schema": 9}, origin="f")


SPEC = """model:
  preset: gpt-oss-120b
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 1
  sequence_length: 4096
  activation_checkpointing: full
  attention: eager
parallelism:
  engine: fsdp2
  data: 64
  expert: 8
hardware:
  gpu: H100-80GB
"""
PROBE = (
    "import sys, runpy; sys.argv = ['memplan', 'estimate', {spec!r}, '--json']\n"
    "try:\n    runpy.run_module('memplan', run_name='__main__')\n"
    "except SystemExit as e:\n    assert not e.code, e.code\n"
    "sys.stderr.write('TORCH=%d' % ('torch' in sys.modules or 'transformers' in sys.modules))\n"
)


def test_estimate_of_a_shipped_flagship_imports_no_torch(tmp_path: Path) -> None:
    """gpt-oss has no hand-written family: with an empty user cache, the shipped inventory and
    profile serve, in a real `memplan estimate` process that never imports torch."""
    spec = tmp_path / "gpt-oss.yaml"
    spec.write_text(SPEC)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(spec=str(spec))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"MEMPLAN_CACHE": str(tmp_path / "cache"), "PATH": "", "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert out.stderr.endswith("TORCH=0"), out.stderr
    doc = json.loads(out.stdout)
    assert doc["activations"]["source"] == "profile"
    assert doc["per_gpu"]["activations"] > 0
    # OpenAI's gpt-oss model card: 116.8B parameters in total (116.83B in its table).
    assert round(doc["model"]["num_parameters"] / 1e8) == 1168


def test_flagship_results_cover_every_flagship() -> None:
    """benchmarks/results/flagships.json has a row per flagship of the script, each preset is
    shipped with its source named, and the README block renders every row."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    from benchmarks.flagships import FLAGSHIPS

    doc = json.loads((ROOT / "benchmarks/results/flagships.json").read_text())
    assert [r["preset"] for r in doc["rows"]] == [f["preset"] for f in FLAGSHIPS]
    sources = (PRESET_DIR / "SOURCES.md").read_text()
    for flagship in FLAGSHIPS:
        assert (PRESET_DIR / f"{flagship['preset']}.json").is_file()
        assert f"- {flagship['preset']}.json:" in sources
    spec = importlib.util.spec_from_file_location("gen_readme", ROOT / "scripts/gen_readme.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    block = gen.flagships(doc)
    for flagship in FLAGSHIPS:
        assert f"| {flagship['label']} |" in block


def test_profile_build_results_show_a_torch_free_start_up() -> None:
    """benchmarks/results/profile-build.json, measured in real processes: both start-ups
    (shipped profile, hand rule) imported neither torch nor transformers, and the README block
    renders from it."""
    import importlib.util

    doc = json.loads((ROOT / "benchmarks/results/profile-build.json").read_text())
    assert doc["startup"]["profile"]["imported"] == []
    assert doc["startup"]["rule"]["imported"] == []
    assert any("100 layers" in row["case"] for row in doc["build"])
    spec = importlib.util.spec_from_file_location("gen_readme", ROOT / "scripts/gen_readme.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert "neither importing torch" in gen.profile_build(doc)


def test_the_deepseek_v3_preset_ships_its_profile(tmp_path: Path) -> None:
    """DeepSeek-V3 has a hand family for its tensors but no activation rule: the preset ships
    the CUDA profile of the common large-scale setting (bf16-mixed, sdpa, full recomputation),
    so that estimate needs no torch there (`--no-trace`: only shipped files serve)."""
    spec = tmp_path / "dsv3.yaml"
    spec.write_text(
        "model: {preset: deepseek-v3}\nprecision: bf16-mixed\noptimizer: {name: adamw}\n"
        "training: {micro_batch_size: 1, sequence_length: 4096, activation_checkpointing: full}\n"
        "parallelism: {engine: fsdp2, data: 256, expert: 32}\nhardware: {gpu: H100-80GB}\n"
    )
    code = PROBE.format(spec=str(spec)).replace("'--json']", "'--json', '--no-trace']")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"MEMPLAN_CACHE": str(tmp_path / "cache"), "PATH": "", "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert out.stderr.endswith("TORCH=0"), out.stderr
    doc = json.loads(out.stdout)
    assert doc["activations"]["source"] == "profile"
    assert doc["per_gpu"]["activations"] > 0
