"""What a torch.compile'd torchtitan 0.3.0 Qwen3-MoE block keeps for backward under expert
parallelism (`training.compile` with `parallelism.expert` > 1).

How torchtitan 0.3.0 compiles it: models/qwen3/parallelize.py::parallelize_qwen3 runs
`model.parallelize(parallel_dims)` (the routed experts' weights Shard(0) over the `ep` mesh,
models/common/moe.py::RoutedExperts.parallelize wiring the `standard` dispatcher,
models/common/token_dispatcher.py::AllToAllTokenDispatcher, to it), then activation
checkpointing, then distributed/compile.py::apply_compile: each TransformerBlock whole,
`fullgraph=True`, with `torch._dynamo.config.capture_scalar_outputs = True` (for the
dispatch's data-dependent sizes). Under compile the dispatcher takes its functional-collective
path (`torch.compiler.is_compiling()`: torch/distributed/_functional_collectives.py::
all_to_all_single for the token-count exchange, the dispatch and the combine); the splits come
from `.tolist()` of the exchanged counts, unbacked sizes under capture_scalar_outputs. The
whole block, all-to-alls included, is one graph: no graph break, nothing runs eager (traced:
fullgraph compile holds on gloo ranks, forward and backward run).

What Inductor's min-cut partition keeps (tests/compile_ep_probe.py: torchtitan's real block
on 2 and 4 gloo ranks at EP 2 and 4, the graph's outputs read when it runs, since R is an
unbacked size; benchmarks/compile_moe_ep.py, results/compile-moe-ep.json) is the EP 1 block's
set (memplan.model.forward.compiled.qwen3_moe_layer: attention, router and local reorder
unchanged on the rank's t tokens, N = t x top_k rows) with the expert half on the R rows the
dispatch all-to-all brings to this rank's E / EP experts:

    the permutation to expert-major order, `_permute`'s permuted_indices [R] int64
    the experts' input (the received rows in expert-major order) [R, h] bf16
    the grouped mms' offsets [E / EP] int32; w1's, w3's outputs, silu(w1) * w3 [R, F] bf16 each
    the combine all-to-all's output (the expert outputs back on the source rank) [N, h] w,
        in place of EP 1's w2 output [N, h]: the scores' product's backward reads it

(a model not in bf16 keeps the experts' input as its bf16 cast and the three local expert
weights' bf16 casts [E / EP, ...], as at EP 1; traced with fp32 parameters). The router half
is EP 1's, its dtype included: the traces ran CPU's router (the gate in the parameters'
dtype); CUDA's fp32 gate is traced at EP 1 only (benchmarks/compile_moe.py), where the
router's graph is the same, before the dispatch.

Under full checkpointing (torchtitan's FullAC) torch 2.13 itself fails (`FULL_AC_FAILS`):
refused.

Under SelectiveAC (`op_sac_moe_ep_layer`) the compiled block keeps EP 1's set plus the three
all-to-alls' outputs, which 0.3.0's _get_default_save_ops lists (MUST_SAVE): the token-count
exchange [EP, E / EP] int64, the dispatch [R, h] w and the combine [N, h] w.

Routing: every tensor before the dispatch has t or N rows whatever the routing; R depends on
it (and differs per rank and step: traced seeded, every token on experts 0 .. top_k - 1 (rank
0 receives EP x N rows, the others none), and torchtitan's `_debug_force_load_balance`
round-robin). The rule takes R (`received`); `memplan estimate` uses the balanced R = N
(`received=None`), as the eager EP rule does (memplan.model.stacks.torchtitan_moe): the kept
bytes are affine in R and the ranks' R sum to EP x N, so it is the mean over the EP ranks, not
the most-loaded rank's bound (traced, seeded: 51 and 77 rows against N = 64).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import compiled
from memplan.model.forward.kernels import INT64, saved
from memplan.model.forward.tensors import Saved

SRC_EP = (
    f"{compiled.SRC}; torchtitan 0.3.0 distributed/compile.py::apply_compile, "
    "models/common/token_dispatcher.py::AllToAllTokenDispatcher (dispatch, _permute, combine: "
    "torch/distributed/_functional_collectives.py::all_to_all_single under compile) (traced on "
    "gloo ranks: tests/compile_ep_probe.py, benchmarks/compile_moe_ep.py)"
)
SRC_SAC_EP = (
    f"{SRC_EP}; torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops "
    "(_c10d_functional.all_to_all_single.default: MUST_SAVE)"
)
FULL_AC_FAILS = (
    "full checkpointing with expert parallelism: torch 2.13 itself fails there, its "
    "AOTAutograd runtime wrapper (_functorch/_aot_autograd/runtime_wrappers.py::"
    '_AutogradSavedState.save_from_forward) raises "AssertionError: expected all '
    "tensors_saved_with_vc_check to be Tensors\" in the compiled block's forward (the EP "
    "DeviceMesh the partition saves for the backward's all-to-all stands before a saved "
    "tensor; run on 2 gloo ranks, Inductor's CPU code generation and the tracer alike, any "
    "routing: tests/compile_ep_probe.py); use selective-op or none, or compile off"
)
"""Why FullAC + compile under EP is refused (traced: benchmarks/compile_moe_ep.py)."""
EXPERT_ROWS = ("experts.input", "experts.w1_out", "experts.w3_out", "experts.w2_in")
"""The EP 1 set's tensors with N rows that, under EP, have the received R rows."""
EXPERT_WEIGHT_CASTS = ("experts.w1_bf16", "experts.w3_bf16", "experts.w2_bf16")


