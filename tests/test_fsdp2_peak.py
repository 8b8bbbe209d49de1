"""The peak of an FSDP2 (`fully_shard`) step on gloo CPU ranks against memplan's timeline:
memplan verify's distributed path, torch's FSDPMemTracker on every rank.

The cases are the tiny ones of benchmarks/accuracy.py, chosen so that the peak falls at a
different FSDP2 moment each time: the root's reduce-scatter with gloo's copy of its input,
the loss with every ZeRO-2 layer unsharded, the loss gradient beside the root's parameters
and the last layer's prefetched all-gather output (tied and untied heads), the embedding's
backward. Before these terms memplan was 4.7% to 45% under on them.

Tolerances. Llama: 0.1%. What memplan leaves out there is the step's input ids (tokens x
8 B), the loss's scalars and, when the root's reduce-scatter is the peak, it still counts the
hidden-state gradient of the embedding's backward: together under 0.05% of these peaks.
GPT-2: 1% (memplan verify's ACTIVATIONS_TOLERANCE): at its loss the tiny GPT-2 holds about
8 KB of tensors that are not saved for backward and that memplan's activation rules do not
name (the same without FSDP2), 0.8% of the smallest peak here.

gloo's race. gloo runs a collective on a worker thread that drops its own reference to the
buffers (the reduce-scatter's copy of its input, the all-gather's output; ProcessGroupGloo.cpp)
only after it has woken the caller, so in some runs (here 1 in 8 to 1 in 20, mostly on one
rank, once on both ranks of a 2-rank run) such a buffer lives on for a few ops and the rank
measures up to one of them more. Every rank is checked against [prediction - tolerance,
prediction + tolerance + the largest such buffer], and at least one rank (all hold the same
buffers, up to the last rank's smaller optimizer states) within the tolerance; a run in which
every rank raced is run once more.

Oracles. The expected value is each rank's measured peak (FSDPMemTracker on real gloo ranks);
memplan's prediction must lie in [measured - tolerance - the largest such buffer, measured +
tolerance], tolerances relative to the measurement. The largest buffer comes from the real
model (built on the meta device, grouped as memplan verify's fully_shard calls group it) and
torch's own padding rule (torch/distributed/fsdp/_fully_shard/_fsdp_common.py::
_get_dim0_padded_size), not from memplan's FSDP2 groups. Which moment memplan calls the peak
is memplan's own output: test_pin_fsdp2_peak_phase pins it.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import LoadedSpec, validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.verify.job import model_config
from memplan.verify.result import VerifyResult
from tests.conftest import TINY_LLAMA
from tests.fsdp2_oracle import padded_groups
from tests.test_verify_support import TINY_GPT2, run, spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")

# benchmarks/accuracy.py's tiny models (its GPT-2 has 256 positions).
MODELS: dict[str, dict[str, Any]] = {
    "llama": TINY_LLAMA,
    "gpt2": {**TINY_GPT2, "n_positions": 256},
}
TOLERANCE = {"llama": 0.001, "gpt2": 0.01}


# The MixedPrecisionPolicy.param_dtype (else the built dtype) memplan verify's FSDP2 ranks run
# with (memplan/verify/rank.py::_wrap): the all-gather and, reduce_dtype unset, the
# reduce-scatter dtype.
COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "bfloat16"}


def _gloo_copy(config: dict[str, Any], precision: str, ranks: int) -> int:
    """The largest buffer gloo's worker thread may keep a little longer: an FSDP2 group's
    all-gather output / reduce-scatter input, world x its padded shard, measured on the real
    model (tests/fsdp2_oracle.py)."""
    import torch

    groups = padded_groups(config, ranks)
    return int(max(groups.root, groups.block) * getattr(torch, COMPUTE[precision]).itemsize)


def _errors(result: VerifyResult, tol: float, copy: int) -> list[float]:
    """|predicted - measured| / measured per rank, each prediction inside the race envelope
    around its rank's measurement."""
    errors = []
    for rank in result.ranks:
        row = rank.row("peak")
        assert row.predicted is not None and row.measured is not None, row
        low, high = row.measured * (1 - tol) - copy, row.measured * (1 + tol)
        assert low <= row.predicted <= high, (rank.rank, row.measured, row.predicted)
        errors.append(abs(row.predicted - row.measured) / row.measured)
    return errors


