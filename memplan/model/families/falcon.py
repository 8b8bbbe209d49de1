"""Falcon (model_type "falcon").

Layout of transformers 5.24 `models/falcon/modeling_falcon.py`: `FalconModel` holds
`word_embeddings` [V, H], blocks `h.{i}` (`FalconDecoderLayer`), `ln_f` and `rotary_emb`.

`FalconAttention.query_key_value` fuses q, k and v; its output width is
- `new_decoder_architecture` (Falcon-40B/180B): (2 * num_kv_heads + heads) * head_dim,
- else `multi_query` (Falcon-7B, the class default): H + 2 * head_dim (one shared k/v head),
- else 3 * H;
then `dense` [H, H]. `FalconMLP` is `dense_h_to_4h` [ffn_hidden_size, H] and `dense_4h_to_h`
(`ffn_hidden_size: null` means 4 * H). All these Linears have a bias only when `bias`
(default False). head_dim is H // heads (`FalconConfig.head_dim`), `num_kv_heads: null` = heads.

The LayerNorms are registered after attention and MLP (`FalconDecoderLayer.__init__`):
- not `parallel_attn`: `post_attention_layernorm`, then `input_layernorm`;
- `parallel_attn` with `num_ln_in_parallel_attn == 2` (the default under
  `new_decoder_architecture`): `ln_attn`, `ln_mlp`;
- else one `input_layernorm`.

Buffers: `rotary_emb.inv_freq` / `original_inv_freq` (fp32, non-persistent) over head_dim dims
(`FalconRotaryEmbedding.compute_default_rope_parameters`; other rope types use
int(head_dim * partial_rotary_factor)). They exist even with `alibi: true`, which only changes the
forward. `lm_head` is tied to `word_embeddings` by default (`tie_word_embeddings: True` in
`configuration_falcon.py`). A legacy `n_embed` key overrides `hidden_size`.

Class: `architectures[0]` when it is one of `_CLASSES`, else `FalconForCausalLM`
(`AutoModelForCausalLM`).

Saved tensors of Falcon (`FalconForCausalLM`) with rotary positions in transformers 5.25,
and in 5.24 where 5.25 changed the attention (`Setting.transformers` picks): Falcon-7B
(multi-query, parallel attention), Falcon-40B/180B (`new_decoder_architecture`:
grouped key/value heads, ln_attn and ln_mlp) and multi-head sequential variants.

5.24.0 modeling_falcon.py: word_embeddings -> rotary cos/sin -> layers (input_layernorm
or ln_attn/ln_mlp; query_key_value (FalconLinear: `x @ weight.T`), _split_heads (the key and
value of multi-query and new-architecture layers are picked with a one-element index list: the
int64 index is saved), q/k/v `transpose(1, 2).reshape` (new-architecture k/v expanded to
every head), RoPE, its own attention (eager: `q @ k^T / sqrt(d)`, softmax in the hidden
states' dtype, `@ v`, no dropout; sdpa: `scaled_dot_product_attention` with the causal mask
always given (`allow_is_causal_skip=False`)), merge, dense; MLP dense_h_to_4h, act,
dense_4h_to_h; dropout_add) -> ln_f -> lm_head -> ForCausalLMLoss. ALiBi Falcons (falcon-rw)
are not modelled.

transformers 5.25 rewrote FalconAttention.forward onto the shared path (llama's): the fused
output is `view`ed to [b, s, heads, d] and split with plain slices (`split` / `[..., -2, :]`:
no int64 index is saved), k/v keep their own heads (multi-query: 1, new architecture:
num_kv_heads), and the core is `eager_attention_forward` (`repeat_kv`, `softmax(...,
dtype=float32).to(query.dtype)`, attention dropout while training) or transformers'
`sdpa_attention_forward` (the causal mask is still always given, so grouped k/v are repeated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.model.families._classic import (
    embedding,
    flag,
    layer_norm,
    pick_class,
    rope_parameters,
    with_class_head,
)
from memplan.model.families._decoder import (
    Dims,
    Part,
    architecture,
    assemble,
    int_or,
    linear,
    present,
    resolve,
    rotary_buffers,
    rotary_dim,
    stamp_layers,
)
from memplan.model.families.record import Family
from memplan.model.forward import attention, kernels
from memplan.model.forward.assemble import Model, dropout_on
from memplan.model.forward.mlp import mlp_act
from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture, Config, Inventory
from memplan.versions import at_most

# configuration_falcon.py: FalconConfig defaults. A null flag reads as False in the model code
# (`if config.multi_query:`), which `flag` reproduces.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65024,
    "hidden_size": 4544,
    "num_hidden_layers": 32,
    "num_attention_heads": 71,
    "num_ln_in_parallel_attn": None,
    "num_kv_heads": None,
    "alibi": False,
    "new_decoder_architecture": False,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "max_position_embeddings": 2048,
    "ffn_hidden_size": None,
    "tie_word_embeddings": True,
}
_CLASSES = (
    "FalconForCausalLM",
    "FalconModel",
    "FalconForSequenceClassification",
    "FalconForTokenClassification",
    "FalconForQuestionAnswering",
)
_DEFAULT_CLASS = "FalconForCausalLM"


def qkv_width(cfg: Config, hidden: int, heads: int, kv_heads: int) -> int:
    """Output features of `FalconAttention.query_key_value`."""
    head_dim = hidden // heads
    if flag(cfg, "new_decoder_architecture"):
        return (2 * kv_heads + heads) * head_dim
    if flag(cfg, "multi_query"):
        return hidden + 2 * head_dim
    return 3 * hidden


def effective_kv_heads(cfg: Config, heads: int, num_kv_heads: int) -> int:
    """K/V heads the attention actually has: 1 under old-style multi_query."""
    if flag(cfg, "new_decoder_architecture") or not flag(cfg, "multi_query"):
        return num_kv_heads
    return 1


def norms(cfg: Config, hidden: int) -> Part:
    """The LayerNorms of one `FalconDecoderLayer`, in registration order."""
    num_ln = present(cfg, "num_ln_in_parallel_attn")
    if num_ln is None and flag(cfg, "new_decoder_architecture"):
        num_ln = 2
    if not flag(cfg, "parallel_attn"):
        return (
            *layer_norm("post_attention_layernorm", hidden),
            *layer_norm("input_layernorm", hidden),
        )
    if num_ln == 2:
        return (*layer_norm("ln_attn", hidden), *layer_norm("ln_mlp", hidden))
    return layer_norm("input_layernorm", hidden)


def layer(cfg: Config, hidden: int, qkv: int, ffn: int) -> Part:
    """One `FalconDecoderLayer`, in registration order."""
    bias = flag(cfg, "bias")
    return (
        *linear("self_attention.query_key_value", qkv, hidden, "attention", bias=bias),
        *linear("self_attention.dense", hidden, hidden, "attention", bias=bias),
        *linear("mlp.dense_h_to_4h", ffn, hidden, "mlp", bias=bias),
        *linear("mlp.dense_4h_to_h", hidden, ffn, "mlp", bias=bias),
        *norms(cfg, hidden),
    )


def build(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    cfg = resolve(config, _DEFAULTS, origin=origin)
    cls, notes = pick_class(cfg, _CLASSES, _DEFAULT_CLASS, why="AutoModelForCausalLM")
    hidden = int_or(cfg, "n_embed", cfg.int("hidden_size"))  # legacy n_embed wins
    layers = cfg.int("num_hidden_layers")
    heads = cfg.int("num_attention_heads")
    vocab = cfg.int("vocab_size")
    head_dim = hidden // heads
    num_kv_heads = int_or(cfg, "num_kv_heads", heads)
    ffn = int_or(cfg, "ffn_hidden_size", 4 * hidden)
    qkv = qkv_width(cfg, hidden, heads, num_kv_heads)

    backbone = [
        *embedding("word_embeddings", vocab, hidden),
        *stamp_layers([layer(cfg, hidden, qkv, ffn)] * layers, "h"),
        *layer_norm("ln_f", hidden),
        *rotary_buffers(
            "rotary_emb",
            # head_dim for the default rope; int(head_dim * partial_rotary_factor) for the others
            rotary_dim(rope_parameters(cfg), head_dim, default_is_partial=False),
            role="rotary",
        ),
    ]
    tensors, tied = with_class_head(
        cfg,
        cls,
        "Falcon",
        prefix="transformer",
        backbone=backbone,
        embed="word_embeddings.weight",
        hidden=hidden,
        vocab=vocab,
    )
    dims = Dims(
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        heads=heads,
        kv_heads=effective_kv_heads(cfg, heads, num_kv_heads),
        head_dim=head_dim,
        inter=ffn,
    )
    arch = architecture(
        cfg,
        "falcon",
        dims,
        extra={
            "model_class": cls,
            "new_decoder_architecture": flag(cfg, "new_decoder_architecture"),
            "multi_query": flag(cfg, "multi_query"),
            "parallel_attn": flag(cfg, "parallel_attn"),
            "alibi": flag(cfg, "alibi"),
            "bias": flag(cfg, "bias"),
            "num_ln_in_parallel_attn": present(cfg, "num_ln_in_parallel_attn"),
        },
    )
    return assemble(cfg=cfg, architecture=arch, tensors=tensors, tied=tied, notes=notes)


# --- saved tensors (the rule memplan.activations.predict runs) -------------------------

SRC = "transformers models/falcon/modeling_falcon.py"
LAST_OLD_ATTENTION = "5.24"
"""The last transformers whose FalconAttention splits heads with index lists and runs its own
attention (5.24.0 modeling_falcon.py::FalconAttention._split_heads / forward)."""


def saved(arch: Architecture, st: Setting, *, tied: bool) -> Model | str:
    """Falcon's saved tensors, or why they are not modelled."""
    x = arch.extra
    if x.get("alibi"):
        return "Falcon with ALiBi (falcon-rw) has no rule"
    new_arch = bool(x.get("new_decoder_architecture", False))
    multi_query = bool(x.get("multi_query", True)) and not new_arch
    parallel = bool(x.get("parallel_attn", True))
    two_norms = new_arch and int(x.get("num_ln_in_parallel_attn") or 2) == 2
    act = str(x.get("activation", "gelu"))
    h, a, kv, d = kernels.attention_dims(arch)
    ffn, vocab = arch.intermediate_size, arch.vocab_size
    b, s, t = st.batch, st.sequence, st.tokens
    mm = st.matmul
    drop_hidden = dropout_on(st, x, "hidden_dropout", default=0.0)
    drop_attn = dropout_on(st, x, "attention_dropout", default=0.0)
    # 5.24: new-architecture key/value heads are broadcast to every query head before the core.
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a if new_arch else kv, head_dim=d)

    embeddings = [kernels.embedding_indices("word_embeddings.indices", (b, s))]
    rope = kernels.rotary_tables(s, d, st.stream, SRC)

    ln_out = kernels.layer_norm_dtype(st, st.stream)
    if two_norms:
        layer = kernels.layer_norm("ln_attn", t, h, st.stream, st)
        layer += kernels.layer_norm("ln_mlp", t, h, st.stream, st)[1:]  # same input
        layer += kernels.linear_inputs(["self_attention.query_key_value"], t, h, ln_out, st)
        layer += kernels.linear_inputs(["mlp.dense_h_to_4h"], t, h, ln_out, st)
    else:
        layer = kernels.layer_norm("input_layernorm", t, h, st.stream, st)
        readers = ["self_attention.query_key_value"]
        if parallel:
            readers.append("mlp.dense_h_to_4h")
        layer += kernels.linear_inputs(readers, t, h, ln_out, st)
    layer += kernels.weight_casts(
        [
            ("self_attention.query_key_value", ((a + 2 * kv) * d, h)),
            ("self_attention.dense", (h, a * d)),
            ("mlp.dense_h_to_4h", (ffn, h)),
            ("mlp.dense_4h_to_h", (h, ffn)),
        ],
        st,
    )
    # `transpose(1, 2).reshape(b, heads, s, d)` (5.24) / `transpose(1, 2)` (5.25) keep the
    # [b, s, heads, d] layout; RoPE makes new q and k in that layout.
    qk = promote(mm, st.stream)
    qkv = attention.Qkv(q=qk, k=qk, v=mm, mask=True)
    old_attention = at_most(st.transformers, LAST_OLD_ATTENTION)
    if old_attention:
        layer += _index_saves(multi_query or new_arch)
        core = _core_524(st, heads, qkv, a)
    else:
        # 5.25: k/v keep their heads (num_kv_heads = 1 for multi-query); the core is
        # eager_attention_forward or sdpa_attention_forward with the mask always given.
        kv_heads = kv if new_arch else 1 if multi_query else a
        heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv_heads, head_dim=d)
        core = attention.core(
            st, heads, qkv, dropout_on=drop_attn, source=SRC + "::eager_attention_forward"
        )
    if not (multi_query or new_arch) or not old_attention:
        # Multi-head layers, and every 5.25 layer (`split` / `[..., -1, :]` / `unbind`): v is
        # a view of the fused query_key_value output.
        width = (a + 2 * kv) * d
        core = attention.value_is_projection_view(core, heads, width, mm)

    tail: list[Saved] = []
    post = promote(st.stream, mm)
    if not parallel and not new_arch:
        if drop_attn:
            tail.append(kernels.dropout("attention.dropout_add.mask", (b, s, h), mm, st))
        tail += kernels.layer_norm("post_attention_layernorm", t, h, post, st)
        tail += kernels.linear_inputs(
            ["mlp.dense_h_to_4h"], t, h, kernels.layer_norm_dtype(st, post), st
        )
    mlp = mlp_act("mlp.act", t, ffn, act, st, out_name="mlp.dense_4h_to_h")
    if mlp is None:
        return f"activation {act!r} has no rule"
    tail += mlp
    if drop_hidden:
        tail.append(kernels.dropout("mlp.dropout_add.mask", (b, s, h), mm, st))

    head = kernels.layer_norm_head("ln_f", "lm_head", t, h, vocab, post, st)
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