def qwen3_moe_ep_layer(
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
    ep: int,
    received: int | None = None,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block on one rank of expert parallelism `ep`,
    no checkpointing (module docstring). `received`: R, the rows the dispatch all-to-all
    brings to this rank (None: the balanced tokens x top_k)."""
    n = batch * seq * top_k
    r = n if received is None else received
    local = experts // ep
    whole = compiled.qwen3_moe_layer(
        batch=batch,
        seq=seq,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        experts=experts,
        top_k=top_k,
        moe_inter=moe_inter,
        dtype=dtype,
        router=router,
    )
    return on_ep_rank(whole, n=n, received=r, local=local, hidden=hidden, dtype=dtype, src=SRC_EP)


def on_ep_rank(
    whole: tuple[Saved, ...],
    *,
    n: int,
    received: int,
    local: int,
    hidden: int,
    dtype: str,
    src: str,
) -> tuple[Saved, ...]:
    """An EP 1 compiled MoE block's kept set (compiled.qwen3_moe_layer, compiled_mla.moe_layer:
    the same expert-half names) on one rank of expert parallelism (module docstring): the
    experts' rows on the `received` R, their weights' casts and offsets on the `local` experts,
    w2's output [`n`, h] replaced by the combine all-to-all's output in the model's `dtype`, and
    the permutation's indices [R] int64 after the local reorder's."""
    out: list[Saved] = []
    for s in whole:
        name = s.name.removeprefix("moe.")
        if name in EXPERT_ROWS:
            out.append(replace(s, shape=(received, *s.shape[1:]), source=src))
        elif name in EXPERT_WEIGHT_CASTS:
            out.append(replace(s, shape=(local, *s.shape[1:]), source=src))
        elif name == "experts.offsets":
            out.append(replace(s, shape=(local,), source=src))
        elif name == "experts.w2_out":
            # The combine all-to-all's output: w2's output back on this rank, in the model's
            # dtype (GroupedExperts.forward's `type_as(x)`).
            out.append(saved("moe.combine.received", (n, hidden), dtype, compiled.BY, src))
        else:
            out.append(s)
        if name == "dispatch.token_indices":
            out.append(saved("moe.dispatch.permuted_indices", (received,), INT64, compiled.BY, src))
    return tuple(out)


def op_sac_moe_ep_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    experts: int,
    top_k: int,
    dtype: str,
    ep: int,
    received: int | None = None,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block under per-op SelectiveAC on one rank of
    expert parallelism `ep` (module docstring): EP 1's set (compiled.op_sac_moe_layer) and the
    three all-to-alls' outputs."""
    n = batch * seq * top_k
    r = n if received is None else received
    base = compiled.op_sac_moe_layer(
        batch=batch,
        seq=seq,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        top_k=top_k,
        dtype=dtype,
    )
    return (
        *base,
        *all_to_alls(ep=ep, experts=experts, n=n, received=r, hidden=hidden, dtype=dtype),
    )


def all_to_alls(
    *, ep: int, experts: int, n: int, received: int, hidden: int, dtype: str, src: str = SRC_SAC_EP
) -> tuple[Saved, ...]:
    """The three all-to-alls' outputs SelectiveAC saves (MUST_SAVE) under EP: the token-count
    exchange [EP, E / EP] int64, the dispatch [R, h] and the combine [n, h] in `dtype`."""
    return (
        saved("moe.dispatch.counts", (ep, experts // ep), INT64, compiled.BY, src),
        saved("moe.dispatch.received", (received, hidden), dtype, compiled.BY, src),
        saved("moe.combine.received", (n, hidden), dtype, compiled.BY, src),
    )
