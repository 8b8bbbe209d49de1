"""Measure what torchtitan 0.3.0's own gpt-oss holds for backward after forward + its loss
(CPU), for tests/test_torchtitan_gptoss.py and benchmarks/torchtitan_gptoss.py.

Builds `GptOssModel` from torchtitan's own layer factory (models/gpt_oss/__init__.py::
_build_gptoss_layers: fused wqkv and wo with biases, sinks, the MoE with a biased gate,
GptOssGroupedExperts' biased experts and clamped SwiGLU, even layers a 128-token sliding window)
with `_make_gptoss_attn_config`'s head shape narrowed (its defaults, 64 heads x 64, 8 k/v
heads, are the 20b/120b's), the default `varlen` attention and yarn CosSinRoPE as `_20b`
has it; bf16 parameters (FSDP2's param_dtype); torchtitan's own checkpointing
(tests/torchtitan_probe.checkpoint); `model(tokens, positions=..., attention_masks=...)` with
the per-document positions and the VarlenMetadata the trainer makes (trainer.py::
post_dataloading_process, GptOssModel.get_attention_masks), then cross_entropy_loss.

torchtitan's varlen attention calls `torch_attn::_varlen_attn`, whose kernel is CUDA's flash
varlen (torch 2.13 nn/attention/varlen.py). `cpu_varlen_kernel` registers a CPU kernel for it
that allocates the outputs exactly as the op's own fake (`_varlen_attn_fake`) does (out like
q, lse [heads, T] fp32, rng_state [2] uint64) and fills them with a plain softmax attention
over each document and window (values only steer the router). What autograd keeps of the op
is its own registration's (`_setup_context`), unchanged.

What is held is measured as tests/torchtitan_probe.py measures it (the storages alive after
forward + loss, parameters, buffers, inputs, the step's VarlenMetadata and the loss excluded,
the token ids and labels added).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from tests.torchtitan_probe import _Made, checkpoint

_REGISTERED: list[bool] = []


@dataclass(frozen=True)
class GptOssShape:
    layers: int = 2
    batch: int = 2
    seq: int = 16
    dim: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    experts: int = 8
    top_k: int = 2
    ffn: int = 32
    """Each expert's hidden width (hidden_dim; mlp1 is 2 x ffn wide)."""
    vocab: int = 256
    documents: int = 1
    """Documents packed in each row (positions restart at each)."""


def _attend(query: Any, key: Any, value: Any, cu: Any, scale: float, window: int) -> Any:
    """Plain causal softmax attention per document (and window), outputs in q's layout."""
    out = torch.zeros_like(query)
    lse = torch.zeros((query.size(1), query.size(0)), dtype=torch.float32)
    rep = query.size(1) // key.size(1)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        q = query[a:b].float().transpose(0, 1)
        k = key[a:b].float().transpose(0, 1).repeat_interleave(rep, 0)
        v = value[a:b].float().transpose(0, 1).repeat_interleave(rep, 0)
        s = q @ k.transpose(1, 2) * scale
        i = torch.arange(b - a)
        mask = i[None, :] > i[:, None]
        if window >= 0:
            mask |= i[:, None] - i[None, :] > window
        s = s.masked_fill(mask, -math.inf)
        lse[:, a:b] = torch.logsumexp(s, -1)
        out[a:b] = (torch.softmax(s, -1) @ v).transpose(0, 1).to(query.dtype)
    return out, lse


