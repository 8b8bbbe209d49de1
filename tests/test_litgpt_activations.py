"""`model.implementation: litgpt`: the saved-tensor rule of LitGPT's own GPT
(memplan.model.stacks.litgpt) against litgpt 0.5.9's real model on CPU, run by Lightning
Fabric's own precision plugins, to the byte (tests/litgpt_probe.py measures): no checkpointing
and LitGPT's per-Block checkpointing, 32-true / bf16-true / bf16-mixed, grouped, multi-head
and multi-query attention, the 128-token loss chunks; and at Llama 3.1 8B's shape under
FakeTensorMode. LitGPT's other architectures the rule covers (Qwen2.5, Mistral, Phi-3, Gemma,
Gemma 2, Pythia, Falcon, Phi: litgpt's own Config with a named entry's fields) likewise, and
Mistral-7B-v0.1, Gemma-7b, gemma-2-9b and pythia-1b at scale under FakeTensorMode.

The oracle is LitGPT's own code (`pip install --no-deps litgpt==0.5.9 lightning==2.6.6
lightning-utilities==0.15.3 torchmetrics==1.9.0`); the full matrix is
benchmarks/litgpt_activations.py (benchmarks/results/litgpt-activations.json). The rest of
this file needs no torch: refusals, the spec key, the report's `implementation` key.
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

LLAMA31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}


def tiny(layers: int = 2, kv_heads: int = 2) -> dict[str, Any]:
    """The shape tests/litgpt_probe.py builds, as a config memplan reads."""
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    }


def predicted(
    config: dict[str, Any], precision: str, mode: str, *, batch: int, seq: int, **par: Any
) -> activations.Activations:
    spec = make_spec(
        model={"architecture": config, "implementation": "litgpt"},
        precision=precision,
        training={
            "micro_batch_size": batch,
            "sequence_length": seq,
            "activation_checkpointing": mode,
        },
        parallelism=par or {"data": 1},
        hardware={"device": "cpu"},
    )
    saved = activations.predict(from_config(config), setting_of(spec))
    assert saved.implementation == "litgpt"
    return saved


CASES = [
    # precision, mode, layers, k/v heads, batch, sequence
    ("fp32", "none", 2, 2, 2, 16),
    ("bf16", "none", 2, 4, 2, 16),  # as many k/v heads as heads: v keeps the qkv output
    ("bf16", "full", 3, 2, 3, 100),  # 300 tokens: two full loss chunks and one of 44
    ("amp-bf16", "none", 2, 1, 1, 16),  # autocast (Fabric bf16-mixed), one k/v head
    ("amp-bf16", "full", 2, 2, 2, 16),
]


@pytest.mark.parametrize(("precision", "mode", "layers", "kv", "batch", "seq"), CASES)
def test_rule_matches_litgpt_to_the_byte(
    precision: str, mode: str, layers: int, kv: int, batch: int, seq: int
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.model")
    from tests.litgpt_probe import Shape, held_bytes

    measured = held_bytes(precision, mode, Shape(layers=layers, batch=batch, seq=seq, kv_heads=kv))
    saved = predicted(tiny(layers, kv), precision, mode, batch=batch, seq=seq)
    assert saved.modelled, saved.notes
    assert saved.bytes == measured


def test_rule_matches_litgpt_at_the_8b_shape_under_fake_tensors() -> None:
    """Two blocks of Llama 3.1 8B (litgpt/config.py "Llama-3.1-8B{}": n_embd 4096, 32 heads,
    8 query groups, LLaMAMLP 14336, padded vocab 128256) at 1 x 8192 tokens, bf16-true, CPU
    kernels, under FakeTensorMode: the shapes at scale (64 loss chunks)."""
    pytest.importorskip("torch")
    pytest.importorskip("litgpt.model")
    from tests.litgpt_probe import LLAMA31_8B as SHAPE
    from tests.litgpt_probe import held_bytes_fake

    config = {**tiny(2), **LLAMA31_8B}
    saved = predicted(config, "bf16", "none", batch=1, seq=8192)
    assert saved.bytes == held_bytes_fake("bf16", "none", SHAPE)


def test_pin_litgpt_layer_against_transformers_at_8b_bf16() -> None:
    """Pinning (the two rules' own arithmetic): per token per Llama 3.1 8B layer in bf16,
    LitGPT's GPT saves 36,864 B more than transformers' LlamaDecoderLayer, plus 32 KiB per
    layer: its RMSNorm keeps x_normed in fp32, not bf16 (2 x 4096 x 2 B) and the fp32 copy of
    each norm weight (2 x 4096 x 4 B per layer); its k and v are repeat_interleave'd to all 32
    heads where transformers' SDPA takes 8 with enable_gqa (2 x 3072 x 2 B); its attention
    output is copied for `proj` (4096 x 2 B), where transformers' o_proj reads the kernel's
    output. The litgpt side is proved by the tests above."""
    config = {**tiny(32), **LLAMA31_8B}
    spec = make_spec(
        model={"architecture": config},
        precision="bf16",
        training={"micro_batch_size": 1, "sequence_length": 8192},
        hardware={"device": "cpu"},
    )
    hf = activations.predict(from_config(config), setting_of(spec)).block("layers")
    lit = predicted(config, "bf16", "none", batch=1, seq=8192).block("layers")
    assert hf is not None and lit is not None
    t = 8192
    per_token = 2 * 4096 * 2 + 2 * 3072 * 2 + 4096 * 2
    assert lit.bytes_each - hf.bytes_each == per_token * t + 2 * 4096 * 4
    assert per_token == 36_864


def test_a_transformers_profile_never_serves_litgpt() -> None:
    cfg = {**tiny(), "model_type": "qwen3"}
    saved = predicted(cfg, "bf16", "none", batch=1, seq=16)
    assert not saved.modelled
    assert "model_type 'qwen3' under model.implementation litgpt" in saved.notes[0]
    assert "q/k norms" in saved.notes[0]


ARCH_CASES = [
    # architecture (tests/litgpt_probe.py::ARCHS), precision, mode, k/v heads, head_size,
    # batch, sequence, layers
    ("qwen2.5", "amp-bf16", "none", 2, None, 2, 16, 2),  # qkv bias: nothing more saved
    ("mistral", "bf16", "none", 2, None, 2, 100, 2),  # its own [1, 1, T, T] mask per layer
    ("mistral", "amp-bf16", "full", 2, None, 1, 16, 3),
    ("phi-3", "fp32", "none", 4, None, 1, 16, 2),  # multi-head + sliding window
    ("phi-4-mini", "amp-bf16", "none", 2, 32, 2, 16, 2),  # rotary 0.75: 24 of 32 dims
    ("gemma", "fp32", "none", 1, 32, 2, 16, 2),  # 1 + weight, sqrt(n_embd), gelu; MQA
    ("gemma", "amp-bf16", "full", 4, None, 2, 16, 2),
    ("gemma", "bf16", "none", 4, 32, 1, 100, 2),
    # softcapped attention by hand, post-norms, capped logits, window on every other layer
    ("gemma-2", "amp-bf16", "none", 2, None, 2, 16, 3),
    ("gemma-2", "bf16", "full", 4, None, 2, 100, 2),  # multi-head at batch 2: v copied
    # LayerNorm x 2 of one input, parallel residual, GELU MLP, biases, rotary_percentage 0.25
    ("pythia", "amp-bf16", "none", 4, None, 2, 16, 3),
    ("pythia", "bf16", "full", 4, None, 1, 100, 2),
    ("falcon-7b", "amp-bf16", "none", 1, None, 2, 16, 2),  # one norm feeds qkv and fc
    ("falcon-40b", "fp32", "none", 2, None, 2, 16, 2),
    # shared norm + biases + GELU tanh + lm_head bias, half (0.4) of each head rotated
    ("phi-1.5", "amp-bf16", "none", 4, None, 2, 16, 2),
    ("phi-2", "bf16", "full", 4, None, 1, 100, 2),
]


@pytest.mark.parametrize(
    ("arch", "precision", "mode", "kv", "head_size", "batch", "seq", "layers"), ARCH_CASES
)
def test_rule_matches_litgpt_other_architectures_to_the_byte(
    arch: str,
    precision: str,
    mode: str,
    kv: int,
    head_size: int | None,
    batch: int,
    seq: int,
    layers: int,
) -> None:
    """litgpt's own GPT built from its own Config with a named entry's fields (Qwen2.5-7B,
    Mistral-7B-v0.1, Phi-3-mini-4k-instruct, Gemma-2b / 7b, gemma-2-9b, pythia, falcon-7b /
    40b, phi-1_5 / phi-2) against the rule
    applied to the config.json of that checkpoint's type; the whole matrix is benchmarks/
    litgpt_activations.py's `architectures` part."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.model")
    from tests.litgpt_probe import Shape, held_bytes, hf_config

    shape = Shape(arch=arch, layers=layers, batch=batch, seq=seq, kv_heads=kv, head_size=head_size)
    saved = predicted(hf_config(shape), precision, mode, batch=batch, seq=seq)
    assert saved.modelled, saved.notes
    assert saved.bytes == held_bytes(precision, mode, shape)


@pytest.mark.parametrize("arch", ["mistral", "gemma", "gemma-2", "pythia"])
def test_rule_matches_litgpt_at_7b_shapes_under_fake_tensors(arch: str) -> None:
    """Two blocks of Mistral-7B-v0.1 (the 4096-window mask at 4096 tokens), Gemma-7b
    (head_size 256 x 16 heads over n_embd 3072, vocab 256000) and gemma-2-9b (the softcapped
    scores [16, 4096, 4096], the capped logits) at 1 x 4096, and pythia-1b at 1 x 2048,
    bf16-true."""
    pytest.importorskip("torch")
    pytest.importorskip("litgpt.model")
    from tests.litgpt_probe import AT_SCALE, held_bytes_fake, hf_config

    shape = AT_SCALE[arch]
    saved = predicted(hf_config(shape), "bf16", "none", batch=1, seq=shape.seq)
    assert saved.bytes == held_bytes_fake("bf16", "none", shape)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"model_type": "gemma2", "head_dim": 16, "attn_logit_softcapping": None}, "cap"),
        ({"model_type": "gemma3_text", "head_dim": 16}, "q/k norms"),
        ({"model_type": "mixtral"}, "LLaMAMoE"),
        ({"model_type": "falcon", "alibi": True}, "alibi"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "no sliding window"),
        ({"model_type": "gpt_neox", "use_parallel_residual": False}, "parallel_residual"),
        ({"model_type": "phi", "hidden_act": "gelu"}, "GELU tanh"),
        ({"model_type": "phi", "qk_layernorm": True}, "q/k LayerNorms"),
    ],
)
def test_litgpt_refuses_architectures_it_does_not_cover(config: dict[str, Any], why: str) -> None:
    cfg = {**tiny(), **config}
    saved = predicted(cfg, "bf16", "none", batch=1, seq=16)
    assert not saved.modelled and why in saved.notes[0], saved.notes


