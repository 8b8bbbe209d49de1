"""LitGPT's own GPT (`model.implementation: litgpt`): what `litgpt.model.GPT`'s forward and
the loss of LitGPT's training scripts save for backward, with no checkpointing and with LitGPT's
recomputation (`full`: a checkpoint around every `Block`).

Read from litgpt 0.5.9 (pip `litgpt==0.5.9`), for the Llama-shaped configs of
litgpt/config.py (Llama 2/3: `norm_class_name="RMSNorm"`, `mlp_class_name="LLaMAMLP"`,
`parallel_residual=False`, `bias=False`, rotary_percentage 1.0):
- model.py::GPT.forward: `wte(idx)` -> every `Block` -> `ln_f` -> `lm_head` (one [B, T, V]
  logits tensor: pretrain.py and finetune/full.py call `model(input_ids)` with no
  `lm_head_chunk_size`).
- model.py::Block.forward: `x = attn(norm_1(x)) + x; return mlp(norm_2(x)) + x`.
- model.py::RMSNorm.forward (LitGPT's own, not torch's): `x = x.float(); norm_x = mean(x * x);
  x_normed = x * rsqrt(norm_x + eps); (x_normed * weight.float()).to(dtype)`.
- model.py::CausalSelfAttention.forward: one fused `qkv` Linear, split into views; RoPE
  (`apply_rope`: `(x * cos) + (rotated * sin)`, cos/sin are the model's buffers) and
  `torch.cat` make q and k new tensors; with grouped queries k and v are
  `repeat_interleave`d to every head (copies) before `F.scaled_dot_product_attention(...,
  is_causal=True)`; `y.transpose(1, 2).reshape(B, T, C)` copies the output for `proj`.
- model.py::LLaMAMLP.forward: `proj(silu(fc_1(x)) * fc_2(x))`.
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

from memplan.model.forward import attention, kernels
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture
from memplan.model.stacks import llama_refusal
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

LOSS_CHUNK = 128
"""Tokens per cross-entropy chunk: utils.py::chunked_cross_entropy's default `chunk_size`, which
pretrain.py and finetune/full.py keep."""


def unsupported(arch: Architecture, st: Setting) -> str:
    """Why the LitGPT rule does not cover this model or setting, or ''."""
    why = llama_refusal(
        arch,
        "litgpt",
        "litgpt.model.GPT with its Llama configs: RMSNorm, LLaMAMLP, fused qkv, model_type "
        "llama; LitGPT's other MLPs (GptNeoxMLP, GemmaMLP, LLaMAMoE), parallel residuals, q/k "
        "norms, sliding windows and softcapping have no rule yet",
    )
    if why:
        return why
    if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
        return "the LitGPT rule is proved with head_size = n_embd // n_head only"
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


def norm(prefix: str, t: int, h: int, st: Setting) -> list[Saved]:
    """LitGPT's RMSNorm over a stream-dtype input (SRC_NORM). `x * x` saves x in fp32 (x
    itself when the stream is fp32, else the `x.float()` copy), rsqrt its result [t, 1] fp32,
    `x * rsqrt` x again and that result, `x_normed * weight.float()` x_normed [t, h] fp32 and,
    when the weight is 16-bit, its fp32 copy [h] (an fp32 weight's `.float()` is the parameter
    itself). The output, cast to the stream dtype, is saved by whichever linear reads it."""
    fp32 = kernels.FP32
    by = "MulBackward0"
    name = "input" if st.stream == fp32 else "input_fp32"
    out = [
        kernels.saved(f"{prefix}.{name}", (t, h), fp32, by, SRC_NORM),
        kernels.saved(f"{prefix}.rstd", (t, 1), fp32, "RsqrtBackward0", SRC_NORM),
        kernels.saved(f"{prefix}.normalized", (t, h), fp32, by, SRC_NORM),
    ]
    if st.stream != fp32:
        out.append(kernels.saved(f"{prefix}.weight_fp32", (h,), fp32, by, SRC_NORM))
    return out


def attention_saves(arch: Architecture, st: Setting) -> list[Saved]:
    """q, k, v as SDPA gets them and what SDPA and `proj` save (SRC_ATTN). RoPE's multiplies
    save only the cos/sin buffers. q and k are new tensors (`torch.cat`); with grouped queries
    k and v are `repeat_interleave` copies at every query head; with as many k/v heads as query
    heads v is a view of the `qkv` output, whose whole storage SDPA then keeps."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, t, mm = st.batch, st.sequence, st.tokens, st.matmul
    heads = attention.Heads(batch=b, seq=s, heads=a, kv_heads=a, head_dim=d)
    qkv = attention.Qkv(q=mm, k=mm, v=mm, q_contiguous=True)
    core = attention.sdpa(st, heads, qkv, dropout_on=False)
    # With as many k/v heads as query heads, v is a view of the qkv output: SDPA keeps that.
    qkv_out = kernels.saved("attn.qkv.output", (t, (a + 2 * kv) * d), mm, "SdpaBackward", SRC_ATTN)
    out = [qkv_out if c.name == "attn.value" and kv == a else c for c in core.core]
    out += [
        kernels.saved("attn.proj.input", o.shape, o.dtype, o.saved_by, SRC) for o in core.output
    ]
    return out


