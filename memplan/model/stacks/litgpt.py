"""LitGPT's own GPT (`model.implementation: litgpt`): what `litgpt.model.GPT`'s forward and
the loss of LitGPT's training scripts save for backward, with no checkpointing and with LitGPT's
recomputation (`full`: a checkpoint around every `Block`).

Read from litgpt 0.5.9 (pip `litgpt==0.5.9`), for the Llama-shaped configs of
litgpt/config.py (Llama 2/3: `norm_class_name="RMSNorm"`, `mlp_class_name="LLaMAMLP"`,
`parallel_residual=False`, `bias=False`, rotary_percentage 1.0) and the ones that differ from
them only as `ARCHITECTURES` says (Qwen2.5, Mistral, Phi-3, Gemma, Gemma 2, Pythia, Falcon,
Phi-1.5 / Phi-2):
- model.py::GPT.forward: `wte(idx)` (times `torch.tensor(n_embd**0.5, dtype=x.dtype)` with
  `scale_embeddings`) -> every `Block` -> `ln_f` -> `lm_head` (one [B, T, V] logits tensor:
  pretrain.py and finetune/full.py call `model(input_ids)` with no `lm_head_chunk_size`).
- model.py::Block.forward: `x = attn(norm_1(x)) + x; return mlp(norm_2(x)) + x`.
- model.py::RMSNorm.forward (LitGPT's own, not torch's): `x = x.float(); norm_x = mean(x * x);
  x_normed = x * rsqrt(norm_x + eps); weight = (1 + self.weight) if add_unit_offset else
  self.weight; (x_normed * weight.float()).to(dtype)` (config.py::Config.norm_class sets
  add_unit_offset when the config's name holds "Gemma").
- model.py::CausalSelfAttention.forward: one fused `qkv` Linear, split into views; RoPE
  (`apply_rope`: `(x * cos) + (rotated * sin)`, cos/sin are the model's buffers) and
  `torch.cat` make q and k new tensors; with grouped queries k and v are
  `repeat_interleave`d to every head (copies) before `F.scaled_dot_product_attention(...,
  is_causal=True)`; `y.transpose(1, 2).reshape(B, T, C)` copies the output for `proj`. On a
  layer with `sliding_window_size` set (`sliding_window_indices`, all layers unless given) the
  layer builds its own additive mask `torch.ones(T, T, dtype=q.dtype).triu(1)` [1, 1, T, T]
  plus the window's bias, whatever T is (a window longer than the sequence masks nothing but
  the mask is made all the same), and SDPA gets `attn_mask=mask` and keeps it.
- model.py::LLaMAMLP.forward: `proj(silu(fc_1(x)) * fc_2(x))`; GemmaMLP.forward:
  `proj(gelu(fc_1(x), approximate="tanh") * fc_2(x))`.
- Gemma 2 (`attention_logit_softcapping`): CausalSelfAttention.scaled_dot_product_attention
  runs `scores = q @ k.mT * scale; tanh(scores / cap) * cap; + mask; softmax(dtype=float)
  .to(q.dtype); scores @ v` by hand instead of SDPA (SRC_SOFTCAP), so the sliding window's
  mask is only added, never kept; Block.forward normalises the attention's and the MLP's
  outputs (post_attention_norm, post_mlp_norm) before their residuals; GPT.forward caps the
  logits, `tanh(lm_head(x) / cap) * cap` (final_logit_softcapping).
- GPT-NeoX / Pythia (`parallel_residual=True`, `norm_class_name="LayerNorm"`,
  `mlp_class_name="GptNeoxMLP"`, `bias=True`, rotary_percentage 0.25): Block.forward takes
  `norm_1(x)` for the attention and `norm_2(x)` for the MLP, both torch LayerNorms of the same
  block input, and returns `mlp(norm_2(x)) + attn(norm_1(x)) + x`; GptNeoxMLP.forward is
  `proj(gelu(fc(x)))`; RoPE on the first rope_n_elem dims of each head saves nothing the full
  rotation does not (the multiplies keep the cos/sin buffers; `torch.cat` makes q and k new
  either way): so too Phi-4-mini's rotary_percentage 0.75. Falcon-7B
  (`shared_attention_norm=True`) has no norm_2: the MLP reads norm_1's output,
  `mlp(norm_1(x)) + attn(norm_1(x)) + x`; Falcon-40B / 180B have both.
- phi-1_5 / phi-2 (litgpt config.py): Falcon-7B's shared norm with multi-head attention and
  biases, rotary_percentage 0.5 / 0.4; GptNeoxMLP's `F.gelu(x, approximate="tanh")`
  (gelu_approximate) keeps its input as the exact GELU does (GeluBackward0 saves `self`); the
  bias on lm_head (lm_head_bias) saves nothing more (see the next point).
- A bias on a Linear (Qwen2.5's `attn_bias` on `qkv`) saves nothing more: addmm saves its two
  matrices, the bias's gradient is a sum of the output's (measured: the same bytes as without).
- utils.py::chunked_cross_entropy as pretrain.py::fit calls it, `chunked_cross_entropy(logits,
  targets)`: its default chunk_size=128 splits the flattened logits into 128-token chunks and
  takes `cross_entropy(chunk, target_chunk, reduction="none")` of each; every chunk keeps its
  own log-softmax, so chunking saves the whole [tokens, vocab] in fp32 all the same (it only
  spreads the backward), plus one total_weight per chunk and the divisor
  `non_masked_elems.maximum(ones_like(...))`.
- Lightning Fabric (lightning 2.6, the `L.Fabric` LitGPT's scripts build): `_FabricModule.
  forward` casts the model's output to fp32 (precision plugins' `convert_output`), so the loss
  always runs on fp32 logits: `upcast_bytes` is that copy.
- Recomputation: finetune/full.py's `FSDPStrategy(activation_checkpointing_policy={Block})`;
  Lightning's strategies/fsdp.py::_setup_activation_checkpointing wraps each `Block` in torch's
  `checkpoint_wrapper` (non-reentrant). pretrain.py sets no checkpointing and compiles the model
  (`torch.compile(model)`), which is not modelled (`training.compile` is refused).

Precision, as Fabric's plugins run the model: `32-true` = memplan `fp32`; `bf16-true` = memplan
`bf16` (plugins/precision/half.py::HalfPrecision.convert_module casts the model, buffers
included); `bf16-mixed` (LitGPT's default on a bf16 GPU: utils.py::
get_default_supported_precision) = memplan `amp-bf16` (torch.autocast over the fp32 model)
on one device; under FSDP, Lightning's FSDPPrecision casts the parameters to bf16
(`mixed_precision_config`: param_dtype bf16), so the model runs in bf16 with autocast
changing nothing it runs: memplan.report.estimate.setting_of turns autocast off there.

Proved on CPU against litgpt's real model, run by Fabric, by tests/test_litgpt_activations.py
(benchmarks/litgpt_activations.py: the whole matrix).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from memplan.model.forward import attention, kernels
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture, Inventory
from memplan.model.stacks.litgpt_configs import (
    ARCHITECTURES,
    NEOX_BLOCK,
    architecture_refusal,
    shared_norm,
    softcapped,
    unit_offset,
    window,
)
from memplan.precision import dtype_bytes

VERSION = "0.5.9"
SRC = f"litgpt {VERSION} litgpt/model.py"
SRC_NORM = (
    f"litgpt {VERSION} litgpt/model.py::RMSNorm.forward: x.float(), mean(x * x), "
    "x * rsqrt(norm_x + eps), (x_normed * weight.float()).to(dtype); " + kernels.DERIV
)
SRC_ATTN = (
    f"litgpt {VERSION} litgpt/model.py::CausalSelfAttention.forward (apply_rope, torch.cat, "
    "repeat_interleave, F.scaled_dot_product_attention)"
)
SRC_LOSS = (
    f"litgpt {VERSION} litgpt/utils.py::chunked_cross_entropy (chunk_size=128, as "
    "pretrain.py::fit calls it); " + kernels.DERIV
)
SRC_CHECKPOINT = (
    "torch/utils/checkpoint.py::_checkpoint_without_reentrant_generator (_NoopSaveInputs keeps "
    "the block input); lightning/fabric/strategies/fsdp.py::_setup_activation_checkpointing "
    f"(checkpoint_wrapper per Block, litgpt {VERSION} finetune/full.py)"
)

HEAD = "lm_head.weight"
"""The output projection's weight, as transformers' causal LMs name it (`lm_head.weight`)."""


@lru_cache(maxsize=64)
def own_inventory(inventory: Inventory) -> Inventory:
    """The model as LitGPT builds it: model.py::GPT.__init__ makes `lm_head` its own Linear and
    never ties it to `transformer.wte` (scripts/convert_hf_checkpoint.py copies a tied
    checkpoint's embedding into it; finetune/*.py refuse `train.tie_embeddings`, pretrain.py
    leaves it off by default), so a config that ties the head gets its own [vocab, hidden]
    `lm_head.weight`, with the embedding's shape and dtype, trained like every other weight.
    Cached: plan asks once per layout, and caches keyed on an inventory want the same one."""
    head = tuple((a, o) for a, o in inventory.tied if a.endswith(HEAD))
    by_name = {t.name: t for t in inventory.parameters}
    untied = tuple(replace(by_name[o], name=a, role="head") for a, o in head if o in by_name)
    if not untied:
        return inventory
    note = (
        f"LitGPT's GPT keeps lm_head apart from the embedding ({SRC}::GPT.__init__): "
        f"{', '.join(t.name for t in untied)} counted as its own parameter, though this config "
        "ties it."
    )
    return replace(
        inventory,
        parameters=(*inventory.parameters, *untied),
        tied=tuple(p for p in inventory.tied if p not in head),
        notes=(*inventory.notes, note),
    )


SRC_MASK = (
    f"litgpt {VERSION} litgpt/model.py::CausalSelfAttention.forward (apply_sliding_window_"
    "attention: torch.ones(T, T, dtype=q.dtype).triu(1), masked_fill_, view(1, 1, T, T), "
    "mask += sliding_window_bias) and scaled_dot_product_attention(attn_mask=mask)"
)
SRC_SOFTCAP = (
    f"litgpt {VERSION} litgpt/model.py::CausalSelfAttention.scaled_dot_product_attention "
    "(attention_logit_softcapping: q @ k.mT * scale, do_softcapping = tanh(x / thresh) * "
    "thresh, + mask, F.softmax(dtype=torch.float).to(q.dtype), scores @ v); " + kernels.DERIV
)
SRC_EMBED = (
    f"litgpt {VERSION} litgpt/model.py::GPT.forward (`x * torch.tensor(n_embd**0.5, "
    "dtype=x.dtype)`); " + kernels.DERIV + ": mul saves `other`"
)
EFFICIENT_MASK_ALIGN = 16
"""The memory-efficient CUDA kernel wants the mask's rows 16-element aligned, else torch pads it
(aten/src/ATen/native/transformers/attention.cpp::preprocess_mask, mem_eff_alignment 16)."""

LOSS_CHUNK = 128
"""Tokens per cross-entropy chunk: utils.py::chunked_cross_entropy's default `chunk_size`, which
pretrain.py and finetune/full.py keep."""


def unsupported(arch: Architecture, st: Setting) -> str:
    """Why the LitGPT rule does not cover this model or setting, or ''."""
    why = architecture_refusal(arch)
    if why:
        return why
    if (
        window(arch)
        and st.device == "cuda"
        and st.sequence % EFFICIENT_MASK_ALIGN
        and st.attention == "sdpa"
    ):
        return (
            "with a sliding window LitGPT passes SDPA a [1, 1, T, T] mask; on CUDA the "
            "memory-efficient kernel pads a mask whose rows are not a multiple of "
            f"{EFFICIENT_MASK_ALIGN} elements, which is not modelled: use a sequence_length "
            f"that is a multiple of {EFFICIENT_MASK_ALIGN}"
        )
    if st.attention != "sdpa":
        return (
            "LitGPT's attention is F.scaled_dot_product_attention (without softcapping): use "
            "training.attention sdpa"
        )
    if st.dropout:
        return "litgpt.model.GPT has no dropout: training.dropout true is not what it runs"
    if st.checkpointing in ("selective", "selective-op"):
        return (
            f"activation_checkpointing {st.checkpointing} is not LitGPT's: its scripts "
            "checkpoint whole blocks (full) or nothing"
        )
    if st.checkpoint_every > 1:
        return "checkpoint_every > 1 is torchtitan's layer SAC: LitGPT checkpoints every Block"
    if st.offload:
        return "activation_offload is transformers' offload=True: LitGPT has no such option"
    if st.compile:
        return (
            "training.compile under LitGPT (pretrain.py compiles the whole GPT) is not "
            "modelled: memplan's compiled rule is torchtitan's per-block compile"
        )
    if st.float8 != "none":
        return "torchao Float8 training is torchtitan's: LitGPT's GPT has no Float8 path"
    return ""


def norm(prefix: str, t: int, h: int, st: Setting, *, offset: bool = False) -> list[Saved]:
    """LitGPT's RMSNorm over a stream-dtype input (SRC_NORM). `x * x` saves x in fp32 (x
    itself when the stream is fp32, else the `x.float()` copy), rsqrt its result [t, 1] fp32,
    `x * rsqrt` x again and that result, `x_normed * weight.float()` x_normed [t, h] fp32 and,
    when the weight is 16-bit, its fp32 copy [h] (an fp32 weight's `.float()` is the parameter
    itself); with `offset` (Gemma's add_unit_offset) `1 + weight`, a new [h] fp32 tensor in
    every precision. The output, cast to the stream dtype, is saved by whichever linear reads it."""
    fp32 = kernels.FP32
    by = "MulBackward0"
    name = "input" if st.stream == fp32 else "input_fp32"
    out = [
        kernels.saved(f"{prefix}.{name}", (t, h), fp32, by, SRC_NORM),
        kernels.saved(f"{prefix}.rstd", (t, 1), fp32, "RsqrtBackward0", SRC_NORM),
        kernels.saved(f"{prefix}.normalized", (t, h), fp32, by, SRC_NORM),
    ]
    if offset:
        # `1 + self.weight` is a new tensor (its `.float()` copy when the weight is 16-bit):
        # [h] fp32 saved in every precision.
        out.append(kernels.saved(f"{prefix}.weight_plus_one_fp32", (h,), fp32, by, SRC_NORM))
    elif st.stream != fp32:
        out.append(kernels.saved(f"{prefix}.weight_fp32", (h,), fp32, by, SRC_NORM))
    return out


def attention_saves(arch: Architecture, st: Setting) -> list[Saved]:
    """q, k, v as SDPA gets them and what SDPA and `proj` save (SRC_ATTN). RoPE's multiplies
    save only the cos/sin buffers. q and k are new tensors (`torch.cat`); with grouped queries
    k and v are `repeat_interleave` copies at every query head; with as many k/v heads as query
    heads v is a view of the `qkv` output, whose whole storage SDPA then keeps. With a sliding
    window SDPA also keeps the layer's [1, 1, T, T] mask (SRC_MASK); on CUDA the mask sends
    SDPA to the memory-efficient kernel (memplan.model.forward.attention.sdpa_kernel)."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, mm = st.batch, st.sequence, st.tokens, st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)
    masked = window(arch)
    qkv = attention.Qkv(q=mm, k=mm, v=mm, q_contiguous=True, mask=masked)
    core = attention.sdpa(st, heads, qkv, dropout_on=False)
    # With as many k/v heads as query heads, v is a view of the qkv output: SDPA keeps that.
    qkv_out = kernels.saved("attn.qkv.output", (t, (a + 2 * kv) * d), mm, "SdpaBackward", SRC_ATTN)
    # The layer's own mask, [1, 1, T, T] in q's dtype (the batch broadcast): SRC_MASK.
    mask = kernels.saved("attn.mask", (1, 1, s, s), mm, "SdpaBackward", SRC_MASK)
    swap = {"attn.mask": mask, "attn.value": qkv_out if kv == a else None}
    out = [swap.get(c.name) or c for c in core.core]
    out += [
        kernels.saved("attn.proj.input", o.shape, o.dtype, o.saved_by, SRC) for o in core.output
    ]
    return out


def softcapped_attention_saves(arch: Architecture, st: Setting) -> list[Saved]:
    """The attention LitGPT runs by hand with attention_logit_softcapping (SRC_SOFTCAP).
    `q @ k.mT` (matmul of 4-D tensors: bmm over views, q and k being contiguous [b, a, s, d])
    saves q (the RoPE `cat`) and k (the `cat`, or its repeat_interleave copy with grouped
    queries); `* scale` and `/ cap`, `* cap` by a number save nothing; tanh saves its output;
    `+ mask` nothing (the mask is not kept); softmax(dtype=float) its fp32 output; `.to(q.dtype)`
    is a new tensor unless q is fp32; `scores @ v` saves those scores and v: the repeat_interleave
    copy with grouped queries, else a view of the qkv output at batch 1 or matmul's copy
    (memplan.model.forward.attention.bmm_reshape_is_view). `y.transpose(1, 2).reshape(...)`
    copies the output for `proj`."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, mm = st.batch, st.sequence, st.tokens, st.matmul
    fp32 = kernels.FP32
    by = "BmmBackward0"
    out = [
        kernels.saved("attn.query", (b, a, s, d), mm, by, SRC_SOFTCAP),
        kernels.saved("attn.key", (b, a, s, d), mm, by, SRC_SOFTCAP),
        kernels.saved("attn.softcap.tanh", (b, a, s, s), mm, "TanhBackward0", SRC_SOFTCAP),
        kernels.saved("attn.softmax", (b, a, s, s), fp32, "SoftmaxBackward0", SRC_SOFTCAP),
    ]
    if mm != fp32:
        out.append(kernels.saved("attn.probs", (b, a, s, s), mm, by, SRC_SOFTCAP))
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=kv, head_dim=d)
    if kv != a:
        out.append(kernels.saved("attn.value", (b, a, s, d), mm, by, SRC_SOFTCAP))
    elif attention.bmm_reshape_is_view(heads):
        out.append(kernels.saved("attn.qkv.output", (t, (a + 2 * kv) * d), mm, by, SRC_SOFTCAP))
    else:
        out.append(kernels.saved("attn.value", (b * a, s, d), mm, by, SRC_SOFTCAP))
    out.append(kernels.saved("attn.proj.input", (t, a * d), mm, "MmBackward0", SRC_SOFTCAP))
    return out


def _neox_layer(arch: Architecture, st: Setting) -> list[Saved]:
    """One parallel-residual Block (GPT-NeoX / Pythia, Falcon) without checkpointing: norm_1
    and norm_2 are LayerNorms of the same block input, kept once (kernels.layer_norm: the
    input, mean and rstd), each with its own statistics; qkv reads norm_1's output, fc
    norm_2's (norm_1's when the norm is shared: one storage, or one autocast copy per linear);
    GELU keeps fc's output and proj reads GELU's."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter, mm = st.tokens, arch.intermediate_size, st.matmul
    shared = shared_norm(arch)
    out = kernels.layer_norm("norm_1", t, h, st.stream, st)
    if not shared:
        norm_2 = kernels.layer_norm("norm_2", t, h, st.stream, st)
        out += [s for s in norm_2 if s.name != "norm_2.input"]
    if shared:
        out += kernels.linear_inputs(["attn.qkv", "mlp.fc"], t, h, st.stream, st)
    else:
        out += kernels.linear_inputs(["attn.qkv"], t, h, st.stream, st)
    out += attention_saves(arch, st)
    if not shared:
        out += kernels.linear_inputs(["mlp.fc"], t, h, st.stream, st)
    src = SRC + "::GptNeoxMLP.forward; " + kernels.DERIV
    out += [
        kernels.saved("mlp.fc.output", (t, inter), mm, "GeluBackward0", src),
        kernels.saved("mlp.proj.input", (t, inter), mm, "MmBackward0", src),
    ]
    out += kernels.weight_casts(
        [
            ("attn.qkv", ((a + 2 * kv) * d, h)),
            ("attn.proj", (h, a * d)),
            ("mlp.fc", (inter, h)),
            ("mlp.proj", (h, inter)),
        ],
        st,
    )
    return out


