"""MoE under a fake-tensor trace (memplan.verify.trace.profile): which experts it can trace, and
the routing assumption a profile states."""

from __future__ import annotations

from typing import Any

import torch

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
