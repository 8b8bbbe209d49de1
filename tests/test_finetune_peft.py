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
from memplan.model.finetune import lora as finetune
from memplan.model.inventory import Inventory
from memplan.model.sources import from_config
from memplan.precision import TORCH_NAMES
from memplan.report.estimate import estimate
from memplan.report.settings import layout_of, setting_of
from tests.conftest import TINY_LLAMA
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
