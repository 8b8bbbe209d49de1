"""Record what DeepSpeed's BF16_Optimizer allocates for a tiny model into tests/data/ (by hand).

deepspeed is not part of the test environment (it must never be installed into it), so its
tensors are measured once in a throwaway venv that shares the pinned torch, on CPU with gloo
process groups of 1 and 2 ranks, and kept as a fixture (tests/test_deepspeed_bf16_optimizer.py):

    python -m venv --system-site-packages /tmp/dsvenv
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install deepspeed==0.19.8
    DS_ACCELERATOR=cpu PYTHONPATH=$PWD \
        /tmp/dsvenv/bin/python -m tests.record_deepspeed_bf16_optimizer

Each case runs `deepspeed.initialize` (the engine picks the optimizer wrapper itself,
engine.py::_do_optimizer_sanity_check) and two optimizer steps of two micro-batches each, and
records per rank: the wrapper's class; for BF16_Optimizer the numel and dtype of its flat
buffers, of the optimizer state, of the parameters' `.grad` after the boundary backward and
after the step, whether the fp32 partition's `.grad` is a view of the flat gradient buffer; and
every tensor handed to `deepspeed.comm.all_reduce` in the boundary backward (DeepSpeed's own
reduction path). FusedAdam is GPU-only, so the basic optimizer is torch's AdamW (`torch_adam`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "data" / "deepspeed_bf16_optimizer.json"

# One frozen tensor (left out of the flat groups), the rest trainable: 35 + 5 + 15 + 3 + 35 =
# 93 trainable elements: the 2 x 1 alignment pads them to 94, the 2 x 2 one to 96.
TRAINABLE = {"0.weight": (5, 7), "0.bias": (5,), "1.weight": (3, 5), "1.bias": (3,), "2.w": (35,)}
FROZEN = {"2.frozen": (6,)}

CASES: dict[str, dict[str, Any]] = {
    "stage1_fp32_accum": {"zero_optimization": {"stage": 1}, "grad_accum_dtype": "fp32"},
    "stage1_bf16_accum": {"zero_optimization": {"stage": 1}, "grad_accum_dtype": None},
    "stage1_fp32_accum_cpu_offload": {
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
        "grad_accum_dtype": "fp32",
    },
    "stage2_fp32_accum": {"zero_optimization": {"stage": 2}, "grad_accum_dtype": "fp32"},
    "stage0_no_pipeline": {"zero_optimization": {"stage": 0}, "grad_accum_dtype": None},
    "stage0_pipeline": {"zero_optimization": {"stage": 0}, "grad_accum_dtype": None, "pipe": True},
}
WORLDS = (1, 2)


def _model(torch: Any, pipe: bool) -> Any:
    class Tail(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(35))
            self.frozen = torch.nn.Parameter(torch.randn(6), requires_grad=False)

        def forward(self, x: Any) -> Any:
            return x * self.w[:3].sum() + self.frozen[:3]

    layers = [torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), Tail()]
    if pipe:
        from deepspeed.pipe import PipelineModule

        return PipelineModule(layers=layers, num_stages=1, loss_fn=lambda out, y: out.sum())
    return torch.nn.Sequential(*layers)


def _case(rank: int, world: int, name: str, port: int, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    import deepspeed
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    torch.manual_seed(0)
    case = CASES[name]
    deepspeed.init_distributed(dist_backend="gloo")
    model = _model(torch, bool(case.get("pipe")))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
        "zero_optimization": case["zero_optimization"],
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9,
        "zero_force_ds_cpu_optimizer": False,
    }
    if case["grad_accum_dtype"]:
        cfg["data_types"] = {"grad_accum_dtype": case["grad_accum_dtype"]}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg
    )
    opt = engine.optimizer
    out: dict[str, Any] = {"optimizer": type(opt).__name__}
    reduced: list[dict[str, Any]] = []
    real_all_reduce = dist.all_reduce

    def spy(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        buffers = {
            t.untyped_storage().data_ptr() for t in getattr(opt, "fp32_groups_gradients_flat", [])
        }
        reduced.append(
            {
                "numel": tensor.numel(),
                "dtype": str(tensor.dtype),
                "is_flat_gradient_buffer": tensor.untyped_storage().data_ptr() in buffers,
            }
        )
        return real_all_reduce(tensor, *args, **kwargs)

    def grads() -> dict[str, Any]:
        got = [p.grad for p in engine.module.parameters() if p.grad is not None]
        return {
            "tensors": len(got),
            "numel": sum(g.numel() for g in got),
            "dtypes": sorted({str(g.dtype) for g in got}),
        }

    x = torch.randn(1, 7, dtype=torch.bfloat16)
    if case.get("pipe"):

        def batches() -> Any:
            while True:
                yield x, torch.zeros(1)

        data = batches()
        for _ in range(2):
            dist.all_reduce = spy
            reduced.clear()
            engine.train_batch(data_iter=data)
            dist.all_reduce = real_all_reduce
        out["after_step_grads"] = grads()
    else:
        for _ in range(2):
            for micro in range(2):
                loss = engine(x).float().sum()
                boundary = micro == 1
                if boundary:
                    dist.all_reduce = spy
                    reduced.clear()
                engine.backward(loss)
                dist.all_reduce = real_all_reduce
                if boundary:
                    out["boundary_grads"] = grads()
                engine.step()
            out["after_step_grads"] = grads()
    if isinstance(opt, BF16_Optimizer):
        (flat,), (part,), (fp32_grads,) = (
            opt.bf16_groups_flat,
            opt.fp32_groups_flat_partition,
            opt.fp32_groups_gradients_flat,
        )
        base = fp32_grads.untyped_storage().data_ptr()
        out.update(
            bf16_groups_flat={"numel": flat.numel(), "dtype": str(flat.dtype)},
            fp32_groups_flat_partition={"numel": part.numel(), "dtype": str(part.dtype)},
            fp32_groups_gradients_flat={
                "numel": fp32_grads.numel(),
                "dtype": str(fp32_grads.dtype),
            },
            partition_grad_is_view_of_buffer=part.grad is not None
            and part.grad.untyped_storage().data_ptr() == base,
            partition_grad_after_step=None if part.grad is None else str(part.grad.dtype),
            group_paddings=list(opt.group_paddings),
            optimizer_state={
                k: {"numel": v.numel(), "dtype": str(v.dtype)}
                if torch.is_tensor(v)
                else type(v).__name__
                for k, v in opt.optimizer.state[part].items()
            },
            boundary_all_reduce=list(reduced),
            communication_data_type=str(engine.communication_data_type),
        )
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def measure(name: str, world: int, port: int) -> list[dict[str, Any]]:
    """One record per rank of `CASES[name]` on `world` gloo ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_case, args=(rank, world, name, port, queue)) for rank in range(world)
    ]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=120)
    return [got[r] for r in range(world)]


def main() -> None:
    import deepspeed
    import torch

    records: dict[str, Any] = {}
    port = 29_630
    for name in CASES:
        for world in WORLDS:
            port += 1
            records[f"{name}/world{world}"] = measure(name, world, port)
            print(name, world, records[f"{name}/world{world}"][0]["optimizer"], file=sys.stderr)
    doc = {
        "_command": "DS_ACCELERATOR=cpu PYTHONPATH=$PWD /tmp/dsvenv/bin/python -m "
        "tests.record_deepspeed_bf16_optimizer",
        "_source": "deepspeed/runtime/bf16_optimizer.py::BF16_Optimizer and engine.py::"
        "_do_optimizer_sanity_check, measured on CPU (gloo)",
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
        "trainable": {k: list(v) for k, v in TRAINABLE.items()},
        "frozen": {k: list(v) for k, v in FROZEN.items()},
        "cases": records,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
