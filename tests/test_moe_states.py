"""Mixture-of-experts model states without expert parallelism, against torch's own code.

Oracles: transformers builds the MoE model (its `named_parameters()` in model order),
torch's ZeroRedundancyOptimizer._partition_parameters partitions it, and a real foreach
AdamW step measured by torch's MemTracker gives the step temporaries.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memplan.model.sources import from_config
from memplan.report import estimate
from memplan.report.result import Report
from tests.conftest import TINY_LLAMA, make_spec
from tests.test_sharding import _torch_zero_partition

MIXTRAL = {**TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN3_MOE = {
    **TINY_LLAMA,
    "model_type": "qwen3_moe",
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 48,
    "head_dim": 16,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def _torch_numels(arch: dict[str, Any]) -> list[int]:
    config = AutoConfig.for_model(**arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [p.numel() for p in model.parameters()]


def _report(arch: dict[str, Any], **parallelism: Any) -> Report:
    spec = make_spec(model={"architecture": arch}, precision="fp32", parallelism=parallelism)
    return estimate.estimate(spec, from_config(arch))


def _exp_avg_by_rank(report: Report) -> dict[int, int]:
    return {
        rank: sum(t.elements for t in r.terms if t.name == "exp_avg")
        for r in report.ranks
        for rank in r.ranks
    }


@pytest.mark.parametrize("arch", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_zero_redundancy_partitions_experts_with_the_dense_tensors(
    arch: dict[str, Any], world: int
) -> None:
    numels = _torch_numels(arch)
    owned = _torch_zero_partition(numels, world)
    expected = {rank: sum(numels[i] for i in idx) for rank, idx in enumerate(owned)}
    report = _report(arch, engine="ddp", zero_stage=1, data=world)
    assert _exp_avg_by_rank(report) == expected


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_no_expert_rows_without_expert_parallelism(engine: str) -> None:
    report = _report(MIXTRAL, engine=engine, data=2)
    names = {t.name for r in report.ranks for t in r.terms}
    assert "exp_avg" in names
    assert not [n for n in names if n.endswith("(experts)")]


def test_expert_rows_stay_apart_under_expert_parallelism() -> None:
    report = _report(MIXTRAL, engine="megatron", data=4, expert=2, zero_stage=1)
    assert any(t.name.endswith("(experts)") for t in report.per_gpu.terms)


@pytest.mark.parametrize("arch", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_foreach_step_temporaries_of_a_moe_model_match_torch(arch: dict[str, Any]) -> None:
    """One foreach list spans the dense and the expert tensors (torch/optim/adam.py::
    _multi_tensor_adam): a real step of the transformers model, measured by MemTracker."""
    from tests.test_optimizers import second_step_temporaries

    report = _report(arch, engine="ddp", data=1)
    temp = [t for t in report.timeline.transients if t.name == "optimizer_step_temporaries"]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch)).float()
    measured = second_step_temporaries(list(model.parameters()), "adamw", "foreach")
    assert temp and temp[0].bytes == measured