def _layer(arch: Architecture, st: Setting) -> list[Saved]:
    """One Block's saved tensors without checkpointing."""
    if arch.model_type in NEOX_BLOCK:
        return _neox_layer(arch, st)
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter = st.tokens, arch.intermediate_size
    offset = unit_offset(arch)
    out = norm("norm_1", t, h, st, offset=offset)
    out += kernels.linear_inputs(["attn.qkv"], t, h, st.stream, st)
    if softcapped(arch):
        out += softcapped_attention_saves(arch, st)
        # post_attention_norm of proj's output (its fp32 copy, or itself when fp32).
        out += norm("post_attention_norm", t, h, st, offset=offset)
    else:
        out += attention_saves(arch, st)
    # `attn(...) + x`: a new tensor in the stream dtype, saved by norm_2.
    out += norm("norm_2", t, h, st, offset=offset)
    out += kernels.linear_inputs(["mlp.fc_1", "mlp.fc_2"], t, h, st.stream, st)
    # LLaMAMLP's silu, GemmaMLP's gelu(approximate="tanh"): both save their input.
    act = "gelu_pytorch_tanh" if unit_offset(arch) else "silu"
    mlp = gated_mlp_saves("mlp", t, inter, act, st)
    assert mlp is not None  # silu and gelu have a rule
    names = {
        "mlp.gate_proj.output": "mlp.fc_1.output",
        "mlp.act_output": f"mlp.{act}.output",
        "mlp.up_proj.output": "mlp.fc_2.output",
        "mlp.down_proj.input": "mlp.proj.input",
    }
    out += [kernels.saved(names[m.name], m.shape, m.dtype, m.saved_by, SRC) for m in mlp]
    if softcapped(arch):
        out += norm("post_mlp_norm", t, h, st, offset=offset)
    out += kernels.weight_casts(
        [
            ("attn.qkv", ((a + 2 * kv) * d, h)),
            ("attn.proj", (h, a * d)),
            ("mlp.fc_1", (inter, h)),
            ("mlp.fc_2", (inter, h)),
            ("mlp.proj", (h, inter)),
        ],
        st,
    )
    return out


