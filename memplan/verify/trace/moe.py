"""MoE under a fake-tensor trace (memplan.verify.trace.profile): which experts it can trace, and
the routing assumption a profile states."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import MemplanError
from memplan.verify.trace import structure

NOTE = (
    "MoE: experts run transformers' grouped_mm implementation (integrations/moe.py::"
    "grouped_mm_experts_forward, the default where it can dispatch), which sorts the "
    "tokens x top_k (token, expert) pairs by expert and multiplies them in one grouped GEMM: "
    "every saved tensor has tokens x top_k rows whatever the routing, so no routing assumption "
    "enters the sizes (the router's choices in the fake run carry no data)."
)


def check(model: torch.nn.Module, stream: str) -> None:
    """Refuse MoE models whose experts' saved sizes depend on the routing, or that fake
    tensors cannot run."""
    if not structure.experts_interface(model):
        return  # the model's own experts code (structure.OWN_EXPERTS_NOTE)
    impl = getattr(model.config, "_experts_implementation", None)
    if impl != "grouped_mm":
        raise MemplanError(
            f"the experts run transformers' {impl!r} implementation, whose per-expert loop "
            "saves tensors sized by the routing (data-dependent: FakeTensorMode has no data). "
            "Profiles trace the grouped_mm implementation only (sizes independent of routing)."
        )
    if stream != "bf16":
        raise MemplanError(
            f"MoE experts in {stream}: torch's meta kernel for _grouped_mm "
            "(torch/_meta_registrations.py::_meta_grouped_mm_common) accepts bf16 only, while "
            "the CPU kernel also runs fp32, so fake tensors cannot trace this recipe. Profiles "
            "of MoE models are traced in bf16 (precision: bf16)."
        )


def is_moe(cfg: Any) -> bool:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return True
    return False


class CpuGroupedMm(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """`aten._grouped_mm` on fp32 CPU tensors under FakeTensorMode, as the CPU kernel runs it.

    torch 2.13's meta kernel (torch/_meta_registrations.py::_meta_grouped_mm_common) checks the
    CUDA kernel's rule, bf16 inputs only, while the CPU kernel also multiplies fp32 (a real fp32
    step of HunYuan-MoE's grouped_mm experts runs), so an fp32 model whose experts run
    transformers' grouped_mm (integrations/moe.py::_grouped_mm: `input.to(weight.dtype)`) fails
    the fake trace. Off CUDA the meta kernel's output is `torch.empty(out_size, out_dtype or
    mat_a.dtype)` (_create_grouped_mm_output_tensor): one [rows, n] tensor whose shape does not
    depend on the dtype, so the output is the bf16 call's shape in fp32. The bf16 copies made
    for the shape are fake (no memory) and below the modes that record (enter this one after
    them: the innermost mode runs first), and autograd's node saves the fp32 operands as it
    does on real tensors. Enter it after the FakeTensorMode, for device=cpu traces only."""

    OP = torch.ops.aten._grouped_mm.default

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not self.OP or args[0].dtype != torch.float32 or args[0].device.type != "cpu":
            return func(*args, **kwargs)
        out_dtype = kwargs.get("out_dtype") or torch.float32
        reduced = [a.to(torch.bfloat16) for a in args[:2]]
        rest = {k: v for k, v in kwargs.items() if k != "out_dtype"}
        out = func(*reduced, *args[2:], **rest)
        return out.to(out_dtype)
