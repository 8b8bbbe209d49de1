"""Formulas against their sources (issue 15 item 4)."""

from __future__ import annotations

from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.plan.search import plan
from memplan.report import estimate
from memplan.report.json import estimate_json
from memplan.report.result import Report
from tests.conftest import TINY_LLAMA, make_spec

BERT_LARGE = {
    "model_type": "bert",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}


def report(**overrides: Any) -> Report:
    spec = make_spec(**overrides)
    arch = spec.model.architecture
    assert arch is not None
    return estimate.estimate(spec, from_config(arch))


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "paged_adamw", "adamw"])
def test_optimizer_state_breakdown_sums_to_optimizer_states(optimizer: str) -> None:
    # bitsandbytes keeps uint8 state1/state2 for tensors of >= min_8bit_size (4096) elements and
    # fp32 state1/state2 for smaller ones (bitsandbytes/optim/optimizer.py::
    # Optimizer2State.init_state): two rows share each name; the JSON key must still add up.
    r = report(model={"architecture": BERT_LARGE}, optimizer={"name": optimizer})
    doc = estimate_json(r)["per_gpu"]
    assert sum(doc["optimizer_state_breakdown"].values()) == doc["optimizer_states"]
    rows = [t for t in r.per_gpu.terms if t.category == "optimizer_states"]
    for name, value in doc["optimizer_state_breakdown"].items():
        assert value == sum(t.bytes for t in rows if t.name == name)


@pytest.mark.parametrize("where", ["optimizer", "parameters"])
def test_fsdp2_has_no_nvme_tier(where: str) -> None:
    # torch/distributed/fsdp/_fully_shard/_fsdp_api.py (2.13): OffloadPolicy and
    # CPUOffloadPolicy are FSDP2's only offload policies.
    with pytest.raises(MemplanError) as err:
        make_spec(parallelism={"engine": "fsdp2", "data": 2, "offload": {where: "nvme"}})
    assert "nvme" in str(err.value) and "offload" in str(err.value)


def test_fsdp2_optimizer_only_offload_says_it_moves_parameters_too() -> None:
    # CPUOffloadPolicy docstring: "offloads parameters, gradients, and optimizer states to CPU".
    r = report(
        model={"architecture": TINY_LLAMA},
        parallelism={"engine": "fsdp2", "data": 2, "offload": {"optimizer": "cpu"}},
    )
    assert any("CPUOffloadPolicy" in n for n in r.notes)
    both = report(
        model={"architecture": TINY_LLAMA},
        parallelism={
            "engine": "fsdp2",
            "data": 2,
            "offload": {"optimizer": "cpu", "parameters": "cpu"},
        },
    )
    assert not any("CPUOffloadPolicy" in n for n in both.notes)


def test_deepspeed_context_parallel_is_noted_and_not_planned() -> None:
    # deepspeed/sequence/layer.py::DistributedAttention (0.19.8): Ulysses all-to-all, no ring.
    r = report(
        model={"architecture": TINY_LLAMA},
        parallelism={"engine": "deepspeed", "data": 1, "context": 2},
    )
    assert any("Ulysses" in n for n in r.notes)
    spec = make_spec(
        model={"architecture": TINY_LLAMA},
        training={"sequence_length": 256},
        hardware={"gpu": "H100-80GB", "gpus_per_node": 4},
        plan={"gpus": 4, "global_batch_size": 8, "engines": ["deepspeed"]},
    )
    result = plan(spec, from_config(TINY_LLAMA))
    assert result.layouts
    assert all(c.context == 1 for c in result.layouts)
    assert result.pruned.get("DeepSpeed has no ring context parallelism", 0) > 0
    # a GPU is named: no note about which GPU's speed ranks
    assert not any("hardware.gpu" in n for n in result.notes)


