"""Measure what torchtitan's own Llama 3 or Qwen3 holds for backward after forward + its loss
(CPU).

Used by tests/test_torchtitan_activations.py and benchmarks/torchtitan_activations.py. Builds
torchtitan 0.3.0's `Llama3Model` from its own config factory (`_build_llama3_layers`), or its
`Qwen3Model` from `_build_qwen3_layers` (`Shape.model` "qwen3": q_norm / k_norm, an explicit
head_dim, CosSinRoPE, optionally tied embeddings, as its flavors in models/qwen3/__init__.py),
with a tiny shape and SDPA as the inner attention (`ScaledDotProductAttention`, the attention of
torchtitan's Dec 2024 Llama; 0.3.0's language-model configs default to flex, which needs
compile on CPU), applies torchtitan's own checkpointing (`FullAC`, `SelectiveAC`,
distributed/activation_checkpoint.py) and runs `model(tokens)` + `cross_entropy_loss`.

What is held is measured without saved_tensors_hooks (torch's selective checkpointing keeps its
saves in a cache those hooks do not see): a TorchDispatchMode records the storage of every
tensor any op returns during forward + loss; afterwards the storages still alive (weak
references not expired) are what the forward holds, deduplicated by address. Excluded: the
parameters and buffers, the loss value itself (the step's result, not saved), the logits (the
model output, dropped before the measure: memplan counts them as `logits_bytes`). Added: the
token ids and labels, which the embedding and nll_loss save (they exist before the forward, so
the dispatch mode never sees them made). Not seen: the CPU RNG state `ptd_checkpoint_wrapper`
stashes per block (`preserve_rng_state`, made outside the dispatcher; host memory on a GPU run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH, SEQ = 64, 4, 2, 192, 256, 2, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Mla:
    """DeepSeek-V3's multi-head latent attention and MoE layout (Shape.model "deepseek_v3"),
    as models/deepseek_v3/__init__.py::build_mla_moe_layers takes them."""

    q_lora: int = 0
    kv_lora: int = 32
    nope: int = 16
    rope: int = 8
    v_dim: int = 16
    dense_layers: int = 1
    shared: int = 1
    groups: int = 4
    limited: int = 2
    route_scale: float = 2.5
    route_norm: bool = True


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    batch: int = BATCH
    seq: int = SEQ
    fused_qkv: bool = True
    dim: int = DIM
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    ffn: int = FFN
    vocab: int = VOCAB
    model: str = "llama"
    """"llama" (Llama3Model) or "qwen3" (Qwen3Model, dense)."""
    head_dim: int = 0
    """Qwen3's explicit head_dim (0: dim // heads)."""
    tied: bool = False
    """Qwen3's enable_weight_tying (its 0.6B, 1.7B and 4B flavors)."""
    experts: int = 8
    """"qwen3_moe": routed experts per layer."""
    top_k: int = 2
    """"qwen3_moe": experts per token."""
    moe_ffn: int = 48
    """"qwen3_moe": each expert's hidden width (moe_hidden_dim)."""
    mla: Mla = Mla()
    """"deepseek_v3": the attention and MoE layout (`ffn` is the dense layers' hidden)."""
    routing: str = "seeded"
    """"qwen3_moe": "seeded" (the router's gate as `build` initialises it, seed 0),
    "balanced" (torchtitan's own `_debug_force_load_balance` round-robin) or "collapsed"
    (a zero gate and an expert bias that sends every token to the same top_k experts: the
    other experts get no token)."""


QWEN3_TINY = Shape(model="qwen3", head_dim=32, tied=True)
"""Qwen3 0.6B's structure shrunk: heads x head_dim = 2 x dim (16 x 128 = 2 x 1024), 2 query
heads per k/v head, tied embeddings."""

QWEN3_MOE_TINY = Shape(model="qwen3_moe", head_dim=32, experts=8, top_k=2, moe_ffn=48)
"""Qwen3-30B-A3B's structure shrunk (models/qwen3/__init__.py::_30b_a3b): heads x head_dim =
2 x dim (32 x 128 = 2 x 2048), 2 query heads per k/v head (32 / 4 there), top_k / experts =
1 / 4 (8 / 128 there), moe_hidden_dim < dim (768 < 2048), untied, every layer MoE."""


LLAMA31_8B = Shape(
    layers=2, batch=2, seq=8192, dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256
)
"""Two blocks of Llama 3.1 8B at torchtitan's published local batch, 2 x 8192 (fake tensors)."""


