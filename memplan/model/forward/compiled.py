"""What a torch.compile'd decoder layer saves for backward (`training.compile`): Llama's, OLMo 2's.

torch.compile (Inductor, torch 2.13) partitions each compiled region's joint forward+backward
graph with AOTAutograd's min-cut partitioner (torch/_functorch/partitioners.py::
min_cut_rematerialization_partition, called by torch/_inductor/compile_fx.py::compile_fx with
`compiler="inductor"`): it keeps the outputs of the ops it will not recompute (matmuls,
attention) that the backward reads and recomputes the cheap elementwise ones (casts, RMSNorm's
normalisation, RoPE, SiLU) from the fewest bytes. What it keeps is read by running it
(memplan.verify.trace.compiled: the forward graph Inductor gets, its outputs after the layer's
own), for transformers' LlamaDecoderLayer (5.25, SDPA) and torchtitan's Llama3TransformerBlock
(0.3.0, SDPA, fused wqkv) alike; per layer and token, with the layer's input, dtype w (the
matmul dtype), hidden h, q heads a, kv heads g, head_dim d, MLP width f:

    input x [t, h] w      attention_norm rstd [t] fp32     its output (wqkv's input) [t, h] w
    q, k after RoPE [t, a*d], [t, g*d] w                   v [t, g*d] w
    SDPA output [t, a*d] w, logsumexp [b, a, s] fp32       wo's output [t, h] w
    ffn_norm rstd [t] fp32, its output [t, h] w            w1, w3 outputs [t, f] w each
    silu(w1) * w3 (w2's input) [t, f] w

= w (4h + 2ad + 2gd + 3f) + 4a + 8 bytes per token: 139,400 for Llama 3.1 8B in bf16, against
the eager layer's fp32 RMSNorm copies, RoPE intermediates and SiLU output. (RoPE's cos/sin and
the weights the backward reads are the model's, not the layer's.)

Biases change nothing: the partitioner keeps the same tensors whether a projection is `mm` or
`addmm` (traced: LlamaDecoderLayer with attention_bias and mlp_bias, Qwen2DecoderLayer's q/k/v
biases, Qwen3DecoderLayer with attention_bias; the bias's gradient is a sum over the output's
gradient, which needs no forward tensor). Per-head q/k norms (Qwen3: `q_norm` / `k_norm`, an
RMSNorm over head_dim before RoPE; transformers' Qwen3DecoderLayer and torchtitan 0.3.0's
Qwen3TransformerBlock traced alike) add, per token, each norm's input (the q and k
projections' outputs, which RMSNorm's backward reads) and its fp32 rstd, one per head:

    q_proj output [t, a*d] w, q_norm rstd [t, a] fp32
    k_proj output [t, g*d] w, k_norm rstd [t, g] fp32

= w (4h + 3ad + 3gd + 3f) + 8a + 4g + 8 bytes per token (`qk_norm=True`): 137,512 for Qwen3-8B
in bf16 (h 4096, a 32, g 8, d 128, f 12288); the partitioner keeps the normalised, rotated q
and k as well, as for Llama (benchmarks/compile_layers.py: every case of its grid equal to the
byte, results/compile-layers.json). Under torchao Float8 the same three tensors drop as for
Llama; under per-op SAC and full checkpointing the kept set is Llama's (the norms add no
matmul, so SelectiveAC's mm count is unchanged).

Under full checkpointing the compiled layer keeps its input alone, as the eager one does (traced:
torchtitan's FullAC ptd_checkpoint_wrapper, then torch.compile). Under torchtitan's per-op SAC
(`op_sac_layer`) it keeps the policy's MUST_SAVE outputs that its backward reads: eager SAC's
cache (torch/utils/checkpoint.py::_CachingTorchDispatchMode) holds every MUST_SAVE output,
read or not, until the layer's backward; the compiled graph drops the unread ones (w2's output,
which only the residual add consumes).

Covered: Llama-style layers (llama, mistral, qwen2, qwen3; biases or not) and OLMo 2's
(`olmo2_layer`: full-width q/k norms, norms after each branch), SDPA with no dropout,
no autocast (FSDP2's MixedPrecisionPolicy or bf16 parameters: the layer computes in one
dtype), where SDPA runs a flash kernel (CPU's, or CUDA's for 16-bit q/k/v and a head_dim
flash takes: `kernel_uncovered`). Only the decoder layers are compiled here (torchtitan's
distributed/compile.py::apply_compile compiles each TransformerBlock; the embeddings, final
norm and output projection run eager, and the loss unless `training.compile_loss`:
memplan.model.stacks.torchtitan): the rest of the forward is unchanged. Not
modelled: the temporaries Inductor's fused kernels avoid in backward (the layers' working set
stays the eager one, an upper bound). Not traced, so refused with the reason (the eager saved
set stands): transformers' MoE layers. torchtitan 0.3.0's Qwen3-MoE block is traced
(`qwen3_moe_layer`, below). Not traced either: Gemma's layers (and OLMo 2's under
torchao Float8), eager attention, SDPA's memory-efficient and math kernels, dropout, autocast,
sliding windows and Megatron-style selective checkpointing.

torchtitan 0.3.0's Qwen3-MoE block (`qwen3_moe_layer`; memplan.verify.trace.compiled.
torchtitan_qwen3_moe_block, benchmarks/compile_moe.py, results/compile-moe.json): 0.3.0's
distributed/compile.py::apply_compile compiles each TransformerBlock whole
(`transformer_block.compile(backend="inductor", fullgraph=True)`, after AC wrapping, before
FSDP) with `torch._dynamo.config.capture_scalar_outputs = True`. At expert parallelism 1 the
`standard` dispatcher is local (LocalTokenDispatcher: no padding, no drop), every routed
tensor has N = tokens x top_k rows whatever the routing, so the partition's shapes are static
and the same at every routing (traced: seeded, torchtitan's balanced round-robin, and every
token on the same top_k experts). Per layer, with the dense Qwen3 attention half above (through
ffn_norm's rstd), experts E, top_k k, expert hidden F, the router's dtype r (the gate under
`torch.autocast(float32)`: fp32 on CUDA, the model's dtype w on CPU, where autocast disables
itself for fp32):

    ffn_norm's output [t, h] r (the gate's input; on CUDA its fp32 cast, which the partitioner
        keeps instead of the w one)    the gate weight's fp32 cast [E, h] (r != w only)
    softmax's output [t, E] r, or from SOFTMAX_STATS_FROM experts on the gate's output [t, E] r
        and softmax's row max and sum [t, 1] fp32 each (the min-cut's weights tip over)
    topk's indices [t, k] int64        gathered scores [t, k] r
    route_norm's denominator [t, 1] r when top_k > 4 (the sum over k is then a reduction
        partitioners.py::should_ban_recomputation will not recompute: Qwen3-30B-A3B's top 8)
    the stable argsort's order [N] int64, order // k [N] int64 (the token reordering)
    the routed input [N, h] bf16 (x[order // k] in bf16; a model not in bf16 keeps its bf16
        cast, once, and the three expert weights' bf16 casts [E, F, h] each)
    the grouped mms' offsets [E] int32  w1's and w3's outputs, silu(w1) * w3 [N, F] bf16 each
    w2's output [N, h] bf16            the zeros [t, h] w that deterministic_scatter_add starts
        from (the combine's base, a saved graph constant)

The scores after the sort and the fp32 combine product are recomputed. Under torchtitan's
SelectiveAC (`op_sac_moe_layer`) the compiled block keeps the checkpoint's input, wqkv's
output (mm 1), SDPA's output and logsumexp, and topk's indices: eager SAC's cache also keeps
topk's fp32 values (MUST_SAVE, unread by backward: dropped) and wo's output is mm 2
(recomputed); the gate's mm is force-recomputed and the grouped mms are not mm ops. Under
full checkpointing each block keeps its input. Expert parallelism (the all-to-all
dispatcher): memplan.model.forward.compiled_ep. Tensor parallelism (dense Llama 3 and Qwen3
blocks): memplan.model.forward.compiled_tp; Qwen3-MoE's at EP 1: compiled_moe_tp. Not traced,
so refused: a MoE block under tensor parallelism beyond those cases, context parallelism,
torchao Float8 on a MoE block, DeepSeek-V3's and gpt-oss' blocks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan.model.forward import attention
from memplan.model.forward.kernels import FP32, INT64, attention_dims, saved
from memplan.model.forward.tensors import Activations, Saved, Setting
from memplan.model.inventory import Architecture

SRC = (
    "torch 2.13 torch/_functorch/partitioners.py::min_cut_rematerialization_partition via "
    "torch/_inductor/compile_fx.py::compile_fx (traced: memplan.verify.trace.compiled)"
)
BY = "compiled forward graph output"


def llama_layer(
    *,
    float8: bool = False,
    qk_norm: bool = False,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    dtype: str,
) -> tuple[Saved, ...]:
    """The tensors one compiled Llama-style layer passes from forward to backward. `float8`:
    its Linears are torchao Float8Linear (tensorwise or rowwise: traced alike), whose GEMM
    inputs are cast to fp8 inside the graph: the partitioner then keeps neither norm's output
    nor w2's input (it recomputes them, and their casts, from the tensors it keeps). `qk_norm`:
    Qwen3's per-head q_norm / k_norm before RoPE, whose inputs (the q and k projections'
    outputs) and fp32 rstd the partitioner keeps besides (traced, with and without float8)."""
    t, h, a, g, d, f, w = batch * seq, hidden, heads, kv_heads, head_dim, inter, dtype
    if float8:
        dropped = ("attention_norm.out", "ffn_norm.out", "feed_forward.w2_in")
        kept = llama_layer(
            qk_norm=qk_norm,
            batch=batch,
            seq=seq,
            hidden=h,
            heads=a,
            kv_heads=g,
            head_dim=d,
            inter=f,
            dtype=w,
        )
        return tuple(
            replace(s, source=SRC + "; torchao 0.18 Float8Linear")
            for s in kept
            if s.name not in dropped
        )
    norms = (
        (
            saved("attention.q_proj_out", (t, a * d), w, BY, SRC),
            saved("attention.q_norm.rstd", (t, a), FP32, BY, SRC),
            saved("attention.k_proj_out", (t, g * d), w, BY, SRC),
            saved("attention.k_norm.rstd", (t, g), FP32, BY, SRC),
        )
        if qk_norm
        else ()
    )
    return (
        saved("input", (t, h), w, BY, SRC),
        saved("attention_norm.rstd", (t, 1), FP32, BY, SRC),
        saved("attention_norm.out", (t, h), w, BY, SRC),
        *norms,
        saved("attention.q_rope", (t, a * d), w, BY, SRC),
        saved("attention.k_rope", (t, g * d), w, BY, SRC),
        saved("attention.v", (t, g * d), w, BY, SRC),
        saved("attention.sdpa_out", (t, a * d), w, BY, SRC),
        saved("attention.logsumexp", (batch, a, seq), FP32, BY, SRC),
        saved("attention.wo_out", (t, h), w, BY, SRC),
        saved("ffn_norm.rstd", (t, 1), FP32, BY, SRC),
        saved("ffn_norm.out", (t, h), w, BY, SRC),
        saved("feed_forward.w1_out", (t, f), w, BY, SRC),
        saved("feed_forward.w3_out", (t, f), w, BY, SRC),
        saved("feed_forward.w2_in", (t, f), w, BY, SRC),
    )


def op_sac_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    dtype: str,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Llama3 block under per-op SAC
    (torchtitan/distributed/activation_checkpoint.py::SelectiveAC: save the compute ops'
    outputs, every second mm recomputed; fused wqkv is mm 1, wo 2, w1 3, w3 4, w2 5): the
    checkpoint's input, wqkv's output (mm 1), SDPA's output and logsumexp, w1's output (mm 3).
    w2's output (mm 5, MUST_SAVE) is not read by any backward: the compiled graph drops it
    (eager SAC's cache keeps it: 65,664 against 57,472 bytes per token for Llama 3.1 8B, traced
    by benchmarks/compile_float8.py). With torchao Float8Linear the same set (traced: the
    policy sees aten.mm on Float8TrainingTensor before it becomes _scaled_mm). torchtitan's
    Qwen3TransformerBlock keeps the same set (traced, with and without float8): its q_norm /
    k_norm are recomputed from wqkv's output, and add no matmul to SelectiveAC's count."""
    t, h, a, g, d, f, w = batch * seq, hidden, heads, kv_heads, head_dim, inter, dtype
    return (
        saved("input", (t, h), w, BY, SRC),
        saved("attention.wqkv_out", (t, (a + 2 * g) * d), w, BY, SRC),
        saved("attention.sdpa_out", (t, a * d), w, BY, SRC),
        saved("attention.logsumexp", (batch, a, seq), FP32, BY, SRC),
        saved("feed_forward.w1_out", (t, f), w, BY, SRC),
    )


