"""torch FSDP1 (`FullyShardedDataParallel`) on gloo CPU ranks, wrapped as accelerate wraps a
transformers model, measured: the independent oracle of memplan's fsdp1 engine
(memplan.states.engines.fsdp1; tests/test_fsdp1.py, benchmarks/fsdp1.py).

Run as a script (one JSON line per case on stdout):

    PYTHONPATH=. python tests/fsdp1_probe.py --world 2 --strategy FULL_SHARD --mp bf16

The wrapping is accelerate 1.16's for `fsdp_version: 1` under transformers' Trainer
(transformers 5.25 training_args.py::_fsdp_plugin_args, accelerate/accelerator.py::
prepare_model, accelerate/utils/dataclasses.py::FullyShardedDataParallelPlugin):
TRANSFORMER_BASED_WRAP over the model's `_no_split_modules` (LlamaDecoderLayer), the root
unit holding the rest; use_orig_params=True, sync_module_states=True, limit_all_gathers=True,
backward_prefetch None (Trainer's "NO_PREFETCH"), forward_prefetch False; mixed precision bf16
as accelerate's set_mixed_precision builds it: MixedPrecision(param_dtype=bf16,
reduce_dtype=bf16, buffer_dtype=bf16) over an fp32 model. The optimizer is torch AdamW over
`model.parameters()` (the original parameters, views into the flat shards), made after
wrapping as the Trainer makes it.

What it measures on each rank, from the objects after the second optimizer step (before
zero_grad): every FlatParameter's unsharded (padded) and sharded numel and dtype, its
gradient, and each optimizer state by name; the distinct storages of the flat parameters,
their gradients and the optimizer's state, summed. Around the second step, torch's MemTracker
(torch/distributed/_tools/mem_tracker.py, which follows FSDP1's storage resizes) gives the
peak of forward, backward and optimizer step: each phase's peak is the tracker's peak with
the peak counter restarted at the phase's start.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The tiny Llama: sizes chosen so that neither the per-tensor alignment (8 bf16 / 4 fp32
# elements) nor the world sizes divide the flat parameters (hidden 60, vocabulary 251).
CONFIG = {
    "vocab_size": 251,
    "hidden_size": 60,
    "intermediate_size": 170,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
BATCH, SEQ = 2, 16


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def wrap(
    model: torch.nn.Module,
    strategy: str,
    precision: str,
    prefetch: str = "none",
    offload: bool = False,
) -> torch.nn.Module:
    """accelerate's wrapping; `prefetch` none (the Trainer's NO_PREFETCH), pre or post
    (BackwardPrefetch.BACKWARD_PRE, torch's and Lightning's default, or BACKWARD_POST);
    `offload`: CPUOffload(offload_params=True), accelerate's `fsdp_offload_params: true`
    (utils/dataclasses.py::FullyShardedDataParallelPlugin: `CPUOffload(offload_params=...)`),
    the Trainer's `--fsdp "full_shard offload auto_wrap"`, Lightning's `cpu_offload=True`."""
    from torch.distributed.fsdp import (
        BackwardPrefetch,
        CPUOffload,
        MixedPrecision,
        ShardingStrategy,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(
        transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}
    )
    mixed = None
    if precision == "bf16":
        bf16 = torch.bfloat16
        mixed = MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)
    return FSDP(
        model,
        sharding_strategy=ShardingStrategy[strategy],
        auto_wrap_policy=policy,
        mixed_precision=mixed,
        sync_module_states=False,
        backward_prefetch={
            "none": None,
            "pre": BackwardPrefetch.BACKWARD_PRE,
            "post": BackwardPrefetch.BACKWARD_POST,
        }[prefetch],
        forward_prefetch=False,
        use_orig_params=True,
        limit_all_gathers=True,
        device_id=torch.device("cpu"),
        cpu_offload=CPUOffload(offload_params=offload),
    )


def pin_memory_as_copy() -> None:
    """CPUOffload on a CPU-only torch: FlatParamHandle.init_flat_param_attributes pins the
    host shard and `_cpu_grad` (`_local_shard.pin_memory()`, `torch.zeros_like(...)
    .pin_memory()`), which raises `RuntimeError: Cannot access accelerator device when none
    is available.` (torch 2.13 _flat_param.py:1260). Tensor.pin_memory returns a copy in
    page-locked memory; here a copy in ordinary memory (the same bytes, the same storages).
    And the root's post-backward callback waits for the gradients' device-to-host copies
    (_runtime_utils.py::_post_backward_final_callback:
    `state._device_handle.current_stream().synchronize()`), which on the CPU raises
    `AttributeError: 'Stream' object has no attribute 'synchronize'` (torch.cpu.Stream):
    CPU copies are synchronous, so here it waits for nothing."""
    if not torch.accelerator.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self.clone()  # type: ignore[method-assign]
        torch.cpu.Stream.synchronize = lambda self: None  # type: ignore[attr-defined]


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr() if st.nbytes() else id(st)] = st.nbytes()
    return sum(seen.values())


def _handles(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [m._handle for m in FSDP.fsdp_modules(model) if m._handle is not None]


def states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The rank's model states, read from FSDP1's handles and the optimizer's state."""
    units = []
    flats, grads, host = [], [], []
    for h in _handles(model):
        fp = h.flat_param
        flats.append(fp)
        if fp.grad is not None:
            grads.append(fp.grad)
        units.append(
            {
                "params": [
                    {
                        "fqn": fqn,
                        "numel": n,
                        "in_shard": info.in_shard,
                        "local": info.numel_in_shard or 0,
                    }
                    for fqn, n, info in zip(
                        fp._fqns,
                        [s.numel() for s in fp._shapes],
                        fp._shard_param_infos,
                        strict=True,
                    )
                ],
                "numels_with_padding": list(fp._numels_with_padding),
                "unpadded_unsharded": int(fp._unpadded_unsharded_size.numel()),
                # set for the sharded strategies only (FlatParamHandle._init_shard_metadata)
                "padded_unsharded": int(
                    getattr(fp, "_padded_unsharded_size", fp._unpadded_unsharded_size).numel()
                ),
                "sharded": int(fp.numel()),
                "dtype": str(fp.dtype).removeprefix("torch."),
                "grad": None
                if fp.grad is None
                else [int(fp.grad.numel()), str(fp.grad.dtype).removeprefix("torch.")],
                "mp_shard_bytes": int(fp._mp_shard.untyped_storage().nbytes())
                if hasattr(fp, "_mp_shard")
                else None,
                "full_param_padded_bytes": int(fp._full_param_padded.untyped_storage().nbytes())
                if hasattr(fp, "_full_param_padded")
                else None,
                # CPUOffload: the host shard and the host gradient (pinned on a GPU machine)
                "local_shard": _tensor_row(getattr(fp, "_local_shard", None)),
                "cpu_grad": _tensor_row(getattr(fp, "_cpu_grad", None)),
                "grad_is_cpu_grad": fp.grad is not None
                and getattr(fp, "_cpu_grad", None) is not None
                and fp.grad.untyped_storage().data_ptr()
                == fp._cpu_grad.untyped_storage().data_ptr(),
            }
        )
        if getattr(fp, "_cpu_grad", None) is not None:
            host.append(fp._cpu_grad)
        if getattr(fp, "_local_shard", None) is not None and h._offload_params:
            host.append(fp._local_shard)
    by_name: dict[str, list[int]] = {}
    opt_tensors = []
    for state in optimizer.state.values():
        for name, v in state.items():
            if isinstance(v, torch.Tensor):
                row = by_name.setdefault(name, [0, 0, 0])
                row[0] += 1
                row[1] += v.numel()
                row[2] += v.numel() * v.element_size()
                opt_tensors.append(v)
    orig_grads = [p.grad for p in model.parameters() if p.grad is not None]
    offloaded = bool(host)
    return {
        "units": units,
        # CPUOffload: what a GPU run keeps on the host (the shards, their gradients, the
        # optimizer's states: the optimizer steps the host parameters), constant over a step
        "host_bytes": _storage_bytes(host + opt_tensors) if offloaded else 0,
        "pinned_bytes": _storage_bytes(host) if offloaded else 0,
        "parameters_bytes": _storage_bytes(flats),
        "gradients_bytes": _storage_bytes(grads),
        "orig_grads_bytes": _storage_bytes(orig_grads),
        "orig_grads_share_flat_grad": _storage_bytes(grads + orig_grads) == _storage_bytes(grads),
        "optimizer": {
            k: {"tensors": v[0], "elements": v[1], "bytes": v[2]} for k, v in by_name.items()
        },
        "optimizer_bytes": _storage_bytes(opt_tensors),
        "buffers": {
            n: [b.numel(), str(b.dtype).removeprefix("torch.")] for n, b in model.named_buffers()
        },
    }