def test_litgpt_refuses_an_unaligned_sliding_window_mask_on_cuda() -> None:
    cfg = {**tiny(), "model_type": "mistral", "sliding_window": 4096}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        training={"micro_batch_size": 1, "sequence_length": 100},
    )
    saved = activations.predict(from_config(cfg), setting_of(spec))
    assert not saved.modelled and "multiple of 16" in saved.notes[0]
    aligned = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        training={"micro_batch_size": 1, "sequence_length": 128},
    )
    assert activations.predict(from_config(cfg), setting_of(aligned)).modelled


def test_pin_litgpt_sliding_window_mask_on_cuda() -> None:
    """Pinning (the rule's own arithmetic, read from litgpt 0.5.9 model.py and torch's SDPA
    kernel choice, not measured on a GPU): on CUDA a sliding-window layer's mask sends SDPA to
    the memory-efficient kernel, which keeps the [1, 1, T, T] bf16 mask; its output is laid
    out [b, s, a, d], so `proj` reads a view of it, where the flash kernel's output follows
    the contiguous q and `reshape` copies it for `proj` (one [b, a, s, d] bf16 storage
    fewer), and it keeps no philox tensors (24 B fewer). Both keep a [b, a, 128] logsumexp."""
    plain = {**tiny(), "model_type": "mistral", "sliding_window": None}
    windowed = {**plain, "sliding_window": 4096}
    seq = 128
    spec = make_spec(
        model={"architecture": windowed, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 1, "sequence_length": seq},
    )
    with_mask = activations.predict(from_config(windowed), setting_of(spec)).block("layers")
    no_mask = activations.predict(from_config(plain), setting_of(spec)).block("layers")
    assert with_mask is not None and no_mask is not None
    heads, head_dim = 4, 16
    output = seq * heads * head_dim * 2
    assert with_mask.bytes_each - no_mask.bytes_each == seq * seq * 2 - output - 24


