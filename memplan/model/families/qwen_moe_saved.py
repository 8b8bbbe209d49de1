"""Saved tensors of Qwen MoE in transformers 5.24: qwen2_moe (`Qwen2MoeForCausalLM`,
Qwen1.5-MoE, Qwen2-57B-A14B) and qwen3_moe (`Qwen3MoeForCausalLM`, Qwen3-30B-A3B, 235B-A22B).

Their attention and norms are Qwen2's and Qwen3's (llama.py's rule, with Qwen3's per-head
q_norm/k_norm); the MLP of a sparse layer is the routed experts (llama.sparse_moe, grouped_mm)
behind Qwen's router (models/qwen2_moe/modeling_qwen2_moe.py::Qwen2MoeTopKRouter:
`softmax(logits, dtype=float)`, top-k, renormalised only with `norm_topk_prob`, cast back to
the logits' dtype), and for qwen2_moe a shared expert (Qwen2MoeSparseMoeBlock.forward:
`sigmoid(shared_expert_gate(x)) * shared_expert(x)` added to the routed output).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.families import llama_saved as llama
from memplan.model.forward import kernels
from memplan.model.forward.assemble import Model
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = {
    "qwen2_moe": "transformers models/qwen2_moe/modeling_qwen2_moe.py",
    "qwen3_moe": "transformers models/qwen3_moe/modeling_qwen3_moe.py",
}


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """The Qwen MoE model's saved tensors, or why they are not modelled."""
    x = arch.extra
    qwen2 = arch.model_type == "qwen2_moe"
    src = SRC[arch.model_type]
    act = str(x.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        return f"MoE hidden_act {act!r} has no activation rule"
    moe_layers = tuple(x.get("moe_layers", range(arch.num_layers)))
    if not arch.num_experts or len(moe_layers) != arch.num_layers:
        return (
            "dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) next to sparse ones "
            "save different tensors (one layer kind per rule)"
        )
    # The attention, the norms, the embeddings and the head are Qwen2's / Qwen3's.
    base = llama.build(replace(arch, model_type="qwen2" if qwen2 else "qwen3"), st, tied=tied)
    if isinstance(base, str):
        return base
    h, t, mm = arch.hidden_size, st.tokens, st.matmul
    normed = kernels.rms_norm_out(promote(st.stream, mm), st)  # post_attention_layernorm

    moe: list[Saved] = []
    readers = ["mlp.gate"]
    shared: list[Saved] = []
    if qwen2:
        inter = int(x.get("shared_expert_intermediate_size", arch.intermediate_size))
        readers += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"]
        readers.append("mlp.shared_expert_gate")
        shared += kernels.weight_casts(
            [
                ("mlp.shared_expert.gate_proj", (inter, h)),
                ("mlp.shared_expert.up_proj", (inter, h)),
                ("mlp.shared_expert.down_proj", (h, inter)),
                ("mlp.shared_expert_gate", (1, h)),
            ],
            st,
        )
        mlp = llama.gated_mlp("mlp.shared_expert", t, inter, act, st)
        assert mlp is not None  # silu
        shared += mlp
        # sigmoid(shared_expert_gate(x)) saves its result [t, 1]; the product saves it and the
        # shared expert's output [t, hidden].
        shared += [
            kernels.saved("mlp.shared_expert_gate.sigmoid", (t, 1), mm, "SigmoidBackward0", src),
            kernels.saved("mlp.shared_expert.output", (t, h), mm, "MulBackward0", src),
        ]
    # Every reader of the normalised input (the router, the shared expert's gate/up_proj and
    # its gate) shares one storage, or casts its own copy under autocast.
    moe += kernels.linear_inputs(readers, t, h, normed, st)
    routed = llama.sparse_moe(
        "mlp",
        t,
        arch,
        normed,
        st,
        renormalize=bool(x.get("norm_topk_prob", False)),
        weights_dtype=mm,  # router_top_value.to(router_logits.dtype)
    )
    moe += [s for s in routed if s.name != "mlp.gate.input"]
    moe += shared
    tail = [s for s in base.layer_tail if not s.name.startswith("mlp.")]
    return replace(base, layer_tail=(*tail, *moe))