def _tensor_row(t: torch.Tensor | None) -> list[Any] | None:
    if t is None:
        return None
    return [int(t.numel()), str(t.dtype).removeprefix("torch."), str(t.device)]


def storage_tracker() -> Any:
    """torch's MemTracker without its per-module statistics: its module pre-forward hook
    registers a post-accumulate-grad hook on every parameter, which FSDP1's unsharded
    views (use_orig_params=True) refuse ("post accumulate grad hooks cannot be registered
    on non-leaf tensors"). The storage accounting (every op's output storage, freed by
    weakref, and UntypedStorage.resize_, which FSDP1 frees and re-allocates its flat
    parameters with) is MemTracker's own."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StorageTracker(MemTracker):
        def _pre_fw_hook(self, module: Any, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: Any, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: Any, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: Any, args: Any) -> None:
            pass

    return StorageTracker()


def _peak(tracker: Any) -> int:
    return sum(int(s["Total"]) for s in tracker.get_tracker_snapshot("peak").values())


def _current(tracker: Any) -> int:
    return sum(int(s["Total"]) for s in tracker.get_tracker_snapshot("current").values())


def _restart_peak(tracker: Any) -> None:
    """MemTracker's peak from now on (its private counters; torch 2.13 mem_tracker.py::
    MemTracker.__enter__ sets them the same way)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot()
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def _step(
    model: torch.nn.Module, optimizer: Any, ids: torch.Tensor, mark: Any, accumulation: int = 1
) -> None:
    """One optimizer step over `accumulation` micro-batches, as accelerate 1.16 runs them
    (Accelerator.accumulate with sync_each_batch False: every micro-batch but the last, its
    forward and backward, inside FSDP1's no_sync(); accelerator.backward divides the loss by
    the steps)."""
    import contextlib

    for micro in range(accumulation):
        last = micro == accumulation - 1
        sync: Any = contextlib.nullcontext() if last else model.no_sync()  # type: ignore[operator]
        with sync:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if accumulation > 1:
                loss = loss / accumulation
            mark("forward")
            loss.backward()
            del loss
        mark("backward")
    optimizer.step()
    mark("optimizer step")


