"""Library knobs as spec fields (issue 15 item 3): DeepSpeed's zero_optimization keys and torch
DDP's gradient_as_bucket_view, with the libraries' own names and defaults, change the timeline
by exactly what the library's own allocation rule gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan import memory
from memplan.config.parallelism import DeepSpeedSpec, ParallelismSpec
from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.precision import dtype_bytes
from memplan.report import estimate
from memplan.report.result import Report
from memplan.states.engines.deepspeed import step as ds_step
from tests.conftest import TINY_LLAMA, make_spec

# Recorded from DeepSpeed 0.19.8's own config class (command inside the file).
DS_DEFAULTS = json.loads(
    (Path(__file__).parent / "data" / "deepspeed_zero_defaults.json").read_text()
)


def report(**overrides: Any) -> Report:
    spec = make_spec(**overrides)
    return estimate.estimate(spec, from_config(TINY_LLAMA))


def term(r: Report, name: str) -> memory.Transient | None:
    return next((t for t in r.timeline.transients if t.name == name), None)


def test_deepspeed_spec_defaults_match_recorded_deepspeed_config() -> None:
    ds = DeepSpeedSpec()
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_max_live_parameters",
        "sub_group_size",
        "stage3_param_persistence_threshold",
    ):
        assert getattr(ds, key) == DS_DEFAULTS[key], key
    assert ds.overlap_comm is None  # None = DeepSpeed's stage-dependent default


def test_deepspeed_spec_defaults_match_installed_deepspeed() -> None:
    """Same check against DeepSpeed itself, where it is importable (never in the main env)."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    for stage in range(4):
        z = zero_config.DeepSpeedZeroConfig(stage=stage)
        ds = DeepSpeedSpec()
        assert z.reduce_bucket_size == ds.reduce_bucket_size
        assert z.prefetch_bucket_size == ds.stage3_prefetch_bucket_size
        assert z.max_live_parameters == ds.stage3_max_live_parameters
        assert z.sub_group_size == ds.sub_group_size
        assert z.param_persistence_threshold == ds.stage3_param_persistence_threshold
        assert z.overlap_comm == DS_DEFAULTS["overlap_comm_by_stage"][str(stage)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overlap_comm_default_follows_deepspeed_per_stage(stage: int) -> None:
    # DeepSpeedZeroConfig.overlap_comm_valid: None -> stage == 3; stage_1_and_2.py::
    # setup_buckets allocates a second reduce_bucket_size buffer when overlap_comm is on;
    # stage3.py allocates one buffer at init whatever overlap_comm is.
    width = dtype_bytes("bf16")
    size = DS_DEFAULTS["reduce_bucket_size"]
    default = term(
        report(parallelism={"engine": "deepspeed", "data": 8, "zero_stage": stage}),
        "deepspeed_reduce_bucket",
    )
    on = term(
        report(
            parallelism={
                "engine": "deepspeed",
                "data": 8,
                "zero_stage": stage,
                "deepspeed": {"overlap_comm": True},
            }
        ),
        "deepspeed_reduce_bucket",
    )
    off = term(
        report(
            parallelism={
                "engine": "deepspeed",
                "data": 8,
                "zero_stage": stage,
                "deepspeed": {"overlap_comm": False},
            }
        ),
        "deepspeed_reduce_bucket",
    )
    assert default and on and off
    default_on = DS_DEFAULTS["overlap_comm_by_stage"][str(stage)]
    assert default.bytes == (on if default_on else off).bytes
    assert off.bytes == size * width
    assert on.bytes == (size * width if stage == 3 else 2 * size * width)


def test_reduce_bucket_size_changes_the_bucket_by_its_own_elements() -> None:
    # stage_1_and_2.py::setup_buckets: torch.empty(int(self.reduce_bucket_size), dtype) per buffer.
    width = dtype_bytes("bf16")
    par = {"engine": "deepspeed", "data": 8, "zero_stage": 2}
    base = term(report(parallelism=par), "deepspeed_reduce_bucket")
    small = term(
        report(parallelism={**par, "deepspeed": {"reduce_bucket_size": 200_000_000}}),
        "deepspeed_reduce_bucket",
    )
    assert base and small
    assert base.bytes - small.bytes == (DS_DEFAULTS["reduce_bucket_size"] - 200_000_000) * width
    assert small.bytes == 200_000_000 * width


def test_stage3_prefetch_and_max_live_parameters_move_the_gathered_parameters() -> None:
    width = dtype_bytes("bf16")
    biggest = max(ds_step.module_sizes(from_config(TINY_LLAMA)))
    par = {"engine": "deepspeed", "data": 8, "zero_stage": 3}
    base = term(report(parallelism=par), "zero3_gathered_parameters")
    assert base and base.bytes == (biggest + DS_DEFAULTS["stage3_prefetch_bucket_size"]) * width
    less = term(
        report(parallelism={**par, "deepspeed": {"stage3_prefetch_bucket_size": 1_000}}),
        "zero3_gathered_parameters",
    )
    assert (
        less
        and base.bytes - less.bytes == (DS_DEFAULTS["stage3_prefetch_bucket_size"] - 1_000) * width
    )
    capped = term(
        report(
            parallelism={
                **par,
                "deepspeed": {"stage3_max_live_parameters": biggest + 10},
            }
        ),
        "zero3_gathered_parameters",
    )
    assert capped and capped.bytes == (biggest + 10) * width


def test_gradient_as_bucket_view_drops_one_gradient_copy() -> None:
    # torch/nn/parallel/distributed.py::DistributedDataParallel docstring (2.13):
    # gradient_as_bucket_view=True "can reduce peak memory usage, where the saved memory size
    # will be equal to the total gradients size".
    assert ParallelismSpec().gradient_as_bucket_view is False  # torch's default
    base = report(parallelism={"engine": "ddp", "data": 4})
    view = report(parallelism={"engine": "ddp", "data": 4, "gradient_as_bucket_view": True})
    buckets = term(base, "ddp_gradient_buckets")
    assert buckets and buckets.bytes == base.per_gpu.bytes_of("gradients")
    assert term(view, "ddp_gradient_buckets") is None
    saved = base.timeline.peak_bytes - view.timeline.peak_bytes
    assert saved == base.per_gpu.bytes_of("gradients")


def test_cuda_context_is_read_from_the_spec() -> None:
    r = report(hardware={"gpu": "H100-80GB", "cuda_context": "300MiB"})
    assert r.timeline.cuda_context_bytes == 300 << 20
    assert report(hardware={"gpu": "H100-80GB"}).timeline.cuda_context_bytes == (
        memory.CUDA_CONTEXT_BYTES
    )


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"deepspeed": {"reduce_bucket_size": 0}}, "reduce_bucket_size"),
        ({"deepspeed": {"overlap_comm": "sometimes"}}, "overlap_comm"),
        ({"deepspeed": {"stage3_max_live_parameters": -1}}, "stage3_max_live_parameters"),
        ({"gradient_as_bucket_view": "maybe"}, "gradient_as_bucket_view"),
    ],
)
def test_bad_knobs_name_the_field(section: dict[str, Any], field: str) -> None:
    with pytest.raises(MemplanError) as err:
        make_spec(parallelism={"engine": "deepspeed", **section})
    assert field in str(err.value)
