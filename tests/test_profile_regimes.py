"""Profiles of windowed models in two sequence regimes (memplan.verify.trace.sizes.below_window,
memplan.model.profile.Regime): below the sliding window the model runs another code path (sdpa
without an explicit mask) than past it, so a sequence shorter than the window is traced at the
ordinary sizes instead of being extrapolated from sequences past the window; the regime past the
window is traced only when a sequence needs it, and stored beside the other in one document.

Oracle: `memplan verify` on CPU (memplan/verify/measure.py: saved-tensor hooks on the real
model's forward with real tensors), independent of the FakeTensorMode trace the prediction comes
from, at sequences below, at and past the window: activations equal to the byte. The window's
own length belongs to the regime past it (transformers 5.25 masking_utils.py::
_ignore_causal_mask_sdpa: `kv_length >= local_attention_size` gets an explicit mask); the test
at the window proves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.profile_verify import MOE, tiny  # noqa: E402
from benchmarks.profile_verify import spec as verify_spec  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.model.load import PROFILE_DIR  # noqa: E402

WINDOW = 48
"""Long enough for the regime below it (its check at 5 x 8 = 40 tokens stays below)."""
STARCODER2 = tiny("starcoder2", sliding_window=WINDOW)
"""A dense type with no hand rule whose sdpa path changes at the window
(modeling_starcoder2.py: create_sliding_window_causal_mask when sliding_window is set)."""
RECURRENT_GEMMA = {
    "model_type": "recurrent_gemma",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "lru_width": 64,
    "attention_window_size": WINDOW,
    "vocab_size": 512,
    "pad_token_id": 0,
}
"""Two recurrent (RG-LRU) layers and one local-attention layer, window 48."""
LLAMA4 = tiny("llama4_text", **MOE, attention_chunk_size=WINDOW)
"""Llama 4's chunked attention (masking_utils.py::create_chunked_causal_mask; the shipped
Llama 4 Scout profile's chunk is 8,192), chunk 48, its own expert code; bf16 as
benchmarks/profile_verify.py verifies it."""
GPT_OSS = tiny("gpt_oss", **MOE, sliding_window=WINDOW)
"""gpt-oss's sliding-window layers (window 48; grouped_mm experts take bf16 only)."""


def _verify(config: dict[str, Any], sequence: int, precision: str = "fp32") -> dict[str, Any]:
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify

    setting = {"precision": precision, "attention": "sdpa", "checkpointing": "none"}
    doc = verify_spec(config, setting)
    doc["training"]["sequence_length"] = sequence
    out: dict[str, Any] = to_json(verify(validate(doc), Options(), lambda _r, _w: None))
    return out


