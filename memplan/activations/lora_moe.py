"""What a sparse MoE block saves when its router and experts are frozen, train, or carry LoRA
(memplan.model.forward.mlp.sparse_moe's tensors, named `<prefix>.router.*` /
`<prefix>.experts.*`), for memplan.activations.lora_flow's Llama-style layer (Mixtral,
Qwen2-MoE, Qwen3-MoE).

LoRA on the router's weight or the fused 3-D experts is peft's lora.ParamWrapper (its
`target_parameters`; peft converts the v4 names gate / w1 / w3 / w2 into them), which adds the
adapter's product into the parameter for the wrapped module's forward (peft 0.21.2
tuners/lora/layer.py::ParamWrapper._activate_lora: a torch parametrization, computed once per
forward under `parametrize.cached()`). The module then runs on that merged weight, which
requires grad: its op saves the input for the weight's gradient and the merged weight (a new
tensor, per layer, the parameter's size) for the input's (`wrapped_saved`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from memplan.activations.lora_scope import Adapter, Wrapped
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting

if TYPE_CHECKING:
    from memplan.activations.lora_flow import Flow
    from memplan.activations.lora_scope import Scope
    from memplan.model.inventory import Architecture

PEFT_LAYER = "peft 0.21.2 tuners/lora/layer.py"
SRC_FACTORS = f"{PEFT_LAYER}::_LoraFactorsProxy.forward, ParamWrapper.get_delta_factors"
SRC_DELTA = f"{PEFT_LAYER}::_LoraParameterProxy.forward, Linear.get_delta_weight"
SRC_GROUPED = "transformers integrations/moe.py::grouped_mm_experts_forward"
SRC_ROUTER = "transformers models/mixtral/modeling_mixtral.py::MixtralTopKRouter.forward"
SRC_LINEAR = "torch nn/modules/linear.py::Linear.forward"
SIXTEEN_BIT = ("bf16", "fp16")


@dataclass(frozen=True, slots=True, kw_only=True)
class MoeFlow:
    """A sparse MoE block's part of a layer's Flow (memplan.activations.lora_flow.Flow)."""

    keep: dict[str, bool]
    inputs: dict[str, bool]
    linears: dict[str, tuple[str, ...]]
    out: bool
    """The block's output requires grad."""
    four_bit_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The shared expert's saved tensors made from its Linears' outputs -> those Linears
    (memplan.activations.lora_flow.Flow.four_bit_outputs): under QLoRA each is bitsandbytes'
    Linear4bit, which hands its output back in its input's dtype."""


