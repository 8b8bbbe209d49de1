"""The LoRA adapters as litgpt 0.5.9's lora.py makes and runs them: which of LitGPT's flags
peft's module names set (`flags_of`), and what one adapted linear, a frozen base linear under
autocast and a 4-bit matmul's kept input add to the saved tensors. The building blocks of
memplan.model.stacks.litgpt_lora (Llama-shaped blocks, the head, the loss) and
memplan.model.stacks.litgpt_lora_neox (the parallel-residual Block)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from memplan.config.finetune import FinetuneSpec
from memplan.errors import MemplanError
from memplan.model.finetune.targets import ADAPTER
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture, Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE
from memplan.model.stacks import litgpt, litgpt_qlora

SRC_LORA = f"litgpt {litgpt.VERSION} litgpt/lora.py"
SRC_QKV = (
    f"{SRC_LORA}::LoRAQKVLinear.forward (F.linear(lora_dropout(x), lora_A), conv1d, zero_pad's "
    "index_copy_); " + kernels.DERIV
)
SRC_LINEAR = (
    f"{SRC_LORA}::LoRALinear.forward (lora_dropout(x) @ lora_A.T @ lora_B.T); " + kernels.DERIV
)
SRC_CAST = "aten/src/ATen/autocast_mode.h::cached_cast"


PEFT_NAMES = {
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "projection",
    "lm_head": "head",
}
"""peft's Llama module names -> LitGPT's flags (lora.py::Config: lora_query, lora_key,
lora_value: the parts of the fused `attn.qkv`; lora_projection: `attn.proj`; lora_head).
LitGPT's `lora_mlp` adapts fc_1, fc_2 and proj together: peft's gate_proj, up_proj and
down_proj, all three or none (MLP_NAMES)."""
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP_NAMES)
"""peft's `all-linear` on a causal LM: every Linear but the output layer
(peft tuners_utils.py::_maybe_include_all_linear_layers)."""


@dataclass(frozen=True, slots=True)
class Flags:
    """LitGPT's LoRA settings (lora.py::Config) memplan's spec expresses."""

    r: int
    dropout: float
    query: bool
    key: bool
    value: bool
    projection: bool
    mlp: bool
    head: bool

    @property
    def qkv(self) -> tuple[bool, bool, bool]:
        return (self.query, self.key, self.value)


def flags_of(targets: tuple[str, ...] | str | None, *, rank: int, dropout: float) -> Flags | str:
    """LitGPT's flags for peft's `target_modules` (None: peft's Llama default q_proj,
    v_proj, which is also finetune/lora.py::setup's default lora_query + lora_value), or why
    LitGPT cannot express them."""
    if targets is None:
        names: tuple[str, ...] = ("q_proj", "v_proj")
    elif targets == "all-linear":
        names = ALL_LINEAR
    elif isinstance(targets, str):
        return (
            f"finetune.target_modules {targets!r}: under model.implementation litgpt give a "
            "list of peft's Llama names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj, lm_head) or all-linear; LitGPT's LoRA is set by flags, not a regex"
        )
    else:
        names = targets
    unknown = [n for n in names if n not in PEFT_NAMES and n not in MLP_NAMES]
    if unknown:
        return (
            f"finetune.target_modules {', '.join(unknown)}: LitGPT's LoRA (lora.py::Config) "
            "adapts only the query, key, value, attention projection, MLP and head linears "
            "(peft names q_proj, k_proj, v_proj, o_proj, gate_proj + up_proj + down_proj, "
            "lm_head)"
        )
    mlp = [n for n in MLP_NAMES if n in names]
    if mlp and len(mlp) != len(MLP_NAMES):
        return (
            f"finetune.target_modules has {', '.join(mlp)} without the rest of gate_proj, "
            "up_proj, down_proj: LitGPT's lora_mlp adapts fc_1, fc_2 and proj together"
        )
    on = {PEFT_NAMES[n] for n in names if n in PEFT_NAMES}
    return Flags(
        r=rank,
        dropout=dropout,
        query="query" in on,
        key="key" in on,
        value="value" in on,
        projection="projection" in on,
        mlp=bool(mlp),
        head="head" in on,
    )


FUSED_QKV = ("query_key_value", "qkv_proj")
"""HF names of a fused q|k|v Linear, which LitGPT builds as `attn.qkv`: GPT-NeoX's and Falcon's
query_key_value, Phi-3's qkv_proj."""
FUSED_GATE_UP = "gate_up_proj"
"""Phi-3's fused gate|up Linear, which litgpt's convert_hf_checkpoint splits into fc_1, fc_2."""
SRC_QKV_INIT = (
    f"{SRC_LORA}::LoRAQKVLinear.__init__ (lora_A [r x sum(enable_lora), in_features], lora_B "
    "[head_size x (n_head, n_query_groups, n_query_groups) of the enabled parts, r]); lit-gpt "
    "8641822 lit_gpt/lora.py::LoRAQKVLinear.__init__ the same (kv_embd_size = in_features // "
    "(n_head // n_query_groups))"
)
SRC_MLP = (
    f"{SRC_LORA}::LLaMAMLP (fc_1, fc_2, proj) and GptNeoxMLP (fc, proj): create_lora_linear "
    "with r = lora_r if lora_mlp, one LoRALinear ([r, in] + [out, r]) each"
)

LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {
        "query": ("q_proj",),
        "key": ("k_proj",),
        "value": ("v_proj",),
        "projection": ("o_proj",),
        "mlp": MLP_NAMES,
        "head": ("lm_head",),
    },
    "phi3": {
        "query": ("qkv_proj",),
        "key": ("qkv_proj",),
        "value": ("qkv_proj",),
        "projection": ("o_proj",),
        "mlp": (FUSED_GATE_UP, "down_proj"),
        "head": ("lm_head",),
    },
    "phi": {
        "query": ("q_proj",),
        "key": ("k_proj",),
        "value": ("v_proj",),
        "projection": ("dense",),
        "mlp": ("fc1", "fc2"),
        "head": ("lm_head",),
    },
    "neox": {
        "query": ("query_key_value",),
        "key": ("query_key_value",),
        "value": ("query_key_value",),
        "projection": ("dense",),
        "mlp": ("dense_h_to_4h", "dense_4h_to_h"),
        "head": ("lm_head",),
    },
}
"""The HF modules each of LitGPT's flags adapts, by how the checkpoint names its linears (the
modules litgpt's convert_hf_checkpoint.py maps to `attn.qkv`, `attn.proj`, the MLP's
fc_1 / fc_2 / proj or fc / proj, and `lm_head`): Llama-shaped (q/k/v_proj, o_proj,
gate/up/down_proj), Phi-3 (qkv_proj, gate_up_proj), Phi (dense, fc1, fc2), GPT-NeoX / Falcon
(query_key_value, dense, dense_h_to_4h, dense_4h_to_h)."""


