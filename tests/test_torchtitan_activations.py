"""`model.implementation: torchtitan`: the saved-tensor rule of torchtitan's own Llama 3
(memplan.model.stacks.torchtitan) against torchtitan's real model on CPU, to the byte, with no
checkpointing, its FullAC, its per-op SelectiveAC (`selective-op`) and every-Nth-layer full
checkpointing (`checkpoint_every`), in fp32 and bf16 (tests/torchtitan_probe.py measures).

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
from memplan.report.estimate import estimate, setting_of
from memplan.report.json import estimate_json
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


def predicted(
    dtype: str, mode: str, *, layers: int = 2, batch: int = 2, every: int = 1, fused: bool = True
) -> int:
    spec = make_spec(
        model={"architecture": tiny(layers), "implementation": "torchtitan"},
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
    inv = from_config(tiny(layers))
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
