"""`memplan estimate` / `plan` trace a profile themselves when a model has no activation rule and
no stored profile serves the spec (issue 18: "build one themselves when torch and transformers are
installed"), cache it, and reuse it; `--no-trace` keeps the old answer (not modelled).

Behaviour tests (what is traced is proved against real tensors in tests/test_profile.py and
tests/test_profile_verify.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app

pytest.importorskip("transformers")

CONFIG = {
    "model_type": "granite",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}


def _spec(tmp_path: Path, checkpointing: str = "none") -> Path:
    (tmp_path / "granite.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {hf_config: granite.json}\nprecision: fp32\noptimizer: {name: adamw}\n"
        "training: {micro_batch_size: 2, sequence_length: 64, "
        f"activation_checkpointing: {checkpointing}}}\nhardware: {{device: cpu}}\n",
        encoding="utf-8",
    )
    return spec


def _estimate(spec: Path, *flags: str) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["estimate", str(spec), "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_estimate_traces_caches_and_reuses(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path)
    doc, err = _estimate(spec, "--no-trace")
    assert doc["activations"]["source"] == "none" and "traced" not in err
    doc, err = _estimate(spec)
    assert doc["activations"]["source"] == "profile"
    assert doc["per_gpu"]["activations"] > 0
    assert "traced the activations of 'granite'" in err
    assert len(list((tmp_path / "cache" / "profiles").glob("granite-*-none.json"))) == 1
    # and its inventory beside it, so the next estimate needs no torch (memplan.model.stored)
    assert len(list((tmp_path / "cache" / "profiles").glob("granite-*.inventory.json"))) == 1
    again, err = _estimate(spec)
    assert "traced" not in err  # the cached profile serves
    assert again["per_gpu"] == doc["per_gpu"]


def test_refused_trace_is_said_and_the_estimate_goes_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path)
    from memplan.verify.trace import profile as tracer

    def refuse(*_a: object, **_k: object) -> None:
        from memplan.errors import MemplanError

        raise MemplanError("not this one")

    monkeypatch.setattr(tracer, "for_spec", refuse)
    doc, err = _estimate(spec)
    assert doc["activations"]["source"] == "none"
    assert "not traced: not this one" in err


def test_a_profile_traced_with_other_versions_is_traced_again(tmp_path: Path, monkeypatch) -> None:
    """Profiles are keyed by library versions too (issue 18): a stored profile traced with
    another transformers is traced again with the installed one, and the cache keeps the new."""
    import transformers

    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    spec = _spec(tmp_path)
    _estimate(spec)
    (file,) = (tmp_path / "cache" / "profiles").glob("granite-*-none.json")
    doc = json.loads(file.read_text())
    doc["versions"]["transformers"] = "0.0.1"
    file.write_text(json.dumps(doc))
    _, err = _estimate(spec)
    assert "the stored profile was traced with torch" in err and "transformers 0.0.1" in err
    assert json.loads(file.read_text())["versions"]["transformers"] == transformers.__version__
    _, err = _estimate(spec)
    assert "traced" not in err
