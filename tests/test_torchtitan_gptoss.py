"""`model.implementation: torchtitan` on torchtitan 0.3.0's own gpt-oss (memplan.model.stacks.
torchtitan_gptoss): the rule against torchtitan's real GptOssModel built from its own layer
factory on CPU, to the byte (tests/torchtitan_gptoss_probe.py measures; a subset of
benchmarks/torchtitan_gptoss.py's matrix, benchmarks/results/torchtitan-gptoss.json); the
parameter count against torchtitan's own 20b flavor; the refusals (CPU, fp32, EP, TP, Llama 4).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from memplan.model.load import load_inventory
from memplan.report.estimate import estimate
from tests.conftest import ROOT, make_spec, micro_batch_of

RESULTS = ROOT / "benchmarks" / "results" / "torchtitan-gptoss.json"


def _loaded(preset: str = "gpt-oss-20b", **overrides: Any) -> Any:
    from memplan.config.load import validate

    doc: dict[str, Any] = {
        "model": {"preset": preset, "implementation": "torchtitan"},
        "precision": overrides.pop("precision", "bf16-mixed"),
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 1,
            "sequence_length": 4096,
            "activation_checkpointing": "full",
            **overrides.pop("training", {}),
        },
        "parallelism": {"engine": "fsdp2", "data": 8, **overrides.pop("parallelism", {})},
        "hardware": overrides.pop("hardware", {"gpu": "H100-80GB"}),
    }
    return validate(doc)


CASES = [
    # mode, shape overrides, checkpoint_every
    ("none", {}, 1),
    ("full", {}, 1),
    ("selective-op", {}, 1),
    ("none", {"kv_heads": 4, "experts": 16, "top_k": 4, "ffn": 24, "batch": 1}, 1),
    ("selective-op", {"documents": 2, "layers": 1}, 1),
    ("full", {"layers": 4}, 2),
]


@pytest.mark.parametrize(("mode", "change", "every"), CASES)
def test_gptoss_rule_matches_torchtitan_to_the_byte(
    mode: str, change: dict[str, Any], every: int
) -> None:
    """Independent oracle: torchtitan's own gpt-oss (fused biased wqkv, sinks, varlen attention
    with its own autograd registration, the biased MoE with the clamped SwiGLU, FullAC /
    SelectiveAC) run on CPU; the rule's CPU branch."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.gpt_oss")
    from dataclasses import replace

    from benchmarks.torchtitan_gptoss import predicted
    from tests.torchtitan_gptoss_probe import GptOssShape, held_bytes

    shape = replace(GptOssShape(), **change)
    with pytest.warns(UserWarning, match="CPU autocast"):  # the router's fp32 autocast
        measured = held_bytes(mode, shape, every)
    assert predicted(mode, shape, every) == measured


def test_gptoss_20b_parameters_equal_torchtitans_own_flavor() -> None:
    """Independent oracle: torchtitan's `20b` flavor built on the meta device
    (named_parameters: sinks, every bias) has exactly the parameters memplan's gpt-oss-20b
    inventory (transformers' GptOssForCausalLM, stored) counts: 20,914,757,184."""
    pytest.importorskip("torchtitan.models.gpt_oss")
    from tests.torchtitan_gptoss_probe import parameter_count

    inventory = load_inventory(_loaded())
    assert sum(t.numel for t in inventory.parameters) == parameter_count("20b") == 20914757184


def test_benchmark_matrix_is_exact() -> None:
    """The whole matrix (benchmarks/torchtitan_gptoss.py) was exact when last run."""
    doc = json.loads(RESULTS.read_text())
    assert doc["summary"]["cases"] >= 75
    assert doc["summary"]["exact"] == doc["summary"]["cases"]
    assert doc["summary"]["parameters_exact"]
    assert doc["stamp"]["commit"]


def test_shipped_config_is_modelled_with_torchtitans_code() -> None:
    from memplan.config.load import load_spec

    loaded = load_spec(ROOT / "configs" / "gpt-oss-20b-torchtitan.yaml")
    report = estimate(loaded.spec, load_inventory(loaded))
    saved = report.activations
    assert saved.modelled and saved.implementation == "torchtitan"
    assert any("gpt-oss model code" in n for n in saved.notes)


def test_pin_gptoss_20b_block_on_cuda() -> None:
    """Pinning (the rule's arithmetic): one gpt-oss-20b block at 1 x 4096 bf16 on CUDA under
    SelectiveAC keeps its input, wqkv's [t, 5120], wo's [t, 2880] and the fp32 gate's [t, 32]
    addmm outputs, varlen's out [t, 4096], lse [64, t] fp32 and rng_state, and topk's values
    (fp32) and indices [t, 4]."""
    loaded = _loaded(training={"activation_checkpointing": "selective-op"})
    layers = micro_batch_of(loaded.spec, load_inventory(loaded)).block("layers")
    assert layers is not None
    t = 4096
    expected = (
        t * 2880 * 2 + t * 5120 * 2 + t * 2880 * 2 + t * 32 * 4
        + t * 4096 * 2 + 64 * t * 4 + 16 + t * 4 * 4 + t * 4 * 8
    )  # fmt: skip
    assert layers.bytes_each == expected


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"hardware": {"device": "cpu"}}, "does not train on CPU"),
        ({"precision": "fp32"}, "bf16"),
        ({"parallelism": {"data": 4, "expert": 2}}, "expert parallelism"),
        ({"parallelism": {"data": 4, "tensor": 2}}, "tensor or context parallelism"),
        ({"training": {"compile": True}}, "compile"),
    ],
)
def test_gptoss_refusals_name_what_is_not_covered(overrides: dict[str, Any], words: str) -> None:
    loaded = _loaded(**overrides)
    saved = micro_batch_of(loaded.spec, load_inventory(loaded))
    assert not saved.modelled and saved.implementation == "torchtitan"
    assert words in saved.notes[0], saved.notes[0]


def test_llama4_under_torchtitan_says_0_3_0_has_no_llama4() -> None:
    """torchtitan 0.3.0's models/ (pip torchtitan==0.3.0) hold no llama4: the refusal says so
    and lists what it has."""
    loaded = _loaded("llama-4-scout-17b-16e")
    saved = micro_batch_of(loaded.spec, load_inventory(loaded))
    assert not saved.modelled
    assert "has no Llama 4 model" in saved.notes[0]
    assert "gpt_oss, kimi_k2_7, llama3" in saved.notes[0]


def test_llama4_absent_from_installed_torchtitan() -> None:
    """Independent check of the refusal's premise against the installed torchtitan 0.3.0."""
    torchtitan = pytest.importorskip("torchtitan.models")
    from pathlib import Path

    from memplan.model.stacks.torchtitan import LLAMA4

    folder = Path(torchtitan.__file__).parent
    models = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert "llama4" not in models
    assert all(m in LLAMA4 for m in models), models


def test_make_spec_still_builds_llama_under_torchtitan() -> None:
    """The dispatch leaves torchtitan's Llama 3 rule alone."""
    from memplan.model.sources import from_config
    from tests.conftest import TINY_LLAMA

    spec = make_spec(
        model={"architecture": TINY_LLAMA, "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": 8},
    )
    assert micro_batch_of(spec, from_config(TINY_LLAMA)).modelled
