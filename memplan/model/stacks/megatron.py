"""Megatron-Core's GPTModel (`model.implementation: megatron-core`): what its forward and its
vocab-parallel loss save for backward, with the local layer spec (`model.megatron_spec: local`)
or the Transformer Engine one (`te`), for no recompute, full recompute (recompute_granularity
full, method uniform, one layer per checkpoint) and selective recompute of the attention core
(recompute_granularity selective, recompute_modules [core_attn]).

MoE layers (Mixtral, Qwen3-MoE: router, allgather or alltoall dispatcher, SequentialMLP, expert
parallelism) are memplan.model.stacks.megatron_moe's.

Read from megatron-core 0.12.0 (megatron/core/, pip `megatron-core==0.12.0`), TP = PP = 1:
- models/gpt/gpt_model.py::GPTModel.forward: embedding -> decoder -> output_layer ->
  compute_language_model_loss; models/common/embeddings/language_model_embedding.py::
  LanguageModelEmbedding.forward: `word_embeddings(input_ids).transpose(0, 1).contiguous()`,
  then `embedding_dropout` (hidden_dropout). Activations are [s, b, h].
- transformer/transformer_layer.py::TransformerLayer._forward_attention / _forward_mlp:
  `input_layernorm -> self_attention -> self_attn_bda -> pre_mlp_layernorm -> mlp -> mlp_bda`.
- models/gpt/gpt_layer_specs.py::get_gpt_layer_local_spec(normalization="RMSNorm"): the norms
  are transformer/torch_norm.py::WrappedTorchNorm = `torch.nn.RMSNorm`; linear_qkv, linear_fc1
  ColumnParallelLinear, linear_proj, linear_fc2 RowParallelLinear (tensor_parallel/layers.py::
  LinearWithGradAccumulationAndAsyncCommunication.forward: `ctx.save_for_backward(input,
  weight)`: each linear keeps its input for the weight gradient); core_attention
  transformer/dot_product_attention.py::DotProductAttention.
- transformer/attention.py::SelfAttention.get_query_key_value_tensors: one linear_qkv output
  [s, b, ng, (np/ng + 2) hn] split into q, k, v views; models/common/embeddings/rope_utils.py::
  _apply_rotary_pos_emb_bshd (apply_rope_fusion False): `cos_ = (cos(freqs) * mscale).to(t.dtype)`,
  `sin_` likewise, `t * cos_ + rotate_half(t) * sin_`, `cat((t, t_pass))`: q and k new tensors,
  each call keeps its own cos_ and sin_ [s, 1, 1, hn].
- DotProductAttention.forward: GQA `repeat_interleave`s k and v to every query head (a copy);
  `baddbmm(buffer, q, k^T, beta=0, alpha=1/sqrt(hn))` saves q and k; fusions/fused_softmax.py::
  FusedScaleMaskSoftmax.forward_torch_softmax (masked_softmax_fusion False, or a sequence over
  4096 where the fused kernel is unavailable): 16-bit scores `.float()`, `masked_fill_` with the
  cached causal mask, softmax (saves its fp32 output), back to 16-bit; attention_dropout;
  `bmm(probs, v)` saves both; `permute(2, 0, 1, 3).contiguous()`: linear_proj's input.
- fusions/fused_bias_dropout.py::_bias_dropout_add_func (bias_dropout_fusion False, no bias):
  `residual + dropout(x)`: only the dropout keeps anything.
- transformer/mlp.py::MLP.forward (gated_linear_unit, bias_activation_fusion False): `glu(x) =
  silu(x[0]) * x[1]` over the chunks of linear_fc1's output.
- tensor_parallel/cross_entropy.py::_VocabParallelCrossEntropy.forward: on `logits.float()`
  (a copy for 16-bit logits, the logits themselves in fp32), in place: max subtracted, exp,
  divided by the sum: `ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)`
  (softmax [s, b, V] fp32, the bool mask [s, b] and the int64 targets [t]).
- transformer/transformer_block.py::TransformerBlock._checkpointed_forward (full, uniform) wraps
  each layer in tensor_parallel/random.py::CheckpointFunction (`ctx.save_for_backward(*args)`:
  the layer's input; the rotary table it also passes is cached across steps).
  attention.py::Attention._checkpointed_attention_forward (selective core_attn) checkpoints the
  core with q, k, v and `torch.tensor([attn_mask_type.value], dtype=torch.int)` as inputs.

The TE spec (get_gpt_layer_with_transformer_engine_spec) is read, not run: Transformer Engine
needs CUDA. extensions/transformer_engine.py::TELayerNormColumnParallelLinear (TE
module/layernorm_linear.py::_LayerNormLinear: saves the norm's input, rsigma [t] fp32 and the
normalized `ln_out` the GEMM reads) for linear_qkv and linear_fc1; TEDotProductAttention (TE's
flash / cuDNN fused attention saves q, k, v as given, out, softmax_lse [b, np, s] fp32 and the
philox rng state: q and k are fused RoPE's new tensors, v a view of linear_qkv's output, which
it therefore keeps whole); TERowParallelLinear saves its input. Megatron-LM's training
defaults (megatron/training/arguments.py: --no-bias-swiglu-fusion, --no-rope-fusion unset) run
the fused SwiGLU (fusions/fused_bias_swiglu.py::bias_swiglu_impl saves only its input) and TE's
fused RoPE (saves only the cached frequencies).

The model runs wholly in the compute dtype (Megatron's Float16Module casts it: no autocast).
Persistent buffers, not saved activations: the cached causal mask [s, s] bool, the rotary table
and DotProductAttention's global memory buffer [b np, s, s] (parallel_state.
get_global_memory_buffer). Proved on CPU against Megatron-Core's real GPTModel (local spec) by
tests/test_megatron_activations.py (memplan/verify/megatron_core.py measures).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from memplan.config.base import Implementation
from memplan.memory import ALWAYS, Transient
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture
from memplan.model.stacks import llama_refusal, megatron_moe, torchtitan
from memplan.precision import dtype_bytes

MegatronSpec = Literal["local", "te"]
VERSION = "0.12.0"
IMPLEMENTATION: Implementation = "megatron-core"
SRC = f"megatron-core {VERSION} megatron/core/"
SRC_LINEAR = SRC + "tensor_parallel/layers.py::LinearWithGradAccumulationAndAsyncCommunication"
SRC_ROPE = SRC + "models/common/embeddings/rope_utils.py::_apply_rotary_pos_emb_bshd"
SRC_CORE = SRC + "transformer/dot_product_attention.py::DotProductAttention.forward"
SRC_SOFTMAX = SRC + "fusions/fused_softmax.py::FusedScaleMaskSoftmax.forward_torch_softmax"
SRC_MLP = SRC + "transformer/mlp.py::MLP.forward (glu)"
SRC_SWIGLU = SRC + "fusions/fused_bias_swiglu.py::bias_swiglu_impl"
SRC_LOSS = SRC + "tensor_parallel/cross_entropy.py::_VocabParallelCrossEntropy.forward"
SRC_FULL = (
    SRC + "transformer/transformer_block.py::_checkpointed_forward; random.py::CheckpointFunction"
)
SRC_SELECTIVE = SRC + "transformer/attention.py::Attention._checkpointed_attention_forward"
SRC_TE_NORM_LINEAR = (
    SRC + "extensions/transformer_engine.py::TELayerNormColumnParallelLinear; TE "
    "module/layernorm_linear.py::_LayerNormLinear.forward"
)
SRC_TE_ATTN = (
    SRC + "extensions/transformer_engine.py::TEDotProductAttention; TE flash / fused attention"
)
MODEL_TYPES = ("llama", "mixtral", "qwen3_moe")
"""The HF model_types the rule builds: Llama's dense layers, Mixtral's and Qwen3-MoE's MoE
layers (memplan.model.stacks.megatron_moe; Qwen3's per-head q/k norm: `_qk_norm`)."""
MASK_TYPE_BYTES = 4
"""`torch.tensor([attn_mask_type.value], dtype=torch.int)`: one int32 (SRC_SELECTIVE)."""
RNG_STATE = (2,)
"""The philox seed and offset flash-attn's FlashAttnFunc keeps (`rng_state`, int64), dropout
or not."""


def unsupported(arch: Architecture, st: Setting, spec: MegatronSpec) -> str:
    """Why the Megatron-Core rule does not cover this model or setting, or ''."""
    why = megatron_moe.family_refusal(arch.model_type) or llama_refusal(
        arch,
        "megatron-core",
        "Megatron-Core's GPTModel built Llama-like: model_type llama, or with MoE layers: "
        "mixtral, qwen3_moe",
        model_types=MODEL_TYPES,
    )
    if not why and megatron_moe.is_moe(arch):
        why = megatron_moe.unsupported(arch)
        if not why and spec == "te":
            why = (
                "Megatron-Core's MoE layer is modelled with the local spec (SequentialMLP); "
                "the TE spec's experts are Transformer Engine's (" + megatron_moe.SRC_GROUPED + ")"
            )
    if why:
        return why
    if st.autocast:
        return "Megatron-Core runs its model in the compute dtype (Float16Module), not autocast"
    if spec == "te" and st.device != "cuda":
        return "model.megatron_spec te is Transformer Engine, which runs only on CUDA"
    if st.checkpointing == "selective-op" or st.checkpoint_every > 1:
        return (
            "selective-op and checkpoint_every are torchtitan's; Megatron-Core's recompute is "
            "none, full (uniform, one layer per checkpoint) or selective (core_attn)"
        )
    if st.offload:
        return "activation_offload is transformers' offload=True: not modelled for Megatron-Core"
    if st.compile:
        return "training.compile is not modelled for Megatron-Core"
    if st.float8 != "none":
        return "torchao float8 is not Megatron-Core's fp8 (Transformer Engine): not modelled"
    return ""


def dropout_on(st: Setting) -> bool:
    """Megatron's hidden and attention dropout: on only when the spec forces it
    (training.dropout true); Llama recipes set hidden_dropout and attention_dropout to 0."""
    return st.dropout is True


def _norm(prefix: str, t: int, h: int, c: str, st: Setting) -> list[Saved]:
    """`torch.nn.RMSNorm` (WrappedTorchNorm: torchtitan.rms_norm, the same module) over a `c`
    input, and its output, which the next linear saves."""
    out = torchtitan.rms_norm(prefix, t, h, c, st)
    out.append(kernels.saved(f"{prefix}.output", (t, h), c, "LinearWithGrad", SRC_LINEAR))
    return out


def _te_norm_linear(prefix: str, t: int, h: int, c: str) -> list[Saved]:
    """TELayerNormColumnParallelLinear: the norm's input, rsigma [t] fp32, and `ln_out`, the
    normalized input its GEMM reads (SRC_TE_NORM_LINEAR)."""
    return [
        kernels.saved(f"{prefix}.input", (t, h), c, "_LayerNormLinear", SRC_TE_NORM_LINEAR),
        kernels.saved(
            f"{prefix}.rsigma", (t,), kernels.FP32, "_LayerNormLinear", SRC_TE_NORM_LINEAR
        ),
        kernels.saved(f"{prefix}.ln_out", (t, h), c, "_LayerNormLinear", SRC_TE_NORM_LINEAR),
    ]


def _dropout(name: str, shape: tuple[int, ...], c: str, st: Setting) -> list[Saved]:
    return [kernels.dropout(name, shape, c, st)] if dropout_on(st) else []


def _rope(s: int, d: int, c: str) -> list[Saved]:
    """The unfused RoPE of q and of k: each call keeps its cos_ and sin_ [s, 1, 1, hn] in the
    activations' dtype (SRC_ROPE)."""
    return [
        kernels.saved(f"rotary.{who}.{f}", (s, 1, 1, d), c, "MulBackward0", SRC_ROPE)
        for who in ("q", "k")
        for f in ("cos", "sin")
    ]


def _local_core(arch: Architecture, st: Setting) -> tuple[list[Saved], list[Saved]]:
    """DotProductAttention's saved tensors after RoPE: (what the checkpoint of the core keeps
    as its inputs under selective recompute, what the core itself saves)."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, c = st.batch, st.sequence, st.tokens, st.matmul
    fp32 = kernels.FP32
    qkv_width = (a + 2 * kv) * d
    q = kernels.saved("attn.q", (t, a * d), c, "BaddbmmBackward0", SRC_ROPE)
    k = kernels.saved("attn.k", (t, kv * d), c, "BaddbmmBackward0", SRC_ROPE)
    # v is a view of linear_qkv's output: whoever saves v keeps that whole storage.
    qkv = kernels.saved("linear_qkv.output", (t, qkv_width), c, "BmmBackward0", SRC_CORE)
    inputs = [qkv, q, k]
    scores = (b, a, s, s)
    core: list[Saved] = []
    if a != kv:
        # repeat_interleave to every query head: baddbmm keeps the copied k, bmm the copied v.
        core += [
            kernels.saved("attn.k_repeated", (t, a * d), c, "BaddbmmBackward0", SRC_CORE),
            kernels.saved("attn.v_repeated", (t, a * d), c, "BmmBackward0", SRC_CORE),
        ]
        kept = [q]
    else:
        kept = [qkv, q, k]
    core.append(kernels.saved("attn.softmax", scores, fp32, "SoftmaxBackward0", SRC_SOFTMAX))
    if dropout_on(st):
        core.append(kernels.dropout("attn.dropout", scores, c, st))
        core.append(kernels.saved("attn.probs_dropped", scores, c, "BmmBackward0", SRC_CORE))
    elif c != fp32:
        # Back to 16-bit after the fp32 softmax: the copy bmm saves.
        core.append(kernels.saved("attn.probs", scores, c, "BmmBackward0", SRC_SOFTMAX))
    return inputs, kept + core


def mlp(prefix: str, t: int, f: int, c: str, *, fused: bool) -> list[Saved]:
    """linear_fc1's output [t, 2F] (both chunks are views of it), the SwiGLU and linear_fc2's
    input. Fused (bias_swiglu_impl) keeps only its input; unfused, silu keeps the gate chunk,
    the product silu's output and the up chunk (SRC_MLP). `prefix` names the module (''
    for the dense MLP; MoE experts: the sum over experts of their tokens, `t`)."""
    out = [kernels.saved(f"{prefix}linear_fc1.output", (t, 2 * f), c, "SiluBackward0", SRC_MLP)]
    if not fused:
        out.append(kernels.saved(f"{prefix}mlp.silu_output", (t, f), c, "MulBackward0", SRC_MLP))
    out.append(kernels.saved(f"{prefix}linear_fc2.input", (t, f), c, "LinearWithGrad", SRC_LINEAR))
    return out


SRC_QK_NORM = (
    SRC + "transformer/attention.py::SelfAttention.get_query_key_value_tensors (qk_layernorm: "
    "`query.reshape(s, b, -1, hn)`, q_layernorm(query), k_layernorm(key): torch RMSNorm over "
    "head_dim)"
)


def _qk_norm(arch: Architecture, st: Setting, held: set[str]) -> list[Saved]:
    """The per-head RMSNorm of the queries and keys (qk_layernorm, Qwen3; SRC_QK_NORM): what
    torch.nn.RMSNorm saves over [t x heads, head dim], its output RoPE's input (RoPE keeps only
    cos and sin). Where the norm keeps its input itself (fp32 on CPU; the fused CUDA kernel),
    that input is the key's view of linear_qkv's output, and the query's too without GQA (with
    GQA `reshape` copies the query out of the grouped layout): storages in `held` are not
    counted again."""
    _, a, kv, d = kernels.attention_dims(arch)
    t, c = st.tokens, st.matmul
    out: list[Saved] = []
    for who, heads in (("q", a), ("k", kv)):
        norm = torchtitan.rms_norm(f"attn.{who}_layernorm", t * heads, d, c, st)
        copies = st.device == "cpu" and c != kernels.FP32
        if not copies:
            # The norm's input is x itself: name it by its storage.
            view = who == "k" or a == kv
            name = "linear_qkv.output" if view else "attn.q_reshaped"
            shape = (t, (a + 2 * kv) * d) if view else (t, a * d)
            norm[0] = replace(norm[0], name=name, shape=shape, dtype=c)
        out += [x for x in norm if x.name not in held]
        held |= {x.name for x in norm}
    return out


def _local_layer(arch: Architecture, st: Setting) -> tuple[list[Saved], list[Saved]]:
    """One local-spec layer: (everything it saves with no recompute, what it saves with its
    attention core checkpointed)."""
    h, a, _, d = kernels.attention_dims(arch)
    s, t, c = st.sequence, st.tokens, st.matmul
    norm1 = _norm("input_layernorm", t, h, c, st)
    inputs, core = _local_core(arch, st)
    out = [kernels.saved("linear_proj.input", (t, a * d), c, "LinearWithGrad", SRC_LINEAR)]
    rest = _dropout("self_attn_bda.dropout", (t, h), c, st)
    rest += _norm("pre_mlp_layernorm", t, h, c, st)
    if megatron_moe.is_moe(arch):
        rest += megatron_moe.moe_mlp(arch, st)
    else:
        rest += mlp("", t, arch.intermediate_size, c, fused=False)
    rest += _dropout("mlp_bda.dropout", (t, h), c, st)
    whole = [*norm1, *_rope(s, d, c), *core, *out, *rest]
    mask = kernels.saved("attn.mask_type", (1,), "int32", "CheckpointFunction", SRC_SELECTIVE)
    selective = [*norm1, *_rope(s, d, c), *inputs, mask, *out, *rest]
    if arch.extra.get("qk_norm"):
        whole += _qk_norm(arch, st, {x.name for x in whole})
        selective += _qk_norm(arch, st, {x.name for x in selective})
    return whole, selective


def _te_layer(arch: Architecture, st: Setting) -> tuple[list[Saved], list[Saved]]:
    """One TE-spec layer (read from the source, module docstring): (no recompute, selective)."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, c = st.batch, st.sequence, st.tokens, st.matmul
    src = SRC_TE_ATTN
    # TE's fused RoPE makes q and k new tensors; v stays a view of linear_qkv's output, which
    # the attention (or the selective checkpoint) keeps whole by saving v: TE's FlashAttention
    # only transposes sbhd to bshd views (no copy without context parallelism) and flash-attn
    # copies only a non-unit last stride (flash_attn_interface.py::maybe_contiguous).
    qkv = [
        kernels.saved("linear_qkv.output", (t, (a + 2 * kv) * d), c, "TEDotProductAttention", src),
        kernels.saved("attn.q", (t, a * d), c, "TEDotProductAttention", src),
        kernels.saved("attn.k", (t, kv * d), c, "TEDotProductAttention", src),
    ]
    core = [
        # out is also linear_proj's input (one storage).
        kernels.saved("attn.output", (t, a * d), c, "TEDotProductAttention", src),
        kernels.saved("attn.softmax_lse", (b, a, s), kernels.FP32, "TEDotProductAttention", src),
    ]
    core.append(
        kernels.saved("attn.rng_state", RNG_STATE, kernels.INT64, "TEDotProductAttention", src)
    )
    rest = _dropout("self_attn_bda.dropout", (t, h), c, st)
    rest += _te_norm_linear("linear_fc1", t, h, c)
    rest += mlp("", t, arch.intermediate_size, c, fused=True)
    rest += _dropout("mlp_bda.dropout", (t, h), c, st)
    norm1 = _te_norm_linear("linear_qkv", t, h, c)
    whole = [*norm1, *qkv, *core, *rest]
    mask = kernels.saved("attn.mask_type", (1,), "int32", "CheckpointFunction", SRC_SELECTIVE)
    out = [kernels.saved("linear_proj.input", (t, a * d), c, "TERowParallelLinear", src)]
    selective = [*norm1, *qkv, mask, *out, *rest]
    return whole, selective


