"""The sweep's tiny configs (benchmarks/verify_sweep.py): a model_type's config class's
defaults shrunk by generic rules, its size keys set small by name, its per-layer lists cut to one
layer of each kind, its nested sub-configs shrunk the same way; OVERRIDES where the rules cannot
work (each entry says why)."""

from __future__ import annotations

import json
from typing import Any

# Mamba-2 chunk sizes (chunk_size, mamba_chunk_size) keep their defaults (256 and the like):
# one padded chunk at the sweep's 32 tokens; a 16-token chunk makes the scan's saved sizes step
# with the sequence, which the trace's polynomial fit refuses (falcon_h1, bamba, nemotron_h).
# Size keys by name, each type's own spelling; a key is set only where the default config has
# it as a positive int (profile_verify.BASE's sizes: hidden 64, 4 heads of 16, 2 key/value
# heads, vocabulary 512; profile_verify.MOE's experts: 4 of width 32, top-2).
HIDDEN = 64
SIZES: dict[int, tuple[str, ...]] = {
    HIDDEN: (
        "hidden_size", "d_model", "n_embd", "embedding_dim", "emb_dim", "lru_width",
        "word_embed_proj_dim", "mamba_d_ssm", "backbone_hidden_size", "out_hidden_size",
        "projection_dim", "embed_dim", "adapter_in_dim", "adapter_input_size", "adapter_out_dim",
        "hidden_size_global",
    ),
    128: (
        "intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "dff", "d_inner",
        "dim_ff", "ffn_hidden_size", "feed_forward_size", "intermediate_size_mlp",
        "first_dense_intermediate_size", "dense_intermediate_size", "shared_intermediate_size",
        "mlp_only_intermediate_size", "n_inner", "attention_hidden_size",
    ),
    32: (
        "moe_intermediate_size", "shared_expert_intermediate_size",
        "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
        "expert_ffn_hidden_size", "router_hidden_size", "shape_embed_dim",
        "pronunciation_embed_dim",
    ),
    4: (
        "num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
        "encoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
        "attention_heads", "swa_num_attention_heads", "linear_num_heads", "linear_num_value_heads",
        "mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_experts", "num_local_experts",
        "n_routed_experts", "moe_num_experts",
    ),
    2: (
        "num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups",
        "linear_num_key_heads", "index_n_heads", "index_num_heads", "num_experts_per_tok",
        "moe_topk", "zero_expert_num", "num_experts_per_token", "moe_k",
    ),
    16: (
        "head_dim", "d_head", "dim_head", "kv_channels", "attention_head_size", "swa_head_dim",
        "attention_head_dim", "v_head_dim", "qk_head_dim", "linear_key_head_dim",
        "linear_value_head_dim", "linear_head_dim", "index_head_dim", "index_topk",
        "mamba_d_head", "mamba_head_dim", "mamba_headdim", "mamba_d_state", "state_size",
        "ssm_state_size", "kv_lora_rank", "o_lora_rank", "hidden_size_per_layer_input",
        "sliding_window", "sliding_window_size", "window_size", "local_attention",
        "attention_window_size", "local_attention_window_len", "block_size",
        "attention_chunk_size", "rotary_dim",
    ),
    24: ("q_lora_rank",),
    # Mamba-2 groups of B/C: one (they must divide the 4 heads; nemotron_h's default 8 makes
    # repeat_interleave's output size 0).
    1: ("n_groups", "mamba_n_groups", "mamba_ngroups"),
    8: (
        "qk_rope_head_dim", "qk_nope_head_dim", "time_step_rank", "mamba_dt_rank",
        "laurel_rank", "loop_gate_rank", "adapter_rank", "gated_norm_rank", "hc_lowrank",
    ),
}  # fmt: skip
SIZE_OF = {key: size for size, keys in SIZES.items() for key in keys}
# Layer counts: each becomes LAYERS (or the number of layer kinds the per-layer lists name).
LAYERS = 2
LAYER_KEYS = (
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
    "encoder_layers", "num_encoder_layers", "num_decoder_layers", "num_blocks", "depth",
    "num_global_layers", "conf_num_hidden_layers",
)  # fmt: skip
VOCAB = 512
VOCAB_KEYS = (
    "vocab_size", "vocab_size_per_layer_input", "decoder_vocab_size", "unpadded_vocab_size",
    "shape_vocab_size", "pronunciation_vocab_size", "encoder_hash_byte_group_vocab",
)  # fmt: skip
# Positions: enough for the trace's sizes (memplan/verify/trace/sizes.py: up to 640 tokens for
# chunked loops), small enough that learned position tables stay small.
POSITIONS = 1024
POSITION_KEYS = (
    "max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_seq_len",
    "context_length", "max_source_positions",
)  # fmt: skip
# The token ids an embedding needs inside the vocabulary (padding_idx, the loss's labels);
# other special ids (image, audio tokens) are left outside it, so random ids never hit them.
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Per-layer thresholds: "the first k layers" (k counted again over the layers kept).
FIRST_K = ("first_k_dense_replace", "max_window_layers", "moe_layer_start_index")

