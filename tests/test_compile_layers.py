"""`training.compile` beyond Llama's layer: Qwen3's per-head q/k norms, Qwen2's (and a biased
Llama's) projection biases (memplan.model.forward.compiled, `llama_layer(qk_norm=...)`), against
what Inductor's partition keeps on the real layers.

The whole grid (torchtitan 0.3.0's Qwen3TransformerBlock under none / per-op SAC / full AC /
torchao Float8, transformers 5.25's Qwen3DecoderLayer and Qwen2DecoderLayer, bf16 and fp32, GQA
ratios 1 to 8, head_dim equal to and apart from hidden / heads) is traced by
benchmarks/compile_layers.py into benchmarks/results/compile-layers.json: the rule is checked
against every stored trace here (cheap), and a few cases are traced again live (a few seconds
each)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compile_layers as bench
from memplan.config.spec import Spec
from memplan.model.forward import compiled
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.conftest import micro_batch_of

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "compile-layers.json"


def _stored() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RESULTS.read_text())["cases"]
    return cases


def _counter(rows: list[list[Any]]) -> Counter[tuple[str, int]]:
    return Counter({(dtype, n): count for dtype, n, count in rows})


def test_rule_matches_every_stored_trace() -> None:
    """Each traced case of the grid (Inductor's partition of the real layer, stored) is the
    rule's tensor set at that shape, dtype and variant: the same (dtype, bytes per token)
    multiset, so the same bytes at every batch and sequence."""
    cases = _stored()
    assert len(cases) >= 50
    layers = {c["layer"] for c in cases}
    assert {
        "torchtitan Qwen3TransformerBlock",
        "transformers Qwen3DecoderLayer",
        "transformers Qwen2DecoderLayer",
        "transformers LlamaDecoderLayer",
        "transformers Olmo2DecoderLayer",
    } <= layers
    for case in cases:
        expected = bench.rule_per_token(case["dims"], case["dtype"], **case["rule"])
        assert _counter(case["traced"]) == expected, case
    # The grid spans what the rule claims: GQA ratios and head_dim apart from hidden / heads.
    ratios = {c["dims"]["heads"] // c["dims"]["kv_heads"] for c in cases}
    assert {1, 2, 5, 4, 8} <= ratios
    assert any(
        c["dims"]["head_dim"] * c["dims"]["heads"] != c["dims"]["hidden"]
        for c in cases
        if "Qwen3" in c["layer"]
    )


def _live(module: Any, inputs: Any, rope: Any) -> Counter[tuple[str, int]]:
    pytest.importorskip("torch")
    return bench.traced(module, inputs, rope)


SHAPE = bench.SHAPES["gqa2-d32"]


def test_torchtitan_qwen3_block_saves_what_inductor_partition_keeps() -> None:
    """torchtitan 0.3.0's Qwen3TransformerBlock compiled, traced now: the q/k-norm rule (its
    SAC, full AC and Float8 variants: the stored traces above)."""
    pytest.importorskip("torchtitan")
    plain = _live(*bench.qwen3_block(SHAPE, "bf16"))
    assert plain == bench.rule_per_token(SHAPE, "bf16", kind="none", qk_norm=True, float8=False)


def test_transformers_qwen3_and_qwen2_layers_save_what_inductor_partition_keeps() -> None:
    """transformers' Qwen3DecoderLayer with attention_bias (q/k norms and biases on all four
    projections) and Qwen2DecoderLayer (q/k/v biases), traced now: biases add nothing, the
    norms add their inputs and rstd."""
    pytest.importorskip("transformers")
    qwen3 = _live(*bench.hf_layer("qwen3", SHAPE, "bf16", attention_bias=True))
    assert qwen3 == bench.rule_per_token(SHAPE, "bf16", kind="none", qk_norm=True, float8=False)
    qwen2_shape = {**SHAPE, "head_dim": SHAPE["hidden"] // SHAPE["heads"]}
    qwen2 = _live(*bench.hf_layer("qwen2", qwen2_shape, "bf16"))
    assert qwen2 == bench.rule_per_token(
        qwen2_shape, "bf16", kind="none", qk_norm=False, float8=False
    )


def _case(layer: str, variant: str, shape: str, dtype: str = "bf16") -> dict[str, Any]:
    (case,) = (
        c
        for c in _stored()
        if (c["layer"], c["variant"], c["shape"], c["dtype"]) == (layer, variant, shape, dtype)
    )
    return case


_TINY_QWEN3 = {
    "model_type": "qwen3", "hidden_size": SHAPE["hidden"], "num_attention_heads": SHAPE["heads"],
    "num_key_value_heads": SHAPE["kv_heads"], "head_dim": SHAPE["head_dim"],
    "intermediate_size": SHAPE["inter"], "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
    "num_hidden_layers": 36, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 1000000,
}  # fmt: skip
"""huggingface.co/Qwen/Qwen3-8B config.json (the keys memplan reads)."""


def _layers(
    config: dict[str, Any],
    implementation: str,
    training: dict[str, Any],
    fp8: str,
    preset: str | None = None,
):
    batch, seq = 2, 256
    torchtitan = implementation == "torchtitan"
    preset = preset or ("bf16-mixed" if torchtitan else "bf16")
    spec = Spec.model_validate(
        {
            "model": {"architecture": config, "implementation": implementation},
            "precision": {"preset": preset, "fp8": fp8},
            "training": {"micro_batch_size": batch, "sequence_length": seq, **training},
            "parallelism": {"engine": "fsdp2", "data": 8} if torchtitan else {},
        }
    )
    acts = estimate(spec, from_config(config)).activations
    layers = acts.block("layers")
    assert layers is not None, acts.notes
    return layers.bytes_each // (batch * seq), acts


SAC = "selective-op"


@pytest.mark.parametrize(
    ("training", "fp8", "variant"),
    [
        ({"compile": True}, "none", "compile"),
        ({"compile": True}, "torchao-tensorwise", "float8 tensorwise + compile"),
        ({"compile": True}, "torchao-rowwise", "float8 rowwise + compile"),
        ({"compile": True, "activation_checkpointing": SAC}, "none", "per-op SAC + compile"),
        ({"compile": True, "activation_checkpointing": "full"}, "none", "full AC + compile"),
    ],
)  # fmt: skip
def test_torchtitan_qwen3_estimate_keeps_the_traced_block(
    training: dict[str, Any], fp8: str, variant: str
) -> None:
    """`model.implementation: torchtitan`, model_type qwen3, compile: each block keeps what the
    partition kept on torchtitan's own Qwen3 block at the same widths (stored trace)."""
    per_token, _ = _layers(_TINY_QWEN3, "torchtitan", training, fp8)
    case = _case("torchtitan Qwen3TransformerBlock", variant, "gqa2-d32")
    assert per_token == case["traced_per_token_bytes"]


