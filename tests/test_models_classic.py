"""memplan's inventories of the classic families against the model transformers builds.

For every case the model class named by `architectures[0]` (or the family default) is built
on the meta device in bf16 from the same config.json mapping memplan reads, and these must be
exactly equal:
- the ordered (name, shape) list of `named_parameters()` (tied weights once);
- the ordered (name, shape, dtype, persistent) list of `named_buffers()`, where dtype is None
  when the buffer follows the model dtype (bf16 here) and persistence comes from each module's
  `_non_persistent_buffers_set`;
- the tied (alias, owner) pairs: the aliases are exactly the names that
  `named_parameters(remove_duplicate=False)` adds, and each is the owner's tensor object;
- the parameter total.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING

from memplan.errors import MemplanError
from memplan.model.families import BY_MODEL_TYPE
from memplan.model.inventory import Inventory
from memplan.model.sources import from_config

HF_CONFIGS = Path(__file__).parent / "data" / "hf-configs"

# What memplan builds when `architectures` is absent (documented in each family module).
DEFAULT_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "gpt-sw3": "GPT2LMHeadModel",  # transformers maps gpt-sw3 to GPT2Config
    "gpt_neox": "GPTNeoXForCausalLM",
    "gptj": "GPTJForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "falcon": "FalconForCausalLM",
    "bert": "BertLMHeadModel",
    "roberta": "RobertaForCausalLM",
    "t5": "T5ForConditionalGeneration",
}

_DTYPES = {torch.float32: "fp32", torch.int64: "int64", torch.bool: "bool"}

Params = list[tuple[str, tuple[int, ...]]]
Buffers = list[tuple[str, tuple[int, ...], str | None, bool]]


def hf_model(config: dict[str, Any]) -> torch.nn.Module:
    """The transformers model for `config`, on the meta device, parameters in bf16."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(fields)
    archs = config.get("architectures") or [DEFAULT_CLASS[config["model_type"]]]
    model_class = getattr(transformers, archs[0])
    with torch.device("meta"):
        model: torch.nn.Module = model_class._from_config(hf_config, dtype=torch.bfloat16)
    return model


def hf_tensors(model: torch.nn.Module) -> tuple[Params, Buffers]:
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    params = []
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        params.append((name, tuple(p.shape)))
    buffers = [
        (
            name,
            tuple(b.shape),
            None if b.dtype == torch.bfloat16 else _DTYPES[b.dtype],
            name not in non_persistent,
        )
        for name, b in model.named_buffers()
    ]
    return params, buffers


def memplan_tensors(inventory: Inventory) -> tuple[Params, Buffers]:
    params = [(t.name, t.shape) for t in inventory.parameters]
    buffers = [(t.name, t.shape, t.dtype, t.persistent) for t in inventory.buffers]
    return params, buffers


def check(config: dict[str, Any]) -> Inventory:
    """Build both sides and assert they agree exactly; return memplan's inventory."""
    model = hf_model(config)
    inventory = from_config(config)
    params, buffers = hf_tensors(model)
    want_params, want_buffers = memplan_tensors(inventory)
    assert want_params == params
    assert want_buffers == buffers
    assert inventory.num_parameters == sum(p.numel() for p in model.parameters())

    listed = {name for name, _ in params}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - listed
    assert {alias for alias, _ in inventory.tied} == aliases
    for alias, owner in inventory.tied:
        assert owner in listed
        assert model.get_parameter(alias) is model.get_parameter(owner)

    for t in (*inventory.parameters, *inventory.buffers):
        assert t.role, t.name
    return inventory


def small(model_type: str, **overrides: Any) -> dict[str, Any]:
    """A small config of `model_type` (the family's own keys), with `overrides`."""
    return {"model_type": model_type, **_SMALL[model_type], **overrides}


_SMALL: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 101, "n_positions": 48},
    "gpt_neox": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "vocab_size": 103,
        "max_position_embeddings": 64,
    },
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 97, "n_positions": 40},
    "opt": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 80,
        "vocab_size": 99,
        "max_position_embeddings": 30,
    },
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 90},
    "falcon": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "vocab_size": 111,
        "max_position_embeddings": 32,
    },
    "bert": {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 72,
        "vocab_size": 105,
        "max_position_embeddings": 36,
    },
    "roberta": {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 72,
        "vocab_size": 105,
        "max_position_embeddings": 38,
        "type_vocab_size": 1,
    },
    "t5": {
        "d_model": 32,
        "d_kv": 12,
        "d_ff": 56,
        "num_layers": 3,
        "num_heads": 4,
        "vocab_size": 77,
        "relative_attention_num_buckets": 8,
    },
}