def layout_of(leaves: set[str]) -> str:
    """Which LAYOUTS entry a model's Linear names (leaves) follow."""
    if "query_key_value" in leaves:
        return "neox"
    if "qkv_proj" in leaves:
        return "phi3"
    if {"fc1", "fc2", "dense"} <= leaves:
        return "phi"
    return "llama"


def hf_targets(fl: Flags, layout: str) -> tuple[str, ...]:
    """The HF modules whose LitGPT counterparts the flags adapt (LAYOUTS), in flag order."""
    names: list[str] = []
    on = {
        "query": fl.query,
        "key": fl.key,
        "value": fl.value,
        "projection": fl.projection,
        "mlp": fl.mlp,
        "head": fl.head,
    }
    for flag, enabled in on.items():
        if enabled:
            names += [n for n in LAYOUTS[layout][flag] if n not in names]
    return tuple(names)


def _module_leaves(inventory: Inventory) -> set[str]:
    return {t.name.rsplit(".", 2)[-2] for t in inventory.parameters if t.name.count(".") >= 2}


def default_targets(ft: FinetuneSpec, inventory: Inventory) -> FinetuneSpec:
    """`ft` with the HF modules LitGPT adapts for its flags (flags_of: the targets in peft's
    Llama names, none given: finetune/lora.py's default lora_query + lora_value), for the model
    states: LitGPT's own choice whatever peft's default for the model_type (Phi's adds fc1 and
    fc2, peft 0.21.2 utils/constants.py) and whatever the checkpoint calls its linears
    (LAYOUTS). peft's adapters are then laid out as LitGPT's tensors (one LoRAQKVLinear
    pair per layer on the q|k|v, fc_1's and fc_2's apart) by `fused_adapters`."""
    if ft.method not in ("lora", "qlora"):
        return ft
    fl = flags_of(ft.target_modules, rank=ft.rank, dropout=ft.dropout)
    if isinstance(fl, str):
        raise MemplanError(fl, field="finetune.target_modules")
    return ft.model_copy(
        update={"target_modules": hf_targets(fl, layout_of(_module_leaves(inventory)))}
    )


