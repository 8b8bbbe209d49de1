"""model_type "phi" (phi-1 / phi-1.5 / phi-2): memplan's hand inventory (memplan.model.families.
phi) against transformers 5.25's real PhiForCausalLM, and LitGPT's own GPT for litgpt 0.5.9's
"phi-1_5" / "phi-2" entries (memplan.model.stacks.litgpt.own_inventory) against litgpt's
parameter count. Oracles: the real modules' named_parameters / named_buffers, built from the
libraries' own configs; litgpt's config.py entries for the probe's fields (tests/litgpt_probe.py
"phi-1.5" / "phi-2" ARCHS)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from memplan.model.families import family_of
from memplan.model.sources import from_config
from memplan.model.stacks import litgpt, litgpt_configs

PHI_1_5 = {
    # microsoft/phi-1_5 config.json (the fields memplan reads)
    "model_type": "phi",
    "architectures": ["PhiForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "partial_rotary_factor": 0.5,
    "vocab_size": 51200,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu_new",
    "tie_word_embeddings": False,
}
PHI_2 = {
    **PHI_1_5,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "partial_rotary_factor": 0.4,
}
TINY = {
    **PHI_1_5,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
}


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        {**TINY, "partial_rotary_factor": 0.4},
        {**TINY, "num_key_value_heads": 2, "qk_layernorm": True},
        {**TINY, "tie_word_embeddings": True},
        {**TINY, "architectures": ["PhiModel"]},
    ],
)
def test_inventory_matches_transformers_phi(config: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = cls(transformers.PhiConfig(**fields))
    inv = from_config(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    buffers = [(n, tuple(b.shape)) for n, b in model.named_buffers()]
    assert [(t.name, t.shape) for t in inv.parameters] == params
    assert [(t.name, t.shape) for t in inv.buffers] == buffers
    assert inv.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "config"), [("phi-1_5", PHI_1_5), ("phi-2", PHI_2)])
def test_litgpt_inventory_counts_litgpts_own_gpt(name: str, config: dict[str, Any]) -> None:
    """LitGPT's GPT for its own entry holds as many parameters (fused qkv with bias, lm_head
    bias, padded vocab 51200) as memplan counts for the HF config."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litgpt.model")
    from litgpt.config import Config
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    inv = litgpt.own_inventory(from_config(config))
    assert inv.num_parameters == sum(p.numel() for p in model.parameters())
    arch = inv.architecture
    assert arch is not None and litgpt_configs.architecture_refusal(arch) == ""
    assert litgpt_configs.shared_norm(arch)


@pytest.mark.parametrize(
    ("name", "arch", "dims"),
    [
        ("phi-1_5", "phi-1.5", {"dim": 2048, "heads": 32, "kv_heads": 32, "ffn": 8192}),
        ("phi-2", "phi-2", {"dim": 2560, "heads": 32, "kv_heads": 32, "ffn": 10240}),
    ],
)
def test_probe_fields_are_litgpts_own_entries(name: str, arch: str, dims: dict[str, int]) -> None:
    """The probe's "phi-1.5" / "phi-2" Config is litgpt's entry but for the name, the HF link
    and the unpadded vocab_size (the GPT is built with padded_vocab_size)."""
    pytest.importorskip("litgpt.model")
    from litgpt.config import Config

    from tests.litgpt_probe import Shape, config

    own = asdict(Config.from_name(name))
    shape = Shape(arch=arch, layers=own["n_layer"], vocab=51200, **dims)
    probe = asdict(config(shape))
    probe["block_size"] = own["block_size"]
    assert {k for k in own if own[k] != probe.get(k)} <= {"name", "hf_config", "vocab_size"}


def test_phi_is_a_hand_family_without_transformers_activations() -> None:
    family = family_of("phi")
    assert family is not None and isinstance(family.saved, str)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_litgpt_lora_default_targets_train_the_published_count(method: str) -> None:
    """finetune/lora.py's default (lora_query, lora_value) on phi-1.5 trains 1,572,864
    parameters: LitGPT's resource table (tutorials/resource-tables.md, "Trainable parameters",
    benchmarks/reference/litgpt-lora-a100.md). peft's own Phi default (q_proj, v_proj, fc1, fc2)
    is not what LitGPT adapts (96 modules, 5,505,024 adapter elements)."""
    from memplan.model.finetune.lora import apply, num_trainable
    from tests.conftest import make_spec

    spec = make_spec(
        model={"architecture": PHI_1_5, "implementation": "litgpt"},
        precision="bf16",
        optimizer={"name": "paged_adamw" if method == "qlora" else "adamw"},
        finetune={"method": method, "rank": 8, "alpha": 16, "dropout": 0.05},
    )
    params = apply(spec, from_config(PHI_1_5)).parameters
    # the adapters (QLoRA's StableEmbedding also trains: memplan.model.stacks.litgpt_qlora)
    assert num_trainable(t for t in params if "lora_" in t.name) == 1_572_864
