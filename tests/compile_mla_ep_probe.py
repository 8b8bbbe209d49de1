"""Trace what a torch.compile'd torchtitan 0.3.0 DeepSeek-V3 MoE block keeps for backward
under its own expert parallelism (CPU, gloo ranks).

Used by tests/test_compile_mla_ep.py and benchmarks/compile_mla_ep.py. The driver is
tests/compile_ep_probe.py's (`run`, `trace`: each of `world` spawned gloo ranks, EP = world,
lays the model out as torchtitan's models/deepseek_v3/parallelize.py::parallelize_deepseekv3
does with the DTensor backend: ParallelDims(dp_shard=world, ep=world),
models/deepseek_v3/sharding.py::set_deepseek_v3_sharding_config(enable_sp=False,
enable_ep=True), `model.parallelize(dims)`, then torchtitan's checkpointing of the block, then
the block compiled as distributed/compile.py::apply_compile compiles it; forward, loss and
backward run; every tensor the compiled forward passes to its backward is read, with its whole
storage's bytes, when the graph runs). The model here is tests/torchtitan_probe.py's
DeepSeek-V3 (`deepseek_v3_config`: MLA with yarn ComplexRoPE, SDPA as the inner attention,
sigmoid router, optional node-limited groups, route_norm, route_scale 2.5, shared experts, the
`standard` dispatcher: AllToAllTokenDispatcher once the EP mesh is wired) with one block, a MoE
one (n_dense_layers 0): the dense block has no expert and no all-to-all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from benchmarks.compile_mla_ep import SHAPE
from tests import torchtitan_probe as probe
from tests.compile_ep_probe import run, trace


@dataclass(frozen=True)
class MlaCase:
    dtype: str
    mode: str
    """"none", "full" or "selective-op"."""
    routing: str = "seeded"
    batch: int = 2
    seq: int = 16
    experts: int = 8
    top_k: int = 2
    moe_ffn: int = 48
    q_lora: int = 0
    groups: int = 4
    """router_num_expert_groups (0: no node-limited routing)."""
    limited: int = 2
    """router_num_limited_groups."""
    shared: int = 1
    """num_shared_experts."""
    route_norm: bool = True

    @property
    def name(self) -> str:
        return (
            f"dsv3-{self.dtype}-{self.mode}-{self.routing}-b{self.batch}s{self.seq}-"
            f"e{self.experts}k{self.top_k}f{self.moe_ffn}-q{self.q_lora}-g{self.groups}"
            f"l{self.limited}-sh{self.shared}-{'norm' if self.route_norm else 'nonorm'}"
        )

    @property
    def shape(self) -> probe.Shape:
        mla = probe.Mla(
            q_lora=self.q_lora,
            kv_lora=SHAPE["kv_lora"],
            nope=SHAPE["nope"],
            rope=SHAPE["rope"],
            v_dim=SHAPE["v_dim"],
            dense_layers=0,
            shared=self.shared,
            groups=self.groups,
            limited=self.limited,
            route_norm=self.route_norm,
        )
        return probe.Shape(
            model="deepseek_v3",
            layers=1,
            batch=self.batch,
            seq=self.seq,
            dim=SHAPE["hidden"],
            heads=SHAPE["heads"],
            experts=self.experts,
            top_k=self.top_k,
            moe_ffn=self.moe_ffn,
            mla=mla,
            routing=self.routing,
        )


__all__ = ["SHAPE", "MlaCase", "asdict", "run", "trace"]