CASES: dict[str, dict[str, Any]] = {
    "gpt2-default": small("gpt2"),
    "gpt-sw3-default": {**small("gpt2"), "model_type": "gpt-sw3"},
    "gpt2-untied-ninner": small("gpt2", tie_word_embeddings=False, n_inner=100),
    "gpt2-aliases-null-inner": {
        "model_type": "gpt2",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "max_position_embeddings": 20,
        "vocab_size": 50,
        "n_inner": None,
    },
    "gpt2-model": small("gpt2", architectures=["GPT2Model"]),
    "gpt2-cross-attention": small("gpt2", add_cross_attention=True),
    "gpt2-double-heads": small("gpt2", architectures=["GPT2DoubleHeadsModel"]),
    "gpt2-double-heads-hidden-summary": small(
        "gpt2", architectures=["GPT2DoubleHeadsModel"], summary_proj_to_labels=False
    ),
    "gpt2-seq-cls": small(
        "gpt2",
        architectures=["GPT2ForSequenceClassification"],
        id2label={"0": "a", "1": "b", "2": "c"},
    ),
    "gpt2-token-cls": small("gpt2", architectures=["GPT2ForTokenClassification"], num_labels=5),
    "gpt2-qa": small("gpt2", architectures=["GPT2ForQuestionAnswering"]),
    # gpt_neox
    "neox-default": small("gpt_neox"),
    "neox-tied-no-bias-rotary-pct": small(
        "gpt_neox", tie_word_embeddings=True, attention_bias=False, rotary_pct=0.5
    ),
    "neox-rope-scaling-odd-rotary": small(
        "gpt_neox",
        rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.3},
    ),
    "neox-model": small("gpt_neox", architectures=["GPTNeoXModel"]),
    "neox-seq-cls": small("gpt_neox", architectures=["GPTNeoXForSequenceClassification"]),
    "neox-token-cls": small(
        "gpt_neox", architectures=["GPTNeoXForTokenClassification"], num_labels=7
    ),
    "neox-qa": small("gpt_neox", architectures=["GPTNeoXForQuestionAnswering"]),
    # gptj
    "gptj-default": small("gptj"),
    "gptj-tied-odd-rotary-inner": small("gptj", tie_word_embeddings=True, rotary_dim=5, n_inner=72),
    "gptj-zero-rotary": small("gptj", rotary_dim=0),
    "gptj-model": small("gptj", architectures=["GPTJModel"]),
    "gptj-seq-cls": small("gptj", architectures=["GPTJForSequenceClassification"], num_labels=3),
    "gptj-qa": small("gptj", architectures=["GPTJForQuestionAnswering"]),
    # opt
    "opt-default": small("opt"),
    "opt-350m-like-projections": small(
        "opt", word_embed_proj_dim=32, do_layer_norm_before=False, tie_word_embeddings=False
    ),
    "opt-no-bias-no-affine": small("opt", enable_bias=False, layer_norm_elementwise_affine=False),
    "opt-removed-final-norm": small("opt", _remove_final_layer_norm=True),
    "opt-model": small("opt", architectures=["OPTModel"], word_embed_proj_dim=16),
    "opt-seq-cls": small(
        "opt", architectures=["OPTForSequenceClassification"], word_embed_proj_dim=16
    ),
    "opt-qa": small("opt", architectures=["OPTForQuestionAnswering"], word_embed_proj_dim=16),
    # bloom
    "bloom-default": small("bloom"),
    "bloom-untied-n-embed": small("bloom", n_embed=32, tie_word_embeddings=False),
    "bloom-aliases": {
        "model_type": "bloom",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "vocab_size": 60,
    },
    "bloom-model": small("bloom", architectures=["BloomModel"]),
    "bloom-seq-cls": small("bloom", architectures=["BloomForSequenceClassification"]),
    "bloom-token-cls": small("bloom", architectures=["BloomForTokenClassification"]),
    "bloom-qa": small("bloom", architectures=["BloomForQuestionAnswering"]),
    # falcon
    "falcon-7b-like-multi-query": small("falcon"),
    "falcon-multi-head-sequential-bias": small(
        "falcon", multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False
    ),
    "falcon-40b-like-new-arch-gqa": small(
        "falcon", new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=100
    ),
    "falcon-new-arch-one-norm": small(
        "falcon", new_decoder_architecture=True, num_kv_heads=4, num_ln_in_parallel_attn=1
    ),
    "falcon-new-arch-sequential": small(
        "falcon", new_decoder_architecture=True, parallel_attn=False, num_kv_heads=8
    ),
    "falcon-alibi-multi-query-null": small("falcon", alibi=True, multi_query=None),
    "falcon-old-arch-two-norms": small("falcon", num_ln_in_parallel_attn=2),
    "falcon-model": small("falcon", architectures=["FalconModel"]),
    "falcon-seq-cls": small("falcon", architectures=["FalconForSequenceClassification"]),
    "falcon-token-cls": small("falcon", architectures=["FalconForTokenClassification"]),
    "falcon-qa": small("falcon", architectures=["FalconForQuestionAnswering"]),
    # bert
    "bert-pretraining-default": small("bert"),
    "bert-mlm-untied": small("bert", architectures=["BertForMaskedLM"], tie_word_embeddings=False),
    "bert-lm-head-cross-attention": small(
        "bert", architectures=["BertLMHeadModel"], is_decoder=True, add_cross_attention=True
    ),
    "bert-model": small("bert", architectures=["BertModel"], type_vocab_size=3),
    "bert-nsp": small("bert", architectures=["BertForNextSentencePrediction"]),
    "bert-seq-cls": small(
        "bert",
        architectures=["BertForSequenceClassification"],
        id2label={"0": "neg", "1": "neutral", "2": "pos"},
    ),
    "bert-multiple-choice": small("bert", architectures=["BertForMultipleChoice"]),
    "bert-token-cls": small("bert", architectures=["BertForTokenClassification"], num_labels=9),
    "bert-qa": small("bert", architectures=["BertForQuestionAnswering"]),
    # roberta
    "roberta-mlm-default": small("roberta"),
    "roberta-mlm-untied": small("roberta", tie_word_embeddings=False),
    "roberta-causal-lm": small("roberta", architectures=["RobertaForCausalLM"], is_decoder=True),
    "roberta-model": small("roberta", architectures=["RobertaModel"]),
    "roberta-seq-cls": small(
        "roberta", architectures=["RobertaForSequenceClassification"], num_labels=4
    ),
    "roberta-multiple-choice": small("roberta", architectures=["RobertaForMultipleChoice"]),
    "roberta-token-cls": small("roberta", architectures=["RobertaForTokenClassification"]),
    "roberta-qa": small("roberta", architectures=["RobertaForQuestionAnswering"]),
    # t5
    "t5-default": small("t5"),
    "t5-v1_1-gated-untied-flag": small(
        "t5", feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
    "t5-asymmetric-decoder": small("t5", num_decoder_layers=1, feed_forward_proj="gated-silu"),
    "t5-one-layer": small("t5", num_layers=1),
    "t5-aliases": {
        "model_type": "t5",
        "hidden_size": 24,
        "head_dim": 6,
        "d_ff": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "vocab_size": 64,
    },
    "t5-model": small("t5", architectures=["T5Model"]),
    "t5-encoder": small("t5", architectures=["T5EncoderModel"]),
    "t5-seq-cls": small("t5", architectures=["T5ForSequenceClassification"], num_labels=3),
    "t5-token-cls": small("t5", architectures=["T5ForTokenClassification"]),
    "t5-qa": small("t5", architectures=["T5ForQuestionAnswering"]),
}


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_small_configs_match_transformers(config: dict[str, Any]) -> None:
    check(config)


