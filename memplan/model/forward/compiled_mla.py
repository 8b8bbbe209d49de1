"""What a torch.compile'd torchtitan 0.3.0 DeepSeek-V3 block keeps for backward
(`training.compile`, `model.implementation: torchtitan`, model_type deepseek_v3): MLA
attention, then a dense SwiGLU (the first `n_dense_layers`) or the MoE with shared experts.

Traced, not transcribed: benchmarks/compile_mla.py builds torchtitan 0.3.0's real blocks
(models/deepseek_v3/__init__.py::_build_dsv3_layers through tests/torchtitan_probe.py::
deepseek_v3_config: MLA, yarn ComplexRoPE, sigmoid router with or without node-limited groups,
route_norm, route_scale, shared experts, the `standard` token dispatcher, local at expert
parallelism 1, GroupedExperts on `torch._grouped_mm`; SDPA as the inner attention), compiles
each block as 0.3.0's distributed/compile.py::apply_compile does (the whole block,
`fullgraph=True`, `capture_scalar_outputs = True`, after AC wrapping) and reads the forward
graph Inductor gets from AOTAutograd's min-cut partition (torch 2.13 torch/_functorch/
partitioners.py::min_cut_rematerialization_partition via torch/_inductor/compile_fx.py::
compile_fx; memplan.verify.trace.compiled.compiled_saved): its outputs after the block's own
are what the backward reads. Each is counted by its storage (a slice returned by the graph
keeps its whole buffer alive: kv_norm's input is a slice of wkv_a's output), the block's
parameters and buffers excluded. Results: benchmarks/results/compile-mla.json.

On CPU MLA's SDPA runs the math kernel (q/k head dim nope + rope differs from v's:
memplan.model.stacks.torchtitan_mla), which the compiled graph decomposes: Inductor keeps
its scaled q and k and the v it multiplies by, upcast to fp32 for a 16-bit model (the math
kernel's upcast: memplan.model.forward.attention.math_dtype), and the [b, heads, s, s] softmax,
and recomputes the scores, RoPE and the q / k concatenations. Per block, with tokens t,
hidden D, heads H, q_lora_rank Q (0: one `wq`), kv_lora_rank R, nope / rope / v head dims
N / P / V, the model's dtype w and the math dtype m:

    input [t, D] w                    attention_norm rstd [t, 1] fp32, its output [t, D] w
    Q > 0: wq_a's output [t, Q] w (q_norm's input), q_norm rstd [t, 1] fp32, its output [t, Q] w
    wkv_a's output [t, R + P] w (kv_norm reads its [t, R] slice)
    kv_norm rstd [t, 1] fp32, its output [t, R] w (wkv_b's input)
    q scaled [b H, s, N + P] m, k scaled and transposed [b H, N + P, s] m, v [b H, s, V] m
        (fp32 at batch 1: v is a view of wkv_b's output, whose whole [t, H (N + V)] it keeps)
    softmax [b, H, s, s] m            wo's input [t, H V] w, its output [t, D] w
    ffn_norm rstd [t, 1] fp32, its output [t, D] w

then, dense layers (FeedForward, hidden F): w1's and w3's outputs and w2's input [t, F] w each.
MoE layers (E experts, top k, expert hidden F, shared hidden S = F x n_shared_experts):

    the gate's output [t, E] w (sigmoid is recomputed from it; the gate runs in w on CPU)
    topk's indices [t, k] int64      the scores routed [t k] w (the gathered scores; with
        route_norm and k > 4 the normalised ones and their sum [t, 1] w: the sum over k is a
        reduction torch 2.13 partitioners.py::should_ban_recomputation will not recompute once
        over 4x smaller than its input, compiled.BAN_REDUCTION_RATIO; without route_norm the
        scores sorted by expert, [t k, 1])
    the stable argsort's order [t k] int64, order // k [t k] int64
    the routed input [t k, D] bf16 (a model not in bf16 keeps its bf16 cast once, and the
        three expert weights' bf16 casts [E, F, D] each)
    the grouped mms' offsets [E] int32  w1's and w3's outputs, their product [t k, F] bf16 each
    w2's output [t k, D] bf16           the zeros [t, D] w deterministic_scatter_add starts from
    shared experts: w1's and w3's outputs and w2's input [t, S] w each

The node-limited group choice (n_group / topk_group) feeds topk's indices only: it adds
nothing. Routing changes nothing at expert parallelism 1 (every routed tensor has t x k rows:
traced seeded, torchtitan's balanced round-robin and every token on the same k experts).

Under torchtitan's per-op SelectiveAC (distributed/activation_checkpoint.py, `op_sac_layer`)
the compiled block keeps the checkpoint's input, the outputs of the odd-numbered matmuls
(memplan.model.stacks.torchtitan_mla.matmuls, then the dense or shared experts' w1, w3, w2; the
router's gate is recomputed uncounted, and so is any mm whose weight has the gate's shape
[E, D] (SelectiveAC matches `force_recompute_mm_shapes_by_fqns` by shape: traced with shared
experts 2 x 32 wide and 64 experts); the grouped mms are not mm ops) except w2's (only the
residual add reads it), topk's indices (its values, MUST_SAVE in eager SAC's cache, are not
read by backward; neither are the group topks'; under torchtitan's `_debug_force_load_balance`
routing, whose round-robin replaces topk's indices, those are not kept either: traced), and,
for a 16-bit model, the math SDPA's two bmm outputs in fp32, q k^T [b H, s, s] and softmax v
[b H, s, V]. In fp32 the two bmms are recomputed (traced: Inductor's joint-graph pattern pass
rewrites the fp32 attention and the rewritten bmm nodes are no longer tagged MUST_SAVE). Under
full checkpointing each block keeps its input, as eager.

Expert parallelism (`moe_ep_layer`, `op_sac_ep_layer`; traced on 2 and 4 gloo ranks by
benchmarks/compile_mla_ep.py with tests/compile_mla_ep_probe.py: torchtitan's MoE block laid
out by models/deepseek_v3/sharding.py::set_deepseek_v3_sharding_config(enable_ep=True) and
`Module.parallelize`, then checkpointed, then compiled, as parallelize_deepseekv3 orders them;
results/compile-mla-ep.json): the AllToAllTokenDispatcher's functional all-to-alls are in the
one fullgraph block, and what the partition keeps is what it keeps for Qwen3-MoE under EP
(memplan.model.forward.compiled_ep, `on_ep_rank`): `moe_layer`'s set, attention, router, local
reorder, the scatter-add's zeros and the shared experts unchanged on the rank's t tokens, with
the routed experts' input, w1's, w3's outputs and their product on the R rows the dispatch
brings to this rank's E / EP experts, the offsets [E / EP] (and a model not in bf16 the local
experts' bf16 weight casts [E / EP, ...]), the permutation's indices [R] int64, and the combine
all-to-all's output [t k, D] in the model's dtype in place of w2's output. Under SelectiveAC:
`op_sac_layer`'s set and the three all-to-alls' outputs (the counts [EP, E / EP] int64, the
dispatch [R, D] w, the combine [t k, D] w: MUST_SAVE). The node-limited routing and q_lora
change nothing there beyond EP 1's rule (traced with and without). R depends on the routing
(traced seeded, balanced, collapsed: rank 0 gets EP x t k rows, the other ranks none); `memplan
estimate` uses the balanced R = t k, the mean over the EP ranks (the kept bytes are affine in
R, the ranks' R sum to EP x t k), not the most-loaded rank's bound. The dense blocks hold no
expert: EP does not touch them (set_deepseek_v3_sharding_config shards the MoE alone), so they
keep `dense_layer`'s set (not traced under EP). Under FullAC the compiled MoE block runs under
EP and keeps its input alone, as at EP 1 (traced: seeded, collapsed, fp32, q_lora, top 6, EP 2
and 4), unlike Qwen3-MoE's, on which torch 2.13 fails there (compiled_ep.FULL_AC_FAILS).

Not traced, so refused with the reason (memplan.model.stacks.torchtitan.unsupported): CUDA
(the attention kernel, memplan.model.stacks.torchtitan_moe), tensor and context parallelism
(memplan.activations.torchtitan_parallel), torchao Float8, fp16, checkpoint_every > 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.model.forward import compiled_ep
from memplan.model.forward.compiled import BAN_REDUCTION_RATIO, BF16, BY, INT32
from memplan.model.forward.compiled import SRC as SRC_PARTITION
from memplan.model.forward.kernels import FP32, INT64, saved
from memplan.model.forward.tensors import Block, Saved, Setting
from memplan.model.inventory import Architecture

SRC = (
    f"{SRC_PARTITION}; torchtitan 0.3.0 models/deepseek_v3/model.py::Attention.forward, "
    "TransformerBlock.forward, models/common/moe.py, token_dispatcher.py::LocalTokenDispatcher "
    "(traced: benchmarks/compile_mla.py, results/compile-mla.json)"
)
SRC_SAC = (
    f"{SRC}; torchtitan 0.3.0 distributed/activation_checkpoint.py::SelectiveAC (odd mm "
    "outputs, topk MUST_SAVE)"
)
SRC_EP = (
    f"{SRC}; {compiled_ep.SRC_EP}; models/deepseek_v3/sharding.py::"
    "set_deepseek_v3_sharding_config (traced: benchmarks/compile_mla_ep.py, "
    "results/compile-mla-ep.json)"
)
SRC_SAC_EP = f"{SRC_SAC}; {compiled_ep.SRC_SAC_EP}; benchmarks/compile_mla_ep.py"
TRACED_DTYPES = (BF16, FP32)
"""The model dtypes traced (FSDP2's param_dtype bf16, or fp32)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mla:
    """One DeepSeek-V3 block's widths (torchtitan 0.3.0 _build_dsv3_layers' arguments)."""

    hidden: int
    """dim."""
    heads: int
    """n_heads."""
    q_lora: int
    """q_lora_rank; 0: one `wq` projection."""
    kv_lora: int
    """kv_lora_rank."""
    nope: int
    """qk_nope_head_dim."""
    rope: int
    """qk_rope_head_dim."""
    v_dim: int
    """v_head_dim."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Moe:
    """One DeepSeek-V3 MoE feed-forward's widths and router."""

    experts: int
    """num_experts (routed)."""
    top_k: int
    """router_top_k."""
    inter: int
    """moe_hidden_dim: each routed expert's hidden width."""
    shared_inter: int
    """moe_hidden_dim x num_shared_experts (0: no shared experts)."""
    route_norm: bool
    """router_route_norm: the top-k scores divided by their sum."""


def _s(name: str, shape: tuple[int, ...], dtype: str, src: str = SRC) -> Saved:
    return saved(name, shape, dtype, BY, src)


def attention_half(*, batch: int, seq: int, mla: Mla, dtype: str) -> list[Saved]:
    """The block's input, MLA's kept tensors and ffn_norm's rstd (module docstring)."""
    b, s, t, w, m = batch, seq, batch * seq, dtype, math_dtype(dtype)
    h, qk = mla.heads, mla.nope + mla.rope
    out = [
        _s("input", (t, mla.hidden), w),
        _s("attention_norm.rstd", (t, 1), FP32),
        _s("attention_norm.out", (t, mla.hidden), w),
    ]
    if mla.q_lora:
        out += [
            _s("attention.wq_a_out", (t, mla.q_lora), w),
            _s("attention.q_norm.rstd", (t, 1), FP32),
            _s("attention.q_norm.out", (t, mla.q_lora), w),
        ]
    # v for the second bmm: a 16-bit model's is its fp32 copy; an fp32 model's is reshaped
    # from wkv_b's output, a view of it at batch 1 (which then keeps the whole output alive),
    # a copy otherwise.
    value = (
        _s("attention.wkv_b_out", (t, h * (mla.nope + mla.v_dim)), w)
        if m == w and b == 1
        else _s("attn.value", (b * h, s, mla.v_dim), m)
    )
    return [
        *out,
        # kv_norm's input, the [t, R] slice, holds wkv_a's whole output.
        _s("attention.wkv_a_out", (t, mla.kv_lora + mla.rope), w),
        _s("attention.kv_norm.rstd", (t, 1), FP32),
        _s("attention.kv_norm.out", (t, mla.kv_lora), w),
        _s("attn.query_scaled", (b * h, s, qk), m),
        _s("attn.key_scaled_t", (b * h, qk, s), m),
        value,
        _s("attn.softmax", (b, h, s, s), m),
        _s("attention.wo_in", (t, h * mla.v_dim), w),
        _s("attention.wo_out", (t, mla.hidden), w),
        _s("ffn_norm.rstd", (t, 1), FP32),
    ]


def math_dtype(dtype: str) -> str:
    """The math SDPA's dtype: fp32 for a 16-bit model (memplan.model.forward.attention.
    math_dtype, the same rule on a bare dtype)."""
    return FP32 if dtype in (BF16, "fp16") else dtype


def dense_layer(*, batch: int, seq: int, mla: Mla, inter: int, dtype: str) -> tuple[Saved, ...]:
    """One compiled dense DeepSeek-V3 block (its first n_dense_layers), no checkpointing."""
    t, w = batch * seq, dtype
    return (
        *attention_half(batch=batch, seq=seq, mla=mla, dtype=dtype),
        _s("ffn_norm.out", (t, mla.hidden), w),
        _s("feed_forward.w1_out", (t, inter), w),
        _s("feed_forward.w3_out", (t, inter), w),
        _s("feed_forward.w2_in", (t, inter), w),
    )


def moe_layer(*, batch: int, seq: int, mla: Mla, moe: Moe, dtype: str) -> tuple[Saved, ...]:
    """One compiled DeepSeek-V3 MoE block at expert parallelism 1 on CPU (the gate in the
    model's dtype), no checkpointing (module docstring)."""
    t, d, w = batch * seq, mla.hidden, dtype
    e, k, f = moe.experts, moe.top_k, moe.inter
    n = t * k
    out = [
        *attention_half(batch=batch, seq=seq, mla=mla, dtype=dtype),
        _s("ffn_norm.out", (t, d), w),
        _s("moe.router.gate_out", (t, e), w),
        _s("moe.router.topk_indices", (t, k), INT64),
        _s("moe.router.scores", (t, k), w),
    ]
    if moe.route_norm and k > BAN_REDUCTION_RATIO:
        out.append(_s("moe.router.topk_sum", (t, 1), w))
    out += [
        _s("moe.dispatch.order", (n,), INT64),
        _s("moe.dispatch.token_indices", (n,), INT64),
        _s("moe.experts.input", (n, d), BF16),
    ]
    if w != BF16:
        out += [
            _s("moe.experts.w1_bf16", (e, f, d), BF16),
            _s("moe.experts.w3_bf16", (e, f, d), BF16),
            _s("moe.experts.w2_bf16", (e, d, f), BF16),
        ]
    out += [
        _s("moe.experts.offsets", (e,), INT32),
        _s("moe.experts.w1_out", (n, f), BF16),
        _s("moe.experts.w3_out", (n, f), BF16),
        _s("moe.experts.w2_in", (n, f), BF16),
        _s("moe.experts.w2_out", (n, d), BF16),
        _s("moe.combine.zeros", (t, d), w),
    ]
    if moe.shared_inter:
        sh = moe.shared_inter
        out += [
            _s("moe.shared_experts.w1_out", (t, sh), w),
            _s("moe.shared_experts.w3_out", (t, sh), w),
            _s("moe.shared_experts.w2_in", (t, sh), w),
        ]
    return tuple(out)


def moe_ep_layer(
    *, batch: int, seq: int, mla: Mla, moe: Moe, dtype: str, ep: int, received: int | None = None
) -> tuple[Saved, ...]:
    """One compiled DeepSeek-V3 MoE block on one rank of expert parallelism `ep` on CPU, no
    checkpointing (module docstring, "Expert parallelism"): `moe_layer`'s set with the expert
    half on the `received` R rows (None: the balanced tokens x top_k) and the local experts,
    the combine all-to-all's output in place of w2's, and the permutation's indices [R]."""
    n = batch * seq * moe.top_k
    return compiled_ep.on_ep_rank(
        moe_layer(batch=batch, seq=seq, mla=mla, moe=moe, dtype=dtype),
        n=n,
        received=n if received is None else received,
        local=moe.experts // ep,
        hidden=mla.hidden,
        dtype=dtype,
        src=SRC_EP,
    )


def op_sac_ep_layer(
    *,
    batch: int,
    seq: int,
    mla: Mla,
    moe: Moe,
    dtype: str,
    ep: int,
    received: int | None = None,
) -> tuple[Saved, ...]:
    """One compiled DeepSeek-V3 MoE block under per-op SelectiveAC on one rank of expert
    parallelism `ep` (module docstring): `op_sac_layer`'s set and the three all-to-alls'
    outputs (compiled_ep.all_to_alls)."""
    n = batch * seq * moe.top_k
    base = op_sac_layer(
        batch=batch,
        seq=seq,
        mla=mla,
        tail=feed_forward("moe.shared_experts", mla.hidden, moe.shared_inter),
        experts=moe.experts,
        top_k=moe.top_k,
        dtype=dtype,
    )
    return (
        *base,
        *compiled_ep.all_to_alls(
            ep=ep,
            experts=moe.experts,
            n=n,
            received=n if received is None else received,
            hidden=mla.hidden,
            dtype=dtype,
            src=SRC_SAC_EP,
        ),
    )


def matmuls(mla: Mla, tail: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """MLA's matmuls in forward order, (name, input width, output width), then `tail` (the
    dense feed-forward's or the shared experts' w1, w3, w2): SelectiveAC's count order
    (memplan.model.stacks.torchtitan_mla.matmuls, the same order)."""
    d, h, qk = mla.hidden, mla.heads, mla.nope + mla.rope
    q = (
        [("attention.wq_a", d, mla.q_lora), ("attention.wq_b", mla.q_lora, h * qk)]
        if mla.q_lora
        else [("attention.wq", d, h * qk)]
    )
    return [
        *q,
        ("attention.wkv_a", d, mla.kv_lora + mla.rope),
        ("attention.wkv_b", mla.kv_lora, h * (mla.nope + mla.v_dim)),
        ("attention.wo", h * mla.v_dim, d),
        *tail,
    ]


def feed_forward(prefix: str, hidden: int, inter: int) -> list[tuple[str, int, int]]:
    """A SwiGLU feed-forward's matmuls (w1, w3, w2) as `matmuls` takes them; none if `inter`
    is 0 (no shared experts)."""
    if not inter:
        return []
    return [
        (f"{prefix}.w1", hidden, inter),
        (f"{prefix}.w3", hidden, inter),
        (f"{prefix}.w2", inter, hidden),
    ]


def op_sac_layer(
    *,
    batch: int,
    seq: int,
    mla: Mla,
    tail: list[tuple[str, int, int]],
    experts: int,
    top_k: int,
    dtype: str,
) -> tuple[Saved, ...]:
    """One compiled DeepSeek-V3 block under per-op SelectiveAC (module docstring). `tail`: the
    dense or shared experts' matmuls after wo (`feed_forward`); `experts`, `top_k`: 0 for a
    dense block. SelectiveAC recomputes, uncounted, every mm whose weight has the router
    gate's shape, [experts, hidden] (`force_recompute_mm_shapes_by_fqns`, matched by shape:
    the shared experts' w1 and w3 too when their width equals the expert count)."""
    b, s, t, w = batch, seq, batch * seq, dtype
    out = [_s("input", (t, mla.hidden), w, SRC_SAC)]
    count = 0
    for name, width_in, width_out in matmuls(mla, tail):
        if experts and (width_in, width_out) == (mla.hidden, experts):
            continue
        count += 1
        # The last matmul, w2, is read by nothing but the residual add: dropped.
        if count % 2 == 1 and not name.endswith(".w2"):
            out.append(_s(f"{name}.output", (t, width_out), w, SRC_SAC))
    if w != FP32:
        m = math_dtype(w)
        out += [
            _s("attn.scores_bmm", (b * mla.heads, s, s), m, SRC_SAC),
            _s("attn.output_bmm", (b * mla.heads, s, mla.v_dim), m, SRC_SAC),
        ]
    if top_k:
        out.append(_s("moe.router.topk_indices", (t, top_k), INT64, SRC_SAC))
    return tuple(out)


def mla_of(arch: Architecture) -> Mla:
    from memplan.model.stacks.torchtitan_mla import dims

    q_lora, kv_lora, nope, rope, v_dim, heads = dims(arch)
    return Mla(
        hidden=arch.hidden_size,
        heads=heads,
        q_lora=q_lora,
        kv_lora=kv_lora,
        nope=nope,
        rope=rope,
        v_dim=v_dim,
    )


def moe_of(arch: Architecture) -> Moe:
    x = arch.extra
    inter = int(x.get("moe_intermediate_size", arch.intermediate_size))
    return Moe(
        experts=arch.num_experts,
        top_k=arch.num_experts_per_token,
        inter=inter,
        shared_inter=inter * int(x.get("n_shared_experts") or 0),
        route_norm=bool(x.get("norm_topk_prob")),
    )


def uncovered(arch: Architecture, st: Setting) -> str:
    """Why the traced compiled DeepSeek-V3 block does not cover this setting, or ''. CUDA is
    refused before (memplan.model.stacks.torchtitan_moe); tensor and context parallelism by
    memplan.activations.torchtitan_parallel."""
    if st.float8 != "none":
        return "torchao Float8 (not traced on a DeepSeek-V3 block)"
    if st.matmul not in TRACED_DTYPES:
        return f"{st.matmul} (traced: {', '.join(TRACED_DTYPES)})"
    if st.checkpoint_every > 1:
        return "checkpoint_every > 1"
    if st.device != "cpu":
        return f"device {st.device} (traced on CPU, where MLA's SDPA is the math kernel)"
    return ""


def blocks(arch: Architecture, st: Setting, layers: list[Block]) -> tuple[list[Block], str]:
    """torchtitan's DeepSeek-V3 blocks (`layers.dense` and the MoE `layers`) compiled, with
    checkpointing none or selective-op (full: each block keeps its input, as eager), and
    the note saying so."""
    mla, moe = mla_of(arch), moe_of(arch)
    b, s, w = st.batch, st.sequence, st.matmul
    dense_inter = arch.intermediate_size
    op_sac = st.checkpointing == "selective-op"

    local = st.local_experts or moe.experts
    ep = moe.experts // local

    def kept(dense: bool) -> tuple[Saved, ...]:
        if ep > 1 and not dense:
            # Expert parallelism: the all-to-all dispatcher's compiled block, balanced routing
            # (R = tokens x top_k: the mean over the EP ranks; module docstring).
            fn = op_sac_ep_layer if op_sac else moe_ep_layer
            return fn(batch=b, seq=s, mla=mla, moe=moe, dtype=w, ep=ep)
        if op_sac:
            tail = (
                feed_forward("feed_forward", mla.hidden, dense_inter)
                if dense
                else feed_forward("moe.shared_experts", mla.hidden, moe.shared_inter)
            )
            return op_sac_layer(
                batch=b,
                seq=s,
                mla=mla,
                tail=tail,
                experts=0 if dense else moe.experts,
                top_k=0 if dense else moe.top_k,
                dtype=w,
            )
        if dense:
            return dense_layer(batch=b, seq=s, mla=mla, inter=dense_inter, dtype=w)
        return moe_layer(batch=b, seq=s, mla=mla, moe=moe, dtype=w)

    out = [replace(block, tensors=kept(block.name == "layers.dense")) for block in layers]
    routed = (
        f"; at expert parallelism {ep} each MoE block's experts take the balanced tokens x "
        "top_k rows, the mean over the EP ranks (a rank may receive more)"
        if ep > 1
        else ""
    )
    sizes = ", ".join(
        f"{o.name} {o.bytes_each:,} B (eager {e.bytes_each:,})"
        for o, e in zip(out, layers, strict=True)
    )
    return out, (
        f"training.compile: each DeepSeek-V3 block keeps what Inductor's min-cut partition "
        f"keeps (traced on torchtitan 0.3.0's blocks: {sizes}){routed}; embeddings, norm and "
        "output run eager, the loss as training.compile_loss says."
    )
