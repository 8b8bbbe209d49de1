"""Measure what torchtitan's Llama 3 holds for backward per rank under torch's DTensor tensor
parallelism (CPU, gloo), as torchtitan lays it out.

Used by tests/test_torchtitan_tp_activations.py and benchmarks/torchtitan_tp_activations.py.
Builds torchtitan 0.3.0's `Llama3Model` (tests/torchtitan_probe.py: SDPA inner attention, its
own FullAC / SelectiveAC) and shards it with the plan of torchtitan's `apply_tp` as it measured
the published Llama 3.1 table (9dec370, Dec 2024, torchtitan/parallelisms/parallelize_llama.py::
apply_tp), on 0.3.0's module names (`lm_head` for 9dec370's `output`, and the fused `wqkv`
colwise like 9dec370's `wq`/`wk`/`wv`: 0.3.0 lays wqkv's rows out per key/value group, so a
contiguous row split gives each rank whole groups, models/common/attention.py::FusedQKVLinear):

- `tok_embeddings`: RowwiseParallel(input Replicate, output Shard(1)) (sequence-parallel) or
  Replicate (no SP);
- `norm`, `attention_norm`, `ffn_norm`: SequenceParallel (with SP);
- `attention`, `feed_forward`: PrepareModuleInput(Shard(1) -> Replicate) (with SP; 0.3.0's
  attention takes (x, attention_masks, positions), 9dec370's (x, freqs_cis));
- `attention.wqkv` (or wq, wk, wv), `feed_forward.w1`, `feed_forward.w3`: ColwiseParallel;
- `attention.wo`, `feed_forward.w2`: RowwiseParallel(output Shard(1)) (Replicate without SP);
- `lm_head`: ColwiseParallel(input Shard(1), output Shard(-1), use_local_output=False): loss
  parallel. 0.3.0's `cross_entropy_loss` runs its own `_LossParallelCrossEntropy` on the local
  logits (components/loss.py: saves log_probs [t, V / TP] fp32 and the labels); 9dec370 ran
  torch's `loss_parallel()` context instead (not measured here). Without loss parallel
  (`disable_loss_parallel`) the output is all-gathered (Replicate, a local tensor) and the
  plain cross-entropy runs on the whole vocabulary.

torchtitan's Qwen3 (`Case.model` "qwen3": tests/torchtitan_probe.py's Qwen3Model, heads x
head_dim = 2 x dim, untied) is sharded by torchtitan 0.3.0's own code instead, as
models/qwen3/parallelize.py::parallelize_qwen3 does with the DTensor backend
(`spmd_backend="partial_dtensor"`): models/qwen3/sharding.py::set_qwen3_sharding_config on the
config (the decoder's, the attention's and the FFN's plans of models/common/decoder_sharding.py,
and q_norm / k_norm on the Shard(2) head shards with a replicated weight), then
`Module.parallelize(ParallelDims(tp=2))` (protocols/module.py). `Case.plan` "0.3.0" runs
Llama 3 the same way (models/llama3/sharding.py::set_llama3_sharding_config).

Checkpointing is applied after TP, as parallelize_llama does. The measure is
tests/torchtitan_probe.py's (a TorchDispatchMode records every storage an op returns; the
storages alive after forward + loss are what forward holds), with a DTensor counted by its local
tensor's storage.
"""

from __future__ import annotations

import datetime
import gc
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests import torchtitan_probe as probe

WORLD = 2


@dataclass(frozen=True)
class Case:
    dtype: str
    mode: str
    sequence_parallel: bool = True
    fused_qkv: bool = True
    layers: int = 2
    vocab: int = probe.VOCAB
    loss_parallel: bool = True
    model: str = "llama"
    """"llama" or "qwen3" (tests/torchtitan_probe.py's QWEN3_TINY shape, untied)."""
    plan: str = "9dec370"
    """"9dec370": `apply_tp` below (Llama only); "0.3.0": torchtitan 0.3.0's own sharding
    configs and Module.parallelize (the only plan for Qwen3)."""

    @property
    def name(self) -> str:
        sp = "sp" if self.sequence_parallel else "nosp"
        qkv = "wqkv" if self.fused_qkv else "wq-wk-wv"
        lp = "" if self.loss_parallel else "-no-loss-parallel"
        own = "" if self.model == "llama" and self.plan == "9dec370" else f"{self.model}-0.3.0-"
        return f"{own}{self.dtype}-{self.mode}-{sp}-{qkv}-{self.layers}l-v{self.vocab}{lp}"

    @property
    def shape(self) -> probe.Shape:
        shape = probe.Shape(layers=self.layers, fused_qkv=self.fused_qkv, vocab=self.vocab)
        if self.model == "qwen3":
            return replace(
                probe.QWEN3_TINY,
                layers=self.layers,
                fused_qkv=self.fused_qkv,
                vocab=self.vocab,
                tied=False,
            )
        return shape


def own_tp(case: Case, world: int) -> Any:
    """torchtitan 0.3.0's own TP (module docstring): the sharding configs set on the model's
    config, the model built and `Module.parallelize`d over a (tp=world) ParallelDims with the
    DTensor backend, on CPU."""
    import importlib

    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import ParallelDims

    assert case.loss_parallel, "0.3.0's own plan: loss parallel (decoder_sharding.py)"
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
    if case.model == "qwen3":
        from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

        set_qwen3_sharding_config(cfg, enable_sp=case.sequence_parallel, enable_ep=False)
    else:
        from torchtitan.models.llama3.sharding import set_llama3_sharding_config

        set_llama3_sharding_config(cfg, enable_sp=case.sequence_parallel)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    for p in model.parameters():
        p.data = p.data.to(probe.DTYPES[case.dtype])
    model.parallelize(dims)
    return model


