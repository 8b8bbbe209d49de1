"""memplan verify --device cuda: allocator counters per phase plus the same per-storage
attribution. Marked `gpu`; skipped cleanly where torch sees no CUDA device.

Tolerances (issue 6): model states to the byte; the peak (torch.cuda.max_memory_allocated
over the measured step) within 3% once the calculator models activations.
"""

from __future__ import annotations

import pytest

from memplan.verify.result import PEAK_TOLERANCE
from tests.test_verify_support import loaded, model_state_rows_exact, run

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_cuda_one_process(precision: str) -> None:
    result = run(loaded(precision=precision, hardware={"device": "cuda"}), device="cuda")
    model_state_rows_exact(result)
    names = [p.name for p in result.phases]
    assert names == ["before step", "forward", "backward", "optimizer step"]
    rank = result.headline
    peak = rank.row("peak")
    assert peak.measured == max(p.max_allocated for p in result.phases)
    states = sum(rank.row(c).measured or 0 for c in ("parameters", "gradients"))
    assert peak.measured is not None and peak.measured > states
    assert all(p.reserved >= p.allocated for p in result.phases)
    if peak.predicted is not None:
        assert abs(peak.measured - peak.predicted) <= PEAK_TOLERANCE * peak.predicted


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("parallelism", [{"engine": "fsdp2"}, {"engine": "ddp", "zero_stage": 1}])
def test_cuda_two_ranks_on_nccl(parallelism: dict) -> None:
    result = run(loaded(parallelism=parallelism), nproc=2, device="cuda")
    model_state_rows_exact(result)
