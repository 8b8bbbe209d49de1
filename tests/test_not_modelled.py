"""A "fits" on a partial figure says so: the terms an estimate's notes leave out are named after
the verdict (table) and in `hardware.not_modelled` (JSON). Pinning tests: they check that each
producer's note reaches the verdict, not a measured value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.report import notes
from tests.conftest import TINY_LLAMA

runner = CliRunner()
H100 = {"gpu": "H100-80GB"}


def estimate(tmp_path: Path, doc: dict[str, Any], *flags: str) -> Any:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["estimate", str(path), *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in flags else result.output


def spec(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": {"architecture": TINY_LLAMA},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 1, "sequence_length": 32},
        "hardware": H100,
    }
    doc.update(sections)
    return doc


FP8 = {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"}
SLIDING = {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 16}
QLORA_HEAD = {"method": "qlora", "target_modules": "all-linear", "skip_modules": []}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(spec(), [], id="plain"),
        pytest.param(spec(precision=FP8), ["torchao's fp8 casts"], id="transformers-float8"),
        pytest.param(
            spec(model={"architecture": TINY_LLAMA, "implementation": "torchtitan"}, precision=FP8),
            [],
            id="torchtitan-float8-counted",
        ),
        pytest.param(
            spec(model={"architecture": SLIDING}),
            ["the memory-efficient kernel's padded mask"],
            id="sliding-window-cuda",
        ),
        pytest.param(
            spec(model={"architecture": SLIDING}, hardware={"device": "cpu"}),
            [],
            id="sliding-window-cpu",
        ),
        pytest.param(
            # modelled since: memplan.step.transients.qlora_head_backward
            spec(precision="amp-bf16", finetune=QLORA_HEAD),
            [],
            id="qlora-head-autocast",
        ),
        pytest.param(spec(precision="bf16", finetune=QLORA_HEAD), [], id="qlora-head-no-autocast"),
        pytest.param(
            spec(parallelism={"engine": "deepspeed", "zero_stage": 3, "data": 2, "context": 2}),
            ["Ulysses' all-to-all buffers"],
            id="deepspeed-ulysses",
        ),
    ],
)
def test_the_verdict_names_what_is_left_out(
    tmp_path: Path, doc: dict[str, Any], expected: list[str]
) -> None:
    out = estimate(tmp_path, doc, "--json")
    assert out["hardware"]["not_modelled"] == expected
    if out["hardware"]["verdict"] is None:  # no capacity (CPU): no verdict to qualify
        return
    table = estimate(tmp_path, doc, "--width", "200")
    verdict = next(line for line in table.splitlines() if line.startswith(("fits", "does not")))
    if expected and out["hardware"]["verdict"] == "fits":
        assert f"before {', '.join(expected)} (not modelled" in verdict
    else:
        assert "not modelled" not in verdict


def test_every_marker_is_reached_above() -> None:
    """Each NOT_MODELLED sentence is one a producer writes: the cases above reach all three."""
    assert [name for _, name in notes.NOT_MODELLED] == [
        "torchao's fp8 casts",
        "the memory-efficient kernel's padded mask",
        "Ulysses' all-to-all buffers",
    ]


def test_plan_rows_say_what_they_fit_before(tmp_path: Path) -> None:
    """plan's shown rows are replayed as estimate would: each carries its spec's not_modelled,
    and the table says which rows fit before what."""
    doc = spec(precision=FP8, training={"sequence_length": 64})
    doc["plan"] = {"gpus": 2, "global_batch_size": 4, "top": 3}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = runner.invoke(app, ["plan", str(path), "--json", "--jobs", "1"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["layouts"]
    assert rows and all(r["not_modelled"] == ["torchao's fp8 casts"] for r in rows[:3])
    table = runner.invoke(app, ["plan", str(path), "--jobs", "1", "--width", "200"]).output
    assert "rows 1, 2, 3 fit before torchao's fp8 casts" in table
    plain = spec(training={"sequence_length": 64})
    plain["plan"] = doc["plan"]
    path.write_text(yaml.safe_dump(plain))
    out = runner.invoke(app, ["plan", str(path), "--json", "--jobs", "1"])
    assert all(r["not_modelled"] == [] for r in json.loads(out.output)["layouts"])