class _Made(TorchDispatchMode):
    """Every storage an op returns, by weak reference."""

    def __init__(self, key: Any) -> None:
        super().__init__()
        self.key = key
        self.made: list[tuple[StorageWeakRef, int, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.made.append((StorageWeakRef(st), self.key(st), st.nbytes()))
        return out


def config(shape: Shape) -> Any:
    """torchtitan's Llama 3 (or Qwen3) config at `shape`, SDPA as the inner attention."""
    if shape.model in ("qwen3", "qwen3_moe"):
        return qwen3_config(shape)
    if shape.model == "deepseek_v3":
        return deepseek_v3_config(shape)
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    sdpa = ScaledDotProductAttention.Config()
    original = llama3.get_attention_config
    llama3.get_attention_config = lambda backend: sdpa  # 0.3.0 refuses "sdpa" for LMs
    try:
        return llama3.Llama3Model.Config(
            dim=shape.dim,
            vocab_size=shape.vocab,
            tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.dim),
            norm=RMSNorm.Config(normalized_shape=shape.dim),
            lm_head=Linear.Config(in_features=shape.dim, out_features=shape.vocab),
            layers=llama3._build_llama3_layers(
                n_layers=shape.layers,
                dim=shape.dim,
                n_heads=shape.heads,
                n_kv_heads=shape.kv_heads,
                hidden_dim=shape.ffn,
                fuse_qkv=shape.fused_qkv,
                rope=ComplexRoPE.Config(
                    dim=shape.dim // shape.heads,
                    max_seq_len=max(128, shape.seq),
                    theta=500000,
                    scaling="llama",
                ),
                attn_backend="sdpa",
            ),
        )
    finally:
        llama3.get_attention_config = original


def qwen3_config(shape: Shape) -> Any:
    """torchtitan's dense Qwen3 config at `shape` (models/qwen3/__init__.py::_0_6b's
    structure: `_qwen3_norm`s, `_build_qwen3_layers` with fused or separate q/k/v,
    CosSinRoPE theta 1e6), SDPA as the inner attention."""
    import torchtitan.models.qwen3 as qwen3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention

    head_dim = shape.head_dim or shape.dim // shape.heads
    rope = CosSinRoPE.Config(dim=head_dim, max_seq_len=max(128, shape.seq), theta=1000000.0)
    sdpa = ScaledDotProductAttention.Config()
    original = qwen3.get_attention_config
    qwen3.get_attention_config = lambda backend: sdpa  # 0.3.0 refuses "sdpa" for LMs
    try:
        return qwen3.Qwen3Model.Config(
            vocab_size=shape.vocab,
            dim=shape.dim,
            norm=qwen3._qwen3_norm(shape.dim),
            enable_weight_tying=shape.tied,
            tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.dim),
            lm_head=Linear.Config(in_features=shape.dim, out_features=shape.vocab),
            layers=_qwen3_layers(qwen3, shape, head_dim, rope),
        )
    finally:
        qwen3.get_attention_config = original


def deepseek_v3_config(shape: Shape) -> Any:
    """torchtitan's DeepSeek-V3 config at `shape` (models/deepseek_v3/__init__.py::_671b's
    structure: `_build_dsv3_layers`, MLA, dense first layers, sigmoid router with
    node-limited groups, route_norm, route_scale, shared experts, yarn ComplexRoPE; no MTP
    layer, the 0.3.0 default), SDPA as the inner attention."""
    import torchtitan.models.deepseek_v3 as ds
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    m = shape.mla
    sdpa = ScaledDotProductAttention.Config()
    original = ds.get_attention_config
    ds.get_attention_config = lambda backend: sdpa  # 0.3.0 refuses "sdpa" for LMs
    try:
        layers = ds._build_dsv3_layers(
            n_layers=shape.layers,
            n_dense_layers=m.dense_layers,
            dim=shape.dim,
            n_heads=shape.heads,
            q_lora_rank=m.q_lora,
            kv_lora_rank=m.kv_lora,
            qk_nope_head_dim=m.nope,
            qk_rope_head_dim=m.rope,
            v_head_dim=m.v_dim,
            mscale=1.0,
            dense_hidden_dim=shape.ffn,
            moe_hidden_dim=shape.moe_ffn,
            num_experts=shape.experts,
            num_shared_experts=m.shared,
            router_top_k=shape.top_k,
            router_score_func="sigmoid",
            router_num_expert_groups=m.groups or None,
            router_num_limited_groups=m.limited or None,
            router_route_scale=m.route_scale,
            router_route_norm=m.route_norm,
            attn_backend="sdpa",
            moe_comm_backend="standard",
            non_blocking_capacity_factor=None,
            rope=ComplexRoPE.Config(
                dim=m.rope,
                max_seq_len=max(128, shape.seq),
                theta=10000.0,
                scaling="yarn",
                rope_factor=40.0,
                beta_fast=32.0,
                beta_slow=1.0,
                original_seq_len=16,
            ),
        )
    finally:
        ds.get_attention_config = original
    if shape.routing == "balanced":
        for layer in layers:
            if layer.moe is not None:
                layer.moe.router._debug_force_load_balance = True
    return ds.DeepSeekV3Model.Config(
        vocab_size=shape.vocab,
        dim=shape.dim,
        tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.dim),
        norm=RMSNorm.Config(normalized_shape=shape.dim),
        lm_head=Linear.Config(in_features=shape.dim, out_features=shape.vocab),
        layers=layers,
    )


