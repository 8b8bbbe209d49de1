"""What a sparse MoE block saves when its router and experts are frozen or train (memplan.
model.forward.mlp.sparse_moe's tensors, named `<prefix>.router.*` / `<prefix>.experts.*`),
for memplan.activations.lora_flow's Llama-style layer (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memplan.activations.lora_flow import Scope


def moe_keep(sc: Scope, x_grad: bool, prefix: str = "mlp") -> tuple[dict[str, bool], bool]:
    """(keep flags of the block's saved tensors, whether its output requires grad) for a block
    whose input requires grad where `x_grad`."""
    r = sc.out_grad(f"{prefix}.gate", x_grad)  # router logits
    experts = f"{prefix}.experts" in sc.params
    gu = x_grad or experts  # gate_up output
    keep = {
        f"{prefix}.router.softmax": r,
        f"{prefix}.router.topk_indices": r,
        f"{prefix}.router.topk_values": r,
        f"{prefix}.router.topk_sum": r,
        f"{prefix}.experts.token_index": x_grad,
        f"{prefix}.experts.perm": x_grad,
        f"{prefix}.experts.offsets": gu,
        f"{prefix}.experts.input": experts,
        f"{prefix}.experts.gate_up_output": gu,
        f"{prefix}.experts.act_output": gu,
        f"{prefix}.experts.down_input": experts,
        f"{prefix}.experts.routing_weights": gu,
        f"{prefix}.experts.down_output": r,
        f"{prefix}.experts.inverse_perm": gu or r,
    }
    return keep, gu or r


def param_wrapped(sc: Scope, prefix: str = "mlp") -> list[str]:
    """The block's modules peft adapts with lora.ParamWrapper (its `target_parameters`: the
    router's weight, the fused 3-D expert weights; memplan.model.finetune.targets), whose
    forward adds B @ A to the weight itself: what that saves is not modelled."""
    inside = (f"{prefix}.gate", f"{prefix}.experts")
    return [
        m for m, _ in sc.adapters if m in inside or m.startswith(tuple(f"{i}." for i in inside))
    ]
