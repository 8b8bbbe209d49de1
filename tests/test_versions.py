"""The library versions memplan's rules describe (issue 15): one place (memplan/versions.py),
the spec key that picks the transformers release, the installed release read at the edge,
`rules` in estimate --json and the table, verify's warnings, and the pins (constraints.txt,
pyproject floors, Makefile). No torch needed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
from typer.testing import CliRunner

from memplan import versions
from memplan.cli.app import app
from memplan.config import load
from memplan.errors import MemplanError
from memplan.report import schema
from memplan.verify import runner as vrunner
from memplan.verify.result import RankResult, Row, VerifyResult, to_json
from tests.conftest import ROOT, TINY_LLAMA

cli = CliRunner()

# Falcon-7B's layout, tiny (tests/test_activations_families.py's "falcon" case).
TINY_FALCON: dict[str, Any] = {
    "model_type": "falcon",
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "ffn_hidden_size": 100,
    "vocab_size": 777,
}


def write(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


# --- memplan/versions.py ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5.24", (5, 24)), ("5.25.0", (5, 25)), ("2.13.0+cpu", (2, 13)), ("5.26.0.dev0", (5, 26))],
)
def test_parse_reads_major_minor(text: str, expected: tuple[int, int]) -> None:
    assert versions.parse(text) == expected


@pytest.mark.parametrize("text", ["", "5", "banana", "x.1", "5.x"])
def test_parse_refuses_what_is_not_a_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        versions.parse(text)


def test_comparisons_are_numeric_not_textual() -> None:
    assert versions.at_most("5.9", "5.24")  # "5.9" > "5.24" as text
    assert not versions.at_most("5.100", "5.24")
    assert versions.same_minor("2.13.0+cpu", "2.13")
    assert not versions.same_minor("2.6.0", "2.13")


@pytest.mark.parametrize(
    ("declared", "rules"),
    [(None, "5.25"), ("5.25", "5.25"), ("5.26", "5.25"), ("5.24", "5.24"), ("5.23", "5.24")],
)
def test_rules_release(declared: str | None, rules: str) -> None:
    assert versions.rules_release(declared) == rules


def test_engine_versions_are_the_ones_the_engine_rules_cite() -> None:
    """ENGINES says what memplan/states/engines/*.py cite, not something else."""
    text = "".join(p.read_text() for p in (ROOT / "memplan" / "states").rglob("*.py"))
    assert f"DeepSpeed {versions.ENGINES['deepspeed']}" in text
    assert f"({versions.ENGINES['deepspeed']})" in text
    assert f"core_r{versions.ENGINES['megatron-core']}" in text
    assert f"({versions.ENGINES['torch']})" in text  # torch/distributed/... (2.13)
    assert versions.ENGINES["torch"] == versions.RULES_TORCH


# --- model.transformers_version --------------------------------------------------------------


def test_declared_version_is_kept_as_major_minor(tmp_path: Path) -> None:
    spec = {"model": {"architecture": TINY_LLAMA, "transformers_version": "5.24.0"}}
    loaded = load.load_spec(write(tmp_path, spec))
    assert loaded.spec.model.transformers_version == "5.24"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("5.24", None),
        ("4.46", "describe transformers 5.24 to 5.25"),
        ("banana", "not a version"),
        (5.24, "as a string"),
    ],
)
def test_bad_versions_name_the_field_and_line(tmp_path: Path, value: Any, says: str | None) -> None:
    path = tmp_path / "spec.yaml"
    shown = json.dumps(value)
    path.write_text(f"model:\n  preset: llama-3-8b\n  transformers_version: {shown}\n")
    if says is None:
        load.load_spec(path)
        return
    with pytest.raises(MemplanError) as err:
        load.load_spec(path)
    assert f"{path}:3" in str(err.value)
    assert "model.transformers_version" in str(err.value)
    assert says in str(err.value)


def test_cli_bad_version_is_one_paragraph_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text('model:\n  preset: llama-3-8b\n  transformers_version: "four"\n')
    out = cli.invoke(app, ["estimate", str(path)])
    assert out.exit_code != 0
    assert "Traceback" not in out.output
    assert "model.transformers_version" in out.stderr


def _installed(monkeypatch: pytest.MonkeyPatch, found: str | None) -> None:
    # memplan.config.load.installed_version reads the metadata's headers itself (it equals
    # importlib.metadata.version: tests/test_config_installed_version.py)
    def version(name: str) -> str | None:
        return found if name == "transformers" else None

    monkeypatch.setattr(load, "installed_version", version)


@pytest.mark.parametrize(
    ("found", "used"),
    [
        ("5.24.1", "5.24"),
        ("5.25.0", "5.25"),
        ("5.30.0", "5.30"),
        ("4.46.3", "5.25"),
        (None, "5.25"),
    ],
)
def test_undeclared_version_is_the_installed_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, found: str | None, used: str
) -> None:
    _installed(monkeypatch, found)
    loaded = load.load_spec(write(tmp_path, {"model": {"architecture": TINY_LLAMA}}))
    assert loaded.spec.model.transformers_version == used


def test_declared_version_wins_over_the_installed_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _installed(monkeypatch, "5.25.0")
    spec = {"model": {"architecture": TINY_LLAMA, "transformers_version": "5.24"}}
    assert load.load_spec(write(tmp_path, spec)).spec.model.transformers_version == "5.24"


# --- estimate: rules in --json and the table, and the Falcon rule it picks ---------------------


def _estimate_json(tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    out = cli.invoke(app, ["estimate", str(write(tmp_path, spec)), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_json_rules_name_the_versions(tmp_path: Path) -> None:
    spec = {"model": {"architecture": TINY_LLAMA, "transformers_version": "5.25"}}
    doc = _estimate_json(tmp_path, spec)
    assert doc["rules"] == {
        "torch": "2.13",
        "transformers": "5.25",
        "engines": {"deepspeed": "0.19.6", "megatron-core": "0.12", "torch": "2.13"},
    }
    schema.documents()["estimate"].model_validate(doc)


def test_json_rules_follow_the_declared_release(tmp_path: Path) -> None:
    spec = {"model": {"architecture": TINY_LLAMA, "transformers_version": "5.24"}}
    assert _estimate_json(tmp_path, spec)["rules"]["transformers"] == "5.24"


def test_schema_lists_rules() -> None:
    out = cli.invoke(app, ["schema", "estimate"])
    doc = json.loads(out.stdout)
    assert "rules" in doc["required"]
    assert set(doc["$defs"]["RulesInfo"]["properties"]) == {"torch", "transformers", "engines"}


def test_table_notes_the_rules(tmp_path: Path) -> None:
    spec = {"model": {"architecture": TINY_LLAMA, "transformers_version": "5.25"}}
    out = cli.invoke(app, ["estimate", str(write(tmp_path, spec)), "--width", "200"])
    assert out.exit_code == 0, out.output
    assert (
        "note: rules: torch 2.13, transformers 5.25 (activations); deepspeed 0.19.6, "
        "megatron-core 0.12, torch 2.13 (engines)" in out.stdout
    )


def test_falcon_estimate_follows_the_declared_release(tmp_path: Path) -> None:
    """The issue's falcon-eager-fp32 case through the whole CLI: saved bytes measured 245,024
    B (5.24) and 244,992 B (5.25) in the layers (tests/data/falcon_transformers_5_24.json and
    tests/test_activations_families.py); the rest of the step is the same."""
    docs = {}
    for release in ("5.24", "5.25"):
        spec = {
            "model": {"architecture": TINY_FALCON, "transformers_version": release},
            "precision": "fp32",
            "training": {"micro_batch_size": 2, "sequence_length": 24, "attention": "eager"},
        }
        docs[release] = _estimate_json(tmp_path, spec)
    old, new = (docs[r]["per_gpu"]["activations"] for r in ("5.24", "5.25"))
    assert old - new == 245_024 - 244_992


# --- verify: warnings when the installed versions differ -----------------------------------


@pytest.mark.parametrize(
    ("torch", "transformers", "rules", "warned"),
    [
        ("2.13.0+cpu", "5.25.0", "5.25", []),
        ("2.13.1", "5.25.2", "5.25", []),
        ("2.6.0", "5.25.0", "5.25", ["torch"]),
        ("2.13.0", "5.24.0", "5.25", ["transformers"]),
        ("2.13.0", "5.25.0", "5.24", ["transformers"]),
        ("2.12.0", "5.26.0", "5.25", ["torch", "transformers"]),
        (None, None, "5.25", []),
    ],
)
def test_mismatches(
    torch: str | None, transformers: str | None, rules: str, warned: list[str]
) -> None:
    out = versions.mismatches(torch=torch, transformers=transformers, rules_transformers=rules)
    assert [w.split()[1] for w in out] == warned


def _result(warnings: tuple[str, ...]) -> VerifyResult:
    row = Row(name="parameters", predicted=8, measured=8, tolerance=0.0)
    return VerifyResult(
        setup={
            "model": "tiny",
            "model_type": "llama",
            "num_parameters": 8,
            "device": "cpu",
            "fake": False,
            "engine": "ddp",
            "zero_stage": 0,
            "ranks": 1,
            "distributed": False,
            "precision": "fp32",
            "optimizer": "adamw",
            "optimizer_implementation": "torch",
            "layers": 2,
            "full_layers": 2,
            "micro_batch_size": 1,
            "sequence_length": 8,
            "attention": "sdpa",
            "activation_checkpointing": "none",
            "activation_offload": False,
            "dropout": None,
            "use_cache": False,
            "steps": 2,
            "torch": "2.13.0",
            "transformers": "5.24.0",
        },
        ranks=(RankResult(rank=0, rows=(row,)),),
        most_loaded=0,
        warnings=warnings,
    )


def test_verify_json_has_warnings_and_validates() -> None:
    doc = to_json(_result(("installed torch 2.6.0 differs from torch 2.13",)))
    assert doc["warnings"] == ["installed torch 2.6.0 differs from torch 2.13"]
    assert to_json(_result(()))["warnings"] == []


def test_verify_prints_warnings_on_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    warning = "installed transformers 5.24.0 differs from transformers 5.25"
    monkeypatch.setattr(vrunner, "verify", lambda *a, **k: _result((warning,)))
    path = write(tmp_path, {"model": {"architecture": TINY_LLAMA}})
    for extra in ([], ["--json"]):
        out = cli.invoke(app, ["verify", str(path), *extra])
        assert out.exit_code == 0, out.output
        assert f"warning: {warning}" in out.stderr
        assert warning not in out.stdout or extra == ["--json"]


def test_version_warnings_read_the_installed_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    found = {"torch": "2.6.0", "transformers": "5.25.0"}
    monkeypatch.setattr(vrunner, "installed_version", found.get)
    loaded = load.load_spec(write(tmp_path, {"model": {"architecture": TINY_LLAMA}}))
    (only,) = vrunner.version_warnings(loaded)
    assert only.startswith("installed torch 2.6.0 differs from torch 2.13")


# --- the pins ----------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {name: version for name, version in pairs}  # noqa: C416


def test_pin_constraints_pin_the_versions_the_rules_describe() -> None:
    pins = _pins()
    assert versions.same_minor(pins["torch"], versions.RULES_TORCH)
    assert versions.same_minor(pins["transformers"], versions.RULES_TRANSFORMERS)
    for name in ("peft", "safetensors", "tokenizers", "huggingface-hub", "pytest", "hypothesis"):
        assert name in pins
    for name in ("ruff", "mypy", "types-pyyaml", "jsonschema", "pydantic", "typer", "rich"):
        assert name in pins
    assert "pyyaml" in pins and "numpy" in pins and "memplan" not in pins


def test_pyproject_floors() -> None:
    """verify imports the public torch.distributed.fsdp.fully_shard: torch 2.6 onwards
    (pytorch/pytorch#141868); transformers from the oldest release the rules describe."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("torch", "verify", "test"):
        assert "torch>=2.6" in extras[extra]
    for extra in ("verify", "test"):
        assert f"transformers>={versions.OLDEST_TRANSFORMERS}" in extras[extra]
    pins = _pins()
    for extra in ("torch", "verify", "test"):
        for req in extras[extra]:
            m = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req)
            if m and m.group(1).lower() in pins:  # every floor admits the pinned version
                pinned = [int(x) for x in pins[m.group(1).lower()].split(".")[:3]]
                assert pinned >= [int(x) for x in m.group(2).split(".")], req


def test_makefile_installs_with_the_constraints_and_names_no_missing_test_file() -> None:
    text = (ROOT / "Makefile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    for name in re.findall(r"tests/[\w/]+\.py", text):
        assert (ROOT / name).is_file(), name
    assert 'PIP_CONSTRAINT="$PWD/constraints.txt"' in (ROOT / ".ci" / "run").read_text()
