"""Gemma 1, 2 and 3: gemma, gemma2, gemma3_text (text only) and gemma3 (image-text).

What `gemma3` means: the model transformers 5.24 builds for a config.json with
`model_type: gemma3` (google/gemma-3-4b-it and larger), i.e. `Gemma3ForConditionalGeneration`:
the SigLIP vision tower, the multimodal projector and the text model nested under
`model.language_model`, with `lm_head` tied to its embedding. That is what such a checkpoint
loads and trains; `gemma3_text` (google/gemma-3-1b-it, or a text-only fine-tune) is
`Gemma3ForCausalLM`. To plan a text-only run of a multimodal checkpoint, give its
`text_config` with `model_type: gemma3_text`.

Source: transformers 5.24
- models/gemma/modeling_gemma.py: GemmaForCausalLM; GemmaTextScaledWordEmbedding (an
  nn.Embedding plus a 0-dim non-persistent `embed_scale` buffer made with `torch.tensor`, so in
  the dtype the model is built in); GemmaAttention (bias = `attention_bias` on q/k/v/o;
  head_dim = config.head_dim, default 256, independent of hidden // heads); GemmaMLP;
  GemmaDecoderLayer (input_layernorm, post_attention_layernorm); GemmaRotaryEmbedding.
- models/gemma2/modeling_gemma2.py: Gemma2DecoderLayer adds pre_feedforward_layernorm and
  post_feedforward_layernorm.
- models/gemma3/modeling_gemma3.py: Gemma3Attention adds q_norm/k_norm [head_dim];
  Gemma3RotaryEmbedding holds one rotary per layer type present in `layer_types`, in sorted
  order (`full_attention_inv_freq`, `full_attention_original_inv_freq`, then `sliding_...`);
  Gemma3ForConditionalGeneration: model.vision_tower (SiglipVisionModel,
  models/siglip/modeling_siglip.py), model.multi_modal_projector (Gemma3MultiModalProjector:
  `mm_input_projection_weight` [vision H, text H], `mm_soft_emb_norm` RMSNorm [vision H]),
  model.language_model (Gemma3TextModel), lm_head.
Sliding windows (gemma2/3 local layers) change the attention mask, never a parameter.

Saved tensors of Gemma 1, 2 and 3 (text) in transformers 5.24: `GemmaForCausalLM`,
`Gemma2ForCausalLM`, `Gemma3ForCausalLM` (model_type gemma3_text).

models/gemma/modeling_gemma.py: embed_tokens (GemmaTextScaledWordEmbedding: the lookup times
the 0-dim `embed_scale` buffer, sqrt(hidden)) -> rotary cos/sin -> layers (input_layernorm,
q/k/v_proj, RoPE, attention core, o_proj, residual, post_attention_layernorm, gate/up_proj,
gelu_pytorch_tanh, down_proj, residual) -> norm -> lm_head -> ForCausalLMLoss.
models/gemma2/modeling_gemma2.py: post_attention_layernorm normalises the attention output
before the residual, pre_/post_feedforward_layernorm wrap the MLP; the eager attention caps
its scores (`tanh(scores / cap) * cap`, attn_logit_softcapping) and the head its logits
(final_logit_softcapping). models/gemma3/modeling_gemma3.py: Gemma 2's layer with per-head
q_norm/k_norm before RoPE, one cos/sin pair per layer type (sliding/full); its attention
ignores attn_logit_softcapping (Gemma3Attention does not pass it), the head applies
final_logit_softcapping (None by default).
Every norm is GemmaRMSNorm (memplan.model.forward.kernels.gemma_rms_norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families._decoder import (
    Part,
    architecture,
    buffer,
    causal_lm,
    decoder_backbone,
    gated_mlp,
    norm,
    param,
    read_dims,
    resolve,
    rotary_buffers,
    rotary_dim,
    rotary_emb,
    self_attention,
)
from memplan.model.families._siglip import siglip_vision
from memplan.model.families.record import PEFT_HAS_NONE, Family, ModelEnds
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Config, Inventory, TensorSpec

# Config dataclass defaults, transformers 5.24 (GemmaConfig, Gemma2Config, Gemma3TextConfig).
# All three tie lm_head to the embedding by default and fix head_dim at 256.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "gemma2": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "sliding_window": 4096,
        "layer_types": None,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        "vocab_size": 262_208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131_072,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "sliding_window": 4096,
        "layer_types": None,
        "rope_parameters": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
}
# Gemma3Config (the image-text wrapper) and SiglipVisionConfig defaults, transformers 5.24.
GEMMA3_DEFAULTS: dict[str, Any] = {
    "text_config": None,
    "vision_config": None,
    "mm_tokens_per_image": 256,
    "tie_word_embeddings": True,
}
SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "vision_use_head": True,
}
# Gemma3TextConfig.__post_init__: layer i is local unless (i + 1) % pattern == 0.
_SLIDING_WINDOW_PATTERN = 6


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    model_type = str(config.get("model_type"))
    if model_type == "gemma3":
        return _build_gemma3_image_text(config, origin=origin)
    cfg = resolve(config, DEFAULTS[model_type], origin=origin)
    arch, tensors = _text_model(cfg, model_type, prefix="model")
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors, tie_default=True)


def _layer_types(cfg: Config, model_type: str, layers: int) -> list[str]:
    """`layer_types` as given, else each config class's `__post_init__` pattern."""
    given = cfg.data.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != layers:
            raise MemplanError(
                f"{cfg.origin}: layer_types must list one type per layer ({layers}).",
                field="layer_types",
            )
        return [str(t) for t in given]
    if model_type == "gemma2":  # Gemma2Config: sliding on even indices
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    pattern = cfg.int("sliding_window_pattern", default=_SLIDING_WINDOW_PATTERN)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _softcaps(cfg: Config) -> dict[str, float | None]:
    """attn_logit_softcapping and final_logit_softcapping (null: none), which change the
    activations (`saved` below), never a parameter."""
    keys = ("attn_logit_softcapping", "final_logit_softcapping")
    return {k: None if cfg.data.get(k) is None else float(cfg.data[k]) for k in keys}