@pytest.mark.parametrize(
    ("training", "why"),
    [
        ({"activation_checkpointing": "selective"}, "checkpoint whole blocks"),
        ({"activation_checkpointing": "selective-op"}, "checkpoint whole blocks"),
        ({"attention": "eager"}, "use training.attention sdpa"),
        ({"dropout": True}, "no dropout"),
        ({"compile": True}, "compiles the whole GPT"),
        ({"activation_checkpointing": "full", "checkpoint_every": 2}, "every Block"),
    ],
)
def test_litgpt_refuses_what_it_does_not_run(training: dict[str, Any], why: str) -> None:
    spec = make_spec(model={"architecture": tiny(), "implementation": "litgpt"}, training=training)
    saved = activations.predict(from_config(tiny()), setting_of(spec))
    assert not saved.modelled and why in saved.notes[0]
    assert saved.implementation == "litgpt"


def test_litgpt_refuses_model_parallelism_and_frozen_parameters() -> None:
    inv = from_config(tiny())
    for par in ({"engine": "fsdp2", "data": 4, "tensor": 2}, {"data": 1, "pipeline": 2}):
        spec = make_spec(
            model={"architecture": tiny(), "implementation": "litgpt"}, parallelism=par
        )
        saved = micro_batch_of(spec, inv)
        assert not saved.modelled and "data parallelism only" in saved.notes[0], par
        assert saved.implementation == "litgpt"
    # LoRA is LitGPT's own (tests/test_litgpt_lora.py); freezing by pattern is not.
    frozen = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        finetune={"freeze": ["model.norm.*"]},
    )
    saved = micro_batch_of(frozen, inv)
    assert not saved.modelled and "LitGPT's model code" in saved.notes[0]
    data = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        parallelism={"engine": "fsdp2", "data": 8},
    )
    assert micro_batch_of(data, inv).modelled


