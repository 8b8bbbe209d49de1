"""torchtitan's own gpt-oss (`model.implementation: torchtitan`, model_type gpt_oss): what its
forward and loss save for backward, with no checkpointing, FullAC, SelectiveAC
(`selective-op`) and every-Nth-layer full checkpointing.

Read from torchtitan 0.3.0 (pip `torchtitan==0.3.0`, models/gpt_oss):
- __init__.py::_build_gptoss_layers: every layer a GptOssTransformerBlock with a MoE
  (`score_func="softmax", route_norm=True`, `load_balance_coeff`), even layers a sliding
  window of 128; `_make_gptoss_attn_config`: FusedQKVLinear `wqkv` with a bias, `wo` a
  ScaledBiasRowwiseLinear with a bias, a `sinks` parameter [n_heads], and the inner attention
  of `attn_backend`, default "varlen" (model_registry).
- model.py::GptOssTransformerBlock.forward: `x = x + attention(attention_norm(x), masks,
  positions); x = x + moe(ffn_norm(x))`; Attention.forward: `qkv_linear(x)` (the fused split
  copied contiguous: models/common/attention.py::FusedQKVLinear.forward), `rope(q, k,
  positions)`, `inner_attention(..., out_transform=_apply_sinks)`, `wo`;
  apply_attention_sink_rescale: `out * sigmoid(lse - sinks).unsqueeze(-1).to(out.dtype)`.
- models/common/rope.py::CosSinRoPE: with the positions the trainer passes (trainer.py::
  post_dataloading_process: the dataloader's per-document positions), `_reshape_for_broadcast`
  gathers the fp32 cos|sin cache per token: a [tokens, 2 x head_dim] fp32 tensor per layer,
  which the rotary multiplies save; q, k come back `.type_as(q)` (new tensors).
- models/common/attention.py::VarlenAttention.forward: q, k, v reshaped to (T, N, H) and
  `.to(bfloat16)` (no copy in bf16), `varlen_attn(..., window_size, return_aux=lse)`; torch 2.13
  torch/nn/attention/varlen.py::_setup_context saves query, key, value, cu_seq_q, cu_seq_k,
  out, lse and rng_state; `_varlen_attn_fake` (the flash varlen meta): out like q, lse
  [heads, T] fp32, rng_state [2] uint64. cu_seq_q / cu_seq_k are the step's VarlenMetadata
  (made once per batch by the trainer, [documents + 1] int32): not the layer's.
- moe.py::GptOssGroupedExperts.forward: `h = _grouped_mm(x.bfloat16(), mlp1.bfloat16())` +
  `b1.repeat_interleave(counts, output_size=R)` (index_select keeps its [R] int64 index), the
  clamped SwiGLU `swiglu` (x[..., ::2].clamp(max=7), x[..., 1::2].clamp(-7, 7), `x_glu *
  sigmoid(1.702 x_glu)`, `addcmul(out_glu, out_glu, x_linear)`), `_grouped_mm(h, mlp2)` +
  b2 repeated the same way; no `.type_as(x)`: the experts return bf16 whatever the model's
  dtype.
- The router, the token reordering and combine are models/common (memplan.model.stacks.
  torchtitan_moe: SRC_ROUTER, SRC_DISPATCH); the gate has a bias (addmm: its saves are mm's).
- distributed/activation_checkpoint.py::SelectiveAC: every gpt-oss linear has a bias, which
  aten::linear lowers to aten.addmm (aten native/Linear.cpp::linear, CompositeImplicitAutograd
  on every device). aten.addmm is in the save list (_get_default_save_ops takes torch.
  _functorch.partitioners.get_default_op_list().compute_intensive_ops, which has addmm) but
  not in `mm_ops` (aten.mm, aten.linear): it is never counted, so every addmm output is kept,
  the router gate's too (force_recompute_mm_shapes_by_fqns applies to mm_ops only).
  `torch_attn._varlen_attn` and `aten.topk` are in the save list: varlen's out, lse and
  rng_state and topk's values and indices are kept.

Proof: torchtitan's varlen attention runs only on CUDA (FA2/FA3 `_flash_attention_forward`)
and flex attention refuses backward on CPU (torch 2.13 nn/attention/flex_attention.py::
_validate_device), so the model cannot train on CPU. tests/torchtitan_gptoss_probe.py builds
the real model with torchtitan's own layer factory on CPU, gives `torch_attn::_varlen_attn` a
CPU kernel that only allocates its outputs as the op's own fake does, and measures what the
forward holds: the attention's saves come from the op's own autograd registration, the rest
from the real CPU kernels. The rule's CPU branch (`traced=True`) is exact to that trace
(benchmarks/torchtitan_gptoss.py); a spec on CPU is refused. On CUDA the rule swaps in the
CUDA branches memplan already has for torch.nn.RMSNorm (torchtitan.rms_norm) and the fp32
router under autocast (torchtitan_moe.router_dtype); those are not measured here (no GPU).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan, torchtitan_ac, torchtitan_moe
from memplan.precision import dtype_bytes

VERSION = torchtitan.VERSION
GPT_OSS = "gpt_oss"
BF16 = "bf16"
SRC = f"torchtitan {VERSION} models/gpt_oss/model.py::Attention.forward, GptOssTransformerBlock"
SRC_ROPE = (
    f"torchtitan {VERSION} models/common/rope.py::CosSinRoPE, _reshape_for_broadcast (the cache "
    "gathered by positions)"
)
SRC_VARLEN = (
    f"torchtitan {VERSION} models/common/attention.py::VarlenAttention.forward; torch 2.13 "
    "torch/nn/attention/varlen.py::_setup_context, _varlen_attn_fake"
)
SRC_SINKS = f"torchtitan {VERSION} models/gpt_oss/model.py::apply_attention_sink_rescale"
SRC_EXPERTS = (
    f"torchtitan {VERSION} models/gpt_oss/moe.py::GptOssGroupedExperts.forward, swiglu; "
    f"{kernels.DERIV}: _grouped_mm, index_select, clamp, sigmoid, mul, addcmul"
)
SRC_SAC = (
    f"torchtitan {VERSION} distributed/activation_checkpoint.py::SelectiveAC._wrap_block "
    "(mm_ops aten.mm / aten.linear: the biased linears run aten.addmm, never counted) and "
    "_get_default_save_ops (compute_intensive_ops' aten.addmm, torch_attn._varlen_attn.default, "
    "aten.topk.default)"
)
VARLEN_BY = "VarlenAttnBackward"
CPU = (
    "torchtitan's gpt-oss does not train on CPU: its default varlen attention is CUDA's flash "
    "kernel (torch 2.13 nn/attention/varlen.py: aten._flash_attention_forward) and flex "
    "attention refuses backward on CPU (nn/attention/flex_attention.py::_validate_device)"
)


def unsupported(arch: Architecture, st: Setting, *, traced: bool = False) -> str:
    """Why this rule does not cover torchtitan's gpt-oss under `st`, or ''. `traced`: the CPU
    branch the probe measures (tests/torchtitan_gptoss_probe.py), allowed on CPU."""
    if not arch.num_experts or not arch.num_experts_per_token:
        return "torchtitan's gpt-oss has a MoE in every layer: this config has no experts"
    if st.device == "cpu" and not traced:
        return CPU
    if st.expert_pairs is not None:
        return torchtitan_moe.DROPLESS
    if st.autocast or st.stream != BF16 or st.matmul != BF16:
        return (
            "torchtitan's gpt-oss is modelled in bf16 (FSDP2 param_dtype bf16) only: its "
            "experts return bf16 whatever the model's dtype (models/gpt_oss/moe.py, no "
            ".type_as(x)), so an fp32 or fp16 model fails in combine's scatter_add"
        )
    if st.local_experts and st.local_experts < arch.num_experts:
        return (
            "expert parallelism for torchtitan's gpt-oss (models/gpt_oss/sharding.py, "
            "ScaleBiasForward) is not modelled"
        )
    if st.compile or st.compile_loss:
        return "training.compile / compile_loss for torchtitan's gpt-oss is not modelled"
    if st.attention != "sdpa":
        return "torchtitan's attention is not transformers' eager one: use training.attention sdpa"
    if st.offload:
        return "activation_offload is transformers' offload=True: torchtitan has no such option"
    if st.checkpointing == "selective":
        return (
            "activation_checkpointing selective is Megatron's attention-core recompute, which "
            "torchtitan does not offer: use selective-op (its SelectiveAC) or full"
        )
    return ""


def _s(name: str, shape: tuple[int, ...], dtype: str, by: str, src: str) -> Saved:
    return kernels.saved(name, shape, dtype, by, src)


def attention(arch: Architecture, st: Setting) -> list[Saved]:
    """attention_norm and the attention half (module docstring), bf16."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, x = st.tokens, st.stream
    out = torchtitan.rms_norm("attention_norm", t, h, x, st)
    out += [
        _s("attention_norm.output", (t, h), x, "AddmmBackward0", kernels.DERIV),
        # v: FusedQKVLinear's contiguous copy, straight to varlen (no rotation).
        _s("attention.v", (t, kv * d), x, VARLEN_BY, SRC_VARLEN),
        _s("attention.rope.cos_sin", (t, 2 * d), kernels.FP32, "MulBackward0", SRC_ROPE),
        _s("attention.q_rope", (t, a * d), x, VARLEN_BY, SRC_VARLEN),
        _s("attention.k_rope", (t, kv * d), x, VARLEN_BY, SRC_VARLEN),
        _s("attention.varlen.out", (t, a * d), x, VARLEN_BY, SRC_VARLEN),
        _s("attention.varlen.lse", (a, t), kernels.FP32, VARLEN_BY, SRC_VARLEN),
        _s("attention.varlen.rng_state", (2,), "uint64", VARLEN_BY, SRC_VARLEN),
        # sigmoid(lse - sinks) keeps its fp32 output; `.to(out.dtype)` and `out * scale`.
        _s("attention.sinks.sigmoid", (t, a), kernels.FP32, "SigmoidBackward0", SRC_SINKS),
        _s("attention.sinks.scale", (t, a), x, "MulBackward0", SRC_SINKS),
        _s("attention.wo.input", (t, a * d), x, "AddmmBackward0", SRC_SINKS),
    ]
    return out