SRC_EMBEDDING = SRC + "tensor_parallel/layers.py::VocabParallelEmbedding.forward"
SRC_NO_SP_LOCAL = (
    SRC + "transformer/torch_norm.py::WrappedTorchNorm.__new__ (`assert not "
    'config.sequence_parallel, "sequence parallel not supported by torch LayerNorm"`)'
)


def tensor_parallel_embedding(st: Setting) -> Saved:
    """What VocabParallelEmbedding keeps over more than one TP rank beside the ids it embeds
    (then a masked copy, `input_.clone() - vocab_start_index`, the rule's `indices`): the mask
    of the ids outside its rows, [b, s] bool, which `output_parallel[input_mask, :] = 0.0`
    (index_put_) saves (SRC_EMBEDDING)."""
    return kernels.saved(
        "word_embeddings.input_mask",
        (st.batch, st.sequence),
        "bool",
        "IndexPutBackward0",
        SRC_EMBEDDING,
    )


SRC_NO_CP_LOCAL = (
    SRC + "transformer/dot_product_attention.py::DotProductAttention.__init__ (asserts "
    "config.context_parallel_size == 1: context parallelism is TEDotProductAttention's)"
)
SRC_TE_CP = (
    "TransformerEngine pytorch/attention/dot_product_attention/context_parallel.py::"
    "AttnFuncWithCPAndKVP2P.forward (f16: `p2p_comm_buffers[0] = torch.cat((k.view(-1), "
    "v.view(-1)))`, `kv = p2p_comm_buffers[-1]`, saves q, kv, out, softmax_lse and one rng "
    "state per step)"
)


