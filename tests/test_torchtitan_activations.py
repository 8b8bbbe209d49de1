"""`model.implementation: torchtitan`: the saved-tensor rule of torchtitan's own Llama 3 and
dense Qwen3 (memplan.model.stacks.torchtitan) against torchtitan's real models on CPU, to the
byte, with no checkpointing, its FullAC, its per-op SelectiveAC (`selective-op`) and
every-Nth-layer full checkpointing (`checkpoint_every`), in fp32 and bf16
(tests/torchtitan_probe.py measures).

The oracle is torchtitan 0.3.0's own code (`pip install torchtitan==0.3.0` and its imports:
spmd_types, tyro, einops, docstring_parser, torch_checkpointing); the full matrix is
benchmarks/torchtitan_activations.py (benchmarks/results/torchtitan-activations.json). The rest
of this file needs no torch: refusals, the spec keys, the report's `implementation` key.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan import activations
from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.json import estimate_json
from memplan.report.settings import setting_of
from tests.conftest import make_spec, micro_batch_of

FFN, VOCAB = 192, 256


def tiny(layers: int = 2) -> dict[str, Any]:
    """The shape tests/torchtitan_probe.py builds, as a config memplan reads."""
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
    }


def qwen3(
    layers: int = 2, *, head_dim: int = 32, tied: bool = True, dim: int = 64, heads: int = 4
) -> dict[str, Any]:
    """tests/torchtitan_probe.py's Qwen3 shapes as a Hugging Face Qwen3 config (QWEN3_TINY:
    Qwen3-0.6B's structure, heads x head_dim = 2 x hidden, tied embeddings)."""
    return {
        **tiny(layers),
        "model_type": "qwen3",
        "hidden_size": dim,
        "num_attention_heads": heads,
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
    }


def predicted(
    dtype: str,
    mode: str,
    *,
    layers: int = 2,
    batch: int = 2,
    every: int = 1,
    fused: bool = True,
    config: dict[str, Any] | None = None,
) -> int:
    cfg = tiny(layers) if config is None else config
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
            "checkpoint_every": every,
        },
        parallelism={"engine": "fsdp2", "data": 8},
        hardware={"device": "cpu"},
    )
    st = setting_of(spec)
    assert not st.autocast  # torchtitan under FSDP2: param_dtype, no autocast
    inv = from_config(cfg)
    if fused:
        saved = activations.predict(inv, st)
    else:
        from memplan.model.stacks import torchtitan

        saved = torchtitan.saved(inv.architecture, st, fused_qkv=False)  # type: ignore[arg-type]
    assert saved.modelled, saved.notes
    assert saved.implementation == "torchtitan"
    return saved.bytes


CASES = [
    # dtype, mode, layers, batch, every, fused
    ("fp32", "none", 2, 2, 1, True),
    ("bf16", "none", 2, 2, 1, True),
    ("fp32", "full", 2, 2, 1, True),
    ("bf16", "full", 2, 2, 1, True),
    ("fp32", "selective-op", 2, 2, 1, True),
    ("bf16", "selective-op", 2, 2, 1, True),
    ("bf16", "selective-op", 2, 1, 1, True),
    ("bf16", "selective-op", 2, 2, 1, False),  # 9dec370's wq, wk, wv: other mms saved
    ("fp32", "full", 4, 2, 2, True),  # every 2nd layer checkpointed
    ("bf16", "full", 3, 2, 3, True),
]


