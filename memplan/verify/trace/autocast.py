"""torch.autocast emulated on a CPU build: CUDA autocast's op lists run at the AutocastCPU key.

Autocast is a dispatch key above Autograd (aten/src/ATen/autocast_mode.h, the comment before
"Explicit registration for out-of-place ops": "We'd like casts to be autograd-exposed and
precede autograd history recording, so that for lower_precision_fp ops, input tensors are saved
for backward in lower_precision_fp"). Each listed op's kernel there casts its tensor arguments
(`cached_cast`) and calls the op again with every autocast key excluded
(`ExcludeDispatchKeyGuard no_autocast(DispatchKey::AutocastFunctionality)`); every other op
falls through (`TORCH_LIBRARY_IMPL(_, AutocastCPU, m) { m.fallback(makeFallthrough()) }`). A
CPU build registers the CUDA lists too (at the AutocastCUDA key) but no tensor of it reaches
them (`is_autocast_eligible(t, CUDA)` needs `t.is_cuda()`), and fake CUDA tensors cannot run
autograd (memplan.verify.trace.cuda). So a device=cuda profile of an autocast recipe is traced
on the fake CPU tensors under the real `torch.autocast("cpu", dtype)` (its AutocastCPU key,
nesting and dtype), with the AutocastCPU kernels replaced, for as long as the trace runs
(`torch.library.Library("aten", "IMPL")`, undone by `_destroy`, as cuda.py overrides ops):

- every op on CUDA's lists (CUDA_POLICY) gets a Python kernel applying that op's policy as
  autocast_mode.h's `WrapFunction_` specializations do (POLICIES below);
- every op CPU autocast lists but CUDA's do not falls through (torch.library.fallthrough_kernel,
  the CUDA key's own fallback for it).

The casts are made by `Tensor.to` with the autocast key excluded and autograd below it, so
autograd records them (ToCopyBackward0) and the op's node saves the cast copies, as on CUDA.
`cached_cast`'s cache is kept as autocast_mode.cpp keeps it: lower-precision casts of fp32
leaf tensors that require grad and are not views, one copy per source tensor until the
outermost autocast region exits (`clear_cache` at nesting 0): `Region.cache`.

The same mechanism configured with CPU's lists (CPU_POLICY) reproduces torch's real CPU autocast
saved set to the byte (tests/test_autocast_trace.py), which is what proves it. The lists are
torch 2.13.0's: the policy of each entry is cited from autocast_mode.h (AT_FORALL_* lists,
used by AutocastCUDA) and autocast_mode.cpp (`TORCH_LIBRARY_IMPL(aten, AutocastCPU, m)`); the
names equal what the installed torch registers at each key
(`torch._C._dispatch_get_registrations_for_dispatch_key`, checked by the tests).

One CUDA kernel branch under autocast saves the same tensors as the CPU path it replaces and is
not emulated: aten native/SoftMax.cpp::softmax (and log_softmax) with an fp16 input and
dtype=float calls `_softmax(input, dim, half_to_float=true)` on CUDA instead of converting the
input first; both nodes save the fp32 result only (derivatives.yaml `_softmax`: result), so the
saved set is the same (the CPU path's fp32 input copy is a transient, not saved).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from memplan.errors import MemplanError

LOWER = "lower_precision_fp"
"""Cast every floating tensor argument to the autocast dtype (autocast_mode.h
CastPolicy::lower_precision_fp)."""
FP32 = "fp32"
"""Cast every floating tensor argument to fp32 (CastPolicy::fp32)."""
SET_OPT = "fp32_set_opt_dtype"
"""If the first argument is eligible and no dtype is given, run with dtype=float; inputs are not
cast (CastPolicy::fp32_set_opt_dtype, `set_opt_dtype`)."""
APPEND = "fp32_append_dtype"
"""Redispatch to the overload taking a dtype, with float (or the first argument's dtype if it
is not eligible) appended (CastPolicy::fp32_append_dtype, `type_from_firstarg`)."""
PROMOTE = "promote"
"""Cast every eligible argument to the widest of them: fp32 if any is fp32, else the autocast
dtype (CastPolicy::promote, `promote_type` / `prioritize`)."""
BANNED = "banned"
"""autocast_mode.cpp::binary_cross_entropy_banned: raises."""

_CUDA_LOWER = (
    # autocast_mode.h AT_FORALL_LOWER_PRECISION_FP (torch 2.13.0), in its order
    "_convolution.deprecated",
    "_convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "einsum",
    "mm",
    "mv",
    "linalg_vecdot",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
    "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
    # autocast_mode.cpp TORCH_LIBRARY_IMPL(aten, Autocast, m): KERNEL_CUDA(cudnn_convolution,
    # lower_precision_fp), KERNEL_CUDA(cudnn_convolution_transpose, lower_precision_fp)
    "cudnn_convolution",
    "cudnn_convolution_transpose",
)
_CUDA_FP32 = (
    # autocast_mode.h AT_FORALL_FP32 (torch 2.13.0), in its order
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "group_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
_CUDA_SET_OPT = (
    # autocast_mode.h AT_FORALL_FP32_SET_OPT_DTYPE (torch 2.13.0; the Dimname overloads it
    # lists are not registered by the installed build)
    "prod",
    "prod.dim_int",
    "softmax.int",
    "log_softmax.int",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
)
_CUDA_APPEND = {
    # autocast_mode.h AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: registered name -> the
    # overload it redispatches to with a dtype appended (norm.ScalarOpt_dtype and
    # norm.ScalarOpt_dim_dtype, the `Tensor(const Tensor&, ..., ScalarType)` signatures)
    "norm.Scalar": "norm.ScalarOpt_dtype",
    "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
}
_CUDA_PROMOTE = (
    # autocast_mode.h AT_FORALL_PROMOTE (torch 2.13.0)
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "grid_sampler",
    "index_put",
    "tensordot",
    "scatter_add",
)

CUDA_POLICY: dict[str, str] = {
    **dict.fromkeys(_CUDA_LOWER, LOWER),
    **dict.fromkeys(_CUDA_FP32, FP32),
    **dict.fromkeys(_CUDA_SET_OPT, SET_OPT),
    **dict.fromkeys(_CUDA_APPEND, APPEND),
    **dict.fromkeys(_CUDA_PROMOTE, PROMOTE),
    # autocast_mode.cpp: m.impl("aten::binary_cross_entropy", binary_cross_entropy_banned)
    "binary_cross_entropy": BANNED,
}
"""AutocastCUDA's kernels in torch 2.13.0: op overload -> cast policy."""

