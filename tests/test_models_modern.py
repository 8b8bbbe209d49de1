"""memplan's inventories against the models transformers builds, tensor by tensor.

For every family, small configs (variants: tied/untied, GQA, explicit or default head_dim,
MLA with and without q_lora_rank, dense-first layers, shared experts on/off, sparse steps,
...) and full-size configs are built by transformers on the meta device; the ordered
(name, shape) lists of `named_parameters()` and `named_buffers()` (with persistence from
`_non_persistent_buffers_set` and every dtype that differs from the build dtype), the tied
pairs and the total must equal memplan's exactly.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.model import sources as models  # noqa: E402
from memplan.model.families import (  # noqa: E402
    deepseek,
    gemma,
    llama,
    mixtral,
    olmo2,
    phi3,
    qwen_moe,
    supported_model_types,
)
from memplan.model.inventory import Inventory  # noqa: E402

# Shared experts switched off (n_shared_experts=0, shared_expert_intermediate_size=0) are
# zero-element tensors, which transformers still registers; torch warns when initialising them.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

DATA = Path(__file__).parent / "data" / "hf-configs"
PRESETS = Path(models.__file__).parent.parent / "presets"
BUILD_DTYPE = torch.bfloat16
TORCH_DTYPES = {torch.float32: "fp32", torch.int64: "int64", torch.bfloat16: None}


# -- transformers side -------------------------------------------------------------------


def hf_model(config: dict[str, Any]) -> Any:
    """`AutoModelForCausalLM.from_config` on the meta device, in bf16."""
    kwargs = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    hf_config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=BUILD_DTYPE)


def hf_layout(model: Any) -> tuple[list[Any], list[Any], set[tuple[str, str]]]:
    params = [(n, tuple(p.shape), TORCH_DTYPES[p.dtype]) for n, p in model.named_parameters()]
    buffers = []
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            persistent = name not in module._non_persistent_buffers_set
            full = f"{module_name}.{name}" if module_name else name
            buffers.append((full, tuple(buf.shape), TORCH_DTYPES[buf.dtype], persistent))
    owners = {id(p): n for n, p in model.named_parameters()}
    tied = {
        (n, owners[id(p)])
        for n, p in model.named_parameters(remove_duplicate=False)
        if owners[id(p)] != n
    }
    return params, buffers, tied


# -- memplan side ------------------------------------------------------------------------


def memplan_layout(inv: Inventory) -> tuple[list[Any], list[Any], set[tuple[str, str]]]:
    params = [(t.name, t.shape, t.dtype) for t in inv.parameters]
    buffers = [(t.name, t.shape, t.dtype, t.persistent) for t in inv.buffers]
    return params, buffers, set(inv.tied)


def assert_matches(config: dict[str, Any]) -> Inventory:
    inv = models.from_config(config)
    model = hf_model(config)
    hf_params, hf_buffers, hf_tied = hf_layout(model)
    mp_params, mp_buffers, mp_tied = memplan_layout(inv)
    assert mp_params == hf_params
    assert mp_buffers == hf_buffers
    assert mp_tied == hf_tied
    assert inv.num_parameters == sum(p.numel() for p in model.parameters())
    _assert_labels(inv)
    return inv


def _assert_labels(inv: Inventory) -> None:
    """Every tensor has a role; decoder-layer tensors carry their index, others None."""
    for t in (*inv.parameters, *inv.buffers):
        assert t.role in {
            "embedding",
            "attention",
            "mlp",
            "experts",
            "router",
            "shared_expert",
            "norm",
            "head",
            "vision",
        }, t
        parts = t.name.split(".")
        if "layers" in parts and "vision_tower" not in parts:
            assert t.layer == int(parts[parts.index("layers") + 1]), t
        else:
            assert t.layer is None, t
    assert inv.architecture is not None
    assert inv.architecture.num_layers == len(
        {t.layer for t in inv.parameters if t.layer is not None}
    )


# -- small configs -----------------------------------------------------------------------

BASE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "vocab_size": 128,
}


def small(model_type: str, **overrides: Any) -> dict[str, Any]:
    return {"model_type": model_type, **BASE, **overrides}


MLA = {"kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 12}
MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 2}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

SMALL: dict[str, dict[str, Any]] = {
    "llama": small("llama"),
    "llama-mha-no-kv-key": small("llama", num_key_value_heads=None),
    "llama-tied": small("llama", tie_word_embeddings=True),
    "llama-biases-head-dim": small("llama", attention_bias=True, mlp_bias=True, head_dim=32),
    "llama-rope-llama3": small(
        "llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": small("mistral", sliding_window=16),
    "mistral-head-dim-null": small("mistral", head_dim=None, tie_word_embeddings=True),
    "mistral-head-dim": small("mistral", head_dim=8),
    "qwen2": small("qwen2"),
    "qwen2-attention-bias-ignored": small("qwen2", attention_bias=False, mlp_bias=True),
    "qwen2-tied-window": small(
        "qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=8
    ),
    "qwen3-default-head-dim": small("qwen3"),
    "qwen3-bias-head-dim": small("qwen3", head_dim=16, attention_bias=True),
    "qwen3-tied": small("qwen3", head_dim=16, tie_word_embeddings=True),
    "mixtral": small("mixtral", num_local_experts=4),
    "mixtral-alias-head-dim": small("mixtral", num_experts=3, head_dim=8),
    "mixtral-tied": small("mixtral", tie_word_embeddings=True, num_key_value_heads=4),
    "qwen2_moe": small("qwen2_moe", num_experts=4, shared_expert_intermediate_size=24, **MOE),
    "qwen2_moe-sparse-step": small(
        "qwen2_moe", num_experts=4, decoder_sparse_step=2, num_hidden_layers=4, **MOE
    ),
    "qwen2_moe-mlp-only": small(
        "qwen2_moe", num_experts=4, mlp_only_layers=[0, 2], qkv_bias=False, **MOE
    ),
    "qwen2_moe-no-shared": small(
        "qwen2_moe", num_experts=4, shared_expert_intermediate_size=0, head_dim=8, **MOE
    ),
    "qwen2_moe-no-experts-tied": small("qwen2_moe", num_experts=0, tie_word_embeddings=True, **MOE),
    "qwen3_moe": small("qwen3_moe", num_experts=4, head_dim=32, **MOE),
    "qwen3_moe-step-mlp-only": small(
        "qwen3_moe",
        num_local_experts=4,
        decoder_sparse_step=2,
        mlp_only_layers=[1],
        num_hidden_layers=4,
        attention_bias=True,
        **MOE,
    ),
    "qwen3_moe-tied": small("qwen3_moe", num_experts=4, tie_word_embeddings=True, **MOE),
    "gemma-defaults": small("gemma"),
    "gemma-head-dim-untied": small("gemma", head_dim=16, tie_word_embeddings=False),
    "gemma-bias": small("gemma", head_dim=16, attention_bias=True),
    "gemma2": small("gemma2", head_dim=16),
    "gemma2-layer-types-untied": small(
        "gemma2",
        head_dim=16,
        layer_types=["full_attention"] * 3,
        tie_word_embeddings=False,
    ),
    "gemma3_text-all-local": small("gemma3_text", head_dim=16),
    "gemma3_text-local-and-global": small("gemma3_text", head_dim=16, num_hidden_layers=7),
    "gemma3_text-pattern-linear-rope": small(
        "gemma3_text",
        head_dim=16,
        sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
    "gemma3_text-untied-global": small(
        "gemma3_text",
        head_dim=16,
        layer_types=["full_attention"] * 3,
        tie_word_embeddings=False,
    ),
    "gemma3": {
        "model_type": "gemma3",
        "text_config": {**BASE, "head_dim": 16, "num_hidden_layers": 6, "vocab_size": 300},
        "vision_config": VISION,
        "mm_tokens_per_image": 4,
    },
    "gemma3-no-head-untied": {
        "model_type": "gemma3",
        "text_config": {**BASE, "head_dim": 16, "vocab_size": 300},
        "vision_config": {**VISION, "vision_use_head": False},
        "mm_tokens_per_image": 4,
        "tie_word_embeddings": False,
    },
    "phi3": small("phi3", pad_token_id=0),
    "phi3-mha": small("phi3", pad_token_id=0, num_key_value_heads=None),
    "phi3-partial-rotary-tied": small(
        "phi3", pad_token_id=0, partial_rotary_factor=0.75, tie_word_embeddings=True
    ),
    "phi": small("phi"),
    "phi-gqa-qk-norm-rotary-0.4-tied": small(
        "phi", qk_layernorm=True, partial_rotary_factor=0.4, tie_word_embeddings=True
    ),
    "olmo2": small("olmo2"),
    "olmo2-mha-bias-tied": small(
        "olmo2", num_key_value_heads=None, attention_bias=True, tie_word_embeddings=True
    ),
    "deepseek_v2-no-q-lora": small(
        "deepseek_v2",
        n_routed_experts=4,
        q_lora_rank=None,
        first_k_dense_replace=1,
        **MLA,
        **MOE,
    ),
    "deepseek_v2-q-lora-no-shared": small(
        "deepseek_v2", n_routed_experts=4, q_lora_rank=6, n_shared_experts=0, **MLA, **MOE
    ),
    "deepseek_v2-biases": small(
        "deepseek_v2",
        num_experts=4,
        q_lora_rank=6,
        first_k_dense_replace=2,
        attention_bias=True,
        mlp_bias=True,
        **MLA,
        **MOE,
    ),
    "deepseek_v3": small(
        "deepseek_v3",
        n_routed_experts=4,
        q_lora_rank=6,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        **MLA,
        **MOE,
    ),
    "deepseek_v3-no-q-lora-all-sparse": small(
        "deepseek_v3",
        n_routed_experts=4,
        q_lora_rank=None,
        first_k_dense_replace=0,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
        **MLA,
        **MOE,
    ),
    "deepseek_v3-no-shared-tied-yarn": small(
        "deepseek_v3",
        n_routed_experts=4,
        q_lora_rank=6,
        first_k_dense_replace=2,
        n_shared_experts=0,
        n_group=1,
        topk_group=1,
        tie_word_embeddings=True,
        rope_scaling={
            "type": "yarn",
            "factor": 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64,
        },
        **MLA,
        **MOE,
    ),
}


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_small_config_matches_transformers(variant: str) -> None:
    assert_matches(SMALL[variant])


def test_every_modern_family_is_covered() -> None:
    covered = {c["model_type"] for c in SMALL.values()}
    assert covered == {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gemma3",
        "phi3",
        "phi",
        "olmo2",
        "deepseek_v2",
        "deepseek_v3",
    }
    assert covered <= set(supported_model_types())


# -- full size ---------------------------------------------------------------------------

REFERENCE = [
    "Llama-2-7b-hf",
    "Meta-Llama-3-8B",
    "Mistral-7B-v0.1",
    "Mixtral-8x7B-v0.1",
    "Qwen2.5-0.5B",
]
TRANSCRIBED = [
    "llama-2-70b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "deepseek-v3",
    "qwen3-30b-a3b",
]


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_config_matches_transformers_at_full_size(name: str) -> None:
    assert_matches(json.loads((DATA / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", TRANSCRIBED)
def test_transcribed_preset_matches_transformers_at_full_size(name: str) -> None:
    assert_matches(json.loads((PRESETS / f"{name}.json").read_text()))


@pytest.mark.parametrize(
    ("preset", "reference"),
    [
        ("llama-2-7b", "Llama-2-7b-hf"),
        ("llama-3-8b", "Meta-Llama-3-8B"),
        ("mistral-7b", "Mistral-7B-v0.1"),
        ("mixtral-8x7b", "Mixtral-8x7B-v0.1"),
        ("qwen2.5-0.5b", "Qwen2.5-0.5B"),
    ],
)
def test_copied_presets_are_verbatim(preset: str, reference: str) -> None:
    assert (PRESETS / f"{preset}.json").read_bytes() == (DATA / f"{reference}.json").read_bytes()


# Structural keys of further public config.json files (the keys that shape tensors, as on the
# Hub), built at full size: they exercise real key sets (nested gemma3 configs with legacy
# rope_scaling, q_lora_rank null, longrope with partial rotary) and land on published totals.
PUBLIC_SHAPES: dict[str, tuple[dict[str, Any], int]] = {
    # google/gemma-3-4b-it: 4.3B (vision tower and projector included)
    "gemma-3-4b": (
        {
            "model_type": "gemma3",
            "mm_tokens_per_image": 256,
            "text_config": {
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "model_type": "gemma3_text",
                "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024,
            },
            "vision_config": {
                "hidden_size": 1152,
                "image_size": 896,
                "intermediate_size": 4304,
                "model_type": "siglip_vision_model",
                "num_attention_heads": 16,
                "num_hidden_layers": 27,
                "patch_size": 14,
                "vision_use_head": False,
            },
        },
        4_300_079_472,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, no q LoRA, first layer dense
    "deepseek-v2-lite": (
        {
            "model_type": "deepseek_v2",
            "vocab_size": 102400,
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "n_shared_experts": 2,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
            "n_group": 1,
            "topk_group": 1,
            "tie_word_embeddings": False,
        },
        15_706_484_224,
    ),
    # microsoft/Phi-3-mini-128k-instruct: 3.8B, longrope
    "phi-3-mini-128k": (
        {
            "model_type": "phi3",
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "num_hidden_layers": 32,
            "vocab_size": 32064,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0] * 48,
                "long_factor": [2.0] * 48,
            },
            "pad_token_id": 32000,
            "tie_word_embeddings": False,
        },
        3_821_079_552,
    ),
    # microsoft/Phi-4-mini-instruct: 3.8B, GQA, partial rotary 0.75, tied embeddings
    "phi-4-mini": (
        {
            "model_type": "phi3",
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "num_hidden_layers": 32,
            "vocab_size": 200064,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "partial_rotary_factor": 0.75,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0] * 48,
                "long_factor": [2.0] * 48,
            },
            "pad_token_id": 199999,
            "tie_word_embeddings": True,
        },
        3_836_021_760,
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_SHAPES))
def test_public_config_shapes_match_transformers_at_full_size(name: str) -> None:
    config, total = PUBLIC_SHAPES[name]
    assert assert_matches(config).num_parameters == total


# Published totals, in billions at the precision the source gives.
PUBLISHED = [
    # safetensors index of meta-llama/Llama-2-70b-hf: total_size 137,953,296,384 B in fp16
    ("llama-2-70b", 68_976_648_192, 68.98),
    # Llama 3.1 model card / safetensors metadata: 8.03B, 70.55B, 405.85B
    ("llama-3.1-8b", 8_030_261_248, 8.03),
    ("llama-3.1-70b", 70_553_706_496, 70.55),
    ("llama-3.1-405b", 405_853_388_800, 405.85),
    # DeepSeek-V3 README: 685B = 671B main model + 14B multi-token-prediction module; the MTP
    # layer is excluded here (transformers does not build it). The 14,848 router bias
    # elements (58 MoE layers x 256) are buffers in transformers 5.24, not parameters:
    # 671,026,404,352 + 14,848 = 671,026,419,200, the checkpoint's main-model count.
    ("deepseek-v3", 671_026_404_352, 671.0),
    # Qwen3-30B-A3B model card: 30.5B total, 29.9B non-embedding
    ("qwen3-30b-a3b", 30_532_122_624, 30.5),
]


@pytest.mark.parametrize(("preset", "exact", "billions"), PUBLISHED)
def test_transcribed_preset_has_published_parameter_count(
    preset: str, exact: int, billions: float
) -> None:
    inv = models.from_config(json.loads((PRESETS / f"{preset}.json").read_text()))
    assert inv.num_parameters == exact
    digits = len(str(billions).split(".")[1])
    assert round(inv.num_parameters / 1e9, digits) == billions


def _activated_billions(inv: Inventory) -> float:
    """Parameters one token uses: routed experts scaled by top-k / E, everything else whole."""
    arch = inv.architecture
    assert arch is not None
    routed = sum(t.numel for t in inv.parameters if t.role == "experts")
    share = arch.num_experts_per_token / arch.num_experts
    return (inv.num_parameters - routed + routed * share) / 1e9


def test_moe_presets_have_published_activated_counts() -> None:
    v3 = models.from_config(json.loads((PRESETS / "deepseek-v3.json").read_text()))
    qwen = models.from_config(json.loads((PRESETS / "qwen3-30b-a3b.json").read_text()))
    # DeepSeek-V3 README: "37B activated". 37.55B counting the embedding and lm_head, 36.63B
    # without the embedding lookup: the README's figure is rounded, so allow either reading.
    assert abs(_activated_billions(v3) - 37) < 0.6
    assert 3.3 <= _activated_billions(qwen) < 3.4  # Qwen3-30B-A3B card: 3.3B activated
    qwen_embeddings = sum(t.numel for t in qwen.parameters if t.role in ("embedding", "head"))
    assert round((qwen.num_parameters - qwen_embeddings) / 1e9, 1) == 29.9


def test_deepseek_v3_facts_and_notes() -> None:
    inv = models.from_config(json.loads((PRESETS / "deepseek-v3.json").read_text()))
    arch = inv.architecture
    assert arch is not None
    assert (arch.num_experts, arch.num_experts_per_token, arch.num_layers) == (256, 8, 61)
    assert arch.extra["first_k_dense_replace"] == 3
    assert arch.extra["moe_layers"] == tuple(range(3, 61))
    assert arch.extra["q_lora_rank"] == 1536 and arch.extra["kv_lora_rank"] == 512
    bias = [b for b in inv.buffers if b.name.endswith("e_score_correction_bias")]
    assert len(bias) == 58 and all(b.persistent and b.dtype == "fp32" for b in bias)
    assert any("multi-token-prediction" in note for note in inv.notes)
    assert any("quantization_config" in note for note in inv.notes)


def test_deepseek_v3_inventory_builds_in_under_50_ms() -> None:
    config = json.loads((PRESETS / "deepseek-v3.json").read_text())
    times_ms = []
    for _ in range(20):
        start = time.perf_counter()
        models.from_config(config)
        times_ms.append((time.perf_counter() - start) * 1e3)
    assert statistics.median(times_ms) < 50


# -- defaults ----------------------------------------------------------------------------

DEFAULT_TABLES = [
    (llama.DEFAULTS["llama"], "LlamaConfig"),
    (llama.DEFAULTS["mistral"], "MistralConfig"),
    (llama.DEFAULTS["qwen2"], "Qwen2Config"),
    (llama.DEFAULTS["qwen3"], "Qwen3Config"),
    (mixtral.DEFAULTS, "MixtralConfig"),
    (qwen_moe.DEFAULTS["qwen2_moe"], "Qwen2MoeConfig"),
    (qwen_moe.DEFAULTS["qwen3_moe"], "Qwen3MoeConfig"),
    (gemma.DEFAULTS["gemma"], "GemmaConfig"),
    (gemma.DEFAULTS["gemma2"], "Gemma2Config"),
    (gemma.DEFAULTS["gemma3_text"], "Gemma3TextConfig"),
    (gemma.GEMMA3_DEFAULTS, "Gemma3Config"),
    (gemma.SIGLIP_VISION_DEFAULTS, "SiglipVisionConfig"),
    (phi3.DEFAULTS, "Phi3Config"),
    (olmo2.DEFAULTS, "Olmo2Config"),
    (deepseek.DEFAULTS["deepseek_v2"], "DeepseekV2Config"),
    (deepseek.DEFAULTS["deepseek_v3"], "DeepseekV3Config"),
]


@pytest.mark.parametrize(
    ("table", "class_name"), DEFAULT_TABLES, ids=[c for _, c in DEFAULT_TABLES]
)
def test_default_tables_match_the_config_classes(table: dict[str, Any], class_name: str) -> None:
    config_class = getattr(transformers, class_name)
    fields = {f.name: f.default for f in dataclasses.fields(config_class)}
    # config.json may name a field by its attribute_map alias (DeepSeek-V3:
    # num_nextn_predict_layers is the dataclass field num_mtp_layers).
    field_of = {target: source for source, target in config_class.attribute_map.items()}
    assert {key: fields[key if key in fields else field_of[key]] for key in table} == table


def test_tie_defaults_follow_each_config_class() -> None:
    """Gemma ties lm_head to the embeddings by default; the other families do not."""
    tied = {
        model_type
        for model_type in supported_model_types()
        if model_type in {c["model_type"] for c in SMALL.values()}
        and models.from_config(
            {"model_type": model_type, **({} if model_type == "gemma3" else BASE)}
        ).tied
    }
    assert tied == {"gemma", "gemma2", "gemma3_text", "gemma3"}
