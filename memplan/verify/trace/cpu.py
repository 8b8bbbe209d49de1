"""CPU kernels whose saved tensors torch's fake (meta) implementation gets wrong, run as the CPU
kernel allocates them for the trace of a device=cpu profile (memplan.verify.trace.forward).

- The statistics of `native_layer_norm` and `native_group_norm` (mean and rstd, which autograd's
  node saves: derivatives.yaml native_layer_norm / native_group_norm: result1, result2) with
  *mixed* dtypes, a bf16 or fp16 input and fp32 weight or bias: the CPU kernels allocate them
  as fp32 (aten native/layer_norm.cpp::layer_norm_cpu and native/group_norm.cpp::
  native_group_norm, torch 2.13: `param_scalar_type(input, mixed_type)`, which
  native/cpu/mixed_data_type.h gives as Float when `is_mixed_type`: the first defined
  parameter's dtype is not the input's), where the fake kernel gives the input's dtype
  (torch/_refs/__init__.py::native_layer_norm: `if input.device.type in ["cpu", "mtia"]`
  converts them; the group-norm meta function alike). Under CPU autocast a bf16 linear's
  output normalized by fp32 weights is that case: Persimmon's per-head q/k LayerNorms
  (`qk_layernorm`) on the bf16 fused QKV, 2 x [b * s * heads] fp32 per norm, 4,096 B in
  benchmarks/profile_verify.py's persimmon at 2 x 32 tokens (tests/test_profile_verify_types.py
  holds the trace against real CPU tensors).

The CUDA kernels' statistics are fp32 for every reduced input (memplan.verify.trace.cuda).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_REDUCED = (torch.bfloat16, torch.float16)
# (op, positions of its weight and bias arguments)
_NORMS = {
    aten.native_layer_norm.default: (2, 3),  # input, normalized_shape, weight, bias, eps
    aten.native_group_norm.default: (1, 2),  # input, weight, bias, N, C, HxW, group, eps
}


def _first_defined(args: Any, positions: tuple[int, ...]) -> torch.Tensor | None:
    for i in positions:
        arg = args[i] if i < len(args) else None
        if isinstance(arg, torch.Tensor):
            return arg
    return None


class CpuKernels(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The norms' statistics in fp32 when the CPU kernel's `is_mixed_type` holds (the module
    docstring); enter it after the FakeTensorMode, so that it sees the fake kernel's outputs."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        positions = _NORMS.get(func)
        if positions is None:
            return out
        x = args[0]
        param = _first_defined(args, positions)
        if param is None or param.dtype == x.dtype or x.dtype not in _REDUCED:
            return out
        y, mean, rstd = out
        if mean.dtype == torch.float32:
            return out
        return y, mean.to(torch.float32), rstd.to(torch.float32)