def held(model: torch.nn.Module) -> dict[str, Any]:
    """What FSDP1 holds between micro-batches: each FlatParameter's `.grad` (under no_sync()
    the unsharded gradient) and its allocated unsharded parameter (`_full_param_padded`,
    freed by resizing its storage to 0)."""
    grads, gathered = [], 0
    for h in _handles(model):
        fp = h.flat_param
        if fp.grad is not None:
            grads.append(fp.grad)
        if hasattr(fp, "_full_param_padded"):
            gathered += int(fp._full_param_padded.untyped_storage().nbytes())
    return {
        "grad_bytes": _storage_bytes(grads),
        "grad_numels": [int(g.numel()) for g in grads],
        "grad_dtypes": sorted({str(g.dtype).removeprefix("torch.") for g in grads}),
        "unsharded_param_bytes": gathered,
    }


def run_rank(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    offload = getattr(args, "offload", False)
    if offload:
        pin_memory_as_copy()
    model = wrap(
        build(args.layers), args.strategy, args.mp, getattr(args, "prefetch", "none"), offload
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(
        0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1)
    )
    accumulation = getattr(args, "accumulation", 1)
    _step(model, optimizer, ids, lambda _: None, accumulation)
    optimizer.zero_grad(set_to_none=True)
    tracker = storage_tracker()
    # CPUOffload's `_cpu_grad` is reachable from no parameter once zero_grad has set the
    # gradients to None, and FSDP1 only copies into it: tracked from the start, as the
    # parameters and the optimizer's states are
    host_grads = [
        g for h in _handles(model) if (g := getattr(h.flat_param, "_cpu_grad", None)) is not None
    ]
    tracker.track_external(model, optimizer, ids, *host_grads)
    phases: dict[str, dict[str, int]] = {}
    micro: list[dict[str, Any]] = [{}]
    with tracker:
        start = _current(tracker)

        def mark(name: str) -> None:
            now = {"peak": _peak(tracker), "end": _current(tracker)}
            if name in micro[-1]:
                micro.append({})
            micro[-1][name] = now
            if name == "backward" and len(micro) < accumulation:
                micro[-1]["held"] = held(model)
            seen = phases.get(name)
            phases[name] = now if seen is None or now["peak"] > seen["peak"] else seen
            _restart_peak(tracker)

        _restart_peak(tracker)
        _step(model, optimizer, ids, mark, accumulation)
    result = {"rank": rank, "start": start, "phases": phases, **states(model, optimizer)}
    if accumulation > 1:
        result["microbatches"] = micro
    optimizer.zero_grad(set_to_none=True)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(
    world: int,
    strategy: str,
    precision: str,
    layers: int = 2,
    accumulation: int = 1,
    prefetch: str = "none",
    offload: bool = False,
) -> dict[str, Any]:
    """Every rank's measurement of one case (spawned gloo ranks); `phases` holds each
    phase's highest peak over the step's micro-batches, `microbatches` (accumulation > 1)
    each micro-batch's, and what FSDP1 held after each backward but the last."""
    args = argparse.Namespace(
        strategy=strategy,
        mp=precision,
        layers=layers,
        accumulation=accumulation,
        prefetch=prefetch,
        offload=offload,
    )
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rdzv')}"
        mp.spawn(run_rank, args=(world, init, args, tmp), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(world)]
    case = {"world": world, "strategy": strategy, "mp": precision, "layers": layers}
    if accumulation > 1:
        case["accumulation"] = accumulation
    if prefetch != "none":
        case["backward_prefetch"] = prefetch
    if offload:
        case["offload"] = True
    return {**case, "ranks": ranks}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--strategy", default="FULL_SHARD")
    p.add_argument("--mp", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--prefetch", default="none", choices=("none", "pre", "post"))
    p.add_argument("--offload", action="store_true")
    a = p.parse_args(argv)
    case = measure(a.world, a.strategy, a.mp, a.layers, a.accumulation, a.prefetch, a.offload)
    print(json.dumps(case))


if __name__ == "__main__":
    main(sys.argv[1:])