def olmo2_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    dtype: str,
) -> tuple[Saved, ...]:
    """One compiled OLMo 2 layer (transformers 5.25 models/olmo2/modeling_olmo2.py::
    Olmo2DecoderLayer: no norm before attention or MLP; q_norm / k_norm, RMSNorms over the
    whole q and k projections [a*d] / [g*d]; post_attention_layernorm and
    post_feedforward_layernorm on each branch's output before its residual add), traced
    (benchmarks/compile_layers.py): the layer's input (the projections' input), the q and k
    projections' outputs and their norms' rstd (one per token each: full width), v, q and k
    after RoPE, SDPA's output and logsumexp, o_proj's output and its post-norm's rstd, the
    residual sum (gate/up's input), gate's and up's outputs, down's input, down's output and
    its post-norm's rstd: w (4h + 3ad + 3gd + 3f) + 4a + 16 bytes per token."""
    t, h, a, g, d, f, w = batch * seq, hidden, heads, kv_heads, head_dim, inter, dtype
    return (
        saved("input", (t, h), w, BY, SRC),
        saved("attention.q_proj_out", (t, a * d), w, BY, SRC),
        saved("attention.q_norm.rstd", (t, 1), FP32, BY, SRC),
        saved("attention.k_proj_out", (t, g * d), w, BY, SRC),
        saved("attention.k_norm.rstd", (t, 1), FP32, BY, SRC),
        saved("attention.v", (t, g * d), w, BY, SRC),
        saved("attention.q_rope", (t, a * d), w, BY, SRC),
        saved("attention.k_rope", (t, g * d), w, BY, SRC),
        saved("attention.sdpa_out", (t, a * d), w, BY, SRC),
        saved("attention.logsumexp", (batch, a, seq), FP32, BY, SRC),
        saved("attention.wo_out", (t, h), w, BY, SRC),
        saved("post_attention_layernorm.rstd", (t, 1), FP32, BY, SRC),
        saved("mlp.input", (t, h), w, BY, SRC),
        saved("mlp.gate_out", (t, f), w, BY, SRC),
        saved("mlp.up_out", (t, f), w, BY, SRC),
        saved("mlp.down_in", (t, f), w, BY, SRC),
        saved("mlp.down_out", (t, h), w, BY, SRC),
        saved("post_feedforward_layernorm.rstd", (t, 1), FP32, BY, SRC),
    )


