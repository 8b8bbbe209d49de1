"""`model.implementation: megatron-core`: the saved-tensor rule of Megatron-Core's GPTModel
(memplan.model.stacks.megatron) against Megatron-Core 0.12.0's real model on CPU, to the byte,
with its local layer spec, no recompute, full recompute (uniform, one layer per checkpoint) and
selective recompute (core_attn), in fp32 and bf16 (memplan/verify/megatron_core.py measures).

The oracle is Megatron-Core's own code (`pip install --no-deps megatron-core==0.12.0`); the full
matrix is benchmarks/megatron_activations.py (benchmarks/results/megatron-activations.json).
The TE spec cannot run here (Transformer Engine needs CUDA): its rule is only checked against
Megatron-LM's own theoretical formula (a source check, not a proof). The rest of this file needs
no torch: the spec keys, refusals, the report's keys.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan import activations
from memplan.errors import MemplanError
from memplan.model.forward.tensors import Setting
from memplan.model.sources import from_config
from memplan.model.stacks import megatron
from memplan.report.estimate import estimate
from memplan.report.json import estimate_json
from memplan.report.settings import setting_of
from tests.conftest import make_spec, micro_batch_of

FFN, VOCAB = 192, 256


def tiny(layers: int = 2, kv_heads: int = 2) -> dict[str, Any]:
    """The shape memplan.verify.megatron_core.Shape builds, as a config memplan reads."""
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
    }


def megatron_spec(arch: dict[str, Any], **training: Any) -> Any:
    return make_spec(
        model={"architecture": arch, "implementation": "megatron-core"},
        training={"micro_batch_size": 2, "sequence_length": 16, **training},
        parallelism={"engine": "megatron", "data": 8, "zero_stage": 1},
        hardware={"device": "cpu"},
    )


CASES = [
    # dtype, recompute, batch, kv_heads, dropout
    ("fp32", "none", 2, 2, False),
    ("bf16", "none", 2, 2, False),
    ("bf16", "full", 2, 2, False),
    ("bf16", "selective", 2, 2, False),
    ("bf16", "none", 2, 4, False),  # no GQA: v keeps linear_qkv's whole output
    ("bf16", "selective", 1, 2, True),  # dropout: CPU noise tensors
]


@pytest.mark.parametrize(("dtype", "mode", "batch", "kv", "dropout"), CASES)
def test_rule_matches_megatron_core_to_the_byte(
    dtype: str, mode: str, batch: int, kv: int, dropout: bool
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held

    measured = held(dtype, Shape(batch=batch, kv_heads=kv), mode, dropout=0.1 if dropout else 0.0)
    spec = make_spec(
        model={"architecture": tiny(kv_heads=kv), "implementation": "megatron-core"},
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
            "dropout": dropout,
        },
        hardware={"device": "cpu"},
    )
    st = setting_of(spec)
    assert not st.autocast  # Float16Module: the model runs in the compute dtype
    saved = activations.predict(from_config(tiny(kv_heads=kv)), st)
    assert saved.modelled, saved.notes
    assert saved.bytes == measured.bytes


def test_tensor_parallel_rule_matches_megatron_core_on_two_ranks() -> None:
    """Over two TP ranks (gloo, one process each: memplan.verify.megatron_core.
    held_tensor_parallel), every rank holds what the rule says for one TP rank (heads, kv
    heads, ffn and vocabulary rows / 2, VocabParallelEmbedding's mask), to the byte, in each
    setting of CASES (the full matrix: benchmarks/megatron_activations.py)."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held_tensor_parallel

    cases = [
        (dtype, Shape(batch=batch, kv_heads=kv), mode, 0.1 if dropout else 0.0)
        for dtype, mode, batch, kv, dropout in CASES
    ]
    measured = held_tensor_parallel(cases, 2)
    for (dtype, mode, batch, kv, dropout), ranks in zip(CASES, measured, strict=True):
        spec = make_spec(
            model={"architecture": tiny(kv_heads=kv), "implementation": "megatron-core"},
            precision="fp32" if dtype == "fp32" else "bf16-mixed",
            training={
                "micro_batch_size": batch,
                "sequence_length": 16,
                "activation_checkpointing": mode,
                "dropout": dropout,
            },
            parallelism={"engine": "megatron", "tensor": 2, "sequence_parallel": False},
            hardware={"device": "cpu"},
        )
        saved = estimate(spec, from_config(tiny(kv_heads=kv))).activations
        assert saved.modelled, saved.notes
        # gloo's race (memplan.verify.megatron_core._held): a worker thread may still hold the
        # loss's last all-reduced [tokens] fp32 tensor on one rank; another rank of the same
        # run then measures the prediction exactly (the rule test_verify_tp follows).
        race = batch * 16 * 4
        measured = [rank.bytes for rank in ranks]
        assert saved.bytes in measured, (dtype, mode, batch, kv, dropout, measured)
        assert set(measured) <= {saved.bytes, saved.bytes + race}, measured


def test_local_spec_sequence_parallel_is_refused_as_megatron_refuses_it() -> None:
    """Megatron-Core's local spec asserts no sequence parallelism (its torch norms:
    SRC_NO_SP_LOCAL); the TE spec is split by it."""
    inv = from_config(tiny())
    for spec_name, modelled in (("local", False), ("te", True)):
        spec = make_spec(
            model={"architecture": tiny(), "implementation": "megatron-core",
                   "megatron_spec": spec_name},
            parallelism={"engine": "megatron", "tensor": 2, "sequence_parallel": True},
            hardware={"device": "cuda"},
        )  # fmt: skip
        saved = estimate(spec, inv).activations
        assert saved.modelled is modelled, saved.notes
        if not modelled:
            assert "sequence parallelism" in saved.notes[0]


def _llama_like(h: int, a: int, ffn: int, vocab: int) -> dict[str, Any]:
    return {
        **tiny(),
        "hidden_size": h,
        "intermediate_size": ffn,
        "num_attention_heads": a,
        "num_key_value_heads": a,
        "vocab_size": vocab,
        "num_hidden_layers": 4,
    }


def test_source_check_te_rule_against_megatron_theoretical_memory() -> None:
    """A source check, not a proof: the TE rule's layer against the formula Megatron-LM prints
    for itself (theoretical_memory_usage.py::compute_activation_memory, transcribed in
    benchmarks/peers/megatron.py: `s b h (18 + 4 ffn / h)`, Korthikanti et al. 2022 Table 2
    without the attention scores). The formula assumes 16-bit activations, dropout on (a
    1-byte mask after attention and after the MLP), multi-head attention and a GeLU MLP (fc1's
    [t, ffn] output and the GeLU's output: 4 ffn bytes a token), and leaves out the per-token
    statistics. The TE rule at that setting (dropout on, kv heads = heads), less the SwiGLU's
    second fc1 half (2 ffn bytes a token: its fc1 output is [t, 2 ffn]), less what the formula
    does not see of the storage (v is a view of linear_qkv's [t, 3h] output, which saving v
    keeps whole: 4 h bytes a token beyond v's own 2 h), less the fp32 statistics (two rsigma
    [t], softmax_lse [b, a, s]) and the rng state, must equal it."""
    from benchmarks.peers import megatron as theoretical

    h, a, ffn, vocab, s, b = 4096, 32, 14336, 128256, 4096, 1
    model = {
        "architecture": _llama_like(h, a, ffn, vocab),
        "implementation": "megatron-core",
        "megatron_spec": "te",
    }
    spec = make_spec(
        model=model,
        training={"micro_batch_size": b, "sequence_length": s, "dropout": True},
        hardware={"device": "cuda"},
    )
    saved = activations.predict(from_config(_llama_like(h, a, ffn, vocab)), setting_of(spec))
    assert saved.modelled, saved.notes
    layer = saved.block("layers")
    assert layer is not None
    args = theoretical.Args(
        hidden_size=h,
        ffn_hidden_size=ffn,
        num_layers=4,
        num_attention_heads=a,
        num_query_groups=a,
        kv_channels=h // a,
        padded_vocab_size=vocab,
        swiglu=True,
        normalization="RMSNorm",
        untie_embeddings_and_output_weights=True,
        seq_length=s,
        micro_batch_size=b,
    )
    t = s * b
    swiglu_extra = 2 * ffn * t
    qkv_storage = 4 * h * t
    stats = 2 * 4 * t + 4 * b * a * s + 8 * 2
    expected = theoretical.compute_activation_memory_per_layer(args)
    assert layer.bytes_each - swiglu_extra - qkv_storage - stats == expected


def test_te_spec_needs_cuda_and_local_is_the_default() -> None:
    arch = tiny()
    spec = megatron_spec(arch)
    assert spec.model.megatron_spec is None
    assert setting_of(spec).megatron_spec == "local"
    te = make_spec(
        model={"architecture": arch, "implementation": "megatron-core", "megatron_spec": "te"},
        hardware={"device": "cpu"},
    )
    saved = activations.predict(from_config(arch), setting_of(te))
    assert not saved.modelled
    assert "only on CUDA" in saved.notes[0]
    assert saved.implementation == "megatron-core"


def test_megatron_spec_without_megatron_core_is_refused() -> None:
    with pytest.raises(MemplanError, match="megatron_spec"):
        make_spec(model={"architecture": tiny(), "megatron_spec": "te"})


def test_expert_parallel_and_lora_are_refused() -> None:
    inv = from_config(tiny())
    ep = make_spec(
        model={"architecture": tiny(), "implementation": "megatron-core"},
        parallelism={"engine": "megatron", "expert": 2, "data": 2},
    )
    saved = micro_batch_of(ep, inv)
    assert not saved.modelled and "expert = 1" in saved.notes[0]
    lora = make_spec(
        model={"architecture": tiny(), "implementation": "megatron-core"},
        finetune={"method": "lora"},
    )
    saved = micro_batch_of(lora, inv)
    assert not saved.modelled and "LoRA" in saved.notes[0]


def test_torchtitan_checkpointing_modes_are_refused() -> None:
    arch = tiny()
    spec = megatron_spec(arch, activation_checkpointing="selective-op")
    saved = activations.predict(from_config(arch), setting_of(spec))
    assert not saved.modelled and "torchtitan's" in saved.notes[0]


def test_report_names_the_implementation_and_spec() -> None:
    arch = tiny()
    doc = estimate_json(estimate(megatron_spec(arch), from_config(arch)))
    assert doc["activations"]["implementation"] == "megatron-core"
    assert doc["activations"]["megatron_spec"] == "local"
    assert doc["activations"]["modelled"] is True
    plain = estimate_json(estimate(make_spec(), from_config(arch)))
    assert plain["activations"]["megatron_spec"] is None


def test_pin_llama31_8b_te_layer_per_token() -> None:
    """Pinning (the rule's own arithmetic): one Llama 3.1 8B layer, TE spec, bf16, no dropout,
    per token: x and ln_out twice (4 x 2 h), linear_qkv's output (2 (32 + 8 + 8) 128, held by
    v), q (2 x 32 x 128), k (2 x 8 x 128), out (2 h), fc1's output (2 x 2 ffn), fc2's input
    (2 ffn), two rsigma (2 x 4), lse (4 a), plus the rng state over the tokens."""
    h, ffn = 4096, 14336
    st = Setting(
        batch=1,
        sequence=8192,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cuda",
        attention="sdpa",
        dropout=False,
        checkpointing="none",
        implementation="megatron-core",
        megatron_spec="te",
    )
    cfg = {**_llama_like(h, 32, ffn, 128256), "num_key_value_heads": 8}
    arch = from_config(cfg).architecture
    assert arch is not None
    layer = megatron.saved(arch, st, "te").block("layers")
    assert layer is not None
    per_token = 8 * h + 2 * 48 * 128 + 2 * 40 * 128 + 2 * h + 4 * ffn + 2 * ffn + 8 + 4 * 32
    assert layer.bytes_each == per_token * 8192 + 16


def test_pin_te_context_parallel_saves_what_the_ring_attention_keeps() -> None:
    """A pinning test (the TE spec cannot run here; the rule is read from Transformer Engine's
    AttnFuncWithCPAndKVP2P, SRC_TE_CP): over CP ranks the layer is the rule at sequence / CP
    less linear_qkv's output and the roped k (the attention no longer saves v, a view of it),
    plus the last received [2, tokens, kv x head dim] chunk and one rng state per further ring
    step; the local spec, whose attention refuses CP, is refused."""
    arch = tiny()
    inv = from_config(arch)

    def layer(cp: int, seq: int, spec_name: str = "te") -> Any:
        spec = make_spec(
            model={"architecture": arch, "implementation": "megatron-core",
                   "megatron_spec": spec_name},
            training={"micro_batch_size": 2, "sequence_length": seq, "attention": "sdpa"},
            parallelism={"engine": "megatron", "context": cp},
            hardware={"device": "cuda"},
        )  # fmt: skip
        return estimate(spec, inv).activations

    ring, plain = layer(2, 32), layer(1, 16)
    assert ring.modelled, ring.notes
    got = {t.name: t.bytes for t in ring.block("layers").tensors}
    want = {t.name: t.bytes for t in plain.block("layers").tensors}
    tokens, kv_width = 2 * 16, 2 * 16  # batch x sequence / CP; kv heads x head dim
    assert set(want) - set(got) == {"linear_qkv.output", "attn.k"}
    assert got["attn.kv_chunk"] == 2 * tokens * kv_width * 2  # bf16
    assert got["attn.rng_state_ring"] == 2 * 8  # CP - 1 further steps, 2 int64 each
    assert all(got[n] == b for n, b in want.items() if n in got)
    local = layer(2, 32, "local")
    assert not local.modelled and "context parallelism" in local.notes[0]
