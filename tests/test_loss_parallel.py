"""torch's loss_parallel() under DTensor TP (parallelism.loss_parallel).

Oracle for the forward's decomposed log-softmax (memplan.states.engines.dtensor_tp.
loss_parallel_log_softmax): a real run on 2 gloo ranks (tests/loss_parallel_probe.py):
torch's MemTracker around F.cross_entropy of vocabulary-sharded fp32 logits under
loss_parallel(). The forward holds, above the logits, the output it saves (one [tokens,
vocabulary / TP] fp32 slice) and one more slice (`shifted`, or exp(shifted)) at its peak,
plus three [tokens, 1] fp32 statistics (max, sum of exp, log of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.states.engines import dtensor_tp
from tests.conftest import TINY_LLAMA


def test_loss_parallel_forward_measured(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.tensor.parallel")
    from tests.loss_parallel_probe import TOKENS, run

    for r in run(tmp_path):
        saved = r["slice"]  # the log-softmax output the loss keeps for backward
        predicted = saved + dtensor_tp.loss_parallel_log_softmax(r["slice"]).bytes
        statistics = 3 * TOKENS * 4
        assert r["peak"] - r["before"] == predicted + statistics, r
        assert r["after"] - r["before"] <= saved + statistics


def _spec(**parallelism: Any) -> Any:
    return validate(
        {
            "model": {"architecture": TINY_LLAMA},
            "precision": "fp32",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 2, "sequence_length": 16},
            "parallelism": {"engine": "fsdp2", "tensor": 2, **parallelism},
            "hardware": {"device": "cpu"},
        }
    ).spec


def test_pin_loss_parallel_off_keeps_whole_logits() -> None:
    """loss_parallel: false (torchtitan's disable_loss_parallel): the logits and the loss's
    tensors are whole-vocabulary on every TP rank and loss_parallel's terms are gone
    (pinning: memplan's own rule, from torchtitan's apply_tp)."""
    on = estimate(_spec(), from_config(TINY_LLAMA))
    off = estimate(_spec(loss_parallel=False), from_config(TINY_LLAMA))
    tokens, vocab = 2 * 16, TINY_LLAMA["vocab_size"]
    assert off.activations.logits_bytes == tokens * vocab * 4
    assert on.activations.logits_bytes == tokens * 521 * 4  # torch.chunk's first rank
    names = {t.name for t in on.timeline.transients}
    assert {"tp_loss_parallel_log_softmax", "tp_loss_parallel_gradient"} <= names
    assert not any("loss_parallel" in t.name for t in off.timeline.transients)


@pytest.mark.parametrize(
    "parallelism",
    [
        {"engine": "fsdp2", "tensor": 1, "loss_parallel": True},
        {"engine": "megatron", "tensor": 2, "loss_parallel": False},
    ],
)
def test_loss_parallel_refused_outside_dtensor_tp(parallelism: dict[str, Any]) -> None:
    with pytest.raises((MemplanError, ValueError), match="loss_parallel"):
        validate({"model": {"architecture": TINY_LLAMA}, "parallelism": parallelism})
