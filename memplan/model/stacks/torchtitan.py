"""torchtitan's own Llama 3 and dense Qwen3 (`model.implementation: torchtitan`): what their
forward and loss save for backward, with no checkpointing, torchtitan's `FullAC`, its per-op
`SelectiveAC` (`selective-op`) and every-Nth-layer full checkpointing (`checkpoint_every`).

Read from torchtitan 0.3.0 (torchtitan/, pip `torchtitan==0.3.0`):
- models/llama3/model.py::Llama3TransformerBlock.forward:
  `h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))`.
- models/common/decoder.py::Decoder.forward: tok_embeddings -> layers -> norm -> lm_head.
- models/common/nn_modules.py::RMSNorm is `torch.nn.RMSNorm` (`F.rms_norm`).
- models/common/attention.py::FusedQKVLinear.forward (`wqkv`, the llama3 default
  `fuse_qkv=True`): one projection, split and copied contiguous into q, k, v;
  QKVLinear (`fuse_qkv=False`, three projections `wq`, `wk`, `wv`: torchtitan's Llama
  of Dec 2024, 9dec370, which measured the published table); GQAttention.forward: RoPE on q, k,
  the inner attention, `.contiguous()`, `wo`.
- models/common/attention.py::ScaledDotProductAttention.forward: `F.scaled_dot_product_attention
  (..., is_causal=True, enable_gqa=...)` on (B, N, L, H) transposed views. (0.3.0's Llama
  configs default to flex attention; SDPA is 9dec370's attention and what this rule models.)
- models/common/rope.py::ComplexRoPE.apply_rotary_emb: `view_as_complex(q.float()...) * cache`,
  `.type_as(q)`: the multiply saves only the (buffer) cache, its other input needs no grad.
- models/common/feed_forward.py::FeedForward.forward: `w2(silu(w1(x)) * w3(x))`.
- components/loss.py::cross_entropy_loss: `cross_entropy(pred.flatten(0, 1).float(),
  labels.flatten(0, 1), reduction="sum")`; the labels come shifted from the data loader. This
  is `CrossEntropyLoss` on the whole logits (9dec370's loss); 0.3.0's llama3 config_registry
  wraps it in `ChunkedLossWrapper` (8 chunks, lm_head applied per chunk inside the loss), which
  is not modelled.
- distributed/activation_checkpoint.py: FullAC and SelectiveAC wrap each block in
  `ptd_checkpoint_wrapper` (torch.utils.checkpoint, non-reentrant); what each keeps of a block
  is memplan.model.stacks.torchtitan_ac's.

Qwen3 (model_type qwen3, dense) is the same decoder (models/common/decoder.py::Decoder) with
these differences, read from torchtitan 0.3.0:
- models/qwen3/model.py::Qwen3TransformerBlock.forward: `x = x + attention(attention_norm(x));
  x = x + feed_forward(ffn_norm(x))`, the Llama block's dataflow.
- models/qwen3/__init__.py::_build_qwen3_layers: `make_gqa_config(..., head_dim=head_dim,
  qk_norm=RMSNorm.Config(head_dim))` with an explicit head_dim (n_heads x head_dim need not be
  dim: 0.6B, 4B, 32B) and CosSinRoPE; enable_weight_tying in 0.6B, 1.7B and 4B (one weight,
  no saved tensor changes).
- models/common/attention.py::GQAttention.forward: `q_norm(xq)`, `k_norm(xk)` (torch's RMSNorm
  over head_dim on [b, s, heads, head_dim]) before RoPE, `scale=head_dim ** -0.5` to SDPA.
- models/common/rope.py::CosSinRoPE.apply_rotary_emb: `q.float() * cos + rotate_half(q.float())
  * sin`, `.type_as(q)`: the multiplies save only cos and sin, views of the fp32 buffer.
- models/qwen3/parallelize.py::parallelize_qwen3 applies the same `ac_config.build(...).apply`
  (FullAC / SelectiveAC, the same default save ops) and `apply_compile` as parallelize_llama.

Qwen3-MoE (models/qwen3 MoE flavors) is this Qwen3 block with torchtitan's MoE as its
feed-forward half (memplan.model.stacks.torchtitan_moe); DeepSeek-V3 (models/deepseek_v3) has
MLA as its attention (memplan.model.stacks.torchtitan_mla), dense feed-forwards in its first
layers (a second layer kind, `layers.dense`) and the MoE with shared experts after. gpt-oss
(models/gpt_oss) has its own rule, memplan.model.stacks.torchtitan_gptoss, which `saved`
dispatches to. 0.3.0 has no Llama 4 model (LLAMA4).

The model runs wholly in the compute dtype (FSDP2 `param_dtype`, no autocast: memplan.report.
estimate.setting_of); autocast (torchtitan without FSDP) is not modelled. Proved on CPU against
torchtitan's real model by tests/test_torchtitan_activations.py. Under training.compile the
blocks are what Inductor keeps (memplan.model.stacks.torchtitan_compile).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import attention, compiled, compiled_mla, kernels
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture
from memplan.model.stacks import (
    MODEL_TYPES,
    llama_refusal,
    torchtitan_ac,
    torchtitan_compile,
    torchtitan_mla,
    torchtitan_moe,
)
from memplan.precision import dtype_bytes

VERSION = "0.3.0"
SRC = f"torchtitan {VERSION} models/llama3/model.py, models/common/*.py"
SRC_QK_NORM = (
    f"torchtitan {VERSION} models/common/attention.py::GQAttention.forward (q_norm, k_norm: "
    "models/qwen3/__init__.py::_build_qwen3_layers `qk_norm=_qwen3_norm(head_dim)`)"
)
QWEN3 = "qwen3"
QWEN3_FAMILY = (QWEN3, *torchtitan_moe.MODEL_TYPES)
"""Built by torchtitan's models/qwen3 (Qwen3Model, q_norm / k_norm, explicit head_dim)."""
DEEPSEEK_V3 = torchtitan_moe.DEEPSEEK_V3
GPT_OSS = "gpt_oss"
"""torchtitan's models/gpt_oss: its own rule, memplan.model.stacks.torchtitan_gptoss."""
TORCHTITAN_MODEL_TYPES = (*MODEL_TYPES, *QWEN3_FAMILY, DEEPSEEK_V3, GPT_OSS)
"""The model_types torchtitan's own model code is modelled for: Llama 3 (models/llama3),
dense Qwen3 and Qwen3-MoE (models/qwen3; the MoE block: memplan.model.stacks.torchtitan_moe)
and DeepSeek-V3 on CPU (models/deepseek_v3; MLA: memplan.model.stacks.torchtitan_mla)."""
SRC_NORM_CPU = (
    "aten native/layer_norm.cpp::rms_norm_composite (torch 2.13: `_fused_rms_norm` is "
    "CompositeImplicitAutograd on CPU): x.to(fp32), pow, mean, rsqrt, * rstd, * weight, "
    "type_as(x)"
)
SRC_NORM_CUDA = (
    "aten native/cuda/layer_norm_kernel.cu::_fused_rms_norm_cuda; derivatives.yaml "
    "_fused_rms_norm: backward reads input, rstd (result1) and weight (torch 2.13)"
)
SRC_LOSS = f"torchtitan {VERSION} components/loss.py::cross_entropy_loss; " + kernels.DERIV
# training.compile_loss: BaseLoss._maybe_compile (components/loss.py, 0.3.0) compiles
# cross_entropy_loss; Inductor's min-cut partition keeps the graph input (the 16-bit logits),
# the labels and the log-softmax's two [tokens, 1] fp32 statistics (amax, log of the sum), and
# the backward writes the logits' gradient in one fused kernel (traced on CPU:
# memplan.verify.trace.compiled, tests/test_compile.py::test_compiled_loss_*).
SRC_COMPILED_LOSS = (
    f"torchtitan {VERSION} components/loss.py::BaseLoss._maybe_compile; {compiled.SRC}"
)
LLAMA4 = (
    f"torchtitan {VERSION} has no Llama 4 model: its models/ are common, deepseek_v3, flux, "
    "gpt_oss, kimi_k2_7, llama3, muse_glimmer, qwen3 and qwen3_5 (pip torchtitan==0.3.0); "
    "use model.implementation transformers for Llama 4"
)


