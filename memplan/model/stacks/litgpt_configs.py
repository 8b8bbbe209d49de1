"""Which of LitGPT's model types memplan's LitGPT rule covers, and the quirks of their config
entries beside Llama's (litgpt 0.5.9 config.py), as data and predicates on an Architecture:
what memplan.model.stacks.litgpt, litgpt_lora and litgpt_lora_neox read to pick a block's
shape, and why a model type is refused."""

from __future__ import annotations

from memplan.model.inventory import Architecture

ARCHITECTURES = {
    "llama": "litgpt/config.py's Llama 2 / 3 entries: the rule as written",
    "mistral": "Mistral-7B-v0.1 / v0.3: Llama's fields, plus "
    "sliding_window_size (v0.1: 4096) when the HF config sets `sliding_window`",
    "qwen2": "Qwen2.5 (every size): Llama's fields plus `attn_bias=True` (a bias on qkv)",
    "phi3": "Phi-3-mini-4k / 128k, Phi-4-mini: Llama's fields (LLaMAMLP: convert_hf_checkpoint "
    "splits gate_up_proj), sliding_window_size 2048 / 262145; Phi-4-mini rotates 0.75 of "
    "each head",
    "gemma": "Gemma 2B / 7B: GemmaMLP (gelu tanh), RMSNorm add_unit_offset, "
    "scale_embeddings, head_size 256 whatever n_embd // n_head is",
    "gpt_neox": "Pythia (14M to 12B, deduped or not): LayerNorm, parallel_residual, "
    "GptNeoxMLP (exact GELU), biases, rotary_percentage 0.25",
    "falcon": "Falcon-7B (multi-query, shared_attention_norm) and Falcon-40B / 180B "
    "(new_decoder_architecture: grouped queries, two norms): Pythia's block without biases",
    "gemma2": "Gemma 2 2B / 9B / 27B: Gemma's fields plus post_attention_norm, post_mlp_norm, "
    "attention_logit_softcapping (attention by hand) and final_logit_softcapping",
    "phi": "phi-1.5 / phi-2: Falcon-7B's block (shared_attention_norm) with multi-head "
    "attention, biases, GptNeoxMLP's GELU tanh (gelu_approximate), rotary_percentage 0.5 / 0.4 "
    "and a bias on lm_head",
}
"""The HF model_types the rule covers, and what LitGPT's config for them sets beside Llama's
(litgpt 0.5.9 config.py)."""

# What LitGPT's config entries set beside Llama's, as sets of the model_types above (the quirks
# as data; litgpt 0.5.9 config.py).
NEOX_BLOCK = frozenset({"gpt_neox", "falcon", "phi"})
"""LayerNorms and a parallel residual (Pythia's, Falcon's and Phi's Block, GptNeoxMLP)."""
FALCON = frozenset({"falcon"})
"""shared_attention_norm or two norms, as the HF config's new_decoder_architecture says."""
SHARED_NORM = frozenset({"phi"})
"""shared_attention_norm=True whatever the HF config says (phi-1_5 / phi-2)."""
WINDOWED = frozenset({"mistral", "phi3"})
"""sliding_window_size from the HF config's `sliding_window` (Mistral v0.1, Phi-3)."""
UNIT_OFFSET = frozenset({"gemma", "gemma2"})
"""RMSNorm(add_unit_offset=True) (Config.norm_class: "Gemma" in the name)."""
SOFTCAPPED = frozenset({"gemma2"})
"""attention_logit_softcapping: attention computed by hand (Gemma 2)."""

NOT_COVERED = {
    "gemma3_text": "Gemma 3's q/k norms (norm_qk), post norms and per-layer rope_indices",
    "olmo": "OLMo's non-affine LayerNorm",
    "olmo2": "OLMo 2's q/k norms (norm_qk_type olmo2) and post norms",
    "mixtral": "LLaMAMoE",
    "qwen3": "Qwen3's q/k norms (norm_qk)",
}
"""Model types LitGPT trains whose ops the rule does not cover, with what it lacks."""


