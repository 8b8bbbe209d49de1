"""LitGPT's adapter and adapter_v2 (memplan.model.stacks.litgpt_adapter, their tensors): what
litgpt.adapter(_v2).GPT's forward and finetune/adapter(_v2).py::fit's loss save for backward on
one device, after fit's no-grad validation filled every adapted layer's adapter_kv_cache
(litgpt_adapter.SRC_CACHE: the cached prefix keys and values need no gradient).

Proved to the byte on one CPU device against litgpt's own models run by Fabric in fit's order,
with and without LitGPT's recomputation (benchmarks/litgpt_adapter.py, `activations_measured`
and `activations`; tests/test_litgpt_adapter.py). On CUDA the prefix attention's kernel is
settled from torch's source (SRC_SDPA_CUDA, docs/litgpt-adapter.md), its tensors tested against
the aten op under memplan.verify.trace.cuda; the rest of the layer is the CPU rule's, whose
kernels (litgpt.attention_saves) already know the device.
"""

from __future__ import annotations

from collections.abc import Callable

from memplan.config.finetune import FinetuneSpec
from memplan.model.forward import attention, kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import litgpt, litgpt_configs, litgpt_lora, litgpt_lora_adapters
from memplan.model.stacks.litgpt_adapter import COVERED, SRC_ADAPTER, SRC_ADAPTER_V2
from memplan.precision import dtype_bytes

SRC_PREFIX = (
    f"{SRC_ADAPTER}::CausalSelfAttention.scaled_dot_product_attention (`amask = torch.ones(T, "
    "aT, dtype=torch.bool)`, `ay = super().scaled_dot_product_attention(q, ak, av, amask)`, "
    "`y + self.gating_factor * ay`); " + kernels.DERIV
)
SRC_SDPA_CPU = (
    "pytorch aten/src/ATen/native/transformers/sdp_utils_cpp.h::"
    "check_batch_size_and_num_heads_dense (read at 0119c205: the CPU flash kernel wants q, k "
    "and v of one batch size and head count; the cached k/v have batch 1 and, under "
    "multi-query, one head) and attention.cpp::_scaled_dot_product_attention_math (fp32 "
    "upcast; matmul expands k^T and v to q's batch; softmax's output kept); which path runs "
    "and what it keeps measured on torch 2.13.0+cpu (benchmarks/litgpt_adapter.py)"
)
SRC_SDPA_CUDA = (
    "pytorch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp::select_sdp_backend (read "
    "at 001f694a, torch 2.13's tag cf30153c not stored): torch 2.13.0's include/ATen/"
    "Context.h default order flash, "
    "efficient, math, cuDNN (check_prefer_cudnn_attention puts cuDNN first only on sm90/sm10x "
    "with a runtime cuDNN > 9.15); flash refuses any attn_mask (check_for_attn_mask); the "
    "memory-efficient kernel wants q, k, v of one batch size and head count "
    "(sdp_utils_cpp.h::check_batch_size_and_num_heads_dense, as torch 2.13.0's wheel ships it "
    "in torch/include) and head_dim a multiple of minimum_gemm_alignment (8 for 16-bit, 4 "
    "for fp32 on sm80+); attention.cpp::preprocess_mask pads the additive mask "
    "(convert_boolean_attn_mask, q's dtype) to a multiple of 8 columns (mem_eff_alignment, "
    "memplan.verify.trace.cuda) and the node keeps query, key, value, attn_bias, output, "
    "log_sumexp and the host philox seed/offset (torch 2.13.0 include/torch/csrc/autograd/"
    "generated/Functions.h::ScaledDotProductEfficientAttentionBackward0); logsumexp "
    "[B, n_head, ceil(T / 32) * 32] fp32 (torch/_meta_registrations.py::"
    "meta__scaled_dot_product_efficient_attention)"
)
SRC_CAST = "aten/src/ATen/autocast_mode.h::cached_cast (CPU autocast's lower-precision list)"
SRC_V2_LINEAR = (
    f"{SRC_ADAPTER_V2}::AdapterV2Linear.forward (`adapter_scale * (linear(x) + adapter_bias)`: "
    "the frozen linear keeps no input, the multiply keeps the sum for adapter_scale's "
    "gradient); " + kernels.DERIV
)
SRC_FIT_ADAPTER = (
    f"litgpt {litgpt.VERSION} finetune/adapter.py::fit and adapter_v2.py::fit "
    "(model(input_ids, lm_head_chunk_size=128), chunked_cross_entropy(logits, targets[..., 1:]), "
    "as finetune/lora.py::fit)"
)
_FROZEN = litgpt_lora_adapters.Flags(
    r=0, dropout=0.0, query=False, key=False, value=False, projection=False, mlp=False, head=False
)
"""No LoRA adapter: litgpt_lora's rule for the frozen base GPT around the prefix."""