def loss(tokens: int, vocab: int) -> list[Saved]:
    """chunked_cross_entropy(logits, targets) on the fp32 logits (SRC_LOSS): each chunk's
    `cross_entropy(reduction="none")` keeps its log-softmax [chunk, vocab] fp32 (listed as the
    full chunks together and the last, shorter one) and a 0-dim fp32 total_weight (listed
    together: one storage each, 4 B apiece); nll_loss keeps its target chunk, views of the
    int64 targets [tokens]; `/ non_masked_elems.maximum(...)` keeps the 0-dim int64 divisor."""
    fp32 = kernels.FP32
    full, last = divmod(tokens, LOSS_CHUNK)
    chunks = full + (1 if last else 0)
    out = []
    if full:
        shape = (full * LOSS_CHUNK, vocab)
        out.append(kernels.saved("log_softmax", shape, fp32, "LogSoftmaxBackward0", SRC_LOSS))
    if last:
        shape = (last, vocab)
        out.append(kernels.saved("log_softmax.last", shape, fp32, "LogSoftmaxBackward0", SRC_LOSS))
    return [
        *out,
        kernels.saved("targets", (tokens,), kernels.INT64, "NllLossBackward0", SRC_LOSS),
        kernels.saved("total_weight", (chunks,), fp32, "NllLossBackward0", SRC_LOSS),
        kernels.saved("divisor", (), kernels.INT64, "DivBackward0", SRC_LOSS),
    ]