def unsupported(arch: Architecture, st: Setting) -> str:
    """Why torchtitan's Llama 3 / Qwen3 rule does not cover this model or setting, or ''."""
    if arch.model_type.startswith("llama4"):
        return LLAMA4
    why = llama_refusal(
        arch,
        "torchtitan",
        "torchtitan's Llama 3, dense Qwen3, Qwen3-MoE, DeepSeek-V3 and gpt-oss code, "
        "models/llama3, models/qwen3, models/deepseek_v3 and models/gpt_oss: model_types "
        "llama, qwen3, qwen3_moe, deepseek_v3 and gpt_oss",
        model_types=TORCHTITAN_MODEL_TYPES,
    )
    if why:
        return why
    qwen3 = arch.model_type in QWEN3_FAMILY
    mla = arch.model_type == DEEPSEEK_V3
    if not (qwen3 or mla) and arch.head_dim * arch.num_attention_heads != arch.hidden_size:
        return "torchtitan's Llama 3 takes head_dim = dim // n_heads"
    if qwen3 and isinstance(arch.extra.get("sliding_window"), int):
        return (
            "torchtitan's Qwen3 (models/qwen3) has no sliding-window attention: this config "
            "sets use_sliding_window"
        )
    if torchtitan_moe.is_moe(arch):
        why = torchtitan_moe.unsupported(arch, st)
        if why:
            return why
    if arch.model_type == DEEPSEEK_V3 and st.compile:
        why = compiled_mla.uncovered(arch, st)
        if why:
            return (
                "training.compile for torchtitan's DeepSeek-V3 is traced on CPU in bf16 or fp32 "
                "at expert parallelism 1, 2 and 4 with checkpointing none, full or selective-op "
                f"(memplan.model.forward.compiled_mla), not under {why}"
            )
    elif torchtitan_moe.is_moe(arch) and st.compile:
        why = torchtitan_compile.compiled_moe_uncovered(arch, st)
        if why:
            return (
                "training.compile for torchtitan's Qwen3-MoE is traced at expert parallelism "
                "1 with checkpointing none, full or selective-op (memplan.model.forward."
                "compiled.qwen3_moe_layer) and at 2 and 4 with none or selective-op "
                f"(compiled_ep), not under {why}"
            )
    kernel = compiled.kernel_uncovered(arch, st) if st.compile else ""
    if kernel:
        return f"training.compile is traced with SDPA's flash kernel, not {kernel}"
    if st.autocast:
        return (
            "torchtitan under torch.autocast (no FSDP2 sharding: DDP or one device) is not "
            "modelled; with FSDP2 (data or context > 1) its model runs in the compute dtype"
        )
    if st.attention != "sdpa":
        return "torchtitan's attention is not transformers' eager one: use training.attention sdpa"
    if st.device == "cuda" and st.matmul not in ("bf16", "fp16"):
        return (
            "torchtitan's SDPA in fp32 on CUDA (the math kernel: no flash kernel for fp32) is "
            "not modelled"
        )
    if st.offload:
        return "activation_offload is transformers' offload=True: torchtitan has no such option"
    if st.checkpointing == "selective":
        return (
            "activation_checkpointing selective is Megatron's attention-core recompute, which "
            "torchtitan does not offer: use selective-op (its SelectiveAC) or full"
        )
    return ""


