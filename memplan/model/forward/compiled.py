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
set stands): MoE layers, transformers' and torchtitan's. What a rule for torchtitan 0.3.0's
Qwen3-MoE block would need (a first trace, not yet a rule: apply_compile compiles the block
whole, with torch._dynamo.config.capture_scalar_outputs; at EP 1 every routed tensor has
tokens x top_k rows, so the partition's shapes are static): the dense Qwen3 attention half
above, ffn_norm's rstd and output, then per token the router's logits [E] w, the top-k indices
[k] int64 and scores [k] w, two [k] int64 index tensors of the token reordering, the routed
input [k, h] w, the grouped mms' outputs w1, w3 [k, F] w, w2's input [k, F] w and its output
[k, h] w, and a zeros [h] w tensor; to prove at the three routings, under SelectiveAC and
under EP as benchmarks/torchtitan_moe.py and torchtitan_moe_ep.py do (its eager rule:
memplan.model.stacks.torchtitan_moe). Not traced either: Gemma's layers (and OLMo 2's under
torchao Float8), eager attention, SDPA's memory-efficient and math kernels, dropout, autocast,
sliding windows and Megatron-style selective checkpointing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan.model.forward import attention
from memplan.model.forward.kernels import FP32, attention_dims, saved
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
    _, a, g, d = attention_dims(arch)
    dims: dict[str, Any] = {
        "batch": st.batch,
        "seq": st.sequence,
        "hidden": arch.hidden_size,
        "heads": a,
        "kv_heads": g,
        "head_dim": d,
        "inter": arch.intermediate_size,
        "dtype": st.matmul,
    }
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