# Types the generic rules cannot shrink; each entry says why (merged into the shrunk config,
# nested dicts key by key).
OVERRIDES: dict[str, dict[str, Any]] = {
    # Its config class requires its text_config's per-layer inputs off (validate_architecture)
    # but defaults them on: the default config does not build.
    "gemma4_assistant": {
        "text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
    },
    # layer_types defaults to None, which the model subscripts; 2 dense layers of the default
    # would leave no MoE layer: conv + attention dense, then a conv MoE layer.
    "lfm2_moe": {
        "num_hidden_layers": 3,
        "num_dense_layers": 2,
        "layer_types": ["conv", "full_attention", "conv"],
    },
    # Its to_dict doubles the layers (an "mlp" block after each) and the counts; the blocks,
    # each count consistent: input 1 + recurrent 2 + output 1 layers, sliding and full.
    "dory": {
        "num_hidden_layers": 4,
        "n_input_layers": 1,
        "n_recurrent_layers": 2,
        "n_output_layers": 1,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    # Axial position embeddings: their widths sum to hidden_size and their shape's product is
    # the sequence trained (32 tokens); chunks of 16 tokens.
    "reformer": {
        "is_decoder": True,  # ReformerModelWithLMHead asserts it; the config defaults False
        "axial_pos_embds_dim": [32, 32],
        "axial_pos_shape": [4, 8],
        "local_attn_chunk_length": 16,
        "lsh_attn_chunk_length": 16,
    },
    # The shared transformer block is tied across the hybrid layers: one hybrid layer leaves its
    # tie pattern matching nothing (transformers raises), so two.
    "zamba": {
        "num_hidden_layers": 4,
        "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
    },
}
# Mamba-2 heads: (heads key, head width key); the width is set so heads x width is the mixer's
# width (expand x hidden, or mamba_d_ssm where set), what the config classes validate
# (e.g. transformers/models/bamba/configuration_bamba.py::validate_architecture).
MAMBA_HEADS = (
    ("mamba_n_heads", "mamba_d_head"),
    ("mamba_num_heads", "mamba_head_dim"),
    ("n_mamba_heads", "mamba_headdim"),
    ("num_heads", "head_dim"),
)
# Lists with one entry per layer naming another layer (kolibri1_1's kv_source_layers).
SOURCE_LISTS = ("kv_source_layers",)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_count(defaults: dict[str, Any]) -> int | None:
    for key in LAYER_KEYS:
        value = defaults.get(key)
        if _int(value) and value > 0:
            return int(value)
    return None


def _per_layer(defaults: dict[str, Any], count: int) -> dict[str, Any]:
    """The lists with one entry per layer (not the index lists, which may have one too)."""
    index = _index_lists(defaults, count)
    return {
        k: v
        for k, v in defaults.items()
        if isinstance(v, list) and len(v) == count and k not in index
    }


def _index_lists(defaults: dict[str, Any], count: int, per_layer: Any = None) -> dict[str, Any]:
    """Lists of layer indices (moe_layers, full_attn_idxs, hybrid_layer_ids): sorted distinct
    ints below the layer count, under a name that says layers."""
    out = {}
    for k, v in defaults.items():
        if k in SOURCE_LISTS or not isinstance(v, list) or not v:
            continue
        ints = all(_int(i) for i in v)
        if ints and v == sorted(set(v)) and v[-1] < count and ("layer" in k or "idx" in k):
            out[k] = v
    return out


def _last_k(defaults: dict[str, Any]) -> int:
    """The last layers that share others' keys and values (gemma3n's num_kv_shared_layers)."""
    value = defaults.get("num_kv_shared_layers")
    return int(value) if _int(value) else 0


def _layer_overrides(defaults: dict[str, Any]) -> dict[int, Any]:
    """per_layer_config (transformers' heterogeneous layers: a layer index, as an int or a
    zero-padded string, to the keys that layer sets otherwise), by int index."""
    value = defaults.get("per_layer_config")
    if not isinstance(value, dict):
        return {}
    return {int(k): v for k, v in value.items()}


def pick_layers(defaults: dict[str, Any], count: int) -> list[int]:
    """The layers kept: the first of each kind (its entries in every per-layer list, whether
    an index list names it, which side of each first-k / last-k threshold it is, whether it
    reads another layer's keys and values), the layers those read, and at least LAYERS."""
    per_layer = _per_layer(defaults, count)
    index = _index_lists(defaults, count, per_layer)
    firsts = [v for k, v in defaults.items() if k in FIRST_K and _int(v)]
    shared_from = count - _last_k(defaults)
    sources = {k: v for k, v in per_layer.items() if k in SOURCE_LISTS}
    overrides = _layer_overrides(defaults)
    seen: dict[Any, int] = {}
    for i in range(count):
        kind = (
            tuple(json.dumps(v[i]) for k, v in per_layer.items() if k not in sources),
            tuple(v[i] == i for v in sources.values()),
            tuple(i in set(v) for v in index.values()),
            tuple(i < k for k in firsts),
            i >= shared_from,
            json.dumps(overrides.get(i), sort_keys=True),
        )
        seen.setdefault(kind, i)
    kept = set(seen.values())
    kept |= {v[i] for v in sources.values() for i in kept if _int(v[i])}
    for i in range(count):  # at least LAYERS: the next layers after the first
        if len(kept) >= min(LAYERS, count):
            break
        kept.add(i)
    return sorted(kept)


def shrink(model_type: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny config of `model_type`: the keys to pass AutoConfig.for_model, those of its
    defaults (the config class instantiated, `defaults` in tests) that SIZES, LAYER_KEYS,
    VOCAB_KEYS, POSITION_KEYS, TOKEN_IDS and the per-layer lists name, and the nested
    sub-configs (a dict with a model_type or a hidden_size: their whole dict, shrunk the same
    way), then OVERRIDES."""
    extra = OVERRIDES.get(model_type, {})
    if defaults is None:
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(model_type, **extra).to_dict()
    out: dict[str, Any] = {"model_type": model_type}
    out.update(_shrunk(defaults))
    return _merge(out, extra)


def _shrunk(defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    heads = {k: defaults.get(k) for k in ("num_attention_heads", "num_key_value_heads")}
    for key, value in defaults.items():
        if isinstance(value, dict) and ("model_type" in value or "hidden_size" in value):
            # The whole sub-config: some parents read their sub-configs' keys from the dict.
            # per_layer_config: derived per-layer overrides keyed by the default's layers.
            whole = {k: v for k, v in value.items() if k != "per_layer_config"}
            out[key] = {**whole, **_shrunk(value)}
            continue
        if not _int(value) or value <= 0:
            continue
        if key in SIZE_OF:
            out[key] = min(value, SIZE_OF[key])
        elif key in VOCAB_KEYS:
            out[key] = min(value, VOCAB)
        elif key in POSITION_KEYS:
            out[key] = min(value, POSITIONS)
    # Sizes the config leaves None for the model to derive, where the model code does not.
    if "head_dim" in defaults and defaults["head_dim"] is None and "num_attention_heads" in out:
        out["head_dim"] = HIDDEN // out["num_attention_heads"]
    if "num_key_value_heads" in defaults and defaults["num_key_value_heads"] is None:
        out["num_key_value_heads"] = SIZE_OF["num_key_value_heads"]
    if "moe_intermediate_size" in defaults:  # experts left None (dots1)
        for key in ("n_routed_experts", "num_experts"):
            if key in defaults and defaults[key] is None:
                out[key] = SIZE_OF[key]
        if "num_experts_per_tok" in defaults and defaults["num_experts_per_tok"] is None:
            out["num_experts_per_tok"] = SIZE_OF["num_experts_per_tok"]
        if "n_shared_experts" in defaults and defaults["n_shared_experts"] is None:
            out["n_shared_experts"] = 1
    # Grouped routing: 4 experts in 2 groups of 2, top-1 group (profile_verify's deepseek_v32:
    # the default n_group 8 makes `view(-1, 8, 0)`).
    for group in ("n_group", "num_expert_group"):
        if _int(defaults.get(group)) and defaults[group] > 1:
            out[group] = 2
            if "topk_group" in defaults:
                out["topk_group"] = 1
    # MLA with head_dim the rotary part (deepseek's convention): keep it so.
    rope = defaults.get("qk_rope_head_dim")
    if _int(rope) and defaults.get("head_dim") == rope:
        out["head_dim"] = SIZE_OF["qk_rope_head_dim"]
    for heads_key, width_key in MAMBA_HEADS:
        expand = defaults.get("mamba_expand", defaults.get("expand"))
        if heads_key in out and width_key in defaults and _int(expand):
            width = out.get("mamba_d_ssm") or expand * out.get("hidden_size", HIDDEN)
            out[width_key] = width // out[heads_key]
            break
    for key, small in TOKEN_IDS.items():
        value = defaults.get(key)
        if _int(value) and value >= VOCAB:
            out[key] = small
        elif isinstance(value, list) and any(_int(i) and i >= VOCAB for i in value):
            out[key] = [small]
    # Multi-head attention stays multi-head (as many key/value heads as query heads).
    if (
        heads["num_key_value_heads"] is not None
        and heads["num_key_value_heads"] == heads["num_attention_heads"]
    ):
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    count = _layer_count(defaults)
    if count is None:
        return out
    kept = pick_layers(defaults, count)
    where = {old: new for new, old in enumerate(kept)}
    first = _first_layer_key(defaults)
    for key in LAYER_KEYS:
        if _int(defaults.get(key)):
            out[key] = min(defaults[key], len(kept) if key == first else LAYERS)
    per_layer = _per_layer(defaults, count)
    for key, values in per_layer.items():
        picked = [values[i] for i in kept]
        if key in SOURCE_LISTS:
            picked = [where[v] for v in picked]
        elif key in SIZE_OF:  # a per-layer size (gemma3n's intermediate_size list)
            picked = [min(v, SIZE_OF[key]) if _int(v) else v for v in picked]
        elif key == "num_attention_heads_per_layer":
            picked = [min(v, SIZE_OF["num_attention_heads"]) for v in picked]
        out[key] = picked
    for key, values in _index_lists(defaults, count, per_layer).items():
        out[key] = [where[i] for i in values if i in where]
    for key in FIRST_K:
        if _int(defaults.get(key)):
            out[key] = sum(1 for i in kept if i < defaults[key])
    end = defaults.get("moe_layer_end_index")  # the last MoE layer (ernie4_5_moe), inclusive
    if _int(end):
        out["moe_layer_end_index"] = sum(1 for i in kept if i <= end) - 1
    overrides = _layer_overrides(defaults)
    if overrides:  # each kept layer's own keys, shrunk like the config's
        out["per_layer_config"] = {
            where[i]: {**v, **_shrunk(v)} for i, v in overrides.items() if i in where
        }
    if _last_k(defaults):
        out["num_kv_shared_layers"] = sum(1 for i in kept if i >= count - _last_k(defaults))
    return out


def _first_layer_key(defaults: dict[str, Any]) -> str | None:
    for key in LAYER_KEYS:
        value = defaults.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key
    return None


def is_moe(config: dict[str, Any]) -> bool:
    """Experts anywhere in the config (memplan/verify/trace/moe.py::is_moe's keys)."""
    for key, value in config.items():
        if key in EXPERT_KEYS and isinstance(value, int) and value > 1:
            return True
        if isinstance(value, dict) and is_moe(value):
            return True
    return False
