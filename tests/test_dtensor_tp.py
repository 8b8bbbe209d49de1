"""DTensor TP's terms in the timeline (memplan.states.engines.dtensor_tp, and FSDP2's under TP:
memplan.states.engines.fsdp2.tp): pure, no torch. The sizes they must add up to are measured
against torch in tests/test_verify_tp.py::test_peak_holds_on_every_rank (the independent
oracle); these tests pin the terms' sizes and where they apply."""

from __future__ import annotations

from typing import Any

import pytest

from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.step.timeline import Timeline
from tests.conftest import TINY_LLAMA
from tests.test_verify_support import loaded

HIDDEN = TINY_LLAMA["hidden_size"]
ROWS = 521  # torch.chunk of the 1,041-row vocabulary over TP 2: the first rank's rows
TOKENS = 2 * 16


def timeline(precision: str = "fp32", **parallelism: Any) -> Timeline:
    spec = loaded(precision=precision, parallelism={"tensor": 2, **parallelism}).spec
    return estimate(spec, from_config(TINY_LLAMA)).timeline


def sizes(tl: Timeline) -> dict[str, int]:
    return {t.name: t.bytes for t in tl.transients if t.name.startswith("tp_")}


def test_pin_one_rank_fsdp2_terms() -> None:
    """TP 2, FSDP2 on a one-rank mesh, fp32: the root's unsharded copies (embedding and head
    rows, final norm), the whole [1,041, 64] embedding gradient, one decoder layer's
    gradients (the previous reduce-scatter input), and loss_parallel's third tensor (and its
    forward's `shifted`, at the loss)."""
    tl = timeline(engine="fsdp2", zero_stage=3)
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 160 * 64  # q, k, v, o, gate, up, down
    assert sizes(tl) == {
        "tp_loss_parallel_log_softmax": TOKENS * ROWS * 4,
        "tp_loss_parallel_gradient": TOKENS * ROWS * 4,
        "tp_fsdp2_previous_reduce_scatter_input": (layer // 2 + 2 * HIDDEN) * 4,
        "tp_fsdp2_unsharded_root": (2 * ROWS * HIDDEN + HIDDEN) * 4,
        "tp_embedding_gradient_whole": TINY_LLAMA["vocab_size"] * HIDDEN * 4,
    }
    assert tl.peak.phase == "backward_end"
    # The root's post-backward follows the embedding's backward and replaces its moment.
    assert "embedding_backward" not in tl.peak.transients


def test_pin_two_dimensional_fsdp2_adds_only_the_previous_reduce_scatter() -> None:
    names = set(sizes(timeline(engine="fsdp2", zero_stage=3, data=2)))
    assert names == {
        "tp_loss_parallel_log_softmax",
        "tp_loss_parallel_gradient",
        "tp_fsdp2_previous_reduce_scatter_input",
    }


def test_pin_bf16_mixed_sizes_follow_the_recipe() -> None:
    """bf16-mixed: FSDP2's unsharded parameters and gradients are bf16; loss_parallel works on
    the fp32 upcast of the logits."""
    fp32 = sizes(timeline(engine="fsdp2", zero_stage=3))
    bf16 = sizes(timeline("bf16-mixed", engine="fsdp2", zero_stage=3))
    assert bf16["tp_loss_parallel_gradient"] == fp32["tp_loss_parallel_gradient"]
    for name in ("tp_fsdp2_unsharded_root", "tp_embedding_gradient_whole"):
        assert 2 * bf16[name] == fp32[name], name


@pytest.mark.parametrize(
    ("parallelism", "expected"),
    [
        ({"engine": "ddp"}, {"tp_loss_parallel_log_softmax", "tp_loss_parallel_gradient"}),
        ({"engine": "megatron"}, set()),
        ({"engine": "deepspeed", "zero_stage": 1}, set()),
    ],
    ids=["ddp", "megatron", "deepspeed"],
)
def test_pin_terms_only_for_torch_dtensor_engines(
    parallelism: dict[str, Any], expected: set[str]
) -> None:
    assert set(sizes(timeline(**parallelism))) == expected


def test_no_terms_without_tensor_parallelism() -> None:
    spec = loaded(parallelism={"engine": "fsdp2", "zero_stage": 3}).spec
    assert not sizes(estimate(spec, from_config(TINY_LLAMA)).timeline)


def test_pin_ddp_master_gradient_has_the_whole_embedding() -> None:
    """ddp, bf16-mixed with fp32 masters: the embedding's master gradient is cast from its
    whole (Replicate) 16-bit gradient: the 1,041 - 521 rows the other TP rank owns, in fp32."""
    tl = timeline("bf16-mixed", engine="ddp")
    assert sizes(tl)["tp_master_gradient_whole_embedding"] == (1041 - ROWS) * HIDDEN * 4
    assert tl.peak.phase == "optimizer_step"
    assert "tp_master_gradient_whole_embedding" in tl.peak.transients