_CPU_LOWER = (
    # autocast_mode.cpp TORCH_LIBRARY_IMPL(aten, AutocastCPU, m), "lower_precision_fp cast
    # policy" (torch 2.13.0), in its order
    "conv1d",
    "conv1d.padding",
    "conv2d",
    "conv2d.padding",
    "conv3d",
    "conv3d.padding",
    "bmm",
    "mm",
    "linalg_vecdot",
    "baddbmm",
    "addmm",
    "_addmm_activation",
    "addbmm",
    "linear",
    "_convolution.deprecated",
    "matmul",
    "conv_tbc",
    "mkldnn_rnn_layer",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "prelu",
    "scaled_dot_product_attention",
    "_native_multi_head_attention",
)
_CPU_FP32 = (
    # autocast_mode.cpp AutocastCPU, "fp32 cast policy" (torch 2.13.0), in its order
    "avg_pool3d",
    "binary_cross_entropy",
    "grid_sampler",
    "polar",
    "prod",
    "prod.dim_int",
    "quantile",
    "quantile.scalar",
    "nanquantile",
    "nanquantile.scalar",
    "stft",
    "stft.center",
    "cdist",
    "grid_sampler_2d",
    "_grid_sampler_2d_cpu_fallback",
    "grid_sampler_3d",
    "trace",
    "view_as_complex",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "inverse",
    "lu_solve",
    "orgqr",
    "ormqr",
    "pinverse",
    "max_pool3d",
    "max_unpool2d",
    "max_unpool3d",
    "adaptive_avg_pool3d",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "mse_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "cross_entropy_loss",
    "l1_loss",
    "huber_loss",
    "margin_ranking_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "ctc_loss.IntList",
    "ctc_loss.Tensor",
    "kl_div",
    "multilabel_margin_loss",
    "binary_cross_entropy_with_logits",
    "fft_fft",
    "fft_ifft",
    "fft_fft2",
    "fft_ifft2",
    "fft_fftn",
    "fft_ifftn",
    "fft_rfft",
    "fft_irfft",
    "fft_rfft2",
    "fft_irfft2",
    "fft_rfftn",
    "fft_irfftn",
    "fft_hfft",
    "fft_ihfft",
    "linalg_cond",
    "linalg_cond.p_str",
    "linalg_matrix_rank",
    "linalg_matrix_rank.tol_tensor",
    "linalg_matrix_rank.atol_rtol_tensor",
    "linalg_matrix_rank.atol_rtol_float",
    "linalg_solve",
    "linalg_cholesky",
    "linalg_svdvals",
    "linalg_eigvals",
    "linalg_eigvalsh",
    "linalg_inv",
    "linalg_householder_product",
    "linalg_tensorinv",
    "linalg_tensorsolve",
    "fake_quantize_per_tensor_affine",
    "geqrf",
    "_lu_with_info",
    "qr",
    "svd",
    "triangular_solve",
    "fractional_max_pool2d",
    "fractional_max_pool3d",
    "adaptive_max_pool3d",
    "multilabel_margin_loss_forward",
    "linalg_qr",
    "linalg_cholesky_ex",
    "linalg_svd",
    "linalg_eig",
    "linalg_eigh",
    "linalg_lstsq",
    "linalg_inv_ex",
)
_CPU_PROMOTE = (
    # autocast_mode.cpp AutocastCPU, "promote" (torch 2.13.0)
    "stack",
    "cat",
    "index_copy",
)

