"""memplan's activations against what autograd really saves (transformers 5.24, torch CPU).

Each case builds a tiny model, runs forward + loss under saved_tensors_hooks
(tests/activation_probe.py) and compares the deduplicated bytes with `memplan.activations.
predict` for the CPU profile. Agreement is exact to the byte (the issue allows 1%).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.activations import Setting, predict  # noqa: E402
from memplan.model.sources import Inventory, from_config  # noqa: E402
from memplan.versions import major_minor  # noqa: E402
from tests.activation_probe import build_model, measure  # noqa: E402

# The rules are asked about the transformers that runs the measured models.
INSTALLED_TRANSFORMERS = major_minor(transformers.__version__)

transformers.logging.set_verbosity_error()

BATCH, SEQ = 2, 24
LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1041,
    "max_position_embeddings": 128,
}
GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 1041,
    "n_positions": 128,
}
_ODD = {
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3": {**_ODD, "model_type": "qwen3", "head_dim": 16},
    "qwen2": {**_ODD, "model_type": "qwen2"},
    "mistral-window": {**_ODD, "model_type": "mistral", "sliding_window": 20},
    "llama-mha": {**_ODD, "model_type": "llama", "num_key_value_heads": 6},
    "llama-relu": {**_ODD, "model_type": "llama", "hidden_act": "relu"},
    "gpt-neox": {
        **{k: v for k, v in _ODD.items() if k != "num_key_value_heads"},
        "model_type": "gpt_neox",
        "rotary_pct": 0.25,
    },
    "gpt-neox-sequential": {
        **{k: v for k, v in _ODD.items() if k != "num_key_value_heads"},
        "model_type": "gpt_neox",
        "use_parallel_residual": False,
    },
    "bert-mlm": {
        **{k: v for k, v in _ODD.items() if k != "num_key_value_heads"},
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
    },
    "mixtral": {
        **_ODD,
        "model_type": "mixtral",
        "intermediate_size": 40,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "gpt2-relu": {
        **GPT2,
        "n_embd": 48,
        "n_head": 6,
        "vocab_size": 777,
        "activation_function": "relu",
    },
}
# config.json keys the activation rules read from Architecture.extra (see report).
CARRIED = (
    "hidden_act",
    "activation_function",
    "attention_dropout",
    "hidden_dropout",
    "embd_pdrop",
    "attn_pdrop",
    "resid_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)
PRECISIONS = {
    # name: (model dtype, autocast dtype, Setting stream, matmul)
    "fp32": ("fp32", None, "fp32", "fp32"),
    "bf16": ("bf16", None, "bf16", "bf16"),
    "amp-bf16": ("fp32", "bf16", "fp32", "bf16"),
}


def with_dropout(config: dict[str, Any], on: bool) -> dict[str, Any]:
    p = 0.1 if on else 0.0
    keys = {
        "gpt2": ("embd_pdrop", "attn_pdrop", "resid_pdrop"),
        "gpt_neox": ("attention_dropout", "hidden_dropout"),
        "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    }.get(config["model_type"], ("attention_dropout",))
    return {**config, **dict.fromkeys(keys, p)}


def inventory(config: dict[str, Any]) -> Inventory:
    """memplan's inventory, with the config keys the activation rules read carried in extra."""
    inv = from_config(config)
    assert inv.architecture is not None
    extra = {**inv.architecture.extra, **{k: config[k] for k in CARRIED if k in config}}
    return dataclasses.replace(inv, architecture=dataclasses.replace(inv.architecture, extra=extra))


def setting(precision: str, attention: str, checkpointing: str, batch: int, seq: int) -> Setting:
    _, cast, stream, matmul = PRECISIONS[precision]
    return Setting(
        batch=batch,
        sequence=seq,
        stream=stream,
        matmul=matmul,
        autocast=cast is not None,
        device="cpu",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing=checkpointing,  # type: ignore[arg-type]
        transformers=INSTALLED_TRANSFORMERS,
    )


