"""Trace what a torch.compile'd torchtitan 0.3.0 block keeps for backward on one rank of its own
tensor parallelism, with sequence parallelism on and off (CPU, gloo ranks).

Used by tests/test_compile_tp.py and benchmarks/compile_tp.py. Each of `world` spawned gloo
ranks (TP = world) builds tests/torchtitan_probe.py's tiny Llama 3 (dim 64, 4 heads, 2 k/v
heads, FFN 192, one block) or Qwen3-MoE (QWEN3_MOE_TINY, one block), laid out as torchtitan
0.3.0 lays it with the DTensor backend (`spmd_backend="partial_dtensor"`, as
tests/torchtitan_tp_probe.py::own_tp does): `ParallelDims(tp=world)`, models/llama3/sharding.py::
set_llama3_sharding_config(enable_sp) (Qwen3-MoE: models/qwen3/sharding.py::
set_qwen3_sharding_config(enable_sp, enable_ep=False)), `model.parallelize(dims)`, then
torchtitan's checkpointing of the block (SelectiveAC with the CPU flash op added to its save
list, as benchmarks/compile_layers.py::_sac does, as cuDNN's / flash's is on CUDA; or FullAC),
then the block compiled as distributed/compile.py::apply_compile compiles it
(`capture_scalar_outputs` and `skip_fwd_side_effects_in_bwd_under_checkpoint` set,
`block.compile(fullgraph=True)`), in that order (parallelize, AC, compile, as
models/llama3/parallelize.py::parallelize_llama).

The backend is torch 2.13's Inductor path (torch/_inductor/compile_fx.py::compile_fx: its
decompositions, joint-graph passes and AOTAutograd's min_cut_rematerialization_partition) with
its `inner_compile` replaced, as tests/compile_ep_probe.py does, by one that keeps each graph
and runs it as it is (no code generation). AOTAutograd desugars the DTensors to their local
tensors, so the forward graph's outputs after the block's own are plain tensors: every one
whose storage is not one of the block's parameters or buffers is a tensor this rank passes
from forward to backward ([graph name, dtype, local shape, storage bytes]). The forward, the
loss and the backward all run (the collectives on gloo), so the partition is the one that
trains.
"""

from __future__ import annotations

import datetime
import json
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests import torchtitan_probe as probe


@dataclass(frozen=True)
class Case:
    dtype: str
    mode: str
    """"none", "full" or "selective-op"."""
    sequence_parallel: bool = True
    model: str = "llama"
    """"llama" (tests/torchtitan_probe.py's Shape()), "qwen3" (QWEN3_TINY, untied) or
    "qwen3_moe" (QWEN3_MOE_TINY)."""
    batch: int = 2
    seq: int = 16
    heads: int = 0
    """Query heads (0: the model shape's); TP must divide the k/v heads (torchtitan 0.3.0's
    fused wqkv view fails otherwise, traced at TP 4 with 2 k/v heads)."""
    kv_heads: int = 0
    routing: str = "balanced"
    """Qwen3-MoE's routing (tests/torchtitan_probe.py::Shape.routing)."""
    experts: int = 0
    """Qwen3-MoE's routed experts (0: QWEN3_MOE_TINY's 8)."""
    top_k: int = 0
    """Qwen3-MoE's experts per token (0: QWEN3_MOE_TINY's 2)."""
    moe_ffn: int = 0
    """Qwen3-MoE's expert width (0: QWEN3_MOE_TINY's 48)."""

    @property
    def name(self) -> str:
        sp = "sp" if self.sequence_parallel else "nosp"
        heads = f"-a{self.heads}g{self.kv_heads}" if self.heads else ""
        routing = f"-{self.routing}" if self.routing != "balanced" else ""
        moe = f"-e{self.experts}k{self.top_k}" if self.experts else ""
        moe += f"-f{self.moe_ffn}" if self.moe_ffn else ""
        name = f"{self.model}-{self.dtype}-{self.mode}-{sp}-b{self.batch}s{self.seq}"
        return f"{name}{heads}{routing}{moe}"

    @property
    def shape(self) -> probe.Shape:
        base = {"qwen3_moe": probe.QWEN3_MOE_TINY, "qwen3": probe.QWEN3_TINY}.get(
            self.model, probe.Shape()
        )
        shape = replace(
            base, layers=1, batch=self.batch, seq=self.seq, routing=self.routing, tied=False
        )
        if self.heads:
            shape = replace(shape, heads=self.heads, kv_heads=self.kv_heads)
        if self.experts:
            shape = replace(shape, experts=self.experts, top_k=self.top_k)
        if self.moe_ffn:
            shape = replace(shape, moe_ffn=self.moe_ffn)
        return shape


