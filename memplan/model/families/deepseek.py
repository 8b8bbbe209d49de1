"""DeepSeek-V2 and DeepSeek-V3 (and R1, V3.1): multi-head latent attention (MLA) plus MoE.

One module for both: transformers 5.24 builds them from the same pieces and they differ only
in defaults, in V2's `mlp_bias` and in V3's router bias buffer.

Source: transformers 5.24 models/deepseek_v3/modeling_deepseek_v3.py (V2: modeling_deepseek_v2.py)
- DeepseekV3Attention, in registration order: without `q_lora_rank` a plain
  q_proj [heads*(nope+rope), H]; with it q_a_proj [q_lora, H] (bias = attention_bias),
  q_a_layernorm [q_lora], q_b_proj [heads*(nope+rope), q_lora]; then
  kv_a_proj_with_mqa [kv_lora + rope, H] (bias = attention_bias), kv_a_layernorm [kv_lora],
  kv_b_proj [heads*(nope+v), kv_lora], o_proj [H, heads*v] (bias = attention_bias).
- DeepseekV3DecoderLayer: layer i >= first_k_dense_replace holds DeepseekV3MoE, else a dense
  DeepseekV3MLP of `intermediate_size`.
- DeepseekV3MoE: `experts` (fused gate_up_proj [E, 2*moe_I, H], down_proj [E, H, moe_I]),
  `gate` (DeepseekV3TopkRouter: weight [E, H] created fp32 and kept fp32 by
  `_keep_in_fp32_modules_strict`; V3 only: `e_score_correction_bias` [E], an fp32 *persistent
  buffer*, not a parameter), `shared_experts` (an MLP of moe_I * n_shared_experts, always
  built: n_shared_experts = 0 gives empty tensors).
- Rotary: DeepseekV3Config.__post_init__ sets head_dim = qk_rope_head_dim, so inv_freq has
  qk_rope_head_dim / 2 entries.
- The multi-token-prediction layer (`num_nextn_predict_layers`, checkpoint `model.layers.61`)
  is not built: `_keys_to_ignore_on_load_unexpected = [r"model\\.layers\\.61.*"]`.
Defaults: configuration_deepseek_v2.py: DeepseekV2Config, configuration_deepseek_v3.py:
DeepseekV3Config (attribute_map: V2 `num_experts`, V3 `num_local_experts` -> n_routed_experts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    buffer,
    causal_lm,
    decoder_backbone,
    fused_experts,
    gated_mlp,
    int_or,
    linear,
    norm,
    param,
    present,
    resolve,
    rotary_emb,
)
from memplan.model.families.record import PEFT_HAS_NONE, Family
from memplan.model.inventory import Config, Inventory

# Config dataclass defaults, transformers 5.24; num_key_value_heads None -> heads.
DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "first_k_dense_replace": 0,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "num_experts_per_tok": None,
        "moe_intermediate_size": 1407,
        "n_group": None,
        "topk_group": None,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
    },
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_nextn_predict_layers": 1,
    },
}
ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v2": {"num_experts": "n_routed_experts"},
    "deepseek_v3": {
        "num_local_experts": "n_routed_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    },
}


def _mla(cfg: Config, *, hidden: int, heads: int) -> tuple[Part, dict[str, Any]]:
    """The attention template and its ranks (see the module docstring)."""
    bias = cfg.bool("attention_bias", False)
    q_lora = present(cfg, "q_lora_rank")
    q_lora_rank = None if q_lora is None else cfg.int("q_lora_rank")
    kv_lora = cfg.int("kv_lora_rank")
    nope = cfg.int("qk_nope_head_dim")
    rope = cfg.int("qk_rope_head_dim")
    v_dim = cfg.int("v_head_dim")
    qk_dim = nope + rope
    if q_lora_rank is None:
        q: Part = linear("self_attn.q_proj", heads * qk_dim, hidden, "attention")
    else:
        q = (
            *linear("self_attn.q_a_proj", q_lora_rank, hidden, "attention", bias=bias),
            *norm("self_attn.q_a_layernorm", q_lora_rank),
            *linear("self_attn.q_b_proj", heads * qk_dim, q_lora_rank, "attention"),
        )
    part: Part = (
        *q,
        *linear("self_attn.kv_a_proj_with_mqa", kv_lora + rope, hidden, "attention", bias=bias),
        *norm("self_attn.kv_a_layernorm", kv_lora),
        *linear("self_attn.kv_b_proj", heads * (nope + v_dim), kv_lora, "attention"),
        *linear("self_attn.o_proj", hidden, heads * v_dim, "attention", bias=bias),
    )
    ranks = {
        "q_lora_rank": q_lora_rank,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_dim,
    }
    return part, ranks


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    model_type = str(config.get("model_type"))
    v3 = model_type == "deepseek_v3"
    cfg = resolve(config, DEFAULTS[model_type], aliases=ALIASES[model_type], origin=origin)
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    inter = cfg.int("intermediate_size")
    moe_inter = cfg.int("moe_intermediate_size")
    layers = cfg.int("num_hidden_layers")
    vocab = cfg.int("vocab_size")
    experts = cfg.int("n_routed_experts")
    shared = cfg.int("n_shared_experts")
    top_k = int_or(cfg, "num_experts_per_tok", 0)
    # transformers compares `layer_idx >= first_k_dense_replace`; null there fails in
    # transformers, memplan reads it as 0 (every layer sparse).
    first_dense = int_or(cfg, "first_k_dense_replace", 0)
    mlp_bias = not v3 and cfg.bool("mlp_bias", False)  # DeepseekV2MLP only

    attn, ranks = _mla(cfg, hidden=hidden, heads=heads)
    norms = norm("input_layernorm", hidden) + norm("post_attention_layernorm", hidden)
    router: Part = (param("mlp.gate.weight", (experts, hidden), "router", dtype="fp32"),)
    if v3:
        router += (
            buffer(
                "mlp.gate.e_score_correction_bias",
                (experts,),
                "router",
                dtype="fp32",
                persistent=True,
            ),
        )
    moe: Part = (
        *fused_experts("mlp.experts", experts, hidden, moe_inter),
        *router,
        *gated_mlp(
            "mlp.shared_experts", hidden, moe_inter * shared, "shared_expert", bias=mlp_bias
        ),
    )
    sparse: Part = attn + moe + norms
    dense: Part = attn + gated_mlp("mlp", hidden, inter, bias=mlp_bias) + norms
    templates = [sparse if i >= first_dense else dense for i in range(layers)]
    # MLA: keys and values are expanded per head from the latent (kv_b_proj).
    dims = Dims.mha(
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        heads=heads,
        inter=inter,
        head_dim=ranks["qk_nope_head_dim"] + ranks["qk_rope_head_dim"],
    )
    tensors = decoder_backbone(dims, templates, rotary_emb(cfg, ranks["qk_rope_head_dim"]))
    extra: dict[str, Any] = {
        **ranks,
        "first_k_dense_replace": first_dense,
        "moe_intermediate_size": moe_inter,
        "n_shared_experts": shared,
        "moe_layers": tuple(range(min(first_dense, layers), layers)),
        "n_group": present(cfg, "n_group"),
        "topk_group": present(cfg, "topk_group"),
        "routed_scaling_factor": cfg.get("routed_scaling_factor"),
        "norm_topk_prob": cfg.bool("norm_topk_prob", v3),
    }
    notes: tuple[str, ...] = ()
    if v3:
        mtp = int_or(cfg, "num_nextn_predict_layers", 0)
        extra["num_nextn_predict_layers"] = mtp
        if mtp:
            notes = (
                f"num_nextn_predict_layers={mtp}: the multi-token-prediction layer is not part "
                "of DeepseekV3ForCausalLM in transformers (its checkpoint keys are ignored on "
                "load), so it is not counted.",
            )
    arch = architecture(cfg, model_type, dims, experts=experts, top_k=top_k, extra=extra)
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors, notes=notes)


FAMILY = Family(
    name="deepseek",
    model_types=("deepseek_v2", "deepseek_v3"),
    tensors=build,
    saved="no rule for DeepSeek's multi-head latent attention and MoE layers yet",
    peft_targets=PEFT_HAS_NONE,
    peft_moe={"deepseek_v2": "qwen2_moe", "deepseek_v3": "qwen2_moe"},
)
