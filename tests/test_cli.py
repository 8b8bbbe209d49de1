"""The command line: tables, JSON, and one clear paragraph for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memplan.cli.app import app
from tests.conftest import TINY_LLAMA

runner = CliRunner()


def write_spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, "--width", "140"])


@pytest.fixture
def llama_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


MINIMAL = """\
model:
  hf_config: config.json
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 1
  sequence_length: 4096
parallelism:
  data: 8
  zero_stage: 3
"""


def test_minimal_issue_spec_runs_with_relative_config(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    result = run("estimate", str(write_spec(tmp_path, MINIMAL)))
    assert result.exit_code == 0, result.output
    assert "Memory per GPU" in result.output
    assert "exp_avg_sq" in result.output
    # No engine named, zero_stage 3: torch's FSDP2 (spec.ParallelismSpec._default_engine).
    assert "fsdp2 ZeRO-3 over 8 data-parallel ranks" in " ".join(result.output.split())


def test_default_engine_is_one_verify_runs(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    """A spec that names no engine gets torch's (ddp, or fsdp2 at ZeRO 2/3), and verify
    accepts it: check_supported raises for what it cannot run (deepspeed, megatron)."""
    from memplan.config.load import load_spec
    from memplan.verify.refusals import check_supported

    bare = "model:\n  hf_config: config.json\n"
    for extra, engine in (
        ("", "ddp"),
        ("parallelism: {data: 2}\n", "ddp"),
        ("parallelism: {zero_stage: 1}\n", "ddp"),
        ("parallelism: {zero_stage: 2}\n", "fsdp2"),
        ("parallelism: {data: 4, zero_stage: 3}\n", "fsdp2"),
    ):
        spec = load_spec(write_spec(tmp_path, bare + extra)).spec
        assert spec.parallelism.engine == engine, extra
        check_supported(spec, spec.recipe())


def test_json_has_the_contract_keys(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    result = run("estimate", str(write_spec(tmp_path, MINIMAL)), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    for key in ("num_parameters", "num_parameter_tensors"):
        assert isinstance(doc["model"][key], int)
    for key in ("parameters", "gradients", "optimizer_states", "activations", "peak"):
        assert isinstance(doc["per_gpu"][key], int)
    per_gpu = doc["per_gpu"]
    rows = sum(r["bytes"] for r in per_gpu["rows"])
    assert (
        rows
        == per_gpu["parameters"]
        + per_gpu["gradients"]
        + per_gpu["optimizer_states"]
        + per_gpu["buffers"]
    )
    assert sum(per_gpu["optimizer_state_breakdown"].values()) == per_gpu["optimizer_states"]


def test_table_shows_share_and_fit_line(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    spec = write_spec(tmp_path, MINIMAL + "hardware:\n  gpu: A100-80GB\n")
    result = run("estimate", str(spec), "--ranks", "--explain")
    assert result.exit_code == 0, result.output
    assert "of GPU" in result.output and "fits A100-80GB" in result.output
    assert "GiB" in result.output or "KiB" in result.output or "MiB" in result.output


def test_does_not_fit_is_said(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    spec = write_spec(tmp_path, MINIMAL + "hardware:\n  memory: 100KiB\n")
    result = run("estimate", str(spec))
    assert result.exit_code == 0
    assert "does NOT fit" in result.output


def test_inventory_folds_layers(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    result = run("inventory", str(write_spec(tmp_path, MINIMAL)))
    assert result.exit_code == 0, result.output
    assert "model.layers.*.mlp.up_proj.weight" in result.output
    assert "x2" in result.output  # two layers folded into one row
    doc = json.loads(run("inventory", str(write_spec(tmp_path, MINIMAL)), "--json").stdout)
    assert doc["num_parameter_tensors"] == len(doc["parameters"]) == 1 + 2 * 9 + 2


BAD_INPUTS = [
    # (spec text, what the message must say)
    (
        "model:\n  hf_config: config.json\nparalelism:\n  data: 8\n",
        r"spec.yaml:3: paralelism: unknown key \(did you mean 'parallelism'\?\)",
    ),
    (
        "model:\n  hf_config: config.json\ntraining:\n  micro_batch_size: many\n",
        r"spec.yaml:4: training.micro_batch_size: Input should be a valid integer",
    ),
    (
        "model:\n  hf_config: config.json\ntraining:\n  sequence_length: -4\n",
        r"spec.yaml:4: training.sequence_length: Input should be greater than 0",
    ),
    (
        "model:\n  hf_config: config.json\nparallelism:\n  zero_stage: 7\n",
        r"spec.yaml:4: parallelism.zero_stage: Input should be less than or equal to 3",
    ),
    (
        "model:\n  hf_config: config.json\nparallelism:\n  data: 0\n",
        r"spec.yaml:4: parallelism.data: Input should be greater than 0",
    ),
    (
        "model:\n  hf_config: config.json\nparallelism:\n  engine: fsdp2\n  zero_stage: 1\n",
        r"parallelism: .*fsdp2 shards parameters.*use engine: ddp",
    ),
    ("model:\n  hf_config: missing.json\n", r"spec.yaml:2: hf_config not found"),
    ("model:\n  hf_config: config.json\n  num_parameters: 5\n", r"give exactly one of"),
    ("model: [unclosed\n", r"spec.yaml:2: not valid YAML"),
    (
        "model: !!python/object/apply:os.system ['echo pwned']\n",
        r"spec.yaml:1: not valid YAML: could not determine a constructor",
    ),
    ("- just\n- a list\n", r"a spec is a YAML mapping"),
    ("model:\n  architecture: {model_type: gpt5}\n", r"model_type 'gpt5' is not supported"),
    (
        "model:\n  architecture:\n    model_type: llama\n    hidden_size: big\n",
        r"spec.yaml:4: model.architecture: hidden_size must be a non-negative integer",
    ),
    (
        "model:\n  hf_config: config.json\nprecision: bf16-mixd\n",
        r"spec.yaml:3: precision: unknown precision preset 'bf16-mixd' "
        r"\(did you mean 'bf16-mixed'\?\)",
    ),
    ("model:\n  hf_config: config.json\nhardware:\n  memory: 80XB\n", r"'80XB' is not a size"),
    ("model:\n  preset: llama-9\n", r"unknown preset 'llama-9'"),
    # Checks across fields point at the key their message names, not at the section's line.
    (
        "model:\n  hf_config: config.json\ntraining:\n  micro_batch_size: 1\n"
        "  activation_offload: true\n",
        r"spec.yaml:5: training.activation_offload: activation_offload moves the inputs",
    ),
    (
        "model:\n  hf_config: config.json\nfinetune:\n  method: qlora\n  stable_embedding: false\n",
        r"spec.yaml:5: finetune.stable_embedding is LitGPT's QLoRA embedding swap",
    ),
    (
        "model:\n  hf_config: config.json\nfinetune:\n  method: adapter\n",
        r"spec.yaml:4: finetune.method adapter is LitGPT's",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_paragraph(tmp_path, llama_config, text, message):  # type: ignore[no-untyped-def]
    import re

    result = run("estimate", str(write_spec(tmp_path, text)))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.search(message, result.stderr), result.stderr


def test_hostile_yaml_never_executes(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    run("estimate", str(write_spec(tmp_path, text)))
    assert not marker.exists()


def test_missing_spec_file(tmp_path):  # type: ignore[no-untyped-def]
    result = run("estimate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1 and "no such spec file" in result.stderr


def test_malformed_config_json(tmp_path):  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{not json")
    result = run("estimate", str(write_spec(tmp_path, "model:\n  hf_config: config.json\n")))
    assert result.exit_code == 1 and "is not valid JSON" in result.stderr


def test_debug_shows_the_traceback(tmp_path):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["estimate", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_yaml_aliases_are_fine(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    text = "x: &t {micro_batch_size: 2}\n" + MINIMAL
    result = run("estimate", str(write_spec(tmp_path, text)))
    assert result.exit_code == 1 and "x: unknown key" in result.stderr
    spec = yaml.safe_load(MINIMAL)
    spec["training"] = {"micro_batch_size": 2}
    assert run("estimate", str(write_spec(tmp_path, yaml.safe_dump(spec)))).exit_code == 0


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.startswith("memplan ")
    for command in ("estimate", "inventory"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout


def test_estimate_never_imports_torch(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    """`memplan estimate` must start fast: no torch, transformers or matplotlib."""
    spec = write_spec(tmp_path, MINIMAL)
    code = (
        "import sys\n"
        "from memplan.cli.app import app\n"
        f"try:\n    app(['estimate', {str(spec)!r}, '--json'])\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'numpy')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_python_dash_m_works():
    out = subprocess.run(
        [sys.executable, "-m", "memplan", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("memplan ")


def test_plot_saves_the_timeline(tmp_path, llama_config):  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    out = tmp_path / "timeline.svg"
    result = run("estimate", str(write_spec(tmp_path, MINIMAL)), "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))


@pytest.mark.parametrize(
    ("text", "count"),
    [("7e9", 7 * 10**9), ("7B", 7 * 10**9), ("1.5T", 15 * 10**11), ("125M", 125 * 10**6)],
)
def test_parameter_counts_in_scientific_and_suffix_form(text: str, count: int) -> None:
    """`num_parameters: 7e9` is a string to YAML 1.1 (no dot); memplan reads it as a count."""
    from memplan.config.load import validate

    assert validate({"model": {"num_parameters": text}}).spec.model.num_parameters == count
