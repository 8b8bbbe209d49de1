"""Issue 20: what the 2022 stack of Hugging Face's BERT-large page (transformers 4.16 on torch
1.10) holds that today's (5.25 on 2.13) does not, traced op by op and replayed through memplan's
caching-allocator model (benchmarks/bert_op_trace.py's harness), one change at a time.

The two differences read from source (benchmarks/reference/bert-2022-gap.md has the rest of the
candidates, and what ruled them out):

- `softmax_input`: torch 1.10's autograd keeps softmax's input for its backward. torch 1.10.0's
  generated `SoftmaxBackward0` (torch/include/torch/csrc/autograd/generated/Functions.h in the
  1.10.0 wheel) holds `SavedVariable self_` and `result_`; torch 2.13's holds
  `self_scalar_type` and `result_`. pytorch/pytorch#64000 ("Softmax/logsoftmax use more memory
  for backward than needed"), fixed by #65242, relanded as #66018 on 2021-10-01, after 1.10's
  branch: first released in 1.11 (March 2022). The page ran in January 2022.
  Emulated with an autograd.Function that saves (input, output) and calls torch's own
  `_softmax` / `_softmax_backward_data`.
- `hf416_attention`: transformers 4.16.2's BertSelfAttention.forward (models/bert/
  modeling_bert.py): `attention_scores / math.sqrt(head_size)`, then `+ attention_mask` (4.16's
  BertModel.forward makes `torch.ones((batch, seq))` when none is given and
  get_extended_attention_mask turns it into `(1.0 - m[:, None, None, :]) * -10000.0`, fp32), then
  softmax, dropout, matmul; `attention_scores` stays bound until forward returns. 5.25's
  eager_attention_forward gets no mask for unpadded input and rebinds its name at each step.

Every other backward node BERT's step uses saves the same tensors in 1.10.0 and 2.13
(Functions.h of both: MmBackward0, AddmmBackward0, BmmBackward0, NativeLayerNormBackward0,
GeluBackward0, FusedDropoutBackward0 / NativeDropoutBackward0's mask (1 byte an element in
both: uint8 then bool), EmbeddingBackward0, TanhBackward0, NllLossBackward0, DivBackward1,
AddBackward0; the view nodes save nothing).

Rows: the page's fp32 runs memplan's op trace can run without CUDA (bitsandbytes' 8-bit Adam
needs it; the AMP rows need CUDA's autocast, so they are sized in the reference note): batch 4
with AdamW and with Adafactor, and batch 1 (the "bs 1 x GA 4" row: with `zero_grad: zero` the
gradients are held from the first step, so one micro-batch's forward and backward is its peak).

    PYTHONPATH=$PWD python benchmarks/bert_2022_stack.py   # ~4 min on 2 cores; writes
                                                          # benchmarks/results/bert-2022-stack.json
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bert_op_trace import CONTEXT_MIB, replay_events, trace  # noqa: E402
from benchmarks.published_others import SOURCES  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan.step import allocator  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bert-2022-stack.json"
MIB, GIB = 1 << 20, 1 << 30

PUBLISHED_MIB = {
    (4, "adamw"): 14949,  # "bs 4, fp32, AdamW"
    (4, "adafactor"): 12295,  # "bs 4, Adafactor"
    (1, "adamw"): 8681,  # "bs 1 x GA 4"
}
VARIANTS: dict[str, tuple[bool, bool]] = {
    # name: (softmax_input, hf416_attention)
    "today": (False, False),
    "softmax_input": (True, False),
    "hf416_attention": (False, True),
    "2022": (True, True),
}
RUNS: list[tuple[int, str, str]] = [
    (4, "adamw", "today"),
    (4, "adamw", "softmax_input"),
    (4, "adamw", "hf416_attention"),
    (4, "adamw", "2022"),
    (4, "adafactor", "today"),
    (4, "adafactor", "2022"),
    (1, "adamw", "today"),
    (1, "adamw", "2022"),
]


class Softmax110(torch.autograd.Function):
    """torch 1.10's softmax under autograd: `_softmax`, saving its input and its result
    (1.10.0 SoftmaxBackward0: `self_`, `result_`); the backward is torch's own kernel."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = torch._softmax(x, dim, False)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, out = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, ctx.dim, x.dtype), None