def apply_tp(
    model: Any, mesh: Any, *, sequence_parallel: bool, fused_qkv: bool, loss_parallel: bool = True
) -> None:
    """9dec370's apply_tp plan on 0.3.0's model (module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    sp = sequence_parallel
    parallelize_module(
        model,
        mesh,
        {
            **({"norm": SequenceParallel()} if sp else {}),
            "lm_head": ColwiseParallel(
                input_layouts=Shard(1) if sp else Replicate(),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    _vocab_parallel_embedding(model.tok_embeddings, mesh, Shard(1) if sp else Replicate())
    qkv = (
        ["attention.qkv_linear.wqkv"]
        if fused_qkv
        else [f"attention.qkv_linear.{n}" for n in ("wq", "wk", "wv")]
    )
    out = Shard(1) if sp else Replicate()
    for block in model.layers.values():
        plan: dict[str, Any] = {
            **{name: ColwiseParallel() for name in qkv},
            "attention.wo": RowwiseParallel(output_layouts=out),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=out),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sp:
            plan.update(
                {
                    "attention_norm": SequenceParallel(),
                    "attention": PrepareModuleInput(
                        input_layouts=(Shard(1), None, None),
                        desired_input_layouts=(Replicate(), None, None),
                    ),
                    "ffn_norm": SequenceParallel(),
                    "feed_forward": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                }
            )
        parallelize_module(block, mesh, plan)


def _vocab_parallel_embedding(emb: Any, mesh: Any, out: Any) -> None:
    """0.3.0's own vocab-parallel embedding (models/common/embedding.py::Embedding.forward with
    a `tp_group`: the rows split like torch.chunk, the lookup masked per rank) on a Shard(0)
    weight, its partial sums reduce-scattered to Shard(1) (all-reduced without SP), as
    decoder_sharding.py::set_decoder_sharding_config declares (out_src_shardings P)."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    emb.weight = torch.nn.Parameter(distribute_tensor(emb.weight.data, mesh, [Shard(0)]))
    emb.tp_group = mesh.get_group()

    def reduce(_module: Any, _args: Any, partial: torch.Tensor) -> torch.Tensor:
        dt = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
        return dt.redistribute(placements=[out]).to_local()

    emb.register_forward_hook(reduce)


def _storage(t: torch.Tensor) -> Any:
    from torch.distributed.tensor import DTensor

    while isinstance(t, DTensor) or hasattr(t, "elem"):
        t = t._local_tensor if isinstance(t, DTensor) else t.elem  # AsyncCollectiveTensor
    return t.untyped_storage()


class _Made(probe._Made):
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.shapes: dict[int, tuple[int, str, tuple[int, ...], str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = _storage(t)
                self.made.append((StorageWeakRef(st), self.key(st), st.nbytes()))
                self.shapes[self.key(st)] = (st.nbytes(), str(func), tuple(t.shape), str(t.dtype))
        return out


def held(case: Case, mesh: Any, detail: bool = False) -> Any:
    """Bytes this rank's forward + loss hold for backward (module docstring): the labels
    (nll_loss saves them) and every storage made during forward + loss still alive after it.
    The token ids are not held: 0.3.0's vocab-parallel lookup saves its own clamped copy."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")  # the DTensor TP path (0.3.0 parallelize_llama)

    shape = case.shape
    if case.model == "qwen3" or case.plan == "0.3.0":
        model = own_tp(case, mesh.size())
    else:
        model = probe.build(case.dtype, shape)
        apply_tp(
            model,
            mesh,
            sequence_parallel=case.sequence_parallel,
            fused_qkv=case.fused_qkv,
            loss_parallel=case.loss_parallel,
        )
    probe.checkpoint(model, case.mode)
    torch.manual_seed(1)  # the same tokens on every rank
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))

    def key(st: Any) -> int:
        return int(st.data_ptr())

    inputs = (*model.parameters(), *model.buffers(), tokens, labels)
    before = {key(_storage(t)) for t in inputs}
    spy = _Made(key)
    with spy:
        logits = model(tokens)
        loss = cross_entropy_loss(logits, labels)
    del logits
    # gloo's worker thread drops its reference to a collective's output once the work is
    # done: wait for every collective before reading what is alive.
    dist.barrier()
    gc.collect()
    before.add(key(_storage(loss)))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    if detail:
        return sorted(spy.shapes[k] for k in alive)
    loss.backward()  # the saved tensors are usable: backward runs
    return sum(alive.values()) + labels.nbytes


def _rank(rank: int, world: int, port: int, cases: list[Case], out: str, detail: bool) -> None:
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

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        result = {c.name: held(c, mesh, detail) for c in cases}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(
    cases: list[Case], out: Path, world: int = WORLD, detail: bool = False
) -> list[dict[str, Any]]:
    """Every case's held bytes on each of `world` spawned gloo ranks (index = rank)."""
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    multiprocessing.start_processes(
        _rank,
        args=(world, free_port(), cases, str(out), detail),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


__all__ = ["Case", "apply_tp", "asdict", "held", "run"]
