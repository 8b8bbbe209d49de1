"""Megatron-Core 0.12's GPTModel forward on the CPU (memplan.verify.megatron_core runs it):
the stand-ins for its CUDA-only calls, the balanced routing memplan's MoE rule assumes, its RNG
tracker seeded on CPU generators, and a one-rank process group.

Three CUDA-only calls remain on its forward path (five with
the alltoall MoE dispatcher: 4 and 5 below); `cpu_stand_ins` replaces each for the run, none
of which changes what autograd saves:

1. models/common/embeddings/rotary_pos_embedding.py::RotaryEmbedding.forward moves `inv_freq`
   to `torch.cuda.current_device()`, and utils.py::GlobalMemoryBuffer.get_tensor allocates the
   attention's `baddbmm` input buffer there: `torch.cuda.current_device` answers the CPU device.
   RoPE's frequencies are made from a buffer under no grad; the buffer is `baddbmm`'s `input`
   with beta=0, which its backward never reads (derivatives.yaml baddbmm: self's gradient is
   `grad * beta`; batch1, batch2 are what it saves).
2. tensor_parallel/random.py::model_parallel_cuda_manual_seed seeds the CUDA generator and
   CudaRNGStatesTracker keeps CUDA generator states, which DotProductAttention's dropout forks
   (`get_cuda_rng_tracker().fork()`) and CheckpointFunction stashes on its ctx (Python
   attributes, not `save_for_backward`): `_get_cuda_rng_state` / `_set_cuda_rng_state` read and
   write the CPU generator's state, and the tracker's states are CPU generator states seeded
   as model_parallel_cuda_manual_seed seeds them. RNG bookkeeping only: no tensor autograd saves.
3. transformer/utils.py::get_default_causal_mask (lru_cache'd, which FusedScaleMaskSoftmax.
   forward_torch_softmax takes when no mask is passed) builds `torch.triu(torch.ones(sq, sq,
   device="cuda"), diagonal=1).bool()`: the same on the CPU. The mask is cached across steps
   (`masked_fill_` saves it, but it is made once: a persistent tensor, not a per-step one).
4. transformer/moe/token_dispatcher.py::MoEAlltoAllTokenDispatcher makes a `torch.cuda.Stream`
   for its device-to-host copies and enters it: `_Stream`, bookkeeping only.
5. moe_utils.py::maybe_move_tensor_to_cpu copies the alltoall dispatcher's split sizes and
   token counts to the host on CUDA and leaves CPU tensors as they are (which
   all_to_all_single refuses as sizes): `_to_host` answers as on CUDA, and the host copies
   are not counted as held.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """The CUDA-only calls of Megatron-Core 0.12's forward, answered on CPU (module docstring:
    1 to 3), restored on exit."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    saved = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
    streams = (torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream)
    mask = fused_softmax.get_default_causal_mask
    fused_softmax.get_default_causal_mask = causal_mask
    torch.cuda.current_device = lambda: torch.device("cpu")
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host
    cuda: Any = torch.cuda
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream.CURRENT
    cuda.stream = lambda s: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = saved
        cuda.Stream, cuda.current_stream, cuda.stream = streams
        token_dispatcher.maybe_move_tensor_to_cpu = to_host
        fused_softmax.get_default_causal_mask = mask


class _Stream:
    """Stand-in 4 (the alltoall dispatcher): transformer/moe/token_dispatcher.py::
    MoEAlltoAllTokenDispatcher.__init__ makes `torch.cuda.Stream()` for its device-to-host
    copies of the split sizes, and `_maybe_dtoh_and_synchronize` compares it with
    `torch.cuda.current_stream()`, waits on it and enters `torch.cuda.stream(...)`: on the CPU
    the copies are `maybe_move_tensor_to_cpu`'s no-op (`tensor.is_cuda` False), so the stream
    is bookkeeping only (wait_stream, synchronize do nothing)."""

    CURRENT: _Stream

    def wait_stream(self, other: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


_Stream.CURRENT = _Stream()

HOST_COPIES: list[tuple[StorageWeakRef, int]] = []
"""Storages `_to_host` made: host memory on CUDA, left out of what the device holds (those
still alive: a dead one's address may be reused by a device tensor)."""


def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Stand-in 5 (the alltoall dispatcher): transformer/moe/moe_utils.py::
    maybe_move_tensor_to_cpu copies its split sizes and token counts to the host when they are
    on the GPU (`tensor.to("cpu", non_blocking=True)`, then `.numpy()` for the splits, which
    all_to_all_single takes as sizes) and the device tensor dies; on the CPU it returns them
    as they are, tensors that all_to_all_single refuses as sizes and that stay alive as the
    dispatcher's attributes. Answered as on CUDA: a host copy (a numpy array, or a tensor
    whose storage `_held` counts as host memory, not the device's)."""
    if not torch.is_tensor(tensor):
        return tensor
    if as_numpy:
        import numpy as np

        return np.array(tensor.tolist())
    copy = tensor.detach().clone()
    storage = copy.untyped_storage()
    HOST_COPIES.append((StorageWeakRef(storage), storage.data_ptr()))
    return copy


ROUTING_PULL = 1e3
"""What the balanced-routing stand-in adds to a chosen expert's router logit: far above the
real logits (a tiny model's are under 1), so top-k picks exactly the chosen experts."""


@contextlib.contextmanager
def balanced_routing() -> Iterator[None]:
    """Token i (in the router's flattened [s b] order) routed to experts (i k + j) mod E,
    j < k: every expert receives tokens x k / E (token, expert) pairs from every rank, the
    balanced routing memplan's MoE rule assumes. transformer/moe/router.py::Router.gating's
    logits get a constant (no grad) added, `ROUTING_PULL` on the chosen experts: the add saves
    nothing (AddBackward0) and its output replaces the logits tensor byte for byte, which
    nothing saved (F.linear keeps its input and weight), so what autograd holds is the real
    router's."""
    from megatron.core.transformer.moe.router import Router

    gating = Router.gating

    def steered(self: Any, input: torch.Tensor) -> torch.Tensor:
        logits = gating(self, input)
        e, k = self.config.num_moe_experts, self.config.moe_router_topk
        n = logits.numel() // e
        chosen = (torch.arange(n).unsqueeze(1) * k + torch.arange(k)) % e
        pull = torch.zeros(n, e).scatter_(1, chosen, ROUTING_PULL)
        return logits + pull.view(logits.shape).to(logits.dtype)

    Router.gating = steered  # type: ignore[method-assign]
    try:
        yield
    finally:
        Router.gating = gating  # type: ignore[method-assign]


@functools.lru_cache(maxsize=32)
def causal_mask(sq: int) -> torch.Tensor:
    """transformer/utils.py::get_default_causal_mask on the CPU (stand-in 3)."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def seed_tracker(seed: int) -> None:
    """tensor_parallel/random.py::model_parallel_cuda_manual_seed's three tracker states, as CPU
    generator states (the same seeds: data seed, seed + 2718 + tp rank, seed + 1024 + ...)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker()
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    before = torch.get_rng_state()
    for name, s in (
        (mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed),
        (mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718),
        (mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024),
    ):
        torch.manual_seed(s)
        tracker.states_[name] = torch.get_rng_state()
        tracker.seeds_.add(s)
    torch.set_rng_state(before)


@contextlib.contextmanager
def one_rank() -> Iterator[None]:
    """A one-rank gloo group (an in-memory store, no port) and Megatron's model-parallel state
    at TP = PP = 1 (parallel_state.initialize_model_parallel), both torn down on exit: other
    code in the process may start its own default group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
    finally:
        dist.destroy_process_group()
