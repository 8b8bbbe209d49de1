"""Trace what a torch.compile'd torchtitan 0.3.0 Qwen3-MoE block keeps for backward under its
own expert parallelism (CPU, gloo ranks).

Used by tests/test_compile_moe_ep.py and benchmarks/compile_moe_ep.py. Each of `world` spawned
gloo ranks (EP = world: every rank in the one EP group) builds tests/torchtitan_probe.py's tiny
Qwen3-MoE, one block, laid out as torchtitan's models/qwen3/parallelize.py::parallelize_qwen3
lays it with the DTensor backend (`spmd_backend="partial_dtensor"`, as
tests/torchtitan_ep_probe.py does): `ParallelDims(dp_shard=world, ep=world)`,
models/qwen3/sharding.py::set_qwen3_sharding_config(enable_ep=True), `model.parallelize(dims)`
(the experts' weights Shard(0) over `ep`, the `standard` dispatcher an AllToAllTokenDispatcher
wired to the EP mesh), then torchtitan's checkpointing of the block (FullAC, or SelectiveAC
with the CPU flash op added to its save list, as benchmarks/compile_layers.py::_sac does, as
cuDNN's / flash's is on CUDA), then the block compiled as distributed/compile.py::apply_compile
compiles it (`capture_scalar_outputs` and `skip_fwd_side_effects_in_bwd_under_checkpoint` set,
`block.compile(fullgraph=True)`), in that order (parallelize, AC, compile, as
parallelize_qwen3).

The backend is torch 2.13's Inductor path (torch/_inductor/compile_fx.py::compile_fx: its
decompositions, joint-graph passes and AOTAutograd's min_cut_rematerialization_partition) with
its `inner_compile` replaced, as memplan.verify.trace.compiled.compiled_saved does, by one that
keeps each graph and runs it as it is (no code generation). Under EP the graph has unbacked
sizes (the all-to-all's splits come from `.tolist()` of the exchanged counts), so the kept
tensors' sizes are read when the forward graph runs: every output after the block's own that
is a tensor whose storage is not one of the block's parameters or buffers (the experts' local
weight shards included) is a tensor passed from forward to backward. The forward, the loss and
the backward all run (the collectives on gloo), so the partition is the one that trains.

A case torch itself fails on records its error: under torchtitan's FullAC (any routing; real
Inductor code generation on CPU as well as this capture), torch 2.13's AOTAutograd runtime
wrapper raises in the compiled forward (_functorch/_aot_autograd/runtime_wrappers.py::
_AutogradSavedState.save_from_forward: "expected all tensors_saved_with_vc_check to be
Tensors", the EP DeviceMesh, an opaque value the partition saves for the backward's
all-to-all, standing before a saved tensor where the wrapper's slices expect opaque values
after every tensor).

`received`: the rows this rank's experts get from the dispatch all-to-all (R), read
independently of the compiled graph by an eager forward of the same model before it is
wrapped and compiled (the router's top-k ids, summed over the EP group per expert, the rank's
E / EP experts' share). Routing (tests/torchtitan_probe.py::Shape.routing): "seeded" (the
gate as initialised; R differs per rank), "balanced" (torchtitan's `_debug_force_load_balance`
round-robin: R = tokens x top_k on every rank when E divides it) or "collapsed" (every token on
experts 0 .. top_k - 1: rank 0 receives EP x tokens x top_k rows, the others none).
"""

from __future__ import annotations

import datetime
import json
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
    routing: str = "seeded"
    batch: int = 2
    seq: int = 16
    experts: int = 8
    top_k: int = 2
    moe_ffn: int = 48

    @property
    def name(self) -> str:
        return (
            f"{self.dtype}-{self.mode}-{self.routing}-b{self.batch}s{self.seq}-"
            f"e{self.experts}k{self.top_k}f{self.moe_ffn}"
        )

    @property
    def shape(self) -> probe.Shape:
        return replace(
            probe.QWEN3_MOE_TINY,
            layers=1,
            batch=self.batch,
            seq=self.seq,
            experts=self.experts,
            top_k=self.top_k,
            moe_ffn=self.moe_ffn,
            routing=self.routing,
        )


def _build(case: Any, dims: Any) -> Any:
    """`case`: a Case, or tests/compile_mla_ep_probe.py's MlaCase (DeepSeek-V3's sharding:
    models/deepseek_v3/sharding.py::set_deepseek_v3_sharding_config)."""
    cfg = probe.config(case.shape)
    if case.shape.model == "deepseek_v3":
        from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

        set_deepseek_v3_sharding_config(cfg, enable_sp=False, enable_ep=True)
    else:
        from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

        set_qwen3_sharding_config(cfg, enable_sp=False, enable_ep=True)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    probe.route(model, case.shape)
    for p in model.parameters():
        p.data = p.data.to(probe.DTYPES[case.dtype])
    model.parallelize(dims)
    return model


def _tokens(case: Any) -> tuple[torch.Tensor, torch.Tensor]:
    shape = case.shape
    torch.manual_seed(1 + dist.get_rank())  # one batch per data-parallel rank
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    return tokens, labels


def _received(model: Any, case: Any, tokens: torch.Tensor) -> int:
    """R: the rows the dispatch all-to-all brings to this rank's experts (module docstring),
    from an eager forward's top-k ids."""
    ids: list[torch.Tensor] = []
    (block,) = model.layers.children()
    router = block.moe.router

    def hook(module: Any, args: Any, out: Any) -> None:
        ids.append(out[1].to_local() if hasattr(out[1], "to_local") else out[1])

    handle = router.register_forward_hook(hook)
    with torch.no_grad():
        model(tokens)
    handle.remove()
    counts = torch.bincount(ids[0].reshape(-1), minlength=case.experts)
    dist.all_reduce(counts)
    local = case.experts // dist.get_world_size()
    rank = dist.get_rank()
    return int(counts[rank * local : (rank + 1) * local].sum())


def trace(case: Any, dims: Any) -> dict[str, Any]:
    """This rank's received rows and the tensors the compiled block's forward passes to its
    backward: [name, dtype, shape, bytes] each (module docstring)."""
    from tests.compile_tp_probe import compiled_step

    model = _build(case, dims)
    tokens, labels = _tokens(case)
    kept = compiled_step(model, case.mode, tokens, labels)
    # After the compiled step, on a model built afresh: an eager forward of the same model
    # before compiling it made torch 2.13's AOTAutograd runtime wrapper fail under SelectiveAC
    # (_AutogradSavedState.save_from_forward: "expected all tensors_saved_with_vc_check to be
    # Tensors", the EP mesh among them).
    received = _received(_build(case, dims), case, tokens)
    return {"received": received, "tokens": case.batch * case.seq, "kept": kept}


def _rank(rank: int, world: int, port: int, cases: list[Any], out: str) -> None:
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

        from tests.torchtitan_ep_probe import _dims

        set_spmd_backend("partial_dtensor")
        dims = _dims(world, world)
        result: dict[str, Any] = {}
        for c in cases:
            try:
                result[c.name] = trace(c, dims)
            except AssertionError as e:  # what torch itself fails on (FullAC under EP)
                result[c.name] = {"error": f"AssertionError: {str(e).split(', got types')[0]}"}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(cases: list[Any], out: Path, world: int) -> list[dict[str, Any]]:
    """Every case traced on each of `world` spawned gloo ranks at EP = world (index = rank)."""
    from tests.compile_tp_probe import spawn_each

    return spawn_each(_rank, cases, out, world)


__all__ = ["Case", "asdict", "run", "trace"]