@pytest.mark.parametrize(("dtype", "mode", "layers", "batch", "every", "fused"), CASES)
def test_rule_matches_torchtitan_to_the_byte(
    dtype: str, mode: str, layers: int, batch: int, every: int, fused: bool
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.llama3")
    from tests.torchtitan_probe import Shape, held_bytes

    shape = Shape(layers=layers, batch=batch, fused_qkv=fused)
    measured = held_bytes(dtype, mode, shape, every)
    assert predicted(dtype, mode, layers=layers, batch=batch, every=every, fused=fused) == measured


@pytest.mark.parametrize("mode", ["none", "full", "selective-op"])
def test_rule_matches_torchtitan_at_the_8b_shape_under_fake_tensors(mode: str) -> None:
    """Two blocks of Llama 3.1 8B (dim 4096, 32 heads, 8 k/v heads, ffn 14336, vocab 128256)
    at 2 x 8192 tokens, bf16, CPU kernels, under FakeTensorMode: the shapes at scale."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.llama3")
    from tests.torchtitan_probe import LLAMA31_8B, held_bytes_fake

    cfg = {
        **tiny(2),
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    }
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={"micro_batch_size": 2, "sequence_length": 8192, "activation_checkpointing": mode},
        parallelism={"engine": "fsdp2", "data": 8},
        hardware={"device": "cpu"},
    )
    saved = activations.predict(from_config(cfg), setting_of(spec))
    assert saved.bytes == held_bytes_fake("bf16", mode, LLAMA31_8B)


QWEN3_CASES = [
    # dtype, mode, layers, batch, every, fused, head_dim, tied
    ("fp32", "none", 2, 2, 1, True, 32, True),
    ("bf16", "none", 2, 1, 1, True, 32, True),
    ("bf16", "full", 2, 2, 1, True, 32, True),
    ("fp32", "selective-op", 2, 2, 1, True, 32, True),
    ("bf16", "selective-op", 3, 2, 1, False, 32, False),  # wq, wk, wv; untied
    ("bf16", "selective-op", 2, 2, 1, True, 16, False),  # heads x head_dim = hidden (8B)
    ("fp32", "full", 4, 2, 2, True, 32, True),  # every 2nd layer checkpointed
]


@pytest.mark.parametrize(
    ("dtype", "mode", "layers", "batch", "every", "fused", "head_dim", "tied"), QWEN3_CASES
)
def test_qwen3_rule_matches_torchtitan_to_the_byte(
    dtype: str,
    mode: str,
    layers: int,
    batch: int,
    every: int,
    fused: bool,
    head_dim: int,
    tied: bool,
) -> None:
    """torchtitan 0.3.0's real Qwen3Model (models/qwen3: q_norm / k_norm, explicit head_dim,
    CosSinRoPE, tied or not) against the rule; the whole matrix is
    benchmarks/torchtitan_activations.py."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.torchtitan_probe import Shape, held_bytes

    shape = Shape(
        layers=layers, batch=batch, fused_qkv=fused, model="qwen3", head_dim=head_dim, tied=tied
    )
    measured = held_bytes(dtype, mode, shape, every)
    cfg = qwen3(layers, head_dim=head_dim, tied=tied)
    rule = predicted(dtype, mode, layers=layers, batch=batch, every=every, fused=fused, config=cfg)
    assert rule == measured


QWEN3_32B = {
    "model_type": "qwen3",
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 2,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
}
"""Qwen3-32B's shapes (torchtitan 0.3.0 models/qwen3/__init__.py::_32b; Qwen/Qwen3-32B
config.json), two layers: 64 x 128 = 8192 attention width on a 5120 residual stream."""