def _gemma3_rope(cfg: Config) -> dict[str, Any]:
    """Gemma3TextConfig.convert_rope_params_to_dict: one RoPE dict per layer type; a legacy
    `rope_scaling` applies to the global (full_attention) layers."""
    given = cfg.data.get("rope_parameters")
    rope: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
    for layer_type in ("full_attention", "sliding_attention"):
        rope[layer_type] = dict(rope.get(layer_type) or {"rope_type": "default"})
    scaling = cfg.data.get("rope_scaling")
    if isinstance(scaling, Mapping):
        rope["full_attention"].update(scaling)
    return rope


def _text_model(
    cfg: Config, model_type: str, *, prefix: str
) -> tuple[Architecture, list[TensorSpec]]:
    """Architecture and tensors of Gemma{,2,3Text}Model under `prefix` (no lm_head)."""
    dims = read_dims(cfg)
    hidden, head_dim, layers = dims.hidden, dims.head_dim, dims.layers
    bias = cfg.bool("attention_bias", False)

    layer: Part = self_attention(
        dims, qkv_bias=bias, o_bias=bias, qk_norm=model_type == "gemma3_text"
    )
    layer += gated_mlp("mlp", hidden, dims.inter)
    layer += norm("input_layernorm", hidden) + norm("post_attention_layernorm", hidden)
    if model_type != "gemma":
        layer += norm("pre_feedforward_layernorm", hidden)
        layer += norm("post_feedforward_layernorm", hidden)

    extra: dict[str, Any] = {}
    if model_type == "gemma3_text":
        rope = _gemma3_rope(cfg)
        layer_types = _layer_types(cfg, model_type, layers)
        rotary: Part = ()
        for layer_type in sorted(set(layer_types)):
            if layer_type not in rope:
                raise MemplanError(
                    f"{cfg.origin}: layer type {layer_type!r} has no rope_parameters entry.",
                    field="layer_types",
                )
            dim = rotary_dim(rope[layer_type], head_dim, default_is_partial=False)
            rotary += rotary_buffers(f"{prefix}.rotary_emb", dim, tag=f"{layer_type}_")
        extra = {"sliding_window": cfg.get("sliding_window"), "layer_types": tuple(layer_types)}
        extra.update(_softcaps(cfg))
    else:
        rotary = rotary_emb(cfg, head_dim, prefix=prefix)
        if model_type == "gemma2":
            layer_types = _layer_types(cfg, model_type, layers)
            extra = {"sliding_window": cfg.get("sliding_window"), "layer_types": tuple(layer_types)}
            extra.update(_softcaps(cfg))

    # sqrt(hidden) as a 0-dim tensor in the build dtype (torch.tensor under the default dtype)
    embed_scale = buffer(
        f"{prefix}.embed_tokens.embed_scale", (), "embedding", dtype=None, persistent=False
    )
    tensors = decoder_backbone(
        dims, [layer] * layers, rotary, prefix=prefix, embed_extra=(embed_scale,)
    )
    return architecture(cfg, model_type, dims, extra=extra), tensors