def moe(arch: Architecture, st: Setting) -> list[Saved]:
    """ffn_norm and the MoE half (module docstring), bf16; the router's dtype is
    torchtitan_moe.router_dtype's (fp32 under CUDA autocast)."""
    e, k, h = arch.num_experts, arch.num_experts_per_token, arch.hidden_size
    f = arch.intermediate_size
    t, x = st.tokens, st.stream
    n = t * k
    r = torchtitan_moe.router_dtype(st)
    src_r, src_d = torchtitan_moe.SRC_ROUTER, torchtitan_moe.SRC_DISPATCH
    out = torchtitan.rms_norm("ffn_norm", t, h, x, st)
    if r == x:
        out.append(_s("moe.router.gate.input", (t, h), x, "AddmmBackward0", src_r))
    else:
        out += [
            _s(
                "moe.router.gate.input_fp32",
                (t, h),
                r,
                "AddmmBackward0",
                torchtitan_moe.SRC_AUTOCAST,
            ),
            _s(
                "moe.router.gate.weight_fp32",
                (e, h),
                r,
                "AddmmBackward0",
                torchtitan_moe.SRC_AUTOCAST,
            ),
        ]
    out += [
        _s("moe.router.softmax", (t, e), r, "SoftmaxBackward0", src_r),
        _s("moe.router.topk_indices", (t, k), kernels.INT64, "TopkBackward0", src_r),
        _s("moe.router.topk_scores", (t, k), r, "DivBackward0", src_r),
        _s("moe.router.topk_sum", (t, 1), r, "DivBackward0", src_r),
        _s("moe.dispatch.order", (n,), kernels.INT64, "IndexBackward0", src_d),
        _s("moe.dispatch.token_indices", (n,), kernels.INT64, "IndexBackward0", src_d),
        _s("moe.experts.input", (n, h), x, "GroupedMmBackward0", SRC_EXPERTS),
        _s("moe.experts.offsets", (e,), "int32", "GroupedMmBackward0", SRC_EXPERTS),
        _s("moe.experts.b1_index", (n,), kernels.INT64, "IndexSelectBackward0", SRC_EXPERTS),
        # h + b1: [N, 2F]; the strided gate / linear halves are views of it (clamp keeps them).
        _s("moe.experts.mlp1_output", (n, 2 * f), BF16, "ClampBackward1", SRC_EXPERTS),
        _s("moe.experts.glu_clamped", (n, f), BF16, "MulBackward0", SRC_EXPERTS),
        _s("moe.experts.linear_clamped", (n, f), BF16, "AddcmulBackward0", SRC_EXPERTS),
        _s("moe.experts.sigmoid", (n, f), BF16, "SigmoidBackward0", SRC_EXPERTS),
        _s("moe.experts.out_glu", (n, f), BF16, "AddcmulBackward0", SRC_EXPERTS),
        _s("moe.experts.mlp2_input", (n, f), BF16, "GroupedMmBackward0", SRC_EXPERTS),
        _s("moe.experts.b2_index", (n,), kernels.INT64, "IndexSelectBackward0", SRC_EXPERTS),
        _s("moe.combine.output_fp32", (n, h), kernels.FP32, "MulBackward0", src_d),
        _s("moe.combine.scores_sorted", (n,), r, "MulBackward0", src_d),
    ]
    return out