def _build(case: Case, world: int) -> Any:
    import importlib

    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import ParallelDims

    importlib.import_module("torch.testing._internal.distributed.fake_pg")  # "fake" groups
    parallel_dims.device_type = "cpu"  # torchtitan.tools.utils picks cuda when present
    dims = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=1,
        tp=world,
        pp=1,
        ep=1,
        world_size=world,
        spmd_backend="partial_dtensor",
    )
    dims.build_mesh()
    cfg = probe.config(case.shape)
    if case.model in ("qwen3", "qwen3_moe"):
        from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

        set_qwen3_sharding_config(cfg, enable_sp=case.sequence_parallel, enable_ep=False)
    else:
        from torchtitan.models.llama3.sharding import set_llama3_sharding_config

        set_llama3_sharding_config(cfg, enable_sp=case.sequence_parallel)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    if case.model == "qwen3_moe":
        probe.route(model, case.shape)
    for p in model.parameters():
        p.data = p.data.to(probe.DTYPES[case.dtype])
    model.parallelize(dims)
    return model


def _own_storages(model: Any) -> set[int]:
    out = set()
    for t in (*model.parameters(), *model.buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        out.add(local.untyped_storage().data_ptr())
    return out


def compiled_step(model: Any, mode: str, tokens: Any, labels: Any) -> list[list[Any]]:
    """One step of `model` with each block wrapped for `mode` (none, selective-op, full) and
    compiled as torchtitan compiles it: the tensors each compiled block's forward passes to its
    backward that are not the model's own storages, [graph name, dtype, local shape, storage
    bytes] each. The backward runs (the kept tensors serve it). `COMPILE_TP_DUMP=1` prints rank
    0's forward graphs. Shared with tests/compile_ep_probe.py."""
    import os

    from torch._inductor.compile_fx import compile_fx
    from torchtitan.components.loss import cross_entropy_loss

    from benchmarks.compile_layers import _full, _sac

    wrap = {"none": None, "selective-op": _sac, "full": _full}[mode]
    if wrap is not None:
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, wrap(block))
    own = _own_storages(model)
    kept: list[list[Any]] = []

    def inner_compile(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_backward"):
            return gm
        (result,) = (n for n in gm.graph.nodes if n.op == "output")
        if os.environ.get("COMPILE_TP_DUMP") and dist.get_rank() == 0:
            print(gm.code)
        names = [getattr(n, "name", "") for n in result.args[0]]

        def run(args: list[Any]) -> Any:
            out = gm(*args)
            for name, value in list(zip(names, out, strict=True))[1:]:
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    if storage.data_ptr() not in own:
                        dtype = str(value.dtype).removeprefix("torch.")
                        dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
                        kept.append([name, dtype, list(value.shape), storage.nbytes()])
            return out

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)

    torch._dynamo.reset()
    # No AOTAutograd / FX graph cache entry of an earlier compile is reused.
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False
    # As torchtitan 0.3.0's distributed/compile.py::apply_compile sets them.
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.layers.children():
        block.compile(backend=backend, fullgraph=True)
    loss = cross_entropy_loss(model(tokens), labels)
    loss.backward()  # the kept tensors serve a backward that runs
    dist.barrier()
    torch._dynamo.reset()
    return kept


def trace(case: Case, world: int) -> dict[str, Any]:
    """The tensors this rank's compiled block passes from forward to its backward (module
    docstring)."""
    model = _build(case, world)
    torch.manual_seed(1)  # the same tokens on every TP rank
    shape = case.shape
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    kept = compiled_step(model, case.mode, tokens, labels)
    return {"tokens": shape.batch * shape.seq, "kept": kept}


def _rank(rank: int, world: int, port: int, cases: list[Case], out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        from torchtitan.distributed.utils import set_spmd_backend

        set_spmd_backend("partial_dtensor")
        result: dict[str, Any] = {}
        for c in cases:
            try:
                result[c.name] = trace(c, world)
            except Exception as e:  # what torch / torchtitan itself fails on: recorded verbatim
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                result[c.name] = {"error": last[:2000]}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def spawn_each(rank: Any, cases: list[Any], out: Path, world: int) -> list[dict[str, Any]]:
    """`rank(rank, world, port, [case], out)` on `world` spawned gloo ranks for each case in turn,
    each case in its own fresh processes (no compiled state carried from one to the next); each
    rank's results, by case name (index = rank). Shared with tests/compile_ep_probe.py."""
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    results: list[dict[str, Any]] = [{} for _ in range(world)]
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            multiprocessing.start_processes(
                rank,
                args=(world, free_port(), [case], str(out)),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        for r in range(world):
            results[r].update(json.loads(Path(out, f"rank{r}.json").read_text()))
    return results


def run(cases: list[Case], out: Path, world: int) -> list[dict[str, Any]]:
    """Every case traced on each of `world` spawned gloo ranks at TP = world (index = rank)."""
    return spawn_each(_rank, cases, out, world)


__all__ = ["Case", "asdict", "run", "trace"]