def te_context_parallel(layer: Block, st: Setting, arch: Architecture, cp: int) -> Block:
    """One TE-spec layer over `cp` context-parallel ranks (`st` and `arch`: one CP and TP
    rank's), read from the source (SRC_TE_CP), not run: the attention saves q, the last key/
    value chunk it received ([2, tokens, kv heads x head dim], a new tensor), its output, the
    softmax statistics and one rng state per ring step, no longer v (so no longer
    linear_qkv's output) nor the roped k. What the layer saves otherwise is the rule at
    sequence / CP. Under selective recompute the checkpoint still keeps q, k and v as its
    inputs, and the recomputed core makes the chunk and the further rng states."""
    _, _, kv, d = kernels.attention_dims(arch)
    chunk = kernels.saved("attn.kv_chunk", (2, st.tokens, kv * d), st.matmul,
                          "AttnFuncWithCPAndKVP2P", SRC_TE_CP)  # fmt: skip
    more_rng = kernels.saved("attn.rng_state_ring", ((cp - 1) * RNG_STATE[0],), kernels.INT64,
                             "AttnFuncWithCPAndKVP2P", SRC_TE_CP)  # fmt: skip
    gone = {"linear_qkv.output", "attn.k"}

    def ring(tensors: tuple[Saved, ...]) -> tuple[Saved, ...]:
        return (*(t for t in tensors if t.name not in gone), chunk, more_rng)

    if st.checkpointing == "selective":
        return replace(layer, recompute=(*layer.recompute, chunk, more_rng))
    if st.checkpointing == "full":
        return replace(layer, recompute=ring(layer.recompute))
    return replace(layer, tensors=ring(layer.tensors))


