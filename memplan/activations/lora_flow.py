"""What each layer saves when only part of it trains: the dataflow of a Llama-, GPT-2- or
Phi-3-style layer with frozen and adapted modules (who trains what: memplan.activations.
lora_scope), and what each LoRA adapter saves (peft 0.21.2 tuners/lora/layer.py::
Linear.forward and Embedding.forward). memplan.activations.lora applies it to a family's full
fine-tuning prediction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from memplan.activations.lora_scope import Adapter, Scope
from memplan.model.families.record import ModelEnds
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting

if TYPE_CHECKING:
    from memplan.activations.lora_moe import MoeFlow

MoeBlock = Callable[[Scope, bool], "MoeFlow"]
"""A sparse MoE block's part of a layer's flow (memplan.activations.lora_moe.moe_flow)."""

SRC_LORA = "peft 0.21.2 tuners/lora/layer.py::Linear.forward"
SRC_LORA_EMBEDDING = "peft 0.21.2 tuners/lora/layer.py::Embedding.forward"
SRC_CAST = "aten/src/ATen/autocast_mode.h::cached_cast"
# --- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """One layer's (or the model ends') saved tensors under frozen weights: `keep[name]` says
    whether the node that saves `name` still saves it; `inputs[module]` whether a linear's
    input requires grad; `linears[name]` the linears that read the saved input `name`."""

    keep: dict[str, bool]
    inputs: dict[str, bool]
    linears: dict[str, tuple[str, ...]]
    core: bool = False
    """The attention core is recorded (some of q, k, v requires grad)."""
    rope: bool = False
    """RoPE is recorded (q or k requires grad before it): it saves the shared cos/sin."""
    out: bool = False
    """The layer's output requires grad."""
    four_bit_views: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """Storage kept whole for a view the core saves (Phi-3's v of qkv_proj's output) -> (the
    linear, a tensor of the view's shape, the view's name): a 4-bit linear's output is not
    16-bit, so under autocast the core saves its own cast of the view (lora.four_bit)."""
    four_bit_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Saved tensors made from a linear's output before the next matmul -> the linears that
    make them: where all are bitsandbytes 4-bit (their input's dtype handed back), the tensor
    stays in the stream's dtype under autocast (memplan.activations.lora.four_bit)."""


def _norm(prefix: str, x_grad: bool, weight: bool) -> dict[str, bool]:
    """An RMSNorm's saved tensors: x in fp32, rstd (and Gemma's `1 + w`, saved for y's
    gradient) when its input requires grad; y for the weight's gradient when the weight trains
    (kernels.rms_norm, kernels.gemma_rms_norm)."""
    return {
        f"{prefix}.input_fp32": x_grad,
        f"{prefix}.rstd": x_grad,
        f"{prefix}.one_plus_weight": x_grad,
        f"{prefix}.normalized": weight,
    }


def _llama_flow(
    sc: Scope,
    g_in: bool,
    st: Setting,
    relu: bool,
    sandwich: bool = False,
    moe: MoeBlock | None = None,
) -> Flow:
    """LlamaDecoderLayer (transformers models/llama/modeling_llama.py) and its copies: RMSNorm
    (`weight * y`: y saved for the weight's gradient only), q/k/v/o, RoPE, attention, the
    gated MLP `down(act(gate(x)) * up(x))`. Gemma's layers (models/gemma*/modeling_gemma*.py)
    have the same dataflow with GemmaRMSNorm (`y * (1 + w)`); `sandwich`: Gemma 2 / 3's
    post_attention_layernorm normalises the attention's output before the residual and
    pre_/post_feedforward_layernorm wrap the MLP (Gemma2DecoderLayer.forward)."""
    t = sc.weights.__contains__
    n1 = g_in or "input_layernorm" in sc.params
    q0 = sc.out_grad("self_attn.q_proj", n1)
    k0 = sc.out_grad("self_attn.k_proj", n1)
    v = sc.out_grad("self_attn.v_proj", n1)
    q = q0 or "self_attn.q_norm" in sc.params
    k = k0 or "self_attn.k_norm" in sc.params
    core = q or k or v
    o = sc.out_grad("self_attn.o_proj", core)
    keep: dict[str, bool] = {}
    if sandwich:
        h1 = g_in or o or "post_attention_layernorm" in sc.params
        n2 = h1 or "pre_feedforward_layernorm" in sc.params
        keep.update(_norm("post_attention_layernorm", o, t("post_attention_layernorm")))
        keep.update(_norm("pre_feedforward_layernorm", h1, t("pre_feedforward_layernorm")))
    else:
        h1 = g_in or o
        n2 = h1 or "post_attention_layernorm" in sc.params
        keep.update(_norm("post_attention_layernorm", h1, t("post_attention_layernorm")))
    gate = sc.out_grad("mlp.gate_proj", n2)
    up = sc.out_grad("mlp.up_proj", n2)
    prod = gate or up
    down = sc.out_grad("mlp.down_proj", prod)
    block = moe(sc, n2) if moe else None
    if block:
        keep.update(block.keep)
        down = block.out
    out = h1 or down
    if sandwich:
        keep.update(_norm("post_feedforward_layernorm", down, t("post_feedforward_layernorm")))
        out = out or "post_feedforward_layernorm" in sc.params
    keep.update(_norm("input_layernorm", g_in, t("input_layernorm")))
    keep.update(_norm("self_attn.q_norm", q0, t("self_attn.q_norm")))
    keep.update(_norm("self_attn.k_norm", k0, t("self_attn.k_norm")))
    # silu and gelu save their input (gate's output) when gate requires grad; the product
    # saves each factor for the other's gradient (relu saves its output, the same storage).
    keep["mlp.gate_proj.output"] = gate
    keep["mlp.act_output"] = up or (relu and gate)
    keep["mlp.up_proj.output"] = gate
    keep.update(_core(st, q=q, k=k, v=v))
    # The core's output is o_proj's input when no copy is made: an adapter reads it too.
    keep["attn.output"] = core or sc.reads_x("self_attn.o_proj", st)
    inputs = {
        "self_attn.q_proj": n1,
        "self_attn.k_proj": n1,
        "self_attn.v_proj": n1,
        "self_attn.o_proj": core,
        "mlp.gate_proj": n2,
        "mlp.up_proj": n2,
        "mlp.down_proj": prod,
        **(block.inputs if block else {}),
    }
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    linears = {
        # under autocast each linear saves its own cast of the input, named after it
        **{f"{m}.input": (m,) for m in inputs},
        # otherwise one storage, named after the first linear reading it
        "self_attn.q_proj.input": qkv,
        "o_proj.input": ("self_attn.o_proj",),
        "mlp.gate_proj.input": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj.input": ("mlp.down_proj",),
        **(block.linears if block else {}),
    }
    by_gate: tuple[str, ...] = ("mlp.gate_proj",)
    outputs = {"mlp.gate_proj.output": by_gate, "mlp.act_output": by_gate}
    outputs["mlp.up_proj.output"] = ("mlp.up_proj",)
    outputs.update(block.four_bit_outputs if block else {})
    return Flow(
        keep=keep,
        inputs=inputs,
        linears=linears,
        core=core,
        rope=q or k,
        out=out,
        four_bit_outputs=outputs,
    )


def _gpt2_flow(sc: Scope, g_in: bool, st: Setting) -> Flow:
    """GPT2Block (transformers models/gpt2/modeling_gpt2.py): LayerNorm saves input, mean and
    rstd whenever recorded (derivatives.yaml native_layer_norm: one formula for all
    inputs); Conv1D is addmm (input saved for the weight's gradient); dropout keeps its mask
    when its input requires grad."""
    ln1 = g_in or "ln_1" in sc.params
    qkv = sc.out_grad("attn.c_attn", ln1)
    co = sc.out_grad("attn.c_proj", qkv)
    h1 = g_in or co
    ln2 = h1 or "ln_2" in sc.params
    fc = sc.out_grad("mlp.c_fc", ln2)
    mp = sc.out_grad("mlp.c_proj", fc)
    keep = {
        "ln_1.input": ln1,
        "ln_1.mean": ln1,
        "ln_1.rstd": ln1,
        "attn.resid_dropout.mask": co,
        "ln_2.input": ln2,
        "ln_2.mean": ln2,
        "ln_2.rstd": ln2,
        "mlp.act.pow_input": fc,
        "mlp.act.tanh": fc,
        "mlp.act.half_x": fc,
        "mlp.act.one_plus_tanh": fc,
        "mlp.act.input": fc,
        "mlp.dropout.mask": mp,
    }
    keep.update(_core(st, q=qkv, k=qkv, v=qkv))
    keep["attn.output"] = qkv or sc.reads_x("attn.c_proj", st)
    inputs = {"attn.c_attn": ln1, "attn.c_proj": qkv, "mlp.c_fc": ln2, "mlp.c_proj": fc}
    linears: dict[str, tuple[str, ...]] = {
        "attn.c_attn.input": ("attn.c_attn",),
        "o_proj.input": ("attn.c_proj",),
        "mlp.c_fc.input": ("mlp.c_fc",),
        "mlp.c_proj.input": ("mlp.c_proj",),
    }
    # gelu_new's tensors are made from c_fc's output, the MLP's dropout mask from c_proj's,
    # whose input is gelu's output (the attention's c_proj reads the core's output instead).
    act = ("mlp.act.pow_input", "mlp.act.tanh", "mlp.act.half_x", "mlp.act.one_plus_tanh")
    by_fc: tuple[str, ...] = ("mlp.c_fc",)
    outputs = dict.fromkeys((*act, "mlp.act.input"), by_fc)
    outputs["mlp.dropout.mask"] = ("mlp.c_fc", "mlp.c_proj")
    return Flow(
        keep=keep,
        inputs=inputs,
        linears=linears,
        core=qkv,
        out=h1 or mp,
        four_bit_outputs=outputs,
    )


def _phi3_flow(sc: Scope, g_in: bool, st: Setting) -> Flow:
    """Phi3DecoderLayer (transformers models/phi3/modeling_phi3.py): Llama's layer with fused
    projections, which peft adapts whole: qkv_proj (q and k are new tensors after RoPE's cat,
    v a view of its output, "qkv_proj.output" where kept), `gate, up = gate_up_proj(x).
    chunk(2)` (the activation's input and the product's `up` both keep its whole output), and
    resid_attn_dropout / resid_mlp_dropout on each sublayer's output."""
    t = sc.weights.__contains__
    n1 = g_in or "input_layernorm" in sc.params
    qkv = sc.out_grad("self_attn.qkv_proj", n1)
    o = sc.out_grad("self_attn.o_proj", qkv)
    h1 = g_in or o
    n2 = h1 or "post_attention_layernorm" in sc.params
    gu = sc.out_grad("mlp.gate_up_proj", n2)
    down = sc.out_grad("mlp.down_proj", gu)
    keep = {
        **_norm("input_layernorm", g_in, t("input_layernorm")),
        **_norm("post_attention_layernorm", h1, t("post_attention_layernorm")),
        "resid_attn_dropout.mask": o,
        "mlp.gate_up_proj.output": gu,
        "mlp.act_output": gu,
        "resid_mlp_dropout.mask": down,
        **_core(st, q=qkv, k=qkv, v=qkv),
        "qkv_proj.output": qkv,
    }
    keep["attn.output"] = qkv or sc.reads_x("self_attn.o_proj", st)
    inputs = {
        "self_attn.qkv_proj": n1,
        "self_attn.o_proj": qkv,
        "mlp.gate_up_proj": n2,
        "mlp.down_proj": gu,
    }
    linears: dict[str, tuple[str, ...]] = {
        "self_attn.qkv_proj.input": ("self_attn.qkv_proj",),
        "o_proj.input": ("self_attn.o_proj",),
        "mlp.gate_up_proj.input": ("mlp.gate_up_proj",),
        "mlp.down_proj.input": ("mlp.down_proj",),
    }
    by_gate_up: tuple[str, ...] = ("mlp.gate_up_proj",)
    outputs = {"mlp.gate_up_proj.output": by_gate_up, "mlp.act_output": by_gate_up}
    return Flow(
        keep=keep,
        inputs=inputs,
        linears=linears,
        core=qkv,
        rope=qkv,
        out=h1 or down,
        four_bit_outputs=outputs,
        # v is k's shape (GQA's key/value heads alike)
        four_bit_views={"qkv_proj.output": ("self_attn.qkv_proj", "attn.key", "attn.value")},
    )


def _core(st: Setting, *, q: bool, k: bool, v: bool) -> dict[str, bool]:
    """The attention core. SDPA's fused kernels save q, k, v, the output and logsumexp
    whenever recorded (one backward formula for the three inputs). Eager attention and
    SDPA's math path are matmuls: q @ k^T saves k^T for q's gradient and q for k's; the
    second matmul saves the probabilities for v's gradient and v for theirs; softmax and
    dropout keep theirs when the scores require grad."""
    any_ = q or k or v
    scores = q or k
    if st.attention == "eager":
        return {
            "attn.query": k,
            "attn.key_t": q,
            "attn.softmax": scores,
            "attn.dropout_mask": scores,
            "attn.probs": v,
            "attn.probs_cast": v,
            "attn.value": scores,
            # Gemma 2's softcap: tanh(scores / cap) saves its result
            "attn.softcap_tanh": scores,
        }
    return {
        "attn.query_scaled": k,
        "attn.key_scaled_t": q,
        "attn.softmax": scores,
        "attn.dropout_mask": scores,
        "attn.probs_dropped": v,
        "attn.value_bmm": scores,
        "attn.query": any_,
        "attn.key": any_,
        "attn.value": any_,
        "attn.c_attn_output": any_,
        "attn.mask": any_,
        "attn.logsumexp": any_,
    }


def layer_flow(
    ends: ModelEnds, hidden_act: str, model_type: str = ""
) -> Callable[[Scope, bool, Setting], Flow]:
    """The dataflow of one layer of the family whose model ends are `ends`."""
    if ends.layer == "gpt2":
        return _gpt2_flow
    if ends.layer == "phi3":
        return _phi3_flow
    relu = hidden_act == "relu"
    sandwich = model_type in ends.sandwich
    moe: MoeBlock | None = None
    kind = ends.moe.get(model_type)
    if kind:
        # imported here: only MoE families' LoRA estimates need it (tests/test_startup.py)
        from memplan.activations.lora_moe import moe_flow

        shared = kind == "shared"

        def moe(sc: Scope, x_grad: bool) -> MoeFlow:
            return moe_flow(sc, x_grad, shared=shared)

    if model_type in ends.eager_attention:
        return lambda sc, g, st: _llama_flow(
            sc, g, replace(st, attention="eager"), relu, sandwich, moe
        )
    return lambda sc, g, st: _llama_flow(sc, g, st, relu, sandwich, moe)


def layer_tensors(tensors: Iterable[Saved], flow: Flow, sc: Scope, st: Setting) -> list[Saved]:
    """The saved tensors of one layer its nodes still save."""
    tensors = list(tensors)
    names = {s.name for s in tensors}
    if "o_proj.input" in names:
        # o_proj reads its own copy of the core's output (attention.sdpa: a flash kernel's
        # output laid out like a contiguous q): the core alone keeps attn.output.
        flow = replace(flow, keep={**flow.keep, "attn.output": flow.core})
    if "attn.softmax" in names and not names & {
        "attn.probs",
        "attn.probs_cast",
        "attn.probs_dropped",
    }:
        # No dropout or cast after the softmax: the second matmul saves the softmax's own
        # output for v's gradient, so v alone requiring grad keeps it too.
        v = flow.keep.get("attn.probs", False) or flow.keep.get("attn.probs_dropped", False)
        soft = flow.keep.get("attn.softmax", True) or v
        flow = replace(flow, keep={**flow.keep, "attn.softmax": soft})
    # Where each reader saved its own cast (kernels.linear_inputs under autocast), the first
    # reader's name is its cast alone, not the storage the readers would share.
    own = {
        name: readers[:1]
        for name, readers in flow.linears.items()
        if any(f"{m}.input" in names for m in readers[1:])
    }
    if own:
        flow = replace(flow, linears={**flow.linears, **own})
    return [s for s in tensors if _kept(s, flow, sc, st)]


def adapter_tensors(flow: Flow, sc: Scope, st: Setting) -> list[Saved]:
    """What the layer's Linear adapters and lora.ParamWrappers save."""
    out: list[Saved] = []
    for module, ad in sc.adapters:
        if not ad.embedding:
            x_grad = flow.inputs.get(module, True)
            out += adapter_saved(module, ad, st, dropout=sc.dropout, x_grad=x_grad)
    if sc.wrapped:
        from memplan.activations.lora_moe import wrapped_saved  # MoE families only

        out += wrapped_saved(flow, sc, st)
    return out


def _kept(s: Saved, flow: Flow, sc: Scope, st: Setting) -> bool:
    if s.saved_by == "Noop":
        # torch.utils.checkpoint's _NoopSaveInputs keeps a checkpointed layer's inputs
        # whatever requires grad (its dummy input does); a checkpointed core's inputs exist
        # only when the core is recorded.
        return s.name.startswith("checkpoint.") or flow.core
    base = s.name.removesuffix(".weight_cast")
    if base != s.name:  # autocast's copy of a weight, saved for its input's gradient
        return flow.inputs.get(base, True)
    readers = flow.linears.get(s.name)
    if readers is not None:
        return any(sc.input_saved(m, st) for m in readers)
    return flow.keep.get(s.name, True)


def adapter_saved(
    module: str, ad: Adapter, st: Setting, *, dropout: float, x_grad: bool
) -> list[Saved]:
    """What one Linear adapter saves beyond the base layer (see the module docstring)."""
    x_shape = (st.tokens, ad.in_features)
    mid = (st.tokens, ad.rank)
    mm = "MmBackward0"
    out: list[Saved] = []
    if dropout and x_grad:
        out.append(kernels.dropout(f"{module}.lora_dropout.mask", x_shape, ad.dtype, st))
    if st.autocast and st.matmul != ad.dtype:
        # x (cast to the adapter dtype, dropped out) is cast again to the matmul dtype for
        # lora_A; the adapter weights are leaves that require grad: cached casts.
        out += [
            kernels.saved(f"{module}.lora_A.input", x_shape, st.matmul, mm, SRC_CAST),
            kernels.saved(f"{module}.lora_A.output", mid, st.matmul, mm, SRC_LORA),
            kernels.saved(
                f"{module}.lora_B.weight_cast", (ad.out_features, ad.rank), st.matmul, mm, SRC_CAST
            ),
        ]
        if x_grad:
            out.append(
                kernels.saved(
                    f"{module}.lora_A.weight_cast",
                    (ad.rank, ad.in_features),
                    st.matmul,
                    mm,
                    SRC_CAST,
                )
            )
        return out
    if dropout:
        out.append(kernels.saved(f"{module}.lora_dropout.output", x_shape, ad.dtype, mm, SRC_LORA))
    elif ad.dtype != st.matmul:
        out.append(kernels.saved(f"{module}.lora_A.input_cast", x_shape, ad.dtype, mm, SRC_LORA))
    out.append(kernels.saved(f"{module}.lora_A.output", mid, ad.dtype, mm, SRC_LORA))
    return out


def embedding_adapter_saved(module: str, ad: Adapter, st: Setting) -> list[Saved]:
    """What an Embedding adapter saves (SRC_LORA_EMBEDDING: `after_A = F.embedding(x, A.T)`,
    `result + (after_A @ B.T) * scaling`): the token ids (the base embedding's storage, kept
    by the caller) and after_A [tokens, r] for B's gradient; under autocast the matmul saves
    after_A cast to the matmul dtype and B.T's cast instead (a view, so not cached)."""
    mm = "MmBackward0"
    if st.autocast and st.matmul != ad.dtype:
        return [
            kernels.saved(
                f"{module}.lora_embedding_A.output", (st.tokens, ad.rank), st.matmul, mm, SRC_CAST
            ),
            kernels.saved(
                f"{module}.lora_embedding_B.weight_cast",
                (ad.rank, ad.out_features),
                st.matmul,
                mm,
                SRC_CAST,
            ),
        ]
    return [
        kernels.saved(
            f"{module}.lora_embedding_A.output",
            (st.tokens, ad.rank),
            ad.dtype,
            mm,
            SRC_LORA_EMBEDDING,
        )
    ]
