"""LitGPT's LoRA (`model.implementation: litgpt`, `finetune.method: lora`): the saved-tensor
rule (memplan.model.stacks.litgpt_lora) against litgpt 0.5.9's real `litgpt.lora.GPT` on CPU,
run by Lightning Fabric with finetune/lora.py's forward and loss, to the byte
(tests/litgpt_probe.py::held_bytes_lora measures); the whole matrix is
benchmarks/litgpt_lora.py (benchmarks/results/litgpt-lora.json: 362 of 362 exact).

The oracle is LitGPT's own code (`pip install --no-deps litgpt==0.5.9 lightning==2.6.6
lightning-utilities==0.15.3 torchmetrics==1.9.0`). The rest of this file needs no torch:
how peft's target names map to LitGPT's flags, and what is refused.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.model.sources import from_config
from memplan.model.stacks.litgpt_lora_adapters import Flags, flags_of
from memplan.report.estimate import estimate
from tests.conftest import make_spec, micro_batch_of
from tests.test_litgpt_activations import tiny


def lora_spec(
    *,
    precision: str = "bf16",
    mode: str = "none",
    kv: int = 2,
    batch: int = 2,
    seq: int = 16,
    layers: int = 2,
    vocab: int = 256,
    **finetune: Any,
) -> Any:
    return make_spec(
        model={
            "architecture": {**tiny(layers, kv), "vocab_size": vocab},
            "implementation": "litgpt",
        },
        precision=precision,
        training={
            "micro_batch_size": batch,
            "sequence_length": seq,
            "activation_checkpointing": mode,
        },
        finetune={"method": "lora", "rank": 8, "alpha": 16, **finetune},
        hardware={"device": "cpu"},
    )


CASES = [
    # precision, mode, k/v heads, batch, sequence, target_modules, dropout
    ("bf16", "none", 4, 1, 200, ["q_proj", "v_proj"], 0.05),  # MHA: one grouped conv1d
    ("fp32", "none", 2, 2, 300, ["q_proj", "v_proj"], 0.0),  # 3 head chunks, target copies
    ("bf16", "none", 2, 2, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.05),  # no zero_pad
    ("fp32", "full", 2, 2, 16, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], 0.0),
    ("bf16", "none", 2, 2, 300, "all-linear", 0.05),
    ("bf16", "full", 4, 2, 16, ["lm_head"], 0.05),  # layers record nothing: no checkpoint.x
    # bf16-mixed: frozen weights cast per call (per head chunk), adapters' inputs and weights
    ("amp-bf16", "none", 2, 2, 300, ["q_proj", "v_proj", "o_proj", "lm_head"], 0.05),
    ("amp-bf16", "full", 4, 1, 200, "all-linear", 0.0),
]


@pytest.mark.parametrize(("precision", "mode", "kv", "batch", "seq", "targets", "dropout"), CASES)
def test_rule_matches_litgpt_lora_to_the_byte(
    precision: str, mode: str, kv: int, batch: int, seq: int, targets: Any, dropout: float
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_lora

    spec = lora_spec(
        precision=precision,
        mode=mode,
        kv=kv,
        batch=batch,
        seq=seq,
        target_modules=targets,
        dropout=dropout,
    )
    saved = micro_batch_of(spec, from_config(tiny(2, kv)))
    assert saved.modelled, saved.notes
    fl = flags_of(spec.finetune.target_modules, rank=8, dropout=dropout)
    assert isinstance(fl, Flags)
    lora = Lora(
        r=8,
        alpha=16,
        dropout=dropout,
        query=fl.query,
        key=fl.key,
        value=fl.value,
        projection=fl.projection,
        mlp=fl.mlp,
        head=fl.head,
    )
    shape = Shape(layers=2, batch=batch, seq=seq, kv_heads=kv)
    assert saved.bytes == held_bytes_lora(precision, mode, shape, lora)


def test_rule_matches_litgpt_lora_at_llama2_7b_under_fake_tensors() -> None:
    """Two blocks of Llama 2 7B at the published rows' 1304 tokens (11 head chunks, the last
    of 24), bf16-true, r 8, dropout 0.05 on query + value, under FakeTensorMode."""
    pytest.importorskip("torch")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_lora_fake

    config = {
        **tiny(2),
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }
    spec = make_spec(
        model={"architecture": config, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 1, "sequence_length": 1304},
        finetune={"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.05},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(config))
    shape = Shape(
        layers=2, batch=1, seq=1304, dim=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000
    )
    assert saved.bytes == held_bytes_lora_fake("bf16", "none", shape, Lora(dropout=0.05))


@pytest.mark.parametrize(
    ("targets", "on"),
    [
        (None, ("query", "value")),  # peft's Llama default = finetune/lora.py's default
        (["q_proj", "k_proj", "v_proj"], ("query", "key", "value")),
        (["o_proj", "lm_head"], ("projection", "head")),
        (["gate_proj", "up_proj", "down_proj"], ("mlp",)),
        ("all-linear", ("query", "key", "value", "projection", "mlp")),
    ],
)
def test_peft_names_map_to_litgpt_flags(targets: Any, on: tuple[str, ...]) -> None:
    fl = flags_of(tuple(targets) if isinstance(targets, list) else targets, rank=8, dropout=0)
    assert isinstance(fl, Flags)
    names = ("query", "key", "value", "projection", "mlp", "head")
    assert {n for n in names if getattr(fl, n)} == set(on)


@pytest.mark.parametrize(
    ("finetune", "why"),
    [
        ({"target_modules": ["q_proj", "gate_proj"]}, "lora_mlp adapts fc_1, fc_2 and proj"),
        ({"target_modules": ["embed_tokens"]}, "adapts only the query, key, value"),
        ({"target_modules": ".*proj"}, "not a regex"),
        ({"freeze": ["model.norm.*"]}, "not LitGPT options"),
        ({"modules_to_save": ["lm_head"]}, "not LitGPT options"),
        ({"bias": "all"}, "not LitGPT options"),
    ],
)
def test_litgpt_lora_refuses_what_litgpt_cannot_express(finetune: dict[str, Any], why: str) -> None:
    spec = lora_spec(**finetune)
    saved = micro_batch_of(spec, from_config(tiny()))
    assert not saved.modelled and why in saved.notes[0]
    assert saved.implementation == "litgpt"


def test_litgpt_refuses_transformers_qlora_keys_and_fp16_lora() -> None:
    """QLoRA under LitGPT is modelled (tests/test_litgpt_qlora.py); transformers' and peft's
    own QLoRA keys are not LitGPT options."""
    for key in ({"skip_modules": ["lm_head"]}, {"prepare_kbit": False}):
        qlora = make_spec(
            model={"architecture": tiny(), "implementation": "litgpt"},
            finetune={"method": "qlora", **key},
        )
        saved = micro_batch_of(qlora, from_config(tiny()))
        assert not saved.modelled and "no ignore_modules" in saved.notes[0]
    half = lora_spec(precision="fp16")
    saved = micro_batch_of(half, from_config(tiny()))
    assert not saved.modelled and "16-true and 16-mixed are not modelled" in saved.notes[0]


def test_pin_litgpt_adapters_are_held_in_the_model_dtype() -> None:
    """Pinning (read from litgpt 0.5.9 finetune/lora.py::main: the LoRA GPT is built inside
    `fabric.init_module()`, no peft): under bf16-true the adapters, their gradients and
    torch AdamW's exp_avg / exp_avg_sq (zeros_like the parameter) are bf16, where peft's
    autocast_adapter_dtype would make them fp32."""
    spec = lora_spec()
    gpu = estimate(spec, from_config(tiny())).per_gpu
    states = {t.name: t for t in gpu.terms if t.category == "optimizer_states"}
    assert states["exp_avg"].dtype == "bf16" and states["exp_avg_sq"].dtype == "bf16"
    # q + v on 2 layers: lora_A [8, 64] x 2 and lora_B [64 + 32, 8] per layer.
    assert states["exp_avg"].elements == 2 * (2 * 8 * 64 + (64 + 32) * 8)


def test_optimizer_state_matches_litgpt_adamw_on_cpu() -> None:
    """Independent oracle: finetune/lora.py::main without --quantize run on CPU (tests/
    litgpt_probe.py::lora_optimizer_held: litgpt's own instantiate_torch_optimizer("AdamW",
    model.parameters()), every parameter given, two real steps with zero_grad): only the
    trainable LoRA tensors get state, nothing outlives zero_grad, and memplan's exp_avg and
    exp_avg_sq are the same tensors and bytes, and so is `step`: one 0-dim fp32 tensor per
    trainable tensor, LitGPT's LoRAQKVLinear holding q's and v's adapters in one lora_A and
    one lora_B per layer (litgpt_lora_adapters.fused_adapters; before it memplan listed them
    apart and counted twice the `step` tensors)."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, lora_optimizer_held

    real = lora_optimizer_held("bf16", Shape(layers=2), Lora())
    assert set(real.with_state) == set(real.trainable)
    assert all("lora_" in n for n in real.trainable)
    assert real.kept_grads == {} and real.outside_model == 0
    report = estimate(lora_spec(kv=2), from_config(tiny()))
    mine = {t.name: (t.tensors, t.bytes) for t in report.per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert mine[key] == real.by_key[key], key
    assert not report.per_gpu.host_terms
    assert dict(report.timeline.points[0].by_category)["gradients"] == 0


@pytest.mark.parametrize(("batch", "seq"), [(2, 300), (1, 100)])
def test_chunked_loss_gradient_matches_litgpt(batch: int, seq: int) -> None:
    """The loss's backward (memplan.model.stacks.litgpt_lora.loss_gradient, the step's
    `logits_gradient` at backward_start) against the most litgpt's own loss holds beyond
    what was alive when its backward began. The measure is lower by the small tensors the
    backward has freed by then (later chunks' int64 targets, the divisor), at most the loss
    block's int64 tensors."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from memplan.model.stacks.litgpt_lora import loss_gradient
    from tests.litgpt_probe import Shape, loss_backward_excess

    vocab = 4096  # the logits dominate what the loss's backward makes
    measured = loss_backward_excess("bf16", Shape(batch=batch, seq=seq, vocab=vocab))
    predicted = loss_gradient(batch, seq, vocab)
    saved = micro_batch_of(
        lora_spec(batch=batch, seq=seq, vocab=vocab), from_config({**tiny(), "vocab_size": vocab})
    )
    loss = saved.block("loss")
    assert loss is not None and saved.loss_gradient_bytes == predicted
    small = sum(t.bytes for t in loss.tensors if t.dtype == "int64")
    assert 0 <= predicted - measured <= small
    timeline = estimate(lora_spec(batch=batch, seq=seq), from_config(tiny())).timeline
    held = [t for t in timeline.transient_at("backward_start") if t.name == "logits_gradient"]
    assert [t.bytes for t in held] == [loss_gradient(batch, seq, 256)]


@pytest.mark.parametrize(
    ("arch", "precision", "targets"),
    [
        ("qwen2.5", "amp-bf16", ["q_proj", "v_proj", "o_proj", "lm_head"]),  # qkv bias
        ("mistral", "bf16", "all-linear"),  # the sliding window's mask per layer
        ("phi-3", "fp32", ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_rule_matches_litgpt_lora_on_other_architectures(
    arch: str, precision: str, targets: Any
) -> None:
    """litgpt.lora.GPT built from litgpt's own Config with Qwen2.5-7B's, Mistral-7B-v0.1's
    and Phi-3-mini-4k's fields (tests/litgpt_probe.py::ARCHS) against the LoRA rule on the
    config.json of that type."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_lora, hf_config

    kv = 4 if arch == "phi-3" else 2
    shape = Shape(arch=arch, layers=2, batch=2, seq=100, kv_heads=kv)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision=precision,
        training={"micro_batch_size": 2, "sequence_length": 100},
        finetune={"method": "lora", "rank": 8, "alpha": 16, "target_modules": targets},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert saved.modelled, saved.notes
    fl = flags_of(spec.finetune.target_modules, rank=8, dropout=0.0)
    assert isinstance(fl, Flags)
    lora = Lora(
        query=fl.query,
        key=fl.key,
        value=fl.value,
        projection=fl.projection,
        mlp=fl.mlp,
        head=fl.head,
    )
    assert saved.bytes == held_bytes_lora(precision, "none", shape, lora)


def test_litgpt_lora_refuses_gemma() -> None:
    """Measured, not modelled: litgpt.lora.GPT with Gemma's fields holds 256 B per frozen
    RMSNorm more than the LoRA rule in 32-true (its `1 + weight`), so the rule refuses it."""
    cfg = {**tiny(), "model_type": "gemma", "head_dim": 16}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        finetune={"method": "lora", "rank": 8, "alpha": 16},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert not saved.modelled and "add_unit_offset" in saved.notes[0]
