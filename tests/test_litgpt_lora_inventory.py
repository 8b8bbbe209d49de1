"""LitGPT's LoRA model states (`model.implementation: litgpt`, `finetune.method: lora`): the
trainable tensors of memplan's inventory (memplan.model.finetune.lora.apply, whose adapters
memplan.model.stacks.litgpt_lora_adapters.fused_adapters lays out as LitGPT does) against
litgpt 0.5.9's own `litgpt.lora.GPT`, built on the meta device in Fabric's precision dtype
and marked by its own `mark_only_lora_as_trainable` (tests/litgpt_probe.py::
lora_parameters_of): how many tensors, each one's shape and dtype, and their bytes.

The tensor count is what the shapes alone do not give: torch.optim.AdamW keeps one 0-dim
`step` tensor per trainable tensor (torch/optim/adam.py::_init_group) and the CUDA caching
allocator rounds every tensor to its 512-byte blocks. LitGPT fuses the query, key and value
adapters of a layer into one LoRAQKVLinear pair (lora.py::LoRAQKVLinear.__init__) whatever
the checkpoint calls its linears, and adapts LLaMAMLP's fc_1 and fc_2 apart even where
the checkpoint fuses them (Phi-3's gate_up_proj).

Oracles: litgpt's own GPT (every architecture memplan's LitGPT stack covers, on
tests/litgpt_probe.py's tiny configs; litgpt's own Config.from_name entries beside memplan's
presets and published configs); the optimizer states of a real torch AdamW step of
finetune/lora.py::main's loop on CPU (tests/litgpt_probe.py::lora_optimizer_held).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.model.finetune.lora import apply
from memplan.model.load import load_inventory
from memplan.model.sources import from_config
from memplan.model.stacks.litgpt_configs import ARCHITECTURES
from memplan.model.stacks.litgpt_lora_adapters import Flags, flags_of
from memplan.precision import dtype_bytes
from tests.conftest import make_spec

TARGETS: dict[str, Any] = {
    "default": None,  # finetune/lora.py's lora_query + lora_value
    "q": ["q_proj"],
    "k+v": ["k_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "q+v+mlp": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "mlp+head": ["gate_proj", "up_proj", "down_proj", "lm_head"],
    "all-linear": "all-linear",
    "all+head": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head"],
}  # fmt: skip
"""Target sets in peft's Llama names (what memplan's spec takes), each one LitGPT flag set."""

PROBES: dict[str, dict[str, Any]] = {
    "llama": {"kv_heads": 2},
    "qwen2.5": {"kv_heads": 2},  # a bias on qkv: frozen (bias "none")
    "mistral": {"kv_heads": 2},
    "phi-3": {"kv_heads": 4},  # qkv_proj and gate_up_proj fused in the checkpoint
    "phi-4-mini": {"kv_heads": 2},  # qkv_proj with grouped queries
    "gemma": {"kv_heads": 4, "head_size": 32},  # head_size x n_head != n_embd
    "gemma-2": {"kv_heads": 2, "head_size": 32},
    "pythia": {"kv_heads": 4},  # query_key_value fused in the checkpoint
    "falcon-7b": {"kv_heads": 1},  # multi-query
    "falcon-40b": {"kv_heads": 2},
    "phi-1.5": {"kv_heads": 4},  # separate q/k/v, dense, fc1, fc2
    "phi-2": {"kv_heads": 4},
}
"""tests/litgpt_probe.py::ARCHS entries (litgpt config.py's fields per architecture) at the
probe's tiny sizes, covering every model type memplan's LitGPT stack accepts."""

FABRIC = {"bf16": "bf16-true", "fp32": "32-true", "amp-bf16": "bf16-mixed"}
DTYPES = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}


def lora_of(targets: Any, *, rank: int = 8, dropout: float = 0.0) -> Any:
    """tests/litgpt_probe.py's Lora flags for a target set, as memplan maps peft's names."""
    from tests.litgpt_probe import Lora

    fl = flags_of(tuple(targets) if isinstance(targets, list) else targets, rank=rank, dropout=0)
    assert isinstance(fl, Flags)
    return Lora(
        r=rank,
        dropout=dropout,
        query=fl.query,
        key=fl.key,
        value=fl.value,
        projection=fl.projection,
        mlp=fl.mlp,
        head=fl.head,
    )


def memplan_trainable(cfg: dict[str, Any], targets: Any, precision: str) -> list[tuple[Any, str]]:
    """(shape, dtype) of every trainable tensor of memplan's LitGPT LoRA inventory."""
    extra = {} if targets is None else {"target_modules": targets}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision=precision,
        finetune={"method": "lora", "rank": 8, "alpha": 16, **extra},
    )
    held = spec.recipe().parameters
    params = apply(spec, from_config(cfg)).parameters
    return [(t.shape, t.dtype or held) for t in params if t.trainable]


def litgpt_trainable(config: Any, targets: Any, precision: str) -> list[tuple[Any, str]]:
    """(shape, dtype) of every parameter litgpt's LoRA GPT marks trainable."""
    from tests.litgpt_probe import lora_parameters_of

    real = lora_parameters_of(config, lora_of(targets), FABRIC[precision])
    return [(s, DTYPES[d]) for s, d, g in real.values() if g]