def test_bf16_mixed_under_fsdp_runs_the_model_in_bf16() -> None:
    """Lightning's FSDPPrecision("bf16-mixed") sets FSDP param_dtype bf16: no autocast casts
    (memplan amp-bf16 over fsdp2); on one device Fabric's MixedPrecision is torch.autocast."""
    one = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"}, precision="amp-bf16"
    )
    assert setting_of(one).autocast
    sharded = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        precision="amp-bf16",
        parallelism={"engine": "fsdp2", "data": 8},
    )
    st = setting_of(sharded)
    assert not st.autocast and st.stream == st.matmul == "bf16"


def test_fsdp_bf16_mixed_matches_litgpt_in_bf16_under_autocast() -> None:
    """Lightning's FSDPPrecision("bf16-mixed") without the sharding (bf16 parameters and
    buffers under torch.autocast; CPU autocast here) holds what memplan predicts for amp-bf16
    over fsdp2: the bf16 rule, no autocast casts."""
    pytest.importorskip("torch")
    pytest.importorskip("litgpt.model")
    from tests.litgpt_probe import Shape, held_bytes_fsdp_mixed

    spec = make_spec(
        model={"architecture": tiny(2, 4), "implementation": "litgpt"},
        precision="amp-bf16",
        training={"micro_batch_size": 2, "sequence_length": 16},
        parallelism={"engine": "fsdp2", "data": 8},
        hardware={"device": "cpu"},
    )
    saved = activations.predict(from_config(tiny(2, 4)), setting_of(spec))
    assert saved.bytes == held_bytes_fsdp_mixed("none", Shape(kv_heads=4))