def moe_flow(sc: Scope, x_grad: bool, *, shared: bool, prefix: str = "mlp") -> MoeFlow:
    """The block whose input requires grad where `x_grad`. The router is a linear whose input
    is saved when its weight trains; softmax, topk and the renormalisation save theirs when
    the logits require grad. Each grouped_mm saves its input for the experts' gradient and
    is recorded when either requires grad; the routing multiply saves each factor for the
    other's gradient. A fused weight requires grad where the experts train or a
    lora.ParamWrapper merges an adapter into it (sc.wrapped; `wrapped_saved` adds the
    merged weights and casts). `shared`: Qwen2-MoE's shared expert (a gated MLP) and its
    sigmoid gate (modeling_qwen2_moe.py::Qwen2MoeSparseMoeBlock.forward), whose readers share
    the block's input storage with the router (memplan.model.families.qwen_moe)."""
    r = sc.out_grad(f"{prefix}.gate", x_grad)  # router logits
    wrapped = {name for name, _ in sc.wrapped}
    experts = f"{prefix}.experts" in sc.params
    # which fused weight requires grad: the whole module trains, or a ParamWrapper's merge
    up_w = experts or f"{prefix}.experts.gate_up_proj" in wrapped
    down_w = experts or f"{prefix}.experts.down_proj" in wrapped
    gu = x_grad or up_w  # the gate_up grouped_mm's output
    down = gu or down_w  # the down grouped_mm's output
    keep = {
        f"{prefix}.router.softmax": r,
        f"{prefix}.router.topk_indices": r,
        f"{prefix}.router.topk_values": r,
        f"{prefix}.router.topk_sum": r,
        # `hidden_states[perm // top_k]` keeps its index for x's gradient, `sample_weights
        # [perm]` keeps perm for the routing weights' (SRC_GROUPED)
        f"{prefix}.experts.token_index": x_grad,
        f"{prefix}.experts.perm": r,
        f"{prefix}.experts.offsets": down,
        f"{prefix}.experts.input": up_w,
        f"{prefix}.experts.gate_up_output": gu,
        f"{prefix}.experts.act_output": gu,
        f"{prefix}.experts.down_input": down_w,
        f"{prefix}.experts.routing_weights": down,
        f"{prefix}.experts.down_output": r,
        f"{prefix}.experts.inverse_perm": down or r,
    }
    router = f"{prefix}.gate"
    # whether each wrapped parameter's op has an input requiring grad (wrapped_saved)
    inputs = {router: x_grad, f"{prefix}.experts.gate_up_proj": x_grad}
    inputs[f"{prefix}.experts.down_proj"] = gu
    linears: dict[str, tuple[str, ...]] = {f"{router}.input": (router,)}
    out = down or r
    if shared:
        se, sgate = f"{prefix}.shared_expert", f"{prefix}.shared_expert_gate"
        g = sc.out_grad(f"{se}.gate_proj", x_grad)
        u = sc.out_grad(f"{se}.up_proj", x_grad)
        se_down = sc.out_grad(f"{se}.down_proj", g or u)
        gate = sc.out_grad(sgate, x_grad)
        keep[f"{se}.gate_proj.output"] = g
        keep[f"{se}.act_output"] = u
        keep[f"{se}.up_proj.output"] = g
        # sigmoid saves its result for its own gradient, the product for the expert's
        keep[f"{sgate}.sigmoid"] = gate or se_down
        keep[f"{se}.output"] = gate
        readers = (router, f"{se}.gate_proj", f"{se}.up_proj", sgate)
        for m in readers[1:]:
            inputs[m] = x_grad
        inputs[f"{se}.down_proj"] = g or u
        linears = {f"{m}.input": (m,) for m in (*readers, f"{se}.down_proj")}
        linears[f"{router}.input"] = readers  # one storage when no cast is made
        out = out or se_down or gate
        # made from a Linear's output with no matmul between: in its dtype, the stream's
        # where the Linear is 4-bit (bitsandbytes 0.50.2 nn/modules.py::Linear4bit.forward,
        # `.to(inp_dtype)`), not autocast's (measured: qwen2_moe_qlora, -41,664 B before)
        by_gate: tuple[str, ...] = (f"{se}.gate_proj",)
        outputs = {f"{se}.gate_proj.output": by_gate, f"{se}.act_output": by_gate}
        outputs[f"{se}.up_proj.output"] = (f"{se}.up_proj",)
        outputs[f"{sgate}.sigmoid"] = (sgate,)
        outputs[f"{se}.output"] = (f"{se}.down_proj",)
        return MoeFlow(keep=keep, inputs=inputs, linears=linears, out=out, four_bit_outputs=outputs)
    return MoeFlow(keep=keep, inputs=inputs, linears=linears, out=out)