CPU_POLICY: dict[str, str] = {
    **dict.fromkeys(_CPU_LOWER, LOWER),
    **dict.fromkeys(_CPU_FP32, FP32),
    **dict.fromkeys(_CPU_PROMOTE, PROMOTE),
}
"""AutocastCPU's kernels in torch 2.13.0: op overload -> cast policy."""

POLICIES = {"cpu": CPU_POLICY, "cuda": CUDA_POLICY}

HELD = "autocast_cache:"
"""The tracer's block prefix of the cast cache's copies that no saved tensor holds at the end
of the forward: held by autocast_mode.cpp's `cached_casts` alone, from the op that cast them
until the autocast region exits (after the loss, in transformers' models), then freed. Under
full checkpointing every layer's weight copies are (the layers save nothing but their inputs
in the forward); without it, the copies of the biases (addmm saves neither its `self` nor
`beta`'s operand: derivatives.yaml addmm)."""

DIFFERENCES_NOTE = (
    "CUDA autocast emulated on the CPU build (memplan.verify.trace.autocast): the ops on "
    "AutocastCUDA's lists of torch 2.13.0 (aten/src/ATen/autocast_mode.h AT_FORALL_*: matmuls, "
    "convolutions and SDPA in the autocast dtype; layer_norm, rms_norm, pow, exp, log, rsqrt, "
    "the losses in fp32; softmax, log_softmax, sum, cumsum with dtype=float; addcmul, "
    "index_put, ... promoted) cast as autocast_mode.h's policies do, weights' casts cached "
    "until the forward's autocast region exits."
)


