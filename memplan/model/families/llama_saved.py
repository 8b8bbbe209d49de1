"""Saved tensors of the Llama family (llama, mistral, qwen2, qwen3, and mixtral's MoE layer)
in transformers 5.24.

`LlamaForCausalLM`: embed_tokens -> rotary cos/sin -> layers (input_layernorm, q/k/v_proj,
[qwen3: q_norm/k_norm], RoPE, attention core, o_proj, residual, post_attention_layernorm,
gate/up_proj, act, down_proj, residual) -> norm -> lm_head -> ForCausalLMLoss.
Sources: models/llama/modeling_llama.py (mistral/qwen2/qwen3 copy it; qwen3 adds per-head
q_norm/k_norm in modeling_qwen3.py::Qwen3Attention.forward).
"""

from __future__ import annotations

from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

SRC = "transformers models/llama/modeling_llama.py"


def gated_mlp(prefix: str, tokens: int, inter: int, act: str, st: Setting) -> list[Saved] | None:
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))` (LlamaMLP.forward): the activation's
    saved tensor (gate output for silu/gelu, its output for relu), the product's two inputs
    (act output, up output) and down_proj's input. None for an activation with no rule."""
    saves_input = kernels.act_saves_input(act)
    if saves_input is None:
        return None
    shape = (tokens, inter)
    mm = st.matmul
    out = []
    if saves_input:
        out.append(kernels.saved(f"{prefix}.gate_proj.output", shape, mm, "SiluBackward0", SRC))
    out += [
        kernels.saved(f"{prefix}.act_output", shape, mm, "MulBackward0", SRC),
        kernels.saved(f"{prefix}.up_proj.output", shape, mm, "MulBackward0", SRC),
        kernels.saved(f"{prefix}.down_proj.input", shape, mm, "MmBackward0", SRC),
    ]
    return out


SRC_MOE = "transformers integrations/moe.py::grouped_mm_experts_forward"


def sparse_moe(
    prefix: str,
    tokens: int,
    arch: Architecture,
    x_dtype: str,
    st: Setting,
    *,
    renormalize: bool = True,
    weights_dtype: str = kernels.FP32,
) -> list[Saved]:
    """`MixtralSparseMoeBlock` with transformers' default experts implementation,
    `grouped_mm` (modeling_utils.py::get_correct_experts_implementation).

    Router (modeling_mixtral.py::MixtralTopKRouter): F.linear saves its input, softmax of the
    fp32 logits saves [tokens, E] fp32, topk saves int64 indices, the in-place renormalisation
    saves the top-k values and their sum. Experts, over S = tokens x top_k (token, expert)
    pairs sorted by expert: two int64 gather indices, the int32 group offsets, the gathered
    input [S, hidden], the gate_up output [S, 2 x inter] (silu's input, a view of it, and the
    up half), the act output and the product [S, inter], the routing weights [S, 1] fp32 and
    the down output [S, hidden] of the weighting multiply, the inverse permutation.
    `torch._grouped_mm` is not on CPU autocast's lists: under autocast the experts run in the
    stream dtype (measured; CUDA autocast not measured).

    Qwen's routers (Qwen2MoeTopKRouter, Qwen3MoeTopKRouter) renormalise only with
    `norm_topk_prob` (`renormalize`) and cast the routing weights to the router logits' dtype
    (`weights_dtype`).
    """
    e, k, h = arch.num_experts, arch.num_experts_per_token, arch.hidden_size
    inter = int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))
    pairs = tokens * k if st.expert_pairs is None else st.expert_pairs
    local = e if st.local_experts is None else st.local_experts
    x = st.stream
    out = kernels.linear_inputs([f"{prefix}.gate"], tokens, h, x_dtype, st)
    out += kernels.weight_casts([(f"{prefix}.gate", (e, h))], st)

    def add(name: str, shape: tuple[int, ...], dtype: str, by: str) -> None:
        out.append(kernels.saved(f"{prefix}.{name}", shape, dtype, by, SRC_MOE))

    add("router.softmax", (tokens, e), kernels.FP32, "SoftmaxBackward0")
    add("router.topk_indices", (tokens, k), kernels.INT64, "TopkBackward0")
    if renormalize:
        add("router.topk_values", (tokens, k), kernels.FP32, "DivBackward0")
        add("router.topk_sum", (tokens, 1), kernels.FP32, "DivBackward0")
    add("experts.token_index", (pairs,), kernels.INT64, "IndexBackward0")
    add("experts.perm", (pairs,), kernels.INT64, "IndexBackward0")
    add("experts.offsets", (local,), "int32", "GroupedMmBackward0")
    add("experts.input", (pairs, h), x, "GroupedMmBackward0")
    add("experts.gate_up_output", (pairs, 2 * inter), x, "SiluBackward0")
    add("experts.act_output", (pairs, inter), x, "MulBackward0")
    add("experts.down_input", (pairs, inter), x, "GroupedMmBackward0")
    add("experts.routing_weights", (pairs, 1), weights_dtype, "MulBackward0")
    add("experts.down_output", (pairs, h), x, "MulBackward0")
    add("experts.inverse_perm", (pairs,), kernels.INT64, "IndexBackward0")
    return out


def build(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """The Llama-family model's saved tensors, or why they are not modelled."""
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
    if arch.model_type == "qwen3":
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
        mlp = gated_mlp("mlp", t, inter, act, st)
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
            "k/v (modelled); on CUDA the memory-efficient kernel pads the mask (not modelled)."
            if mask
            else "",
        ),
    )