def rms_norm(prefix: str, t: int, h: int, x_dtype: str, st: Setting) -> list[Saved]:
    """What `torch.nn.RMSNorm` over an `x_dtype` input [t, h] saves (not its output).

    CPU (SRC_NORM_CPU): pow saves the fp32 input (x itself when fp32), rsqrt saves rstd
    [t, 1] fp32 (the multiply saves it again), `* weight` saves the normalized fp32 tensor; the
    output (cast back to x's dtype) is a new tensor. CUDA (SRC_NORM_CUDA): the fused kernel
    keeps its input and rstd [t, 1] fp32; the output is a new tensor.
    """
    fp32 = kernels.FP32
    if st.device == "cpu":
        return [
            kernels.saved(f"{prefix}.input_fp32", (t, h), fp32, "PowBackward0", SRC_NORM_CPU),
            kernels.saved(f"{prefix}.rstd", (t, 1), fp32, "RsqrtBackward0", SRC_NORM_CPU),
            kernels.saved(f"{prefix}.normalized", (t, h), fp32, "MulBackward0", SRC_NORM_CPU),
        ]
    return [
        kernels.saved(f"{prefix}.input", (t, h), x_dtype, "FusedRmsNormBackward0", SRC_NORM_CUDA),
        kernels.saved(f"{prefix}.rstd", (t, 1), fp32, "FusedRmsNormBackward0", SRC_NORM_CUDA),
    ]


def _norm(prefix: str, t: int, h: int, x_dtype: str, st: Setting) -> list[Saved]:
    """`nn.RMSNorm` (rms_norm) and its output, which the next matmul saves."""
    out = rms_norm(prefix, t, h, x_dtype, st)
    out.append(kernels.saved(f"{prefix}.output", (t, h), x_dtype, "MmBackward0", kernels.DERIV))
    return out


