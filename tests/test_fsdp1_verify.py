"""`memplan verify` with engine fsdp1: torch FullyShardedDataParallel on gloo CPU ranks, wrapped
as accelerate wraps the model (memplan.verify.fsdp1_engine), each rank's model states and
activations against memplan's prediction."""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from memplan.verify.job import Options, plan
from tests.test_verify_support import loaded, model_state_rows_exact, run


def test_fake_is_refused() -> None:
    spec = loaded(parallelism={"engine": "fsdp1", "data": 2})
    with pytest.raises(MemplanError, match="real tensors"):
        plan(spec, Options(fake=True))


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "stage"), [("bf16-mixed", 3), ("fp32", 2)])
def test_verify_fsdp1_on_two_gloo_ranks(precision: str, stage: int) -> None:
    """Every rank's parameters, gradients, optimizer states and buffers to the byte, and the
    saved activations (FSDP1's unsharded views excluded as parameters) within tolerance."""
    spec = loaded(
        precision=precision,
        optimizer={"name": "adamw", "implementation": "for_loop"},
        parallelism={"engine": "fsdp1", "data": 2, "zero_stage": stage},
    )
    result = run(spec)
    assert len(result.ranks) == 2
    model_state_rows_exact(result)