SRC_MOE = (
    f"{SRC}; torchtitan 0.3.0 distributed/compile.py::apply_compile, models/common/moe.py, "
    "models/common/token_dispatcher.py::LocalTokenDispatcher (traced: memplan.verify.trace."
    "compiled.torchtitan_qwen3_moe_block, benchmarks/compile_moe.py)"
)
BF16 = "bf16"
INT32 = "int32"
BAN_REDUCTION_RATIO = 4
"""torch 2.13 torch/_functorch/partitioners.py::should_ban_recomputation (`ban_if_reduction`):
an op whose output is over 4x smaller than its inputs is never recomputed ("reduction op")."""
SOFTMAX_STATS_FROM = {FP32: 10, BF16: 47}
"""The router's softmax (`F.softmax` on the gate's [t, E] output, decomposed by Inductor into
amax, sub, exp, sum, div, computed in fp32): below this many experts the partition keeps its
output [t, E] (cast back to r), from it on the gate's output [t, E] r and the two [t, 1] fp32
row statistics (amax, sum), recomputing exp and div: the min-cut's weights
(partitioners.py::get_node_weight: bytes x 1.1 ** distance from the backward, x 2 unless
materialized; `ban_if_reduction` forbids recomputing amax and sum) trade E bytes against the
two statistics. Traced at E 8, 9, 10, 12, 14, 16, 32, 40, 42, 44, 46, 47, 48, 56, 64 and 128,
top_k 2 and 8, hidden 64 and 128 (benchmarks/compile_moe.py stores E 8, 9, 10, 16, 46, 47 and
128; the others were traced once by hand with the same tracer): the switch is between E 9 and
10 with an fp32 gate (CUDA autocast, or an fp32 model) and between 46 and 47 with a bf16 one
(CPU). A threshold of the weights, not of the token count (the same at 32 and 64 tokens)."""