def persistent_buffers(arch: Architecture, st: Setting) -> tuple[Transient, ...]:
    """What the local spec's DotProductAttention keeps across steps, outside autograd: the
    global memory buffer its `baddbmm` writes the scores into, and the cached causal mask its
    softmax fallback fills with (both made by the first forward, alive from then on)."""
    _, a, _, _ = kernels.attention_dims(arch)
    b, s = st.batch, st.sequence
    c = st.matmul
    scores = b * a * s * s
    formula = f"batch {b} x heads {a} x seq {s} x seq {s} x {dtype_bytes(c)} B ({c})"
    source = SRC + "utils.py::GlobalMemoryBuffer.get_tensor (name 'mpu'); " + SRC_CORE
    moe: tuple[Transient, ...] = ()
    if megatron_moe.is_moe(arch):
        moe = (megatron_moe.aux_loss_tracker(arch),)
        ep = megatron_moe.expert_parallel(arch, st)[0]
        gathered = st.tokens * ep * arch.hidden_size
        if ep > 1 and gathered > scores and st.moe_dispatcher == "allgather":
            # The allgather dispatcher gathers the hidden states into the same 'mpu' buffer,
            # which get_tensor grows to the larger request and keeps (the alltoall one's
            # all_to_all_single allocates its output: no global buffer).
            scores = gathered
            formula = (
                f"tokens {st.tokens} x EP {ep} x hidden {arch.hidden_size} x "
                f"{dtype_bytes(c)} B ({c}): the MoE dispatcher's all-gather, larger than the "
                "attention scores"
            )
            source += "; " + megatron_moe.SRC_DISPATCH
    return (
        *moe,
        Transient(
            name="megatron global memory buffer",
            bytes=scores * dtype_bytes(c),
            phases=ALWAYS,
            formula=formula,
            source=source,
        ),
        Transient(
            name="megatron causal mask",
            bytes=s * s,
            phases=ALWAYS,
            formula=f"seq {s} x seq {s} x 1 B (bool)",
            source=SRC + "transformer/utils.py::get_default_causal_mask (lru_cache)",
        ),
    )


