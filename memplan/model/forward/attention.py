"""The attention core, QK^T -> softmax -> dropout -> .V, as transformers 5.24 and 5.25 run it.

`eager`: the per-family `eager_attention_forward` (two `torch.matmul` around a softmax);
`sdpa`: transformers integrations/sdpa_attention.py::sdpa_attention_forward, which calls
`torch.nn.functional.scaled_dot_product_attention`, whose kernel depends on the device, the
dtype, dropout and the mask (`sdpa_kernel`). Shapes: b batch, s sequence, a query heads,
kv key/value heads, d head_dim. tokens = b x s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memplan.model.forward.kernels import DERIV, FP32, dropout, saved
from memplan.model.forward.tensors import Saved, Setting, promote

SdpaKernel = Literal["flash", "efficient", "math"]

SRC_SDPA_HF = "transformers integrations/sdpa_attention.py::sdpa_attention_forward"
SRC_MATH = "aten native/transformers/attention.cpp::_scaled_dot_product_attention_math"
SRC_FLASH_CPU = "aten native/transformers/attention.cpp::_scaled_dot_product_flash_attention_cpu"
SRC_FLASH_CUDA = "aten native/transformers/cuda/attention.cu::_scaled_dot_product_flash_attention"
SRC_EFFICIENT = "aten native/transformers/cuda/attention.cu::_efficient_attention_forward"
SRC_FLASH_API = "aten native/transformers/cuda/flash_attn/flash_api.cpp::mha_fwd"
SRC_MATMUL = "aten native/LinearAlgebra.cpp::_matmul_impl (torch 2.13)"
SRC_SELECT = "aten native/transformers/sdp_utils_cpp.cpp, cuda/sdp_utils.cpp::select_sdp_backend"

# _efficient_attention_forward sizes logsumexp [b, a, ceil(s / kAlignLSE) * kAlignLSE].
EFFICIENT_LSE_ALIGN = 32
# Flash attention (FlashAttention-2 in aten) takes head dims up to 256, multiples of 8.
FLASH_MAX_HEAD_DIM = 256
FLASH_HEAD_DIM_MULTIPLE = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Heads:
    """The attention's shape for one forward pass."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def groups(self) -> int:
        """Query heads per key/value head (`num_key_value_groups`)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True, slots=True, kw_only=True)
class Core:
    """What the attention core saves, and what the o_proj after it saves."""

    core: tuple[Saved, ...]
    """Saved inside the core (dropped by selective checkpointing, re-created in backward)."""
    inputs: tuple[Saved, ...]
    """q, k, v as they enter the core: what a checkpoint of the core keeps instead."""
    output: tuple[Saved, ...]
    """The o_proj input, when it is not one of the core's own tensors."""
    views: tuple[str, ...] = ()
    """Names of `core` tensors that are views of its inputs q, k, v (no copy): what a
    checkpoint of the core keeps, so its recomputation makes nothing new for them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Qkv:
    """Dtypes of q, k, v entering the core and how they are stored."""

    q: str
    k: str
    v: str
    fused: bool = False
    """True when q, k and v are views of one projection output (GPT-2 `c_attn`)."""
    mask: bool = False
    """True when transformers passes an explicit mask to SDPA (a sliding window is active)."""
    q_contiguous: bool = False
    """True when q is laid out [b, a, s, d] in memory (GPT-NeoX's `cat`), False when it is a
    transposed view of [b, s, a, d] (the projections' layout, kept by RoPE's elementwise ops)."""


def sdpa_kernel(
    st: Setting,
    h: Heads,
    *,
    gqa: bool,
    mask: bool,
    dropout_on: bool,
    same_head_dims: bool = True,
) -> SdpaKernel:
    """The kernel `scaled_dot_product_attention` picks (SRC_SELECT, torch 2.13 defaults).

    CPU: the CPU flash kernel, except with dropout, which it does not implement: then math.
    CUDA: flash for 16-bit inputs with head_dim <= 256 (multiple of 8) and no explicit mask;
    else memory-efficient, which does not take `enable_gqa`; else math. Assumes sm80+ and the
    default priority order (flash, efficient, math). Flash also needs q, k and v of one head
    size (cuda/sdp_utils.cpp::check_head_dim_size_flash: `same_head_dim_size`; DeepSeek's MLA
    has a value head smaller than the query's), `same_head_dims`.
    """
    if st.device == "cpu":
        return "math" if dropout_on else "flash"
    flash_dims = h.head_dim <= FLASH_MAX_HEAD_DIM and h.head_dim % FLASH_HEAD_DIM_MULTIPLE == 0
    if st.matmul in ("bf16", "fp16") and flash_dims and same_head_dims and not mask:
        return "flash"
    return "math" if gqa else "efficient"


def math_dtype(st: Setting) -> str:
    """The math SDPA upcasts 16-bit q, k, v to fp32 unless
    `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)` (default False, a global flag
    for every device): SRC_MATH."""
    return FP32 if st.matmul in ("bf16", "fp16") else st.matmul


def _mm_copy(name: str, shape: tuple[int, ...], st: Setting, by: str, src: str) -> Saved:
    return saved(name, shape, st.matmul, by, src)


def eager(
    st: Setting,
    h: Heads,
    qkv: Qkv,
    *,
    softmax_fp32: bool,
    convert_to_query: bool | None,
    dropout_on: bool,
    source: str,
    mask_added: bool = True,
) -> Core:
    """An `eager_attention_forward` (llama-style: `softmax(..., dtype=float32).to(query.dtype)`;
    gpt2-style: `softmax(...).type(value.dtype)`; bert-style (`convert_to_query` None): no
    conversion). The causal mask (dtype: the stream's) is added to the scores, so the scores
    are promote(matmul, stream); a bidirectional model without padding gets no mask.

    Saved: q and k^T reshaped for the batched matmul (copies: both are transposed views),
    the softmax output, the tensor the second matmul reads (when it is a new tensor),
    dropout's mask, v reshaped (a copy: repeat_kv or a transposed view), and the o_proj input
    (`transpose(1, 2).contiguous()`: a copy).
    """
    b, a, s, d = h.batch, h.heads, h.seq, h.head_dim
    bmm = DERIV + ": bmm (matmul of 4-D tensors)"
    view = bmm_reshape_is_view(h)
    out: list[Saved] = []
    if not (view and qkv.fused):
        # At batch 1 q is saved as a view of itself: a new tensor's bytes, the same as a copy.
        out.append(_mm_copy("attn.query", (b * a, s, d), st, "BmmBackward0", source))
        if view and h.kv_heads == 1 and qkv.k == st.matmul:
            # repeat_kv of one head is an expand; the view keeps the [b, 1, s, d] k (measured).
            out.append(saved("attn.key", (b, 1, s, d), st.matmul, "BmmBackward0", SRC_MATMUL))
        else:
            out.append(_mm_copy("attn.key_t", (b * a, d, s), st, "BmmBackward0", source))
    scores = promote(st.matmul, st.stream) if mask_added else st.matmul
    if softmax_fp32:
        probs = FP32
    else:
        # softmax is on CUDA autocast's fp32 list (autocast_mode.cpp); not on CPU's.
        probs = FP32 if st.autocast and st.device == "cuda" else scores
    out.append(saved("attn.softmax", (b, a, s, s), probs, "SoftmaxBackward0", DERIV))
    x = probs if convert_to_query is None else qkv.q if convert_to_query else qkv.v
    x_new = x != probs
    if dropout_on:
        out.append(dropout("attn.dropout_mask", (b, a, s, s), x, st))
        x_new = True
    if x != st.matmul:
        out.append(_mm_copy("attn.probs_cast", (b * a, s, s), st, "BmmBackward0", bmm))
    elif x_new:
        out.append(saved("attn.probs", (b * a, s, s), x, "BmmBackward0", bmm))
    v_view = _value_view(st, h, qkv, view=view, repeated=False, dtype=st.matmul)
    out.append(v_view or _mm_copy("attn.value", (b * a, s, d), st, "BmmBackward0", source))
    o_in = _mm_copy("o_proj.input", (h.tokens, a * d), st, "MmBackward0", source)
    # matmul's reshape of q (and of k^T) is a view, not a copy, at batch 1 or when q and k are
    # laid out [b, heads, s, d] (`q_contiguous`: GPT-NeoX's and Phi-3's `cat`), unless cast
    # (autocast) or repeated to every head (repeat_kv of grouped k/v heads: a copy).
    folds = view or qkv.q_contiguous
    views = (
        *(("attn.query",) if folds and qkv.q == st.matmul else ()),
        *(("attn.key_t",) if folds and qkv.k == st.matmul and h.kv_heads == a else ()),
    )
    return Core(core=tuple(out), inputs=_inputs(h, qkv, st), output=(o_in,), views=views)


def sdpa(st: Setting, h: Heads, qkv: Qkv, *, dropout_on: bool) -> Core:
    """transformers `sdpa_attention_forward` and the kernel SDPA picks (see `sdpa_kernel`).

    With grouped query heads transformers passes `enable_gqa=True` when there is no mask and
    head_dim <= 256 (`use_gqa_in_sdpa`), else `repeat_kv` copies k and v to every head.
    Under autocast SDPA is on the lower-precision list (CPU and CUDA), so q, k, v not in the
    matmul dtype are cast (copies).
    """
    b, a, s, d = h.batch, h.heads, h.seq, h.head_dim
    gqa = h.groups > 1 and not qkv.mask and d <= FLASH_MAX_HEAD_DIM
    kv_in = h.kv_heads if h.groups == 1 or gqa else a
    # repeat_kv of a single k/v head (multi-query) is `expand` + `reshape` that torch can
    # express as a view (stride 0 over the heads): the kernel saves the [b, 1, s, d] storage,
    # unless autocast casts it first (the cast writes every head: measured).
    k_in = 1 if h.kv_heads == 1 and qkv.k == st.matmul else kv_in
    v_in = 1 if h.kv_heads == 1 and qkv.v == st.matmul else kv_in
    kernel = sdpa_kernel(st, h, gqa=gqa, mask=qkv.mask, dropout_on=dropout_on)
    if kernel == "math":
        return _sdpa_math(st, h, qkv, dropout_on=dropout_on)
    src = SRC_FLASH_CPU if st.device == "cpu" else SRC_FLASH_CUDA
    if kernel == "efficient":
        src = SRC_EFFICIENT
    by = "ScaledDotProductFlashAttentionForCpuBackward0" if st.device == "cpu" else "SdpaBackward"
    out: list[Saved] = []
    if qkv.fused:
        # q, k, v are views of the c_attn output: one storage [tokens, 3 x a x d].
        out.append(_mm_copy("attn.c_attn_output", (h.tokens, 3 * a * d), st, by, src))
    else:
        out.append(saved("attn.query", (b, a, s, d), st.matmul, by, src))
        out.append(saved("attn.key", (b, k_in, s, d), st.matmul, by, src))
        out.append(saved("attn.value", (b, v_in, s, d), st.matmul, by, src))
    if qkv.mask:
        # The additive sliding-window mask, in the matmul dtype (autocast casts it too); the
        # kernel keeps a copy per layer (measured on CPU).
        out.append(saved("attn.mask", (b, 1, s, s), st.matmul, by, SRC_SDPA_HF))
    lse_len = s
    if kernel == "efficient":
        lse_len = -(-s // EFFICIENT_LSE_ALIGN) * EFFICIENT_LSE_ALIGN
    out.append(saved("attn.logsumexp", (b, a, lse_len), FP32, by, src))
    if kernel == "flash" and st.device == "cuda":
        # The philox state the backward replays dropout from, made on the GPU whether or not
        # dropout is on: `rng_state` [2] and `_unused` [] uint64 (SRC_FLASH_API; the node
        # keeps both: derivatives.yaml _scaled_dot_product_flash_attention, rng_state and
        # unused). The efficient kernel's seed and offset are host tensors (SRC_EFFICIENT).
        out.append(saved("attn.rng_state", (2,), "uint64", by, SRC_FLASH_API))
        out.append(saved("attn.unused", (), "uint64", by, SRC_FLASH_API))
    output = saved("attn.output", (b, a, s, d), st.matmul, by, src)
    if kernel == "flash" and qkv.q_contiguous:
        # The flash kernels lay their output out like q (CPU: measured; CUDA: SRC_FLASH_API
        # `out = at::empty_like(q_padded)`, torch/_meta_registrations.py::
        # meta__scaled_dot_product_flash_attention `empty_like(query)`): a contiguous
        # [b, a, s, d] q gives a [b, a, s, d] output, so transformers'
        # transpose(1, 2).contiguous() copies it for o_proj.
        o_in = _mm_copy("o_proj.input", (h.tokens, a * d), st, "MmBackward0", SRC_SDPA_HF)
        return Core(core=(*out, output), inputs=_inputs(h, qkv, st), output=(o_in,))
    # The output is [b, s, a, d] in memory (the efficient kernel always allocates that layout,
    # the flash kernels follow q's, a transposed view of the projections), so transformers'
    # transpose(1, 2).contiguous() is a no-op and o_proj saves this storage.
    return Core(core=tuple(out), inputs=_inputs(h, qkv, st), output=(output,))


def _sdpa_math(st: Setting, h: Heads, qkv: Qkv, *, dropout_on: bool) -> Core:
    """`_scaled_dot_product_attention_math` (SRC_MATH): q and k scaled by sqrt(scale) (new
    tensors, in `math_dtype`), k repeated to every head for enable_gqa, `matmul`, `_safe_softmax`,
    `dropout` (a mask as in kernels.dropout), `matmul` with v (repeated, upcast). The fp32 result
    is cast back (a copy) and transformers' transpose(1, 2).contiguous() copies it again for
    o_proj."""
    b, a, s, d = h.batch, h.heads, h.seq, h.head_dim
    up = math_dtype(st)
    by = "BmmBackward0"
    out: list[Saved] = [
        saved("attn.query_scaled", (b * a, s, d), up, by, SRC_MATH),
        saved("attn.key_scaled_t", (b * a, d, s), up, by, SRC_MATH),
        saved("attn.softmax", (b, a, s, s), up, "SafeSoftmaxBackward0", SRC_MATH),
    ]
    if dropout_on:
        out.append(dropout("attn.dropout_mask", (b, a, s, s), up, st))
        out.append(saved("attn.probs_dropped", (b * a, s, s), up, by, SRC_MATH))
    # enable_gqa (no mask, grouped heads): the math kernel repeat_interleaves k and v (copies).
    repeated = h.groups > 1 and not qkv.mask and d <= FLASH_MAX_HEAD_DIM
    v_view = _value_view(st, h, qkv, view=bmm_reshape_is_view(h), repeated=repeated, dtype=up)
    out.append(v_view or saved("attn.value_bmm", (b * a, s, d), up, by, SRC_MATH))
    o_in = _mm_copy("o_proj.input", (h.tokens, a * d), st, "MmBackward0", SRC_SDPA_HF)
    return Core(core=tuple(out), inputs=_inputs(h, qkv, st), output=(o_in,))


SRC_RECOMPUTE = (
    "torch/utils/checkpoint.py::_recomputation_hook (torch 2.13): a non-reentrant checkpoint's "
    "recomputation saves what the core's ops save; its inputs are the ones kept since the forward"
)


def recomputed(core: Core) -> tuple[Saved, ...]:
    """What a checkpoint of the core (selective recomputation) re-creates in backward: the
    core's saved tensors, less those that are its inputs q, k, v themselves (SDPA's fused
    kernels save q, k, v as they get them, eager's matmul views of them: `Core.views`; the
    checkpoint keeps those from the forward), plus
    the kernel's output, which the fused kernels save for their backward and the recomputation
    makes again (the checkpoint's own output is what o_proj keeps). SRC_RECOMPUTE; measured on
    CPU tensors for every ruled family by benchmarks/selective_trace.py."""
    kept = {(t.name, t.shape, t.dtype) for t in core.inputs}
    made = tuple(
        t for t in core.core if (t.name, t.shape, t.dtype) not in kept and t.name not in core.views
    )
    # The fused kernels' output ("attn.output", `sdpa`) when o_proj reads it as it is.
    return (*made, *(t for t in core.output if t.name == "attn.output"))


def bmm_reshape_is_view(h: Heads) -> bool:
    """Does `torch.matmul` of 4-D tensors save a view of its [b, n, s, d] operand?

    matmul folds the batch dims, `expand(...).reshape({b * n, s, d})` (SRC_MATMUL), and reshape
    is a view when the strides allow it (TensorShape.cpp::computeStride, which skips size-1
    dims): at batch 1 always, whatever the operand's layout (a transposed view of a projection,
    an expand of one k/v head). At batch >= 2 the [b, s, n, d]-laid-out q, k, v need a copy.
    Measured: GPT-2, GPT-NeoX, Falcon at batch 1 and 2 (tests/test_activations_batch1.py).
    """
    return h.batch == 1


def _value_view(
    st: Setting, h: Heads, qkv: Qkv, *, view: bool, repeated: bool, dtype: str
) -> Saved | None:
    """The value the second matmul saves when it is v itself (a view, see
    `bmm_reshape_is_view`): v not cast (`dtype` the matmul's operand dtype), not repeated by a
    copy (repeat_kv of k/v heads other than one; the math kernel's enable_gqa). A fused
    projection's view keeps the whole output: GPT-2's c_attn here, the other families' fused
    outputs by their `attn.value` widening (gpt_neox.py, phi3.py). None: a copy."""
    if not view or repeated or qkv.v != dtype or h.kv_heads not in (1, h.heads):
        return None
    if qkv.fused:
        return saved(
            "attn.c_attn_output",
            (h.tokens, 3 * h.heads * h.head_dim),
            dtype,
            "BmmBackward0",
            SRC_MATMUL,
        )
    shape = (h.batch, h.kv_heads, h.seq, h.head_dim)
    return saved("attn.value", shape, dtype, "BmmBackward0", SRC_MATMUL)


def _inputs(h: Heads, qkv: Qkv, st: Setting) -> tuple[Saved, ...]:
    """q, k, v as a checkpoint around the core would keep them (selective checkpointing)."""
    b, s, d = h.batch, h.seq, h.head_dim
    src = "torch/utils/checkpoint.py::_NoopSaveInputs (inputs of the checkpointed core)"
    if qkv.fused:
        return (saved("attn.c_attn_output", (h.tokens, 3 * h.heads * d), qkv.q, "Noop", src),)
    return (
        saved("attn.query", (b, h.heads, s, d), qkv.q, "Noop", src),
        saved("attn.key", (b, h.kv_heads, s, d), qkv.k, "Noop", src),
        saved("attn.value", (b, h.kv_heads, s, d), qkv.v, "Noop", src),
    )


def core(
    st: Setting,
    h: Heads,
    qkv: Qkv,
    *,
    dropout_on: bool,
    source: str,
    softmax_fp32: bool = True,
    convert_to_query: bool | None = True,
    mask_added: bool = True,
) -> Core:
    """The attention core transformers runs for `st.attention`: the family's
    `eager_attention_forward` (its flags as in `eager`) or SDPA."""
    if st.attention == "eager":
        return eager(
            st,
            h,
            qkv,
            softmax_fp32=softmax_fp32,
            convert_to_query=convert_to_query,
            dropout_on=dropout_on,
            source=source,
            mask_added=mask_added,
        )
    return sdpa(st, h, qkv, dropout_on=dropout_on)


def value_is_projection_view(core: Core, h: Heads, width: int, dtype: str) -> Core:
    """v is a slice of the fused projection's output [tokens, width]: whoever keeps v itself
    unrepeated (a fused SDPA kernel; a checkpoint of the core; a matmul at batch 1,
    attention.bmm_reshape_is_view) keeps that whole storage.
    (gpt_neox.py's rule, for any fused width and grouped k/v heads.)"""
    unrepeated = (h.batch, h.kv_heads, h.seq, h.head_dim)

    def widen(kept: tuple[Saved, ...]) -> tuple[Saved, ...]:
        return tuple(
            saved("qkv_proj.output", (h.tokens, width), s.dtype, s.saved_by, s.source)
            if s.name == "attn.value" and s.dtype == dtype and s.shape == unrepeated
            else s
            for s in kept
        )

    return Core(
        core=widen(core.core), inputs=widen(core.inputs), output=core.output, views=core.views
    )
