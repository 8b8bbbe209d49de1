"""The engines' step hooks (memplan.states.engines.STEPS) and the cache the timeline shares
across calls (StepCache). The bytes of each engine's terms are checked against torch and the
engines' own code elsewhere (tests/test_timeline_measured.py, test_fsdp2_peak.py,
test_deepspeed_bf16_optimizer.py); here: every engine has its hooks, the padded-shard rule
agrees with torch.chunk, and a cache shared by many specs gives each the same JSON as its own
estimate (so no cache key leaves out an input the terms read)."""

from __future__ import annotations

from typing import Any, get_args

import pytest
import torch

from memplan.config.parallelism import Engine
from memplan.model.inventory import TensorSpec
from memplan.model.sources import from_config
from memplan.report.estimate import assemble, estimate, model_states
from memplan.report.json import estimate_json as to_json
from memplan.states.engines import STEPS
from memplan.states.engines.base import StepCache
from memplan.states.engines.fsdp2.sharding import padded_elements
from tests.conftest import TINY_LLAMA, make_spec


def test_every_engine_has_its_step_hooks() -> None:
    assert set(STEPS) == set(get_args(Engine))


@pytest.mark.parametrize("shape", [(1041, 64), (160, 64), (7,), (3, 5), (64,), (2, 3, 4)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_padded_shard_is_torch_chunks_first_piece(shape: tuple[int, ...], world: int) -> None:
    """FSDP2 pads every rank's shard to the first (largest) torch.chunk piece on dim 0
    (FSDPParam._init_sharded_param: `padded_sharded_param_size = chunks[0].size()`)."""
    oracle = torch.chunk(torch.empty(shape), world, dim=0)[0].numel()
    assert padded_elements([TensorSpec("w", shape)], world) == oracle


def test_padded_shard_of_a_scalar_is_the_scalar() -> None:
    assert padded_elements([TensorSpec("scale", ())], 4) == 1


SPECS: list[dict[str, Any]] = [
    {"parallelism": {"engine": "ddp", "data": 2}},
    {"parallelism": {"engine": "ddp", "data": 2, "gradient_as_bucket_view": True}},
    {"parallelism": {"engine": "ddp", "data": 2, "zero_stage": 1}},
    {"parallelism": {"engine": "ddp", "data": 2}, "optimizer": {"implementation": "for_loop"}},
    {"parallelism": {"engine": "ddp", "data": 2}, "optimizer": {"implementation": "fused"}},
    {"parallelism": {"engine": "ddp", "data": 2}, "precision": "fp32"},
    {"parallelism": {"engine": "ddp", "data": 2, "tensor": 2}},
    {"parallelism": {"engine": "fsdp2", "data": 2}},
    {"parallelism": {"engine": "fsdp2", "data": 2}, "hardware": {"device": "cpu"}},
    {"parallelism": {"engine": "fsdp2", "data": 4, "zero_stage": 2}},
    {"parallelism": {"engine": "fsdp2", "data": 2, "tensor": 2}},
    {"parallelism": {"engine": "fsdp2", "tensor": 2}},
    {"parallelism": {"engine": "deepspeed", "data": 2, "zero_stage": 1}},
    {"parallelism": {"engine": "deepspeed", "data": 2, "zero_stage": 3}},
    {"parallelism": {"engine": "deepspeed", "data": 2, "zero_stage": 3}, "precision": "bf16"},
    {"parallelism": {"engine": "megatron", "data": 2, "zero_stage": 1}},
    {"parallelism": {"engine": "megatron", "data": 2}, "precision": "fp16-mixed"},
    {"parallelism": {"engine": "ddp", "data": 2}, "training": {"gradient_accumulation_steps": 4}},
]


def test_a_shared_step_cache_gives_each_spec_its_own_estimate() -> None:
    """plan passes one StepCache to every layout it assembles: the same inventory object with
    engines, knobs, devices and recipes that differ one at a time, both ways round."""
    inventory = from_config(TINY_LLAMA)
    specs = [make_spec(**overrides) for overrides in SPECS]
    fresh = [to_json(estimate(spec, inventory)) for spec in specs]
    for order in (specs, specs[::-1]):
        cache = StepCache()
        shared = {
            id(spec): to_json(
                assemble(spec, inventory, inventory, model_states(spec, inventory), cache=cache)
            )
            for spec in order
        }
        assert [shared[id(spec)] for spec in specs] == fresh