def _index_saves(indexed: bool) -> list[Saved]:
    """5.24: `qkv[..., [-2], :]` and `qkv[..., [-1], :]` (multi-query and new-architecture
    layers): IndexBackward0 saves each int64 index list (5.24.0 FalconAttention._split_heads)."""
    if not indexed:
        return []
    return [
        kernels.saved(f"self_attention.{n}_index", (1,), kernels.INT64, "IndexBackward0", SRC)
        for n in ("key", "value")
    ]


def _core_524(st: Setting, heads: attention.Heads, qkv: attention.Qkv, a: int) -> attention.Core:
    """5.24.0 FalconAttention.forward's own attention (rotary path)."""
    if st.attention == "eager":
        # softmax(scores + mask, dtype=hidden_states.dtype): the scores' dtype on CPU.
        return attention.eager(
            st,
            heads,
            qkv,
            softmax_fp32=False,
            convert_to_query=None,
            dropout_on=False,
            source=SRC + "::FalconAttention.forward (5.24)",
        )
    if heads.kv_heads != a:
        # Multi-query k/v [b, 1, s, d] broadcast over the heads: no fused kernel takes them
        # without enable_gqa, SDPA runs its math path (measured).
        return attention._sdpa_math(st, heads, qkv, dropout_on=False)
    return attention.sdpa(st, heads, qkv, dropout_on=False)


FAMILY = Family(
    name="falcon",
    model_types=("falcon",),
    tensors=build,
    saved=saved,
    peft_targets=("query_key_value",),
)