@pytest.mark.parametrize("model_type", sorted(DEFAULT_CLASS))
def test_default_class_is_the_one_verify_builds(model_type: str) -> None:
    """A config naming no class: each family counts the class transformers' own Auto mapping
    gives, AutoModelForCausalLM's, else AutoModelForSeq2SeqLM's (T5), the class the meta
    inventory, the trace and `memplan verify` build (memplan/verify/trace/meta.py::_model_class),
    so estimate and verify describe one model (bert counted BertForPreTraining, +3.1% of
    parameters against the BertLMHeadModel verify stepped: docs/verify-sweep.md)."""
    hf_config = CONFIG_MAPPING[model_type]()
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM):
        if type(hf_config) in auto._model_mapping:
            expected = auto._model_mapping[type(hf_config)].__name__
            break
    assert DEFAULT_CLASS[model_type] == expected
    built = from_config({"model_type": model_type})
    assert built.architecture.extra["model_class"] == expected


def test_every_family_has_cases() -> None:
    families = {c["model_type"] for c in CASES.values()}
    assert families == set(DEFAULT_CLASS)
    assert families <= set(BY_MODEL_TYPE)


def test_unknown_class_falls_back_to_the_default_with_a_note() -> None:
    unknown = from_config(small("gpt2", architectures=["GPT2ForSomethingNew"]))
    default = from_config(small("gpt2"))
    assert unknown.parameters == default.parameters
    assert unknown.tied == default.tied
    assert any(
        "GPT2ForSomethingNew" in note and "GPT2LMHeadModel" in note for note in unknown.notes
    )