SPLIT_QKV = ("q_proj", "k_proj", "v_proj")
"""HF names of separate q, k, v Linears (Llama-shaped checkpoints, Gemma, Phi), which
litgpt's convert_hf_checkpoint.py stacks into one `attn.qkv` and LoRA adapts with one
LoRAQKVLinear (SRC_QKV_INIT)."""
FUSED_NAME = "qkv_proj"
"""The name memplan gives LitGPT's LoRAQKVLinear adapter pair where the checkpoint has
separate q, k, v (Phi-3's checkpoint name for the fused q|k|v)."""
SPLIT_GATE_UP = ("gate_proj", "up_proj")
"""The names memplan gives LitGPT's fc_1 and fc_2 adapters split from Phi-3's gate_up_proj
(Llama's checkpoint names for the two halves)."""

_ADAPTER_PARAM = re.compile(
    rf"^(?P<parent>.+)\.(?P<mod>[^.]+)\.lora_(?P<ab>[AB])\.{ADAPTER}\.weight$"
)
"""peft's adapter weights as memplan.model.finetune.lora.lora_tensors names them."""


def fused_adapters(inventory: Inventory, ft: FinetuneSpec) -> Inventory:
    """The LoRA inventory with LitGPT's adapter tensors in place of peft's, tensor for tensor
    as litgpt.lora.GPT after mark_only_lora_as_trainable holds them (proved on the meta device
    for every model type the LitGPT stack covers: tests/test_litgpt_lora_inventory.py).

    The q|k|v of a layer (SRC_QKV_INIT): one LoRAQKVLinear pair, lora_A [r x parts, h] and
    lora_B [sum of the enabled q / k / v widths, r], whatever the checkpoint calls its
    linears: on a fused query_key_value / qkv_proj in place of peft's [r, h] + [(n_head +
    2 n_kv) head_dim, r] (under lora_query + lora_value Falcon-7B, 71 heads and one k/v head,
    trains 3 r h + 64 r elements per layer where peft's shape gives 2 r h + 128 r); on
    separate q_proj / k_proj / v_proj (Llama-shaped, Gemma, Phi) in place of one peft pair
    each: the same elements in two tensors, not two per adapted part, named `qkv_proj`
    (FUSED_NAME). Phi-3's gate_up_proj (SRC_MLP): LitGPT adapts fc_1 and fc_2 apart, [r, h] +
    [inter, r] each, four tensors where peft has two ([r, h] + [2 inter, r]), named
    gate_proj and up_proj (SPLIT_GATE_UP). The count matters beside the bytes: AdamW keeps a
    0-dim `step` tensor per trainable tensor and the CUDA allocator rounds each to its
    blocks. `ft` is the user's (LitGPT's flags); other inventories come back unchanged."""
    arch = inventory.architecture
    matched = [(t, _ADAPTER_PARAM.match(t.name)) for t in inventory.parameters]
    qkv_mods = (*FUSED_QKV, *SPLIT_QKV)
    if arch is None or not any(m and m["mod"] in (*qkv_mods, FUSED_GATE_UP) for _, m in matched):
        return inventory
    fl = flags_of(ft.target_modules, rank=ft.rank, dropout=ft.dropout)
    if isinstance(fl, str):
        raise MemplanError(fl, field="finetune.target_modules")
    h, a, kv, d = kernels.attention_dims(arch)
    widths = (a * d, kv * d, kv * d)
    qkv_shapes = {
        "A": (fl.r * sum(fl.qkv), h),
        "B": (sum(w for w, on in zip(widths, fl.qkv, strict=True) if on), fl.r),
    }
    params: list[TensorSpec] = []
    done: set[tuple[str, str]] = set()  # (parent, A / B) of the q|k|v pairs already made
    for t, m in matched:
        if m is None or m["mod"] not in (*qkv_mods, FUSED_GATE_UP):
            params.append(t)
        elif m["mod"] in qkv_mods:
            key = (m["parent"], m["ab"])
            if key not in done:
                done.add(key)
                mod = m["mod"] if m["mod"] in FUSED_QKV else FUSED_NAME
                name = f"{m['parent']}.{mod}.lora_{m['ab']}.{ADAPTER}.weight"
                params.append(replace(t.reshaped(qkv_shapes[m["ab"]]), name=name))
        elif m["ab"] == "A":  # gate_up_proj's lora_A [r, h]: fc_1's and fc_2's
            params += [
                replace(t, name=f"{m['parent']}.{half}.lora_A.{ADAPTER}.weight")
                for half in SPLIT_GATE_UP
            ]
        else:  # gate_up_proj's lora_B [2 inter, r]: [inter, r] each
            half_shape = (t.shape[0] // 2, *t.shape[1:])
            params += [
                replace(
                    t.reshaped(half_shape), name=f"{m['parent']}.{half}.lora_B.{ADAPTER}.weight"
                )
                for half in SPLIT_GATE_UP
            ]
    said = []
    if done:
        said.append(
            f"one LoRAQKVLinear pair per layer on the q|k|v, lora_A {list(qkv_shapes['A'])}, "
            f"lora_B {list(qkv_shapes['B'])} ({SRC_QKV_INIT}), named after the checkpoint's "
            f"fused module or {FUSED_NAME}"
        )
    if any(m and m["mod"] == FUSED_GATE_UP for _, m in matched):
        said.append(f"fc_1's and fc_2's apart, named {' and '.join(SPLIT_GATE_UP)} ({SRC_MLP})")
    note = f"{FINETUNE_NOTE} LitGPT's adapter tensors: {'; '.join(said)}."
    return replace(inventory, parameters=tuple(params), notes=(*inventory.notes, note))


def autocast_casts(st: Setting) -> bool:
    """torch.autocast casts the fp32 stream and weights to the matmul dtype (bf16-mixed)."""
    return st.autocast and st.stream != st.matmul


def weight_cast(name: str, shape: tuple[int, int], st: Setting, *, x_grad: bool) -> list[Saved]:
    """A frozen base linear under autocast: its weight is cast for every call (cached_cast
    caches only leaves that require grad) and the matmul keeps that copy when its input
    requires grad (for the input's gradient); the cast input is not kept (no weight
    gradient)."""
    if not (autocast_casts(st) and x_grad):
        return []
    return [kernels.saved(f"{name}.weight_cast", shape, st.matmul, "MmBackward0", SRC_CAST)]


def adapter_saves(
    prefix: str,
    x: Saved | None,
    shape: tuple[int, int],
    out_width: int,
    parts: int,
    fl: Flags,
    st: Setting,
    *,
    x_dtype: str,
    x_grad: bool,
    src: str,
) -> list[Saved]:
    """What one adapter keeps: lora_A's input (`x` itself, a Saved of the input's storage,
    with dropout off; else the dropout output and, when x requires grad, its mask; under
    autocast, an input not in the matmul dtype is cast for lora_A, a new copy each adapter)
    and lora_B's input, lora_A's output [tokens, r x parts]. Under autocast lora_A is cast
    too (kept when x requires grad: for x's gradient) and lora_B (always: lora_A's output
    requires grad), [r x parts, width] and [out, r] in the matmul dtype."""
    t, width = shape
    mm = st.matmul
    cast = autocast_casts(st) and x_dtype != mm
    out: list[Saved] = []
    if fl.dropout > 0:
        if x_grad:
            out.append(kernels.dropout(f"{prefix}.lora_dropout.mask", shape, x_dtype, st))
        name = f"{prefix}.lora_dropout.output" + ("_cast" if cast else "")
        out.append(kernels.saved(name, shape, mm if cast else x_dtype, "MmBackward0", src))
    elif cast:
        out.append(kernels.saved(f"{prefix}.input_cast", shape, mm, "MmBackward0", SRC_CAST))
    elif x is not None:
        out.append(x)
    by = "ConvolutionBackward0" if prefix == "attn.qkv" else "MmBackward0"
    if autocast_casts(st):
        if x_grad:
            a_shape = (fl.r * parts, width)
            out.append(kernels.saved(f"{prefix}.lora_A.cast", a_shape, mm, "MmBackward0", SRC_CAST))
        b_shape = (out_width, fl.r)
        out.append(kernels.saved(f"{prefix}.lora_B.cast", b_shape, mm, by, SRC_CAST))
    out.append(kernels.saved(f"{prefix}.lora_A.output", (t, fl.r * parts), mm, by, src))
    return out


def kept_by_4bit(x: Saved, keep: bool) -> tuple[list[Saved], Saved | None]:
    """A 4-bit matmul's input kept by MatMul4Bit (`keep`: bitsandbytes before 0.43.2 and the
    input requires grad, litgpt_qlora.SRC_KEEPS_A): ([x], None), so that an adapter reading the same
    storage does not count it again; else ([], x)."""
    if keep:
        return [replace(x, saved_by="MatMul4BitBackward", source=litgpt_qlora.SRC_KEEPS_A)], None
    return [], x


def attention_half(
    arch: Architecture, st: Setting, fl: Flags, *, g_in: bool, keeps: bool
) -> tuple[list[Saved], bool, bool]:
    """What a LoRA Block saves from norm_1's output to `attn.proj` (the same in the Llama-shaped
    and the parallel-residual Block): the fused `attn.qkv` (its frozen weight's cast, its
    4-bit kept input, the adapters on the adapted q/k/v parts and zero_pad's index_copy
    source when not all three are), the attention, and `attn.proj` with its adapter. `g_in`:
    the block input requires grad; `keeps`: 4-bit matmuls keep their inputs. Returns the
    saves, whether qkv's output requires grad, and whether norm_1's output is among the
    saves (a shared norm's MLP reads the same storage)."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, stream, mm = st.tokens, st.stream, st.matmul
    out = weight_cast("attn.qkv", ((a + 2 * kv) * d, h), st, x_grad=g_in)
    # norm_1's output, as lora_A keeps it with dropout off.
    normed_1 = kernels.saved("norm_1.output", (t, h), stream, "MmBackward0", SRC_QKV)
    kept, normed_x = kept_by_4bit(normed_1, keeps and g_in)
    out += kept
    listed = bool(kept)
    parts = sum(fl.qkv)
    if fl.r and parts:
        widths = (a * d, kv * d, kv * d)
        padded = sum(w for w, on in zip(widths, fl.qkv, strict=True) if on)
        adapted = adapter_saves(
            "attn.qkv",
            normed_x,
            (t, h),
            padded,
            parts,
            fl,
            st,
            x_dtype=stream,
            x_grad=g_in,
            src=SRC_QKV,
        )
        listed = listed or any(s is normed_x for s in adapted)
        out += adapted
        if parts < 3:
            out.append(
                kernels.saved(
                    "attn.qkv.lora_B.output", (t, padded), mm, "IndexCopyBackward0", SRC_QKV
                )
            )
    g_qkv = g_in or bool(fl.r and parts)
    if g_qkv:
        out += [s for s in litgpt.attention_saves(arch, st) if s.name != "attn.proj.input"]
    out += weight_cast("attn.proj", (h, a * d), st, x_grad=g_qkv)
    kept, y = kept_by_4bit(
        kernels.saved("attn.proj.input", (t, a * d), mm, "MmBackward0", SRC_LINEAR),
        keeps and g_qkv,
    )
    out += kept
    if fl.r and fl.projection:
        out += adapter_saves(
            "attn.proj", y, (t, a * d), h, 1, fl, st, x_dtype=mm, x_grad=g_qkv, src=SRC_LINEAR
        )
    return out, g_qkv, listed