def compare(
    config: dict[str, Any],
    *,
    attention: str,
    precision: str,
    checkpointing: str = "none",
    batch: int = BATCH,
    seq: int = SEQ,
    patch: Callable[[], Any] | None = None,
) -> tuple[int, int]:
    """(measured, predicted) saved bytes for one case."""
    dtype, cast, _, _ = PRECISIONS[precision]
    build_ckpt = "full" if checkpointing == "full" else "none"
    model = build_model(config, attention=attention, dtype=dtype, checkpointing=build_ckpt)
    with patch() if patch else _nothing():
        measured, loss = measure(model, batch=batch, sequence=seq, autocast=cast)
    assert loss.isfinite()
    predicted = predict(inventory(config), setting(precision, attention, checkpointing, batch, seq))
    assert predicted.modelled
    return measured.bytes, predicted.bytes


@contextmanager
def _nothing() -> Iterator[None]:
    yield


MATRIX = list(
    itertools.product(
        ("llama", "gpt2"), ("eager", "sdpa"), tuple(PRECISIONS), (False, True), ("none", "full")
    )
)


@pytest.mark.parametrize(
    ("family", "attention", "precision", "dropout", "checkpointing"),
    MATRIX,
    ids=["-".join(str(x) for x in case) for case in MATRIX],
)
def test_saved_bytes_match(
    family: str, attention: str, precision: str, dropout: bool, checkpointing: str
) -> None:
    config = with_dropout(LLAMA if family == "llama" else GPT2, dropout)
    measured, predicted = compare(
        config, attention=attention, precision=precision, checkpointing=checkpointing
    )
    assert predicted == measured


# Dropout on exercises every branch (masks, SDPA's math fallback); off is covered by the
# matrix above, and for the families whose layers differ most from it.
VARIANT_CASES = [
    (variant, attention, precision, dropout)
    for variant in VARIANTS
    for attention in ("eager", "sdpa")
    for precision in PRECISIONS
    for dropout in (
        (False, True)
        if variant in ("gpt-neox", "bert-mlm", "mixtral", "mistral-window")
        else (True,)
    )
]


@pytest.mark.parametrize(
    ("variant", "attention", "precision", "dropout"),
    VARIANT_CASES,
    ids=["-".join(str(x) for x in case) for case in VARIANT_CASES],
)
def test_variants_match(variant: str, attention: str, precision: str, dropout: bool) -> None:
    """qwen3 q/k norms, qwen2 biases, a sliding window shorter than the sequence, MHA (no
    GQA), relu MLPs, GPT-NeoX (partial RoPE, parallel and sequential residual), BERT with its
    masked-LM head, Mixtral's routed experts (grouped_mm); odd sizes (hidden 48, 6 heads,
    2 kv heads, 37 tokens, batch 3)."""
    config = with_dropout(VARIANTS[variant], dropout)
    measured, predicted = compare(config, attention=attention, precision=precision, batch=3, seq=37)
    assert predicted == measured


def _selective(module_name: str) -> Callable[[], Any]:
    """Patch transformers so each attention core runs under torch.utils.checkpoint (what
    Megatron calls selective recomputation), keeping q, k, v as the checkpoint's inputs."""

    @contextmanager
    def patched() -> Iterator[None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        module = __import__(f"transformers.models.{module_name}", fromlist=["x"])
        eager = module.eager_attention_forward
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(mod: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
                def core(q: Any, k: Any, v: Any) -> Any:
                    return fn(mod, q, k, v, mask, **kw)

                return torch.utils.checkpoint.checkpoint(core, q, k, v, use_reentrant=False)

            return run

        module.eager_attention_forward = wrap(eager)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = wrap(sdpa)
        try:
            yield
        finally:
            module.eager_attention_forward = eager
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa

    return patched


SELECTIVE = list(itertools.product(("llama", "gpt2"), ("eager", "sdpa"), tuple(PRECISIONS)))


@pytest.mark.parametrize(
    ("family", "attention", "precision"),
    SELECTIVE,
    ids=["-".join(case) for case in SELECTIVE],
)
def test_selective_checkpointing_matches(family: str, attention: str, precision: str) -> None:
    config = with_dropout(LLAMA if family == "llama" else GPT2, True)
    module = "llama.modeling_llama" if family == "llama" else "gpt2.modeling_gpt2"
    measured, predicted = compare(
        config,
        attention=attention,
        precision=precision,
        checkpointing="selective",
        patch=_selective(module),
    )
    assert predicted == measured