EFFICIENT_MASK_ALIGN = 8
"""attention.cpp::preprocess_mask's `mem_eff_alignment` in torch 2.13 (memplan.verify.trace.
cuda.MEM_EFF_ALIGNMENT): a mask whose row stride is not a multiple of it is padded (pad_bias)."""


def efficient_mask_columns(aT: int) -> int:
    """Columns of the storage the memory-efficient kernel keeps for the [T, aT] prefix mask:
    preprocess_mask leaves a mask whose row stride aT is a multiple of EFFICIENT_MASK_ALIGN
    alone, else pad_bias pads `EFFICIENT_MASK_ALIGN - aT % EFFICIENT_MASK_ALIGN` columns and
    slices the view back (SRC_SDPA_CUDA)."""
    if aT % EFFICIENT_MASK_ALIGN == 0:
        return aT
    return aT + EFFICIENT_MASK_ALIGN - aT % EFFICIENT_MASK_ALIGN


def cuda_refusal(arch: Architecture, st: Setting) -> str:
    """Why the prefix attention's CUDA kernel is not modelled here, or ''. At batch 1 with the
    cache at every head the memory-efficient kernel needs head_dim a multiple of
    minimum_gemm_alignment (SRC_SDPA_CUDA: 8 for 16-bit q, 4 for fp32, sm80+); otherwise SDPA
    falls to the math path at batch 1, which the CPU proof never ran."""
    _, _, kv, d = kernels.attention_dims(arch)
    align = 4 if st.matmul == kernels.FP32 else 8
    if st.batch == 1 and kv != 1 and d % align:
        return (
            f"on CUDA the prefix attention's memory-efficient kernel needs head_size a "
            f"multiple of {align} (sdp_utils.cpp::check_head_dim_size_mem_efficient; this "
            f"model's is {d}), and the math path it falls to at micro-batch 1 is not proved"
        )
    return ""


