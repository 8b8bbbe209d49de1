"""memplan verify --fake: the same steps under FakeTensorMode (torch MemTracker /
FSDPMemTracker, a fake process group for several ranks), so no real memory is used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from tests.test_verify_support import loaded, model_state_rows_exact, run, spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")

LLAMA_2_7B = Path(__file__).parent / "data" / "hf-configs" / "Llama-2-7b-hf.json"


def _measured(result):  # type: ignore[no-untyped-def]
    return [{row.name: row.measured for row in rank.rows} for rank in result.ranks]


@pytest.mark.parametrize(
    ("precision", "parallelism", "ranks"),
    [
        ("bf16-mixed", {"engine": "ddp"}, 1),
        ("bf16-mixed", {"engine": "fsdp2"}, 4),
        ("bf16", {"engine": "fsdp2", "zero_stage": 2}, 2),
        ("fp32", {"engine": "ddp", "zero_stage": 1}, 4),
    ],
    ids=["one-process", "fsdp2-4", "fsdp2-stage2-2", "zero1-4"],
)
def test_fake_measures_what_the_real_run_measures(
    precision: str, parallelism: dict, ranks: int
) -> None:
    """Every category, the peak included, is the same on fake and real tensors (DDP's
    reducer buckets aside: the fake run cannot build the wrapper, so the ZeRO-1 peak is
    compared without them)."""
    spec = loaded(precision=precision, parallelism=parallelism)
    fake = run(spec, nproc=ranks, fake=True)
    real = run(spec, nproc=ranks)
    if parallelism["engine"] == "fsdp2" and ranks > 2 and _raced(fake, real):
        # gloo's worker thread now and then holds a collective's buffer a few ops longer on a
        # busy machine (one unsharded group, +267,392 B seen here; tests/test_fsdp2_peak.py
        # documents the race). It only adds to the real run: run it once more.
        real = run(spec, nproc=ranks)
    model_state_rows_exact(fake)
    for fake_rank, real_rank in zip(_measured(fake), _measured(real), strict=True):
        if parallelism["engine"] == "ddp" and ranks > 1:
            gradient_copy = real_rank["gradients"]
            assert fake_rank.pop("peak") == real_rank.pop("peak") - gradient_copy
        elif parallelism["engine"] == "fsdp2" and ranks > 2:
            # A real 4-rank gloo run frees collective buffers at timing-dependent moments:
            # its peak varied by up to 7% between identical runs (1,604,828 vs 1,615,164 B and
            # 2,216,348 vs 2,375,520 B seen), so the peak is held to 8% here, not to the byte.
            fake_peak, real_peak = fake_rank.pop("peak"), real_rank.pop("peak")
            assert abs(fake_peak - real_peak) <= 0.08 * real_peak
        assert fake_rank == real_rank


def _raced(fake: Any, real: Any) -> bool:
    """A real rank's peak above the fake run's by more than the 8% the test allows."""
    return any(
        r["peak"] - f["peak"] > 0.08 * r["peak"]
        for f, r in zip(_measured(fake), _measured(real), strict=True)
    )


@pytest.mark.slow
def test_llama_2_7b_verifies_under_fake_tensors() -> None:
    """The full-size model on a 24 GiB CPU host (field notes: about 11 s for the step)."""
    data = spec_dict(
        precision="bf16-mixed",
        training={"micro_batch_size": 1, "sequence_length": 512},
    )
    data["model"] = {"hf_config": str(LLAMA_2_7B)}
    result = run(validate(data), fake=True)
    model_state_rows_exact(result)
    params = result.headline.row("parameters").measured
    assert params == 6_738_415_616 * 2  # bf16
    assert result.headline.row("master_weights").measured == 2 * params
