"""The published JSON Schemas describe what the commands really print.

Real `--json` outputs of `estimate` (every shipped spec, and specs that exercise pipeline
stages, uneven ranks, host rows and bare parameter counts), `plan` (a fit and a miss) and
`verify` (a real CPU run, and results built by hand for the multi-rank, CUDA and --layers
shapes) are validated twice: by the pydantic models of memplan.report.schema in strict mode (extra
keys refused, no int/bool/str coercion), and by `jsonschema` against `memplan schema NAME`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.report import schema
from memplan.verify.result import Phase, RankResult, Row, VerifyResult, rows_for, to_json
from tests.conftest import ROOT, TINY_LLAMA

runner = CliRunner()
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cli_json(*args: str) -> tuple[int, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def published(command: str) -> dict[str, Any]:
    out = runner.invoke(app, ["schema", command])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def check(command: str, document: Any) -> None:
    """Valid for the pydantic model (strict, from Python and from JSON) and the JSON Schema."""
    model = schema.documents()[command]
    try:
        model.model_validate(document)
        model.model_validate_json(json.dumps(document))
    except ValidationError as err:
        raise AssertionError(
            f"`memplan {command} --json` no longer matches memplan/report/schema/: describe the "
            f"change there, then run `python scripts/gen_docs.py`.\n{err}"
        ) from None
    jsonschema.validate(document, published(command))


def write(tmp_path: Path, spec: dict[str, Any]) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


# --- the schemas themselves ------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(schema.documents()))
def test_schema_command_prints_a_valid_draft_2020_12_schema(command: str) -> None:
    document = published(command)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(document)
    assert document == schema.json_schema(command)


@pytest.mark.parametrize("command", sorted(schema.documents()))
def test_published_schema_files_are_the_command_output(command: str) -> None:
    out = runner.invoke(app, ["schema", command])
    path = ROOT / "docs" / "schema" / f"{command}.schema.json"
    assert path.read_text() == out.stdout, "run `python scripts/gen_docs.py`"


def test_schema_needs_a_known_command() -> None:
    out = runner.invoke(app, ["schema", "estimat"])
    assert out.exit_code == 2
    assert "estimate" in out.output and "plan" in out.output and "verify" in out.output


def test_every_field_is_described() -> None:
    """Every key of every report has a one-line meaning (it becomes docs/json.md): its own
    docstring, or the docstring of the object it holds."""
    missing = []
    for command in schema.documents():
        document = schema.json_schema(command)
        defs = document["$defs"]
        for name, defn in {command: document, **defs}.items():
            for key, prop in defn.get("properties", {}).items():
                refs = [o["$ref"] for o in (prop, *prop.get("anyOf", [])) if "$ref" in o]
                held = [defs[r.split("/")[-1]].get("description") for r in refs]
                if not prop.get("description") and not any(held):
                    missing.append(f"{name}.{key}")
    assert not missing


# --- estimate --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_estimate_of_every_shipped_spec_validates(config: Path) -> None:
    code, doc = cli_json("estimate", str(config))
    assert code == 0
    check("estimate", doc)


ESTIMATE_SPECS: dict[str, dict[str, Any]] = {
    "pipeline stages and tensor slices": {
        "parallelism": {"engine": "megatron", "data": 2, "tensor": 2, "pipeline": 2}
    },
    "uneven ZeRO-1 ranks": {"parallelism": {"engine": "ddp", "zero_stage": 1, "data": 3}},
    "fsdp2 with host offload": {
        "parallelism": {"engine": "fsdp2", "data": 4, "offload": {"optimizer": "cpu"}},
        "hardware": {"gpu": "A100-80GB", "host_memory": "1TiB"},
    },
    "deepspeed ZeRO-3 offload to NVMe": {
        "parallelism": {
            "engine": "deepspeed",
            "zero_stage": 3,
            "data": 8,
            "offload": {"optimizer": "nvme", "parameters": "cpu"},
        }
    },
    "8-bit optimizer, eager attention, checkpointing on CPU": {
        "optimizer": {"name": "adamw8bit"},
        "training": {"attention": "eager", "activation_checkpointing": "full"},
        "hardware": {"device": "cpu", "memory": "16GiB"},
    },
    "a bare parameter count": {"model": {"num_parameters": 7_000_000_000}},
}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_inventory_of_every_shipped_spec_validates(config: Path) -> None:
    code, document = cli_json("inventory", str(config))
    assert code == 0
    check("inventory", document)


@pytest.mark.parametrize("overrides", ESTIMATE_SPECS.values(), ids=list(ESTIMATE_SPECS))
def test_estimate_shapes_validate(tmp_path: Path, overrides: dict[str, Any]) -> None:
    spec: dict[str, Any] = {
        "model": {"architecture": TINY_LLAMA},
        "training": {"micro_batch_size": 2, "sequence_length": 64},
        **overrides,
    }
    code, doc = cli_json("estimate", write(tmp_path, spec))
    assert code == 0
    check("estimate", doc)


def test_the_schema_refuses_drift(tmp_path: Path) -> None:
    """A key the schema does not know, a missing key, or a retyped value is an error: the
    tests above then fail until memplan/report/schema/ (and the docs) follow the producer."""
    _, doc = cli_json("estimate", write(tmp_path, {"model": {"architecture": TINY_LLAMA}}))
    model = schema.documents()["estimate"]
    extra = json.loads(json.dumps(doc))
    extra["per_gpu"]["surprise"] = 1
    missing = json.loads(json.dumps(doc))
    del missing["per_gpu"]["rows"][0]["source"]
    retyped = json.loads(json.dumps(doc))
    retyped["per_gpu"]["peak"] = str(doc["per_gpu"]["peak"])
    boolean = json.loads(json.dumps(doc))
    boolean["model"]["num_parameters"] = True
    for bad in (extra, missing, retyped, boolean):
        with pytest.raises(ValidationError):
            model.model_validate(bad)
    for bad in (extra, missing, retyped):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, published("estimate"))


# --- plan ------------------------------------------------------------------------------------


def plan_spec(memory: str) -> dict[str, Any]:
    return {
        "model": {"architecture": TINY_LLAMA},
        "training": {"sequence_length": 64},
        "hardware": {"memory": memory},
        "plan": {"gpus": 4, "global_batch_size": 8, "engines": ["deepspeed", "fsdp2"]},
    }


def test_plan_that_fits_validates(tmp_path: Path) -> None:
    code, doc = cli_json("plan", write(tmp_path, plan_spec("80GiB")))
    assert code == 0 and doc["layouts"]
    check("plan", doc)


def test_plan_that_does_not_fit_validates(tmp_path: Path) -> None:
    code, doc = cli_json("plan", write(tmp_path, plan_spec("64KiB")))
    assert code == 3 and not doc["layouts"] and doc["message"]
    check("plan", doc)


# --- verify ----------------------------------------------------------------------------------


SETUP: dict[str, Any] = {
    "model": "llama",
    "model_type": "llama",
    "num_parameters": 219_584,
    "device": "cuda",
    "fake": False,
    "engine": "fsdp2",
    "zero_stage": 3,
    "ranks": 2,
    "distributed": True,
    "precision": "bf16-mixed",
    "optimizer": "adamw",
    "optimizer_implementation": "foreach",
    "layers": 1,
    "full_layers": 2,
    "micro_batch_size": 1,
    "sequence_length": 16,
    "attention": "sdpa",
    "activation_checkpointing": "full",
    "activation_offload": False,
    "dropout": None,
    "use_cache": False,
    "steps": 3,
    "torch": "2.13.0",
    "transformers": "5.24.0",
}


def _rank(rank: int, measured_exp_avg: int) -> RankResult:
    rows = rows_for(
        predicted={
            "parameters": 100,
            "gradients": 100,
            "optimizer_states": 400,
            "exp_avg": 200,
            "exp_avg_sq": 200,
            "buffers": 0,
            "activations": None,
            "peak": None,
        },
        measured={
            "parameters": 100,
            "gradients": 100,
            "optimizer_states": 400,
            "exp_avg": measured_exp_avg,
            "exp_avg_sq": 200,
            "buffers": 0,
            "activations": 5_000,
            "peak": 9_000,
        },
        state_names=["exp_avg", "exp_avg_sq"],
    )
    return RankResult(rank=rank, rows=rows)


def test_verify_shapes_validate() -> None:
    """Several ranks, a miss, CUDA allocator phases and --layers full-depth rows: every
    optional part of the document at once."""
    result = VerifyResult(
        setup=SETUP,
        ranks=(_rank(0, 200), _rank(1, 204)),
        most_loaded=1,
        phases=(Phase(name="forward", allocated=10, max_allocated=12, reserved=20),),
        full_depth=(Row(name="parameters", predicted=200, measured=200, tolerance=0.0),),
        notes=("a note",),
    )
    doc = to_json(result)
    assert {"ranks", "phases", "full_depth"} <= set(doc) and doc["failures"]
    check("verify", doc)


@pytest.mark.slow
def test_a_real_verify_run_validates(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = {
        "model": {"architecture": TINY_LLAMA},
        "precision": "fp32",
        "training": {"micro_batch_size": 1, "sequence_length": 16},
        "parallelism": {"engine": "ddp"},
        "hardware": {"device": "cpu"},
    }
    code, doc = cli_json("verify", write(tmp_path, spec))
    assert code in (0, 3)
    check("verify", doc)