def _layer(arch: Architecture, st: Setting) -> list[Saved]:
    """One Block's saved tensors without checkpointing."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter = st.tokens, arch.intermediate_size
    out = norm("norm_1", t, h, st)
    out += kernels.linear_inputs(["attn.qkv"], t, h, st.stream, st)
    out += attention_saves(arch, st)
    # `attn(...) + x`: a new tensor in the stream dtype, saved by norm_2.
    out += norm("norm_2", t, h, st)
    out += kernels.linear_inputs(["mlp.fc_1", "mlp.fc_2"], t, h, st.stream, st)
    mlp = gated_mlp_saves("mlp", t, inter, "silu", st)
    assert mlp is not None  # silu has a rule
    names = {
        "mlp.gate_proj.output": "mlp.fc_1.output",
        "mlp.act_output": "mlp.silu.output",
        "mlp.up_proj.output": "mlp.fc_2.output",
        "mlp.down_proj.input": "mlp.proj.input",
    }
    out += [kernels.saved(names[m.name], m.shape, m.dtype, m.saved_by, SRC) for m in mlp]
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


def saved(arch: Architecture, st: Setting) -> Activations:
    """litgpt.model.GPT's forward and pretrain.py's loss on one GPU: see the module docstring."""
    why = unsupported(arch, st)
    if why:
        return refused(f"activations not modelled: {why}.")
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    layer = _layer(arch, st)
    n = arch.num_layers
    embeddings = Block(
        name="embeddings",
        count=1,
        tensors=(kernels.embedding_indices("transformer.wte.indices", (b, s)),),
    )
    if st.checkpointing == "full":
        kept = kernels.saved("checkpoint.x", (b, s, h), st.stream, "Noop", SRC_CHECKPOINT)
        layers = Block(
            name="layers", count=n, tensors=(kept,), recompute=tuple(layer), layered=True
        )
    else:
        layers = Block(name="layers", count=n, tensors=tuple(layer), layered=True)
    head = norm("transformer.ln_f", t, h, st)
    head += kernels.linear_inputs(["lm_head"], t, h, st.stream, st)
    head += kernels.weight_casts([("lm_head", (vocab, h))], st)
    upcast = t * vocab * dtype_bytes(kernels.FP32) if st.matmul != kernels.FP32 else 0
    notes = (
        f"litgpt {VERSION}'s GPT (Llama config), loss chunked_cross_entropy (chunk 128) on "
        "the fp32 logits Fabric returns, as pretrain.py::fit computes it (finetune/full.py "
        "drops the last position: one token per sequence fewer).",
        "LitGPT's fit loops keep Fabric's fp32 logits (`logits = model(input_ids)`) until "
        "the next forward returns: the step holds them in every phase "
        "(memplan.step.transients.litgpt_logits).",
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