def _traced_at(doc: dict[str, Any], batch: int, sequence: int) -> int:
    """Saved bytes of one forward as a profile document's fit gives them (per block x count)."""
    prof = profile.from_document(doc, origin="test")
    st = Setting(
        batch=batch,
        sequence=sequence,
        stream="fp32",
        matmul="fp32",
        autocast=False,
        device="cpu",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
    )
    acts = prof.activations(st, num_layers=int(doc["model"]["traced_layers"]))
    return sum(b.count * b.bytes_each for b in acts.blocks)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "sequences", "precision"),
    [
        (STARCODER2, (40, 47, WINDOW, 64), "fp32"),
        (RECURRENT_GEMMA, (32, WINDOW, 56), "fp32"),
        (LLAMA4, (40, 47, WINDOW, 64), "bf16"),
        (GPT_OSS, (40, 47, WINDOW, 64), "bf16"),
    ],
    ids=["starcoder2", "recurrent_gemma", "llama4_text", "gpt_oss"],
)
def test_verify_below_at_and_past_the_window(
    config: dict[str, Any],
    sequences: tuple[int, ...],
    precision: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    for sequence in sequences:
        doc = _verify(config, sequence, precision)
        acts = doc["categories"]["activations"]
        assert doc["setup"]["activations_source"] == "profile", (sequence, doc["notes"])
        assert acts["predicted"] == acts["measured"], (sequence, acts)
        assert not any("extrapolated" in n for n in doc["notes"]), (sequence, doc["notes"])


def test_the_window_is_past_it() -> None:
    """At the window's own length sdpa gets an explicit mask: the regime below it (fitted on 8-40
    tokens) does not describe it, the regime past it (fitted on 49-147) does, as a trace at
    that length shows (FakeTensorMode, every storage the forward saves)."""
    from memplan.verify.trace import fit as fit_
    from memplan.verify.trace import profile as tracer
    from memplan.verify.trace.forward import build_fake, trace_once

    setting: dict[str, Any] = {
        "stream": "fp32",
        "matmul": "fp32",
        "autocast": False,
        "attention": "sdpa",
    }
    below = tracer.build(STARCODER2, **setting, sequence=WINDOW - 1)
    past = tracer.build(STARCODER2, **setting, sequence=WINDOW)
    assert below["fit"]["max_sequence"] == WINDOW - 1 and below["fit"]["min_sequence"] == 8
    assert "max_sequence" not in past["fit"] and past["fit"]["min_sequence"] == WINDOW + 1
    model, mode = build_fake(STARCODER2, stream="fp32", attention="sdpa", checkpointing="none")
    records = trace_once(model, mode, batch=2, sequence=WINDOW, autocast=None, layer_count=2)
    sizes = {"fp32": 4, "int64": 8, "bool": 1}
    measured = sum(r.numel * sizes[r.dtype] for r in records)
    # sdpa's explicit mask (batch x s x s) and the key/value heads repeated for it
    assert any(r.numel == 2 * WINDOW * WINDOW for r in fit_.split(records)["layer.0"])
    assert _traced_at(past, 2, WINDOW) == measured
    assert _traced_at(below, 2, WINDOW) != measured
    # one below the window, the regime below it is exact and the regime past it is not
    records = trace_once(model, mode, batch=2, sequence=WINDOW - 1, autocast=None, layer_count=2)
    measured = sum(r.numel * sizes[r.dtype] for r in records)
    side = WINDOW - 1
    assert not any(r.numel == 2 * side * side for r in fit_.split(records)["layer.0"])
    assert _traced_at(below, 2, WINDOW - 1) == measured
    assert _traced_at(past, 2, WINDOW - 1) != measured


def _spec(tmp_path: Path, sequence: int) -> Path:
    (tmp_path / "model.json").write_text(json.dumps(STARCODER2), encoding="utf-8")
    path = tmp_path / f"spec-{sequence}.yaml"
    path.write_text(
        "model: {hf_config: model.json}\nprecision: fp32\noptimizer: {name: adamw}\n"
        f"training: {{micro_batch_size: 2, sequence_length: {sequence}}}\n"
        "hardware: {device: cpu}\n",
        encoding="utf-8",
    )
    return path


def test_estimate_traces_each_regime_when_a_sequence_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequence below the window traces only the regime below it; a longer one then traces the
    regime past it and keeps both in the cached document; each later estimate reads its own."""
    from typer.testing import CliRunner

    from memplan.cli.app import app

    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))

    def estimate(sequence: int) -> tuple[dict[str, Any], str]:
        result = CliRunner().invoke(app, ["estimate", str(_spec(tmp_path, sequence)), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), result.stderr

    short, err = estimate(32)
    assert "traced the activations of 'starcoder2'" in err
    (file,) = (tmp_path / "cache" / "profiles").glob("starcoder2-*-none.json")
    doc = json.loads(file.read_text())
    assert doc["fit"]["max_sequence"] == WINDOW - 1 and "regimes" not in doc
    assert not any("extrapolated" in n for n in short["notes"])
    long, err = estimate(96)
    assert "no regime for sequence 96" in err
    doc = json.loads(file.read_text())
    assert "max_sequence" not in doc["fit"]
    assert [r["fit"]["max_sequence"] for r in doc["regimes"]] == [WINDOW - 1]
    again, err = estimate(32)
    assert "traced" not in err
    assert again["per_gpu"] == short["per_gpu"]
    again, err = estimate(96)
    assert "traced" not in err
    assert again["per_gpu"] == long["per_gpu"]
    # the other order: the regime past the window says where it starts, so a shorter sequence
    # later traces the regime below it instead of being extrapolated
    file.unlink()
    assert estimate(96)[0]["per_gpu"] == long["per_gpu"]
    doc = json.loads(file.read_text())
    assert doc["fit"]["above_sequence"] == WINDOW - 1 and "regimes" not in doc
    again, err = estimate(32)
    assert "no regime for sequence 32" in err
    assert again["per_gpu"] == short["per_gpu"]


def _block(name: str, numel: tuple[int, ...]) -> dict[str, Any]:
    tensors = [{"name": "x#0", "dtype": "fp32", "numel": list(numel)}]
    return {"name": name, "kind": "", "count": 1, "tensors": tensors, "tensors_b1": tensors}


def _doc(**fit: int) -> dict[str, Any]:
    return {
        "schema": profile.SCHEMA,
        "key": {
            "model_type": "m",
            "config_hash": "0" * 64,
            "stream": "fp32",
            "matmul": "fp32",
            "autocast": False,
            "attention": "sdpa",
            "device": "cpu",
            "checkpointing": "none",
        },
        "versions": {"torch": "t", "transformers": "x"},
        "model": {"hidden_size": 8, "vocab_size": 16},
        "fit": fit,
        "blocks": [_block("layers", (0, 0, 0, 1, 0, 0))],
    }


def test_regime_choice_by_sequence_and_old_documents() -> None:
    """The reader picks the regime a sequence runs in; a document without regimes (every profile
    before them, the shipped ones included) serves every sequence as before; one traced only
    below the window serves nothing past it (the tracer then traces that regime)."""
    old = profile.from_document(_doc(min_sequence=49), origin="old")
    assert old.at_sequence(8) is old and old.at_sequence(4096) is old
    below = _doc(min_sequence=8, max_sequence=47)
    assert profile.from_document(below, origin="b").at_sequence(48) is None
    from memplan.verify.trace.regimes import merge

    past = _doc(min_sequence=49, above_sequence=47)
    past["blocks"] = [_block("layers", (0, 0, 0, 2, 0, 0))]
    assert profile.from_document(past, origin="p").at_sequence(47) is None
    both = profile.from_document(merge(below, past), origin="both")
    short = both.at_sequence(47)
    assert short is not None and (short.min_sequence, short.max_sequence) == (8, 47)
    assert short.blocks[0].tensors[0].numel[3] == 1
    longer = both.at_sequence(48)
    assert longer is not None and longer.blocks[0].tensors[0].numel[3] == 2
    # the same object each time: plan's memos key on a profile's identity (memplan.memo)
    assert both.at_sequence(47) is short and both.at_sequence(4096) is longer
    # another version's document is replaced, not merged
    stale = dict(below, versions={"torch": "old", "transformers": "x"})
    assert "regimes" not in merge(stale, past)


def test_an_old_document_beside_a_regime_below_serves_only_past_it() -> None:
    """A profile traced before regimes existed (no fit.above_sequence: it holds every sequence,
    as the shipped Llama 4 one did) merged with a regime below the window: every sequence below
    the window is the regime below's, however short (the bounded regime wins), the rest the old
    one's."""
    from memplan.verify.trace.regimes import merge

    old = _doc(min_sequence=49)
    old["blocks"] = [_block("layers", (0, 0, 0, 2, 0, 0))]
    both = profile.from_document(merge(old, _doc(min_sequence=8, max_sequence=47)), origin="m")
    for sequence in (8, 16, 46, 47):
        view = both.at_sequence(sequence)
        assert view is not None and (view.min_sequence, view.max_sequence) == (8, 47), sequence
    for sequence in (48, 4096):
        view = both.at_sequence(sequence)
        assert view is not None and (view.min_sequence, view.max_sequence) == (49, 0), sequence
        assert view.blocks[0].tensors[0].numel[3] == 2


LLAMA4_SCOUT = PROFILE_DIR / "llama4_text-19adbbe4dba4-bf16-bf16-sdpa-cuda-full.json"


def test_shipped_llama4_profile_holds_both_sides_of_its_chunk() -> None:
    """The shipped Llama 4 Scout profile (attention_chunk_size 8,192, device cuda: 32-token
    units) holds the regime below the chunk (traced at 32-96 tokens, checked at 160 and 512) and,
    unchanged beside it, the regime past it traced before (multiples of 8,224 tokens)."""
    doc = json.loads(LLAMA4_SCOUT.read_text())
    (past,) = doc["regimes"]
    assert past["fit"]["min_sequence"] == 8224 and "max_sequence" not in past["fit"]
    scout = profile.from_document(doc, origin=LLAMA4_SCOUT.name)
    for sequence in (2048, 4096, 8191):
        view = scout.at_sequence(sequence)
        assert view is not None and (view.min_sequence, view.max_sequence) == (32, 8191)
    for sequence in (8192, 8224, 32768):
        view = scout.at_sequence(sequence)
        assert view is not None and (view.min_sequence, view.max_sequence) == (8224, 0)
