"""Measure torchtitan 0.3.0's own Qwen3-MoE per rank under its expert parallelism and its FSDP2
expert sharding (CPU, gloo ranks).

Used by tests/test_torchtitan_moe_ep.py and benchmarks/torchtitan_moe_ep.py. Each rank builds
tests/torchtitan_probe.py's tiny Qwen3Model (`_build_qwen3_moe_layers`, the `standard` token
dispatcher: AllToAllTokenDispatcher once an EP mesh is wired) and lays it out as torchtitan's
models/qwen3/parallelize.py::parallelize_qwen3 does with the DTensor backend
(`spmd_backend="partial_dtensor"`):

- `ParallelDims(dp_shard=world, ep=ep)` and its `build_mesh` (distributed/parallel_dims.py: the
  sparse mesh (dp_replicate, efsdp, ep) with efsdp = dp_shard / ep, EP fastest);
- models/qwen3/sharding.py::set_qwen3_sharding_config(enable_sp=False, enable_ep=True) on the
  config, then `model.parallelize(dims)` (protocols/module.py; the routed experts' weights
  Shard(0) over `ep`, RoutedExperts.parallelize wiring the dispatcher's EP mesh);
- with `Case.tp` > 1, torchtitan's own tensor parallelism of the same model:
  ParallelDims(dp_shard=world / tp, tp, ep), set_qwen3_sharding_config (or
  set_deepseek_v3_sharding_config) with enable_sp=Case.sp, enable_ep=Case.ep > 1 and
  Module.parallelize (the MoE's plan: models/common/moe_sharding.py); with EP as well, EP
  borrows its ranks from data x TP (efsdp = dp_shard x tp / ep, EP fastest: at TP 2 x EP 2
  the EP group is the TP group);
- torchtitan's own checkpointing (tests/torchtitan_probe.py::checkpoint);
- for the model states, distributed/fsdp.py::apply_fsdp_to_decoder over the `fsdp` mesh with
  `ep_degree` and the `efsdp` mesh (Shard(1) on the experts when efsdp x EP exceeds the expert
  count), bf16 parameters and fp32 reduction (torchtitan's defaults), then one AdamW step
  (reduce-scatters forced to SUM: gloo has no PREMUL_SUM, which apply_fsdp_to_decoder's
  gradient divide factor 1.0 asks for).

Routing: torchtitan's own balanced round-robin (`_debug_force_load_balance`,
models/common/moe.py::TokenChoiceTopKRouter._debug_force_load_balance_routing: token-expert
pair i goes to expert i mod E), so every rank sends and receives tokens x top_k rows when E
divides tokens x top_k (under TP alone the seeded router: torchtitan's balanced routing fails
there, `Case.shape`; under EP x TP the same round-robin on each rank's token shard,
`_local_round_robin`). A case torchtitan itself fails on records its RuntimeError. The tokens
differ per data-parallel rank (seed 1 + rank // TP), as data
parallelism gives them.

`held`: the activations measure of tests/torchtitan_tp_probe.py (every storage an op makes
during forward + loss still alive afterwards, a DTensor or an AsyncCollectiveTensor counted by
its local tensor's storage), plus the labels nll_loss saves and the token ids the embedding
saves. `states`: after the step, the distinct storages of the rank's parameters (FSDP2's padded
sharded storages), of their gradients and of AdamW's exp_avg / exp_avg_sq (its `step` counters
are host scalars, not counted).
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


@dataclass(frozen=True)
class Case:
    dtype: str
    mode: str
    ep: int
    layers: int = 2
    batch: int = 2
    experts: int = 8
    top_k: int = 2
    moe_ffn: int = 48
    what: str = "held"
    """"held" (activations, no FSDP) or "states" (FSDP2 model states after one step)."""
    tp: int = 1
    """torchtitan's own tensor parallelism of the MoE (EP 1 only): experts Shard(1) / Shard(2)
    on their hidden dim, the router and the experts on the whole sequence
    (models/common/moe_sharding.py with enable_ep False), the rest as its dense TP."""
    sp: bool = True
    """Sequence parallelism with TP (torchtitan's default)."""
    kv_heads: int = 2
    """Qwen3-MoE's key/value heads: 4 (as many as the query heads) lets TP 4 split them."""
    q_lora: int = 0
    """DeepSeek-V3's q_lora_rank (0: wq; > 0: wq_a, q_norm, wq_b)."""
    model: str = "qwen3_moe"
    """"qwen3_moe" or "deepseek_v3" (tests/torchtitan_probe.py's DeepSeek-V3 shape: MLA, one
    dense layer first, one shared expert, 4 groups of which 2 are kept, dense hidden 128)."""

    @property
    def name(self) -> str:
        own = "" if self.model == "qwen3_moe" else f"{self.model}-"
        if self.q_lora:
            own += f"q{self.q_lora}-"
        if self.tp > 1:
            own += f"tp{self.tp}-{'sp' if self.sp else 'nosp'}-"
        if self.kv_heads != 2:
            own += f"kv{self.kv_heads}-"
        return (
            f"{own}{self.what}-{self.dtype}-{self.mode}-ep{self.ep}-{self.layers}l-b{self.batch}-"
            f"e{self.experts}k{self.top_k}f{self.moe_ffn}"
        )

    @property
    def shape(self) -> probe.Shape:
        if self.model == "deepseek_v3":
            return probe.Shape(
                model="deepseek_v3",
                layers=self.layers,
                batch=self.batch,
                ffn=128,
                experts=self.experts,
                top_k=self.top_k,
                moe_ffn=self.moe_ffn,
                routing="balanced",
                mla=replace(probe.Mla(), q_lora=self.q_lora),
            )
        return replace(
            probe.QWEN3_MOE_TINY,
            layers=self.layers,
            batch=self.batch,
            experts=self.experts,
            top_k=self.top_k,
            moe_ffn=self.moe_ffn,
            kv_heads=self.kv_heads,
            # torchtitan's balanced routing fails under TP (its arange index meets the DTensor
            # scores in `gather`: "got mixed torch.Tensor and DTensor"); at EP 1 every routed
            # tensor has tokens x top_k rows whatever the routing, so TP runs the seeded router.
            # Under EP x TP the probe's own round-robin on each rank's token shard
            # (`_local_round_robin`) stands in for it.
            routing="seeded" if self.tp > 1 and self.ep == 1 else "balanced",
        )


def _local_round_robin() -> None:
    """torchtitan's `_debug_force_load_balance` round-robin, made to run on DTensor scores
    (under EP x TP the router's scores are Shard(1) over TP, and 0.3.0's own
    `TokenChoiceTopKRouter._debug_force_load_balance_routing` fails in `gather`: "got mixed
    torch.Tensor and DTensor"): the same `arange(tokens x top_k) % E` on each rank's local
    token shard, wrapped as a DTensor of the scores' placements, so that every rank sends
    tokens x top_k / E rows to every expert. The saved tensors are the original's (gather
    saves the int64 indices)."""
    from torch.distributed.tensor import DTensor
    from torchtitan.models.common.moe import TokenChoiceTopKRouter

    original = TokenChoiceTopKRouter._debug_force_load_balance_routing
    if getattr(original, "_local", False):
        return

    def routing(self: Any, scores: Any) -> Any:
        if not isinstance(scores, DTensor):
            return original(self, scores)
        bs, slen, _ = scores.to_local().shape
        ids = torch.arange(bs * slen * self.top_k, dtype=torch.int64).reshape(bs, slen, -1)
        ids = DTensor.from_local(
            ids % self.num_experts, scores.device_mesh, scores.placements, run_check=False
        )
        return ids, scores.gather(dim=-1, index=ids)

    routing._local = True  # type: ignore[attr-defined]
    TokenChoiceTopKRouter._debug_force_load_balance_routing = routing  # type: ignore[method-assign]


def _dims(world: int, ep: int, tp: int = 1) -> Any:
    import importlib

    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.distributed import ParallelDims

    importlib.import_module("torch.testing._internal.distributed.fake_pg")  # "fake" groups
    parallel_dims.device_type = "cpu"  # torchtitan.tools.utils picks cuda when present
    dims = ParallelDims(
        dp_replicate=1,
        dp_shard=world // tp,
        cp=1,
        tp=tp,
        pp=1,
        ep=ep,
        world_size=world,
        spmd_backend="partial_dtensor",
    )
    dims.build_mesh()
    return dims


def build(case: Case, dims: Any, dtype: torch.dtype) -> Any:
    """The model laid out by torchtitan's own EP (module docstring), parameters in `dtype`."""
    cfg = probe.config(case.shape)
    if case.model == "deepseek_v3":
        from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

        sp = case.sp and case.tp > 1
        set_deepseek_v3_sharding_config(cfg, enable_sp=sp, enable_ep=case.ep > 1)
    else:
        from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

        sp = case.sp and case.tp > 1
        set_qwen3_sharding_config(cfg, enable_sp=sp, enable_ep=case.ep > 1)
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if case.ep > 1 or case.tp > 1:
        model.parallelize(dims)
    return model


def _tokens(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    shape = case.shape
    torch.manual_seed(1 + dist.get_rank() // case.tp)  # TP innermost: one batch per TP group
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    return tokens, labels


def held(case: Case, dims: Any, detail: bool = False) -> Any:
    """Bytes this rank's forward + loss hold for backward (module docstring)."""
    from torchtitan.components.loss import cross_entropy_loss

    from tests.torchtitan_tp_probe import _Made, _storage

    model = build(case, dims, probe.DTYPES[case.dtype])
    probe.checkpoint(model, case.mode)
    tokens, labels = _tokens(case)

    def key(st: Any) -> int:
        return int(st.data_ptr())

    before = {key(_storage(t)) for t in (*model.parameters(), *model.buffers(), tokens, labels)}
    spy = _Made(key)
    with spy:
        logits = model(tokens)
        loss = cross_entropy_loss(logits, labels)
    del logits
    dist.barrier()  # gloo drops a collective's output reference once its work is done
    gc.collect()
    before.add(key(_storage(loss)))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    found = sorted(spy.shapes[k] for k in alive)
    loss.backward()  # the saved tensors are usable: backward runs
    if detail:
        return found
    # Under TP, 0.3.0's vocab-parallel lookup saves its own clamped copy of the token ids.
    return sum(alive.values()) + (tokens.nbytes if case.tp == 1 else 0) + labels.nbytes


def states(case: Case, dims: Any) -> dict[str, int]:
    """This rank's model states after one FSDP2 step (module docstring)."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    from tests.torchtitan_tp_probe import _storage

    model = build(case, dims, torch.float32)
    probe.checkpoint(model, case.mode)
    edp = dims.get_optional_mesh(["efsdp"]) if case.ep > 1 else None
    apply_fsdp_to_decoder(
        model,
        dims.get_mesh(["fsdp"]),
        param_dtype=probe.DTYPES[case.dtype],
        reduce_dtype=torch.float32,
        pp_enabled=False,
        ep_degree=case.ep,
        edp_mesh=edp,
    )
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            # gloo has no PREMUL_SUM (apply_fsdp_to_decoder's gradient_divide_factor 1.0 asks
            # for it): a SUM reduction with an in-place division holds the same states.
            m.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    tokens, labels = _tokens(case)
    loss = cross_entropy_loss(model(tokens), labels)
    loss.backward()
    opt.step()
    dist.barrier()

    def total(tensors: Any) -> int:
        seen = {}
        for t in tensors:
            st = _storage(t)
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    params = list(model.parameters())
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return {
        "parameters": total(params),
        "gradients": total(p.grad for p in params if p.grad is not None),
        "optimizer": total(moments),
    }


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
        from torchtitan.distributed.utils import set_spmd_backend

        set_spmd_backend("partial_dtensor")
        _local_round_robin()
        result: dict[str, Any] = {}
        meshes: dict[tuple[int, int], Any] = {}
        for c in cases:
            if (c.ep, c.tp) not in meshes:
                meshes[c.ep, c.tp] = _dims(world, c.ep, c.tp)
            dims = meshes[c.ep, c.tp]
            try:
                result[c.name] = held(c, dims, detail) if c.what == "held" else states(c, dims)
            except RuntimeError as e:  # what torchtitan itself refuses (EP x TP without SP)
                result[c.name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(cases: list[Case], out: Path, world: int, detail: bool = False) -> list[dict[str, Any]]:
    """Every case's measure on each of `world` spawned gloo ranks (index = rank)."""
    import warnings

    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multiprocessing.start_processes(
            _rank,
            args=(world, free_port(), cases, str(out), detail),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


__all__ = ["Case", "asdict", "build", "held", "run", "states"]


QWEN3_30B_A3B = replace(
    probe.QWEN3_MOE_TINY,
    layers=2,
    dim=2048,
    heads=32,
    kv_heads=4,
    head_dim=128,
    vocab=151936,
    experts=128,
    top_k=8,
    moe_ffn=768,
)
"""Two blocks of torchtitan's Qwen3-30B-A3B (models/qwen3/__init__.py::_30b_a3b)."""


def fake_sharded(world: int, ep: int, shape: probe.Shape = QWEN3_30B_A3B) -> dict[str, int]:
    """Rank 0's FSDP2 shards of torchtitan's Qwen3-MoE at `shape` over a fake `world`-rank
    process group (torch's fake backend; the model on the meta device, no memory), laid out as
    `states` lays it (EP through ParallelDims + Module.parallelize, then
    apply_fsdp_to_decoder): parameter name -> elements of its padded sharded storage
    (`FSDPParam.padded_sharded_param_size`), read back from torch's FSDP state."""
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed import fake_pg
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
    from torchtitan.distributed.utils import set_spmd_backend

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=world)
    try:
        set_spmd_backend("partial_dtensor")
        dims = _dims(world, ep)
        case = Case("bf16", "none", ep)
        cfg = probe.config(shape)
        if ep > 1:
            from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

            set_qwen3_sharding_config(cfg, enable_sp=False, enable_ep=True)
        with torch.device("meta"):
            model = cfg.build()
            if case.ep > 1:
                model.parallelize(dims)
        apply_fsdp_to_decoder(
            model,
            dims.get_mesh(["fsdp"]),
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32,
            pp_enabled=False,
            ep_degree=ep,
            edp_mesh=dims.get_optional_mesh(["efsdp"]) if ep > 1 else None,
        )
        names = {id(m): n for n, m in model.named_modules()}
        out: dict[str, int] = {}
        for m in model.modules():
            if not isinstance(m, FSDPModule):
                continue
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for p in group.fsdp_params:
                    info = p._module_info
                    name = f"{names[id(info.module)]}.{info.param_name}"
                    out[name] = p.padded_sharded_param_size.numel()
        return out
    finally:
        dist.destroy_process_group()
