"""OLMo 2: llama-like, with norms after attention and MLP and full-width q/k norms.

A module of its own because its layer differs from Llama's in three places at once.
Source: transformers 5.24 models/olmo2/modeling_olmo2.py:
- Olmo2Attention: q/k/v/o (bias = `attention_bias`), then `q_norm` RMSNorm over the whole
  q projection [heads * head_dim] and `k_norm` over k [kv_heads * head_dim] (Qwen3 and
  Gemma 3 norm per head instead).
- Olmo2DecoderLayer: self_attn, mlp (Olmo2MLP gate/up/down, no bias), post_attention_layernorm,
  post_feedforward_layernorm; no input_layernorm.
Defaults: configuration_olmo2.py: Olmo2Config.

Saved tensors of OLMo 2 (`Olmo2ForCausalLM`) in transformers 5.24.

models/olmo2/modeling_olmo2.py: embed_tokens -> rotary cos/sin (fp32) -> layers (q/k/v_proj
of the layer's input (no norm before attention), q_norm/k_norm over the whole q and k
projections, RoPE cast back to q's dtype, attention core, o_proj, post_attention_layernorm,
residual, gate/up_proj, act, down_proj, post_feedforward_layernorm, residual) -> norm ->
lm_head -> ForCausalLMLoss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    gated_mlp,
    norm,
    read_dims,
    resolve,
    rotary_emb,
    self_attention,
)
from memplan.model.families.record import PEFT_HAS_NONE, Family, ModelEnds
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

# Olmo2Config dataclass defaults (transformers 5.24); num_key_value_heads None -> heads.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, DEFAULTS, origin=origin)
    dims = read_dims(cfg)
    bias = cfg.bool("attention_bias", False)

    layer: Part = (
        *self_attention(dims, qkv_bias=bias, o_bias=bias),
        *norm("self_attn.q_norm", dims.heads * dims.head_dim),
        *norm("self_attn.k_norm", dims.kv_heads * dims.head_dim),
        *gated_mlp("mlp", dims.hidden, dims.inter),
        *norm("post_attention_layernorm", dims.hidden),
        *norm("post_feedforward_layernorm", dims.hidden),
    )
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_emb(cfg, dims.head_dim))
    arch = architecture(cfg, "olmo2", dims)
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/olmo2/modeling_olmo2.py"


def olmo2_rms_norm(prefix: str, tokens: int, width: int) -> list[Saved]:
    """`Olmo2RMSNorm.forward`: `(weight * (x32 * rsqrt(var + eps))).to(x.dtype)`.

    The weight multiplies the fp32 normalised tensor, so that is what it saves: Gemma's norm
    (kernels.gemma_rms_norm) without the `1 + weight` tensor. The output is in x's dtype."""
    return kernels.gemma_rms_norm(prefix, tokens, width, kernels.FP32, SRC)[:3]


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """OLMo 2's saved tensors, or why they are not modelled."""
    x = arch.extra
    act = str(x.get("hidden_act", "silu"))
    h, a, kv, d = kernels.attention_dims(arch)
    inter, vocab = arch.intermediate_size, arch.vocab_size
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)

    # q/k/v_proj read the layer's input (the residual stream) directly.
    layer: list[Saved] = kernels.linear_inputs(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], t, h, st.stream, st
    )
    layer += kernels.weight_casts(kernels.projection_weights(h, a, kv, d, inter), st)
    layer += olmo2_rms_norm("self_attn.q_norm", t, a * d)
    layer += olmo2_rms_norm("self_attn.k_norm", t, kv * d)
    # apply_rotary_pos_emb returns q_embed.to(q.dtype): q and k stay in the matmul dtype.
    qkv = attention.Qkv(q=mm, k=mm, v=mm)
    core = attention.core(
        st,
        heads,
        qkv,
        dropout_on=drop_attn,
        source=SRC + "::eager_attention_forward",
    )

    post = promote(st.stream, mm)  # residual + normalised attention output
    tail = olmo2_rms_norm("post_attention_layernorm", t, h)
    tail += kernels.linear_inputs(["mlp.gate_proj", "mlp.up_proj"], t, h, post, st)
    mlp = gated_mlp_saves("mlp", t, inter, act, st)
    if mlp is None:
        return f"hidden_act {act!r} has no activation rule"
    tail += mlp
    tail += olmo2_rms_norm("post_feedforward_layernorm", t, h)

    embeddings = [kernels.embedding_indices("embed_tokens.indices", (b, s))]
    # Olmo2RotaryEmbedding.forward returns cos, sin in fp32 (no cast to the embeddings' dtype).
    rope = kernels.rotary_tables(s, d, kernels.FP32, SRC)
    head = olmo2_rms_norm("norm", t, h)
    head += kernels.linear_inputs(["lm_head"], t, h, st.stream, st)
    head += kernels.weight_casts([("lm_head", (vocab, h))], st)
    return Model(
        embeddings=tuple(embeddings),
        per_forward=tuple(rope),
        layer_head=tuple(layer),
        core=core,
        layer_tail=tuple(tail),
        head=tuple(head),
        vocab=vocab,
        hidden=h,
        num_layers=arch.num_layers,
    )


FAMILY = Family(
    name="olmo2",
    model_types=("olmo2",),
    tensors=build,
    saved=saved,
    peft_targets=PEFT_HAS_NONE,
    # Olmo2DecoderLayer: no input or pre-feed-forward norm; post_attention_layernorm and
    # post_feedforward_layernorm norm each sublayer's output before its residual.
    lora_ends=ModelEnds(
        layer="llama",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
        sandwich=frozenset({"olmo2"}),
    ),
)
