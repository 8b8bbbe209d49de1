"""memplan verify on one process: real transformers models, real torch optimizers, CPU.

Model states must match the calculator to the byte; activations are measured and shown
(checked within 1% once the calculator models them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.config.load import load_spec, validate
from memplan.errors import MemplanError
from memplan.verify import job as jobs
from memplan.verify import refusals
from memplan.verify.result import EXACT, Row, rows_for
from tests.test_verify_support import (
    has_family,
    loaded,
    model_state_rows_exact,
    run,
    spec_dict,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

MODELS = [
    "llama",
    pytest.param(
        "gpt2",
        marks=pytest.mark.skipif(not has_family("gpt2"), reason="memplan has no gpt2 family yet"),
    ),
]


# --- pure parts --------------------------------------------------------------------------


def test_row_tolerances() -> None:
    assert Row(name="parameters", predicted=100, measured=100, tolerance=EXACT).ok is True
    assert Row(name="parameters", predicted=100, measured=101, tolerance=EXACT).ok is False
    assert Row(name="activations", predicted=1000, measured=1010, tolerance=0.01).ok is True
    assert Row(name="activations", predicted=1000, measured=1011, tolerance=0.01).ok is False
    unmodelled = Row(name="activations", predicted=None, measured=5, tolerance=0.01)
    assert unmodelled.ok is None and unmodelled.delta is None and unmodelled.ratio is None


def test_a_state_on_one_side_only_is_a_failure() -> None:
    rows = rows_for(
        predicted={"parameters": 8, "gradients": 8, "optimizer_states": 4, "step": 4},
        measured={"parameters": 8, "gradients": 8, "optimizer_states": 8, "step": 4, "x": 4},
        state_names=["step", "x"],
    )
    by_name = {r.name: r for r in rows}
    assert by_name["x"].predicted == 0 and by_name["x"].ok is False
    assert by_name["step"].ok is True


def test_verify_modules_that_the_cli_loads_first_do_not_import_torch() -> None:
    code = (
        "import sys, memplan.cli.app, memplan.verify.runner, memplan.verify.render, "
        "memplan.verify.job, memplan.verify.result; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- refusals ----------------------------------------------------------------------------


def test_deepspeed_refuses_what_it_cannot_run() -> None:
    """DeepSpeed's real engine runs (tests/test_verify_deepspeed.py), on real tensors at full
    depth, with DeepSpeed's own optimizers, without TP / offload."""
    spec = loaded(parallelism={"engine": "deepspeed"})
    with pytest.raises(MemplanError, match=r"no --fake.*no --layers"):
        run(spec, fake=True)
    with pytest.raises(MemplanError, match=r"optimizer 'sgd' with engine deepspeed"):
        run(loaded(optimizer={"name": "sgd"}, parallelism={"engine": "deepspeed"}))
    with pytest.raises(MemplanError, match=r"tensor: 2 with engine deepspeed"):
        run(loaded(parallelism={"engine": "deepspeed", "tensor": 2}))


def test_a_parameter_count_cannot_be_built() -> None:
    data = spec_dict()
    data["model"] = {"num_parameters": 1000}
    with pytest.raises(MemplanError, match="needs its architecture"):
        run(validate(data))


def test_model_sources_resolve_to_the_config_that_is_built(tmp_path: Path) -> None:
    """hf_config relative to the spec file; a checkpoint needs a config.json beside it."""
    arch = spec_dict()["model"]["architecture"]
    (tmp_path / "config.json").write_text(json.dumps(arch))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**spec_dict(), "model": {"hf_config": "config.json"}}))
    assert jobs.model_config(load_spec(spec)) == arch
    bare = tmp_path / "weights"
    bare.mkdir()
    spec.write_text(yaml.safe_dump({**spec_dict(), "model": {"safetensors": "weights"}}))
    with pytest.raises(MemplanError, match="no(ne)? .*config.json"):
        jobs.model_config(load_spec(spec))


def test_an_optimizer_outside_torch_is_refused() -> None:
    with pytest.raises(MemplanError, match=r"'lion' is not in torch.optim.*adamw"):
        run(loaded(optimizer={"name": "lion"}))


def test_transformers_adafactor_is_verified() -> None:
    """`optimizer: adafactor-hf` runs transformers.optimization.Adafactor with the Trainer's
    arguments: its states (fp32 row/column factors and RMS of bf16 parameters) to the byte."""
    result = run(loaded(precision="bf16", optimizer={"name": "adafactor-hf"}))
    model_state_rows_exact(result)
    names = {r.name for r in result.headline.rows}
    assert {"exp_avg_sq_row", "exp_avg_sq_col", "RMS"} <= names


def test_transformers_adafactor_without_transformers_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = loaded(optimizer={"name": "adafactor-hf"})
    real = refusals.importlib.util.find_spec
    monkeypatch.setattr(
        refusals.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real(name, *a),
    )
    with pytest.raises(MemplanError, match="adafactor-hf.*transformers is not installed") as err:
        refusals.check_supported(spec.spec, spec.spec.recipe())
    assert err.value.field == "optimizer.name"


def test_a_recipe_torch_cannot_realise_is_refused() -> None:
    spec = loaded(precision={"preset": "bf16-mixed", "gradient_accumulation": "fp32"})
    with pytest.raises(MemplanError, match="gradient_accumulation buffer"):
        run(spec)


def test_layers_out_of_range() -> None:
    with pytest.raises(MemplanError, match="between 1 and the model's 2 layers"):
        run(loaded(), layers=3)