def _layer_input(arch: Architecture, st: Setting) -> Saved:
    shape = (st.sequence, st.batch, arch.hidden_size)
    return kernels.saved(
        "checkpoint.hidden_states", shape, st.matmul, "CheckpointFunction", SRC_FULL
    )


def saved(arch: Architecture, st: Setting, spec: MegatronSpec = "local") -> Activations:
    """Megatron-Core's GPTModel forward and loss on one GPU (TP = PP = 1): the module
    docstring."""
    why = unsupported(arch, st, spec)
    if why:
        return replace(
            not_modelled(f"activations not modelled: {why}."),
            implementation=IMPLEMENTATION,
            megatron_spec=spec,
        )
    h, vocab, t, c = arch.hidden_size, arch.vocab_size, st.tokens, st.matmul
    whole, selective = (_local_layer if spec == "local" else _te_layer)(arch, st)
    n = arch.num_layers
    emb = [kernels.embedding_indices("word_embeddings.indices", (st.batch, st.sequence))]
    emb += _dropout("embedding_dropout", (t, h), c, st)
    if st.checkpointing == "full":
        # The MoE dispatcher's attributes outlive the no-grad forward (megatron_moe).
        kept = megatron_moe.dispatcher_state(arch, st) if megatron_moe.is_moe(arch) else []
        layer = Block(
            name="layers",
            count=n,
            tensors=(_layer_input(arch, st), *kept),
            recompute=tuple(whole),
            layered=True,
        )
    elif st.checkpointing == "selective":
        held = {x.name for x in selective}
        again = tuple(x for x in whole if x.name not in held)
        layer = Block(
            name="layers", count=n, tensors=tuple(selective), recompute=again, layered=True
        )
    else:
        layer = Block(name="layers", count=n, tensors=tuple(whole), layered=True)
    if spec == "local":
        head_tensors = _norm("final_layernorm", t, h, c, st)
    else:
        # get_gpt_layer_with_transformer_engine_spec's final_layernorm is TENorm (TE's RMSNorm:
        # input and rsigma), and the output layer (ColumnParallelLinear) saves its input.
        src = SRC + "extensions/transformer_engine.py::TENorm"
        head_tensors = [
            kernels.saved("final_layernorm.input", (t, h), c, "TENorm", src),
            kernels.saved("final_layernorm.rsigma", (t,), kernels.FP32, "TENorm", src),
            kernels.saved("final_layernorm.output", (t, h), c, "LinearWithGrad", SRC_LINEAR),
        ]
    head = Block(name="head", count=1, tensors=tuple(head_tensors))
    loss = Block(
        name="loss",
        count=1,
        tensors=(
            kernels.saved(
                "softmax", (t, vocab), kernels.FP32, "_VocabParallelCrossEntropy", SRC_LOSS
            ),
            kernels.saved("target_mask", (t,), "bool", "_VocabParallelCrossEntropy", SRC_LOSS),
            kernels.saved(
                "masked_target", (t,), kernels.INT64, "_VocabParallelCrossEntropy", SRC_LOSS
            ),
        ),
    )
    note = (
        f"Megatron-Core {VERSION}'s GPTModel, {spec} layer spec"
        + (
            " (torch RMSNorm, unfused RoPE, softmax and SwiGLU)"
            if spec == "local"
            else " (read from the source: Transformer Engine needs CUDA; fused SwiGLU and RoPE)"
        )
        + "; loss: vocab-parallel cross entropy on logits.float(), whose copy it keeps as the "
        "softmax (no second upcast)."
    )
    return Activations(
        modelled=True,
        blocks=(Block(name="embeddings", count=1, tensors=tuple(emb)), layer, head, loss),
        logits_bytes=t * vocab * dtype_bytes(c),
        upcast_bytes=0,
        hidden_bytes=t * h * dtype_bytes(c),
        buffers=persistent_buffers(arch, st) if spec == "local" else (),
        notes=(note, megatron_moe.note(st)) if megatron_moe.is_moe(arch) else (note,),
        implementation=IMPLEMENTATION,
        megatron_spec=spec,
    )