def test_qwen3_8b_estimate_keeps_the_traced_layer() -> None:
    """Qwen3-8B compiled, transformers' code and torchtitan's alike: the per-token bytes
    Inductor's partition kept on the real layer at Qwen3-8B's widths (stored trace: 137,512)."""
    for implementation, layer in (
        ("transformers", "transformers Qwen3DecoderLayer"),
        ("torchtitan", "torchtitan Qwen3TransformerBlock"),
    ):
        per_token, acts = _layers(QWEN3_8B, implementation, {"compile": True}, "none")
        assert per_token == _case(layer, "compile", "qwen3-8b")["traced_per_token_bytes"]
        assert any("Inductor's min-cut partition" in n for n in acts.notes)
    assert per_token == 137_512


@pytest.mark.parametrize("model_type", ["qwen2", "olmo2"])
def test_transformers_estimate_keeps_the_traced_layer(model_type: str) -> None:
    """transformers' Qwen2 and OLMo 2 compiled (head_dim = hidden / heads): each layer keeps
    what the partition kept on the real layer at the same widths (stored trace); OLMo 2 with
    torchao Float8 is not traced: the eager set, and a note saying so."""
    config = {k: v for k, v in _TINY_QWEN3.items() if k != "head_dim"}
    config["model_type"] = model_type
    layer = {"qwen2": "Qwen2DecoderLayer", "olmo2": "Olmo2DecoderLayer"}[model_type]
    per_token, acts = _layers(config, "transformers", {"compile": True}, "none")
    assert (
        per_token == _case(f"transformers {layer}", "compile", "gqa2-d24")["traced_per_token_bytes"]
    )
    if model_type == "olmo2":
        eager, _ = _layers(config, "transformers", {}, "torchao-tensorwise")
        fp8, acts = _layers(config, "transformers", {"compile": True}, "torchao-tensorwise")
        assert fp8 == eager
        assert any("Float8 on OLMo 2" in n for n in acts.notes)


