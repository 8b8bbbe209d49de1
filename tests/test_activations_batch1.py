"""Batch 1 against batch 2 (issue 16): what `torch.matmul` of 4-D tensors and the causal-LM loss
save when a size-1 batch lets reshape return a view.

At batch 1 matmul's `reshape({b * n, s, d})` of q, k^T, v is a view (a size-1 dim's stride does
not count), so autograd keeps the operand's own storage: for v sliced from a fused projection
(GPT-2 c_attn, GPT-NeoX / Falcon / Phi-3 query_key_value) the whole projection output, for an
expanded multi-query k/v the single head. At batch >= 2 the transposed views are copied. The
loss keeps the padded labels [1, s + 1] at batch 1 (`labels[..., 1:]` is already contiguous).
The oracle: real forward passes on CPU, measured by tests/activation_probe.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests import test_activations as ta  # noqa: E402
from tests import test_activations_families as tf  # noqa: E402

# name: (config, with_dropout, per-block compare (test_activations_families) or total)
CASES: dict[str, tuple[dict[str, Any], Any, bool]] = {
    "gpt2": (ta.GPT2, ta.with_dropout, False),
    "gpt_neox": (ta.VARIANTS["gpt-neox"], ta.with_dropout, False),
    "llama-gqa": (ta.LLAMA, ta.with_dropout, False),
    "phi3-mha": (tf.VARIANTS["phi3-mha-relu"], tf.with_dropout, True),
    "falcon-mqa": (tf.FAMILIES["falcon"], tf.with_dropout, True),
    "falcon-mha-sequential": (tf.VARIANTS["falcon-mha-sequential"], tf.with_dropout, True),
    "falcon-new-arch": (tf.VARIANTS["falcon-new-arch"], tf.with_dropout, True),
    "bloom": (tf.FAMILIES["bloom"], tf.with_dropout, True),
}
GRID = list(
    itertools.product(tuple(CASES), (1, 2), ("eager", "sdpa"), ("fp32", "bf16"), (False, True))
)


@pytest.mark.parametrize(
    ("family", "batch", "attention", "precision", "dropout"),
    GRID,
    ids=[f"{f}-b{b}-{a}-{p}-{'drop' if d else 'nodrop'}" for f, b, a, p, d in GRID],
)
def test_batch1_saved_bytes_match(
    family: str, batch: int, attention: str, precision: str, dropout: bool
) -> None:
    config, with_dropout, per_block = CASES[family]
    compare = tf.compare if per_block else ta.compare
    measured, predicted = compare(
        with_dropout(config, dropout), attention=attention, precision=precision, batch=batch
    )
    assert predicted == measured


@pytest.mark.parametrize("batch", [1, 2])
def test_matmul_keeps_fused_projection_at_batch1(batch: int) -> None:
    """The torch behaviour the rule rests on (LinearAlgebra.cpp::_matmul_impl): the value matmul
    saves a view of the fused projection output at batch 1 and a copy at batch 2."""
    a, s, d = 4, 8, 16
    fused = torch.randn(batch, s, 3 * a * d, requires_grad=True) * 1.0
    v = fused.split(a * d, dim=2)[2].view(batch, s, a, d).transpose(1, 2)
    probs = torch.randn(batch, a, s, s, requires_grad=True)
    seen: list[int] = []

    def pack(t: Any) -> Any:
        seen.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.matmul(probs, v)
    shares = fused.untyped_storage().data_ptr() in seen
    assert shares == (batch == 1)