# Full-size public configs (verbatim config.json copies, see memplan/model/presets/SOURCES.md), with
# their published parameter counts: GPT-2 small 124,439,808 (GPT2LMHeadModel, lm_head tied),
# Pythia-160M 162,322,944 (Biderman et al. 2023, arXiv 2304.01373, Table 1 "total params"),
# bert-base-uncased as BertForMaskedLM 109,514,298 (BertModel 109,482,240 - pooler 590,592 +
# MLM transform 592,128 + vocabulary bias 30,522).
REFERENCE = {
    "gpt2.json": 124_439_808,
    "pythia-160m.json": 162_322_944,
    "bert-base-uncased.json": 109_514_298,
}


@pytest.mark.parametrize("file", REFERENCE)
def test_full_size_reference_configs(file: str) -> None:
    config = json.loads((HF_CONFIGS / file).read_text())
    inventory = check(config)
    assert inventory.num_parameters == REFERENCE[file]


@pytest.mark.parametrize("file", REFERENCE)
def test_presets_are_the_reference_configs(file: str) -> None:
    preset = Path(__file__).parent.parent / "memplan" / "model" / "presets" / file
    assert preset.read_bytes() == (HF_CONFIGS / file).read_bytes()


def test_architecture_facts() -> None:
    gpt2 = from_config(json.loads((HF_CONFIGS / "gpt2.json").read_text())).architecture
    assert gpt2 is not None
    assert (gpt2.hidden_size, gpt2.num_layers, gpt2.intermediate_size) == (768, 12, 3072)
    assert (gpt2.num_attention_heads, gpt2.head_dim, gpt2.max_position_embeddings) == (12, 64, 1024)

    pythia = from_config(json.loads((HF_CONFIGS / "pythia-160m.json").read_text()))
    assert pythia.architecture is not None
    assert pythia.architecture.extra["rotary_dim"] == 16  # 64 * rotary_pct 0.25
    assert [b.shape for b in pythia.buffers] == [(8,), (8,)]

    falcon = from_config(small("falcon", new_decoder_architecture=True, num_kv_heads=2))
    assert falcon.architecture is not None
    assert falcon.architecture.num_key_value_heads == 2
    multi_query = from_config(small("falcon")).architecture
    assert multi_query is not None
    assert multi_query.num_key_value_heads == 1  # Falcon-7B style: one shared k/v head

    t5 = from_config(small("t5", num_decoder_layers=2))
    assert t5.architecture is not None
    assert t5.architecture.num_layers == 3
    assert t5.architecture.extra["num_decoder_layers"] == 2
    assert t5.architecture.head_dim == 12
    layers = {t.layer for t in t5.parameters if t.name.startswith("decoder.block.")}
    assert layers == {3, 4}  # decoder blocks numbered after the 3 encoder blocks


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_block_tensors_carry_their_block_index(config: dict[str, Any]) -> None:
    """`layer` is the first index in the name; T5 decoder blocks follow the encoder's."""
    inventory = from_config(config)
    for t in (*inventory.parameters, *inventory.buffers):
        found = re.search(r"\.(\d+)\.", t.name)
        expected = None if found is None else int(found.group(1))
        if expected is not None and "decoder.block." in t.name:
            expected += inventory.num_layers
        assert t.layer == expected, t.name


def test_bert_cross_attention_needs_a_decoder() -> None:
    with pytest.raises(MemplanError, match="add_cross_attention needs is_decoder"):
        from_config(small("bert", add_cross_attention=True))


def test_large_inventory_builds_fast() -> None:
    # BLOOM-176B shape: 70 blocks of 14336; the bound is loose (a 2-core CI runner).
    config = small("bloom", hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880)
    start = time.perf_counter()
    inventory = from_config(config)
    elapsed = time.perf_counter() - start
    assert inventory.num_parameters == 176_247_271_424
    assert elapsed < 0.05