def qwen3_moe_layer(
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
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block at expert parallelism 1, no checkpointing
    (module docstring): the dense Qwen3 attention half (`llama_layer(qk_norm=True)` through
    ffn_norm's rstd), then the router's, the dispatcher's and the grouped experts' kept
    tensors. `router`: the gate's dtype (fp32 under CUDA autocast, else `dtype`)."""
    t, h, e, k, f, w, r = batch * seq, hidden, experts, top_k, moe_inter, dtype, router
    n = t * k
    dense = llama_layer(
        qk_norm=True,
        batch=batch,
        seq=seq,
        hidden=h,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        inter=0,
        dtype=w,
    )
    attention_half = tuple(s for s in dense if not s.name.startswith(("ffn_norm.out", "feed_")))

    def moe(name: str, shape: tuple[int, ...], dt: str) -> Saved:
        return saved(f"moe.{name}", shape, dt, BY, SRC_MOE)

    out = [
        *attention_half,
        saved("ffn_norm.out", (t, h), r, BY, SRC_MOE),
    ]
    if r != w:
        out.append(moe("router.gate.weight_fp32", (e, h), r))
    if e >= SOFTMAX_STATS_FROM[r]:
        # The gate's logits and softmax's row max and sum: softmax is recomputed from them.
        out += [
            moe("router.gate_out", (t, e), r),
            moe("router.softmax.amax", (t, 1), FP32),
            moe("router.softmax.sum", (t, 1), FP32),
        ]
    else:
        out.append(moe("router.softmax", (t, e), r))
    out += [
        moe("router.topk_indices", (t, k), INT64),
        moe("router.topk_scores", (t, k), r),
    ]
    if k > BAN_REDUCTION_RATIO:
        # route_norm's denominator, sum over the k scores: a reduction the partitioner will not
        # recompute when its output is over 4x smaller than its input (k > 4), and the
        # division's backward reads it.
        out.append(moe("router.topk_sum", (t, 1), r))
    out += [
        moe("dispatch.order", (n,), INT64),
        moe("dispatch.token_indices", (n,), INT64),
        moe("experts.input", (n, h), BF16),
    ]
    if w != BF16:
        out += [
            moe("experts.w1_bf16", (e, f, h), BF16),
            moe("experts.w3_bf16", (e, f, h), BF16),
            moe("experts.w2_bf16", (e, h, f), BF16),
        ]
    out += [
        moe("experts.offsets", (e,), INT32),
        moe("experts.w1_out", (n, f), BF16),
        moe("experts.w3_out", (n, f), BF16),
        moe("experts.w2_in", (n, f), BF16),
        moe("experts.w2_out", (n, h), BF16),
        moe("combine.zeros", (t, h), w),
    ]
    return tuple(out)


def op_sac_moe_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    top_k: int,
    dtype: str,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 Qwen3-MoE block under per-op SelectiveAC (module
    docstring): `op_sac_layer`'s attention tensors (no w1: a MoE block has no dense mm after
    wo) and topk's indices; topk's values, MUST_SAVE but unread by the backward, are dropped."""
    dense = op_sac_layer(
        batch=batch,
        seq=seq,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        inter=0,
        dtype=dtype,
    )
    return (
        *(s for s in dense if not s.name.startswith("feed_forward.")),
        saved("moe.router.topk_indices", (batch * seq, top_k), INT64, BY, SRC_MOE),
    )


OLMO2_MODEL_TYPES = ("olmo2",)
"""transformers families whose decoder layer is `olmo2_layer` (Olmo2DecoderLayer, traced)."""
COMPILED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", *OLMO2_MODEL_TYPES)
"""transformers families whose decoder layer is the one traced: LlamaDecoderLayer (with and
without attention_bias / mlp_bias), MistralDecoderLayer (the same layer), Qwen2DecoderLayer
(q/k/v biases) and Qwen3DecoderLayer (per-head q/k norms, with and without attention_bias)."""
QK_NORM_MODEL_TYPES = ("qwen3",)
"""Of those, the layers with per-head q_norm / k_norm (`llama_layer(qk_norm=True)`)."""


def uncovered(arch: Architecture, st: Setting) -> str:
    """Why `llama_layer` does not describe this compiled layer, or "" when it does."""
    if arch.num_experts:
        return (
            f"MoE layers (model_type {arch.model_type!r}: a compiled MoE layer's saved set is "
            "not traced)"
        )
    if arch.model_type not in COMPILED_MODEL_TYPES:
        return f"model_type {arch.model_type!r} (traced: {', '.join(COMPILED_MODEL_TYPES)})"
    if st.attention != "sdpa":
        return "eager attention"
    if st.dropout:
        return "dropout"
    if st.autocast:
        return "autocast"
    window = arch.extra.get("sliding_window")
    if isinstance(window, int) and st.sequence > window:
        return "a sliding-window mask"
    if st.checkpointing == "selective":
        return "selective checkpointing of the attention core"
    if arch.model_type in OLMO2_MODEL_TYPES and st.float8 != "none":
        return "torchao Float8 on OLMo 2's layer"
    return kernel_uncovered(arch, st)


def kernel_uncovered(arch: Architecture, st: Setting) -> str:
    """Why the traced set does not hold for the SDPA kernel this layer gets, or "". The
    traces ran the CPU flash op, which keeps what CUDA's flash kernel keeps (q, k, v, the
    output and a [b, a, s] fp32 logsumexp); on CUDA, fp32 or a head_dim flash does not take
    (memplan.model.forward.attention.sdpa_kernel) gets the memory-efficient kernel (a padded
    logsumexp) or, with grouped kv heads, the math one (a [b, a, s, s] softmax), not traced."""
    _, a, g, d = attention_dims(arch)
    heads = attention.Heads(batch=st.batch, seq=st.sequence, heads=a, kv_heads=g, head_dim=d)
    gqa = g < a and d <= attention.FLASH_MAX_HEAD_DIM
    kernel = attention.sdpa_kernel(st, heads, gqa=gqa, mask=False, dropout_on=False)
    if kernel != "flash":
        return f"SDPA's {kernel} kernel ({st.matmul}, head_dim {d} on {st.device})"
    return ""


def block_dims(arch: Architecture, st: Setting) -> dict[str, Any]:
    """The keyword arguments the layer rules here take (`llama_layer`, `op_sac_layer`, ...):
    the micro-batch, the model's widths (attention_dims' heads, k/v heads and head size) and
    the matmul dtype. memplan.model.forward.compiled_tp passes them on with its TP degree."""
    _, a, g, d = attention_dims(arch)
    return {
        "batch": st.batch,
        "seq": st.sequence,
        "hidden": arch.hidden_size,
        "heads": a,
        "kv_heads": g,
        "head_dim": d,
        "inter": arch.intermediate_size,
        "dtype": st.matmul,
    }


def apply(acts: Activations, arch: Architecture, st: Setting) -> Activations:
    """`acts` (the eager prediction) with each decoder layer compiled: under checkpointing
    none the layers keep `llama_layer` (OLMo 2's: `olmo2_layer`); under full they keep their
    input, as eager. Where the
    traced layer does not apply, the eager prediction with a note saying so."""
    why = uncovered(arch, st)
    if why:
        note = (
            f"training.compile: the compiled layer's saved set is traced for the layers "
            f"of {', '.join(COMPILED_MODEL_TYPES)} with SDPA, no dropout, no autocast, "
            f"checkpointing none or full; not for "
            f"{why}: the eager saved set is used (compile saves no more)."
        )
        return replace(acts, notes=(*acts.notes, note))
    if st.checkpointing == "full":
        return replace(
            acts,
            notes=(
                *acts.notes,
                "training.compile with full checkpointing: each layer keeps its input, as "
                "eager (traced); the recompute working set is the eager one (an upper bound).",
            ),
        )
    dims = block_dims(arch, st)
    layer = (
        olmo2_layer(**dims)
        if arch.model_type in OLMO2_MODEL_TYPES
        else llama_layer(
            float8=st.float8 != "none", qk_norm=arch.model_type in QK_NORM_MODEL_TYPES, **dims
        )
    )
    blocks = tuple(replace(b, tensors=layer) if b.name == "layers" else b for b in acts.blocks)
    eager = acts.block("layers")
    note = (
        f"training.compile: each decoder layer keeps what Inductor's min-cut partition keeps "
        f"({sum(t.bytes for t in layer):,} B per layer, eager "
        f"{eager.bytes_each if eager else 0:,} B); embeddings, head and loss run eager."
    )
    return replace(acts, blocks=blocks, notes=(*acts.notes, note))