def _build_gemma3_image_text(config: Mapping[str, Any], *, origin: str) -> Inventory:
    cfg = resolve(config, GEMMA3_DEFAULTS, origin=origin)
    text = cfg.data.get("text_config") or {}
    vision = cfg.data.get("vision_config") or {}
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise MemplanError(f"{origin}: text_config and vision_config must be mappings.")
    vision_type = vision.get("model_type", "siglip_vision_model")
    if vision_type != "siglip_vision_model":
        raise MemplanError(
            f"{origin}: gemma3 vision_config.model_type {vision_type!r} is not supported; "
            "memplan knows siglip_vision_model (the Gemma 3 default).",
            field="vision_config.model_type",
        )
    text_cfg = resolve(text, DEFAULTS["gemma3_text"], origin=f"{origin}: text_config")
    vision_cfg = resolve(vision, SIGLIP_VISION_DEFAULTS, origin=f"{origin}: vision_config")
    vision_facts, tensors = siglip_vision(vision_cfg, "model.vision_tower")
    text_arch, text_tensors = _text_model(text_cfg, "gemma3_text", prefix="model.language_model")
    tensors += [
        param(
            "model.multi_modal_projector.mm_input_projection_weight",
            (vision_facts["hidden_size"], text_arch.hidden_size),
            "vision",
        ),
        *norm(
            "model.multi_modal_projector.mm_soft_emb_norm",
            vision_facts["hidden_size"],
            role="vision",
        ),
        *text_tensors,
    ]
    arch = replace(
        text_arch,
        model_type="gemma3",
        extra={
            **text_arch.extra,
            "vision": vision_facts,
            "mm_tokens_per_image": cfg.int("mm_tokens_per_image"),
        },
    )
    return causal_lm(
        cfg=cfg,
        architecture=arch,
        tensors=tensors,
        tie_default=True,
        embed_name="model.language_model.embed_tokens.weight",
        notes=(
            "gemma3 is the image-text model (Gemma3ForConditionalGeneration): the SigLIP "
            "vision tower and projector are counted; give text_config with model_type "
            "gemma3_text for the text model alone.",
        ),
    )


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = {
    "gemma": "transformers models/gemma/modeling_gemma.py",
    "gemma2": "transformers models/gemma2/modeling_gemma2.py",
    "gemma3_text": "transformers models/gemma3/modeling_gemma3.py",
}
# Config class defaults (configuration_gemma2.py, configuration_gemma3.py) for the keys the
# inventory may not carry.
SOFTCAP_DEFAULTS: dict[str, dict[str, float | None]] = {
    "gemma": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
}


