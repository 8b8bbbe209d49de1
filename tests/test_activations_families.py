"""Activation rules of Phi-3, Gemma 1/2/3, OLMo 2 and Qwen MoE against what autograd saves.

The same contract and grid as tests/test_activations.py (eager/sdpa x fp32/bf16/amp-bf16 x
dropout off/on x checkpointing none/full, and selective checkpointing with dropout), on tiny
transformers 5.24 models built on CPU, compared to the byte block by block: the storages first
saved before the first decoder layer (embeddings), by the decoder layers, by the final norm and
the LM head, and by the loss.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.activations import Activations, predict  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.versions import at_most  # noqa: E402
from tests.activation_probe import DTYPES, build_model, saved_storages  # noqa: E402
from tests.test_activations import (  # noqa: E402
    INSTALLED_TRANSFORMERS,
    PRECISIONS,
    _selective,
    inventory,
    setting,
)

transformers.logging.set_verbosity_error()

BATCH, SEQ = 2, 24
_TINY: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
_MOE: dict[str, Any] = {
    **_TINY,
    "moe_intermediate_size": 40,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "phi3": {**_TINY, "model_type": "phi3"},
    "gemma": {**_TINY, "model_type": "gemma", "head_dim": 16},
    "gemma2": {**_TINY, "model_type": "gemma2", "head_dim": 16},
    "gemma3_text": {**_TINY, "model_type": "gemma3_text", "head_dim": 16},
    "olmo2": {**_TINY, "model_type": "olmo2"},
    "qwen2_moe": {**_MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 56},
    "qwen3_moe": {**_MOE, "model_type": "qwen3_moe", "head_dim": 16},
    "opt": {
        "model_type": "opt",
        "hidden_size": 48,
        "ffn_dim": 100,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "vocab_size": 777,
        "max_position_embeddings": 128,
    },
    "gptj": {
        "model_type": "gptj",
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 6,
        "rotary_dim": 4,
        "vocab_size": 777,
        "n_positions": 128,
    },
    "bloom": {
        "model_type": "bloom",
        "hidden_size": 48,
        "n_layer": 2,
        "n_head": 6,
        "vocab_size": 777,
    },
    # Falcon-7B's layout: multi-query attention, parallel attention and MLP.
    "falcon": {
        "model_type": "falcon",
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "ffn_hidden_size": 100,
        "vocab_size": 777,
    },
}
# Shapes and options the base configs above leave out (odd sizes: batch 3, 37 tokens).
VARIANTS: dict[str, dict[str, Any]] = {
    # Phi-4-mini's partial rotary, a sliding window shorter than the sequence, MHA.
    "phi3-partial-window": {
        **FAMILIES["phi3"],
        "partial_rotary_factor": 0.75,
        "sliding_window": 20,
    },
    "phi3-mha-relu": {**FAMILIES["phi3"], "num_key_value_heads": 6, "hidden_act": "relu"},
    # Gemma 2 without softcapping; Gemma 3 with both layer types (two RoPE pairs), its final
    # logit softcap, and a window shorter than the sequence (eager: the mask is just added).
    "gemma2-nocap": {
        **FAMILIES["gemma2"],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
    "gemma3-mixed-window": {
        **FAMILIES["gemma3_text"],
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 20,
        "final_logit_softcapping": 30.0,
    },
    # Every layer sliding: SDPA gets an explicit mask and repeated k/v.
    "gemma3-sliding": {
        **FAMILIES["gemma3_text"],
        "layer_types": ["sliding_attention", "sliding_attention"],
        "sliding_window": 20,
    },
    "olmo2-mha": {**FAMILIES["olmo2"], "num_key_value_heads": 6},
    "qwen2_moe-norm-topk": {**FAMILIES["qwen2_moe"], "norm_topk_prob": True},
    "qwen3_moe-norm-topk": {**FAMILIES["qwen3_moe"], "norm_topk_prob": True},
    # OPT-350m-style projections around the layers, a gelu MLP; GPT-J rotating whole heads.
    "opt-proj-gelu": {**FAMILIES["opt"], "word_embed_proj_dim": 32, "activation_function": "gelu"},
    "gptj-full-rotary-relu": {**FAMILIES["gptj"], "rotary_dim": 8, "activation_function": "relu"},
    # Falcon-40B/180B (grouped k/v broadcast to every head, ln_attn + ln_mlp), Falcon2-11B's
    # single norm, multi-head sequential layers (v a view of the fused output).
    "falcon-new-arch": {**FAMILIES["falcon"], "new_decoder_architecture": True, "num_kv_heads": 2},
    "falcon2-one-norm-relu": {
        **FAMILIES["falcon"],
        "new_decoder_architecture": True,
        "num_kv_heads": 2,
        "num_ln_in_parallel_attn": 1,
        "activation": "relu",
    },
    "falcon-mha-sequential": {**FAMILIES["falcon"], "multi_query": False, "parallel_attn": False},
}
DROPOUT_KEYS = {
    "phi3": ("attention_dropout", "resid_pdrop", "embd_pdrop"),
    "opt": ("dropout", "attention_dropout"),
    "gptj": ("embd_pdrop", "attn_pdrop", "resid_pdrop"),
    "bloom": ("hidden_dropout", "attention_dropout"),
    "falcon": ("hidden_dropout", "attention_dropout"),
}
# Families transformers runs without sdpa (`_supports_sdpa` False): built with its default
# attention (eager), which is what memplan predicts for them under "sdpa".
NO_SDPA = ("gemma2", "bloom")
# Config keys read from Architecture.extra beyond tests/test_activations.py's CARRIED.
CARRIED = ("hidden_activation", "dropout", "activation")
SELECTIVE_MODULE = {
    "phi3": "phi3.modeling_phi3",
    "gemma": "gemma.modeling_gemma",
    "gemma2": "gemma2.modeling_gemma2",
    "gemma3_text": "gemma3.modeling_gemma3",
    "olmo2": "olmo2.modeling_olmo2",
    "qwen2_moe": "qwen2_moe.modeling_qwen2_moe",
    "qwen3_moe": "qwen3_moe.modeling_qwen3_moe",
    "opt": "opt.modeling_opt",
    "gptj": "gptj.modeling_gptj",
    # transformers 5.25 moved Falcon onto eager_attention_forward / the sdpa interface.
    "falcon": "falcon.modeling_falcon",
}
BLOCKS = ("embeddings", "layers", "head", "loss")


def with_dropout(config: dict[str, Any], on: bool) -> dict[str, Any]:
    keys = DROPOUT_KEYS.get(config["model_type"], ("attention_dropout",))
    return {**config, **dict.fromkeys(keys, 0.1 if on else 0.0)}


# Modules whose forward ends the embeddings (the last one to run marks the boundary) and the
# final norm, whose forward starts the head; by default ("model.embed_tokens",), "model.norm".
EMBEDDINGS = {
    "opt": (
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.project_in",
    ),
    "gptj": ("transformer.wte", "transformer.drop"),
    "bloom": ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    "falcon": ("transformer.word_embeddings",),
}
FINAL_NORM = {
    "opt": "model.decoder.final_layer_norm",
    "gptj": "transformer.ln_f",
    "bloom": "transformer.ln_f",
    "falcon": "transformer.ln_f",
}


def measure_blocks(
    model: Any, *, batch: int, sequence: int, autocast: str | None
) -> dict[str, int]:
    """Forward + loss under tests/activation_probe.py's `saved_storages`, each storage
    attributed to the part of the forward that saved it first: embeddings (until the last
    embedding module returns), layers (until the final norm starts), head (final norm, LM head,
    logit softcap) and loss (transformers' loss function)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, sequence))
    exclude = [*model.parameters(), *model.buffers()]
    family = model.config.model_type
    marks: dict[str, int] = {}
    hooks = []
    with saved_storages(exclude) as measured:

        def mark(name: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                marks[name] = len(measured.storages)

            return hook

        for path in EMBEDDINGS.get(family, ("model.embed_tokens",)):
            module = model.get_submodule(path) if _has(model, path) else None
            if module is not None:
                hooks.append(module.register_forward_hook(mark("embeddings")))
        norm = model.get_submodule(FINAL_NORM.get(family, "model.norm"))
        hooks.append(norm.register_forward_pre_hook(mark("layers")))
        loss_fn = model.loss_function

        def loss_function(*args: Any, **kwargs: Any) -> Any:
            mark("head")()
            return loss_fn(*args, **kwargs)

        model.loss_function = loss_function
        cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else _nothing()
        try:
            with cast:
                loss = model(input_ids=ids, labels=ids.clone(), use_cache=False).loss
        finally:
            for hook in hooks:
                hook.remove()
    assert loss.isfinite()
    assert list(marks) == list(BLOCKS[:3]), marks
    sizes = [s.nbytes for s in measured.storages.values()]
    bounds = [0, *marks.values(), len(sizes)]
    return {name: sum(sizes[bounds[i] : bounds[i + 1]]) for i, name in enumerate(BLOCKS)}


def _has(model: Any, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def predicted_blocks(saved: Activations) -> dict[str, int]:
    """memplan's blocks, with the per-forward RoPE cos/sin (listed under embeddings, first
    saved by the first decoder layer) moved to the layers."""
    out = dict.fromkeys(BLOCKS, 0)
    for block in saved.blocks:
        for t in block.tensors:
            moved = block.name == "embeddings" and t.name.startswith("rotary_emb.")
            out["layers" if moved else block.name] += t.bytes * block.count
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def compare(
    config: dict[str, Any],
    *,
    attention: str,
    precision: str,
    checkpointing: str = "none",
    batch: int = BATCH,
    seq: int = SEQ,
    patch: Callable[[], Any] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """(measured, predicted) saved bytes per block for one case."""
    dtype, cast, _, _ = PRECISIONS[precision]
    no_sdpa = config["model_type"] in NO_SDPA and attention == "sdpa"
    build_attention = None if no_sdpa else attention
    model = build_model(
        config,
        attention=build_attention,  # type: ignore[arg-type]
        dtype=dtype,
        checkpointing="full" if checkpointing == "full" else "none",
    )
    with patch() if patch else _nothing():
        measured = measure_blocks(model, batch=batch, sequence=seq, autocast=cast)
    inv = inventory(config)
    assert inv.architecture is not None
    extra = {**inv.architecture.extra, **{k: config[k] for k in CARRIED if k in config}}
    inv = dataclasses.replace(inv, architecture=dataclasses.replace(inv.architecture, extra=extra))
    st: Setting = setting(precision, attention, checkpointing, batch, seq)
    saved = predict(inv, st)
    assert saved.modelled, saved.notes
    return measured, predicted_blocks(saved)


MATRIX = list(
    itertools.product(
        tuple(FAMILIES), ("eager", "sdpa"), tuple(PRECISIONS), (False, True), ("none", "full")
    )
)


@pytest.mark.parametrize(
    ("family", "attention", "precision", "dropout", "checkpointing"),
    MATRIX,
    ids=["-".join(str(x) for x in case) for case in MATRIX],
)
def test_family_saved_bytes_match(
    family: str, attention: str, precision: str, dropout: bool, checkpointing: str
) -> None:
    config = with_dropout(FAMILIES[family], dropout)
    measured, predicted = compare(
        config, attention=attention, precision=precision, checkpointing=checkpointing
    )
    assert predicted == measured


@contextmanager
def _bloom_selective() -> Iterator[None]:
    """tests/test_activations.py's `_selective` for BLOOM, whose attention core is inline in
    BloomAttention.forward: the same forward with the core (reshapes, baddbmm, softmax,
    dropout, bmm, merge) under torch.utils.checkpoint, keeping the q, k, v views."""
    from transformers.models.bloom import modeling_bloom as mb

    original = mb.BloomAttention.forward

    def forward(
        self: Any, hidden_states: Any, residual: Any, alibi: Any, attention_mask: Any, **kw: Any
    ) -> Any:
        batch, length, _ = hidden_states.shape
        query, key, value = self._reshape(self.query_key_value(hidden_states))

        def core(q: Any, k: Any, v: Any) -> Any:
            rows = batch * self.num_heads
            q = q.reshape(rows, -1, self.head_dim)
            k = k.reshape(rows, -1, self.head_dim).transpose(-1, -2)
            v = v.reshape(rows, -1, self.head_dim)
            scores = alibi.baddbmm(batch1=q, batch2=k, beta=self.beta, alpha=self.inv_norm_factor)
            weights = scores.view(batch, self.num_heads, length, -1) + attention_mask
            probs = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = self.attention_dropout(probs)
            return self._merge_heads(torch.bmm(probs.view(rows, length, -1), v))

        context = torch.utils.checkpoint.checkpoint(core, query, key, value, use_reentrant=False)
        output = mb.dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
        return output, None

    mb.BloomAttention.forward = forward
    try:
        yield
    finally:
        mb.BloomAttention.forward = original


@contextmanager
def _falcon_selective() -> Iterator[None]:
    """`_selective` for Falcon (rotary layers), whose attention is inline in
    FalconAttention.forward: the core after RoPE (sdpa, or eager's matmul/softmax/matmul, and
    the merge of the heads) under torch.utils.checkpoint, keeping q, k, v."""
    from transformers.models.falcon import modeling_falcon as mf

    original = mf.FalconAttention.forward
    functional = torch.nn.functional

    def forward(
        self: Any,
        hidden_states: Any,
        alibi: Any,
        attention_mask: Any,
        position_embeddings: Any = None,
        **kw: Any,
    ) -> Any:
        kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
        query, key, value = self._split_heads(self.query_key_value(hidden_states))
        batch, length = query.shape[:2]
        query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
        key = key.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
        value = value.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
        query, key = mf.apply_rotary_pos_emb(query, key, *position_embeddings)

        def core(q: Any, k: Any, v: Any) -> Any:
            if self.config._attn_implementation == "sdpa":
                out = functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            else:
                scores = q @ k.transpose(-1, -2)
                scores /= math.sqrt(self.head_dim)
                dtype = hidden_states.dtype
                out = functional.softmax(scores + attention_mask, dim=-1, dtype=dtype) @ v
            out = out.view(batch, self.num_heads, length, self.head_dim).permute(0, 2, 1, 3)
            return out.reshape(batch, length, self.num_heads * self.head_dim)

        context = torch.utils.checkpoint.checkpoint(core, query, key, value, use_reentrant=False)
        return self.dense(context), None

    mf.FalconAttention.forward = forward
    try:
        yield
    finally:
        mf.FalconAttention.forward = original


INLINE_SELECTIVE: dict[str, Callable[[], Any]] = {
    "bloom": _bloom_selective,
    # Falcon's attention is inline in FalconAttention.forward up to transformers 5.24.
    **({"falcon": _falcon_selective} if at_most(INSTALLED_TRANSFORMERS, "5.24") else {}),
}
SELECTIVE = list(itertools.product(tuple(FAMILIES), ("eager", "sdpa"), tuple(PRECISIONS)))


@pytest.mark.parametrize(
    ("family", "attention", "precision"),
    SELECTIVE,
    ids=["-".join(case) for case in SELECTIVE],
)
def test_family_selective_checkpointing_matches(
    family: str, attention: str, precision: str
) -> None:
    config = with_dropout(FAMILIES[family], True)
    measured, predicted = compare(
        config,
        attention=attention,
        precision=precision,
        checkpointing="selective",
        patch=INLINE_SELECTIVE.get(family) or _selective(SELECTIVE_MODULE[family]),
    )
    assert predicted == measured


# Dropout off takes SDPA's CPU flash kernel (masks, grouped k/v), on its math fallback.
VARIANT_CASES = list(
    itertools.product(tuple(VARIANTS), ("eager", "sdpa"), tuple(PRECISIONS), (False, True))
)


@pytest.mark.parametrize(
    ("variant", "attention", "precision", "dropout"),
    VARIANT_CASES,
    ids=["-".join(str(x) for x in case) for case in VARIANT_CASES],
)
def test_family_variants_match(variant: str, attention: str, precision: str, dropout: bool) -> None:
    config = with_dropout(VARIANTS[variant], dropout)
    if variant == "gemma3-mixed-window" and attention == "sdpa":
        # Sliding layers get an explicit mask, full ones do not: refused, with the reason.
        saved = predict(inventory(config), setting(precision, attention, "none", 3, 37))
        assert not saved.modelled and "sliding-window" in saved.notes[0]
        return
    measured, predicted = compare(config, attention=attention, precision=precision, batch=3, seq=37)
    assert predicted == measured


def test_refusals_say_why() -> None:
    """Layouts a single layer rule cannot describe are refused, not guessed."""
    st = setting("fp32", "sdpa", "none", BATCH, SEQ)
    mixed = predict(inventory({**FAMILIES["qwen2_moe"], "mlp_only_layers": [0]}), st)
    assert not mixed.modelled and "dense MLP layers" in mixed.notes[0]
    gemma2 = predict(inventory(FAMILIES["gemma2"]), st)
    assert gemma2.modelled and any("eager" in n for n in gemma2.notes)


# Falcon's layouts under selective checkpointing: the core's inputs differ per layout (5.25's v
# is a view of the fused projection in every layout; 5.24's only in multi-head layers).
FALCON_SELECTIVE = list(
    itertools.product(
        ("falcon-new-arch", "falcon2-one-norm-relu", "falcon-mha-sequential"),
        ("eager", "sdpa"),
        tuple(PRECISIONS),
    )
)


@pytest.mark.parametrize(
    ("variant", "attention", "precision"),
    FALCON_SELECTIVE,
    ids=["-".join(case) for case in FALCON_SELECTIVE],
)
def test_falcon_variants_selective_checkpointing_match(
    variant: str, attention: str, precision: str
) -> None:
    measured, predicted = compare(
        with_dropout(VARIANTS[variant], False),
        attention=attention,
        precision=precision,
        checkpointing="selective",
        patch=INLINE_SELECTIVE.get("falcon") or _selective(SELECTIVE_MODULE["falcon"]),
    )
    assert predicted == measured