def softmax_110(x: torch.Tensor, dim: int | None = None, **kwargs: Any) -> torch.Tensor:
    assert dim is not None and not kwargs.get("dtype"), kwargs
    return Softmax110.apply(x, dim)  # type: ignore[no-any-return]


def attention_416(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers 4.16.2 BertSelfAttention.forward from the scores on (absolute positions,
    no head mask, not a decoder), called where 5.25 calls eager_attention_forward; returns
    (context in [batch, seq, heads, head_dim], None): 4.16 returns no attention weights unless
    output_attentions."""
    assert attention_mask is None  # unpadded input: 5.25 passes none; 4.16 made its own
    b, _, s, d = query.shape
    # 4.16 BertModel.forward: torch.ones((batch, seq)) -> get_extended_attention_mask
    # (modeling_utils.py): m[:, None, None, :].to(self.dtype); (1.0 - m) * -10000.0
    extended = (1.0 - torch.ones((b, s), dtype=query.dtype)[:, None, None, :]) * -10000.0
    attention_scores = torch.matmul(query, key.transpose(-1, -2))
    attention_scores = attention_scores / math.sqrt(d)
    attention_scores = attention_scores + extended
    attention_probs = torch.nn.functional.softmax(attention_scores, dim=-1)
    attention_probs = torch.nn.functional.dropout(
        attention_probs, p=dropout, training=module.training
    )
    context_layer = torch.matmul(attention_probs, value)
    context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
    return context_layer, None  # attention_scores stays bound until here, as in 4.16


@contextlib.contextmanager
def stack(softmax_input: bool, hf416_attention: bool) -> Iterator[None]:
    from transformers.models.bert import modeling_bert

    saved = torch.nn.functional.softmax, modeling_bert.eager_attention_forward
    try:
        if softmax_input:
            torch.nn.functional.softmax = softmax_110  # type: ignore[assignment]
        if hf416_attention:
            modeling_bert.eager_attention_forward = attention_416
        yield
    finally:
        torch.nn.functional.softmax, modeling_bert.eager_attention_forward = saved


def run(batch: int, optim: str, variant: str) -> dict[str, Any]:
    with stack(*VARIANTS[variant]):
        rec, held, made = trace(batch, optim)
    result = allocator.replay(replay_events(rec, held))
    used = result.peak_reserved / GIB + CONTEXT_MIB / 1024
    published = PUBLISHED_MIB[batch, optim] / 1024
    softmax_saved = sum(
        e[2] for e in rec.events if e[0] == "alloc" and made[e[1]].startswith("aten._softmax")
    )
    return {
        "batch": batch,
        "optimizer": optim,
        "variant": variant,
        "published_nvidia_smi_gib": published,
        "peak_allocated_gib": result.peak_allocated / GIB,
        "peak_reserved_gib": result.peak_reserved / GIB,
        "device_used_gib": used,
        "error": used / published - 1,
        "softmax_outputs_gib": softmax_saved / GIB,
    }


def main() -> None:
    started = time.time()
    rows = []
    for batch, optim, variant in RUNS:
        row = run(batch, optim, variant)
        rows.append(row)
        print(
            f"batch {batch} {optim:9} {variant:15} allocated {row['peak_allocated_gib']:.3f} "
            f"reserved {row['peak_reserved_gib']:.3f} -> {row['device_used_gib']:.3f} GiB vs "
            f"{row['published_nvidia_smi_gib']:.3f} ({row['error']:+.1%})",
            flush=True,
        )
    doc = {
        **stamp(torch=torch.__version__),
        "command": "PYTHONPATH=$PWD python benchmarks/bert_2022_stack.py",
        "source": SOURCES["hf-bert"]["reference"],
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