@pytest.mark.parametrize("mode", ["none", "full", "selective-op"])
def test_qwen3_rule_matches_torchtitan_at_the_32b_shape_under_fake_tensors(mode: str) -> None:
    """Two blocks of Qwen3-32B at 2 x 8192 tokens, bf16, CPU kernels, under FakeTensorMode."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.torchtitan_probe import Shape, held_bytes_fake

    shape = Shape(
        layers=2,
        batch=2,
        seq=8192,
        dim=5120,
        heads=64,
        kv_heads=8,
        ffn=25600,
        vocab=151936,
        model="qwen3",
        head_dim=128,
    )
    spec = make_spec(
        model={"architecture": QWEN3_32B, "implementation": "torchtitan"},
        training={"micro_batch_size": 2, "sequence_length": 8192, "activation_checkpointing": mode},
        parallelism={"engine": "fsdp2", "data": 8},
        hardware={"device": "cpu"},
    )
    saved = activations.predict(from_config(QWEN3_32B), setting_of(spec))
    assert saved.modelled, saved.notes
    assert saved.bytes == held_bytes_fake("bf16", mode, shape)


def _qwen3_spec(cfg: dict[str, Any], **overrides: Any) -> Any:
    parallelism = {"engine": "fsdp2", "data": 8, **overrides.pop("parallelism", {})}
    return make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism=parallelism,
        **overrides,
    )


def test_qwen3_refusals_name_what_torchtitan_does_not_run() -> None:
    """A sliding window (torchtitan's Qwen3 has none) is refused with its reason; tensor
    parallelism (tests/test_torchtitan_tp_activations.py), context parallelism and
    training.compile (tests/test_compile_layers.py) are modelled (Qwen3-MoE:
    tests/test_torchtitan_moe.py)."""
    window = {**qwen3(), "use_sliding_window": True, "sliding_window": 8}
    saved = micro_batch_of(_qwen3_spec(window), from_config(window))
    assert not saved.modelled and "sliding-window" in saved.notes[0]
    inv = from_config(qwen3())
    compiled = _qwen3_spec(qwen3(), training={"compile": True})
    assert micro_batch_of(compiled, inv).modelled
    tp = _qwen3_spec(qwen3(), parallelism={"data": 4, "tensor": 2})
    saved = micro_batch_of(tp, inv)
    assert saved.modelled and saved.implementation == "torchtitan"
    cp = _qwen3_spec(qwen3(), parallelism={"data": 4, "context": 2})
    assert micro_batch_of(cp, inv).modelled


def test_qwen3_report_names_the_implementation() -> None:
    report = estimate(_qwen3_spec(qwen3()), from_config(qwen3()))
    doc = estimate_json(report)
    assert doc["activations"]["implementation"] == "torchtitan"
    assert doc["activations"]["modelled"] is True
    assert any("Qwen3 model code" in n for n in report.activations.notes)


def test_pin_qwen3_32b_layer_on_cuda_adds_the_qk_norms() -> None:
    """Pinning (the rule's arithmetic, from torchtitan's source): one Qwen3-32B block without
    checkpointing on CUDA, bf16, 2 x 8192 tokens, holds what the same shape's Llama-style
    block holds plus q_norm's and k_norm's fused-kernel input (bf16) and rstd (fp32) per
    head: [t, 64, 128] and [t, 8, 128]."""
    cfg = {**QWEN3_32B, "num_hidden_layers": 64}
    training = {"micro_batch_size": 2, "sequence_length": 8192}
    qwen = micro_batch_of(_qwen3_spec(cfg, training=training), from_config(cfg))
    layers = qwen.block("layers")
    assert layers is not None and layers.count == 64
    t = 2 * 8192
    norms = {
        x.name: x.bytes for x in layers.tensors if "_norm." in x.name and "attention." in x.name
    }
    assert norms == {
        "attention.q_norm.input": t * 64 * 128 * 2,
        "attention.q_norm.rstd": t * 64 * 4,
        "attention.k_norm.input": t * 8 * 128 * 2,
        "attention.k_norm.rstd": t * 8 * 4,
    }


def test_a_transformers_profile_never_serves_torchtitan() -> None:
    """The dispatch is on the implementation before any profile lookup: a model_type with no
    torchtitan rule is refused, whatever profiles the inventory carries."""
    cfg = {**tiny(), "model_type": "qwen2"}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": 8},
    )
    saved = activations.predict(from_config(cfg), setting_of(spec))
    assert not saved.modelled
    assert saved.implementation == "torchtitan"
    assert "model_type 'qwen2' under model.implementation torchtitan" in saved.notes[0]


def test_selective_op_and_every_nth_refused_for_transformers() -> None:
    inv = from_config(tiny())
    op = setting_of(make_spec(training={"activation_checkpointing": "selective-op"}))
    assert "selective-op is torchtitan's" in activations.predict(inv, op).notes[0]
    every = make_spec(training={"activation_checkpointing": "full", "checkpoint_every": 2})
    assert "checkpoint_every > 1" in activations.predict(inv, setting_of(every)).notes[0]


def test_checkpoint_every_needs_full() -> None:
    with pytest.raises(MemplanError, match="checkpoint_every"):
        make_spec(training={"checkpoint_every": 2})


def test_torchtitan_under_autocast_is_refused() -> None:
    """torchtitan without FSDP2 sharding (one device) runs torch.autocast: not modelled."""
    spec = make_spec(
        model={"architecture": tiny(), "implementation": "torchtitan"}, precision="amp-bf16"
    )
    saved = activations.predict(from_config(tiny()), setting_of(spec))
    assert not saved.modelled and "autocast" in saved.notes[0]


def test_report_names_the_implementation() -> None:
    spec = make_spec(
        model={"architecture": tiny(), "implementation": "torchtitan"},
        training={"activation_checkpointing": "selective-op"},
        parallelism={"engine": "fsdp2", "data": 8},
    )
    report = estimate(spec, from_config(tiny()))
    doc = estimate_json(report)
    assert doc["activations"]["implementation"] == "torchtitan"
    assert doc["activations"]["modelled"] is True
    plain = estimate_json(estimate(make_spec(), from_config(tiny())))
    assert plain["activations"]["implementation"] == "transformers"


def test_pin_llama31_8b_selective_op_layer_on_cuda() -> None:
    """Pinning (the rule's own arithmetic, from torchtitan's source): one Llama 3.1 8B block
    under SelectiveAC on CUDA, bf16, 2 x 8192 tokens: the block input [t, 4096], the 1st, 3rd
    and 5th matmul outputs (wqkv [t, 6144], w1 [t, 14336], w2 [t, 4096]), the flash kernel's
    out [t, 4096], logsumexp [2, 32, 8192] fp32 and philox state (16 + 8 B)."""
    cfg = {
        **tiny(),
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        training={
            "micro_batch_size": 2,
            "sequence_length": 8192,
            "activation_checkpointing": "selective-op",
        },
        parallelism={"engine": "fsdp2", "data": 8},
    )
    saved = activations.predict(from_config(cfg), setting_of(spec))
    layers = saved.block("layers")
    assert layers is not None and layers.count == 32
    t = 2 * 8192
    expected = 2 * t * (4096 + 6144 + 14336 + 4096 + 4096) + 4 * 2 * 32 * 8192 + 16 + 8
    assert layers.bytes_each == expected == 1_075_839_000


def test_torchtitan_refuses_what_its_rule_does_not_split() -> None:
    """LoRA follows transformers' module names: refused, named. (Tensor and context
    parallelism are modelled: tests/test_torchtitan_tp_activations.py.)"""
    inv = from_config(tiny())
    tp = make_spec(
        model={"architecture": tiny(), "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": 4, "tensor": 2},
    )
    saved = micro_batch_of(tp, inv)
    assert saved.modelled and saved.implementation == "torchtitan"
    lora = make_spec(
        model={"architecture": tiny(), "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": 8},
        finetune={"method": "lora"},
    )
    saved = micro_batch_of(lora, inv)
    assert not saved.modelled and "LoRA" in saved.notes[0]
    assert saved.implementation == "torchtitan"


def test_tied_embeddings_under_pipeline_are_refused_as_torchtitan_refuses_them() -> None:
    """torchtitan 0.3.0 raises NotImplementedError for weight tying under pipeline parallelism
    (models/common/decoder.py::Decoder.Config.update_from_config, read from the installed
    package below): estimate refuses the job, naming parallelism.pipeline; untied, or one
    stage, it runs."""
    import inspect

    from torchtitan.models.common import decoder

    assert "Weight tying is not supported with Pipeline Parallel" in inspect.getsource(decoder)
    spec = _qwen3_spec(qwen3(4), parallelism={"data": 2, "pipeline": 2})
    with pytest.raises(MemplanError) as err:
        estimate(spec, from_config(qwen3(4)))
    assert err.value.field == "parallelism.pipeline" and "tied" in str(err.value)
    untied = qwen3(4, tied=False)
    assert estimate(spec, from_config(untied)).activations.modelled