def test_report_names_litgpt_and_verify_refuses_it() -> None:
    spec = make_spec(model={"architecture": tiny(), "implementation": "litgpt"})
    doc = estimate_json(estimate(spec, from_config(tiny())))
    assert doc["activations"]["implementation"] == "litgpt"
    assert doc["activations"]["modelled"] is True
    from memplan.verify.refusals import check_supported

    with pytest.raises(MemplanError, match="model.implementation: litgpt cannot be verified"):
        check_supported(spec, spec.recipe())


def test_pin_litgpt_loop_holds_the_fp32_logits_in_every_phase() -> None:
    """Pinning (read from litgpt 0.5.9 pretrain.py::fit and Fabric's _FabricModule.forward, not
    measured): the fp32 logits [tokens, vocab] stay bound to the loop's `logits` until the next
    forward returns, so the step holds them in every phase, and there is no separate 16-bit
    output or upcast; transformers' timeline keeps its logits to the loss only."""
    spec = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        training={"micro_batch_size": 2, "sequence_length": 16},
    )
    timeline = estimate(spec, from_config(tiny())).timeline
    fp32_logits = 2 * 16 * 256 * 4
    for phase in ("start", "forward", "loss", "backward_start", "backward", "optimizer_step"):
        held = [t for t in timeline.transient_at(phase) if t.name == "logits"]
        assert [t.bytes for t in held] == [fp32_logits], phase
    assert not [t for t in timeline.transients if t.name == "loss_fp32_upcast"]
    plain = estimate(make_spec(), from_config(tiny())).timeline
    assert [t for t in plain.transient_at("forward") if t.name == "logits"] == []


def test_litgpt_says_when_the_config_ties_what_litgpt_does_not() -> None:
    """litgpt 0.5.9 model.py::GPT.__init__ builds lm_head and wte apart (read, not run): a tied
    config (Gemma's default) is said in the notes; an untied one is not."""
    for config, tied in (
        ({**tiny(), "model_type": "gemma", "head_dim": 16}, True),
        (tiny(), False),
    ):
        inv = from_config(config)
        assert bool(inv.tied) is tied
        spec = make_spec(model={"architecture": config, "implementation": "litgpt"})
        notes = activations.predict(inv, setting_of(spec)).notes
        assert any("keeps lm_head apart from wte" in n for n in notes) is tied


@pytest.mark.parametrize("arch", ["gemma", "qwen2.5", "llama"])
def test_litgpt_model_states_count_the_parameters_litgpts_gpt_has(arch: str) -> None:
    """Independent oracle: litgpt 0.5.9's own GPT built (on the meta device) from the probe's
    Config has as many parameters as memplan's inventory of the HF config under
    `model.implementation: litgpt`; a config that ties lm_head (Gemma's, a tied Qwen2.5's)
    gets LitGPT's own lm_head (one [vocab, hidden] matrix more than the tied config), an
    untied one is unchanged."""
    import torch
    from litgpt.model import GPT

    from memplan.model.finetune import lora as finetune
    from tests.litgpt_probe import Shape, config, hf_config

    shape = Shape(arch=arch, head_size=16 if arch == "gemma" else None)
    cfg = {**hf_config(shape), "tie_word_embeddings": arch != "llama"}
    with torch.device("meta"):
        model = GPT(config(shape))
    litgpts = sum(p.numel() for p in model.parameters())
    inventory = from_config(cfg)
    spec = make_spec(model={"architecture": cfg, "implementation": "litgpt"})
    trained = finetune.apply(spec, inventory)
    assert trained.num_parameters == litgpts
    untied_by_litgpt = litgpts - inventory.num_parameters
    assert untied_by_litgpt == (shape.vocab * shape.dim if arch != "llama" else 0)
    assert finetune.apply(spec, inventory) is trained  # one object: plan's caches key on it
