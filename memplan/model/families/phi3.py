"""Phi-3 (and Phi-3.5-mini, Phi-4-mini): llama-like, with fused projections.

Source: transformers 5.24 models/phi3/modeling_phi3.py:
- Phi3Attention: `o_proj` [H, heads*hd] registered before `qkv_proj` [heads*hd + 2*kv*hd, H];
  no biases; head_dim = config.head_dim if set, else hidden // heads.
- Phi3MLP: `gate_up_proj` [2I, H] (gate and up stacked) and `down_proj` [H, I], no biases.
- Phi3DecoderLayer: self_attn, mlp, input_layernorm, post_attention_layernorm (the two
  resid dropouts hold no tensors).
- Phi3RotaryEmbedding.compute_default_rope_parameters: unlike Llama, the default rope rotates
  int(head_dim * partial_rotary_factor) dims (Phi-4-mini uses 0.75); `su`/`yarn` rope types
  are renamed `longrope` by Phi3Config, with the same inv_freq size.
Defaults: configuration_phi3.py: Phi3Config.

Saved tensors of Phi-3 (`Phi3ForCausalLM`: Phi-3/3.5-mini, Phi-4-mini) in transformers 5.24.

models/phi3/modeling_phi3.py: embed_tokens -> rotary cos/sin -> layers (input_layernorm,
qkv_proj [fused, q | k | v], partial RoPE, attention core, o_proj, resid_attn_dropout,
residual, post_attention_layernorm, gate_up_proj [fused, gate | up], act, down_proj,
resid_mlp_dropout, residual) -> norm -> lm_head -> ForCausalLMLoss. `embd_pdrop` is in the
config but the model applies no embedding dropout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._decoder import (
    Part,
    architecture,
    causal_lm,
    decoder_backbone,
    linear,
    norm,
    read_dims,
    resolve,
    rope_parameters,
    rotary_buffers,
    rotary_dim,
)
from memplan.model.families.record import PEFT_HAS_NONE, Family, ModelEnds
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Inventory

# Phi3Config dataclass defaults (transformers 5.24); num_key_value_heads None -> heads.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "sliding_window": None,
}


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, DEFAULTS, origin=origin)
    dims = read_dims(cfg)
    hidden, inter, q_out = dims.hidden, dims.inter, dims.heads * dims.head_dim

    layer: Part = (
        *linear("self_attn.o_proj", hidden, q_out, "attention"),
        *linear(
            "self_attn.qkv_proj", q_out + 2 * dims.kv_heads * dims.head_dim, hidden, "attention"
        ),
        *linear("mlp.gate_up_proj", 2 * inter, hidden, "mlp"),
        *linear("mlp.down_proj", hidden, inter, "mlp"),
        *norm("input_layernorm", hidden),
        *norm("post_attention_layernorm", hidden),
    )
    rot = rotary_dim(rope_parameters(cfg.data), dims.head_dim, default_is_partial=True)
    tensors = decoder_backbone(dims, [layer] * dims.layers, rotary_buffers("model.rotary_emb", rot))
    arch = architecture(
        cfg,
        "phi3",
        dims,
        extra={
            "fused_qkv": True,
            "fused_gate_up": True,
            "sliding_window": cfg.get("sliding_window"),
            "rotary_dim": rot,
        },
    )
    return causal_lm(cfg=cfg, architecture=arch, tensors=tensors)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/phi3/modeling_phi3.py"


def fused_gated_mlp(
    prefix: str, tokens: int, inter: int, act: str, st: Setting
) -> list[Saved] | None:
    """`Phi3MLP.forward`: `gate, up = gate_up_proj(x).chunk(2)`, `down_proj(up * act(gate))`.

    gate and up are views of one [tokens, 2 x inter] output: the activation's saved input (or
    the multiply's `up`) keeps that whole storage; the multiply also saves the activation's
    output, and down_proj its input. The same for silu and relu (relu's saved output is the
    activation output the multiply keeps anyway). None for an activation with no rule."""
    if kernels.act_saves_input(act) is None:
        return None
    mm = st.matmul
    by = "SiluBackward0" if kernels.act_saves_input(act) else "MulBackward0"
    return [
        kernels.saved(f"{prefix}.gate_up_proj.output", (tokens, 2 * inter), mm, by, SRC),
        kernels.saved(f"{prefix}.act_output", (tokens, inter), mm, "MulBackward0", SRC),
        kernels.saved(f"{prefix}.down_proj.input", (tokens, inter), mm, "MmBackward0", SRC),
    ]


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """Phi-3's saved tensors, or why they are not modelled."""
    x = arch.extra
    act = str(x.get("hidden_act", "silu"))
    h, a, kv, d = kernels.attention_dims(arch)
    inter, vocab = arch.intermediate_size, arch.vocab_size
    rot = int(x.get("rotary_dim", d))
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    window = x.get("sliding_window")
    mask = st.attention == "sdpa" and isinstance(window, int) and s > window
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    drop_resid = dropout_on(st, x, "resid_pdrop", default=0.0)
    qkv_width = (a + 2 * kv) * d

    layer: list[Saved] = kernels.rms_norm("input_layernorm", t, h, st.stream, st)
    normed = kernels.rms_norm_out(st.stream, st)
    layer += kernels.linear_inputs(["self_attn.qkv_proj"], t, h, normed, st)
    layer += kernels.weight_casts(
        [
            ("self_attn.qkv_proj", (qkv_width, h)),
            ("self_attn.o_proj", (h, a * d)),
            ("mlp.gate_up_proj", (2 * inter, h)),
            ("mlp.down_proj", (h, inter)),
        ],
        st,
    )
    # apply_rotary_pos_emb: cat([q_rot * cos + rotate_half(q_rot) * sin, q_pass]) makes q and k
    # new contiguous [b, heads, s, d] tensors (promoted with cos's dtype), even at
    # partial_rotary_factor 1; v stays a view of the qkv_proj output.
    qk = promote(mm, st.stream)
    # eager reads only q's and v's dtypes; the layout flags are SDPA's.
    qkv = attention.Qkv(q=qk, k=qk, v=mm, mask=mask, q_contiguous=True)
    core = attention.core(
        st, heads, qkv, dropout_on=drop_attn, source=SRC + "::eager_attention_forward"
    )
    core = attention.value_is_projection_view(core, heads, qkv_width, mm)

    tail: list[Saved] = []
    if drop_resid:
        tail.append(kernels.dropout("resid_attn_dropout.mask", (b, s, h), mm, st))
    post = promote(st.stream, mm)  # residual + o_proj output
    tail += kernels.rms_norm("post_attention_layernorm", t, h, post, st)
    tail += kernels.linear_inputs(["mlp.gate_up_proj"], t, h, kernels.rms_norm_out(post, st), st)
    mlp = fused_gated_mlp("mlp", t, inter, act, st)
    if mlp is None:
        return f"hidden_act {act!r} has no activation rule"
    tail += mlp
    if drop_resid:
        tail.append(kernels.dropout("resid_mlp_dropout.mask", (b, s, h), mm, st))

    embeddings = [kernels.embedding_indices("embed_tokens.indices", (b, s))]
    # Phi3RotaryEmbedding: cos, sin [1, s, rotary dims] in the embeddings' dtype, saved by
    # every layer's RoPE multiplies (one storage each).
    rope = kernels.rotary_tables(s, rot, st.stream, SRC)
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
    )


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    tensors=build,
    saved=saved,
    peft_targets=PEFT_HAS_NONE,
    lora_ends=ModelEnds(
        layer="phi3",
        embeddings=(("embed_tokens", "model.embed_tokens"),),
        final_norm="model.norm",
        final_prefix="norm",
        rms_norm=True,
    ),
)