def prefix_attention(
    arch: Architecture, st: Setting, aT: int, *, q_grad: bool, cast: bool = False
) -> list[Saved]:
    """The gated attention over the cached prefix (SRC_PREFIX) in an adapted layer. `ay` (q's
    dtype, [B, T, n_head, head_size]) is kept by `gating_factor * ay` for the gate's gradient.
    When q requires grad SDPA keeps more: on CPU, with q's batch 1 and k/v of every head, its
    flash kernel (SRC_SDPA_CPU) keeps the bool mask converted to q's dtype [T, aT], the
    logsumexp [B, n_head, T] fp32 and its output (that `ay`); otherwise the math path keeps
    k^T and v expanded to q's batch [B n_head, head_size, aT] / [B n_head, aT, head_size] and
    the softmax [B, n_head, T, aT], in fp32 (the cache needs no gradient: q itself is not
    kept). On CUDA (an sm80+ GPU, the default backend order: SRC_SDPA_CUDA) the same split
    holds: at batch 1 with k/v at every head the memory-efficient kernel runs (flash refuses
    the mask) and keeps the mask padded to `efficient_mask_columns(aT)` in q's dtype, the
    logsumexp [B, n_head, ceil(T / 32) * 32] fp32 and its output; otherwise the efficient
    kernel refuses the batch or head mismatch and the same math path runs."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, mm, fp32 = st.batch, st.sequence, st.matmul, kernels.FP32
    ay = kernels.saved("attn.prefix.output", (b, s, a, d), mm, "MulBackward0", SRC_PREFIX)
    if not q_grad:
        return [ay]
    if b == 1 and kv != 1:
        if st.device == "cuda":
            lse = -(-s // attention.EFFICIENT_LSE_ALIGN) * attention.EFFICIENT_LSE_ALIGN
            mask_shape, lse_shape, src = (s, efficient_mask_columns(aT)), (b, a, lse), SRC_SDPA_CUDA
        else:
            mask_shape, lse_shape, src = (s, aT), (b, a, s), SRC_SDPA_CPU
        casts = [
            kernels.saved(f"attn.prefix.{n}_cast", shape, mm, "SdpaBackward", SRC_CAST)
            for n, shape in (
                ("query", (b, a, s, d)),
                ("key", (1, a, aT, d)),
                ("value", (1, a, aT, d)),
            )
        ]
        return [
            *(casts if cast else []),
            kernels.saved("attn.prefix.mask", mask_shape, mm, "SdpaBackward", src),
            kernels.saved("attn.prefix.logsumexp", lse_shape, fp32, "SdpaBackward", src),
            ay,
        ]
    softmax = kernels.saved(
        "attn.prefix.softmax", (b, a, s, aT), fp32, "SoftmaxBackward0", SRC_SDPA_CPU
    )
    if kv == 1:
        # One cached head: matmul's expand of the fp32 [1, 1, aT, head_size] k^T and v to
        # [B, n_head, ...] has stride 0 in both batch dims, so its reshape is a view: bmm keeps
        # the scaled k (a new fp32 tensor) and v's fp32 upcast, which is the cache itself when
        # the cache is fp32 (32-true: nothing new).
        out = [kernels.saved("attn.prefix.key_t", (1, d, aT), fp32, "BmmBackward0", SRC_SDPA_CPU)]
        out.append(softmax)
        if mm != fp32:
            value = kernels.saved(
                "attn.prefix.value", (1, aT, d), fp32, "BmmBackward0", SRC_SDPA_CPU
            )
            out.append(value)
        return [*out, ay]
    return [
        kernels.saved("attn.prefix.key_t", (b * a, d, aT), fp32, "BmmBackward0", SRC_SDPA_CPU),
        softmax,
        kernels.saved("attn.prefix.value", (b * a, aT, d), fp32, "BmmBackward0", SRC_SDPA_CPU),
        ay,
    ]


def _v1_layer(arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool) -> list[Saved]:
    """One Block of litgpt.adapter.GPT. Every base weight is frozen, so it saves what
    litgpt_lora's frozen layer saves (nothing when its input needs no gradient), plus the
    prefix attention of an adapted layer; the first adapted layer after frozen ones (input
    without gradient) keeps only `ay` in its attention, then proj's weight cast (autocast),
    norm_2 and the MLP as a layer whose residual requires grad."""
    if not adapted:
        return litgpt_lora._layer(arch, st, _FROZEN, g_in)[0]
    full = litgpt_lora._layer(arch, st, _FROZEN, True)[0]
    if g_in:
        return [*full, *prefix_attention(arch, st, aT, q_grad=True)]
    kept = [x for x in full if x.name.startswith(("attn.proj.", "norm_2.", "mlp."))]
    return [*prefix_attention(arch, st, aT, q_grad=False), *kept]


def _v1_neox_layer(
    arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool
) -> list[Saved]:
    """`_v1_layer` for Phi's parallel-residual Block (`mlp(norm_1(x)) + attn(norm_1(x)) + x`):
    the frozen Block as litgpt_lora_neox.neox_layer saves it, plus the prefix attention of an
    adapted layer. When the block input needs no gradient only the attention's output does
    (through the gate): `ay` and attn.proj's kept input (and its weight's cast under
    autocast); the MLP reads the shared norm's output, which needs none, and saves nothing."""
    if not adapted:
        return litgpt_lora._layer(arch, st, _FROZEN, g_in)[0]
    full = litgpt_lora._layer(arch, st, _FROZEN, True)[0]
    if g_in:
        return [*full, *prefix_attention(arch, st, aT, q_grad=True)]
    kept = [x for x in full if x.name.startswith("attn.proj.")]
    return [*prefix_attention(arch, st, aT, q_grad=False), *kept]


