"""Megatron-Core's GPTModel on CPU: built with its local (non-Transformer-Engine) layer spec,
run forward + its vocab-parallel loss, and what it holds for backward measured.

Megatron-Core 0.12.0 (`pip install --no-deps megatron-core==0.12.0`) builds its GPTModel on CPU
with `use_cpu_initialization=True`, TP = PP = 1 over a one-rank gloo group
(parallel_state.initialize_model_parallel), the fused kernels off (bias_activation_fusion,
masked_softmax_fusion, gradient_accumulation_fusion, persist_layer_norm, apply_rope_fusion,
bias_dropout_fusion all False). Three CUDA-only calls remain on its forward path (five with
the alltoall MoE dispatcher), each answered on the CPU by memplan.verify.megatron_cpu.
cpu_stand_ins without changing what autograd saves.

What is held is measured as tests/torchtitan_probe.py measures torchtitan's (Megatron's
CheckpointFunction saves through `ctx.save_for_backward`, which saved_tensors_hooks see, but the
storage census counts every path alike): a TorchDispatchMode records the storage of every
tensor an op returns during forward + loss; the storages still alive after it are what the
forward holds, deduplicated by address. Excluded: parameters and buffers, the per-token loss
(the step's result), Megatron's global memory buffer and the cached causal mask (made by a warm-up
forward before the measure: persistent, not per-step; memplan.model.stacks.megatron lists them
as buffers beside the saved tensors). Added:
the token ids, which the embedding saves (they exist before the forward; the loss keeps its own
target mask and shifted targets, not the labels).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memplan.verify.megatron_cpu import (
    HOST_COPIES,
    balanced_routing,
    causal_mask,
    cpu_stand_ins,
    one_rank,
    seed_tracker,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """A Llama-like GPTModel: RMSNorm, SwiGLU, GQA, RoPE, no biases, untied output layer."""

    layers: int = 2
    batch: int = 2
    seq: int = 16
    dim: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 192
    vocab: int = 256
    experts: int = 0
    """Routed experts per layer (0: the dense MLP): Megatron-Core's MoELayer with the local
    spec's SequentialMLP, TopKRouter (softmax, aux_loss balancing at AUX_LOSS_COEFF) and the
    default allgather token dispatcher; every layer an MoE layer (Mixtral)."""
    top_k: int = 2
    qk_norm: bool = False
    """Per-head RMSNorm of the queries and keys (TransformerConfig.qk_layernorm: the local
    spec's q_layernorm / k_layernorm, torch RMSNorm over head_dim; Qwen3)."""
    head_dim: int | None = None
    """kv_channels when not dim / heads (Qwen3-MoE: 128 with hidden 2048 and 32 heads)."""
    dispatcher: str = "allgather"
    """moe_token_dispatcher_type: allgather (MoEAllGatherTokenDispatcher) or alltoall
    (MoEAlltoAllTokenDispatcher; `cpu_stand_ins` 4 and 5)."""
    capacity_factor: float | None = None
    """moe_expert_capacity_factor with moe_pad_expert_input_to_capacity (drop and pad: every
    expert's buffer padded to its capacity); None: dropless."""


def build(
    dtype: str,
    shape: Shape,
    recompute: str = "none",
    *,
    dropout: float = 0.0,
    tensor: int = 1,
    sequence_parallel: bool = False,
    expert: int = 1,
) -> Any:
    """GPTModel with get_gpt_layer_local_spec at `shape` (inside `one_rank`), parameters in
    `dtype` (bf16: a `bf16=True` TransformerConfig and the model wrapped in Float16Module,
    as Megatron-LM trains), `recompute` none / full (recompute_granularity full, method
    uniform, one layer per checkpoint) / selective (core_attn)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    seed_tracker(0)
    torch.manual_seed(0)
    knobs: dict[str, Any] = {}
    if recompute == "full":
        knobs = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    elif recompute == "selective":
        knobs = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif recompute != "none":
        raise ValueError(recompute)
    cfg = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.dim,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        use_cpu_initialization=True,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        tensor_model_parallel_size=tensor,
        sequence_parallel=sequence_parallel,
        **knobs,
        **_moe_knobs(shape, expert),
        qk_layernorm=shape.qk_norm,
        **({"kv_channels": shape.head_dim} if shape.head_dim else {}),
    )
    with cpu_stand_ins():
        model = GPTModel(
            cfg,
            get_gpt_layer_local_spec(
                num_experts=shape.experts or None,
                qk_layernorm=shape.qk_norm,
                normalization="RMSNorm",
            ),
            vocab_size=padded_vocab(shape.vocab, tensor),
            max_sequence_length=max(128, shape.seq),
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
        )
    if dtype == "bf16":
        # What Megatron-LM's get_model does with --bf16: transformer/module.py::Float16Module
        # casts every parameter and buffer (the norms' weights, RoPE's inv_freq) to bf16.
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    return model


AUX_LOSS_COEFF = 1e-2
"""--moe-aux-loss-coeff of Megatron-LM's Mixtral recipe (examples/mixtral/
train_mixtral_8x7b_distributed.sh; TransformerConfig.moe_aux_loss_coeff's comment: "1e-2 would
be a good start value"): the switch load-balancing loss runs, so its softmax scores are saved."""


def _moe_knobs(shape: Shape, expert: int) -> dict[str, Any]:
    if not shape.experts:
        return {}
    return {
        "num_moe_experts": shape.experts,
        "moe_router_topk": shape.top_k,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": AUX_LOSS_COEFF,
        "moe_token_dispatcher_type": shape.dispatcher,
        "moe_grouped_gemm": False,
        # TransformerConfig.__post_init__ asks for it with top-1 (and only then is it set).
        "moe_router_pre_softmax": shape.top_k == 1,
        "expert_model_parallel_size": expert,
        **(
            {
                "moe_expert_capacity_factor": shape.capacity_factor,
                "moe_pad_expert_input_to_capacity": True,
            }
            if shape.capacity_factor is not None
            else {}
        ),
    }


MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
"""Megatron-LM's --make-vocab-size-divisible-by default (megatron/training/arguments.py)."""


def padded_vocab(vocab: int, tensor: int) -> int:
    """The vocabulary Megatron-LM builds its GPTModel with: padded to a multiple of
    make_vocab_size_divisible_by x TP (Megatron-LM megatron/training/tokenizer/tokenizer.py::
    _vocab_size_with_padding; the training script pads, Megatron-Core takes what it is given)."""
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tensor
    return -(-vocab // multiple) * multiple


class _Made(TorchDispatchMode):
    """Every storage an op returns, by weak reference, with what made it."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[StorageWeakRef, int, int, str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.made.append(
                    (
                        StorageWeakRef(st),
                        st.data_ptr(),
                        st.nbytes(),
                        str(func),
                        tuple(t.shape),
                        t.dtype,
                    )
                )
        return out


@dataclass(frozen=True)
class Held:
    """What one forward + loss holds for backward."""

    bytes: int
    tensors: tuple[tuple[str, tuple[int, ...], str, int], ...]
    """(op that made it, shape, dtype, storage bytes), in the order made."""
    persistent: int = 0
    """Bytes kept across steps outside autograd: parallel_state's global memory buffer, the
    cached causal mask, the MoE aux-loss tracker (memplan.model.stacks.megatron.
    persistent_buffers lists them)."""
    parameters: tuple[int, int] = (0, 0)
    """The rank's (dense, expert) parameter elements: Megatron marks expert parameters
    `allreduce = False` (transformer/moe/experts.py), which its DDP buckets and distributed
    optimizer keep apart over the expert-data-parallel group
    (distributed/distributed_data_parallel.py, `expert_parallel_params`)."""


def _inputs(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    position = torch.arange(shape.seq).unsqueeze(0).expand(shape.batch, -1)
    return tokens, position, labels


def held(
    dtype: str, shape: Shape = Shape(), recompute: str = "none", *, dropout: float = 0.0
) -> Held:
    """Bytes Megatron-Core's GPTModel (local spec) holds for backward after forward + its loss
    (module docstring), then its backward run to the end."""
    with one_rank(), cpu_stand_ins(), balanced_routing():
        return _held(dtype, shape, recompute, dropout)


def _held(
    dtype: str,
    shape: Shape,
    recompute: str,
    dropout: float,
    *,
    tensor: int = 1,
    expert: int = 1,
    sequence_parallel: bool = False,
) -> Held:
    _fresh_persistent_state()
    model = build(
        dtype,
        shape,
        recompute,
        dropout=dropout,
        tensor=tensor,
        sequence_parallel=sequence_parallel,
        expert=expert,
    )
    model.train()
    tokens, position, labels = _inputs(shape)
    # Warm-up: makes the global memory buffer, RoPE's cached table and the causal mask.
    model(tokens, position, None, labels=labels).sum().backward()
    model.zero_grad(set_to_none=True)
    persistent = (*model.parameters(), *model.buffers(), *_global_buffers(), *_moe_tracker())
    persistent += (causal_mask(shape.seq), tokens, position, labels)
    before = {t.untyped_storage().data_ptr() for t in persistent}
    spy = _Made()
    HOST_COPIES.clear()
    with spy:
        loss = model(tokens, position, None, labels=labels)
    # The loss all-reduces its max, predicted logits and sum (cross_entropy.py, over the TP
    # group): gloo's worker threads (two per process group) can still hold the last one's
    # tensor for a moment after the call returns. A barrier behind it on each thread, then a
    # moment for the worker to drop its reference, before anything is read.
    for _ in range(2):
        torch.distributed.barrier()
    time.sleep(0.05)
    gc.collect()
    before.add(loss.untyped_storage().data_ptr())
    # The alltoall dispatcher's host copies (stand-in 5).
    before |= {ptr for ref, ptr in HOST_COPIES if not ref.expired()}
    alive: dict[int, tuple[str, tuple[int, ...], str, int]] = {}
    for ref, key, n, op, shp, dt in spy.made:
        if not ref.expired() and key not in before and key not in alive:
            alive[key] = (op, shp, str(dt).removeprefix("torch."), n)
    # One TP rank embeds the ids themselves (they exist before the forward: added here); over
    # more TP ranks VocabParallelEmbedding embeds a masked copy made in the forward (counted).
    total = sum(v[3] for v in alive.values()) + (tokens.nbytes if tensor == 1 else 0)
    loss.sum().backward()  # the backward these tensors serve runs to the end
    params = list(model.parameters())
    experts = sum(p.numel() for p in params if not getattr(p, "allreduce", True))
    dense = sum(p.numel() for p in params) - experts
    kept = (*_global_buffers(), *_moe_tracker(), causal_mask(shape.seq))
    return Held(
        bytes=total,
        tensors=tuple(alive.values()),
        persistent=sum(t.untyped_storage().nbytes() for t in kept),
        parameters=(dense, experts),
    )


Case = tuple[str, Shape, str, float]
"""(dtype, shape, recompute, dropout): one measure of `held`."""


def held_tensor_parallel(
    cases: list[Case], tensor: int, *, sequence_parallel: bool = False
) -> list[list[Held]]:
    """What each of `tensor` TP ranks holds (`held`'s measure, [case][rank]): Megatron-Core's
    model-parallel state at TP = `tensor` over that many gloo ranks, one spawned process each
    (a TCP store on a free local port), the same stand-ins on every rank."""
    return held_parallel(cases, tensor=tensor, sequence_parallel=sequence_parallel)


def held_parallel(
    cases: list[Case], *, tensor: int = 1, expert: int = 1, sequence_parallel: bool = False
) -> list[list[Held]]:
    """`held_tensor_parallel` over max(TP, EP) gloo ranks: parallel_state.
    initialize_model_parallel(TP, 1, expert_model_parallel_size=EP), EP carved out of the
    data-parallel ranks as Megatron-LM does (TP x EP ranks: TP = 1 and EP = 2 is two
    data-parallel ranks holding two experts each). MoE shapes run under `balanced_routing`;
    every rank embeds the same tokens."""
    ranks = _on_ranks(cases, tensor, expert, sequence_parallel, refusals=False)
    return [
        [
            Held(
                bytes=r[i]["bytes"],
                tensors=tuple(map(tuple, r[i]["tensors"])),
                persistent=r[i]["persistent"],
                parameters=tuple(r[i]["parameters"]),
            )
            for r in ranks
        ]
        for i in range(len(cases))
    ]


def refusals_parallel(
    cases: list[Case], *, tensor: int = 1, expert: int = 1, sequence_parallel: bool = False
) -> list[list[str]]:
    """What Megatron-Core raises for each case on each of TP x EP gloo ranks ([case][rank]:
    `Type: message`, '' where it ran): `held_parallel` for layouts it refuses (TP with MoE
    under the local spec: every rank raises at the same point, before or after the same
    collectives, so none waits on another)."""
    ranks = _on_ranks(cases, tensor, expert, sequence_parallel, refusals=True)
    return [[r[i] for r in ranks] for i in range(len(cases))]


def _on_ranks(
    cases: list[Case], tensor: int, expert: int, sequence_parallel: bool, *, refusals: bool
) -> list[list[Any]]:
    """Each of TP x EP spawned gloo ranks' results ([rank][case], `_rank`'s), read back from
    the JSON file each rank writes."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    world = tensor * expert
    with tempfile.TemporaryDirectory() as out:
        spawn: Any = mp
        spawn.start_processes(
            _rank,
            args=(world, tensor, expert, free_port(), cases, sequence_parallel, out, refusals),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _rank(
    rank: int,
    world: int,
    tensor: int,
    expert: int,
    port: int,
    cases: list[Case],
    sequence_parallel: bool,
    out: str,
    refusals: bool,
) -> None:
    """One gloo rank of `_on_ranks`: every case's `_held` measure, or with `refusals` what it
    raises ('' where it ran)."""
    import json

    from megatron.core import parallel_state

    from memplan.verify.launch import local_group

    torch.set_num_threads(1)
    with local_group(rank, world, port):
        parallel_state.initialize_model_parallel(tensor, 1, expert_model_parallel_size=expert)
        try:
            results: list[Any] = []
            with cpu_stand_ins(), balanced_routing():
                for dtype, shape, recompute, dropout in cases:
                    try:
                        h = _held(
                            dtype, shape, recompute, dropout, tensor=tensor, expert=expert,
                            sequence_parallel=sequence_parallel,
                        )  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - what Megatron raises is the result
                        if not refusals:
                            raise
                        results.append(f"{type(exc).__name__}: {exc}")
                        continue
                    results.append(
                        ""
                        if refusals
                        else {
                            "bytes": h.bytes,
                            "tensors": h.tensors,
                            "persistent": h.persistent,
                            "parameters": h.parameters,
                        }
                    )
            Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        finally:
            parallel_state.destroy_model_parallel()


def _fresh_persistent_state() -> None:
    """A new global memory buffer and an empty MoE tracker, as a fresh process has: what one
    case measures as persistent is then its own (parallel_state keeps both per process)."""
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    ps: Any = parallel_state
    ps._GLOBAL_MEMORY_BUFFER = GlobalMemoryBuffer()
    ps._MOE_LAYER_WISE_LOGGING_TRACKER = {}


def _moe_tracker() -> list[torch.Tensor]:
    """parallel_state's MoE logging tracker (moe_utils.py::save_to_aux_losses_tracker: a
    [layers] fp32 tensor per loss, made by the first forward and kept: persistent)."""
    from megatron.core import parallel_state

    tracker = parallel_state.get_moe_layer_wise_logging_tracker()
    return [v["values"] for v in tracker.values()]


def _global_buffers() -> list[torch.Tensor]:
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer()
    return list(buf.buffer.values()) if buf is not None else []