def _caps_of(arch: Architecture) -> tuple[float | None, float | None]:
    defaults = SOFTCAP_DEFAULTS[arch.model_type]
    x: Mapping[str, Any] = arch.extra

    def cap(key: str) -> float | None:
        value = x[key] if key in x else defaults[key]
        return None if value is None else float(value)

    return cap("attn_logit_softcapping"), cap("final_logit_softcapping")


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """Gemma's saved tensors, or why they are not modelled."""
    kind = arch.model_type
    src = SRC[kind]
    x = arch.extra
    act = str(x.get("hidden_activation") or x.get("hidden_act") or "gelu_pytorch_tanh")
    if act == "gelu":  # GemmaConfig.__post_init__ (gemma 1) replaces it
        act = "gelu_pytorch_tanh"
    h, a, kv, d = kernels.attention_dims(arch)
    t, mm = st.tokens, st.matmul
    layer_types = tuple(x.get("layer_types") or ())
    if x.get("use_bidirectional_attention"):
        return "bidirectional attention (use_bidirectional_attention) has no rule"
    kernel = _attention_kernel(arch, st, layer_types)
    if isinstance(kernel, str):
        return kernel
    eager, mask, note = kernel

    layer: list[Saved] = kernels.gemma_rms_norm("input_layernorm", t, h, st.stream, src)
    layer += kernels.linear_inputs(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], t, h, st.stream, st
    )
    layer += kernels.weight_casts(
        kernels.projection_weights(h, a, kv, d, arch.intermediate_size), st
    )
    if kind == "gemma3_text":
        # Gemma3Attention: q_norm/k_norm over head_dim of q, k [b, heads, s, d] (in mm).
        layer += kernels.gemma_rms_norm("self_attn.q_norm", t * a, d, mm, src)
        layer += kernels.gemma_rms_norm("self_attn.k_norm", t * kv, d, mm, src)
    core = _attention_core(arch, st, eager=eager, mask=mask)
    tail = _layer_tail(arch, st, act)
    if tail is None:
        return f"hidden_activation {act!r} has no activation rule"
    return Model(
        embeddings=(kernels.embedding_indices("embed_tokens.indices", (st.batch, st.sequence)),),
        per_forward=_rope_tables(arch, st, layer_types),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=_head(arch, st),
        vocab=arch.vocab_size,
        hidden=h,
        num_layers=arch.num_layers,
        notes=(note,),
    )


def _attention_kernel(
    arch: Architecture, st: Setting, layer_types: tuple[str, ...]
) -> tuple[bool, bool, str] | str:
    """(eager, sliding-window mask saved, note) for the attention Gemma runs, or why not
    modelled.

    Gemma2PreTrainedModel._supports_sdpa is False: transformers falls back to eager when no
    attn_implementation is requested (modeling_utils.py::get_correct_attn_implementation); an
    explicit "sdpa" raises."""
    kind = arch.model_type
    eager = st.attention == "eager" or kind == "gemma2"
    note = ""
    if kind == "gemma2" and st.attention == "sdpa":
        note = (
            "Gemma 2 has no sdpa attention in transformers (softcapping): it runs eager "
            "attention, as transformers does by default (an explicit sdpa raises)."
        )
    mask = False
    if kind != "gemma" and not eager:
        window = arch.extra.get("sliding_window")
        if isinstance(window, int) and st.sequence > window and "sliding_attention" in layer_types:
            if "full_attention" in layer_types:
                return (
                    "sliding-window layers shorter than the sequence next to full-attention "
                    "layers save different tensors under sdpa (one layer kind per rule)"
                )
            mask = True
    return eager, mask, note


def _attention_core(arch: Architecture, st: Setting, *, eager: bool, mask: bool) -> attention.Core:
    """The attention core (QK^T -> softmax -> .V), with Gemma 2's logit softcap under eager."""
    kind, src = arch.model_type, SRC[arch.model_type]
    _, a, kv, d = kernels.attention_dims(arch)
    b, s, mm = st.batch, st.sequence, st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    drop_attn = dropout_on(st, arch.extra, "attention_dropout", default=0.0)
    attn_cap, _ = _caps_of(arch)
    if kind != "gemma2":
        attn_cap = None  # Gemma3Attention does not pass its softcap to the attention function
    # apply_rotary_pos_emb: q * cos + rotate_half(q) * sin, cos/sin in the stream dtype.
    qk = promote(mm, st.stream)
    qkv = attention.Qkv(q=qk, k=qk, v=mm, mask=mask)
    if not eager:
        return attention.sdpa(st, heads, qkv, dropout_on=drop_attn)
    core = attention.eager(
        st,
        heads,
        qkv,
        softmax_fp32=True,
        convert_to_query=True,
        dropout_on=drop_attn,
        source=src + "::eager_attention_forward",
    )
    if attn_cap is None:
        return core
    # tanh(scores / cap) saves its result, in the matmul's dtype (before the mask).
    capped = kernels.saved("attn.softcap_tanh", (b, a, s, s), mm, "TanhBackward0", src + "::eager")
    return attention.Core(
        core=(*core.core, capped), inputs=core.inputs, output=core.output, views=core.views
    )