def _qwen3_layers(qwen3: Any, shape: Shape, head_dim: int, rope: Any) -> Any:
    """torchtitan's own Qwen3 layer configs: dense (`_build_qwen3_layers`) or MoE
    (`_build_qwen3_moe_layers`, the `standard` token dispatcher, local at EP 1)."""
    common = {
        "fuse_qkv": shape.fused_qkv,
        "n_layers": shape.layers,
        "dim": shape.dim,
        "n_heads": shape.heads,
        "n_kv_heads": shape.kv_heads,
        "head_dim": head_dim,
        "attn_backend": "sdpa",
        "rope": rope,
    }
    if shape.model == "qwen3":
        return qwen3._build_qwen3_layers(hidden_dim=shape.ffn, **common)
    layers = qwen3._build_qwen3_moe_layers(
        moe_hidden_dim=shape.moe_ffn,
        num_experts=shape.experts,
        top_k=shape.top_k,
        moe_comm_backend="standard",
        **common,
    )
    if shape.routing == "balanced":
        for layer in layers:
            layer.moe.router._debug_force_load_balance = True
    return layers


def route(model: torch.nn.Module, shape: Shape) -> None:
    """`shape.routing` "collapsed": every MoE router's gate zeroed and its expert bias set so
    that topk picks experts 0 .. top_k - 1 for every token."""
    if shape.routing != "collapsed":
        return
    for m in model.modules():
        if hasattr(m, "expert_bias_E") and m.expert_bias_E is not None:
            with torch.no_grad():
                m.router.gate.weight.zero_()
                m.expert_bias_E.zero_()
                m.expert_bias_E[: shape.top_k] = 1.0


def build(dtype: str, shape: Shape) -> torch.nn.Module:
    """torchtitan's Llama 3 at `shape`, parameters in `dtype` (as FSDP2's param_dtype gives
    them: the complex RoPE cache stays complex64)."""
    torch.manual_seed(0)
    model = config(shape).build()
    model.init_states()
    route(model, shape)
    for p in model.parameters():
        p.data = p.data.to(DTYPES[dtype])
    return model


def checkpoint(model: torch.nn.Module, mode: str, every: int = 1) -> None:
    """torchtitan's own checkpointing: `full` (FullAC on every `every`-th block: block i when
    (i + 1) % every == 0, torchtitan 9dec370's layer SAC rule, with 0.3.0's FullAC wrapper) or
    `selective-op` (SelectiveAC.apply)."""
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    if mode == "full":
        ac = FullAC(FullAC.Config())
        for i, (name, block) in enumerate(list(model.layers.named_children())):
            if (i + 1) % every == 0:
                model.layers.register_module(name, ac._wrap_block(block, base_fqn=f"layers.{name}"))
    elif mode == "selective-op":
        SelectiveAC(SelectiveAC.Config()).apply(model)
    elif mode != "none":
        raise ValueError(mode)


def held_bytes(dtype: str, mode: str, shape: Shape = Shape(), every: int = 1) -> int:
    """Bytes torchtitan's Llama 3 holds for backward after forward + loss (module docstring)."""
    model = build(dtype, shape)
    checkpoint(model, mode, every)
    return _run(model, shape, key=lambda st: st.data_ptr())


def held_bytes_fake(dtype: str, mode: str, shape: Shape = LLAMA31_8B) -> int:
    """`held_bytes` under FakeTensorMode (CPU kernels' meta functions, no memory): the model is
    built on the meta device and materialised as fake CPU tensors; storages are told apart by
    their StorageImpl (fake storages have no address)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = config(shape).build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            p.data = p.data.to(DTYPES[dtype])
        for m in model.modules():
            if hasattr(m, "cache") and hasattr(m, "_init_self_buffers"):
                m._init_self_buffers(buffer_device=torch.device("cpu"))
        checkpoint(model, mode)
        return _run(model, shape, key=lambda st: int(st._cdata))


def _run(model: torch.nn.Module, shape: Shape, *, key: Any) -> int:
    from torchtitan.components.loss import cross_entropy_loss

    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    inputs = (*model.parameters(), *model.buffers(), tokens, labels)
    before = {key(t.untyped_storage()) for t in inputs}
    spy = _Made(key)
    with spy:
        logits = model(tokens)
        loss = cross_entropy_loss(logits, labels)
    del logits
    before.add(key(loss.untyped_storage()))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    return sum(alive.values()) + tokens.nbytes + labels.nbytes