@dataclass
class Region:
    """One traced autocast region: the cast cache and what its kernels did."""

    lists: str
    dtype: torch.dtype
    on_cast: Callable[[torch.Tensor], None] | None = None
    """Called with every cached copy when it is made (the tracer notes where)."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """autocast_mode.cpp `cached_casts`: id of the source tensor -> (source, its cast copy);
    the source is held as the C++ cache's weakref holds its TensorImpl."""
    ops: set[str] = field(default_factory=set)
    """The listed ops the region ran (their autocast kernels)."""

    @contextlib.contextmanager
    def autocast(self, on_cast: Callable[[torch.Tensor], None] | None = None) -> Iterator[Region]:
        """torch.autocast("cpu", dtype): the AutocastCPU key on, and the cast cache cleared
        when the region exits (autocast_mode.cpp: `clear_cache` at nesting 0); `on_cast` is
        called with each cached copy as it is made."""
        self.on_cast = on_cast
        try:
            with torch.autocast("cpu", dtype=self.dtype):
                yield self
        finally:
            if not torch.is_autocast_enabled("cpu"):
                self.cache.clear()

    def eligible(self, t: Any) -> bool:
        """autocast_mode.h::is_eligible: a defined floating tensor of the device, not double
        (the fake CPU tensors stand in for CUDA ones)."""
        return (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.dtype != torch.float64
            and t.device.type == "cpu"
        )

    def cached_cast(self, to: torch.dtype, arg: Any) -> Any:
        """autocast_mode.cpp::cached_cast (tensors, optional tensors and tensor lists)."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.cached_cast(to, a) for a in arg)
        if not self.eligible(arg) or arg.dtype == to:
            return arg
        can_try_cache = (
            to == self.dtype
            and arg.dtype == torch.float32
            and arg.requires_grad
            and arg.is_leaf
            and not arg._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if not can_try_cache:
            return arg.to(to)
        hit = self.cache.get(id(arg))
        if hit is not None and hit[0] is arg:
            return hit[1]
        copy = arg.to(to)
        self.cache[id(arg)] = (arg, copy)
        if self.on_cast is not None:
            self.on_cast(copy)
        return copy

    def promote_type(self, args: Any) -> torch.dtype:
        """autocast_mode.h::promote_type / prioritize over every tensor argument."""
        current = self.dtype
        for arg in args:
            for t in arg if isinstance(arg, (list, tuple)) else (arg,):
                if not self.eligible(t):
                    continue
                if current == torch.float32 or t.dtype == torch.float32:
                    current = torch.float32
                elif not (current == self.dtype and t.dtype == self.dtype):
                    raise MemplanError(
                        f"autocast promote: a {t.dtype} tensor beside the autocast dtype "
                        f"{self.dtype} (autocast_mode.h::prioritize raises 'Unexpected "
                        "floating ScalarType')."
                    )
        return current

    def kernel(self, name: str, policy: str, *args: Any, **kwargs: Any) -> Any:
        """One AutocastCPU kernel: autocast_mode.h WrapFunction_<policy>::call."""
        op = _overload(name)
        self.ops.add(name)
        if policy == BANNED:
            raise RuntimeError(
                "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
                "autocast (autocast_mode.cpp::binary_cross_entropy_banned)."
            )
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            if policy == LOWER:
                to = self.dtype
            elif policy == FP32:
                to = torch.float32
            elif policy == PROMOTE:
                to = self.promote_type((*args, *kwargs.values()))
            elif policy == SET_OPT:
                if args and self.eligible(args[0]):
                    args, kwargs = _set_dtype(op, args, kwargs)
                return op(*args, **kwargs)
            else:  # APPEND
                out_type = torch.float32 if self.eligible(args[0]) else args[0].dtype
                full = _positional(op, args, kwargs)
                return _overload(_CUDA_APPEND[name])(*full, dtype=out_type)
            args = tuple(self.cached_cast(to, a) for a in args)
            kwargs = {k: self.cached_cast(to, v) for k, v in kwargs.items()}
            return op(*args, **kwargs)


_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
"""The key the kernels run at, excluded while the op runs again (the C++ kernels exclude
AutocastFunctionality, every device's autocast key; only the CPU one is ever active here)."""


def _overload(name: str) -> Any:
    """ "linear" -> aten.linear.default, "softmax.int" -> aten.softmax.int."""
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _positional(op: Any, args: Any, kwargs: dict[str, Any]) -> list[Any]:
    """Every positional argument of `op`'s schema, defaults filled in (the C++ wrapper
    redispatches with all of them)."""
    out = []
    for i, arg in enumerate(a for a in op._schema.arguments if not a.kwarg_only):
        if i < len(args):
            out.append(args[i])
        elif arg.name in kwargs:
            out.append(kwargs[arg.name])
        else:
            out.append(arg.default_value)
    return out


def _set_dtype(op: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """autocast_mode.h::set_opt_dtype: the op's `dtype` argument float unless given."""
    schema = list(op._schema.arguments)
    index = next(i for i, a in enumerate(schema) if a.name == "dtype")
    if not schema[index].kwarg_only and index < len(args):
        if args[index] is None:
            args = (*args[:index], torch.float32, *args[index + 1 :])
        return args, kwargs
    if kwargs.get("dtype") is None:
        kwargs = {**kwargs, "dtype": torch.float32}
    return args, kwargs


def registered(key: str) -> set[str]:
    """The aten ops the installed torch registers a kernel for at `key` (AutocastCPU,
    AutocastCUDA), as the table's names: "linear", "softmax.int"."""
    names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
    return {n.removeprefix("aten::") for n in names if n.startswith("aten::")}


@contextlib.contextmanager
def kernels(lists: str, dtype: torch.dtype) -> Iterator[Region]:
    """The AutocastCPU kernels replaced by `lists`' ("cuda" or "cpu") policies while the
    context is open (a checkpointed region's recomputation in the backward re-enters
    torch.autocast and needs them too); `Region.autocast()` is one autocast region."""
    policy = POLICIES[lists]
    reg = Region(lists=lists, dtype=dtype)
    lib = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
    with warnings.catch_warnings():
        # "Overriding a previously registered kernel": the point; undone by _destroy below.
        warnings.simplefilter("ignore", UserWarning)
        for name, how in policy.items():
            kernel = functools.partial(reg.kernel, name, how)
            lib.impl(name, kernel, "AutocastCPU")  # type: ignore[no-untyped-call]
        for name in sorted(registered("AutocastCPU") - set(policy)):
            lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")  # type: ignore[no-untyped-call]
    try:
        yield reg
    finally:
        reg.cache.clear()
        lib._destroy()  # type: ignore[no-untyped-call]
