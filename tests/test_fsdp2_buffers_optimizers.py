"""FSDP2 details against real torch on a one-rank gloo group: which optimizers run on its
DTensor parameters, and the dtype its buffers keep under a *-mixed recipe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report import estimate
from tests.conftest import TINY_LLAMA, make_spec

GEMMA2 = {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 16}
GEMMA = {**TINY_LLAMA, "model_type": "gemma", "head_dim": 16}


@pytest.fixture
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("foreach", [True, False])
def test_adafactor_fails_on_fsdp2(one_rank: None, foreach: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    fully_shard(model)
    opt = torch.optim.Adafactor(model.parameters(), foreach=foreach)
    model(torch.randn(3, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="in-place operations that require placement"):
        opt.step()


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_memplan_refuses_adafactor_on_fsdp2(command: str) -> None:
    if command == "estimate":
        spec = make_spec(
            optimizer={"name": "adafactor"}, parallelism={"engine": "fsdp2", "data": 2}
        )
        with pytest.raises(MemplanError, match="adafactor does not run on FSDP2") as err:
            estimate.estimate(spec, from_config(TINY_LLAMA))
        assert err.value.field == "optimizer.name"
    else:
        from memplan.plan.search import plan

        spec = make_spec(
            optimizer={"name": "adafactor"},
            hardware={"gpu": "H100-80GB"},
            plan={"gpus": 2, "engines": ["ddp", "fsdp2"]},
        )
        result = plan(spec, from_config(TINY_LLAMA), suggest=False)
        assert result.layouts
        assert all(c.engine != "fsdp2" for c in result.layouts)


@pytest.mark.parametrize("arch", [GEMMA2, GEMMA, TINY_LLAMA], ids=["gemma2", "gemma", "llama"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_fsdp2_buffers_keep_the_master_dtype(
    one_rank: None, arch: dict[str, Any], precision: str
) -> None:
    """Oracle: the model built in fp32 and sharded with MixedPrecisionPolicy (as verify and
    torchtitan do); its buffers as torch holds them."""
    low = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch), dtype=torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=low)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    measured = sum(b.numel() * b.element_size() for b in model.buffers())
    spec = make_spec(
        model={"architecture": arch},
        precision=precision,
        parallelism={"engine": "fsdp2", "data": 1},
    )
    report = estimate.estimate(spec, from_config(arch))
    assert sum(t.bytes for t in report.buffers) == measured