def unwrap(sc: Scope, arch: Architecture, prefix: str = "mlp") -> Scope:
    """`sc` with the adapters of peft's lora.ParamWrappers moved from `adapters` to `wrapped`:
    the router's (`<prefix>.gate`, a [E, H] weight: its weight now trains, as far as what the
    layer saves goes) and the fused experts' (`<prefix>.experts`, and `<prefix>.experts.
    base_layer` where both are wrapped: memplan.model.finetune.targets.param_lora_tensors),
    each told apart by its features: gate_up_proj [E, 2 x inter, H], down_proj [E, H, inter]."""
    router, experts = f"{prefix}.gate", f"{prefix}.experts"
    num = arch.num_experts
    inter = int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))
    gate_up = (arch.hidden_size, 2 * inter)  # (in, out)
    kept: list[tuple[str, Adapter]] = []
    wrapped: list[tuple[str, Wrapped]] = []
    for module, ad in sc.adapters:
        if module == router:
            shape: tuple[int, ...] = (ad.out_features, ad.in_features)
            wrapped.append((f"{router}.weight", Wrapped(shape=shape, rank=ad.rank, dtype=ad.dtype)))
        elif module in (experts, f"{experts}.base_layer") and num:
            param = "gate_up_proj" if (ad.in_features, ad.out_features) == gate_up else "down_proj"
            shape = (num, ad.out_features, ad.in_features)
            w = Wrapped(shape=shape, rank=ad.rank // num, dtype=ad.dtype)
            wrapped.append((f"{experts}.{param}", w))
        else:
            kept.append((module, ad))
    if not wrapped:
        return sc
    routed = any(n == f"{router}.weight" for n, _ in wrapped)
    trains = frozenset({router}) if routed else frozenset()
    return replace(
        sc,
        adapters=tuple(kept),
        wrapped=sc.wrapped + tuple(wrapped),
        weights=sc.weights | trains,
        params=sc.params | trains,
    )


def wrapped_saved(flow: Flow, sc: Scope, st: Setting) -> list[Saved]:
    """What each lora.ParamWrapper of the layer saves beyond the module it wraps (which
    memplan.model.forward.mlp.sparse_moe and `moe_flow` keep: the router's input, each
    grouped_mm's input, once its weight trains).

    Fused experts, [E, out, in] (`_LoraFactorsProxy`: `baddbmm(W, lhs, rhs, alpha=scaling)`
    with autocast off, lhs = B as [E, out, r], rhs = A as [E, r, in], both `.to(W.dtype)`):
    where the adapters are in another dtype than W, baddbmm saves those two casts (each for
    the other's gradient; the adapters themselves are parameters); the grouped_mm keeps the
    merged weight [E, out, in] in W's dtype for its input's gradient (SRC_GROUPED's
    `_grouped_mm(input, weight.transpose(-2, -1))`), where that input requires grad.

    Router [E, H], or a decoder layer's Linear weight [out, in] (`scopes` puts it in
    sc.wrapped and its module in sc.weights, so the layer's rule keeps the Linear's input;
    measured: benchmarks/lora_param_wrapper.py), one expert each
    (`_LoraParameterProxy`, `W + delta`, delta = `(B @ A) *
    scaling` cast to W's dtype): the mm saves A and B where a cast was made — on the CPU
    16-bit adapters are made fp32 first (Linear.get_delta_weight's cast_to_fp32), under
    autocast the mm casts them to its dtype; F.linear keeps the merged weight for its input's
    gradient: the weight itself where no autocast cast is made (else the family's
    `mlp.gate.weight_cast`, its cast, kept by memplan.activations.lora_flow)."""
    out: list[Saved] = []
    mm = "MmBackward0"
    for param, w in sc.wrapped:
        module = param.removesuffix(".weight")
        x_grad = flow.inputs.get(module, True)
        if len(w.shape) == 3:
            num, d_out, d_in = w.shape
            if w.dtype != st.stream:
                bmm = "BaddbmmBackward0"
                b_shape, a_shape = (num, d_out, w.rank), (num, w.rank, d_in)
                out += [
                    kernels.saved(f"{param}.lora_B.cast", b_shape, st.stream, bmm, SRC_FACTORS),
                    kernels.saved(f"{param}.lora_A.cast", a_shape, st.stream, bmm, SRC_FACTORS),
                ]
            if x_grad:
                by = "GroupedMmBackward0"
                out.append(kernels.saved(f"{param}.merged", w.shape, st.stream, by, SRC_GROUPED))
            continue
        d_out, d_in = w.shape
        first = kernels.FP32 if st.device == "cpu" and w.dtype in SIXTEEN_BIT else w.dtype
        last = st.matmul if st.autocast else first
        if first != w.dtype or last != first:
            out.append(kernels.saved(f"{param}.lora_B.cast", (d_out, w.rank), last, mm, SRC_DELTA))
            out.append(kernels.saved(f"{param}.lora_A.cast", (w.rank, d_in), last, mm, SRC_DELTA))
        if x_grad and not (st.autocast and st.stream != st.matmul):
            src = SRC_ROUTER if module.endswith(".gate") else SRC_LINEAR
            out.append(kernels.saved(f"{param}.merged", w.shape, st.stream, mm, src))
    return out
