"""Qwen MoE: qwen2_moe (Qwen1.5-MoE, Qwen2-57B-A14B) and qwen3_moe (Qwen3-30B-A3B, 235B-A22B).

One module for both: same sparse/dense layer rule, same fused experts; they differ in
attention (Qwen2 q/k/v bias vs Qwen3 q_norm/k_norm), in the shared expert (qwen2_moe only)
and in the order of `gate` and `experts` in the MoE block.

Source: transformers 5.24
- models/qwen2_moe/modeling_qwen2_moe.py: Qwen2MoeAttention (q/k/v bias = `qkv_bias`, o none;
  head_dim = config.head_dim if set else hidden // heads); Qwen2MoeSparseMoeBlock: `gate`
  (Qwen2MoeTopKRouter, weight [E, H]), `experts` (Qwen2MoeExperts, fused gate_up_proj
  [E, 2*moe_I, H], down_proj [E, H, moe_I]), `shared_expert` (Qwen2MoeMLP of
  `shared_expert_intermediate_size`, always built), `shared_expert_gate` (Linear(H, 1), no bias).
- models/qwen3_moe/modeling_qwen3_moe.py: Qwen3MoeAttention (bias = `attention_bias` on all four,
  q_norm/k_norm [head_dim]); Qwen3MoeSparseMoeBlock: `experts` then `gate`, no shared expert.
- Both DecoderLayers: layer i is sparse iff i not in `mlp_only_layers` and num_experts > 0 and
  (i + 1) % decoder_sparse_step == 0; otherwise a dense MLP of `intermediate_size`.
Defaults: configuration_qwen2_moe.py: Qwen2MoeConfig, configuration_qwen3_moe.py: Qwen3MoeConfig
(attribute_map `num_local_experts` -> `num_experts`).

Saved tensors of Qwen MoE in transformers 5.24: qwen2_moe (`Qwen2MoeForCausalLM`,
Qwen1.5-MoE, Qwen2-57B-A14B) and qwen3_moe (`Qwen3MoeForCausalLM`, Qwen3-30B-A3B, 235B-A22B).

Their attention and norms are Qwen2's and Qwen3's (the rule of memplan.model.families.
_llama_decoder, with Qwen3's per-head q_norm/k_norm); the MLP of a sparse layer is the routed
experts (memplan.model.forward.mlp.sparse_moe, grouped_mm)
behind Qwen's router (models/qwen2_moe/modeling_qwen2_moe.py::Qwen2MoeTopKRouter:
`softmax(logits, dtype=float)`, top-k, renormalised only with `norm_topk_prob`, cast back to
the logits' dtype), and for qwen2_moe a shared expert (Qwen2MoeSparseMoeBlock.forward:
`sigmoid(shared_expert_gate(x)) * shared_expert(x)` added to the routed output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families import _llama_decoder
from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    fused_experts,
    gated_mlp,
    int_list,
    linear,
    norm,
    read_dims,
    resolve,
    rotary_emb,
    self_attention,
)
from memplan.model.families.record import PEFT_HAS_NONE, Family, ModelEnds
from memplan.model.forward import kernels
from memplan.model.forward.assemble import Model
from memplan.model.forward.mlp import gated_mlp_saves, sparse_moe
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

# Config dataclass defaults in transformers 5.24. Neither class has a head_dim field: the
# attention uses config.json's head_dim when given, else hidden // heads.
DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4,
        "num_experts": 60,
        "norm_topk_prob": False,
        "mlp_only_layers": None,
        "qkv_bias": True,
    },
    "qwen3_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_experts": 128,
        "norm_topk_prob": False,
        "mlp_only_layers": None,
    },
}
ALIASES = {"num_local_experts": "num_experts"}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    model_type = str(config.get("model_type"))
    qwen2 = model_type == "qwen2_moe"
    cfg = resolve(config, DEFAULTS[model_type], aliases=ALIASES, origin=origin)
    dims = read_dims(cfg)
    hidden = dims.hidden
    moe_inter = cfg.int("moe_intermediate_size")
    experts = cfg.int("num_experts")
    top_k = cfg.int("num_experts_per_tok")
    step = cfg.int("decoder_sparse_step")
    mlp_only = int_list(cfg, "mlp_only_layers")
    shared_inter = cfg.int("shared_expert_intermediate_size") if qwen2 else 0

    if qwen2:
        qkv_bias, o_bias = cfg.bool("qkv_bias", True), False
    else:
        qkv_bias = o_bias = cfg.bool("attention_bias", False)
    attn = self_attention(dims, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=not qwen2)
    norms = norm("input_layernorm", hidden) + norm("post_attention_layernorm", hidden)

    router = linear("mlp.gate", experts, hidden, "router")
    routed = fused_experts("mlp.experts", experts, hidden, moe_inter)
    if qwen2:
        sparse_mlp = (
            *router,
            *routed,
            *gated_mlp("mlp.shared_expert", hidden, shared_inter, "shared_expert"),
            *linear("mlp.shared_expert_gate", 1, hidden, "shared_expert"),
        )
    else:
        sparse_mlp = (*routed, *router)
    sparse: Part = attn + sparse_mlp + norms
    dense: Part = attn + gated_mlp("mlp", hidden, dims.inter) + norms

    # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: the sparse-or-dense rule.
    if step == 0:
        raise MemplanError(
            f"{cfg.origin}: decoder_sparse_step must be at least 1 (layer i is sparse when "
            "(i + 1) % decoder_sparse_step == 0).",
            field="decoder_sparse_step",
        )
    moe_layers = tuple(
        i for i in range(dims.layers) if i not in mlp_only and experts > 0 and (i + 1) % step == 0
    )
    templates = [sparse if i in moe_layers else dense for i in range(dims.layers)]
    tensors = decoder_backbone(dims, templates, rotary_emb(cfg, dims.head_dim))
    extra: dict[str, Any] = {
        "moe_intermediate_size": moe_inter,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "moe_layers": moe_layers,
        "norm_topk_prob": cfg.bool("norm_topk_prob", False),
        "qk_norm": not qwen2,  # Qwen3MoeAttention's per-head q_norm / k_norm
    }
    if qwen2:
        extra["shared_expert_intermediate_size"] = shared_inter
    arch = architecture(cfg, model_type, dims, experts=experts, top_k=top_k, extra=extra)
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = {
    "qwen2_moe": "transformers models/qwen2_moe/modeling_qwen2_moe.py",
    "qwen3_moe": "transformers models/qwen3_moe/modeling_qwen3_moe.py",
}


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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
    base = _llama_decoder.saved(arch, st, tied=tied, qk_norm=not qwen2)
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
        mlp = gated_mlp_saves("mlp.shared_expert", t, inter, act, st)
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
    routed = sparse_moe(
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


FAMILY = Family(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    tensors=build,
    saved=saved,
    peft_targets=PEFT_HAS_NONE,
    peft_moe={"qwen3_moe": "qwen2_moe"},
    lora_ends=ModelEnds(
        layer="llama",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
        moe={"qwen2_moe": "shared", "qwen3_moe": "routed"},
    ),
)
