"""Measure the gradients FSDP2 holds under torch.distributed.pipelining (CPU, gloo).

Used by tests/test_pp_fsdp2.py. 4 spawned ranks form a (pipeline 2 x data 2) mesh; each
pipeline stage is a module with one submodule per "layer", holding parameters of the shapes
the test passes (memplan's inventory of that stage), each layer and the stage root wrapped
by `fully_shard` as torchtitan wraps under PP (MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32), reshard_after_forward=False: torchtitan/distributed/fsdp.py::
get_fsdp_reshard_after_forward_policy). The forward adds every parameter's sum to the hidden
state, so every parameter gets a full-size gradient. torch's Schedule1F1B runs 4
micro-batches; right before the schedule's REDUCE_GRAD action (stage.perform_reduce_grad)
each rank records the bytes and dtypes of every FSDPParam's `unsharded_accumulated_grad`
and of any `unsharded_param.grad` left, and whether the groups are still unsharded.

With `head` (an LM head's [vocab, hidden] shape) the input is [micro-batches x batch, seq,
hidden] and the last stage ends in that head: its output, the logits, is
`F.linear(h, weight)` as FSDP2's bf16 parameters make it. The last stage then records the
bytes its `stage.output_chunks` holds (torch/distributed/pipelining/stage.py) before each
forward and at REDUCE_GRAD, and a second step runs with `return_outputs=False`. Every stage
also records its receive buffers (input and gradient, stage.args_recv_info and
grad_recv_info) at REDUCE_GRAD and the most outputs its `fwd_cache` held after a forward.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MICROBATCHES = 4
WIDTH = 8
SEQ = 16


def _stage_module(shapes: list[list[list[int]]], head: list[int] | None) -> torch.nn.Module:
    class Layer(torch.nn.Module):
        def __init__(self, layer_shapes: list[list[int]]) -> None:
            super().__init__()
            self.params = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(*s) * 0.01) for s in layer_shapes
            )

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            weight = None
            for p in self.params:
                if head is not None and list(p.shape) == head and weight is None:
                    weight = p
                else:
                    h = h + p.sum()
            return h if weight is None else torch.nn.functional.linear(h, weight)

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer(s) for s in shapes)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h = layer(h)
            return h

    return Stage()


def _output_bytes(chunks: list[Any]) -> int:
    """Bytes of the distinct storages `stage.output_chunks` holds."""
    seen: dict[int, int] = {}
    for t in chunks:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _buffers(infos: dict[int, Any]) -> list[Any]:
    """The receive buffers of every micro-batch's `_RecvInfo`s (root inputs have none)."""
    return [i.buffer for chunk in infos.values() for i in chunk if i.buffer is not None]


def _rank(
    rank: int, world: int, port: int, stages: list[Any], out: str, head: list[int] | None
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
        pp = mesh.get_local_rank("pp")
        torch.manual_seed(0)
        last = pp == 1
        module = _stage_module(stages[pp], head if last else None)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers: Any = module.layers
        for layer in layers:
            fully_shard(layer, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=False)
        fully_shard(module, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=False)
        stage = PipelineStage(module, pp, 2, torch.device("cpu"), group=mesh.get_group("pp"))

        def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if head is not None:
                return output.float().pow(2).mean() + 0 * target.sum()
            return (output.float() - target).pow(2).mean()

        schedule = Schedule1F1B(stage, MICROBATCHES, loss_fn=loss_fn)
        seen: dict[str, Any] = {}
        original = stage.perform_reduce_grad

        chunks_before_forward: list[int] = []
        forward_one_chunk = stage.forward_one_chunk

        cached_outputs: list[int] = []

        def record_forward(*args: Any, **kwargs: Any) -> Any:
            chunks_before_forward.append(_output_bytes(stage.output_chunks))
            out = forward_one_chunk(*args, **kwargs)
            outputs = [t for entry in stage.fwd_cache.values() for t in entry[0]]
            cached_outputs.append(_output_bytes(outputs))
            return out

        stage.forward_one_chunk = record_forward  # type: ignore[method-assign]

        def measure(*args: Any, **kwargs: Any) -> None:
            if "accumulated" in seen:  # the second step: its held outputs only
                seen["output_chunks_step2"] = _output_bytes(stage.output_chunks)
                original(*args, **kwargs)
                return
            accumulated = 0
            left = 0
            dtypes = set()
            unsharded = set()
            state = fully_shard.state(module)  # type: ignore[attr-defined]
            for s in state._state_ctx.all_states:
                for group in s._fsdp_param_groups:
                    for fp in group.fsdp_params:
                        unsharded.add(str(fp.sharded_state))
                        if fp.unsharded_accumulated_grad is not None:
                            accumulated += fp.unsharded_accumulated_grad.nbytes
                            dtypes.add(str(fp.unsharded_accumulated_grad.dtype))
                        grad = fp._unsharded_param.grad
                        if grad is not None:
                            left += grad.nbytes
            seen.update(
                accumulated=accumulated,
                left=left,
                dtypes=sorted(dtypes),
                states=sorted(unsharded),
                elements=sum(p.numel() for p in module.parameters()),
                output_chunks=_output_bytes(stage.output_chunks),
                input_recv_buffers=_output_bytes(_buffers(stage.args_recv_info)),
                grad_recv_buffers=_output_bytes(_buffers(stage.grad_recv_info)),
                most_cached_outputs=max(cached_outputs),
                output_chunks_before_forward=list(chunks_before_forward),
                output_shapes=[list(t.shape) for t in stage.output_chunks],
                output_dtypes=sorted({str(t.dtype) for t in stage.output_chunks}),
            )
            original(*args, **kwargs)

        stage.perform_reduce_grad = measure  # type: ignore[method-assign]
        shape = [MICROBATCHES * 2, WIDTH] if head is None else [MICROBATCHES * 2, SEQ, head[1]]
        x = torch.randn(*shape)
        target = torch.zeros(*shape)
        if pp == 0:
            schedule.step(x)
        else:
            schedule.step(target=target)
        grads: list[Any] = [p.grad for p in module.parameters() if p.grad is not None]
        sharded = sum(g.to_local().nbytes for g in grads)
        seen.update(stage=pp, sharded_grads_after=sharded)
        if head is not None:
            # torch 2.13 schedules.py::PipelineScheduleSingle.step(return_outputs=False):
            # forward_one_chunk(save_forward_output=False), nothing kept.
            if pp == 0:
                schedule.step(x, return_outputs=False)
            else:
                schedule.step(target=target, return_outputs=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def run(
    stages: list[list[list[list[int]]]],
    out: Path,
    world: int = 4,
    head: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Every rank's measurement (index = rank): `stages[s]` lists stage s's layers, each a
    list of parameter shapes; `head` the LM head's shape on the last stage (module doc)."""
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    multiprocessing.start_processes(
        _rank,
        args=(world, free_port(), stages, str(out), head),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        shapes = [[[[16, 8], [8]], [[8, 8]]], [[[8, 8], [3]], [[5, 7]]]]
        for r in run(shapes, Path(d)):
            print(json.dumps(r), file=sys.stdout)