def saved(arch: Architecture, st: Setting, *, tied: bool = False) -> Activations:
    """litgpt.model.GPT's forward and pretrain.py's loss on one GPU: see the module docstring.
    `tied`: the config ties lm_head to the embedding (said in the notes)."""
    why = unsupported(arch, st)
    if why:
        return refused(f"activations not modelled: {why}.")
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    layer = _layer(arch, st)
    n = arch.num_layers
    embed = [kernels.embedding_indices("transformer.wte.indices", (b, s))]
    if unit_offset(arch):
        # scale_embeddings: the 0-dim sqrt(n_embd) in the embedding's dtype (SRC_EMBED).
        scale = kernels.saved("transformer.wte.scale", (), st.stream, "MulBackward0", SRC_EMBED)
        embed.append(scale)
    embeddings = Block(name="embeddings", count=1, tensors=tuple(embed))
    if st.checkpointing == "full":
        kept = kernels.saved("checkpoint.x", (b, s, h), st.stream, "Noop", SRC_CHECKPOINT)
        layers = Block(
            name="layers", count=n, tensors=(kept,), recompute=tuple(layer), layered=True
        )
    else:
        layers = Block(name="layers", count=n, tensors=tuple(layer), layered=True)
    if arch.model_type in NEOX_BLOCK:
        head = kernels.layer_norm("transformer.ln_f", t, h, st.stream, st)
    else:
        head = norm("transformer.ln_f", t, h, st, offset=unit_offset(arch))
    head += kernels.linear_inputs(["lm_head"], t, h, st.stream, st)
    head += kernels.weight_casts([("lm_head", (vocab, h))], st)
    if arch.extra.get("final_logit_softcapping") is not None:
        # GPT.forward's do_softcapping of the logits: tanh keeps its [t, vocab] output.
        tanh = kernels.saved("lm_head.softcap.tanh", (t, vocab), st.matmul, "TanhBackward0", SRC)
        head.append(tanh)
    upcast = t * vocab * dtype_bytes(kernels.FP32) if st.matmul != kernels.FP32 else 0
    notes: tuple[str, ...] = (
        f"litgpt {VERSION}'s GPT ({arch.model_type}: {ARCHITECTURES[arch.model_type]}), "
        "loss chunked_cross_entropy (chunk 128) on "
        "the fp32 logits Fabric returns, as pretrain.py::fit computes it (finetune/full.py "
        "drops the last position: one token per sequence fewer).",
        "LitGPT's fit loops keep Fabric's fp32 logits (`logits = model(input_ids)`) until "
        "the next forward returns: the step holds them in every phase "
        "(memplan.step.transients.litgpt_logits).",
    )
    if tied:
        notes += (
            "LitGPT's GPT keeps lm_head apart from wte (model.py::GPT.__init__; "
            "scripts/convert_hf_checkpoint.py copies a tied checkpoint's embedding into it; "
            "pretrain.py ties them only with train.tie_embeddings, off by default): memplan's "
            "model states count LitGPT's own lm_head (own_inventory).",
        )
    return Activations(
        modelled=True,
        blocks=(
            embeddings,
            layers,
            Block(name="head", count=1, tensors=tuple(head)),
            Block(name="loss", count=1, tensors=tuple(loss(t, vocab))),
        ),
        logits_bytes=t * vocab * dtype_bytes(st.matmul),
        upcast_bytes=upcast,
        hidden_bytes=t * h * dtype_bytes(st.stream),
        notes=notes,
        implementation="litgpt",
    )


def refused(why: str) -> Activations:
    out = not_modelled(why)
    return Activations(modelled=False, notes=out.notes, implementation="litgpt")
