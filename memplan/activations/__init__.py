"""Activations, tensor by tensor: what autograd saves for backward in one forward pass.

`predict(inventory, setting)` returns the saved tensors of the transformers 5.24 model the
inventory describes, grouped in blocks (embeddings, decoder layers, head, loss), for eager or
SDPA attention, dropout on or off, any precision recipe (autocast included), activation
checkpointing none/full/selective, on CUDA or CPU kernels. Families without rules say so
(`Activations.modelled` is False) instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable

from memplan.activations import gpt2, llama
from memplan.activations.assemble import Model, finish
from memplan.activations.tensors import (
    Activations,
    AttentionKind,
    Block,
    Checkpointing,
    Device,
    Saved,
    Setting,
    not_modelled,
)
from memplan.models.inventory import Architecture, Inventory

FamilyRule = Callable[..., "Model | str"]

# model_type -> the rule that lists its saved tensors.
RULES: dict[str, FamilyRule] = {
    "llama": llama.build,
    "mistral": llama.build,
    "qwen2": llama.build,
    "qwen3": llama.build,
    "gpt2": gpt2.build,
}

# The head classes whose forward memplan models (a causal LM and its loss).
CAUSAL_LM_CLASSES = ("GPT2LMHeadModel",)


def modelled_families() -> list[str]:
    return sorted(RULES)


def predict(inventory: Inventory, setting: Setting) -> Activations:
    """The activations of one forward pass (and its loss) on one GPU."""
    arch = inventory.architecture
    if arch is None:
        return not_modelled(
            "activations not modelled: the model is a bare parameter count (give hf_config, "
            "a preset or an architecture)."
        )
    why = _unsupported(arch)
    rule = RULES.get(arch.model_type)
    if rule is None or why:
        return not_modelled(
            why
            or f"activations of model_type {arch.model_type!r} are not modelled yet "
            f"(modelled: {', '.join(modelled_families())}): per_gpu.activations is 0 and "
            "the peak leaves them out."
        )
    model = rule(arch, setting, tied=bool(inventory.tied))
    if isinstance(model, str):
        return not_modelled(f"activations not modelled: {model}.")
    return finish(model, setting)


def _unsupported(arch: Architecture) -> str:
    """Why this architecture's forward is outside the rules, or ''."""
    cls = arch.extra.get("model_class")
    if cls is not None and "LMHead" not in str(cls) and "CausalLM" not in str(cls):
        return (
            f"activations not modelled for {cls}: memplan models causal-LM heads and their "
            "loss only."
        )
    if arch.extra.get("add_cross_attention"):
        return "activations not modelled: cross-attention layers."
    return ""


__all__ = [
    "Activations",
    "AttentionKind",
    "Block",
    "Checkpointing",
    "Device",
    "Saved",
    "Setting",
    "modelled_families",
    "predict",
]