def test_too_big_is_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "available_host_bytes", lambda: 1_000_000)
    built: list[object] = []
    monkeypatch.setattr("memplan.verify.launch.run", lambda *a: built.append(a))
    with pytest.raises(MemplanError, match=r"too big to build here.*--layers K.*--fake"):
        run(loaded())
    assert not built


def test_meminfo_parsing(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
    assert jobs.available_host_bytes(meminfo) == 2048 * 1024
    assert jobs.available_host_bytes(tmp_path / "absent") is None


# --- one process, real tensors -----------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize(
    "optimizer",
    [{"name": "adamw"}, {"name": "sgd", "momentum": 0.9}],
    ids=["adamw", "sgd-momentum"],
)
def test_model_states_match_to_the_byte(model: str, precision: str, optimizer: dict) -> None:
    result = run(loaded(model, precision=precision, optimizer=optimizer))
    model_state_rows_exact(result)
    rows = {r.name: r for r in result.headline.rows}
    if precision == "bf16-mixed":
        assert rows["master_weights"].measured == 2 * rows["parameters"].measured
    if optimizer["name"] == "sgd":
        assert set(rows) >= {"momentum_buffer"} and "step" not in rows
    # Activations are measured (saved tensors), shown unchecked until modelled.
    assert rows["activations"].measured and rows["activations"].measured > 0
    assert rows["peak"].measured and rows["peak"].measured > rows["parameters"].measured


def test_attribution_equals_numel_times_element_size() -> None:
    """The storage measurement agrees with numel x element_size on the real model."""
    from memplan.verify import build

    config = spec_dict()["model"]["architecture"]
    model = build.build_model(config, torch.bfloat16, "cpu")
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    result = run(loaded(precision="bf16"))
    assert result.headline.row("parameters").measured == expected


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "adam", "amsgrad": True, "implementation": "for_loop"},
        {"name": "adamw", "implementation": "fused"},
        {"name": "rmsprop", "momentum": 0.9, "centered": True},
        {"name": "adafactor"},
        {"name": "nadam"},
    ],
    ids=lambda o: o["name"],
)
def test_other_torch_optimizers_match(optimizer: dict) -> None:
    result = run(loaded(precision="fp32", optimizer=optimizer))
    model_state_rows_exact(result)


def test_amp_recipe_keeps_fp32_states() -> None:
    result = run(loaded(precision="amp-bf16"))
    model_state_rows_exact(result)


def test_layers_verifies_k_layers_and_extrapolates_to_full_depth() -> None:
    result = run(loaded(model={"architecture": {"num_hidden_layers": 4}}), layers=1)
    assert result.setup["layers"] == 1 and result.setup["full_layers"] == 4
    model_state_rows_exact(result)
    full = {r.name: r for r in result.full_depth}
    for name in ("parameters", "gradients", "optimizer_states", "buffers"):
        assert full[name].delta == 0, full[name]
    assert full["activations"].measured > result.headline.row("activations").measured
    # Exact: RoPE's cos/sin reach every layer as arguments, so the one layer built does not
    # own them and they are not counted (L - K) more times.
    assert full["activations"].delta == 0, full["activations"]


# --- the command -------------------------------------------------------------------------


def _write(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(**overrides)))  # type: ignore[arg-type]
    return path


@pytest.fixture
def peak_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the peak row unchecked (as while transient buffers are not modelled), so that the
    command's exit code depends on the categories verify owns."""
    monkeypatch.setattr(jobs, "transients_modelled", lambda _report: False)


@pytest.mark.usefixtures("peak_unchecked")
def test_cli_table_and_exit_code(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["verify", str(_write(tmp_path)), "--width", "100"])
    assert out.exit_code == 0, out.output
    assert "Predicted vs measured" in out.stdout and "verified" in out.stdout
    assert "not checked" in out.stdout  # the peak


@pytest.mark.usefixtures("peak_unchecked")
def test_cli_json_schema(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["verify", str(_write(tmp_path)), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and "ranks" not in doc
    cats = doc["categories"]
    for name in ("parameters", "gradients", "optimizer_states", "activations", "peak"):
        assert {"predicted", "measured"} <= set(cats[name])
    assert cats["exp_avg"]["predicted"] == cats["exp_avg"]["measured"]
    assert cats["parameters"]["checked"] and cats["parameters"]["ok"]
    activations = cats["activations"]
    assert activations["checked"] == (activations["predicted"] is not None)
    assert cats["peak"]["checked"] is False and cats["peak"]["ok"] is None


def test_cli_exit_3_when_a_category_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prediction that drops the buffers must fail verify (exit 3), naming the row."""
    real = jobs.estimate

    def without_buffers(spec, inventory):  # type: ignore[no-untyped-def]
        return replace(real(spec, inventory), buffers=())

    monkeypatch.setattr(jobs, "estimate", without_buffers)
    out = CliRunner().invoke(app, ["verify", str(_write(tmp_path)), "--width", "100"])
    assert out.exit_code == 3, out.output
    assert "out of tolerance: buffers predicted 0 B" in out.stdout


def test_cli_user_error_is_one_paragraph(tmp_path: Path) -> None:
    path = _write(tmp_path, optimizer={"name": "sgd"}, parallelism={"engine": "deepspeed"})
    out = CliRunner().invoke(app, ["verify", str(path)])
    assert out.exit_code == 1
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_cli_rejects_unknown_device(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["verify", str(_write(tmp_path)), "--device", "tpu"])
    assert out.exit_code == 2