def cpu_varlen_kernel() -> None:
    """A CPU kernel for torch_attn::_varlen_attn (module docstring); registered once."""
    if _REGISTERED:
        return

    def kernel(
        query: Any,
        key: Any,
        value: Any,
        cu_seq_q: Any,
        cu_seq_k: Any,
        max_q: int,
        max_k: int,
        is_causal: bool = False,
        scale: float | None = None,
        window_size: list[int] | None = None,
        enable_gqa: bool = False,
        seqused_k: Any = None,
        block_table: Any = None,
        num_splits: int | None = None,
    ) -> tuple[Any, Any, Any]:
        with torch.no_grad():
            sc = scale if scale is not None else query.size(-1) ** -0.5
            left = window_size[0] if window_size else -1
            out, lse = _attend(query, key, value, cu_seq_q, sc, left)
        return out, lse, torch.zeros((2,), dtype=torch.uint64)

    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", kernel)
    _REGISTERED.append(True)


def config(shape: GptOssShape) -> Any:
    """torchtitan's GptOssModel config at `shape` (module docstring)."""
    import torchtitan.models.gpt_oss as gpt_oss
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear, RMSNorm

    rope = CosSinRoPE.Config(
        dim=shape.head_dim,
        max_seq_len=max(128, shape.seq),
        theta=150000.0,
        scaling="yarn",
        rope_factor=32,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_seq_len=4096,
    )
    original = gpt_oss._make_gptoss_attn_config
    gpt_oss._make_gptoss_attn_config = functools.partial(
        original, n_heads=shape.heads, n_kv_heads=shape.kv_heads, head_dim=shape.head_dim
    )
    try:
        layers = gpt_oss._build_gptoss_layers(
            dim=shape.dim,
            n_layers=shape.layers,
            hidden_dim=shape.ffn,
            num_experts=shape.experts,
            top_k=shape.top_k,
            load_balance_coeff=1e-3,
            attn_backend="varlen",
            moe_comm_backend="standard",
            rope=rope,
        )
    finally:
        gpt_oss._make_gptoss_attn_config = original
    return gpt_oss.GptOssModel.Config(
        dim=shape.dim,
        vocab_size=shape.vocab,
        tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.dim),
        norm=RMSNorm.Config(normalized_shape=shape.dim),
        lm_head=Linear.Config(in_features=shape.dim, out_features=shape.vocab),
        layers=layers,
    )


def build(shape: GptOssShape) -> torch.nn.Module:
    torch.manual_seed(0)
    model = config(shape).build()
    model.init_states()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def positions(shape: GptOssShape) -> torch.Tensor:
    """Per-document positions (documents of equal length per row, the last takes the rest)."""
    size = shape.seq // shape.documents
    row = [
        i % size if i < size * shape.documents else i - size * (shape.documents - 1)
        for i in range(shape.seq)
    ]
    return torch.tensor(row).repeat(shape.batch, 1)


def held_bytes(mode: str, shape: GptOssShape = GptOssShape(), every: int = 1) -> int:
    """Bytes torchtitan's gpt-oss holds for backward after forward + loss (module docstring)."""
    from torchtitan.components.loss import cross_entropy_loss

    cpu_varlen_kernel()
    model = build(shape)
    checkpoint(model, mode, every)
    torch.manual_seed(1)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    pos = positions(shape)
    masks = model.get_attention_masks(positions=pos)
    inputs = (*model.parameters(), *model.buffers(), tokens, labels, pos, *masks[:2])

    def key(st: Any) -> int:
        return int(st.data_ptr())

    before = {key(t.untyped_storage()) for t in inputs}
    spy = _Made(key)
    with spy:
        logits = model(tokens, positions=pos, attention_masks=masks)
        loss = cross_entropy_loss(logits, labels)
    del logits
    before.add(key(loss.untyped_storage()))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    return sum(alive.values()) + tokens.nbytes + labels.nbytes


def parameter_count(flavor: str) -> int:
    """The parameters of torchtitan's own gpt-oss flavor (`20b`, `120b`), built on the meta
    device from its model_registry (named_parameters: sinks and every bias included)."""
    import torchtitan.models.gpt_oss as gpt_oss

    with torch.device("meta"):
        model = gpt_oss.gptoss_configs[flavor](moe_comm_backend="standard").build()
    return sum(p.numel() for _, p in model.named_parameters())
