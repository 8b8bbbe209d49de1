"""The eager attention mask torch.utils.checkpoint holds from the forward to the first decoder
layer's backward (memplan.activations.checkpoint_held): saved by no node, alive through the
loss's backward under full and selective recomputation with eager attention.

The oracle of the slow cases is `memplan verify`'s measured peak on CPU (torch MemTracker's
total of live storages while real tensors run a training step, memplan/verify/measure.py),
which shares nothing with the prediction. Before the term (benchmarks/results/
profile_verify.json at 28c1315): qwen3_5_text bf16 eager selective -0.95% (the [2, 1, 128, 128]
bf16 mask, 65,536 B, less 1,020 B), where SDPA (no mask) was +0.015%; the tiny Llama's rule
(benchmarks/profile_verify.py's BASE) bf16 eager selective -0.243% (1,579,288 B predicted,
1,583,132 measured), +0.016% with it, SDPA's +252 B; its full recomputation is unchanged (its
peak is at a phase the mask does not reach)."""

from __future__ import annotations

from typing import Any

import pytest

from memplan.activations.checkpoint_held import SAVED_MASK, held_mask
from memplan.model.forward.tensors import Activations, Block, Saved, Setting


def _verify(config: dict[str, Any], setting: dict[str, str]) -> dict[str, Any]:
    """One `memplan verify` run of `config` (benchmarks/profile_verify.py's spec): its JSON."""
    pytest.importorskip("transformers")
    from benchmarks.profile_verify import spec
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify

    return to_json(verify(validate(spec(config, setting)), Options(), lambda _r, _w: None))


def _gap(doc: dict[str, Any]) -> int:
    peak = doc["categories"]["peak"]
    return int(peak["predicted"]) - int(peak["measured"])


@pytest.mark.slow
def test_profile_eager_selective_holds_the_mask() -> None:
    """qwen3_5_text (a traced profile) bf16 selective recomputation: eager's predicted peak is
    as close to its measurement as SDPA's (which passes no mask), within 0.05%."""
    from benchmarks.profile_verify import TYPES

    eager, sdpa = (
        _verify(
            TYPES["qwen3_5_text"],
            {"precision": "bf16", "attention": a, "checkpointing": "selective"},
        )
        for a in ("eager", "sdpa")
    )
    assert _gap(eager) == _gap(sdpa), (_gap(eager), _gap(sdpa))
    peak = eager["categories"]["peak"]
    assert abs(peak["predicted"] / peak["measured"] - 1) <= 0.0005, peak
    assert eager["ok"], eager["failures"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_rule_eager_recomputation_holds_the_mask(checkpointing: str) -> None:
    """The tiny Llama (a family rule) bf16: eager's gap to the measured peak is SDPA's, with
    selective and full recomputation."""
    from benchmarks.profile_verify import BASE

    llama = {"model_type": "llama", **BASE, "tie_word_embeddings": False}
    eager, sdpa = (
        _verify(llama, {"precision": "bf16", "attention": a, "checkpointing": checkpointing})
        for a in ("eager", "sdpa")
    )
    assert _gap(eager) == _gap(sdpa), (_gap(eager), _gap(sdpa))


# Pinning tests of the term's conditions and size (their expected values recompute it).


def _setting(**overrides: Any) -> Setting:
    base: dict[str, Any] = {
        "batch": 2,
        "sequence": 32,
        "stream": "bf16",
        "matmul": "bf16",
        "autocast": False,
        "device": "cpu",
        "attention": "eager",
        "dropout": None,
        "checkpointing": "selective",
    }
    return Setting(**{**base, **overrides})


def _acts(*names: str) -> Activations:
    tensors = tuple(
        Saved(name=n, shape=(4,), dtype="bf16", saved_by="test", source="test") for n in names
    )
    return Activations(modelled=True, blocks=(Block(name="embeddings", count=1, tensors=tensors),))


def test_pin_mask_size_and_phases() -> None:
    """Pins behaviour: [2, 1, 32, 32] in the stream dtype (fp32 under autocast), alive from
    the forward through the layers' backward."""
    term = held_mask(_acts("x"), _setting())
    assert term is not None and term.bytes == 2 * 32 * 32 * 2
    assert term.phases == ("forward", "loss", "backward_start", "backward")
    amp = held_mask(_acts("x"), _setting(stream="fp32", autocast=True))
    assert amp is not None and amp.bytes == 2 * 32 * 32 * 4


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention": "sdpa"},
        {"checkpointing": "none"},
        {"implementation": "torchtitan"},
    ],
)
def test_pin_no_mask_held(overrides: dict[str, Any]) -> None:
    """Pins behaviour: SDPA (no mask), no recomputation (the forward frees it), another
    stack's model code: no term."""
    assert held_mask(_acts("x"), _setting(**overrides)) is None


def test_pin_no_mask_where_the_rule_saves_it() -> None:
    """Pins behaviour: GPT-2's rule saves the mask as a checkpoint argument: not counted
    twice."""
    assert held_mask(_acts(SAVED_MASK), _setting(checkpointing="full")) is None


def test_pin_one_mask_per_masked_kind_and_released_before_a_recurrent_first_layer() -> None:
    """Pins behaviour: sliding and full layers hold a mask each; linear-attention and
    convolution layers none (create_recurrent_attention_mask); a first layer that takes none
    frees every mask before its backward (Activations.checkpoint_released_bytes)."""
    from memplan.activations.checkpoint_held import with_held_mask

    one = 2 * 32 * 32 * 2
    two = with_held_mask(_acts("x"), _setting(), ("sliding_attention", "full_attention"))
    assert sum(t.bytes for t in two.checkpoint_held) == 2 * one
    assert two.checkpoint_released_bytes == 0
    hybrid = with_held_mask(_acts("x"), _setting(), ("linear_attention", "full_attention"))
    assert sum(t.bytes for t in hybrid.checkpoint_held) == one
    assert hybrid.checkpoint_released_bytes == one
    assert with_held_mask(_acts("x"), _setting(), ("conv", "conv")).checkpoint_held == ()
