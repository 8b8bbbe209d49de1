"""Saved tensors of OLMo 2 (`Olmo2ForCausalLM`) in transformers 5.24.

models/olmo2/modeling_olmo2.py: embed_tokens -> rotary cos/sin (fp32) -> layers (q/k/v_proj
of the layer's input (no norm before attention), q_norm/k_norm over the whole q and k
projections, RoPE cast back to q's dtype, attention core, o_proj, post_attention_layernorm,
residual, gate/up_proj, act, down_proj, post_feedforward_layernorm, residual) -> norm ->
lm_head -> ForCausalLMLoss.
"""

from __future__ import annotations

from memplan.model.families.gemma_saved import gemma_rms_norm
from memplan.model.families.llama_saved import gated_mlp
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/olmo2/modeling_olmo2.py"


def olmo2_rms_norm(prefix: str, tokens: int, width: int) -> list[Saved]:
    """`Olmo2RMSNorm.forward`: `(weight * (x32 * rsqrt(var + eps))).to(x.dtype)`.

    The weight multiplies the fp32 normalised tensor, so that is what it saves: Gemma's norm
    (`gemma_rms_norm`) without the `1 + weight` tensor. The output is in x's dtype."""
    return gemma_rms_norm(prefix, tokens, width, kernels.FP32, SRC)[:3]


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
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
    mlp = gated_mlp("mlp", t, inter, act, st)
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