def _v2_sum(name: str, shape: tuple[int, ...], st: Setting) -> Saved:
    """AdapterV2Linear's `linear(x) + adapter_bias`, kept by the scale's multiply: in the
    parameters' dtype (stream), the bias's promotion lifting autocast's bf16 output to fp32."""
    return kernels.saved(f"{name}.adapter_sum", shape, st.stream, "MulBackward0", SRC_V2_LINEAR)


def _v2_layer(arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool) -> list[Saved]:
    """One Block of litgpt.adapter_v2.GPT: the trainable norms keep x_normed (and, when the
    input requires grad, all of litgpt.norm); every AdapterV2Linear keeps its sum (_v2_sum)
    and under autocast its frozen weight's cast; q, k, v reach SDPA as litgpt.attention_saves
    says, except under autocast, where SDPA casts the fp32 qkv output's q, k and v to bf16
    (v a new copy even with one key per query head); the MLP's silu and product run in the
    stream dtype."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter = st.tokens, arch.intermediate_size
    qkv_out = (a + 2 * kv) * d
    casts = {
        "attn.qkv": (qkv_out, h),
        "attn.proj": (h, a * d),
        "mlp.fc_1": (inter, h),
        "mlp.fc_2": (inter, h),
        "mlp.proj": (h, inter),
    }

    def cast(name: str) -> list[Saved]:
        return litgpt_lora_adapters.weight_cast(name, casts[name], st, x_grad=True)

    out: list[Saved] = []
    norm1 = litgpt.norm("norm_1", t, h, st)
    out += norm1 if g_in else [x for x in norm1 if x.name.endswith(".normalized")]
    out += _v2_attention(arch, st, aT, adapted, cast)
    out += litgpt.norm("norm_2", t, h, st)
    src = SRC_V2_LINEAR
    out += [
        *cast("mlp.fc_1"),
        _v2_sum("mlp.fc_1", (t, inter), st),
        *cast("mlp.fc_2"),
        _v2_sum("mlp.fc_2", (t, inter), st),
        kernels.saved("mlp.fc_1.output", (t, inter), st.stream, "SiluBackward0", src),
        kernels.saved("mlp.silu.output", (t, inter), st.stream, "MulBackward0", src),
        kernels.saved("mlp.fc_2.output", (t, inter), st.stream, "MulBackward0", src),
        *cast("mlp.proj"),
        _v2_sum("mlp.proj", (t, h), st),
    ]
    return out


def _v2_attention(
    arch: Architecture, st: Setting, aT: int, adapted: bool, cast: Callable[[str], list[Saved]]
) -> list[Saved]:
    """adapter_v2's attention half, the same in both Blocks: qkv's and proj's AdapterV2Linear
    (their weights' casts and sums), the main attention (under autocast SDPA's value is the
    matmul-dtype copy, not qkv's output) and, in an adapted layer, the prefix attention."""
    h, a, kv, d = kernels.attention_dims(arch)
    t = st.tokens
    out = [*cast("attn.qkv"), _v2_sum("attn.qkv", (t, (a + 2 * kv) * d), st)]
    main = [x for x in litgpt.attention_saves(arch, st) if x.name != "attn.proj.input"]
    if st.stream != st.matmul:
        value = kernels.saved(
            "attn.value", (st.batch, a, st.sequence, d), st.matmul, "SdpaBackward", litgpt.SRC_ATTN
        )
        main = [value if x.name == "attn.qkv.output" else x for x in main]
    out += main
    if adapted:
        out += prefix_attention(arch, st, aT, q_grad=True, cast=st.stream != st.matmul)
    return [*out, *cast("attn.proj"), _v2_sum("attn.proj", (t, h), st)]


def _v2_neox_layer(
    arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool
) -> list[Saved]:
    """`_v2_layer` for the parallel-residual Block (Phi's and GPT-NeoX's): the one shared
    LayerNorm (Phi) trains, or both (GPT-NeoX, whose norm_2 adds its own mean and rstd), so
    native_layer_norm records its input, mean and rstd whether or not the input requires grad
    (kernels.layer_norm); qkv, proj, the MLP's fc and proj are AdapterV2Linears (their sums,
    their weights' casts under autocast); the GELU keeps its input, fc's adapted output, in
    the stream dtype; the sum `mlp + attn + x` keeps nothing."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter = st.tokens, arch.intermediate_size
    qkv_out = (a + 2 * kv) * d
    casts = {
        "attn.qkv": (qkv_out, h),
        "attn.proj": (h, a * d),
        "mlp.fc": (inter, h),
        "mlp.proj": (h, inter),
    }

    def cast(name: str) -> list[Saved]:
        return litgpt_lora_adapters.weight_cast(name, casts[name], st, x_grad=True)

    out: list[Saved] = kernels.layer_norm("norm_1", t, h, st.stream, st)
    if not litgpt_configs.shared_norm(arch):
        # GPT-NeoX's own norm_2 (trainable too) over the same block input: its statistics;
        # the input is norm_1's storage.
        norm_2 = kernels.layer_norm("norm_2", t, h, st.stream, st)
        out += [x for x in norm_2 if x.name != "norm_2.input"]
    out += _v2_attention(arch, st, aT, adapted, cast)
    src = SRC_V2_LINEAR
    out += [
        *cast("mlp.fc"),
        _v2_sum("mlp.fc", (t, inter), st),
        kernels.saved("mlp.fc.output", (t, inter), st.stream, "GeluBackward0", src),
        *cast("mlp.proj"),
        _v2_sum("mlp.proj", (t, h), st),
    ]
    return out


def _v2_head(arch: Architecture, st: Setting) -> list[Saved]:
    """adapter_v2's head: ln_f trains (all of litgpt.norm), and every 128-position chunk's
    AdapterV2Linear lm_head keeps its weight's cast (autocast) and its sum [B, chunk, vocab]."""
    h, vocab, b = arch.hidden_size, arch.vocab_size, st.batch
    if arch.model_type in litgpt_configs.NEOX_BLOCK:
        out = kernels.layer_norm("transformer.ln_f", st.tokens, h, st.stream, st)  # Phi's
    else:
        out = litgpt.norm("transformer.ln_f", st.tokens, h, st)
    for i, c in enumerate(litgpt_lora._chunks(st.sequence)):
        out += litgpt_lora_adapters.weight_cast(f"lm_head.{i}", (vocab, h), st, x_grad=True)
        out.append(_v2_sum(f"lm_head.{i}", (b, c, vocab), st))
    return out


def activations(arch: Architecture, st: Setting, ft: FinetuneSpec) -> Activations:
    """litgpt.adapter(_v2).GPT's forward and fit's chunked loss on one device (see the
    comments above), or why not."""
    why = litgpt.unsupported(arch, st) or litgpt_lora.unsupported(st)
    if not why and arch.model_type not in COVERED:
        why = (
            f"LitGPT's {ft.method} is modelled on its Llama-shaped configs, Phi and GPT-NeoX "
            f"(model types {', '.join(sorted(COVERED))})"
        )
    if not why and st.device == "cuda":
        why = cuda_refusal(arch, st)
    if why:
        return litgpt.refused(f"activations not modelled: {why}.")
    v2 = ft.method == "adapter_v2"
    neox = arch.model_type in litgpt_configs.NEOX_BLOCK
    if v2:
        rule = _v2_neox_layer if neox else _v2_layer
    else:
        rule = _v1_neox_layer if neox else _v1_layer
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    blocks = [Block(name="embeddings", count=1, tensors=())]
    g = False  # the frozen embedding's output needs no gradient
    runs: list[tuple[list[Saved], int]] = []
    for i in range(arch.num_layers):
        adapted = i >= ft.adapter_start_layer
        layer = rule(arch, st, ft.adapter_prompt_length, adapted, g)
        g = g or adapted or v2
        if runs and runs[-1][0] == layer:
            runs[-1] = (layer, runs[-1][1] + 1)
        else:
            runs.append((layer, 1))
    for layer, count in runs:
        if st.checkpointing == "full" and layer:
            # LitGPT's checkpoint around every Block (as memplan.model.stacks.litgpt_lora): the
            # block input kept, the layer's tensors recomputed in backward.
            kept = kernels.saved(
                "checkpoint.x", (b, s, h), st.stream, "Noop", litgpt.SRC_CHECKPOINT
            )
            blocks.append(
                Block(
                    name="layers",
                    count=count,
                    tensors=(kept,),
                    recompute=tuple(layer),
                    layered=True,
                )
            )
        elif st.checkpointing == "full":
            # A block that records nothing packs nothing: its checkpoint frame is not kept.
            blocks.append(Block(name="layers", count=count, tensors=(), layered=True))
        else:
            blocks.append(Block(name="layers", count=count, tensors=tuple(layer), layered=True))
    head = _v2_head(arch, st) if v2 else litgpt_lora._head(arch, st, _FROZEN, g)
    blocks.append(Block(name="head", count=1, tensors=tuple(head)))
    blocks.append(Block(name="loss", count=1, tensors=tuple(litgpt_lora.loss(b, s, vocab))))
    src = SRC_ADAPTER_V2 if v2 else SRC_ADAPTER
    notes: tuple[str, ...] = (
        f"{src}: the adapter GPT's forward on CPU after fit's no-grad validation filled the "
        f"prefix caches; prefix attention from layer {ft.adapter_start_layer} "
        f"({ft.adapter_prompt_length} positions), {SRC_FIT_ADAPTER}.",
        "LitGPT's fit loop keeps Fabric's fp32 logits chunks until the next forward returns: "
        "the step holds them in every phase (memplan.step.transients.litgpt_logits).",
    )
    if st.device == "cuda":
        notes += (
            "CUDA: the prefix attention's kernel read from torch's source, not measured "
            "(litgpt_adapter_saved.SRC_SDPA_CUDA): the memory-efficient kernel at micro-batch "
            "1 with the cache at every head, else math; this assumes SDPA's default backend "
            "order, which holds on sm80-sm89 GPUs (A100, A10G, L4, L40S) whatever the cuDNN, "
            "and on H100/H200/B200 only with a runtime cuDNN <= 9.15 or "
            "TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (else cuDNN attention runs, whose saved tensors "
            "are not modelled).",
        )
    return Activations(
        modelled=True,
        blocks=tuple(blocks),
        logits_bytes=t * vocab * dtype_bytes(st.stream if v2 else st.matmul),
        upcast_bytes=(
            t * vocab * dtype_bytes(kernels.FP32)
            if (st.stream if v2 else st.matmul) != kernels.FP32
            else 0
        ),
        hidden_bytes=t * h * dtype_bytes(st.stream),
        loss_gradient_bytes=litgpt_lora.loss_gradient(b, s, vocab),
        notes=notes,
        implementation="litgpt",
    )
