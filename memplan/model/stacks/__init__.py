"""Model code other than transformers': the tensors another stack's own model saves for backward
(`torchtitan`: torchtitan's Llama 3, Qwen3, Qwen3-MoE and DeepSeek-V3, with `torchtitan_moe` and
`torchtitan_mla`, their activation checkpointing `torchtitan_ac` and compiled blocks
`torchtitan_compile`, and its gpt-oss, `torchtitan_gptoss`; `litgpt`: LitGPT's GPT, `litgpt_lora`:
its LoRA, `litgpt_qlora`: its QLoRA's 4-bit model and StableEmbedding, `litgpt_adapter`: its adapter
and adapter_v2 models, in LitGPT's names, and `litgpt_adapter_saved`: what they save; `megatron`:
Megatron-Core's GPTModel, local and Transformer Engine layer specs, `megatron_moe`: its MoE layer),
in the vocabulary of memplan.model.forward."""

from __future__ import annotations

from memplan.model.inventory import Architecture

MODEL_TYPES = ("llama",)
"""HF model_types whose shape every stack's Llama-style code builds (each rule's model)."""


def llama_refusal(
    arch: Architecture, stack: str, covers: str, *, model_types: tuple[str, ...] = MODEL_TYPES
) -> str:
    """Why `stack`'s Llama-style rule (the model it `covers`, in words) does not fit `arch`'s
    shape: a model_type outside `model_types`, biases, or an MLP other than SwiGLU; '' when it
    fits."""
    x = arch.extra
    if arch.model_type not in model_types:
        return (
            f"activations of model_type {arch.model_type!r} under model.implementation "
            f"{stack} are not modelled (memplan models {covers})"
        )
    if x.get("attention_bias") or x.get("mlp_bias"):
        return f"the {stack} rule is for a model without biases (attention_bias / mlp_bias set)"
    if str(x.get("hidden_act", "silu")) not in ("silu", "swish"):
        return f"the {stack} rule is for a SwiGLU MLP (hidden_act silu)"
    return ""