def _check_peak(spec: LoadedSpec, ranks: int, tol: float, copy: int) -> None:
    errors = _errors(run(spec, nproc=ranks), tol, copy)
    if min(errors) > tol:  # every rank raced (see the module docstring): once more
        errors = _errors(run(spec, nproc=ranks), tol, copy)
    assert min(errors) <= tol, errors


CASES = [
    # model, precision, ZeRO stage, ranks, micro-batch, sequence, the predicted peak's phase
    ("llama", "fp32", 3, 4, 1, 16, "backward_end"),  # the root's reduce-scatter (gloo copy)
    ("llama", "bf16-mixed", 2, 4, 2, 16, "loss"),  # every layer unsharded (ZeRO-2)
    ("gpt2", "bf16-mixed", 3, 4, 1, 32, "backward_start"),  # tied head, prefetched layer
    ("llama", "bf16-mixed", 3, 2, 2, 32, "backward_start"),
    ("llama", "fp32", 2, 2, 1, 16, "backward_end"),
    ("gpt2", "bf16", 3, 4, 1, 16, "backward_end"),  # the embedding's backward (tied head)
]


def _spec(family: str, precision: str, stage: int, ranks: int, mb: int, seq: int) -> LoadedSpec:
    data = spec_dict(
        family,
        precision=precision,
        training={"micro_batch_size": mb, "sequence_length": seq},
        parallelism={"engine": "fsdp2", "data": ranks, "zero_stage": stage},
    )
    data["model"] = {"architecture": MODELS[family]}
    return validate(data)


@pytest.mark.parametrize(("family", "precision", "stage", "ranks", "mb", "seq", "phase"), CASES)
def test_fsdp2_peak_on_every_rank(
    family: str, precision: str, stage: int, ranks: int, mb: int, seq: int, phase: str
) -> None:
    spec = _spec(family, precision, stage, ranks, mb, seq)
    copy = _gloo_copy(MODELS[family], precision, ranks)
    _check_peak(spec, ranks, TOLERANCE[family], copy)


@pytest.mark.parametrize(("family", "precision", "stage", "ranks", "mb", "seq", "phase"), CASES)
def test_pin_fsdp2_peak_phase(
    family: str, precision: str, stage: int, ranks: int, mb: int, seq: int, phase: str
) -> None:
    """Pins which moment memplan's timeline calls the peak of each case (memplan's own
    output, no oracle): the cases were chosen to put it at a different FSDP2 moment each
    time. test_fsdp2_peak_on_every_rank checks the bytes at that moment against the measured
    ranks."""
    spec = _spec(family, precision, stage, ranks, mb, seq)
    report = estimate(spec.spec, from_config(MODELS[family]))
    assert report.timeline.peak.phase == phase


@pytest.mark.slow
def test_fsdp2_peak_gpt2_zero2_four_ranks() -> None:
    """GPT-2 (124M), bf16-mixed, reshard_after_forward=False, 4 ranks, b1 s64: the accuracy
    case that was 17% under. Its peak is the embedding's backward: the root unsharded with
    every root gradient (the tied head's accumulation on top) and the first layer's
    reduce-scatter input still held (20 to 45 s on 2 cores)."""
    data: dict[str, Any] = spec_dict(
        precision="bf16-mixed",
        training={"micro_batch_size": 1, "sequence_length": 64},
        parallelism={"engine": "fsdp2", "data": 4, "zero_stage": 2},
    )
    data["model"] = {"preset": "gpt2"}
    spec = validate(data)
    _check_peak(spec, 4, 0.001, _gloo_copy(model_config(spec), "bf16-mixed", 4))
