"""Where a hand rule does not cover a setting, a profile traced for the config serves.

Gemma 3's rule models one layer kind: under sdpa, sliding-window layers shorter than the
sequence beside full-attention layers save other tensors, and the rule says so (memplan/model/
families/gemma.py). A real Gemma 3 4B at 8,192 tokens (window 1,024) was "activations not
modelled". Now `memplan estimate` traces a profile for that setting (as for a model_type with
no rule), and `memplan verify` traces one now. The oracle of the slow tests is verify's
real-tensor run on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from memplan.activations import rule_refuses
from memplan.config.load import validate
from memplan.model.sources import from_config
from memplan.report.settings import setting_of

GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "layer_types": ["sliding_attention", "full_attention"],
}


def _spec(window: int, attention: str = "sdpa") -> dict[str, Any]:
    return {
        "model": {"architecture": {**GEMMA3, "sliding_window": window}},
        "precision": "fp32",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 32,
            "attention": attention,
            "activation_checkpointing": "none",
        },
        "parallelism": {"engine": "ddp", "data": 1},
        "hardware": {"device": "cpu"},
    }


@pytest.mark.parametrize(
    ("window", "attention", "refuses"),
    [(16, "sdpa", True), (64, "sdpa", False), (16, "eager", False)],
)
def test_which_settings_the_rule_refuses(window: int, attention: str, refuses: bool) -> None:
    """Pinning test (the rule's own refusal): a window shorter than the sequence under sdpa."""
    spec = validate(_spec(window, attention)).spec
    arch = from_config(dict(spec.model.architecture or {})).architecture
    assert arch is not None
    assert rule_refuses(arch, setting_of(spec)) is refuses


@pytest.mark.slow
def test_verify_traces_where_the_rule_refuses() -> None:
    """A window of 16 at 32 tokens under sdpa: verify predicts from a profile traced now, and
    it equals the real run's saved tensors."""
    pytest.importorskip("transformers")
    from benchmarks.profile_verify import run_case

    config = {**GEMMA3, "sliding_window": 16}
    row = run_case(config, {"precision": "fp32", "attention": "sdpa", "checkpointing": "none"})
    assert row["activations_source"] == "profile"
    assert row["activations_predicted"] == row["activations_measured"]
    assert row["ok"], row["failures"]


@pytest.mark.slow
def test_estimate_traces_only_where_the_rule_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`memplan estimate` traces and caches a profile where the rule refuses (then serves it
    without torch), and traces nothing where the rule serves."""
    pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from memplan.cli.app import app

    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    for window, traced in ((64, False), (16, True)):
        spec = tmp_path / f"gemma3-{window}.yaml"
        spec.write_text(yaml.safe_dump(_spec(window)))
        result = runner.invoke(app, ["estimate", str(spec), "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["activations"]["modelled"]
        assert doc["activations"]["source"] == ("profile" if traced else "rule")
        cached = list((tmp_path / "cache").rglob("gemma3_text-*.json"))
        assert bool(cached) is traced
