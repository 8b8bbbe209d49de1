"""Building blocks shared by every family: the decoder-only ones (llama.py, mixtral.py,
qwen_moe.py, ...) and, through `_classic`, the pre-Llama ones (gpt2.py, bert.py, t5.py, ...).

Why a module of its own: every family in transformers 5.x is assembled from the same few
`nn.Module`s (a Linear with or without bias, an RMSNorm, a gate/up/down MLP, fused MoE experts,
a rotary embedding holding `inv_freq` buffers) and differs only in which of them a decoder layer
holds and in what order. Each family module therefore describes one layer *template* (tensor
names relative to the layer) and `stamp_layers` repeats it per layer index, so that building the
61-layer DeepSeek-V3 inventory is a few thousand small objects, not a model.

Order matters: tensors are listed in `nn.Module` registration order, which is the order of
`model.named_parameters()` / `model.named_buffers()` (a module's own tensors, then its
children's, depth first); `assemble` splits one ordered list into parameters and buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memplan.errors import MemplanError
from memplan.model.inventory import (
    Architecture,
    Config,
    Inventory,
    TensorSpec,
    model_name,
    rotary_fraction,
)

Part = tuple[TensorSpec, ...]
"""Tensors of one module (or layer template), names relative to it, in registration order."""

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def param(name: str, shape: tuple[int, ...], role: str, *, dtype: str | None = None) -> TensorSpec:
    """A trainable parameter (`nn.Parameter`)."""
    return TensorSpec(name, shape, "parameter", dtype=dtype, role=role)


def buffer(
    name: str, shape: tuple[int, ...], role: str, *, dtype: str | None, persistent: bool
) -> TensorSpec:
    """A buffer (`nn.Buffer` / `register_buffer`); `persistent=False` keeps it out of state_dict,
    `dtype` None when it follows the model dtype."""
    return TensorSpec(name, shape, "buffer", dtype=dtype, persistent=persistent, role=role)


def linear(
    name: str, out_features: int, in_features: int, role: str, *, bias: bool = False
) -> Part:
    """`nn.Linear(in_features, out_features, bias)`: weight [out, in] (+ bias [out])."""
    weight = param(f"{name}.weight", (out_features, in_features), role)
    if not bias:
        return (weight,)
    return weight, param(f"{name}.bias", (out_features,), role)


def norm(name: str, dim: int, *, bias: bool = False, role: str = "norm") -> Part:
    """An RMSNorm (weight [dim]) or, with `bias`, an `nn.LayerNorm` (weight and bias [dim])."""
    weight = param(f"{name}.weight", (dim,), role)
    if not bias:
        return (weight,)
    return weight, param(f"{name}.bias", (dim,), role)


def gated_mlp(
    prefix: str, hidden: int, inter: int, role: str = "mlp", *, bias: bool = False
) -> Part:
    """The SwiGLU/GeGLU MLP of `LlamaMLP`: gate_proj, up_proj [inter, hidden], down_proj."""
    return (
        *linear(f"{prefix}.gate_proj", inter, hidden, role, bias=bias),
        *linear(f"{prefix}.up_proj", inter, hidden, role, bias=bias),
        *linear(f"{prefix}.down_proj", hidden, inter, role, bias=bias),
    )


def self_attention(dims: Dims, *, qkv_bias: bool, o_bias: bool, qk_norm: bool = False) -> Part:
    """`self_attn` of `LlamaAttention` and kin: q_proj [heads*hd, H], k_proj and v_proj
    [kv_heads*hd, H], o_proj [H, heads*hd]; `qk_norm` adds the per-head `q_norm`/`k_norm`
    RMSNorms [head_dim] of Qwen3 and Gemma 3, registered after o_proj."""
    hidden, q_out, kv_out = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    part = (
        *linear("self_attn.q_proj", q_out, hidden, "attention", bias=qkv_bias),
        *linear("self_attn.k_proj", kv_out, hidden, "attention", bias=qkv_bias),
        *linear("self_attn.v_proj", kv_out, hidden, "attention", bias=qkv_bias),
        *linear("self_attn.o_proj", hidden, q_out, "attention", bias=o_bias),
    )
    if qk_norm:
        part += norm("self_attn.q_norm", dims.head_dim) + norm("self_attn.k_norm", dims.head_dim)
    return part


def fused_experts(prefix: str, num_experts: int, hidden: int, inter: int) -> Part:
    """transformers 5.x fused experts (`MixtralExperts` and kin): two 3-D parameters.

    gate_up_proj [E, 2*inter, hidden] (gate and up stacked on dim 1), down_proj [E, hidden, inter].
    """
    return (
        param(f"{prefix}.gate_up_proj", (num_experts, 2 * inter, hidden), "experts"),
        param(f"{prefix}.down_proj", (num_experts, hidden, inter), "experts"),
    )


def rotary_buffers(prefix: str, rotary_dim: int, *, tag: str = "", role: str = "attention") -> Part:
    """`inv_freq` and `original_inv_freq`: [ceil(rotary_dim / 2)] fp32, non-persistent.

    Source: transformers 5.24 `LlamaRotaryEmbedding.__init__` (and every family's copy, e.g.
    `GPTNeoXRotaryEmbedding`, `FalconRotaryEmbedding`):
    `inv_freq = 1 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)`, registered as
    `nn.Buffer(inv_freq, persistent=False)` plus a clone `original_inv_freq`. The explicit
    `dtype=torch.float` keeps them fp32 whatever dtype the model is built in. `tag` prefixes
    the names for per-layer-type rotaries (`Gemma3RotaryEmbedding`: `full_attention_inv_freq`);
    `role` is "attention" in the decoder families, "rotary" in the pre-Llama ones.
    """
    half = (rotary_dim + 1) // 2
    return tuple(
        buffer(f"{prefix}.{tag}{name}", (half,), role, dtype="fp32", persistent=False)
        for name in ("inv_freq", "original_inv_freq")
    )


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE dict as `PreTrainedConfig.convert_rope_params_to_dict` (5.24) resolves it.

    Legacy `rope_scaling` wins over `rope_parameters`; a top-level `partial_rotary_factor` fills
    in when the dict has none.
    """
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    found = config.get(key) or {}
    if not isinstance(found, Mapping):
        raise MemplanError(
            f"{key} must be a mapping such as {{rope_type: linear, factor: 2.0}}, got {found!r}.",
            field=key,
        )
    params = dict(found)
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return params


