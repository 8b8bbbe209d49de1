"""Saved tensors of the Llama-style decoder in transformers 5.24: llama, mistral, qwen2, qwen3
(memplan.model.families.llama), mixtral's MoE layer (memplan.model.families.mixtral) and the
attention, norms and head of Qwen MoE (memplan.model.families.qwen_moe).

`LlamaForCausalLM`: embed_tokens -> rotary cos/sin -> layers (input_layernorm, q/k/v_proj,
[qwen3: q_norm/k_norm], RoPE, attention core, o_proj, residual, post_attention_layernorm,
gate/up_proj, act, down_proj, residual) -> norm -> lm_head -> ForCausalLMLoss.
Sources: models/llama/modeling_llama.py (mistral/qwen2/qwen3 copy it; qwen3 adds per-head
q_norm/k_norm in modeling_qwen3.py::Qwen3Attention.forward).
"""

from __future__ import annotations

from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import gated_mlp_saves, sparse_moe
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/llama/modeling_llama.py"


CUDA_MASK_PADDING = "on CUDA the memory-efficient kernel pads the mask (not modelled)"
"""A term the figure leaves out (memplan.report.notes.NOT_MODELLED)."""


def saved(arch: Architecture, st: Setting, *, tied: bool, qk_norm: bool = False) -> Model | str:
    """The Llama-style decoder's saved tensors, or why they are not modelled; `qk_norm`:
    Qwen3's per-head q_norm/k_norm (modeling_qwen3.py::Qwen3Attention.forward)."""
    x = arch.extra
    act = str(x.get("hidden_act", "silu"))
    h, a, kv, d = kernels.attention_dims(arch)
    inter, vocab = arch.intermediate_size, arch.vocab_size
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    window = x.get("sliding_window")
    mask = st.attention == "sdpa" and isinstance(window, int) and s > window
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)

    layer: list[Saved] = kernels.rms_norm("input_layernorm", t, h, st.stream, st)
    normed = kernels.rms_norm_out(st.stream, st)
    layer += kernels.linear_inputs(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], t, h, normed, st
    )
    layer += kernels.weight_casts(
        kernels.projection_weights(h, a, kv, d, None if arch.num_experts else inter), st
    )
    q_dtype = k_dtype = mm
    if qk_norm:
        # modeling_qwen3.py: q_norm(q_proj(x).view(b, s, a, d)): an RMSNorm over head_dim.
        layer += kernels.rms_norm("self_attn.q_norm", t * a, d, mm, st)
        layer += kernels.rms_norm("self_attn.k_norm", t * kv, d, mm, st)
        q_dtype = k_dtype = kernels.rms_norm_out(mm, st)
    # apply_rotary_pos_emb: q * cos + rotate_half(q) * sin, cos/sin in the stream dtype.
    q_dtype, k_dtype = promote(q_dtype, st.stream), promote(k_dtype, st.stream)
    qkv = attention.Qkv(q=q_dtype, k=k_dtype, v=mm, mask=mask)
    core = attention.core(
        st,
        heads,
        qkv,
        dropout_on=drop_attn,
        source=SRC + "::eager_attention_forward",
    )
    post = promote(st.stream, mm)  # residual + o_proj output
    tail = kernels.rms_norm("post_attention_layernorm", t, h, post, st)
    if arch.num_experts:
        if act not in ("silu", "swish"):
            return f"MoE hidden_act {act!r} has no activation rule"
        tail += sparse_moe("mlp", t, arch, kernels.rms_norm_out(post, st), st)
    else:
        tail += kernels.linear_inputs(
            ["mlp.gate_proj", "mlp.up_proj"], t, h, kernels.rms_norm_out(post, st), st
        )
        mlp = gated_mlp_saves("mlp", t, inter, act, st)
        if mlp is None:
            return f"hidden_act {act!r} has no activation rule"
        tail += mlp

    embeddings = [kernels.embedding_indices("embed_tokens.indices", (b, s))]
    # LlamaRotaryEmbedding.forward returns cos, sin [1, s, d] in the embeddings' dtype; the
    # first layer's RoPE saves them and every later layer saves the same storages.
    rope = kernels.rotary_tables(s, d, st.stream, SRC)
    head = kernels.rms_norm_head(t, h, vocab, st)
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
        notes=(
            "sliding window shorter than the sequence: SDPA gets an explicit mask and repeated "
            "k/v (modelled)" + (f"; {CUDA_MASK_PADDING}." if st.device == "cuda" else ".")
            if mask
            else "",
        ),
    )
