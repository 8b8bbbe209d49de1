"""benchmarks/verify_sweep.py: the generic shrinker (its tiny configs build with transformers on
the meta device at the sizes asked for, per-layer lists cut consistently, nested sub-configs
shrunk) and the classifier of a sweep row."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import sweep_configs as sweep  # noqa: E402
from benchmarks import verify_sweep  # noqa: E402


def build(config: dict[str, Any]) -> Any:
    """The model transformers builds from a shrunk config, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def embedding_shape(model: Any) -> tuple[int, ...]:
    return tuple(model.get_input_embeddings().weight.shape)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2", "phi3", "granite"])
def test_dense_types_build_tiny(model_type: str) -> None:
    """The input embedding transformers builds is vocabulary x hidden of the sweep's sizes,
    and the model has the sweep's layer count (whatever each type names its keys)."""
    model = build(sweep.shrink(model_type))
    assert embedding_shape(model) == (sweep.VOCAB, sweep.HIDDEN)
    cfg = model.config
    assert cfg.num_hidden_layers == sweep.LAYERS
    assert cfg.num_attention_heads == sweep.SIZE_OF["num_attention_heads"]


def test_gpt2_names_its_keys_its_own_way() -> None:
    """gpt2 spells them n_embd / n_layer / n_head: the shrinker finds them by name."""
    config = sweep.shrink("gpt2")
    assert config["n_embd"] == sweep.HIDDEN
    assert config["n_layer"] == sweep.LAYERS
    assert len(build(config).transformer.h) == sweep.LAYERS


def test_layer_types_cut_with_the_layer_count() -> None:
    """llama4_text: 48 layers, chunked x3 then full, no-rope every 4th (a per-layer list), every
    layer MoE (an index list as long as the layers): one layer of each kind kept, the lists cut
    and remapped to match, and transformers builds that many layers."""
    config = sweep.shrink("llama4_text")
    n = config["num_hidden_layers"]
    assert n == 2
    assert config["layer_types"] == ["chunked_attention", "full_attention"]
    assert config["no_rope_layers"] == [1, 0]
    assert config["moe_layers"] == [0, 1]
    assert len(build(config).model.layers) == n


def test_mamba2_heads_fill_the_mixer() -> None:
    """Mamba-2 validates hidden_size x expand == num_heads x head_dim
    (transformers/models/mamba2/configuration_mamba2.py::validate_architecture): the shrinker
    keeps it so, and the model builds."""
    config = sweep.shrink("mamba2")
    model = build(config)
    assert model.config.num_heads * model.config.head_dim == model.config.expand * sweep.HIDDEN


def test_nested_text_config_is_shrunk() -> None:
    """qwen3_5 (a vision-language type): its text_config and vision_config are shrunk too, and
    the built language model's embedding is the tiny one."""
    config = sweep.shrink("qwen3_5")
    assert config["text_config"]["hidden_size"] == sweep.HIDDEN
    assert config["text_config"]["vocab_size"] == sweep.VOCAB
    assert config["vision_config"]["hidden_size"] == sweep.HIDDEN
    model = build(config)
    assert embedding_shape(model) == (sweep.VOCAB, sweep.HIDDEN)


def test_mla_and_grouped_routing() -> None:
    """deepseek_v3: MLA ranks small, 4 experts in 2 groups of 2 routed to 1 group, the first
    dense layer kept (first_k_dense_replace counted over the kept layers); builds."""
    config = sweep.shrink("deepseek_v3")
    assert config["n_group"] == 2 and config["topk_group"] == 1
    assert config["n_routed_experts"] == 4
    assert config["first_k_dense_replace"] == 1
    assert sweep.is_moe(config)
    assert verify_sweep.setting_of(config)["precision"] == verify_sweep.MOE_PRECISION
    build(config)


def test_pick_layers_keeps_one_of_each_kind_and_remaps_indices() -> None:
    """A synthetic 8-layer config: sliding x3 then full, twice; MoE from layer 2 on (index
    list); the first 2 layers dense. Kept: the first of each kind."""
    defaults = {
        "num_hidden_layers": 8,
        "layer_types": ["sliding", "sliding", "sliding", "full"] * 2,
        "moe_layers": [2, 3, 4, 5, 6, 7],
        "first_k_dense_replace": 2,
    }
    kept = sweep.pick_layers(defaults, 8)
    assert kept == [0, 2, 3]
    out = sweep._shrunk(defaults)
    assert out["num_hidden_layers"] == 3
    assert out["layer_types"] == ["sliding", "sliding", "full"]
    assert out["moe_layers"] == [1, 2]
    assert out["first_k_dense_replace"] == 1


def test_source_lists_keep_their_sources() -> None:
    """Layers reading another layer's keys and values keep that layer, remapped."""
    defaults = {"num_hidden_layers": 6, "kv_source_layers": [0, 1, 2, 1, 4, 1]}
    out = sweep._shrunk(defaults)
    # Kinds: reads itself (first: layer 0), reads another (first: layer 3, which reads 1).
    assert sweep.pick_layers(defaults, 6) == [0, 1, 3]
    assert out["num_hidden_layers"] == 3
    assert out["kv_source_layers"] == [0, 1, 1]


ROW_OK = {"ok": True, "failures": [], "ratio": 1.0, "activations_predicted": 100}


def test_classify() -> None:
    """Each class from a synthetic row of run_case's shape (or the sweep's own keys)."""
    assert verify_sweep.classify(ROW_OK) == {"class": "verified"}
    unchecked = {"ok": True, "failures": [], "activations_predicted": None, "notes": ["why"]}
    assert verify_sweep.classify(unchecked) == {"class": "unchecked", "why": "why"}
    off = verify_sweep.classify(
        {
            "ok": False,
            "activations_predicted": 100,
            "failures": ["gradients predicted 1,200 B, measured 1,000 B (tolerance 0%)"],
        }
    )
    assert off["class"] == "off"
    assert off["off"] == [
        {"category": "gradients", "predicted": 1200, "measured": 1000, "ratio": 1.2}
    ]
    assert verify_sweep.classify({"error": "no profile", "refused": True}) == {
        "class": "refused",
        "why": "no profile",
    }
    assert verify_sweep.classify({"error": "RuntimeError: x"})["class"] == "crash"
    assert verify_sweep.classify({"build_error": "ValueError: y"})["class"] == "build-error"
    assert verify_sweep.classify({"timeout": 120.0})["class"] == "timeout"
    assert verify_sweep.classify({"crashed": "exit -9: "})["class"] == "crash"