def rotary_dim(params: Mapping[str, Any], head_dim: int, *, default_is_partial: bool) -> int:
    """Dimensions that get rotated, from which `inv_freq` is sized.

    Source: transformers 5.24 `modeling_rope_utils.py`: every non-default rope type (linear,
    dynamic, yarn, longrope, llama3) uses `int(head_dim * partial_rotary_factor)`; the
    "default" type uses each family's own `compute_default_rope_parameters`, which ignores
    `partial_rotary_factor` except where `default_is_partial` (Phi-3).
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default" and not default_is_partial:
        return head_dim
    return int(head_dim * rotary_fraction(params.get("partial_rotary_factor", 1.0)))


def stamp_layers(
    templates: Sequence[Part],
    prefix: str = "model.layers",
    *,
    layer_offset: int = 0,
    decoder: bool = True,
) -> list[TensorSpec]:
    """Every repeated block: `templates[i]` with names `{prefix}.{i}.{name}` and
    `layer = layer_offset + i` (repeated templates are the same object).

    `layer_offset` numbers blocks after an earlier stack's (T5's decoder follows its encoder);
    with `decoder=False` the layer is None (the block is not a decoder layer, e.g. a vision
    encoder layer).
    """
    return [
        TensorSpec(
            f"{prefix}.{index}.{t.name}",
            t.shape,
            t.kind,
            t.dtype,
            t.persistent,
            layer_offset + index if decoder else None,
            t.role,
        )
        for index, template in enumerate(templates)
        for t in template
    ]


def rotary_emb(
    cfg: Config, head_dim: int, *, default_is_partial: bool = False, prefix: str = "model"
) -> Part:
    """The buffers of `{prefix}.rotary_emb`, sized from the config's RoPE dict (`rotary_dim`)."""
    dim = rotary_dim(rope_parameters(cfg.data), head_dim, default_is_partial=default_is_partial)
    return rotary_buffers(f"{prefix}.rotary_emb", dim)


def decoder_backbone(
    dims: Dims,
    templates: Sequence[Part],
    rotary: Part,
    *,
    prefix: str = "model",
    embed_extra: Part = (),
) -> list[TensorSpec]:
    """A Llama-style base model under `prefix`: `embed_tokens` (weight [V, H], then
    `embed_extra`), the layers (`templates[i]` for layer i), the final `norm`, then `rotary`."""
    return [
        param(f"{prefix}.embed_tokens.weight", (dims.vocab, dims.hidden), "embedding"),
        *embed_extra,
        *stamp_layers(templates, prefix=f"{prefix}.layers"),
        *norm(f"{prefix}.norm", dims.hidden),
        *rotary,
    ]


def causal_lm(
    *,
    cfg: Config,
    architecture: Architecture,
    tensors: Iterable[TensorSpec],
    tie_default: bool = False,
    embed_name: str = EMBED,
    notes: Iterable[str] = (),
) -> Inventory:
    """The inventory of a `*ForCausalLM`: `tensors` (the base model) then `lm_head`.

    `lm_head = nn.Linear(hidden, vocab, bias=False)`; with `tie_word_embeddings` (default
    `tie_default`) transformers makes it the embedding's tensor (`_tied_weights_keys =
    {"lm_head.weight": embed}`), listed once under `embed_name`, as `model.named_parameters()`
    does.
    """
    ordered = list(tensors)
    tied: tuple[tuple[str, str], ...] = ()
    if cfg.bool("tie_word_embeddings", tie_default):
        tied = ((LM_HEAD, embed_name),)
    else:
        shape = (architecture.vocab_size, architecture.hidden_size)
        ordered.append(param(LM_HEAD, shape, "head"))
    return assemble(cfg=cfg, architecture=architecture, tensors=ordered, tied=tied, notes=notes)