def architecture_refusal(arch: Architecture) -> str:
    """Why litgpt.model.GPT as LitGPT configures `arch`'s model_type is not covered, or ''."""
    mt = arch.model_type
    covered = "model_types " + ", ".join(ARCHITECTURES)
    if mt in NOT_COVERED:
        return (
            f"activations of model_type {mt!r} under model.implementation litgpt are not "
            f"modelled: memplan's LitGPT rule lacks {NOT_COVERED[mt]} (it covers {covered})"
        )
    if mt not in ARCHITECTURES:
        return (
            f"activations of model_type {mt!r} under model.implementation litgpt are not "
            f"modelled (memplan's LitGPT rule covers {covered})"
        )
    x = arch.extra
    if mt == "gpt_neox":
        if not x.get("use_parallel_residual", True):
            return (
                "LitGPT's GPT-NeoX configs are parallel_residual: use_parallel_residual "
                "false is not what it runs"
            )
        if str(x.get("hidden_act", "gelu")) != "gelu":
            return (
                "LitGPT's GptNeoxMLP runs exact GELU (gelu_approximate none): hidden_act gelu only"
            )
        if x.get("model_class", "GPTNeoXForCausalLM") != "GPTNeoXForCausalLM":
            return "the LitGPT rule is for a causal LM (GPTNeoXForCausalLM)"
        return ""
    if mt == "falcon":
        if not x.get("parallel_attn", True) or x.get("alibi"):
            return (
                "LitGPT's Falcon configs are parallel_residual with RoPE: parallel_attn false "
                "or alibi true is not what it runs"
            )
        if x.get("model_class", "FalconForCausalLM") != "FalconForCausalLM":
            return "the LitGPT rule is for a causal LM (FalconForCausalLM)"
        return ""
    if mt == "phi":
        if str(x.get("hidden_act", "gelu_new")) not in ("gelu_new", "gelu_pytorch_tanh"):
            return (
                "LitGPT's Phi configs run GELU tanh (gelu_approximate tanh): hidden_act "
                "gelu_new only"
            )
        if x.get("qk_layernorm"):
            return "LitGPT's Phi configs have no q/k LayerNorms: qk_layernorm true is not modelled"
        if x.get("model_class", "PhiForCausalLM") != "PhiForCausalLM":
            return "the LitGPT rule is for a causal LM (PhiForCausalLM)"
        return ""
    if mt in ("llama", "mistral", "qwen2", "phi3") and str(x.get("hidden_act", "silu")) not in (
        "silu",
        "swish",
    ):
        return "the litgpt rule is for LLaMAMLP's SwiGLU (hidden_act silu) on this model_type"
    if mt == "gemma2" and x.get("attn_logit_softcapping") is None:
        return (
            "LitGPT's Gemma 2 configs cap the attention scores (attention_logit_softcapping "
            "50): a Gemma 2 config without attn_logit_softcapping is not what LitGPT runs"
        )
    if mt == "llama" and (x.get("attention_bias") or x.get("mlp_bias")):
        return "LitGPT's Llama configs have no biases (attention_bias / mlp_bias set)"
    if mt == "qwen2" and x.get("sliding_window"):
        return (
            "LitGPT's Qwen2.5 configs have no sliding window (sliding_window_size unset): a "
            "qwen2 config with use_sliding_window true is not what it runs"
        )
    return ""


def window(arch: Architecture) -> bool:
    """True when LitGPT's config for `arch` sets `sliding_window_size` on every layer: the HF
    config's `sliding_window` (Mistral v0.1's and Mathstral's 4096, Phi-3-mini's 2047 /
    262144, Phi-4-mini's 262144; LitGPT's entries: 4096, 2048 / 262145, 262145). Phi-3.5-mini's
    HF config sets one that LitGPT's entry does not: there the rule counts a mask per layer
    that LitGPT does not make."""
    return arch.model_type in WINDOWED and bool(arch.extra.get("sliding_window"))


def unit_offset(arch: Architecture) -> bool:
    """Config.norm_class: RMSNorm(add_unit_offset="Gemma" in name), Gemma's configs."""
    return arch.model_type in UNIT_OFFSET


def softcapped(arch: Architecture) -> bool:
    """Gemma 2: attention_logit_softcapping set (architecture_refusal asks for it)."""
    return arch.model_type in SOFTCAPPED


def shared_norm(arch: Architecture) -> bool:
    """shared_attention_norm: Falcon-7B's (HF's parallel_attn with one LayerNorm:
    num_ln_in_parallel_attn 1, or unset without new_decoder_architecture) and every Phi's (HF's
    PhiDecoderLayer has only input_layernorm)."""
    if arch.model_type in SHARED_NORM:
        return True
    if arch.model_type not in FALCON:
        return False
    x = arch.extra
    num_ln = x.get("num_ln_in_parallel_attn")
    if num_ln is None:
        num_ln = 2 if x.get("new_decoder_architecture") else 1
    return num_ln == 1
