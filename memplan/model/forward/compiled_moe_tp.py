"""What a torch.compile'd torchtitan 0.3.0 Qwen3-MoE block keeps for backward on one rank of
tensor parallelism at expert parallelism 1, sequence parallelism on and off, checkpointing
none or selective-op.

torchtitan 0.3.0 lays it out with models/qwen3/sharding.py::set_qwen3_sharding_config
(enable_ep False): the attention as the dense block's (memplan.model.forward.compiled_tp),
and models/common/moe_sharding.py::set_moe_sharding_config: the MoE's input redistributed to
Replicate (all-gathered under SP), the router's gate replicated on every token
(_router_sharding_config, EP off), each routed expert's hidden width split (w1 / w3 Shard(1),
w2 Shard(2): `moe_intermediate_size / TP` per rank, all E experts on every rank), the output
Partial, reduce-scattered to the sequence shard under SP, all-reduced without. Then
distributed/compile.py::apply_compile compiles the block whole (fullgraph).

Traced on 2 gloo ranks (none) and on 2 and 4 (selective-op; tests/compile_tp_probe.py with
torchtitan's real block;
benchmarks/compile_moe_tp.py, results/compile-moe-tp.json), per rank, with t = batch x
sequence tokens, t_sp = t / TP under SP (t without), N = t x top_k routed rows, w the compute
dtype:

checkpointing none (`layer`, TP 2: at TP 4 the set differs, `NONE_ABOVE_TP2`, refused): the
one-rank compiled set (memplan.model.forward.compiled.
qwen3_moe_layer) on the rank's a / TP, g / TP heads and F / TP expert width (the grouped mms'
outputs [N, F / TP]; their input [N, h], w2's output [N, h], the reorder indices [N], the
offsets [E] and the combine's zeros [t, h] whole: every rank routes every token to every
expert), except

    the block's input, attention_norm's and ffn_norm's rstd: on t_sp tokens, and wo's output
        replaced by the residual sum [t_sp, h], as in the dense TP rule (compiled_tp.layer);
    ffn_norm's output (the gate's input) [t, h]: without SP not kept (recomputed from the
        residual and ffn_norm's rstd); under SP kept, as in the one-rank set;
    the router's softmax, topk's indices and (under SP) ffn_norm's output are kept as views of
        this rank's 1 / TP chunk of the token rows ([t / TP, E], [t / TP, k], [t / TP, h] in the
        traced graph, with the router's DTensor redistributed off Replicate); a view keeps its
        base alive, so each holds the whole [t, .] storage: the bytes are the one-rank set's
        (the probe counts storages, as the allocator does);
    the router: one [t, E] tensor in the router's dtype at every E (traced at 8 and 48 experts in
        bf16): the one-rank set's switch to the gate's output and softmax's row max and sum
        from SOFTMAX_STATS_FROM experts does not happen under TP;
    nothing of the dense block's no-SP extras: no gathered attention output, no gathered wo
        weight.

checkpointing selective-op (`op_sac_layer`): the one-rank set (compiled.op_sac_moe_layer) on
the rank's heads with the input on t_sp tokens and, under SP, wo's reduce-scatter output
[t_sp, h] (MUST_SAVE, as compiled_tp.op_sac_layer); topk's indices stay [t, k]. Without SP
nothing is added.

Routing: at EP 1 every routed tensor has N rows whatever the routing, so the set is the same
for seeded routing (the router's gate as initialised) and for every token on the same top_k
experts (traced both). torchtitan's debug round-robin routing
(`debug.moe_force_load_balance`, models/common/moe.py::_debug_force_load_balance_routing)
fails under TP (`BALANCED_ERROR`); it is a debugging option, which memplan's spec
does not express, and real routing (topk on the router's DTensor scores) traces.
Not traced, so refused: torchao Float8, context parallelism, full checkpointing (torch 2.13's
AOTAutograd wrapper fails on the dense block under TP: compiled_tp.FULL_AC_FAILS), fewer
key/value heads than ranks (compiled_tp.KV_HEADS), token counts TP does not divide, expert
widths TP does not divide, and expert slices torch's _grouped_mm rejects (`GROUPED_MM_STRIDE`:
fewer than 16 bytes' multiple of bf16 columns per rank, traced at 48 / 4).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import compiled, compiled_tp
from memplan.model.forward.compiled import BF16
from memplan.model.forward.kernels import saved
from memplan.model.forward.tensors import Saved
from memplan.precision import dtype_bytes

SRC = (
    f"{compiled.SRC_MOE}; {compiled_tp.SRC}; torchtitan 0.3.0 models/common/moe_sharding.py::"
    "set_moe_sharding_config, _router_sharding_config, _routed_experts_sharding_configs "
    "(enable_ep False) (traced on gloo ranks: tests/compile_tp_probe.py, "
    "benchmarks/compile_moe_tp.py)"
)
SRC_SAC = f"{SRC}; {compiled_tp.SRC_SAC}"
BALANCED_ERROR = (
    "aten.gather.default got mixed torch.Tensor and DTensor, need to convert all "
    "torch.Tensor to DTensor before calling distributed operators!"
)
"""What torchtitan 0.3.0's debug round-robin routing (debug.moe_force_load_balance: "for
debugging usage only", config/configs.py) raises under TP, compiled (traced on 2 gloo ranks, a
Dynamo TorchRuntimeError around it): models/common/moe.py::_debug_force_load_balance_routing
gathers the router's DTensor scores with a plain torch.arange index, so eager fails alike. Real
routing (topk on the DTensor scores) traces; memplan's spec has no debug routing, so nothing
is refused for it."""

NONE_TRACED_TP = 2
"""The TP degree whose no-checkpointing set `layer` is (SelectiveAC's: TP 2 and 4)."""
NONE_ABOVE_TP2 = (
    "Qwen3-MoE with checkpointing none above TP 2: at TP 4 (4 gloo ranks, SP on and off) the "
    "compiled partition keeps the router's softmax and topk indices as this rank's own "
    "[batch, sequence / TP, .] copies (at TP 2: views of the whole [t, .] tensors) and "
    "ffn_norm's output [t, h] whole with SP off too, a set that differs from TP 2's and is not "
    "ruled yet (benchmarks/results/compile-moe-tp.json)"
)
GROUPED_MM_ALIGN_BYTES = 16
"""torch 2.13's _grouped_mm wants each row of its bf16 input 16-byte aligned (the error below,
raised by its fake-tensor meta under Dynamo, traced on 4 gloo ranks at expert width 48 / 4)."""
GROUPED_MM_STRIDE = "Expected mat_a stride along 0 dim to be multiple of 16 bytes"


def grouped_mm_misaligned(*, moe_inter: int, tp: int) -> str:
    """Why torch's _grouped_mm fails on this rank's expert slice (moe_inter / TP bf16 columns:
    the grouped mms run in bf16, compiled.qwen3_moe_layer), or ''."""
    width = moe_inter // tp
    if width * dtype_bytes(BF16) % GROUPED_MM_ALIGN_BYTES == 0:
        return ""
    return (
        f"moe_intermediate_size {moe_inter} / TP {tp} = {width} bf16 columns per rank: torch "
        f"2.13's _grouped_mm fails on the rank's expert slice (\"{GROUPED_MM_STRIDE}, got "
        f'{width}.", traced at 48 / 4 on 4 gloo ranks); a width / TP that is a multiple of 8 runs'
    )


_SOFTMAX_STATS = ("moe.router.softmax.amax", "moe.router.softmax.sum")
_TOKEN_SHARD = ("input", "attention_norm.rstd", "ffn_norm.rstd")


def layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    experts: int,
    top_k: int,
    moe_inter: int,
    dtype: str,
    router: str,
    tp: int,
    sequence_parallel: bool,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block on one TP rank, no checkpointing (module
    docstring); `heads`, `kv_heads`, `moe_inter` are the whole model's."""
    t = batch * seq
    ts = t // tp if sequence_parallel else t
    local = compiled.qwen3_moe_layer(
        batch=batch,
        seq=seq,
        hidden=hidden,
        heads=heads // tp,
        kv_heads=kv_heads // tp,
        head_dim=head_dim,
        experts=experts,
        top_k=top_k,
        moe_inter=moe_inter // tp,
        dtype=dtype,
        router=router,
    )
    out: list[Saved] = []
    for s in local:
        if s.name == "attention.wo_out":
            out.append(saved("attention.residual", (ts, hidden), dtype, compiled.BY, SRC))
        elif s.name in _TOKEN_SHARD:
            out.append(replace(s, shape=(ts, *s.shape[1:]), source=SRC))
        elif s.name == "ffn_norm.out" and not sequence_parallel:
            continue  # recomputed from the residual and ffn_norm's rstd (traced)
        elif s.name in _SOFTMAX_STATS:
            continue  # the router keeps one [t, E] tensor at every E under TP (traced)
        elif s.name == "moe.router.gate_out":
            out.append(replace(s, name="moe.router.softmax", source=SRC))
        else:
            out.append(replace(s, source=SRC))
    return tuple(out)


def op_sac_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    top_k: int,
    dtype: str,
    tp: int,
    sequence_parallel: bool,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block on one TP rank under SelectiveAC (module
    docstring); `heads`, `kv_heads` are the whole model's."""
    ts = batch * seq // tp if sequence_parallel else batch * seq
    local = compiled.op_sac_moe_layer(
        batch=batch,
        seq=seq,
        hidden=hidden,
        heads=heads // tp,
        kv_heads=kv_heads // tp,
        head_dim=head_dim,
        top_k=top_k,
        dtype=dtype,
    )
    out = [
        replace(s, shape=(ts, hidden) if s.name == "input" else s.shape, source=SRC_SAC)
        for s in local
    ]
    if sequence_parallel:
        out.append(saved("attention.wo.reduce_scatter", (ts, hidden), dtype, compiled.BY, SRC_SAC))
    return tuple(out)