def layer(arch: Architecture, st: Setting) -> list[Saved]:
    """One block's saves without checkpointing."""
    return attention(arch, st) + moe(arch, st)


def selective_kept(arch: Architecture, st: Setting) -> list[Saved]:
    """What a block under SelectiveAC holds (SRC_SAC): its input, the three addmm outputs
    (wqkv, wo and the router gate, the gate's in the router's dtype), varlen's three outputs
    and the router's topk values (fp32: scores + the fp32 expert_bias buffer) and indices."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, k, x = st.tokens, arch.num_experts_per_token, st.stream
    r = torchtitan_moe.router_dtype(st)
    return [
        _block_input(arch, st),
        _s("attention.wqkv.output", (t, (a + 2 * kv) * d), x, "MUST_SAVE", SRC_SAC),
        _s("attention.wo.output", (t, h), x, "MUST_SAVE", SRC_SAC),
        _s("moe.router.gate.output", (t, arch.num_experts), r, "MUST_SAVE", SRC_SAC),
        _s("attention.varlen.out", (t, a * d), x, "MUST_SAVE", SRC_SAC),
        _s("attention.varlen.lse", (a, t), kernels.FP32, "MUST_SAVE", SRC_SAC),
        _s("attention.varlen.rng_state", (2,), "uint64", "MUST_SAVE", SRC_SAC),
        _s("moe.router.topk_values", (t, k), kernels.FP32, "MUST_SAVE", SRC_SAC),
        _s("moe.router.topk_indices", (t, k), kernels.INT64, "MUST_SAVE", SRC_SAC),
    ]


def _block_input(arch: Architecture, st: Setting) -> Saved:
    shape = (st.batch, st.sequence, arch.hidden_size)
    return _s("checkpoint.hidden_states", shape, st.stream, "Noop", torchtitan_ac.SRC_CHECKPOINT)


def _blocks(arch: Architecture, st: Setting) -> list[Block]:
    n, full = arch.num_layers, layer(arch, st)
    if st.checkpointing == "full":
        ckpt = torchtitan_ac.checkpointed_layers(n, st.checkpoint_every)
        out = [
            Block(
                name="layers",
                count=ckpt,
                tensors=(_block_input(arch, st),),
                recompute=tuple(full),
                layered=True,
            )
        ]
        if n - ckpt:
            out.append(Block(name="layers", count=n - ckpt, tensors=tuple(full), layered=True))
        return out
    if st.checkpointing == "selective-op":
        kept = selective_kept(arch, st)
        held = {s.name for s in kept}
        again = tuple(s for s in full if s.name not in held)
        return [Block(name="layers", count=n, tensors=tuple(kept), recompute=again, layered=True)]
    return [Block(name="layers", count=n, tensors=tuple(full), layered=True)]


def saved(arch: Architecture, st: Setting, *, traced: bool = False) -> Activations:
    """torchtitan 0.3.0's gpt-oss forward and loss on one GPU (module docstring). `traced`:
    the CPU branch, for the probe's trace only (a CPU spec is refused)."""
    why = unsupported(arch, st, traced=traced)
    if why:
        return replace(
            not_modelled(f"activations not modelled: {why}."), implementation="torchtitan"
        )
    h, vocab, t = arch.hidden_size, arch.vocab_size, st.tokens
    embeddings = Block(
        name="embeddings",
        count=1,
        tensors=(kernels.embedding_indices("tok_embeddings.indices", (st.batch, st.sequence)),),
    )
    head = torchtitan.rms_norm("norm", t, h, st.stream, st)
    head.append(_s("norm.output", (t, h), st.stream, "MmBackward0", kernels.DERIV))
    loss = Block(
        name="loss",
        count=1,
        tensors=(
            _s("log_softmax", (t, vocab), kernels.FP32, "LogSoftmaxBackward0", torchtitan.SRC_LOSS),
            _s("targets", (t,), kernels.INT64, "NllLossBackward0", torchtitan.SRC_LOSS),
            _s("total_weight", (), kernels.FP32, "NllLossBackward0", torchtitan.SRC_LOSS),
        ),
    )
    notes = [
        f"torchtitan {VERSION}'s gpt-oss model code (fused wqkv with biases, attention sinks, "
        "varlen attention, biased experts with the clamped SwiGLU), loss CrossEntropyLoss on "
        "the whole logits (0.3.0's ChunkedLossWrapper: not modelled).",
        "attention: torchtitan's default varlen backend (flash varlen: q, k, v, out and an "
        "[heads, tokens] fp32 lse per layer; the sliding window changes no saved tensor).",
    ]
    return Activations(
        modelled=True,
        blocks=(
            embeddings,
            *_blocks(arch, st),
            Block(name="head", count=1, tensors=tuple(head)),
            loss,
        ),
        logits_bytes=t * vocab * dtype_bytes(st.matmul),
        upcast_bytes=t * vocab * dtype_bytes(kernels.FP32),
        hidden_bytes=t * h * dtype_bytes(st.stream),
        notes=tuple(notes),
        implementation="torchtitan",
    )
