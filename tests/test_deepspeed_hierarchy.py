"""DeepSpeed's hierarchical ZeRO-3: ZeRO++ hpZ (`zero_hpz_partition_size`) and MiCS
(`mics_shard_size`), and the reduction bucket's dtype.

Oracles: DeepSpeed's engine on 4 CPU gloo ranks (benchmarks/verify_deepspeed.py, recorded in
benchmarks/results/verify-deepspeed.json and checked against today's prediction by
tests/test_verify_deepspeed.py); DeepSpeed 0.19.8's own `Init._partition_param_sec` for the
secondary partition's size and dtype; DeepSpeed's optimizers allocating their reduction
buckets on one gloo rank. The spec checks need no oracle: they test memplan's refusals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model import sources
from memplan.report.estimate import estimate
from memplan.states.engines.deepspeed import step as ds_step
from memplan.states.engines.deepspeed.sharding import HPZ_FROZEN
from memplan.states.engines.deepspeed.zero3 import hpz_secondary_elements
from tests.test_verify_support import spec_dict

ROOT = Path(__file__).resolve().parent.parent
needs_deepspeed = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "deepspeed")),
    reason="needs torch and deepspeed (DS_BUILD_OPS=0 pip install --no-deps deepspeed==0.19.8)",
)


def _spec(**parallelism: Any) -> dict[str, Any]:
    base = {"engine": "deepspeed", "zero_stage": 3, "data": 4}
    return spec_dict(parallelism={**base, **parallelism})


@pytest.mark.parametrize(
    ("parallelism", "says"),
    [
        ({"engine": "fsdp2", "deepspeed": {"zero_hpz_partition_size": 2}}, "engine is fsdp2"),
        ({"zero_stage": 2, "deepspeed": {"mics_shard_size": 2}}, "zero_stage 2"),
        ({"deepspeed": {"zero_hpz_partition_size": 3}}, "must divide data 4"),
        ({"deepspeed": {"mics_shard_size": 8}}, "must divide data 4"),
        ({"tensor": 2, "deepspeed": {"mics_shard_size": 2}}, "data parallelism only"),
        (
            {"offload": {"parameters": "cpu"}, "deepspeed": {"zero_hpz_partition_size": 2}},
            "offload is not modelled",
        ),
        (
            {"deepspeed": {"zero_hpz_partition_size": 2, "mics_shard_size": 2}},
            "set one",
        ),
    ],
)
def test_refused_with_one_clear_error(parallelism: dict[str, Any], says: str) -> None:
    with pytest.raises(MemplanError) as error:
        validate(_spec(**parallelism))
    assert says in str(error.value)
    assert "deepspeed." in str(error.value)


def test_off_by_default_and_deepspeeds_own_off_values() -> None:
    for off in (
        {},
        {"mics_shard_size": -1},
        {"mics_shard_size": 0},
        {"zero_hpz_partition_size": 1},
        {"zero_hpz_partition_size": 0},
    ):
        spec = validate(_spec(engine="ddp", zero_stage=0, deepspeed=off)).spec
        assert not spec.parallelism.deepspeed.mics
        assert spec.parallelism.deepspeed.zero_hpz_partition_size <= 1


def _report(precision: str = "bf16-mixed", **parallelism: Any) -> Any:
    loaded = validate({**_spec(**parallelism), "precision": precision})
    from memplan.verify.job import model_config

    return estimate(loaded.spec, sources.from_config(model_config(loaded), origin="model"))


def test_mics_holds_what_zero3_holds_over_the_shard_group() -> None:
    """MiCS over groups of 2 of 4 data ranks keeps, per GPU, exactly what ZeRO-3 over 2 ranks
    keeps (measured: benchmarks/results/verify-deepspeed.json, the MiCS cases)."""
    mics = _report(data=4, deepspeed={"mics_shard_size": 2})
    zero3 = _report(data=2)
    for name in ("parameters", "gradients", "master_weights", "exp_avg", "exp_avg_sq"):
        assert mics.per_gpu.bytes_of(name) == zero3.per_gpu.bytes_of(name), name
    assert mics.per_gpu.ranks == (0, 1, 2, 3)


def test_hpz_secondary_is_a_transient_of_forward_backward_and_step() -> None:
    # The tiny model's matrices released in forward (persistence threshold 1,000), its norms not.
    report = _report(
        deepspeed={"zero_hpz_partition_size": 2, "stage3_param_persistence_threshold": 1000}
    )
    plain = _report(deepspeed={"stage3_param_persistence_threshold": 1000})
    assert report.per_gpu.total_bytes == plain.per_gpu.total_bytes  # no model-state row
    start = {t.name for t in report.timeline.transient_at("start")}
    assert ds_step.HPZ_SECONDARY not in start
    for phase in ("forward", "backward", "optimizer_step"):
        assert ds_step.HPZ_SECONDARY in {t.name for t in report.timeline.transient_at(phase)}
    # the norms' secondary partitions exist only while the step runs
    at_step = {t.name for t in report.timeline.transient_at("optimizer_step")}
    at_backward = {t.name for t in report.timeline.transient_at("backward")}
    assert ds_step.HPZ_SECONDARY_PERSISTENT in at_step - at_backward


def test_hpz_keeps_the_frozen_parameters_secondary_partition() -> None:
    loaded = validate(
        {
            **_spec(deepspeed={"zero_hpz_partition_size": 2}),
            "finetune": {"freeze": ["model.embed_tokens.*"]},
        }
    )
    from memplan.verify.job import model_config

    report = estimate(loaded.spec, sources.from_config(model_config(loaded), origin="model"))
    (row,) = [t for t in report.per_gpu.terms if t.name == HPZ_FROZEN]
    # embed_tokens [1041, 64] over 4 ranks, hpZ group 2 (hpz_secondary_elements: DeepSpeed's
    # own sizing, tested against it below).
    assert row.elements == hpz_secondary_elements(1041 * 64, 4, 2)


@needs_deepspeed
@pytest.mark.parametrize(("numel", "world", "hpz"), [(66624, 4, 2), (64, 4, 2), (1041, 8, 4)])
def test_secondary_partition_size_is_deepspeeds_own(
    numel: int, world: int, hpz: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Init._partition_param_sec (0.19.8) run on one parameter: the secondary partition it
    allocates, on every rank of the hpZ group, against hpz_secondary_elements."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus

    # its debug print asks deepspeed.comm for the rank; no process group is needed otherwise
    monkeypatch.setattr(partition_parameters, "print_rank_0", lambda *_a, **_k: None)

    for rank in range(hpz):
        init = types.SimpleNamespace(
            dp_world_size=world,
            num_ranks_in_param_group=hpz,
            rank_in_group=rank,
            remote_device="cpu",
            pin_memory=False,
            quantized_nontrainable_weights=False,
            _partition_world_size=lambda _p: world,  # noqa: B023
        )
        init._padding_size = types.MethodType(Init._padding_size, init)
        init._aligned_size = types.MethodType(Init._aligned_size, init)
        param = torch.nn.Parameter(torch.randn(numel, dtype=torch.bfloat16))
        param.ds_status = ZeroParamStatus.AVAILABLE
        param.ds_secondary_tensor = None
        param.ds_numel = numel
        param.ds_id = 0
        Init._partition_param_sec(init, param)
        assert param.ds_secondary_tensor.numel() == hpz_secondary_elements(numel, world, hpz)
        assert param.ds_secondary_tensor.dtype == torch.bfloat16  # the model's dtype


@needs_deepspeed
def test_reduce_bucket_dtype_is_the_one_deepspeed_allocates() -> None:
    """DeepSpeed's optimizers on one gloo rank, tiny model (tests/deepspeed_bucket_probe.py, in
    a child process: deepspeed.initialize patches torch for the rest of its process): the dtype
    of the reduction bucket each allocates against reduce_bucket_dtype. bf16 model; fp32
    accumulation at stage 1 (CPU optimizer offload keeps it off BF16_Optimizer) and 2; an
    fp32 communication dtype at stage 3."""
    from tests.deepspeed_bucket_probe import CASES

    port = str(29500 + os.getpid() % 1000)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "deepspeed_bucket_probe.py"), port],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for (zero, accumulate, communication), dtypes in zip(CASES, seen, strict=True):
        expected = ds_step.reduce_bucket_dtype(
            stage=zero["stage"], parameters="bf16", accumulate=accumulate,
            communication=communication,
        )  # fmt: skip
        assert dtypes == [expected], (zero, accumulate, communication)
