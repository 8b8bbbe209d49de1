"""LoRA against real peft models on the CPU (issue 10's proof).

1. The parameter list of `get_peft_model(...)` (names, shapes, dtypes, requires_grad, tied
   aliases) equals memplan's transformed inventory, tensor for tensor.
2. A real step with a real torch optimizer on the trainable parameters: gradients and
   optimizer states to the byte, per category.
3. `memplan verify` on LoRA specs (one process and torch.distributed ranks): model states to
   the byte, activations to the byte (the issue asks 1%).
4. What autograd saves under LoRA and frozen parameters equals memplan.activations.lora's
   prediction to the byte, across precisions, attention kinds, dropout and checkpointing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from memplan import activations
from memplan.config.load import validate
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.inventory import Inventory
from memplan.model.sources import from_config
from memplan.precision import TORCH_NAMES
from memplan.report.estimate import estimate
from memplan.report.settings import layout_of, setting_of
from tests.conftest import TINY_LLAMA
from tests.test_models_modern import SMALL
from tests.test_verify_support import TINY_GPT2, loaded, model_state_rows_exact, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA3 = {**TINY_LLAMA, "num_hidden_layers": 3}
GPT2 = {**TINY_GPT2, "n_layer": 3}
QV = {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def most_saved(spec: Spec, model: Inventory) -> activations.Activations:
    """The activations of the GPU that saves the most for `spec` (one stage here)."""
    trained = finetune.apply(spec, model)
    st, lay = setting_of(spec), layout_of(spec)
    steps = spec.training.gradient_accumulation_steps
    stages = activations.for_stages(trained, st, lay, spec.finetune, steps)
    return max(stages, key=lambda a: a.bytes)


def make(config: dict[str, Any], ft: dict[str, Any], **sections: Any) -> Spec:
    data: dict[str, Any] = {
        "model": {"architecture": config},
        "precision": "fp32",
        "finetune": ft,
        "training": {"micro_batch_size": 2, "sequence_length": 16},
        "parallelism": {"engine": "ddp"},
        "hardware": {"device": "cpu"},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return validate(data).spec


def peft_model(
    config: dict[str, Any], spec: Spec, *, attention: str = "sdpa", checkpointing: bool = False
) -> Any:
    """The transformers model in the recipe's parameter dtype, wrapped as the spec says."""
    from memplan.verify import peft_support

    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    dtype = getattr(torch, TORCH_NAMES[spec.recipe().parameters])
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=dtype, attn_implementation=attention
    )
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    return peft_support.prepare(spec, model)


# --- 1. the parameter list ---------------------------------------------------------------------


def _id(config: dict[str, Any], ft: dict[str, Any]) -> str:
    """A test id: the family and the finetune keys."""
    parts = [config["model_type"]]
    for key, value in ft.items():
        if key in ("method", "rank", "alpha"):
            continue
        shown = ",".join(value) if isinstance(value, list) else str(value)
        parts.append(f"{key}={shown}")
    return "-".join(parts) if len(parts) > 1 else f"{parts[0]}-{ft.get('method', 'full')}"