def assemble(
    *,
    cfg: Config,
    architecture: Architecture,
    tensors: Iterable[TensorSpec],
    tied: Iterable[tuple[str, str]] = (),
    notes: Iterable[str] = (),
) -> Inventory:
    """An `Inventory` from one ordered list of parameters and buffers, named after the config
    (`_name_or_path`, else the model_type)."""
    ordered = list(tensors)
    return Inventory(
        name=model_name(cfg, architecture.model_type),
        architecture=architecture,
        parameters=tuple(t for t in ordered if t.kind == "parameter"),
        buffers=tuple(t for t in ordered if t.kind == "buffer"),
        tied=tuple(tied),
        notes=tuple(notes),
    )


def resolve(
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    aliases: Mapping[str, str] | None = None,
    origin: str = "config",
) -> Config:
    """config.json over the config class's defaults, as the class's `__init__` would see it.

    A key absent from config.json takes the class default; a key present with `null` stays
    None (e.g. DeepSeek `q_lora_rank: null` means no q LoRA, not the default rank; GPT-J
    `rotary_dim: null` means "rotate the whole head", not the default 64). `aliases` is the
    class's `attribute_map` (e.g. Mixtral `num_experts` -> `num_local_experts`, GPT-2
    `hidden_size` -> `n_embd`).
    """
    merged = dict(defaults)
    for key, value in config.items():
        merged[(aliases or {}).get(key, key)] = value
    return Config(merged, origin=origin)


def present(cfg: Config, key: str) -> Any:
    """The resolved value of `key`, None included (unlike `Config.get`, no default)."""
    return cfg.data.get(key)


def int_or(cfg: Config, key: str, fallback: int) -> int:
    """`cfg[key]` when set (a non-negative int), else `fallback` (the class's `__post_init__`)."""
    if present(cfg, key) is None:
        return fallback
    return cfg.int(key)


def int_list(cfg: Config, key: str) -> tuple[int, ...]:
    """A list of layer indices (e.g. `mlp_only_layers`); None means empty."""
    value = present(cfg, key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise MemplanError(
            f"{cfg.origin}: {key} must be a list of layer indices, got {value!r}.", field=key
        )
    return tuple(value)


def divide_heads(cfg: Config, hidden: int, heads: int) -> int:
    """`hidden_size // num_attention_heads`, refusing zero heads with the key named."""
    if heads == 0:
        raise MemplanError(
            f"{cfg.origin}: num_attention_heads must be positive.", field="num_attention_heads"
        )
    return hidden // heads


@dataclass(frozen=True, slots=True, kw_only=True)
class Dims:
    """The sizes a family reads from its config and records in its `Architecture`."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int

    @classmethod
    def mha(
        cls,
        *,
        hidden: int,
        layers: int,
        vocab: int,
        heads: int,
        inter: int,
        head_dim: int | None = None,
    ) -> Dims:
        """Multi-head attention: a key/value head per query head, of `head_dim` (None:
        hidden // heads)."""
        return cls(
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            heads=heads,
            kv_heads=heads,
            head_dim=hidden // heads if head_dim is None else head_dim,
            inter=inter,
        )


def read_dims(cfg: Config) -> Dims:
    """The Llama-style keys, in this order: hidden_size, num_attention_heads,
    num_key_value_heads (null: heads), head_dim (null: hidden // heads), intermediate_size,
    num_hidden_layers, vocab_size."""
    hidden = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = int_or(cfg, "num_key_value_heads", heads)
    head_dim = int_or(cfg, "head_dim", divide_heads(cfg, hidden, heads))
    return Dims(
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        inter=cfg.int("intermediate_size"),
        layers=cfg.int("num_hidden_layers"),
        vocab=cfg.int("vocab_size"),
    )


RULE_KEYS = (
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "attention_probs_dropout_prob",
    "attn_pdrop",
    "embd_pdrop",
    "hidden_dropout",
    "hidden_dropout_prob",
    "resid_pdrop",
)
"""config.json keys the activation rules and the stacks' refusals read from
`Architecture.extra` (the MLP's activation, the biases, the dropout probabilities): carried
from the config itself, so no rule reads its default where the config says otherwise."""


def architecture(
    cfg: Config,
    model_type: str,
    dims: Dims,
    *,
    max_positions: int | None = None,
    experts: int = 0,
    top_k: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Architecture:
    """The `Architecture` of every family: `dims`, the experts, `extra` (family facts, over the
    config's own RULE_KEYS) and `max_positions` (None: the config's `max_position_embeddings`,
    read here)."""
    if max_positions is None:
        max_positions = cfg.int("max_position_embeddings")
    return Architecture(
        model_type=model_type,
        hidden_size=dims.hidden,
        num_layers=dims.layers,
        vocab_size=dims.vocab,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        intermediate_size=dims.inter,
        num_experts=experts,
        num_experts_per_token=top_k,
        max_position_embeddings=max_positions,
        extra={
            **{k: cfg.get(k) for k in RULE_KEYS if k in cfg},
            **({} if extra is None else extra),
        },
    )