def test_plan_without_a_gpu_names_the_gpu_it_ranks_by() -> None:
    spec = make_spec(
        model={"architecture": TINY_LLAMA},
        training={"sequence_length": 256},
        hardware={"memory": "80GB", "gpus_per_node": 4},
        plan={"gpus": 4, "global_batch_size": 8},
    )
    result = plan(spec, from_config(TINY_LLAMA))
    assert any("H100-80GB" in n for n in result.notes)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_deepspeed_zero0_steps_through_fp16_optimizer(precision: str) -> None:
    # deepspeed/runtime/engine.py::_do_optimizer_sanity_check (0.19.8): stage 0 with equal model
    # and accumulation dtypes -> FP16 / DDP_BFLOAT16 -> _configure_fp16_optimizer ->
    # FP16_Optimizer; its step (fp16/fused_optimizer.py) makes p.grad.to(fp32) for every
    # gradient and flattens them into one fp32 tensor: 4 + 4 B per trainable element.
    r = report(
        model={"architecture": TINY_LLAMA},
        precision=precision,
        parallelism={"engine": "deepspeed", "data": 2, "zero_stage": 0},
    )
    step = next(t for t in r.timeline.transients if t.name == "deepspeed_fp32_gradient_partition")
    n = from_config(TINY_LLAMA).num_parameters
    assert step.bytes == n * (4 + 4)
    assert "FP16_Optimizer.step" in step.source
    # stage 1-3 keep the ZeRO rule: a flattened 16-bit partition plus its fp32 cast.
    z1 = report(
        model={"architecture": TINY_LLAMA},
        precision=precision,
        parallelism={"engine": "deepspeed", "data": 2, "zero_stage": 1},
    )
    step1 = next(t for t in z1.timeline.transients if t.name == "deepspeed_fp32_gradient_partition")
    assert "stage_1_and_2" in step1.source


def test_megatron_main_grad_is_fp32_for_bf16_only() -> None:
    # megatron/training/arguments.py::validate_args: --bf16 sets
    # accumulate_allreduce_grads_in_fp32; --fp16 does not, so DDP's grad buffer is fp16
    # (distributed_data_parallel.py: grad_dtype = fp32 if grad_reduce_in_fp32 else param.dtype),
    # and Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads makes
    # main_grad.float() (4 B per main-parameter element) at the step.
    n = from_config(TINY_LLAMA).num_parameters
    par = {"engine": "megatron", "data": 2}
    bf16 = report(model={"architecture": TINY_LLAMA}, precision="bf16-mixed", parallelism=par)
    fp16 = report(model={"architecture": TINY_LLAMA}, precision="fp16-mixed", parallelism=par)
    grads_bf16 = [t for t in bf16.per_gpu.terms if t.category == "gradients"]
    grads_fp16 = [t for t in fp16.per_gpu.terms if t.category == "gradients"]
    assert {t.dtype for t in grads_bf16} == {"fp32"}
    assert {t.dtype for t in grads_fp16} == {"fp16"}
    assert bf16.per_gpu.bytes_of("gradients") == 2 * fp16.per_gpu.bytes_of("gradients")
    assert not [t for t in bf16.timeline.transients if t.name == "megatron_fp32_main_grads"]
    step = next(t for t in fp16.timeline.transients if t.name == "megatron_fp32_main_grads")
    assert step.bytes == n * 4
    # asking for fp32 accumulation keeps an fp32 main_grad with fp16 too
    fp16_acc = report(
        model={"architecture": TINY_LLAMA},
        precision={"preset": "fp16-mixed", "gradient_accumulation": "fp32"},
        parallelism=par,
    )
    assert {t.dtype for t in fp16_acc.per_gpu.terms if t.category == "gradients"} == {"fp32"}


def test_deepspeed_zero0_refuses_a_different_accumulation_dtype() -> None:
    # deepspeed/runtime/engine.py::_do_optimizer_sanity_check (0.19.8): zero disabled and
    # model_dtype != grad_accum_dtype -> NotImplementedError("unsupported mix ...").
    with pytest.raises(MemplanError) as err:
        report(
            model={"architecture": TINY_LLAMA},
            precision={"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
            parallelism={"engine": "deepspeed", "data": 2, "zero_stage": 0},
        )
    assert "gradient_accumulation" in str(err.value)


def test_plan_skips_deepspeed_zero0_with_a_different_accumulation_dtype() -> None:
    spec = make_spec(
        model={"architecture": TINY_LLAMA},
        precision={"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        training={"sequence_length": 256},
        hardware={"gpu": "H100-80GB", "gpus_per_node": 2},
        plan={"gpus": 2, "global_batch_size": 4, "engines": ["deepspeed"]},
    )
    result = plan(spec, from_config(TINY_LLAMA))
    assert result.layouts and all(c.zero_stage != 0 for c in result.layouts)
    assert result.pruned.get("DeepSpeed ZeRO-0 cannot accumulate in another dtype", 0) > 0