CASES = [
    (LLAMA3, QV),
    (LLAMA3, {"method": "lora"}),
    (LLAMA3, {"method": "lora", "target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    (LLAMA3, {"method": "lora", "target_modules": r".*layers\.1\..*(q|v)_proj", "dropout": 0.1}),
    (LLAMA3, {"method": "lora", "target_modules": ["q_proj", "embed_tokens"]}),
    (
        {**LLAMA3, "tie_word_embeddings": True},
        {"method": "lora", "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ),
    (GPT2, {"method": "lora"}),
    (GPT2, {"method": "lora", "target_modules": ["c_attn", "c_proj"], "bias": "lora_only"}),
    (
        GPT2,
        {"method": "lora", "target_modules": ["c_fc"], "bias": "all", "modules_to_save": ["wpe"]},
    ),
    (GPT2, {"method": "lora", "target_modules": ["c_attn", "lm_head"]}),
    (GPT2, {"method": "lora", "target_modules": "all-linear", "exclude_modules": ["c_fc"]}),
    (GPT2, {"method": "lora", "target_modules": ["c_attn"], "modules_to_save": ["wte"]}),
    (LLAMA3, {"method": "lora", "modules_to_save": ["norm"]}),
    (
        LLAMA3,
        {"method": "lora", "target_modules": ["q_proj", "up_proj"], "modules_to_save": ["mlp"]},
    ),
    (GPT2, {"method": "lora", "modules_to_save": ["h.1"]}),
    (LLAMA3, {"freeze": ["model.embed_tokens.*", "model.layers.[0-1].*"]}),
    (LLAMA3, {**QV, "freeze": ["model.layers.0.*"]}),
    (
        {**LLAMA3, "model_type": "gemma", "head_dim": 16},
        {"method": "lora", "target_modules": ["v_proj", "embed_tokens"]},
    ),
    (
        {**LLAMA3, "model_type": "phi3", "pad_token_id": 0},
        {"method": "lora", "target_modules": "all-linear"},
    ),
    (
        {**LLAMA3, "model_type": "olmo2", "pad_token_id": 0},
        {
            "method": "lora",
            "target_modules": ["k_proj"],
            "modules_to_save": ["post_feedforward_layernorm"],
        },
    ),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("config", "ft"), CASES, ids=[_id(c, f) for c, f in CASES])
def test_parameter_list_equals_peft(config: dict, ft: dict, precision: str) -> None:
    spec = make(config, ft, precision=precision)
    inv = finetune.apply(spec, from_config(config))
    model = peft_model(config, spec)
    held = spec.recipe().parameters
    real = {n: (tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()}
    mine = {
        t.name: (t.shape, f"torch.{TORCH_NAMES[t.dtype or held]}", t.trainable)
        for t in inv.parameters
    }
    assert mine == real
    # tied aliases: every name torch lists twice is one of memplan's tied pairs
    owner = {p.data_ptr(): n for n, p in model.named_parameters()}
    aliases = {
        (n, owner[p.data_ptr()])
        for n, p in model.named_parameters(remove_duplicate=False)
        if n not in real
    }
    assert aliases == set(inv.tied)
    assert finetune.num_trainable(inv.parameters) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


# --- 2. a real step --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "ft", "precision"),
    [
        (LLAMA3, QV, "fp32"),
        (LLAMA3, {**QV, "modules_to_save": ["lm_head"]}, "bf16"),
        (GPT2, {"method": "lora", "target_modules": ["c_attn", "c_fc"], "dropout": 0.1}, "bf16"),
        (LLAMA3, {"freeze": ["model.embed_tokens.*", "model.layers.0.*"]}, "fp32"),
    ],
    ids=["llama-qv-fp32", "llama-qv-lm_head-bf16", "gpt2-bf16", "llama-freeze"],
)
def test_a_real_adamw_step_matches_gradients_and_states(
    config: dict, ft: dict, precision: str
) -> None:
    spec = make(config, ft, precision=precision)
    model = peft_model(config, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, foreach=False)
    ids = torch.randint(0, config["vocab_size"], (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    def nbytes(ts: Any) -> int:
        return sum(t.untyped_storage().nbytes() for t in ts)

    measured = {
        "parameters": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_states": nbytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    gpu = estimate(spec, from_config(config)).per_gpu
    predicted = {c: gpu.bytes_of(c) for c in measured}  # type: ignore[arg-type]
    assert predicted == measured
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# --- 3. memplan verify -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_verify_lora_one_process(precision: str) -> None:
    ft = {**QV, "modules_to_save": ["lm_head"]}
    result = run(loaded(precision=precision, finetune=ft))
    model_state_rows_exact(result)
    rows = {r.name: r for r in result.headline.rows}
    assert rows["activations"].delta == 0
    if precision == "bf16-mixed":
        # masters for the bf16 lm_head copy only: the fp32 adapters are their own
        copy = 1041 * 64
        assert rows["master_weights"].measured == 4 * copy


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallelism",
    [{"engine": "fsdp2", "data": 2}, {"engine": "ddp", "data": 2, "zero_stage": 1}],
    ids=["fsdp2", "zero1"],
)
def test_verify_lora_on_two_ranks(parallelism: dict) -> None:
    ft = {"method": "lora", "target_modules": ["c_attn"], "modules_to_save": ["wpe"]}
    result = run(loaded("gpt2", precision="bf16-mixed", finetune=ft, parallelism=parallelism))
    model_state_rows_exact(result)
    assert all(r.row("activations").delta == 0 for r in result.ranks)


def test_verify_qlora_without_bitsandbytes_says_what_to_install(monkeypatch: Any) -> None:
    """QLoRA is verified with bitsandbytes' own Linear4bit (tests/test_qlora_verify.py);
    without the package verify says which release to install."""
    import importlib.util

    from memplan.errors import MemplanError

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "bitsandbytes" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MemplanError, match="bitsandbytes>=0.46"):
        run(loaded(precision="bf16", finetune={"method": "qlora"}))


# --- 4. saved tensors --------------------------------------------------------------------------


def saved_bytes(model: Any, spec: Spec, config: dict) -> int:
    from tests.activation_probe import saved_storages

    recipe = spec.recipe()
    torch.manual_seed(0)
    t = spec.training
    ids = torch.randint(0, config["vocab_size"], (t.micro_batch_size, t.sequence_length))
    cast = (
        torch.autocast("cpu", dtype=getattr(torch, TORCH_NAMES[recipe.compute]))
        if recipe.autocast
        else contextlib.nullcontext()
    )
    with saved_storages([*model.parameters(), *model.buffers()]) as got, cast:
        model(input_ids=ids, labels=ids.clone(), use_cache=False)
    return got.bytes


AMP_BF16_BASE = {
    "preset": "amp-bf16",
    "parameters": "bf16",
    "gradients": "bf16",
    "optimizer_states": "bf16",
}
ACT_CASES = [
    (LLAMA3, QV),
    (LLAMA3, {**QV, "dropout": 0.1}),
    (LLAMA3, {"method": "lora", "target_modules": "all-linear"}),
    (
        LLAMA3,
        {
            "method": "lora",
            "target_modules": ["o_proj", "down_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    (LLAMA3, {"freeze": ["model.embed_tokens.*", "model.layers.0.*"]}),
    (GPT2, {"method": "lora"}),
    (GPT2, {"method": "lora", "target_modules": ["c_attn", "c_proj", "c_fc"], "dropout": 0.05}),
    (GPT2, {"method": "lora", "target_modules": ["c_fc"], "modules_to_save": ["wpe"]}),
    (GPT2, {"method": "lora", "modules_to_save": ["h.1"]}),
    (LLAMA3, {"method": "lora", "target_modules": ["q_proj"], "modules_to_save": ["norm", "mlp"]}),
    (LLAMA3, {"method": "lora", "target_modules": ["v_proj", "embed_tokens"]}),
    (GPT2, {"method": "lora", "target_modules": ["c_attn", "wte"]}),
]


# Every recipe kind on SDPA (the default), and eager attention (whose first matmuls save q
# and k only for each other's gradient) in fp32 and under autocast with a bf16 base.
SETTINGS = [
    ("sdpa", "fp32"),
    ("sdpa", "bf16"),
    ("sdpa", "amp-bf16"),
    ("sdpa", "amp-bf16-base"),
    ("eager", "fp32"),
    ("eager", "amp-bf16-base"),
]


@pytest.mark.parametrize(("attention", "precision"), SETTINGS, ids=["-".join(s) for s in SETTINGS])
@pytest.mark.parametrize(("config", "ft"), ACT_CASES, ids=[_id(c, f) for c, f in ACT_CASES])
def test_saved_tensors_equal_the_prediction(
    config: dict, ft: dict, attention: str, precision: str
) -> None:
    recipe: Any = AMP_BF16_BASE if precision == "amp-bf16-base" else precision
    spec = make(config, ft, precision=recipe, training={"attention": attention})
    predicted = most_saved(spec, from_config(config))
    assert predicted.modelled
    assert (
        saved_bytes(peft_model(config, spec, attention=attention), spec, config) == predicted.bytes
    )


@pytest.mark.parametrize(
    ("config", "ft"),
    [(LLAMA3, QV), (GPT2, {"method": "lora"}), (GPT2, {"freeze": ["transformer.w?e.*"]})],
    ids=["llama", "gpt2", "gpt2-frozen-embeddings"],
)
def test_full_checkpointing_makes_the_embedding_output_require_grad(config: dict, ft: dict) -> None:
    """transformers' activation_checkpointing_enable calls enable_input_require_grads(): with
    frozen embeddings, GPT-2's embedding dropout still keeps its mask."""
    spec = make(config, ft, training={"activation_checkpointing": "full"})
    predicted = most_saved(spec, from_config(config))
    model = peft_model(config, spec, checkpointing=True)
    assert saved_bytes(model, spec, config) == predicted.bytes


# --- 5. more families: Gemma 1/2/3, Phi-3, OLMo 2, Mixtral, Qwen-MoE --------------------------

_SMALL: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
GEMMA = {**_SMALL, "model_type": "gemma", "head_dim": 16}
GEMMA2 = {**_SMALL, "model_type": "gemma2", "head_dim": 16}  # eager: softcaps on
GEMMA3 = {**_SMALL, "model_type": "gemma3_text", "head_dim": 16}
PHI3 = {**_SMALL, "model_type": "phi3"}
PHI3_DROPOUT = {**PHI3, "resid_pdrop": 0.1, "attention_dropout": 0.1}
OLMO2 = {**_SMALL, "model_type": "olmo2"}
# grouped_mm in bf16 wants 16-byte strides: intermediate 96
MIXTRAL = {
    **_SMALL,
    "model_type": "mixtral",
    "intermediate_size": 96,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
ALL_LINEAR = {"method": "lora", "target_modules": "all-linear"}
FROZEN_LAYER_0 = {"freeze": ["model.embed_tokens.*", "model.layers.0.*"]}
_GEMMA_FTS = [
    {"method": "lora"},  # peft's default targets: q_proj, v_proj
    {**QV, "dropout": 0.1},
    ALL_LINEAR,
    {"method": "lora", "target_modules": ["o_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    FROZEN_LAYER_0,
    {"method": "lora", "target_modules": ["q_proj"], "modules_to_save": ["norm", "mlp"]},
    {"method": "lora", "target_modules": ["v_proj", "embed_tokens"]},
    {
        "method": "lora",
        "target_modules": ["k_proj"],
        "modules_to_save": ["post_feedforward_layernorm"],
    },
]
_OLMO2_FTS = _GEMMA_FTS[1:]  # peft has no default targets for OLMo 2 (nor Phi-3)
_PHI3_FTS = [
    {"method": "lora", "target_modules": ["qkv_proj"]},
    {"method": "lora", "target_modules": ["qkv_proj", "gate_up_proj"], "dropout": 0.1},
    {"method": "lora", "target_modules": ["o_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    {
        "method": "lora",
        "target_modules": ["gate_up_proj"],
        "modules_to_save": ["post_attention_layernorm"],
    },
    ALL_LINEAR,
    FROZEN_LAYER_0,
    {"method": "lora", "target_modules": ["qkv_proj", "embed_tokens"]},
]
_MOE: dict[str, Any] = {
    **_SMALL,
    "moe_intermediate_size": 40,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}
QWEN2_MOE = {**_MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 56}
QWEN3_MOE = {**_MOE, "model_type": "qwen3_moe", "head_dim": 16}
_SHARED_FTS = [
    {"method": "lora", "target_modules": ["v_proj", "shared_expert_gate", "down_proj"]},
    {"method": "lora", "target_modules": ["gate_proj"], "modules_to_save": ["shared_expert_gate"]},
    {"method": "lora", "target_modules": ["k_proj"], "modules_to_save": ["shared_expert"]},
]
# --- LoRA on the MoE block: the router and the fused 3-D experts ------------------------------

# peft 0.21.2 converts the v4 target names of the MoE families transformers 5 fuses
# (utils/transformers_weight_conversion.py::_convert_peft_config_moe): the router and the
# experts become `target_parameters`, each wrapped in a lora.ParamWrapper. Qwen2-MoE is not
# converted (transformers has no conversion pattern for it): all-linear adapts its Linear
# modules only, and its router is refused as a module.
DEEPSEEK_V3 = SMALL["deepseek_v3"]
DEEPSEEK_V2 = SMALL["deepseek_v2-no-q-lora"]
_MIXTRAL_EXPERTS = ["gate", "w1", "w3", "w2"]
_QWEN_EXPERTS = ["gate", "gate_proj", "up_proj", "down_proj"]
MOE_INVENTORY_CASES = [
    (MIXTRAL, ALL_LINEAR),
    (MIXTRAL, {"method": "lora", "target_modules": ["q_proj", "gate"]}),
    (MIXTRAL, {"method": "lora", "target_modules": _MIXTRAL_EXPERTS}),
    (MIXTRAL, {"method": "lora", "target_modules": ["w2"], "modules_to_save": ["lm_head"]}),
    (MIXTRAL, {"method": "lora", "target_modules": ["v_proj", "w1", "w3"], "rank": 4}),
    # a regex is resolved to leaf names: peft adapts q_proj in every layer, not layer 1 only
    (MIXTRAL, {"method": "lora", "target_modules": r".*layers\.1\..*q_proj"}),
    (MIXTRAL, {"method": "lora", "target_modules": r".*\.(q_proj|w2)"}),
    (QWEN3_MOE, {"method": "lora", "target_modules": r".*\.(k_proj|gate_proj|up_proj)"}),
    (QWEN2_MOE, {"method": "lora", "target_modules": r".*layers\.1\..*q_proj"}),
    # a wrapped expert inside a saved module: both copies hold the wrapper and its adapters
    (MIXTRAL, {"method": "lora", "target_modules": ["w2"], "modules_to_save": ["mlp"]}),
    (QWEN3_MOE, ALL_LINEAR),
    (QWEN3_MOE, {"method": "lora", "target_modules": _QWEN_EXPERTS}),
    (QWEN3_MOE, {"method": "lora", "target_modules": ["down_proj", "q_proj"]}),
    (QWEN2_MOE, ALL_LINEAR),
    (QWEN2_MOE, {"method": "lora", "target_modules": ["q_proj", "down_proj"]}),
    # a dense first layer and shared experts: their Linear down_proj is not adapted once
    # down_proj has moved to the parameter targets
    (DEEPSEEK_V3, ALL_LINEAR),
    (DEEPSEEK_V3, {"method": "lora", "target_modules": ["q_a_proj", *_QWEN_EXPERTS]}),
    (DEEPSEEK_V2, {"method": "lora", "target_modules": ["down_proj", "kv_b_proj"]}),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("config", "ft"), MOE_INVENTORY_CASES, ids=[_id(c, f) for c, f in MOE_INVENTORY_CASES]
)
def test_moe_parameter_list_equals_peft(config: dict, ft: dict, precision: str) -> None:
    """Every parameter of peft's real model (name, shape, dtype, trainable): the router's
    pair under `mlp.gate`, the experts' pairs under `mlp.experts` (down_proj, the outer
    ParamWrapper) and `mlp.experts.base_layer` (gate_up_proj at rank 2r, the inner one).
    Buffers too: DeepSeek-V3's router bias moves under the router's base_layer."""
    test_parameter_list_equals_peft(config, ft, precision)
    spec = make(config, ft, precision=precision)
    inv = finetune.apply(spec, from_config(config))
    real = sorted(n for n, _ in peft_model(config, spec).named_buffers())
    assert sorted(b.name for b in inv.buffers) == real


@pytest.mark.parametrize(
    ("config", "peft_error"),
    [
        (MIXTRAL, "NoMatchingPeftModuleError"),
        (QWEN3_MOE, "NoMatchingPeftModuleError"),
        (DEEPSEEK_V3, "NoMatchingPeftModuleError"),
    ],
    ids=["mixtral", "qwen3_moe", "deepseek_v3"],
)
def test_moe_without_target_modules_is_refused_like_peft(config: dict, peft_error: str) -> None:
    """peft converts the MoE config before it fills in its default targets, so Mixtral's
    listed default (q_proj, v_proj) is never applied and get_peft_model raises."""
    spec = make(config, {"method": "lora"})
    with pytest.raises(Exception) as real:
        peft_model(config, spec)
    assert type(real.value).__name__ == peft_error
    with pytest.raises(MemplanError, match=r"NoMatchingPeftModuleError.*finetune\.target_modules"):
        finetune.apply(spec, from_config(config))


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_verify_mixtral_all_linear_model_states(precision: str) -> None:
    """`memplan verify` of Mixtral with all-linear (the router and the fused experts wrapped
    by lora.ParamWrapper): parameters, gradients, AdamW states and activations to the byte on
    the real peft model after a real step (the wrappers' tensors: tests/test_lora_moe.py)."""
    doc = {
        "model": {"architecture": MIXTRAL},
        "precision": precision,
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 2, "sequence_length": 16, "attention": "sdpa"},
        "parallelism": {"engine": "ddp", "data": 1},
        "hardware": {"device": "cpu"},
        "finetune": ALL_LINEAR,
    }
    result = run(validate(doc))
    model_state_rows_exact(result)
    rows = {r.name: r for r in result.headline.rows}
    assert rows["gradients"].checked and rows["gradients"].predicted > 0
    assert rows["optimizer_states"].checked and rows["optimizer_states"].predicted > 0
    assert rows["activations"].checked
    assert rows["activations"].delta == 0


@pytest.mark.parametrize(
    ("regex", "peft_error", "mine"),
    [
        (r".*experts.*", "Target module MixtralExperts", "LoRA cannot adapt"),
        ("q_proj", "Target modules q_proj not found", "matches no module"),
    ],
    ids=["experts-module", "bare-name"],
)
def test_moe_regex_refusals_like_peft(regex: str, peft_error: str, mine: str) -> None:
    """A regex naming the experts module itself, or one that matches nothing as a fullmatch."""
    spec = make(MIXTRAL, {"method": "lora", "target_modules": regex})
    with pytest.raises(ValueError, match=peft_error):
        peft_model(MIXTRAL, spec)
    with pytest.raises(MemplanError, match=mine):
        finetune.apply(spec, from_config(MIXTRAL))


@pytest.mark.parametrize(
    "ft",
    [
        {"method": "lora", "target_modules": ["w2"], "modules_to_save": ["experts"]},
        {"method": "lora", "target_modules": "all-linear", "modules_to_save": ["gate"]},
    ],
    ids=["experts", "router"],
)
def test_saving_a_param_wrapped_module_is_refused_like_peft(ft: dict) -> None:
    spec = make(MIXTRAL, ft)
    with pytest.raises(TypeError, match="cannot be applied to modules of type.*ParamWrapper"):
        peft_model(MIXTRAL, spec)
    with pytest.raises(MemplanError, match=r"finetune\.modules_to_save.*ParamWrapper"):
        finetune.apply(spec, from_config(MIXTRAL))


def test_dropout_on_moe_param_targets_is_refused_like_peft() -> None:
    """lora.ParamWrapper refuses lora_dropout: peft raises, and so does memplan."""
    spec = make(MIXTRAL, {"method": "lora", "target_modules": ["q_proj", "w2"], "dropout": 0.1})
    with pytest.raises(ValueError, match="ParamWrapper does not work with lora_dropout"):
        peft_model(MIXTRAL, spec)
    with pytest.raises(MemplanError, match=r"finetune\.dropout.*ParamWrapper"):
        finetune.apply(spec, from_config(MIXTRAL))
    attention_only = make(MIXTRAL, {**QV, "dropout": 0.1})
    peft_model(MIXTRAL, attention_only)  # attention adapters take dropout
    assert finetune.apply(attention_only, from_config(MIXTRAL)).parameters


def test_qwen2_moe_router_is_refused_like_peft() -> None:
    """Qwen2-MoE is not converted: its router is a module peft cannot adapt."""
    spec = make(QWEN2_MOE, {"method": "lora", "target_modules": ["q_proj", "gate"]})
    with pytest.raises(ValueError, match="Target module Qwen2MoeTopKRouter"):
        peft_model(QWEN2_MOE, spec)
    with pytest.raises(MemplanError, match="not supported"):
        finetune.apply(spec, from_config(QWEN2_MOE))


# A trainable v_proj next to frozen q/k under autocast: each reader keeps its own cast.
LLAMA_OWN_CAST = {"method": "lora", "target_modules": ["o_proj"], "modules_to_save": ["v_proj"]}
_MOE_FTS = [
    QV,
    {"method": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "dropout": 0.1},
    {"method": "lora", "target_modules": ["k_proj"], "modules_to_save": ["lm_head", "mlp"]},
    {**QV, "modules_to_save": ["experts"]},
    {**QV, "modules_to_save": ["gate"]},
    FROZEN_LAYER_0,
    {"method": "lora", "target_modules": ["o_proj", "embed_tokens"]},
]
MORE_CASES = [
    *[(c, f) for c in (GEMMA, GEMMA2, GEMMA3) for f in _GEMMA_FTS],
    *[(OLMO2, f) for f in _OLMO2_FTS],
    *[(PHI3, f) for f in _PHI3_FTS],
    *[(PHI3_DROPOUT, f) for f in _PHI3_FTS[:3]],
    *[(MIXTRAL, f) for f in _MOE_FTS],
    *[(QWEN2_MOE, f) for f in (*_MOE_FTS, *_SHARED_FTS)],
    *[(QWEN3_MOE, f) for f in _MOE_FTS],
    (LLAMA3, LLAMA_OWN_CAST),
]
# The default run: one case per family and rule (norms, sandwich norms, softcaps, the
# embedding adapter's embed_scale cast, fused projections, o_proj's own copy of the core's
# output); the whole matrix is marked slow.
QUICK = [
    (GEMMA, _GEMMA_FTS[0], "sdpa-amp-bf16"),
    (GEMMA2, ALL_LINEAR, "eager-fp32"),
    (GEMMA3, _GEMMA_FTS[6], "sdpa-bf16"),
    (OLMO2, _GEMMA_FTS[7], "sdpa-fp32"),
    (PHI3, _PHI3_FTS[2], "sdpa-fp32"),
    (PHI3_DROPOUT, _PHI3_FTS[0], "sdpa-amp-bf16"),
    (MIXTRAL, _MOE_FTS[2], "sdpa-bf16"),
    (QWEN2_MOE, _SHARED_FTS[1], "sdpa-amp-bf16"),
    (LLAMA3, LLAMA_OWN_CAST, "sdpa-amp-bf16"),
]
MORE_SETTINGS = [*SETTINGS, ("full", "fp32"), ("full", "amp-bf16")]


def _more_params() -> list[Any]:
    out = []
    for i, (config, ft) in enumerate(MORE_CASES):
        for attention, precision in MORE_SETTINGS:
            sid = f"{attention}-{precision}"
            quick = any(c is config and f is ft and q == sid for c, f, q in QUICK)
            marks = () if quick else (pytest.mark.slow,)
            out.append(
                pytest.param(
                    config, ft, attention, precision, id=f"{i}-{_id(config, ft)}-{sid}", marks=marks
                )
            )
    return out


@pytest.mark.parametrize(("config", "ft", "attention", "precision"), _more_params())
def test_saved_tensors_of_more_families_equal_the_prediction(
    config: dict, ft: dict, attention: str, precision: str
) -> None:
    """Gemma 1/2/3, Phi-3, OLMo 2, Mixtral and Qwen-MoE under LoRA and frozen parameters,
    every recipe kind, eager and SDPA attention, full checkpointing: autograd's saved bytes
    equal the prediction.
    (Gemma 2 has no SDPA in transformers: memplan predicts the eager attention it runs.)"""
    recipe: Any = AMP_BF16_BASE if precision == "amp-bf16-base" else precision
    checkpointing = attention == "full"
    training: dict[str, Any] = {"attention": "sdpa" if checkpointing else attention}
    if checkpointing:
        training["activation_checkpointing"] = "full"
    spec = make(config, ft, precision=recipe, training=training)
    predicted = most_saved(spec, from_config(config))
    assert predicted.modelled, predicted.notes
    real_attention = "eager" if config["model_type"] == "gemma2" else training["attention"]
    model = peft_model(config, spec, attention=real_attention, checkpointing=checkpointing)
    assert saved_bytes(model, spec, config) == predicted.bytes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "ft", "precision"),
    [
        (GEMMA, {"method": "lora"}, "bf16-mixed"),
        (GEMMA2, ALL_LINEAR, "bf16"),
        (
            GEMMA3,
            {"method": "lora", "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
            "bf16-mixed",
        ),
        (PHI3, {"method": "lora", "target_modules": ["qkv_proj", "o_proj"]}, "bf16-mixed"),
        (OLMO2, ALL_LINEAR, "bf16"),
        (MIXTRAL, {**QV, "modules_to_save": ["lm_head"]}, "bf16-mixed"),
        (QWEN2_MOE, _SHARED_FTS[0], "bf16"),
        (QWEN3_MOE, {"method": "lora", "target_modules": ["q_proj", "k_proj", "v_proj"]}, "bf16"),
    ],
    ids=["gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe"],
)
def test_verify_lora_more_families(config: dict, ft: dict, precision: str) -> None:
    """`memplan verify` on one LoRA spec per family: model states and activations exact."""
    attention = "eager" if config["model_type"] == "gemma2" else "sdpa"
    doc = {
        "model": {"architecture": config},
        "precision": precision,
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 2, "sequence_length": 16, "attention": attention},
        "parallelism": {"engine": "ddp", "data": 1},
        "hardware": {"device": "cpu"},
        "finetune": ft,
    }
    result = run(validate(doc))
    model_state_rows_exact(result)
    rows = {r.name: r for r in result.headline.rows}
    assert rows["activations"].checked
    assert rows["activations"].delta == 0