def same(mine: list[tuple[Any, str]], real: list[tuple[Any, str]]) -> None:
    """The same tensors: count, shapes and dtypes (as a multiset), bytes."""
    assert len(mine) == len(real)
    assert Counter(mine) == Counter(real)

    def size(ts: list[tuple[Any, str]]) -> int:
        total = 0
        for shape, dtype in ts:
            n = 1
            for d in shape:
                n *= d
            total += n * dtype_bytes(dtype)
        return total

    assert size(mine) == size(real)


def test_probes_cover_every_litgpt_model_type() -> None:
    from tests.litgpt_probe import HF_CONFIG

    assert {HF_CONFIG[a]["model_type"] for a in PROBES} == set(ARCHITECTURES)


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("arch", list(PROBES))
def test_trainable_tensors_are_litgpts(arch: str, targets: str) -> None:
    """Every model type, every flag set: memplan's trainable tensors are litgpt.lora.GPT's,
    tensor for tensor (bf16-true)."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Shape, config, hf_config

    shape = Shape(arch=arch, layers=2, **PROBES[arch])
    mine = memplan_trainable(hf_config(shape), TARGETS[targets], "bf16")
    same(mine, litgpt_trainable(config(shape), TARGETS[targets], "bf16"))


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_trainable_tensors_follow_the_precision(precision: str) -> None:
    """32-true and bf16-mixed build the adapters in fp32 (Fabric's init_module dtype)."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Shape, config, hf_config

    shape = Shape(arch="phi-3", layers=2, kv_heads=4)
    targets = TARGETS["all+head"]
    mine = memplan_trainable(hf_config(shape), targets, precision)
    same(mine, litgpt_trainable(config(shape), targets, precision))


NAMED = [
    ("llama-2-7b", "Llama-2-7b-hf"),
    ("llama-3-8b", "Llama-3-8B"),
    ("mistral-7b", "Mistral-7B-v0.1"),
    ("qwen2.5-0.5b", "Qwen2.5-0.5B"),
    ("pythia-160m", "pythia-160m"),
]
"""memplan's presets and litgpt config.py's entries for the same checkpoints."""


@pytest.mark.parametrize("targets", ["default", "all+head"])
@pytest.mark.parametrize(("preset", "name"), NAMED)
def test_published_models_train_litgpts_tensors(preset: str, name: str, targets: str) -> None:
    """litgpt's own Config.from_name entry, built whole on the meta device, against memplan's
    preset of the same checkpoint."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from litgpt.config import Config

    extra = {} if TARGETS[targets] is None else {"target_modules": TARGETS[targets]}
    loaded = validate(
        {
            "model": {"preset": preset, "implementation": "litgpt"},
            "precision": "bf16",
            "finetune": {"method": "lora", "rank": 8, "alpha": 16, **extra},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    params = apply(loaded.spec, load_inventory(loaded)).parameters
    mine = [(t.shape, t.dtype or "bf16") for t in params if t.trainable]
    same(mine, litgpt_trainable(Config.from_name(name), TARGETS[targets], "bf16"))


PUBLISHED = [
    ("13b", "Llama-2-13b-hf"),
    ("stablelm-3b", "stablelm-base-alpha-3b"),
    ("phi-1.5", "phi-1_5"),
    ("falcon-40b", "falcon-40b"),
]
"""benchmarks/published_others.py's LitGPT models (LITGPT_MODELS: the published LoRA rows'
config.json sizes) and litgpt config.py's entries for them."""


@pytest.mark.parametrize("targets", ["default", "all+head"])
@pytest.mark.parametrize(("model", "name"), PUBLISHED)
def test_published_rows_train_litgpts_tensors(model: str, name: str, targets: str) -> None:
    """The models of LitGPT's published LoRA rows, against its own entries, built whole on
    the meta device."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from litgpt.config import Config

    from benchmarks.published_others import LITGPT_MODELS

    cfg = LITGPT_MODELS[model]["architecture"]
    mine = memplan_trainable(cfg, TARGETS[targets], "bf16")
    same(mine, litgpt_trainable(Config.from_name(name), TARGETS[targets], "bf16"))


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("llama", "default"),  # q and v: one LoRAQKVLinear pair per layer
        ("phi-3", "q+v+mlp"),  # fc_1 and fc_2 adapted apart from gate_up_proj
        ("phi-1.5", "all+head"),
        ("falcon-7b", "attention"),
    ],
)
def test_optimizer_states_match_a_real_adamw_step(arch: str, targets: str) -> None:
    """finetune/lora.py::main on CPU, two real steps of torch AdamW over every parameter
    (tests/litgpt_probe.py::lora_optimizer_held): memplan's exp_avg, exp_avg_sq and step are
    the same tensors and bytes, and the gradients are the trainable tensors'."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from memplan.report.estimate import estimate
    from tests.litgpt_probe import Shape, hf_config, lora_optimizer_held

    shape = Shape(arch=arch, layers=2, **PROBES[arch])
    cfg = hf_config(shape)
    extra = {} if TARGETS[targets] is None else {"target_modules": TARGETS[targets]}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": shape.batch, "sequence_length": shape.seq},
        finetune={"method": "lora", "rank": 8, "alpha": 16, **extra},
        hardware={"device": "cpu"},
    )
    real = lora_optimizer_held("bf16", shape, lora_of(TARGETS[targets]))
    assert set(real.with_state) == set(real.trainable)
    report = estimate(spec, from_config(cfg))
    mine = {t.name: (t.tensors, t.bytes) for t in report.per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert mine[key] == real.by_key[key], key
    assert mine["gradients"][1] == real.grad_bytes