def _layer(
    arch: Architecture, st: Setting, *, moe: bool
) -> tuple[list[Saved], attention.Core | None]:
    """One block's saved tensors without checkpointing, and its SDPA core (None for MLA's
    math kernel). `moe`: the feed-forward half is a MoE."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, x = st.batch, st.sequence, st.tokens, st.stream
    out = _norm("attention_norm", t, h, x, st)
    core: attention.Core | None = None
    if arch.model_type == DEEPSEEK_V3:
        # attention_norm's output is read by wq (wq_a) and wkv_a.
        out = [*out[:-1], *torchtitan_mla.saves(arch, st, out[-1])]
    else:
        if arch.model_type in QWEN3_FAMILY:
            out += qk_norms(arch, st)
        # RoPE's `.float()` / `.type_as(q)` leave q and k in the compute dtype; the
        # projections' q, k, v copies are not saved (RoPE's multiply saves only the cache;
        # Qwen3's q_norm and k_norm save theirs, qk_norms).
        heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
        qkv = attention.Qkv(q=x, k=x, v=x)
        core = attention.sdpa(st, heads, qkv, dropout_on=False)
        out += [*core.core, *core.output]
    # h = x + wo(...): a new tensor, saved by ffn_norm.
    if moe:
        # ffn_norm's output is saved by the router's gate (or cast to fp32 for it).
        out += rms_norm("ffn_norm", t, h, x, st) + torchtitan_moe.saves(arch, st)
        return out, core
    out += _norm("ffn_norm", t, h, x, st)
    mlp = gated_mlp_saves("feed_forward.w1", t, arch.intermediate_size, "silu", st)
    assert mlp is not None  # silu has a rule
    names = {
        "feed_forward.w1.gate_proj.output": "feed_forward.w1.output",
        "feed_forward.w1.act_output": "feed_forward.silu.output",
        "feed_forward.w1.up_proj.output": "feed_forward.w3.output",
        "feed_forward.w1.down_proj.input": "feed_forward.w2.input",
    }
    out += [kernels.saved(names[m.name], m.shape, m.dtype, m.saved_by, SRC) for m in mlp]
    return out, core


def qk_norms(arch: Architecture, st: Setting) -> list[Saved]:
    """Qwen3's q_norm and k_norm (SRC_QK_NORM): `torch.nn.RMSNorm(head_dim)` over the q and k
    that FusedQKVLinear / QKVLinear hand out, [b, s, heads, head_dim] in the compute dtype
    (`.contiguous()` copies of the projection's split: new tensors). What each saves is
    rms_norm's over [tokens x heads, head_dim]; their outputs go to RoPE, whose `.float()`
    and multiplies by the fp32 cos / sin buffer save nothing of them."""
    _, a, kv, d = kernels.attention_dims(arch)
    t, x = st.tokens, st.stream
    norms = [*rms_norm("attention.q_norm", t * a, d, x, st)]
    norms += rms_norm("attention.k_norm", t * kv, d, x, st)
    return [replace(n, source=f"{SRC_QK_NORM}; {n.source}") for n in norms]


def _layer_blocks(
    arch: Architecture, st: Setting, n: int, name: str, *, moe: bool, fused_qkv: bool
) -> list[Block]:
    """`n` blocks of one kind (`moe`: MoE feed-forward) under `st`'s checkpointing
    (memplan.model.stacks.torchtitan_ac.layer_blocks)."""
    layer, core = _layer(arch, st, moe=moe)
    return torchtitan_ac.layer_blocks(arch, st, n, name, layer, core, moe=moe, fused_qkv=fused_qkv)


def saved(
    arch: Architecture, st: Setting, *, fused_qkv: bool = True, whole: Architecture | None = None
) -> Activations:
    """torchtitan's Llama 3 or Qwen3 forward and loss on one GPU (no model parallelism): see the
    module docstring. `fused_qkv`: 0.3.0's one `wqkv` projection (default) or 9dec370's three.
    `whole`: the whole model when `arch` is one tensor-parallel rank's slice of it
    (memplan.activations.torchtitan_parallel), which the rule's conditions are checked on."""
    if (whole or arch).model_type == GPT_OSS:
        from memplan.model.stacks import torchtitan_gptoss

        if whole is not None:
            why = "tensor or context parallelism for torchtitan's gpt-oss is not modelled"
            return replace(
                not_modelled(f"activations not modelled: {why}."), implementation="torchtitan"
            )
        return torchtitan_gptoss.saved(arch, st)
    why = unsupported(whole or arch, st)
    if why:
        return replace(
            not_modelled(f"activations not modelled: {why}."), implementation="torchtitan"
        )
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    n = arch.num_layers
    embeddings = Block(
        name="embeddings",
        count=1,
        tensors=(kernels.embedding_indices("tok_embeddings.indices", (b, s)),),
    )
    moe = torchtitan_moe.is_moe(arch)
    dense = torchtitan_moe.dense_layers(arch) if moe else n
    layers = []
    layer_order: tuple[str, ...] = ()
    if dense and moe:
        # DeepSeek-V3's dense first layers: a second layer kind, named as a traced profile
        # names its other kinds (memplan.activations.pipeline stages them by layer_order).
        layers += _layer_blocks(arch, st, dense, "layers.dense", moe=False, fused_qkv=fused_qkv)
        layer_order = ("layers.dense",) * dense + ("layers",) * (n - dense)
    layers += _layer_blocks(
        arch, st, n - dense if moe else n, "layers", moe=moe, fused_qkv=fused_qkv
    )
    compile_note = ""
    if st.compile:
        # Qwen3's q_norm / k_norm: traced on Qwen3TransformerBlock.
        qk_norm = arch.model_type == QWEN3
        layers, compile_note = torchtitan_compile.blocks(arch, st, layers, qk_norm=qk_norm)
    head = Block(name="head", count=1, tensors=tuple(_norm("norm", t, h, st.stream, st)))
    loss = Block(
        name="loss",
        count=1,
        tensors=(
            kernels.saved("log_softmax", (t, vocab), kernels.FP32, "LogSoftmaxBackward0", SRC_LOSS),
            kernels.saved("targets", (t,), kernels.INT64, "NllLossBackward0", SRC_LOSS),
            kernels.saved("total_weight", (), kernels.FP32, "NllLossBackward0", SRC_LOSS),
        ),
    )
    upcast = t * vocab * dtype_bytes(kernels.FP32) if st.matmul != kernels.FP32 else 0
    logits_bytes = t * vocab * dtype_bytes(st.matmul)
    loss_gradient: int | None = None
    if st.compile_loss:
        by = compiled.BY
        loss = Block(
            name="loss",
            count=1,
            tensors=(
                kernels.saved("compiled_loss.logits", (t, vocab), st.matmul, by, SRC_COMPILED_LOSS),
                kernels.saved("compiled_loss.targets", (t,), kernels.INT64, by, SRC_COMPILED_LOSS),
                kernels.saved("compiled_loss.amax", (t, 1), kernels.FP32, by, SRC_COMPILED_LOSS),
                kernels.saved("compiled_loss.log", (t, 1), kernels.FP32, by, SRC_COMPILED_LOSS),
            ),
        )
        # The logits are the saved graph input now, and no fp32 copy is made.
        loss_gradient, logits_bytes, upcast = logits_bytes, 0, 0
    notes = [
        f"torchtitan {VERSION}'s "
        + _MODEL_NAMES.get(arch.model_type, "Llama 3")
        + " model code"
        + (
            " (MLA, no multi-token-prediction layer: 0.3.0's num_mtp_layers default 0)"
            if arch.model_type == DEEPSEEK_V3
            else " (fused wqkv)"
            if fused_qkv
            else " (wq, wk, wv)"
        )
        + ", loss CrossEntropyLoss on the whole logits"
        + (" (compiled)" if st.compile_loss else "")
        + " (0.3.0's ChunkedLossWrapper: not modelled)."
    ]
    notes.append(compile_note)
    if st.device == "cuda":
        notes.append(
            "attention: SDPA's flash kernel (torchtitan 9dec370's default priority); 0.3.0's "
            "ScaledDotProductAttention tries cuDNN first, and its Llama configs use flex."
        )
    return Activations(
        modelled=True,
        blocks=(embeddings, *layers, head, loss),
        layer_order=layer_order,
        logits_bytes=logits_bytes,
        upcast_bytes=upcast,
        loss_gradient_bytes=loss_gradient,
        hidden_bytes=t * h * dtype_bytes(st.stream),
        notes=tuple(x for x in notes if x),
        implementation="torchtitan",
    )


_MODEL_NAMES = {QWEN3: "Qwen3", torchtitan_moe.QWEN3_MOE: "Qwen3-MoE", DEEPSEEK_V3: "DeepSeek-V3"}
