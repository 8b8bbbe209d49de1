"""LitGPT's LoRA on its parallel-residual Block (`model.implementation: litgpt`,
`finetune.method: lora` or `qlora`, model types gpt_neox, falcon and phi): what one layer of
litgpt.lora.GPT saves for backward, from litgpt 0.5.9's model.py::Block and lora.py::GptNeoxMLP
(see the docstring of memplan.model.stacks.litgpt_lora, which assembles the model and whose
`_layer` dispatches here). Proved against litgpt's real model on CPU by
benchmarks/litgpt_lora_neox.py (tests/test_litgpt_lora_neox.py)."""

from __future__ import annotations

from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import litgpt, litgpt_configs, litgpt_qlora
from memplan.model.stacks.litgpt_lora_adapters import (
    SRC_LINEAR,
    SRC_QKV,
    Flags,
    adapter_saves,
    attention_half,
    kept_by_4bit,
    weight_cast,
)

SRC_NEOX = (
    f"litgpt {litgpt.VERSION} litgpt/model.py::Block.forward (parallel_residual: norm_1(x), "
    "norm_2(x) or norm_1's with shared_attention_norm, mlp(x_normed) + attn(...) + x), "
    "GptNeoxMLP.forward (proj(gelu(fc(x)))); litgpt/lora.py::GptNeoxMLP (fc, proj: "
    "create_lora_linear, lora_mlp); " + kernels.DERIV
)


def layer_norms(prefix: str, t: int, h: int, st: Setting, *, shared: bool) -> list[Saved]:
    """Block's frozen torch LayerNorms of its input (SRC_NEOX): native_layer_norm keeps its
    input, mean and rstd whatever its weight and bias need (kernels.layer_norm); norm_2 reads
    the same block input (one storage) with its own statistics; none with a shared norm."""
    out = kernels.layer_norm(f"{prefix}norm_1", t, h, st.stream, st)
    if not shared:
        norm_2 = kernels.layer_norm(f"{prefix}norm_2", t, h, st.stream, st)
        out += [s for s in norm_2 if not s.name.endswith(".input")]
    return out


def neox_layer(
    arch: Architecture, st: Setting, fl: Flags, g_in: bool, q: litgpt_qlora.Quant | None = None
) -> tuple[list[Saved], bool]:
    """litgpt_lora._layer for the parallel-residual Block of GPT-NeoX / Pythia / StableLM Alpha,
    Falcon and Phi (SRC_NEOX; Phi's GELU tanh keeps fc's output as the exact GELU does): norm_1
    and norm_2 are frozen LayerNorms of the block input, recorded only
    when it requires grad; `attn.qkv` (LoRAQKVLinear on the fused q|k|v, laid out as Llama's:
    lora.py::LoRAQKVLinear.lora_ind) reads norm_1's output, GptNeoxMLP's `fc` norm_2's (norm_1's
    with Falcon-7B's shared_attention_norm: the same storage, counted once when both keep it). The
    MLP needs a gradient only when the block input does or lora_mlp adapts fc (its input is not the
    attention's output); exact GELU keeps fc's output, `proj` reads GELU's. The sum `mlp + attn + x`
    keeps nothing. Linear biases (Pythia's) save nothing: addmm keeps its matrices, the frozen bias
    no copy."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter, stream, mm = st.tokens, arch.intermediate_size, st.stream, st.matmul
    keeps = q is not None and q.keeps_input
    shared = litgpt_configs.shared_norm(arch)
    out: list[Saved] = layer_norms("", t, h, st, shared=shared) if g_in else []
    attention, g_qkv, counted = attention_half(arch, st, fl, g_in=g_in, keeps=keeps)
    out += attention
    # GptNeoxMLP reads norm_2's output (norm_1's when shared): requires grad iff g_in.
    mlp = bool(fl.r and fl.mlp)
    out += weight_cast("mlp.fc", (inter, h), st, x_grad=g_in)
    kept: list[Saved] = []
    if shared:
        # Unless qkv's keep (or its lora_A with dropout off) listed norm_1's output already.
        normed_1 = kernels.saved("norm_1.output", (t, h), stream, "MmBackward0", SRC_QKV)
        normed_2 = None if counted else normed_1
    else:
        n2 = kernels.saved("norm_2.output", (t, h), stream, "MmBackward0", SRC_LINEAR)
        kept, normed_2 = kept_by_4bit(n2, keeps and g_in)
    out += kept
    if mlp:
        x_fc = normed_2
        out += adapter_saves(
            "mlp.fc", x_fc, (t, h), inter, 1, fl, st, x_dtype=stream, x_grad=g_in, src=SRC_LINEAR
        )
    g_fc = g_in or mlp
    if g_fc:
        # F.gelu(approximate="none") keeps its input, fc's output.
        out.append(kernels.saved("mlp.fc.output", (t, inter), mm, "GeluBackward0", SRC_NEOX))
    out += weight_cast("mlp.proj", (h, inter), st, x_grad=g_fc)
    kept, act = kept_by_4bit(
        kernels.saved("mlp.proj.input", (t, inter), mm, "MmBackward0", SRC_LINEAR),
        keeps and g_fc,
    )
    out += kept
    if mlp:
        out += adapter_saves(
            "mlp.proj", act, (t, inter), h, 1, fl, st, x_dtype=mm, x_grad=True, src=SRC_LINEAR
        )
    return out, g_in or g_qkv or bool(fl.r and fl.projection) or g_fc