def _layer_tail(arch: Architecture, st: Setting, act: str) -> list[Saved] | None:
    """After the attention: the post-attention norms, the gated MLP and (Gemma 2 and 3) the
    post-feed-forward norm; None when the activation has no rule."""
    kind, src = arch.model_type, SRC[arch.model_type]
    h, t, mm = arch.hidden_size, st.tokens, st.matmul
    post = promote(st.stream, mm)  # residual + attention output
    tail: list[Saved] = []
    if kind == "gemma":
        tail += kernels.gemma_rms_norm("post_attention_layernorm", t, h, post, src)
    else:
        tail += kernels.gemma_rms_norm("post_attention_layernorm", t, h, mm, src)
        tail += kernels.gemma_rms_norm("pre_feedforward_layernorm", t, h, post, src)
    tail += kernels.linear_inputs(["mlp.gate_proj", "mlp.up_proj"], t, h, post, st)
    mlp = gated_mlp_saves("mlp", t, arch.intermediate_size, act, st)
    if mlp is None:
        return None
    tail += mlp
    if kind != "gemma":
        tail += kernels.gemma_rms_norm("post_feedforward_layernorm", t, h, mm, src)
    return tail


def _rope_tables(
    arch: Architecture, st: Setting, layer_types: tuple[str, ...]
) -> tuple[Saved, ...]:
    """The rotary embedding returns cos, sin [1, s, d] in the embeddings' dtype, one pair per
    layer type for Gemma 3 (Gemma3TextModel.forward), saved by every layer's RoPE. (The
    embedding lookup times the embed_scale buffer saves only the buffer: excluded.)"""
    _, _, _, d = kernels.attention_dims(arch)
    pairs = len(set(layer_types)) if arch.model_type == "gemma3_text" else 1
    return tuple(
        t
        for i in range(max(pairs, 1))
        for t in kernels.rotary_tables(
            st.sequence, d, st.stream, SRC[arch.model_type], suffix=str(i)
        )
    )


def _head(arch: Architecture, st: Setting) -> tuple[Saved, ...]:
    """The final norm, the LM head and (Gemma 2) its final logit softcap."""
    src, h, t, vocab = SRC[arch.model_type], arch.hidden_size, st.tokens, arch.vocab_size
    _, final_cap = _caps_of(arch)
    head = kernels.gemma_rms_norm("norm", t, h, st.stream, src)
    head += kernels.linear_inputs(["lm_head"], t, h, st.stream, st)
    head += kernels.weight_casts([("lm_head", (vocab, h))], st)
    if final_cap is not None:
        head.append(
            kernels.saved(
                "final_logit_softcapping.tanh", (t, vocab), st.matmul, "TanhBackward0", src
            )
        )
    return tuple(head)


FAMILY = Family(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    tensors=build,
    saved=saved,
    peft_targets=("q_proj", "v_proj"),
    lora_ends=ModelEnds(
        layer="llama",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
        sandwich=frozenset({"gemma2", "gemma3_text"}),
        eager_attention=frozenset({"gemma2"}),
        embed_scale=True,
        head_softcap="final_logit_softcapping",
    ),
)

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    tensors=build,
    saved=(
        "no rule for Gemma3ForConditionalGeneration's vision tower and projector (the text "
        "model, model_type gemma3_text, has one)"
    ),
    peft_targets=PEFT_HAS_NONE,
)
