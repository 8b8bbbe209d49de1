"""Helpers shared by the verify tests (no tests here): tiny specs, a quiet verify call."""

from __future__ import annotations

from typing import Any

from memplan.config.load import LoadedSpec, validate
from memplan.model.families import BY_MODEL_TYPE
from memplan.verify.job import Options
from memplan.verify.result import STEP_TRANSIENT, VerifyResult
from tests.conftest import TINY_LLAMA, deep_merge

# A GPT-2-shaped model (tied embeddings, learned positions, LayerNorm with biases) with the
# same 1,041-token vocabulary: no world size up to 8 divides it.
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": 1041,
}

MODELS = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2}


def has_family(model_type: str) -> bool:
    return model_type in BY_MODEL_TYPE


def spec_dict(family: str = "llama", **overrides: Any) -> dict[str, Any]:
    """A verifiable spec: tiny model, AdamW, fp32, torch DDP on one rank, CPU."""
    base: dict[str, Any] = {
        "model": {"architecture": MODELS[family]},
        "precision": "fp32",
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 2, "sequence_length": 16},
        "parallelism": {"engine": "ddp", "data": 1},
        "hardware": {"device": "cpu"},
    }
    return deep_merge(base, overrides)


def loaded(family: str = "llama", **overrides: Any) -> LoadedSpec:
    return validate(spec_dict(family, **overrides))


def run(spec: LoadedSpec, **options: Any) -> VerifyResult:
    from memplan.verify.runner import verify

    return verify(spec, Options(**options), lambda _rank, _what: None)


def model_state_rows_exact(result: VerifyResult) -> None:
    """Every model-state row on every rank is checked and off by 0 bytes, and activations are
    within their tolerance wherever the calculator models them. The peak is left to the
    calculator's timeline (its own tests, and the GPU tests here)."""
    for rank in result.ranks:
        for row in rank.rows:
            if row.name == "peak":
                continue
            if row.name in ("activations", STEP_TRANSIENT):
                assert row.ok is not False, (rank.rank, row)
                continue
            assert row.checked, (rank.rank, row)
            assert row.delta == 0, (rank.rank, row)
