"""Fine-tuning (issue 10): the spec, the inventory transform, every engine's rule for frozen
parameters, QLoRA's 4-bit layout, paged optimizer state. Pure: no torch here (the peft
comparisons are in tests/test_finetune_peft.py, the CUDA ones in tests/test_finetune_gpu.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.config.finetune import FinetuneSpec
from memplan.config.load import load_spec
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.finetune import qlora
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.load import load_inventory
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.json import estimate_json
from tests.conftest import ROOT, TINY_LLAMA, make_spec

QV = {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": 1041,
}


def spec(**overrides: Any) -> Spec:
    """The conftest spec on torch DDP and the CPU (torch's `step` scalars then count on the
    device), sections overridden."""
    base: dict[str, Any] = {"parallelism": {"engine": "ddp"}, "hardware": {"device": "cpu"}}
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if key in base and isinstance(value, dict) else value
    return make_spec(**base)


def transformed(s: Spec, config: dict[str, Any] | None = None) -> Inventory:
    return finetune.apply(s, from_config(config or TINY_LLAMA))


def by_name(inv: Inventory) -> dict[str, TensorSpec]:
    return {t.name: t for t in inv.parameters}


# --- the spec --------------------------------------------------------------------------------


def test_the_issue_spec_form_parses() -> None:
    ft = spec(finetune=QV).finetune
    assert (ft.method, ft.rank, ft.alpha, ft.target_modules) == (
        "lora",
        8,
        16,
        ("q_proj", "v_proj"),
    )
    assert FinetuneSpec().method == "full"


def test_adapter_keys_need_an_adapter_method() -> None:
    with pytest.raises(MemplanError, match="rank set but method is full"):
        spec(finetune={"rank": 8})
    with pytest.raises(MemplanError, match="double_quant apply to method: qlora only"):
        spec(finetune={"method": "lora", "double_quant": False})
    with pytest.raises(MemplanError, match="less than 1"):
        spec(finetune={"method": "lora", "dropout": 1.0})


# --- LoRA on the inventory -------------------------------------------------------------------


def test_lora_names_shapes_and_trainability_follow_peft() -> None:
    inv = by_name(transformed(spec(finetune=QV)))
    p = "base_model.model.model.layers.0.self_attn."
    assert inv[p + "q_proj.base_layer.weight"].trainable is False
    assert inv[p + "q_proj.lora_A.default.weight"].shape == (8, 64)  # [r, in]
    assert inv[p + "q_proj.lora_B.default.weight"].shape == (64, 8)  # [out, r]
    assert inv[p + "v_proj.lora_B.default.weight"].shape == (32, 8)  # 2 kv heads x 16
    assert inv[p + "k_proj.weight"].trainable is False
    trainable = [n for n, t in inv.items() if t.trainable]
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_gpt2_conv1d_takes_in_features_from_dim_0() -> None:
    s = spec(model={"architecture": TINY_GPT2}, finetune={"method": "lora"})
    inv = by_name(transformed(s, TINY_GPT2))
    p = "base_model.model.transformer.h.0.attn.c_attn."
    # Conv1D weight is [in, out] = [64, 192]; peft's default target for gpt2 is c_attn.
    assert inv[p + "base_layer.weight"].shape == (64, 192)
    assert inv[p + "lora_A.default.weight"].shape == (8, 64)
    assert inv[p + "lora_B.default.weight"].shape == (192, 8)


def test_modules_to_save_keeps_the_original_frozen_beside_a_trainable_copy() -> None:
    s = spec(
        model={"architecture": TINY_GPT2},
        finetune={"method": "lora", "modules_to_save": ["lm_head"]},
    )
    inv = transformed(s, TINY_GPT2)
    names = by_name(inv)
    copy = names["base_model.model.lm_head.modules_to_save.default.weight"]
    assert copy.trainable and copy.shape == (1041, 64)
    # the tied original keeps pointing at the (frozen) embedding
    assert (
        "base_model.model.lm_head.original_module.weight",
        "base_model.model.transformer.wte.weight",
    ) in inv.tied


def test_all_linear_skips_the_output_layer_and_exclude_modules_works() -> None:
    s = spec(
        finetune={"method": "lora", "target_modules": "all-linear", "exclude_modules": ["o_proj"]}
    )
    names = [n for n, t in by_name(transformed(s)).items() if ".lora_A." in n]
    leaves = {n.split(".")[-4] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}


def test_target_regex_matches_the_whole_name() -> None:
    s = spec(finetune={"method": "lora", "target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"})
    names = [n for n in by_name(transformed(s)) if ".lora_A." in n]
    assert len(names) == 2 and all(".layers.1." in n for n in names)


def test_bad_targets_are_refused_like_peft_does() -> None:
    with pytest.raises(MemplanError, match="matches no module of the model.*q_proj"):
        transformed(spec(finetune={"method": "lora", "target_modules": ["qproj"]}))
    with pytest.raises(MemplanError, match="LoRA cannot adapt"):
        transformed(spec(finetune={"method": "lora", "target_modules": ["mlp"]}))


def test_num_trainable_parameters_of_llama_3_8b_qv_r8() -> None:
    # peft's print_trainable_parameters for Llama-3-8B, q_proj/v_proj, r=8: 3,407,872 =
    # 32 layers x 8 x ((4096 + 4096) + (4096 + 1024)).
    s = make_spec(model={"preset": "llama-3-8b"}, finetune=QV)
    report = estimate(s, load_inventory(load_spec_from(s)))
    assert report.model.num_trainable_parameters == 3_407_872
    assert estimate_json(report)["model"]["num_trainable_parameters"] == 3_407_872


def load_spec_from(s: Spec) -> Any:
    from memplan.config.load import LoadedSpec

    return LoadedSpec(s, None, {})


def test_apply_is_cached() -> None:
    s = spec(finetune=QV)
    base = from_config(TINY_LLAMA)
    once = finetune.apply(s, base)
    assert finetune.apply(s, base) is once


# --- freeze patterns -------------------------------------------------------------------------


def test_freeze_is_fnmatch_over_names() -> None:
    s = spec(finetune={"freeze": ["model.embed_tokens.*", "model.layers.[0].*"]})
    inv = by_name(transformed(s))
    assert not inv["model.embed_tokens.weight"].trainable
    assert not inv["model.layers.0.mlp.up_proj.weight"].trainable
    assert inv["model.layers.1.mlp.up_proj.weight"].trainable
    assert inv["lm_head.weight"].trainable


def test_freeze_patterns_also_match_without_peft_prefix() -> None:
    s = spec(finetune={**QV, "freeze": ["model.layers.0.*"]})
    inv = by_name(transformed(s))
    assert not inv[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    ].trainable
    assert inv["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"].trainable


def test_freeze_errors_name_the_field() -> None:
    with pytest.raises(MemplanError, match="freeze pattern 'model.layer.*' matches no parameter"):
        transformed(spec(finetune={"freeze": ["model.layer.*"]}))
    with pytest.raises(MemplanError, match="every parameter is frozen"):
        transformed(spec(finetune={"freeze": ["*"]}))
    with pytest.raises(MemplanError, match="needs the model's tensors"):
        finetune.apply(spec(finetune=QV), from_parameter_count())
    with pytest.raises(MemplanError, match="tensor=2 is not modelled"):
        transformed(spec(finetune=QV, parallelism={"tensor": 2}))


def from_parameter_count() -> Inventory:
    from memplan.model.sources import from_parameter_count as count

    return count(10**6)


# --- frozen parameters in every engine ---------------------------------------------------------


FROZEN = {"freeze": ["model.embed_tokens.*", "model.layers.0.*"]}


def numbers(s: Spec) -> tuple[Inventory, int, int, int]:
    """(transformed inventory, all elements, trainable elements, trainable tensors)."""
    inv = transformed(s)
    train = [t for t in inv.parameters if t.trainable]
    return inv, inv.num_parameters, sum(t.numel for t in train), len(train)


def states(s: Spec) -> dict[str, int]:
    gpu = estimate(s, from_config(TINY_LLAMA)).per_gpu
    out = {c: gpu.bytes_of(c) for c in ("parameters", "gradients", "optimizer_states")}  # type: ignore[arg-type]
    return out


def test_ddp_frozen_have_no_gradients_or_optimizer_state() -> None:
    s = spec(precision="fp32", finetune=FROZEN)
    _, total, train, tensors = numbers(s)
    assert states(s) == {
        "parameters": 4 * total,
        "gradients": 4 * train,
        # AdamW: exp_avg + exp_avg_sq in fp32, one 4-byte step per trainable tensor
        "optimizer_states": 8 * train + 4 * tensors,
    }


def test_ddp_lora_bf16_adapters_are_fp32_without_masters() -> None:
    s = spec(precision="bf16-mixed", finetune=QV)
    inv, total, train, tensors = numbers(s)
    frozen = total - train
    # the bf16 base, fp32 adapters (peft autocast_adapter_dtype), their fp32 grads and states,
    # and no master copy: the adapters are their own masters.
    assert states(s) == {
        "parameters": 2 * frozen + 4 * train,
        "gradients": 4 * train,
        "optimizer_states": 8 * train + 4 * tensors,
    }
    off = spec(precision="bf16-mixed", finetune={**QV, "autocast_adapter_dtype": False})
    assert states(off)["optimizer_states"] == (4 + 8) * train + 4 * tensors


def test_zero_redundancy_partitions_the_trainable_tensors_only() -> None:
    s = spec(
        precision="fp32", finetune=QV, parallelism={"engine": "ddp", "data": 2, "zero_stage": 1}
    )
    report = estimate(s, from_config(TINY_LLAMA))
    per_rank = [r.bytes_of("optimizer_states") for r in report.ranks]
    _, _, train, tensors = numbers(s)
    assert sum(per_rank) == 8 * train + 4 * tensors


def test_zero_redundancy_refuses_mixed_trainable_dtypes() -> None:
    s = spec(
        precision="bf16",
        finetune={**QV, "modules_to_save": ["lm_head"]},
        parallelism={"engine": "ddp", "data": 2, "zero_stage": 1},
    )
    with pytest.raises(MemplanError, match="ZeroRedundancyOptimizer .* needs one dtype"):
        estimate(s, from_config(TINY_LLAMA))


def test_fsdp2_shards_frozen_parameters_but_reduces_trainable_gradients_only() -> None:
    world = 2
    s = spec(precision="fp32", finetune=FROZEN, parallelism={"engine": "fsdp2", "data": world})
    inv, _, _, _ = numbers(s)

    def padded(ts: list[TensorSpec]) -> int:
        return sum(-(-t.shape[0] // world) * (t.numel // t.shape[0]) for t in ts)

    train = [t for t in inv.parameters if t.trainable]
    got = states(s)
    assert got["parameters"] == 4 * padded(list(inv.parameters))
    assert got["gradients"] == 4 * padded(train)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_stage_1_2_flat_groups_hold_trainable_parameters_only(stage: int) -> None:
    world = 4
    s = spec(
        finetune=FROZEN, parallelism={"engine": "deepspeed", "data": world, "zero_stage": stage}
    )
    _, total, train, _ = numbers(s)
    padded = -(-train // (2 * world)) * 2 * world  # S12: multiple of 2 x world
    gpu = estimate(s, from_config(TINY_LLAMA)).per_gpu
    rows = {(t.name, t.dtype): t.bytes for t in gpu.terms}
    assert rows[("parameters", "bf16")] == 2 * padded  # the flat bit16 buffer
    assert rows[("frozen parameters", "bf16")] == 2 * (total - train)  # whole on every rank
    assert rows[("master_weights", "fp32")] == 4 * (padded // world)


def test_deepspeed_stage_3_partitions_frozen_parameters_too() -> None:
    world = 4
    s = spec(finetune=FROZEN, parallelism={"engine": "deepspeed", "data": world, "zero_stage": 3})
    inv, _, _, _ = numbers(s)
    shards = sum(-(-t.numel // world) for t in inv.parameters)
    persistent = sum(t.numel for t in inv.parameters if t.numel <= 10**5)
    grads = sum(-(-t.numel // world) for t in inv.parameters if t.trainable)
    got = states(s)
    assert got["parameters"] == 2 * (shards + persistent)
    assert got["gradients"] == 2 * grads


def test_megatron_buffers_skip_frozen_parameters() -> None:
    s = spec(finetune=FROZEN, parallelism={"engine": "megatron", "data": 1})
    _, total, train, _ = numbers(s)
    gpu = estimate(s, from_config(TINY_LLAMA)).per_gpu
    rows = {(t.name, t.category): t.bytes for t in gpu.terms}
    assert rows[("frozen parameters", "parameters")] == 2 * (total - train)
    assert rows[("parameters", "parameters")] == 2 * train
    assert rows[("main_grad", "gradients")] == 4 * train


def test_full_fine_tuning_is_unchanged() -> None:
    s = spec()
    assert finetune.apply(s, base := from_config(TINY_LLAMA)) is base
    report = estimate(s, base)
    assert report.model.num_trainable_parameters == base.num_parameters


# --- QLoRA -----------------------------------------------------------------------------------


def test_nf4_layout_of_one_llama_3_8b_projection() -> None:
    """A 4096 x 4096 q_proj: bitsandbytes _ops.py quantize_4bit packs two codes per byte,
    one absmax per 64 values; double quantization stores the absmax in uint8 with one fp32
    absmax per 256 blocks, a 256-entry map copy, an offset; plus the 16-entry nf4 code."""
    n = 4096 * 4096
    w = TensorSpec("q.weight", (4096, 4096))
    assert qlora.packed_weight(w).shape == (n // 2, 1)
    assert qlora.packed_weight(w).dtype == "uint8"
    states = {t.name.split(".")[-1]: (t.shape, t.dtype) for t in qlora.quant_state(w, double=True)}
    assert states == {
        "absmax": ((n // 64,), "uint8"),
        "quant_map": ((16,), "fp32"),
        "nested_absmax": ((n // 64 // 256,), "fp32"),
        "nested_quant_map": ((256,), "fp32"),
        "nested_offset": ((), "fp32"),
    }
    single = {t.name.split(".")[-1]: t.dtype for t in qlora.quant_state(w, double=False)}
    assert single == {"absmax": "fp32", "quant_map": "fp32"}


def test_qlora_quantizes_every_linear_but_the_head() -> None:
    s = make_spec(model={"preset": "llama-3-8b"}, precision="bf16", finetune={"method": "qlora"})
    inv = finetune.apply(s, load_inventory(load_spec_from(s)))
    packed = [t for t in inv.parameters if t.dtype == "uint8"]
    assert len(packed) == 32 * 7
    names = by_name(inv)
    assert names["base_model.model.lm_head.weight"].dtype == "fp32"  # prepare_kbit upcast
    assert not names["base_model.model.lm_head.weight"].trainable
    # 6.98 B quantized weights in 3.49 GB, 16-bit embed/lm_head upcast to fp32 by prepare_kbit
    assert sum(t.numel for t in packed) == (8_030_261_248 - 2 * 128_256 * 4096 - 65 * 4096) // 2
    qmaps = [b for b in inv.buffers if b.name.endswith("nested_quant_map")]
    assert len(qmaps) == 224


def test_qlora_skip_modules_follow_transformers_matching() -> None:
    # should_convert_module: a pattern matches from the start of the name up to a module
    # boundary (as a regex), or is a suffix: "mlp" alone would skip nothing here.
    skip = [r"model\.layers\.\d+\.mlp", "lm_head"]
    s = spec(precision="bf16", finetune={"method": "qlora", "skip_modules": skip})
    inv = transformed(s)
    leaf = {
        t.name.removesuffix(".weight").removesuffix(".base_layer").rsplit(".", 1)[-1]
        for t in inv.parameters
        if t.dtype == "uint8"
    }
    assert leaf == {"q_proj", "k_proj", "v_proj", "o_proj"}
    none = spec(precision="bf16", finetune={"method": "qlora", "skip_modules": ["mlp"]})
    assert sum(t.dtype == "uint8" for t in transformed(none).parameters) == 2 * 7 + 1


def test_qlora_is_refused_where_not_modelled() -> None:
    # FSDP2 is modelled with and without prepare_model_for_kbit_training, FSDP1 refused
    # (tests/test_qlora_fsdp.py)
    with pytest.raises(MemplanError, match="qlora under engine fsdp1 is not modelled"):
        transformed(spec(finetune={"method": "qlora"}, parallelism={"engine": "fsdp1", "data": 2}))
    with pytest.raises(MemplanError, match="qlora with engine deepspeed .ZeRO stage 3"):
        transformed(
            spec(
                finetune={"method": "qlora"},
                parallelism={"engine": "deepspeed", "zero_stage": 3, "data": 2},
            )
        )


# --- paged optimizer state ---------------------------------------------------------------------


def test_paged_states_of_large_tensors_leave_the_gpu() -> None:
    s = make_spec(
        model={"preset": "llama-3-8b"},
        precision="bf16",
        optimizer={"name": "paged_adamw8bit"},
        finetune={"method": "lora", "rank": 64, "target_modules": "all-linear"},
        parallelism={"engine": "ddp"},
    )
    base = load_inventory(load_spec_from(s))
    inv = finetune.apply(s, base)
    gpu = estimate(s, base).per_gpu
    host = {t.name: t for t in gpu.host_terms}
    device = {t.name: t for t in gpu.terms}
    adapters = [t.numel for t in inv.parameters if t.trainable]
    # optimizers.is_paged_state: state1/state2 of tensors with >= 1e5 elements (lora_A
    # [64, 4096] and most lora_B) in unified memory, the k/v lora_B [1024, 64] on the GPU.
    assert host["state1 (paged)"].elements == sum(n for n in adapters if n >= 100_000)
    assert device["state1"].elements == sum(n for n in adapters if n < 100_000)
    assert device["absmax1"].tensors == len(adapters)
    on_cpu = make_spec(
        model={"preset": "llama-3-8b"},
        optimizer={"name": "paged_adamw8bit"},
        finetune={"method": "lora"},
        parallelism={"engine": "ddp"},
        hardware={"device": "cpu"},
    )
    # bitsandbytes pages CUDA tensors only (get_state_buffer: on CPU, zeros_like)
    cpu_gpu = estimate(on_cpu, load_inventory(load_spec_from(on_cpu))).per_gpu
    assert not any("paged" in t.name for t in (*cpu_gpu.terms, *cpu_gpu.host_terms))


# --- configs and the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-3-8b-lora", "llama-3-8b-qlora"])
def test_shipped_configs_estimate(name: str) -> None:
    path = ROOT / "configs" / f"{name}.yaml"
    result = CliRunner().invoke(app, ["estimate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    model = doc["model"]
    assert 0 < model["num_trainable_parameters"] < model["num_parameters"]
    assert doc["hardware"]["fits"] is True


def test_lora_config_numbers() -> None:
    loaded = load_spec(Path(ROOT / "configs" / "llama-3-8b-lora.yaml"))
    report = estimate(loaded.spec, load_inventory(loaded))
    # r=16 on q,k,v,o,gate,up,down of 32 layers: 16 x 32 x (8192 + 5120 + 5120 + 8192 +
    # 3 x (4096 + 14336)) = 41,943,040 trainable elements, fp32 (4 B), AdamW (8 B + step).
    assert report.model.num_trainable_parameters == 41_943_040
    assert report.per_gpu.bytes_of("gradients") == 4 * 41_943_040
    assert report.per_gpu.bytes_of("optimizer_states") == 8 * 41_943_040


def test_dequantized_weight_of_the_largest_llama_3_8b_linear() -> None:
    # gate/up/down: 14336 x 4096 in bf16, plus the nested absmax dequantized to fp32
    numel = 14336 * 4096
    got = qlora.dequantized_weight_bytes(numel, compute="bf16", double=True)
    assert got == 2 * numel + 4 * (numel // 64) == 121_110_528


# --- fp8 (Transformer Engine) ------------------------------------------------------------------


def test_fp8_meta_of_one_gemm_under_delayed_scaling() -> None:
    from memplan.states import fp8

    # 3 forward + 2 backward quantizers, each an fp32 scale and 1,024 fp32 amax entries
    assert fp8.meta_bytes(1) == 5 * (1 + 1024) * 4 == 20_500
    assert fp8.meta_bytes(1, delayed=False) == 5 * 4


def test_fp8_weight_cache_under_fsdp_exceeds_the_sharded_bf16_weights() -> None:
    """Llama-3-8B on 8 ranks: each rank caches the fp8 copy (data + transpose on Hopper) of
    every gathered decoder weight, 2 B per parameter, while its bf16 shard is 2 / 8 B."""
    from memplan.states import fp8

    s = make_spec(model={"preset": "llama-3-8b"})
    inv = load_inventory(load_spec_from(s))
    weights = fp8.gemm_weights(inv.parameters)
    numel = sum(t.numel for t in weights)
    assert len(weights) == 32 * 7 and numel == 6_979_321_856
    t = fp8.terms(inv.parameters, tokens=4096)
    assert t.weight_bytes == 2 * numel + 4 * len(weights)
    bf16_shard = 2 * inv.num_parameters // 8
    assert t.weight_bytes > 6 * bf16_shard
    blackwell = fp8.terms(inv.parameters, tokens=4096, transpose=False)
    assert blackwell.weight_bytes == numel + 4 * len(weights)
    # saved inputs: 1 byte per element instead of bf16's 2 (plus a scale_inv each)
    assert t.input_bf16_bytes == 2 * (t.input_saved_bytes - 4 * len(weights))


def test_qlora_dequantized_weight_is_a_transient_of_the_step() -> None:
    """bitsandbytes' MatMul4Bit dequantizes the whole weight for each matmul: the largest
    quantized Linear's weight in the compute dtype (+ its fp32 nested absmax) is alive during
    forward and backward, on top of the saved activations."""
    spec = make_spec(finetune={"method": "qlora"}, hardware={"device": "cuda"})
    r = estimate(spec, from_config(TINY_LLAMA))
    terms = {t.name: t for t in r.timeline.transients}
    largest = TINY_LLAMA["intermediate_size"] * TINY_LLAMA["hidden_size"]  # gate/up/down
    expected = qlora.dequantized_weight_bytes(largest, compute="bf16", double=True)
    assert terms["qlora_dequantized_weight"].bytes == expected
    assert "backward" in terms["qlora_dequantized_weight"].phases
    full = estimate(make_spec(hardware={"device": "cuda"}), from_config(TINY_LLAMA))
    assert "qlora_dequantized_weight" not in {t.name for t in full.timeline.transients}


def fp8_report(**over: Any) -> Any:
    spec = make_spec(
        precision={"preset": "bf16-mixed", "fp8": over.pop("fp8", "delayed")},
        hardware={"device": "cuda", "gpu": over.pop("gpu", "H100-80GB")},
        **over,
    )
    return estimate(spec, from_config(TINY_LLAMA))


def test_fp8_in_estimate_adds_scaling_state_and_weight_copies() -> None:
    """TE's DelayedScaling state (5 quantizers per GEMM, fp32 scale + 1,024-entry amax
    history) is a buffer row; the fp8 weight copies (row-wise + transpose on Hopper, 1 B, +
    a 4-byte scale_inv) a transient; both over the 7 GEMMs of each Llama layer."""
    r = fp8_report()
    gemms = 7 * TINY_LLAMA["num_hidden_layers"]
    rows = {t.name: t for t in r.buffers}
    assert rows["fp8_scaling_state"].bytes == gemms * 5 * (1 + 1024) * 4
    layer = sum(
        t.numel for t in from_config(TINY_LLAMA).parameters if t.layer == 0 and t.role != "norm"
    )
    weights = {t.name: t for t in r.timeline.transients}["fp8_weights"]
    assert weights.bytes == TINY_LLAMA["num_hidden_layers"] * 2 * layer + gemms * 4
    assert weights.phases[0] == "forward"  # saved for backward (no is_first_microbatch cache)
    doc = estimate_json(r)
    assert doc["precision"]["name"] == "bf16-mixed"
    assert any("fp8 (delayed scaling)" in n for n in doc["notes"])
    current = fp8_report(fp8="current")
    assert {t.name: t for t in current.buffers}["fp8_scaling_state"].bytes == gemms * 5 * 4
    blackwell = fp8_report(gpu="B200")
    copies = {t.name: t for t in blackwell.timeline.transients}["fp8_weights"]
    assert copies.bytes == TINY_LLAMA["num_hidden_layers"] * layer + gemms * 4  # no transpose


def test_fp8_weight_copies_are_cached_for_the_step_by_megatron() -> None:
    r = fp8_report(parallelism={"engine": "megatron"}, training={"gradient_accumulation_steps": 4})
    weights = {t.name: t for t in r.timeline.transients}["fp8_weights"]
    assert weights.phases[0] == "start" and "optimizer_step" in weights.phases


def test_fp8_needs_cuda_and_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "fp8.yaml"
    path.write_text(
        "model: {preset: llama-3-8b}\nprecision: {preset: bf16-mixed, fp8: delayed}\n"
        "hardware: {device: cpu}\n"
    )
    out = CliRunner().invoke(app, ["estimate", str(path)])
    assert out.exit_code == 1
    assert f"{path}:2: precision.fp8: " in out.output and "CUDA" in out.output


def test_finetune_errors_name_the_yaml_line(tmp_path: Path) -> None:
    path = tmp_path / "lora-tp.yaml"
    path.write_text(
        "model: {preset: llama-3-8b}\nparallelism: {tensor: 2}\nfinetune:\n  method: lora\n"
    )
    out = CliRunner().invoke(app, ["estimate", str(path)])
    assert out.exit_code == 1
    assert f"{path}:4: finetune.method: " in out.output