def test_pin_qwen3_qk_norm_terms() -> None:
    """Pinning (the rule's own arithmetic): q/k norms add w(ad + gd) + 4(a + g) per token to
    Llama's set, w (4h + 3ad + 3gd + 3f) + 8a + 4g + 8 in all."""
    dims = {"batch": 1, "seq": 1, "dtype": "bf16", **bench.QWEN3_8B}
    plain = sum(t.bytes for t in compiled.llama_layer(**dims))
    normed = sum(t.bytes for t in compiled.llama_layer(qk_norm=True, **dims))
    h, a, g, d, f = 4096, 32, 8, 128, 12288
    assert normed - plain == 2 * (a * d + g * d) + 4 * (a + g)
    assert normed == 2 * (4 * h + 3 * a * d + 3 * g * d + 3 * f) + 8 * a + 4 * g + 8


def test_compile_on_moe_layers_keeps_eager_and_says_why() -> None:
    """transformers' MoE layers are not traced under compile: they keep the eager set with a
    note naming MoE; torchtitan's Qwen3-MoE is traced at expert parallelism 1
    (tests/test_compile_moe.py) and under EP (tests/test_compile_moe_ep.py), and refused with
    the reason under EP with full checkpointing, where torch itself fails."""
    moe = {
        **_TINY_QWEN3, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 64, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }  # fmt: skip
    eager, _ = _layers(moe, "transformers", {}, "none")
    per_token, acts = _layers(moe, "transformers", {"compile": True}, "none")
    assert per_token == eager
    assert any("training.compile" in n and "MoE layers" in n for n in acts.notes)
    spec = Spec.model_validate(
        {
            "model": {"architecture": moe, "implementation": "torchtitan"},
            "precision": "bf16-mixed",
            "training": {
                "micro_batch_size": 1,
                "sequence_length": 64,
                "compile": True,
                "activation_checkpointing": "full",
            },
            "parallelism": {"engine": "fsdp2", "data": 4, "expert": 2},
        }
    )
    saved = micro_batch_of(spec, from_config(moe))
    assert not saved.modelled
    assert "training.compile" in saved.notes[0] and "Qwen3-MoE" in saved.notes[0]
    assert "expert parallelism" in saved.notes[0]


def test_compile_where_cuda_runs_another_sdpa_kernel_keeps_eager_and_says_why() -> None:
    """The traces ran the flash kernel's saved set; on CUDA fp32 gets the memory-efficient or
    (grouped kv heads) the math kernel, and so does a head_dim flash refuses (not a multiple
    of 8): the eager set stands, with the kernel named; torchtitan refuses it."""
    eager, _ = _layers(_TINY_QWEN3, "transformers", {}, "none", preset="fp32")
    per_token, acts = _layers(_TINY_QWEN3, "transformers", {"compile": True}, "none", "fp32")
    assert per_token == eager
    assert any("training.compile" in n and "SDPA's math kernel" in n for n in acts.notes)
    odd = {**_TINY_QWEN3, "head_dim": 20}
    eager, _ = _layers(odd, "transformers", {}, "none")
    per_token, acts = _layers(odd, "transformers", {"compile": True}, "none")
    assert per_token == eager
    assert any("SDPA's math kernel (bf16, head_dim 20 on cuda)" in n for n in acts.notes)
    spec = Spec.model_validate(
        {
            "model": {"architecture": odd, "implementation": "torchtitan"},
            "precision": "bf16-mixed",
            "training": {"micro_batch_size": 1, "sequence_length": 64, "compile": True},
            "parallelism": {"engine": "fsdp2", "data": 8},
        }
    )
    saved = micro_batch_of(spec, from_config(odd))
    assert not saved.modelled and "flash kernel" in saved.notes[0]
