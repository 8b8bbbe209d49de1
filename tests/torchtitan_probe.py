"""Measure what torchtitan's own Llama 3 holds for backward after forward + its loss (CPU).

Used by tests/test_torchtitan_activations.py and benchmarks/torchtitan_activations.py. Builds
torchtitan 0.3.0's `Llama3Model` from its own config factory (`_build_llama3_layers`) with a
tiny shape and SDPA as the inner attention (`ScaledDotProductAttention`, the attention of
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
class Shape:
    layers: int = 2
    batch: int = BATCH
    seq: int = SEQ
    fused_qkv: bool = True


class _Made(TorchDispatchMode):
    """Every storage an op returns, by weak reference."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[StorageWeakRef, int, int, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.made.append((StorageWeakRef(st), st.data_ptr(), st.nbytes(), str(func)))
        return out


def build(dtype: str, shape: Shape) -> torch.nn.Module:
    """torchtitan's Llama 3 at a tiny shape, parameters in `dtype` (as FSDP2's param_dtype
    gives them: the complex RoPE cache stays complex64)."""
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    sdpa = ScaledDotProductAttention.Config()
    original = llama3.get_attention_config
    llama3.get_attention_config = lambda backend: sdpa  # 0.3.0 refuses "sdpa" for LMs
    try:
        cfg = llama3.Llama3Model.Config(
            dim=DIM,
            vocab_size=VOCAB,
            tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM),
            norm=RMSNorm.Config(normalized_shape=DIM),
            lm_head=Linear.Config(in_features=DIM, out_features=VOCAB),
            layers=llama3._build_llama3_layers(
                n_layers=shape.layers,
                dim=DIM,
                n_heads=HEADS,
                n_kv_heads=KV_HEADS,
                hidden_dim=FFN,
                fuse_qkv=shape.fused_qkv,
                rope=ComplexRoPE.Config(
                    dim=DIM // HEADS, max_seq_len=128, theta=500000, scaling="llama"
                ),
                attn_backend="sdpa",
            ),
        )
    finally:
        llama3.get_attention_config = original
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
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
    from torchtitan.components.loss import cross_entropy_loss

    model = build(dtype, shape)
    checkpoint(model, mode, every)
    tokens = torch.randint(0, VOCAB, (shape.batch, shape.seq))
    labels = torch.randint(0, VOCAB, (shape.batch, shape.seq))
    before = {
        t.untyped_storage().data_ptr()
        for t in (*model.parameters(), *model.buffers(), tokens, labels)
    }
    spy = _Made()
    with spy:
        logits = model(tokens)
        loss = cross_entropy_loss(logits, labels)
    del logits
    before.add(loss.untyped_storage().data_ptr())
    alive = {ptr: n for ref, ptr, n, _ in spy.made if not ref.expired() and ptr not in before}
    return sum(alive.values()) + tokens.nbytes + labels.nbytes
