"""Saved tensors of Gemma 1, 2 and 3 (text) in transformers 5.24: `GemmaForCausalLM`,
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
Every norm is GemmaRMSNorm (`gemma_rms_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families.llama_saved import gated_mlp
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

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


def gemma_rms_norm(prefix: str, tokens: int, width: int, x_dtype: str, src: str) -> list[Saved]:
    """`GemmaRMSNorm.forward` (and Gemma2/Gemma3's copies):

        x32 = x.float(); y = x32 * rsqrt(x32.pow(2).mean(-1) + eps)
        return (y * (1.0 + weight.float())).type_as(x)

    pow saves x32 [tokens, width] fp32 (x itself when x is fp32); rsqrt saves its result and
    the multiply saves it again [tokens, 1] fp32; `* (1 + w)` saves y [tokens, width] fp32 and
    the new tensor 1 + w [width] fp32 (not a parameter). The output is in x's dtype.
    """
    fp32 = kernels.FP32
    return [
        kernels.saved(f"{prefix}.input_fp32", (tokens, width), fp32, "PowBackward0", src),
        kernels.saved(f"{prefix}.rstd", (tokens, 1), fp32, "RsqrtBackward0", src),
        kernels.saved(f"{prefix}.normalized", (tokens, width), fp32, "MulBackward0", src),
        kernels.saved(f"{prefix}.one_plus_weight", (width,), fp32, "MulBackward0", src),
    ]


def _softcaps(arch: Architecture) -> tuple[float | None, float | None]:
    defaults = SOFTCAP_DEFAULTS[arch.model_type]
    x: Mapping[str, Any] = arch.extra

    def cap(key: str) -> float | None:
        value = x[key] if key in x else defaults[key]
        return None if value is None else float(value)

    return cap("attn_logit_softcapping"), cap("final_logit_softcapping")


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """Gemma's saved tensors, or why they are not modelled."""
    kind = arch.model_type
    src = SRC[kind]
    x = arch.extra
    act = str(x.get("hidden_activation") or x.get("hidden_act") or "gelu_pytorch_tanh")
    if act == "gelu":  # GemmaConfig.__post_init__ (gemma 1) replaces it
        act = "gelu_pytorch_tanh"
    h, a, kv, d = kernels.attention_dims(arch)
    inter, vocab = arch.intermediate_size, arch.vocab_size
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    attn_cap, final_cap = _softcaps(arch)
    if kind != "gemma2":
        attn_cap = None  # Gemma3Attention does not pass its softcap to the attention function
    layer_types = tuple(x.get("layer_types") or ())
    if x.get("use_bidirectional_attention"):
        return "bidirectional attention (use_bidirectional_attention) has no rule"

    # Gemma2PreTrainedModel._supports_sdpa is False: transformers falls back to eager when no
    # attn_implementation is requested (modeling_utils.py::get_correct_attn_implementation);
    # an explicit "sdpa" raises.
    eager = st.attention == "eager" or kind == "gemma2"
    note = ""
    if kind == "gemma2" and st.attention == "sdpa":
        note = (
            "Gemma 2 has no sdpa attention in transformers (softcapping): it runs eager "
            "attention, as transformers does by default (an explicit sdpa raises)."
        )
    mask = False
    if kind != "gemma" and not eager:
        window = x.get("sliding_window")
        if isinstance(window, int) and s > window and "sliding_attention" in layer_types:
            if "full_attention" in layer_types:
                return (
                    "sliding-window layers shorter than the sequence next to full-attention "
                    "layers save different tensors under sdpa (one layer kind per rule)"
                )
            mask = True

    layer: list[Saved] = gemma_rms_norm("input_layernorm", t, h, st.stream, src)
    layer += kernels.linear_inputs(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], t, h, st.stream, st
    )
    layer += kernels.weight_casts(kernels.projection_weights(h, a, kv, d, inter), st)
    if kind == "gemma3_text":
        # Gemma3Attention: q_norm/k_norm over head_dim of q, k [b, heads, s, d] (in mm).
        layer += gemma_rms_norm("self_attn.q_norm", t * a, d, mm, src)
        layer += gemma_rms_norm("self_attn.k_norm", t * kv, d, mm, src)
    # apply_rotary_pos_emb: q * cos + rotate_half(q) * sin, cos/sin in the stream dtype.
    qk = promote(mm, st.stream)
    qkv = attention.Qkv(q=qk, k=qk, v=mm, mask=mask)
    if eager:
        core = attention.eager(
            st,
            heads,
            qkv,
            softmax_fp32=True,
            convert_to_query=True,
            dropout_on=drop_attn,
            source=src + "::eager_attention_forward",
        )
        if attn_cap is not None:
            # tanh(scores / cap) saves its result, in the matmul's dtype (before the mask).
            capped = kernels.saved(
                "attn.softcap_tanh", (b, a, s, s), mm, "TanhBackward0", src + "::eager"
            )
            core = attention.Core(core=(*core.core, capped), inputs=core.inputs, output=core.output)
    else:
        core = attention.sdpa(st, heads, qkv, dropout_on=drop_attn)

    post = promote(st.stream, mm)  # residual + attention output
    tail: list[Saved] = []
    if kind == "gemma":
        tail += gemma_rms_norm("post_attention_layernorm", t, h, post, src)
        mlp_in = post
    else:
        tail += gemma_rms_norm("post_attention_layernorm", t, h, mm, src)
        tail += gemma_rms_norm("pre_feedforward_layernorm", t, h, post, src)
        mlp_in = post
    tail += kernels.linear_inputs(["mlp.gate_proj", "mlp.up_proj"], t, h, mlp_in, st)
    mlp = gated_mlp("mlp", t, inter, act, st)
    if mlp is None:
        return f"hidden_activation {act!r} has no activation rule"
    tail += mlp
    if kind != "gemma":
        tail += gemma_rms_norm("post_feedforward_layernorm", t, h, mm, src)

    # The lookup times the embed_scale buffer: the multiply saves only the buffer (excluded).
    embeddings = [kernels.embedding_indices("embed_tokens.indices", (b, s))]
    # The rotary embedding returns cos, sin [1, s, d] in the embeddings' dtype, one pair per
    # layer type for Gemma 3 (Gemma3TextModel.forward), saved by every layer's RoPE.
    pairs = len(set(layer_types)) if kind == "gemma3_text" else 1
    rope = [
        t
        for i in range(max(pairs, 1))
        for t in kernels.rotary_tables(s, d, st.stream, src, suffix=str(i))
    ]
    head = gemma_rms_norm("norm", t, h, st.stream, src)
    head += kernels.linear_inputs(["lm_head"], t, h, st.stream, st)
    head += kernels.weight_casts([("lm_head", (vocab, h))], st)
    if final_cap is not None:
        head.append(
            kernels.saved("final_logit_softcapping.tanh", (t, vocab), mm, "TanhBackward0", src)
        )
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
        notes=(note,),
    )
