"""CUDA kernels' saved tensors, traced on a CPU build of torch (device=cuda profiles).

A fake CUDA trace is impossible on a CPU-only torch: FakeTensorMode makes fake CUDA tensors and
runs their meta functions, but autograd on them aborts the process ("PyTorch is not linked with
support for cuda devices", AccumulateGrad's device guard). So profiles keyed device=cuda are
traced on fake CPU tensors, with the few ops whose saved tensors differ between the CPU and
the CUDA kernels made to run the CUDA path: the same aten op CUDA dispatches to, called on the
fake tensors, so its meta function gives the shapes and autograd's own node (generated from
tools/autograd/derivatives.yaml) saves what a CUDA run saves. Each difference
memplan.model.forward.kernels and .attention know, and nothing else:

- `dropout` (aten native/Dropout.cpp::dropout, torch 2.13): on CUDA `is_fused_kernel_acceptable`
  holds for 0 < p < 1, so it runs `native_dropout`, whose node keeps the bool mask
  (derivatives.yaml native_dropout: `native_dropout_backward(grad, result1, scale)`); on CPU
  `_dropout_impl` multiplies by a noise tensor in the input's dtype (MulBackward0 keeps it).
  Overridden at aten::dropout's CompositeImplicitAutograd kernel, so the calls from C++ (the math
  SDPA's `at::dropout`) take it too.
- `scaled_dot_product_attention` (aten native/transformers/attention.cpp::
  scaled_dot_product_attention): the backend is chosen by memplan's rule for
  cuda/sdp_utils.cpp::select_sdp_backend (memplan.model.forward.attention.sdpa_kernel, sm80+,
  the default priority order), then the op that backend calls runs:
  `_scaled_dot_product_flash_attention` (its node keeps q, k, v, output, logsumexp and the
  philox state, rng_state and unused: derivatives.yaml),
  `_scaled_dot_product_efficient_attention` (q, k, v, the preprocessed mask, output,
  logsumexp, philox seed and offset) or
  `_scaled_dot_product_attention_math`, as attention.cpp calls them (boolean masks made
  additive by convert_boolean_attn_mask, the efficient kernel's mask by preprocess_mask).
- `native_layer_norm`'s mean and rstd: fp32 on CUDA (cuda/layer_norm_kernel.cu::layer_norm_cuda
  allocates them in `acc_type`), the input's dtype in the fake CPU kernel
  (torch/_refs/__init__.py::native_layer_norm: `if input.device.type in ["cpu", "mtia"]`).

Not emulated, so refused (`Emulation.unsupported`, raised after the trace): `rms_norm`
(torch.nn.RMSNorm, F.rms_norm; not transformers' own RMSNorm classes, which are written out in
Python), whose CUDA path is the fused `_fused_rms_norm` kernel with its own autograd node while
a CPU build decomposes it (aten native/layer_norm.cpp::rms_norm_symint).

Tensors a CUDA run keeps in host memory are listed in `Emulation.host` (the tracer drops them):
the efficient kernel's philox seed and offset (cuda/attention.cu::_efficient_attention_forward:
`device = in_capture_stream ? at::kCUDA : at::kCPU`, outside CUDA-graph capture). The flash
kernel's `rng_state` [2] and `_unused` [] uint64 are CUDA tensors
(cuda/flash_attn/flash_api.cpp::mha_fwd), kept.

Autocast (amp-bf16, amp-fp16): CUDA autocast's op lists (aten/src/ATen/autocast_mode.h:
layer_norm, softmax, pow, ... in fp32) differ from CPU's, and a CPU build cannot switch CUDA
autocast on; memplan.verify.trace.autocast runs CUDA's lists at the AutocastCPU key for the
trace, above these kernels (the SDPA backend is then picked for the cast q, k, v).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import MemplanError
from memplan.model.forward.attention import EFFICIENT_LSE_ALIGN, Heads, sdpa_kernel
from memplan.model.forward.tensors import Setting

aten = torch.ops.aten

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

MEM_EFF_ALIGNMENT = 8
"""attention.cpp::preprocess_mask: `constexpr int mem_eff_alignment = 8` (the efficient
kernel's mask is padded unless its strides are multiples of it)."""
SEQUENCE_MULTIPLE = EFFICIENT_LSE_ALIGN
"""Traced sequences are multiples of 32: the efficient kernel's logsumexp is
[b, a, ceil(s / 32) * 32] (memplan.model.forward.attention.EFFICIENT_LSE_ALIGN, the meta
function's `math.ceil(M / 32) * 32`), linear in s only on those (32 is also a multiple of
MEM_EFF_ALIGNMENT: no traced mask is padded)."""

CUDA_ASSUMPTIONS = (
    "CUDA kernels emulated on a CPU build (memplan.verify.trace.cuda): dropout's fused "
    "native_dropout (bool mask), the SDPA backend memplan's rule picks for an sm80+ GPU "
    "(flash, memory-efficient or math, each run as its aten op), layer_norm statistics in "
    "fp32; every other op saves the same tensors on both devices.",
    "sequence lengths a multiple of 32, as traced: at other lengths the memory-efficient "
    "kernel's logsumexp (padded to a multiple of 32) and its explicit mask (padded to a "
    "multiple of 8, attention.cpp::preprocess_mask) are a little larger than the profile.",
)


def sequence_unit(unit: int) -> int:
    """The traced sequence multiple, rounded up to a multiple of SEQUENCE_MULTIPLE."""
    return -(-unit // SEQUENCE_MULTIPLE) * SEQUENCE_MULTIPLE


@dataclass
class Emulation:
    """What one emulated trace learns besides the saved tensors."""

    stream: str
    host: list[torch.Tensor] = field(default_factory=list)
    """Tensors a CUDA run keeps in host memory, held here so that no later storage takes the
    address (`untyped_storage()._cdata`) the tracer knows them by."""
    kernels: list[str] = field(default_factory=list)
    """The SDPA backend of each call, in order."""
    unsupported: set[str] = field(default_factory=set)
    """Ops the model ran whose CUDA saved tensors are not emulated."""

    def host_storages(self) -> set[int]:
        return {t.untyped_storage()._cdata for t in self.host}

    def check(self) -> None:
        if self.unsupported:
            raise MemplanError(
                f"the model calls {', '.join(sorted(self.unsupported))}, whose CUDA kernel "
                "saves other tensors than the CPU build can trace (torch.nn.RMSNorm runs the "
                "fused _fused_rms_norm kernel on CUDA): a CUDA profile of it is not traced. "
                "hardware.device: cpu traces the CPU profile."
            )


def _dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """aten native/Dropout.cpp::dropout as it runs for a CUDA tensor (torch 2.13)."""
    if train and 0 < p < 1 and x.numel() > 0:  # is_fused_kernel_acceptable
        fused: torch.Tensor = aten.native_dropout(x, p, train)[0]
        return fused
    # _dropout_impl, the same on both devices: the input itself, or times zero for p == 1.
    if p == 0 or not train or x.numel() == 0:
        return x
    return x * torch.zeros((), dtype=x.dtype)


def _rms_norm(
    em: Emulation,
    x: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """aten::rms_norm, noted as not emulated; it runs as on the CPU build (the composite)."""
    em.unsupported.add("rms_norm")
    out: torch.Tensor = aten._fused_rms_norm(x, normalized_shape, weight, eps)[0]
    return out


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """attention.cpp::convert_boolean_attn_mask: a bool mask becomes
    `where(mask, 0, -inf)` in the query's dtype; an additive one passes through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.scalar_tensor(-math.inf, dtype=dtype))


def _preprocess_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """attention.cpp::preprocess_mask: pad the last dim (pad_bias) unless every stride but the
    last is a multiple of MEM_EFF_ALIGNMENT and the last is 1, then expand to [b, a, sq, sk]."""
    a = MEM_EFF_ALIGNMENT
    aligned = all(st % a == 0 for st in mask.stride()[:-1]) and mask.stride(-1) == 1
    if not aligned:
        last = mask.size(-1)
        mask = torch.nn.functional.pad(mask, (0, a - last % a))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def _sdpa(
    em: Emulation,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """attention.cpp::scaled_dot_product_attention, its CUDA branches, the backend as
    memplan.model.forward.attention.sdpa_kernel picks it."""
    if query.dim() != 4 or query.dtype not in NAMES:
        raise MemplanError(
            f"scaled_dot_product_attention on a {query.dim()}-d {query.dtype} query: the CUDA "
            "emulation takes the [batch, heads, sequence, head_dim] fp32/bf16/fp16 inputs "
            "transformers passes."
        )
    b, a, s, d = query.shape
    dtype = NAMES[query.dtype]
    st = Setting(
        batch=b,
        sequence=s,
        stream=em.stream,
        matmul=dtype,
        autocast=False,
        device="cuda",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
    )
    heads = Heads(batch=b, seq=s, heads=a, kv_heads=key.size(1), head_dim=d)
    kernel = sdpa_kernel(
        st,
        heads,
        gqa=enable_gqa,
        mask=attn_mask is not None,
        dropout_on=dropout_p > 0,
        same_head_dims=key.size(-1) == d and value.size(-1) == d,
    )
    em.kernels.append(kernel)
    mask = _additive(attn_mask, query.dtype)
    if kernel == "flash":
        # sdpa_kernel picks flash only for head_dim % 8 == 0: attention.cpp's pad_last_dim<8>
        # and post_process_flash_output are no-ops then.
        flash: torch.Tensor = aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
        return flash
    if kernel == "efficient":
        if mask is not None:
            mask = _preprocess_mask(mask, query, key)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        efficient = aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, grad, dropout_p, is_causal, scale=scale
        )
        em.host += [efficient[2], efficient[3]]  # philox seed and offset
        out: torch.Tensor = efficient[0]
        return out
    math_out: torch.Tensor = aten._scaled_dot_product_attention_math(
        query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
    )[0]
    return math_out


class _LayerNormStats(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """native_layer_norm's mean and rstd in CUDA's accumulate type (at::toAccumulateType(dtype,
    is_cuda=true): fp32 for fp16, bf16 and fp32), as cuda/layer_norm_kernel.cu::layer_norm_cuda
    allocates them; autograd's node saves what this returns (derivatives.yaml
    native_layer_norm: result1, result2)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is aten.native_layer_norm.default:
            y, mean, rstd = out
            acc = torch.float32 if mean.dtype in (torch.float16, torch.bfloat16) else mean.dtype
            if mean.dtype != acc:
                return y, mean.to(acc), rstd.to(acc)
        return out


@contextlib.contextmanager
def cuda_kernels(em: Emulation) -> Iterator[Emulation]:
    """Run the ops above as CUDA does, inside the caller's FakeTensorMode (enter it after the
    mode: the layer-norm dispatch mode must sit above the fake one)."""
    lib = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
    with warnings.catch_warnings():
        # "Overriding a previously registered kernel": the point; undone by _destroy below.
        warnings.simplefilter("ignore", UserWarning)
        for name, kernel in (
            ("dropout", _dropout),
            ("scaled_dot_product_attention", functools.partial(_sdpa, em)),
            ("rms_norm", functools.partial(_rms_norm, em)),
        ):
            lib.impl(name, kernel, "CompositeImplicitAutograd")  # type: ignore[no-untyped-call]
    try:
        with _LayerNormStats():  # type: ignore[no-untyped-call]
            yield em
    finally:
        lib._destroy()  # type: ignore[no-untyped-call]
