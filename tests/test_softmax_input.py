"""training.softmax_saves_input: torch before 1.11 keeps softmax's and log_softmax's input for
backward beside their output (torch 1.10.0's generated SoftmaxBackward0 / LogSoftmaxBackward0
hold `self_` and `result_`: torch/include/torch/csrc/autograd/generated/Functions.h of its
wheels; pytorch/pytorch#64000, fixed by #66018 for 1.11). The tracer's emulation
(memplan.verify.trace.forward.SoftmaxInputs) against that rule and torch's own checkpointing;
the calculator's refusal to apply it to the hand rules (which describe torch 2.13)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.config.load import validate  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402

BATCH, SEQ, HEADS, LAYERS, LABELS = 2, 32, 4, 2, 2
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 128,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "type_vocab_size": 2,
    "vocab_size": 1000,
}


def test_torch_213_softmax_saves_its_output_only() -> None:
    """Independent oracle (a real torch run): today's torch keeps softmax's result and its
    input's dtype, not the input, which is why the knob defaults to false."""
    x = torch.randn(2, 3, requires_grad=True)
    for fn in (torch.softmax, torch.log_softmax):
        node = fn(x * 2, -1).grad_fn
        assert hasattr(node, "_saved_result")
        assert not hasattr(node, "_saved_self")


def traced_bytes(softmax_input: bool, checkpointing: str = "none") -> dict[str, int]:
    """Bytes a tiny BertForSequenceClassification's traced forward and loss save, per block."""
    from memplan.verify.trace.forward import build_fake, trace_once

    model, mode = build_fake(
        TINY_BERT, stream="fp32", attention="eager", checkpointing=checkpointing, dropout=None
    )
    records = trace_once(
        model,
        mode,
        batch=BATCH,
        sequence=SEQ,
        autocast=None,
        layer_count=LAYERS,
        device="cuda",
        softmax_input=softmax_input,
    )
    out: dict[str, int] = {}
    for r in records:
        block = "layers" if r.block.startswith("layer.") else r.block
        out[block] = out.get(block, 0) + r.numel * {"fp32": 4, "bool": 1, "int64": 8}[r.dtype]
    return out


def test_softmax_input_adds_each_softmax_input() -> None:
    """Independent oracle (1.10.0's SoftmaxBackward0 / LogSoftmaxBackward0 save `self_`, of the
    output's shape): each eager attention keeps one more fp32 [batch, heads, seq, seq] (the
    scaled scores, transformers' eager_attention_forward), and the head keeps the logits
    cross_entropy's log_softmax reads (BertForSequenceClassification computes its loss in its
    own forward), [batch, num_labels] fp32; nothing else changes."""
    today, old = traced_bytes(False), traced_bytes(True)
    assert old["layers"] - today["layers"] == LAYERS * BATCH * HEADS * SEQ * SEQ * 4
    assert old["head"] - today["head"] == BATCH * LABELS * 4
    assert old["embeddings"] == today["embeddings"]
    assert set(old) == set(today)


def test_softmax_input_inside_full_checkpointing_is_not_kept() -> None:
    """Independent oracle (torch.utils.checkpoint, non-reentrant, as transformers runs it): a
    checkpointed layer's saved tensors, the softmax input among them, go to checkpoint's own
    pack hook and are not held; only the head's log_softmax input (the logits) is kept."""
    today, old = traced_bytes(False, "full"), traced_bytes(True, "full")
    assert old["layers"] == today["layers"]
    assert old["head"] - today["head"] == BATCH * LABELS * 4


def test_hand_rules_do_not_take_the_knob() -> None:
    """The hand rules describe torch 2.13's softmax: with the knob a hand-ruled family's
    activations are left out with a note naming the field, never the 2.13 figure."""
    spec = {
        "model": {"preset": "llama-3-8b"},
        "precision": {"preset": "bf16-mixed"},
        "training": {"micro_batch_size": 1, "sequence_length": 512, "attention": "eager"},
    }
    loaded = validate(spec)
    base = estimate(loaded.spec, load_inventory(loaded))
    spec["training"]["softmax_saves_input"] = True
    loaded = validate(spec)
    old = estimate(loaded.spec, load_inventory(loaded))
    assert base.activations.modelled and not old.activations.modelled
    assert any("softmax_saves_input" in n for n in old.activations.notes)
