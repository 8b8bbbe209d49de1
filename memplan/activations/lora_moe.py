"""What a sparse MoE block saves when its router and experts are frozen or train (memplan.
model.forward.mlp.sparse_moe's tensors, named `<prefix>.router.*` / `<prefix>.experts.*`),
for memplan.activations.lora_flow's Llama-style layer (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memplan.activations.lora_scope import Scope


@dataclass(frozen=True, slots=True, kw_only=True)
class MoeFlow:
    """A sparse MoE block's part of a layer's Flow (memplan.activations.lora_flow.Flow)."""

    keep: dict[str, bool]
    inputs: dict[str, bool]
    linears: dict[str, tuple[str, ...]]
    out: bool
    """The block's output requires grad."""


def moe_flow(sc: Scope, x_grad: bool, *, shared: bool, prefix: str = "mlp") -> MoeFlow:
    """The block whose input requires grad where `x_grad`. The router is a linear whose input
    is saved when its weight trains; softmax, topk and the renormalisation save theirs when
    the logits require grad. Each grouped_mm saves its input for the experts' gradient and
    is recorded when either requires grad; the routing multiply saves each factor for the
    other's gradient. `shared`: Qwen2-MoE's shared expert (a gated MLP) and its sigmoid gate
    (modeling_qwen2_moe.py::Qwen2MoeSparseMoeBlock.forward), whose readers share the block's
    input storage with the router (memplan.model.families.qwen_moe)."""
    r = sc.out_grad(f"{prefix}.gate", x_grad)  # router logits
    experts = f"{prefix}.experts" in sc.params
    gu = x_grad or experts  # the experts' outputs
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
    router = f"{prefix}.gate"
    inputs = {router: x_grad}
    linears: dict[str, tuple[str, ...]] = {f"{router}.input": (router,)}
    out = gu or r
    if shared:
        se, sgate = f"{prefix}.shared_expert", f"{prefix}.shared_expert_gate"
        g = sc.out_grad(f"{se}.gate_proj", x_grad)
        u = sc.out_grad(f"{se}.up_proj", x_grad)
        down = sc.out_grad(f"{se}.down_proj", g or u)
        gate = sc.out_grad(sgate, x_grad)
        keep[f"{se}.gate_proj.output"] = g
        keep[f"{se}.act_output"] = u
        keep[f"{se}.up_proj.output"] = g
        # sigmoid saves its result for its own gradient, the product for the expert's
        keep[f"{sgate}.sigmoid"] = gate or down
        keep[f"{se}.output"] = gate
        readers = (router, f"{se}.gate_proj", f"{se}.up_proj", sgate)
        for m in readers[1:]:
            inputs[m] = x_grad
        inputs[f"{se}.down_proj"] = g or u
        linears = {f"{m}.input": (m,) for m in (*readers, f"{se}.down_proj")}
        linears[f"{router}.input"] = readers  # one storage when no cast is made
        out = out or down or gate
    return MoeFlow(keep=keep, inputs=inputs, linears=linears, out=out)


def param_wrapped(sc: Scope, prefix: str = "mlp") -> list[str]:
    """The block's modules peft adapts with lora.ParamWrapper (its `target_parameters`: the
    router's weight, the fused 3-D expert weights; memplan.model.finetune.targets), whose
    forward adds B @ A to the weight itself: what that saves is not modelled.

    Measured (tests/activation_probe.py, tiny Mixtral E=4 H=48 I=96, 3 layers, batch 2 x 16,
    peft 0.21.2, torch 2.13 CPU; test_lora_on_moe_saves_the_merged_expert_weight): over the
    same model with q_proj/v_proj adapters only, each layer saves
    - per wrapped expert weight, the merged weight W + s * B @ A at the parameter's full size
      and dtype (peft tuners/lora/layer.py::_LoraFactorsProxy.forward: `baddbmm`; grouped_mm
      keeps it for the input's gradient), plus the grouped_mm's input (routed tokens x in);
    - in 16-bit with fp32 adapters, baddbmm's 16-bit casts of B [E, out, r] and A [E, r, in];
    - for the router, its input [tokens, H] and the merged weight [E, H] (under autocast with
      fp32 weights: the 16-bit casts of x, A and B instead).
    bf16: +175,104 bytes (w2), +331,776 (w1+w3), +10,368 (router); fp32: +294,912, +479,232,
    +20,736. The merged weight scales with E x H x I per layer, not with tokens: a per-layer
    term beside the token terms of memplan.activations.lora_flow, not yet wired there."""
    inside = (f"{prefix}.gate", f"{prefix}.experts")
    return [
        m for m, _ in sc.adapters if m in inside or m.startswith(tuple(f"{i}." for i in inside))
    ]
