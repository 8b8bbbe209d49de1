"""The step timeline, transient terms and the activation report.

Most of these run without torch. Tests named `test_pin_*` pin memplan's own arithmetic (their
expected values come from memplan's inventory or constants, not an oracle); each names the
test that checks the same ground against a real run or the library's code, or says that none
does yet. The FSDP2 buffer
sizes are checked against the real model and torch's padding rule (tests/fsdp2_oracle.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan import memory
from memplan.activations import Setting, predict
from memplan.config.parallelism import DeepSpeedSpec
from memplan.errors import MemplanError
from memplan.model.sources import from_config, from_parameter_count
from memplan.precision import dtype_bytes
from memplan.report import estimate
from memplan.report.json import estimate_json
from memplan.report.result import Report
from memplan.states.engines.deepspeed import step as ds_step
from memplan.step.timeline import CATEGORIES
from tests.conftest import TINY_LLAMA, make_spec
from tests.fsdp2_oracle import padded_groups

GPT2 = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 1041,
    "n_positions": 128,
}


def report(**overrides: Any) -> Report:
    spec = make_spec(**overrides)
    arch = spec.model.architecture
    inv = from_config(arch) if arch else from_parameter_count(spec.model.num_parameters or 1)
    return estimate.estimate(spec, inv)


def test_pin_timeline_points_sum_and_peak_is_their_max() -> None:
    """Pins the report's bookkeeping: each point is the sum of its categories, the peak their
    max, and the JSON mirrors them. The bytes themselves: tests/test_timeline_measured.py."""
    r = report(parallelism={"engine": "ddp", "data": 4}, hardware={"gpu": "H100-80GB"})
    tl = r.timeline
    for p in tl.points:
        assert p.total_bytes == sum(p.of(c) for c in CATEGORIES)
    assert tl.peak_bytes == max(p.total_bytes for p in tl.points) == r.peak_bytes
    assert r.transient_bytes == tl.peak.of("transient")
    doc = estimate_json(r)
    assert doc["per_gpu"]["peak"] == r.peak_bytes
    assert doc["per_gpu"]["activations"] == r.activations_bytes > 0
    assert doc["per_gpu"]["activations_modelled"] is True
    assert [p["phase"] for p in doc["timeline"]["phases"]] == list(memory.PHASES)
    assert doc["timeline"]["peak"]["bytes"] == r.peak_bytes
    assert sum(b["bytes"] for b in doc["activations"]["blocks"]) == r.activations_bytes


def test_unmodelled_families_say_so() -> None:
    r = report(model={"num_parameters": 10**9})
    doc = estimate_json(r)
    assert doc["per_gpu"]["activations_modelled"] is False
    assert doc["per_gpu"]["activations"] == 0
    assert any("activations not modelled" in n for n in doc["notes"])
    t5 = {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 100}
    r = report(model={"architecture": t5})
    assert not r.activations.modelled
    assert any("'t5' are not modelled" in n for n in r.notes)
    tp = report(parallelism={"engine": "megatron", "tensor": 2})
    assert tp.activations.modelled
    cp_eager = report(parallelism={"context": 2}, training={"attention": "eager"})
    assert not cp_eager.activations.modelled
    assert any("context parallelism with eager attention" in n for n in cp_eager.notes)


def test_pin_ddp_buckets_are_a_second_copy_of_the_gradients() -> None:
    """Pins the DDP bucket term to memplan's own gradient bytes. Measured on gloo ranks:
    tests/test_timeline_measured.py::test_ddp_buckets_measured_on_gloo_ranks."""
    r = report(parallelism={"engine": "ddp", "data": 2})
    buckets = [t for t in r.timeline.transients if t.name == "ddp_gradient_buckets"]
    assert buckets and buckets[0].bytes == r.per_gpu.bytes_of("gradients")
    single = report(parallelism={"engine": "ddp", "data": 1})
    assert not [t for t in single.timeline.transients if t.name == "ddp_gradient_buckets"]


def test_pin_deepspeed_buckets_and_zero3_gathers_use_deepspeed_defaults() -> None:
    """Pins the DeepSpeed terms to memplan's copies of the DeepSpeed defaults and its module
    sizes (DeepSpeed is not installed here: no oracle run)."""
    r = report(parallelism={"engine": "deepspeed", "data": 8, "zero_stage": 3})
    terms = {t.name: t for t in r.timeline.transients}
    width = dtype_bytes("bf16")  # bf16-mixed: 16-bit gradients and parameters
    assert terms["deepspeed_reduce_bucket"].bytes == DeepSpeedSpec().reduce_bucket_size * width
    assert terms["deepspeed_reduce_bucket"].phases == memory.PHASES  # allocated at init
    inv = from_config(TINY_LLAMA)
    biggest = max(ds_step.module_sizes(inv))
    assert terms["zero3_gathered_parameters"].bytes == (
        (biggest + DeepSpeedSpec().stage3_prefetch_bucket_size) * width
    )
    stage2 = report(parallelism={"engine": "deepspeed", "data": 8, "zero_stage": 2})
    bucket = next(t for t in stage2.timeline.transients if t.name == "deepspeed_reduce_bucket")
    assert bucket.phases == memory.BACKWARD


@pytest.mark.parametrize("stage", [3, 2])
def test_fsdp2_unsharded_buffers_are_world_padded_shards(stage: int) -> None:
    """An all-gathered group is world x its padded shard (ceil(dim0 / world) rows per rank)
    in MixedPrecisionPolicy.param_dtype: bf16 under bf16-mixed, over fp32 shards. Oracle:
    the real model's groups padded by torch's own rule (tests/fsdp2_oracle.py)."""
    torch = pytest.importorskip("torch")
    world = 4
    r = report(parallelism={"engine": "fsdp2", "data": world, "zero_stage": stage})
    terms = {t.name: t for t in r.timeline.transients}
    groups = padded_groups(TINY_LLAMA, world)
    width = torch.bfloat16.itemsize
    assert terms["fsdp2_unsharded_root"].bytes == groups.root * width
    assert terms["fsdp2_all_gather_output"].bytes == groups.block * width
    if stage == 3:  # one layer at a time, the next one's all-gather prefetched in backward
        assert terms["fsdp2_unsharded_block"].bytes == groups.block * width
        assert "backward" in terms["fsdp2_all_gather_output"].phases
    else:  # reshard_after_forward=False: every layer stays unsharded until its backward
        layers = TINY_LLAMA["num_hidden_layers"]
        assert terms["fsdp2_unsharded_blocks"].bytes == layers * groups.block * width
        assert terms["fsdp2_all_gather_output"].phases == ("forward", "loss")


def test_fsdp2_sharded_gradients_appear_in_post_backward() -> None:
    """No sharded gradient while the last layer runs backward (the head's are unsharded); the
    root's only after the whole backward (its reduce-scatter). The root's sharded gradients:
    its padded shard on the real model (tests/fsdp2_oracle.py), fp32 (bf16-mixed keeps fp32
    shards)."""
    pytest.importorskip("torch")
    world = 4
    r = report(parallelism={"engine": "fsdp2", "data": world})
    points = {p.phase: p for p in r.timeline.points}
    grads = r.per_gpu.bytes_of("gradients")
    root_shard = padded_groups(TINY_LLAMA, world).root // world
    assert points["backward"].of("gradients") == 0
    assert points["backward_end"].of("gradients") == grads - root_shard * 4
    assert points["optimizer_step"].of("gradients") == grads
    head = {t.name for t in r.timeline.transient_at("backward")}
    assert {"fsdp2_unsharded_head_grads", "fsdp2_unsharded_root"} <= head


@pytest.mark.parametrize(
    ("model", "device", "moment"),
    [
        (TINY_LLAMA, "cpu", "fsdp2_reduce_scatter_input_root"),  # untied head: the root's RS
        (GPT2, "cpu", "fsdp2_unsharded_root_grads"),  # tied: the embedding's backward
    ],
)
def test_fsdp2_end_of_backward_is_the_larger_moment(
    model: dict[str, Any], device: str, moment: str
) -> None:
    """backward_end holds either the embedding's backward (the root unsharded with all its
    gradients; the tied head's accumulation) or the root's reduce-scatter (input, output,
    gloo's copy of the input, the last parameter's gradient), never both. Which moment wins
    is memplan's own choice; the bytes at it are checked against gloo ranks in
    tests/test_fsdp2_peak.py (llama fp32 and gpt2 bf16 peak at backward_end)."""
    r = report(
        model={"architecture": model},
        precision="fp32",
        parallelism={"engine": "fsdp2", "data": 4},
        hardware={"device": device},
    )
    at_end = {t.name: t for t in r.timeline.transient_at("backward_end")}
    assert moment in at_end
    reduce = "fsdp2_reduce_scatter_input_root" in at_end
    assert reduce != ("embedding_backward" in at_end)
    assert reduce == ("gloo_reduce_scatter_copy" in at_end)
    if reduce:
        assert at_end["gloo_reduce_scatter_copy"].bytes == at_end[moment].bytes
        pytest.importorskip("torch")
        last = padded_groups(model, 4).root_last  # lm_head.weight on the real model
        assert at_end["fsdp2_last_unsharded_grad"].bytes == last * 4


def test_fsdp2_no_gloo_copy_on_cuda() -> None:
    r = report(precision="fp32", parallelism={"engine": "fsdp2", "data": 4})
    names = {t.name for t in r.timeline.transients}
    assert "gloo_reduce_scatter_copy" not in names
    for t in r.timeline.transients:
        if t.name.startswith(("fsdp2_", "gloo_")):
            assert t.source and t.formula


@pytest.mark.parametrize(
    ("name", "implementation"),
    [
        ("adamw", "foreach"),
        ("adamw", "for_loop"),
        ("adamw", "fused"),
        ("adagrad", "foreach"),
        ("adagrad", "for_loop"),
        ("rmsprop", "for_loop"),
        ("adamax", "foreach"),
        ("adafactor", "foreach"),
    ],
)
def test_optimizer_step_temporaries(name: str, implementation: str) -> None:
    """Oracle: a real step of the tiny Llama built by transformers, measured by MemTracker."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.test_optimizers import second_step_temporaries

    r = report(
        precision="fp32",
        optimizer={"name": name, "implementation": implementation},
        parallelism={"engine": "ddp", "data": 1},
    )
    temp = [t for t in r.timeline.transients if t.name == "optimizer_step_temporaries"]
    predicted = temp[0].bytes if temp else 0

    config = AutoConfig.for_model(**TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(config).float()
    measured = second_step_temporaries(list(model.parameters()), name, implementation)
    assert measured == predicted


def test_checkpointing_and_offload_order_the_activations() -> None:
    none = report(training={"sequence_length": 64})
    selective = report(training={"sequence_length": 64, "activation_checkpointing": "selective"})
    full = report(training={"sequence_length": 64, "activation_checkpointing": "full"})
    offload = report(
        training={
            "sequence_length": 64,
            "activation_checkpointing": "full",
            "activation_offload": True,
        }
    )
    sizes = [x.activations_bytes for x in (none, selective, full, offload)]
    assert sizes == sorted(sizes, reverse=True)
    assert offload.activations.host_bytes == full.activations.block("layers").bytes  # type: ignore[union-attr]
    recomputed = full.activations.block("layers")
    assert recomputed is not None and recomputed.recompute_bytes > 0
    with pytest.raises(MemplanError, match="activation_checkpointing: full"):
        make_spec(training={"activation_offload": True})


def setting(**over: Any) -> Setting:
    base: dict[str, Any] = {
        "batch": 2,
        "sequence": 32,
        "stream": "fp32",
        "matmul": "fp32",
        "autocast": False,
        "device": "cuda",
        "attention": "eager",
        "dropout": True,
        "checkpointing": "none",
    }
    return Setting(**{**base, **over})


def test_cuda_and_cpu_profiles_differ_where_the_kernels_do() -> None:
    """CUDA dropout keeps a bool mask (CPU: the input dtype); CUDA LayerNorm statistics are
    fp32 (CPU: the input dtype); CPU SDPA with dropout falls back to math in fp32."""
    inv = from_config(GPT2)

    def dtypes(st: Setting, name: str) -> set[str]:
        return {t.dtype for b in predict(inv, st).blocks for t in b.tensors if name in t.name}

    assert dtypes(setting(), "dropout") == {"bool"}
    assert dtypes(setting(device="cpu"), "dropout") == {"fp32"}
    bf16 = {"stream": "bf16", "matmul": "bf16"}
    assert dtypes(setting(**bf16), "ln_1.mean") == {"fp32"}
    assert dtypes(setting(device="cpu", **bf16), "ln_1.mean") == {"bf16"}
    cuda = predict(inv, setting(attention="sdpa", **bf16))
    cpu = predict(inv, setting(attention="sdpa", device="cpu", **bf16))
    assert any(t.name == "attn.logsumexp" for t in cuda.block("layers").tensors)  # type: ignore[union-attr]
    assert any(t.name == "attn.softmax" and t.dtype == "fp32" for t in cpu.block("layers").tensors)  # type: ignore[union-attr]


def test_pin_reserved_and_usable_memory_on_cuda_only() -> None:
    """Pins the reserved/usable arithmetic (capacity - context - reserved); the allocator
    figures themselves are checked on a GPU by tests/test_verify_gpu.py."""
    cuda = report(hardware={"gpu": "H100-80GB"})
    tl = cuda.timeline
    assert tl.reserved_bytes is not None and tl.reserved_bytes >= tl.peak_bytes
    assert tl.cuda_context_bytes == memory.CUDA_CONTEXT_BYTES
    assert tl.usable_bytes == (cuda.capacity_bytes or 0) - tl.cuda_context_bytes - tl.reserved_bytes
    assert any(t.name.startswith("allocator_rounding") for t in tl.transients)
    cpu = report(hardware={"device": "cpu"})
    assert cpu.timeline.reserved_bytes is None and cpu.timeline.cuda_context_bytes == 0
    assert not any(t.name.startswith("allocator_rounding") for t in cpu.timeline.transients)


def test_allocator_rounding_and_segments() -> None:
    assert memory.round_block(1) == 512
    assert memory.round_block(512) == 512
    assert memory.rounding([1, 512, 513]) == 511 + 0 + 511
    # one small block -> a 2 MiB segment; a 30 MiB block -> its own, rounded to 2 MiB.
    assert memory.segment_bytes([100]) == 2 << 20
    assert memory.segment_bytes([(30 << 20) + 1]) == 32 << 20


def test_pin_gradient_accumulation_keeps_gradients_through_the_forward() -> None:
    """Pins when gradients are alive under accumulation (no measured accumulation run yet:
    tests/test_timeline_measured.py measures single-micro-batch steps)."""
    one = report(parallelism={"engine": "ddp", "data": 1})
    many = report(
        parallelism={"engine": "ddp", "data": 1},
        training={"gradient_accumulation_steps": 4},
    )
    forward = next(p for p in one.timeline.points if p.phase == "forward")
    forward_many = next(p for p in many.timeline.points if p.phase == "forward")
    assert forward.of("gradients") == 0
    assert forward_many.of("gradients") == many.per_gpu.bytes_of("gradients")
