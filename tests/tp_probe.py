"""Measure what one decoder layer saves for backward on a real tensor-parallel rank (CPU, gloo).

Used by tests/test_tp_activations_real.py. Each spawned rank builds a tiny transformers Llama
(tests/activation_probe.py::build_model), shards every decoder layer Megatron-style with torch's
DTensor tensor parallelism (`parallelize_module`: ColwiseParallel q/k/v/gate/up, RowwiseParallel
o/down, outputs converted back to local tensors), runs forward + causal-LM loss under
`saved_tensors_hooks` and attributes every saved storage to the part of the forward pass that
saved it first: `embeddings` (before the first layer), `rope` (the cos/sin the rotary embedding
returns, saved by every layer's RoPE), `layers.<i>` or `head` (after the last layer: final norm,
lm_head, loss). The embedding and lm_head stay whole (not vocab-parallel): only the layers are
compared with memplan.

Saved DTensors (the inputs and weights of the sharded linears) count as their local tensor's
storage (`_local_tensor`); parameters are excluded by their local shards' storages, as in
activation_probe (same dedup by `untyped_storage().data_ptr()`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.activation_probe import DTYPES, NAMES, build_model

BATCH, SEQ = 2, 24

COLWISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


# memplan precision -> (model dtype, CPU autocast dtype or None)
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "amp-bf16": ("fp32", "bf16"),
}


@dataclass(frozen=True)
class Case:
    precision: str
    attention: str

    @property
    def name(self) -> str:
        return f"{self.precision}-{self.attention}"


@dataclass
class Region:
    """The storages one part of the forward pass saved first: (bytes, shape, dtype) each."""

    storages: list[tuple[int, list[int], str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for n, _, _ in self.storages)


@dataclass
class Run:
    """One model's forward pass on one rank."""

    regions: dict[str, Region]
    loss: float
    dtensor_saves: int
    """Saved tensors that were DTensors (counted by their local storage)."""
    parameter_saves: int


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    while isinstance(t, DTensor):
        t = t._local_tensor
    return t


def tensor_parallel(model: Any, mesh: Any) -> None:
    """Megatron's layer split with torch TP: column-parallel q/k/v and gate/up, row-parallel
    o_proj and down_proj (their all-reduce gives every rank the whole output)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {name: ColwiseParallel() for name in COLWISE}
    plan.update({name: RowwiseParallel() for name in ROWWISE})
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
        attn = layer.self_attn
        # LlamaAttention views q/k/v as (*shape, -1, head_dim), so each rank runs its local
        # heads without config changes; num_key_value_groups (a ratio) stays right as long as
        # TP divides both head counts.
        local_q = attn.q_proj.weight.to_local().shape[0] // attn.head_dim
        local_kv = attn.k_proj.weight.to_local().shape[0] // attn.head_dim
        assert attn.num_key_value_groups == local_q // local_kv, (local_q, local_kv)


@contextmanager
def _regions(model: Any) -> Iterator[tuple[dict[str, Region], list[int]]]:
    """Attribute saved storages to embeddings / rope / layers.<i> / head while active."""
    regions: dict[str, Region] = {}
    counts = [0, 0]  # DTensor saves, parameter saves
    current = ["embeddings"]
    seen: set[int] = set()
    rope: set[int] = set()
    skip = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    handles = []

    def enter(name: str) -> Any:
        def hook(*_: Any) -> None:
            current[0] = name

        return hook

    def rope_out(_m: Any, _i: Any, out: Any) -> None:
        rope.update(_local(t).untyped_storage().data_ptr() for t in out)

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(enter(f"layers.{i}")))
        handles.append(layer.register_forward_hook(enter("head")))
    handles.append(model.model.rotary_emb.register_forward_hook(rope_out))

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = _local(t)
        if local is not t:
            counts[0] += 1
        storage = local.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in skip:
            counts[1] += 1
        elif ptr not in seen:
            seen.add(ptr)
            where = "rope" if ptr in rope else current[0]
            entry = (storage.nbytes(), list(local.shape), NAMES.get(local.dtype, "?"))
            regions.setdefault(where, Region()).storages.append(entry)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield regions, counts
    finally:
        for h in handles:
            h.remove()


def forward(config: dict[str, Any], case: Case, mesh: Any | None) -> tuple[Run, torch.Tensor]:
    """Build (and shard, with a mesh) the model, run forward + loss; the run and the logits."""
    config = {**config, "attention_dropout": 0.0}
    dtype, autocast = PRECISIONS[case.precision]
    model = build_model(config, attention=case.attention, dtype=dtype)
    if mesh is not None:
        tensor_parallel(model, mesh)
    torch.manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ))
    cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else nullcontext()
    with _regions(model) as (regions, counts), cast:
        out = model(input_ids=ids, labels=ids.clone(), use_cache=False)
    run = Run(regions, float(out.loss.detach()), dtensor_saves=counts[0], parameter_saves=counts[1])
    return run, out.logits.detach()


@contextmanager
def cpu_mesh(rank: int, world: int, port: int) -> Iterator[Any]:
    """One gloo rank of a 1-D CPU device mesh of `world` ranks, torn down on exit."""
    torch.set_num_threads(1)
    import transformers

    hf_logging: Any = transformers.logging  # untyped
    hf_logging.set_verbosity_error()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def spawn_ranks(
    rank_fn: Callable[..., None],
    config: dict[str, Any],
    cases: Sequence[Case],
    out: Path,
    world: int,
) -> list[dict[str, Any]]:
    """Run `rank_fn(rank, world, port, config, cases, out)` on `world` spawned processes; each
    writes `rank<r>.json` under `out`. Returns them, index = rank."""
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    multiprocessing.start_processes(
        rank_fn,
        args=(world, free_port(), config, list(cases), str(out)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _rank(
    rank: int, world: int, port: int, config: dict[str, Any], cases: Sequence[Case], out: str
) -> None:
    with cpu_mesh(rank, world, port) as mesh:
        result: dict[str, Any] = {}
        for case in cases:
            tp, tp_logits = forward(config, case, mesh)
            whole, logits = forward(config, case, None)
            tol = 1e-5 if case.precision == "fp32" else 5e-2
            result[case.name] = {
                "tp": asdict(tp),
                "whole": asdict(whole),
                "max_logit_diff": float((tp_logits.float() - logits.float()).abs().max()),
                "tol": tol,
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(
    config: dict[str, Any], cases: Sequence[Case], out: Path, world: int = 2
) -> list[dict[str, Any]]:
    """Every rank's results (index = rank), from `world` processes on gloo."""
    return spawn_ranks(_rank, config, cases, out, world)


__all__ = [
    "BATCH",
    "COLWISE",
    "PRECISIONS",
    "ROWWISE",
    "SEQ",
    "Case",
    "Run",
    "forward",
    "cpu_mesh",
    "run_ranks",
    "spawn_ranks",
]
