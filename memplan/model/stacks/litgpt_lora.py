"""LitGPT's LoRA (`model.implementation: litgpt` with `finetune.method: lora`): what
`litgpt.lora.GPT` and the fit loop of finetune/lora.py save for backward.

Read from litgpt 0.5.9 (litgpt/lora.py; the model around the adapters is
memplan.model.stacks.litgpt's):
- finetune/lora.py::main: `mark_only_lora_as_trainable(model)` freezes every parameter whose
  name lacks "lora_" (bias "none"): the embedding, norms, base linears and head are frozen.
- lora.py::LoRAQKVLinear.forward (the fused `attn.qkv`, adapted parts from `lora_query`,
  `lora_key`, `lora_value`): `pretrained = self.linear(x)`; `after_A = F.linear(
  lora_dropout(x), lora_A)` [tokens, r x parts]; `after_B = conv1d(after_A.T, lora_B)` (one
  grouped conv with as many k/v heads as heads, else `chunk` -> one conv per part ->
  `torch.cat`) [B, out', T]; `zero_pad(after_B)` (when not every part is adapted:
  `new_zeros(..., out).index_copy_(-1, lora_ind, after_B)`, whose backward keeps the source);
  `pretrained + lora * scaling`.
- lora.py::LoRALinear.forward (`attn.proj` with `lora_projection`; `mlp.fc_1`, `mlp.fc_2`,
  `mlp.proj` with `lora_mlp`; `lm_head` with `lora_head`), each with its own `nn.Dropout`:
  `pretrained + (lora_dropout(x) @ lora_A.T @ lora_B.T) * scaling`.
- finetune/lora.py::fit: `logits = model(input_ids, lm_head_chunk_size=128)` (model.py::
  GPT.forward: the head runs on `x.split(128, dim=1)`, one [B, chunk, vocab] output per
  chunk), `logits[-1] = logits[-1][..., :-1, :]`, `chunked_cross_entropy(logits,
  targets[..., 1:])` (utils.py: one `cross_entropy(reduction="none")` per chunk, on
  `chunk.reshape(-1, vocab)` and `target_chunk.reshape(-1)`).

Autograd keeps what each node needs for the gradients it must produce (derivatives.yaml; the
generated code saves an input only when the other operand's gradient is wanted): a frozen
linear keeps no input, a frozen RMSNorm weight drops the normalized input, and a layer whose
input does not require grad (the first, after the frozen embedding) records nothing before its
first adapter.

GPT-NeoX (Pythia, StableLM Alpha) and Falcon, litgpt.model's parallel-residual Block
(memplan.model.stacks.litgpt._neox_layer; with LoRA, memplan.model.stacks.litgpt_lora_neox): the
same LoRAQKVLinear on the fused q|k|v (lora.py::LoRAQKVLinear.lora_ind: the query, key and value
columns in that order, as for Llama); lora.py::GptNeoxMLP makes `fc` and `proj` create_lora_linear
layers, adapted together by `lora_mlp`; norm_1, norm_2 and ln_f are frozen torch LayerNorms, which
keep their input, mean and rstd whenever their input requires grad; the MLP reads the block input's
norm, so on a layer whose input needs no gradient it records nothing unless lora_mlp adapts it.

Precision as Fabric's plugins run it (memplan.model.stacks.litgpt): 32-true, bf16-true and
bf16-mixed (torch.autocast over the fp32 model: every frozen weight is cast per call, once per
head chunk, and the adapters' inputs and weights are cast for their matmuls).

Proved on CPU against litgpt 0.5.9's real LoRA model, run by Fabric, by
tests/test_litgpt_lora.py (benchmarks/litgpt_lora.py: the whole matrix, Pythia- and
Falcon-shaped models and two blocks of StableLM Alpha 3B under fake tensors included).

QLoRA (`finetune.method: qlora`: finetune/lora.py `--quantize bnb.nf4` / `bnb.nf4-dq` /
`bnb.fp4` / `bnb.fp4-dq`), from source only: Lightning quantizes on CUDA only (lightning 2.6
fabric/plugins/precision/bitsandbytes.py::_Linear4bit.quantize: `if device.type != "cuda":
raise RuntimeError(f"Unexpected device type: {device.type}")`), so the rule is proved on
LitGPT's published rows (benchmarks/published_others.py) and bitsandbytes' own quantize_4bit
and MatMul4Bit on CPU (tests/test_litgpt_qlora.py):
- setup: `BitsandbytesPrecision(quantize[4:], dtype)` with no ignore_modules;
  convert_module -> _convert_layers replaces every torch.nn.Linear, the LoRA layers' `linear`
  and `lm_head` included, by bnb Linear4bit (`lightning_quantization`: the quantized sizes
  are memplan.model.finetune.qlora's); `--precision *-mixed` is refused there ("Quantization
  and mixed precision is not supported.").
- main: after `instantiate_bnb_optimizer(optimizer, model.parameters())` (PagedAdamW over the
  parameters as they are then) the embedding is swapped for bitsandbytes' StableEmbedding
  (litgpt_qlora.stable_embedding): a new module, so its weight and its LayerNorm's weight and bias
  require grad though no optimizer holds them; its forward saves the indices and the
  LayerNorm's input, mean and rstd, and every layer's input then requires grad. The swap came in
  litgpt v0.5.0 (PR #1770); `finetune.stable_embedding: false` models the releases before it
  (and lit-gpt 2023): the frozen embedding, whose output needs no grad, as under LoRA.
- bitsandbytes before 0.43.2 (finetune.bnb_version) keeps every 4-bit matmul's input A
  (litgpt_qlora.Quant.keeps_input); every release dequantizes the weight per call (a step transient,
  memplan.step.transients.qlora_dequantized).
"""

from __future__ import annotations

from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import litgpt, litgpt_configs, litgpt_lora_neox, litgpt_qlora
from memplan.model.stacks.litgpt_lora_adapters import (
    SRC_LINEAR,
    Flags,
    adapter_saves,
    attention_half,
    kept_by_4bit,
    weight_cast,
)
from memplan.precision import dtype_bytes

SRC_FIT = (
    f"litgpt {litgpt.VERSION} finetune/lora.py::fit (model(input_ids, lm_head_chunk_size=128), "
    "logits[-1][..., :-1, :], chunked_cross_entropy(logits, targets[..., 1:])); "
    "litgpt/utils.py::chunked_cross_entropy (list branch); " + kernels.DERIV
)

HEAD_CHUNK = 128
"""finetune/lora.py::fit's `lm_head_chunk_size=128`: the head runs per 128-token slice."""


def _norm(prefix: str, t: int, h: int, st: Setting) -> list[Saved]:
    """LitGPT's RMSNorm with a frozen weight, its input requiring grad (litgpt.SRC_NORM): `x *
    x` and `x * rsqrt` keep x in fp32 and the rsqrt; `x_normed * weight.float()` keeps only
    the weight's side (the fp32 copy of a 16-bit weight), not x_normed."""
    return [s for s in litgpt.norm(prefix, t, h, st) if not s.name.endswith(".normalized")]


def _layer(
    arch: Architecture, st: Setting, fl: Flags, g_in: bool, q: litgpt_qlora.Quant | None = None
) -> tuple[list[Saved], bool]:
    """One Block's saved tensors with LitGPT's LoRA, and whether its output requires grad.
    `g_in`: its input requires grad. The norms' outputs are in the stream dtype, the
    matmuls' (attention, MLP) in the matmul dtype. `q`: the base linears are bnb 4-bit."""
    if arch.model_type in litgpt_configs.NEOX_BLOCK:
        return litgpt_lora_neox.neox_layer(arch, st, fl, g_in, q)
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter, stream, mm = st.tokens, arch.intermediate_size, st.stream, st.matmul
    keeps = q is not None and q.keeps_input
    out: list[Saved] = []
    if g_in:
        out += _norm("norm_1", t, h, st)
    attention, g_qkv, _ = attention_half(arch, st, fl, g_in=g_in, keeps=keeps)
    out += attention
    g_res = g_in or g_qkv or bool(fl.r and fl.projection)
    if g_res:
        out += _norm("norm_2", t, h, st)
    out += weight_cast("mlp.fc_1", (inter, h), st, x_grad=g_res)
    out += weight_cast("mlp.fc_2", (inter, h), st, x_grad=g_res)
    mlp = bool(fl.r and fl.mlp)
    # fc_1 and fc_2 read the same norm_2 output: one storage, kept once.
    kept, normed2 = kept_by_4bit(
        kernels.saved("norm_2.output", (t, h), stream, "MmBackward0", SRC_LINEAR),
        keeps and g_res,
    )
    out += kept
    if mlp:
        # With dropout off (and no cast) both lora_A keep the same norm_2 output: one storage.
        for name, x in (("mlp.fc_1", normed2), ("mlp.fc_2", None)):
            out += adapter_saves(
                name, x, (t, h), inter, 1, fl, st, x_dtype=stream, x_grad=g_res, src=SRC_LINEAR
            )
    g_fc = g_res or mlp
    if g_fc:
        # silu(fc_1(x)) * fc_2(x): silu keeps fc_1's output, the product both its inputs.
        src = litgpt.SRC
        out += [
            kernels.saved("mlp.fc_1.output", (t, inter), mm, "SiluBackward0", src),
            kernels.saved("mlp.silu.output", (t, inter), mm, "MulBackward0", src),
            kernels.saved("mlp.fc_2.output", (t, inter), mm, "MulBackward0", src),
        ]
    out += weight_cast("mlp.proj", (h, inter), st, x_grad=g_fc)
    kept, prod = kept_by_4bit(
        kernels.saved("mlp.proj.input", (t, inter), mm, "MmBackward0", SRC_LINEAR),
        keeps and g_fc,
    )
    out += kept
    if mlp:
        out += adapter_saves(
            "mlp.proj", prod, (t, inter), h, 1, fl, st, x_dtype=mm, x_grad=True, src=SRC_LINEAR
        )
    return out, g_fc


def _chunks(n: int) -> list[int]:
    """`n` positions split in HEAD_CHUNK slices (the last one shorter)."""
    full, last = divmod(n, HEAD_CHUNK)
    return [HEAD_CHUNK] * full + ([last] if last else [])


def _head(
    arch: Architecture, st: Setting, fl: Flags, g: bool, q: litgpt_qlora.Quant | None = None
) -> list[Saved]:
    """ln_f (frozen) and the chunked head: the frozen head keeps nothing (under autocast, its
    weight's cast, once per chunk); with lora_head every 128-position slice `x_i` of ln_f's
    output has its own adapter. lora_A reads `x_i` through matmul's `reshape(-1, h)`: a view
    when the slice is contiguous (one sequence, or one slice), else a copy [B x chunk, h]
    that lora_A keeps. A 4-bit head keeping its input (`q.keeps_input`) keeps each slice
    `x_i` itself (Linear4bit passes it to matmul_4bit unreshaped): views of ln_f's output,
    one storage."""
    h, t, b, s, stream = arch.hidden_size, st.tokens, st.batch, st.sequence, st.stream
    out: list[Saved] = []
    if g and arch.model_type in litgpt_configs.NEOX_BLOCK:
        out = kernels.layer_norm("transformer.ln_f", t, h, stream, st)  # frozen LayerNorm
    elif g:
        out = _norm("transformer.ln_f", t, h, st)
    chunks = _chunks(s)
    for i, _ in enumerate(chunks):
        out += weight_cast(f"lm_head.{i}", (arch.vocab_size, h), st, x_grad=g)
    kept = q is not None and q.keeps_input and g
    if kept:
        ln_f = kernels.saved("transformer.ln_f.output", (t, h), stream, "MmBackward0", SRC_LINEAR)
        out += kept_by_4bit(ln_f, True)[0]
    if not (fl.r and fl.head):
        return out
    view = b == 1 or len(chunks) == 1
    for i, c in enumerate(chunks):
        if view:  # views of ln_f's output, one storage
            name, shape = "transformer.ln_f.output", (t, h)
        else:
            name, shape = f"lm_head.{i}.input", (b * c, h)
        first = not (view and i) and not (view and kept)
        x = kernels.saved(name, shape, stream, "MmBackward0", SRC_LINEAR) if first else None
        out += adapter_saves(
            f"lm_head.{i}",
            x,
            (b * c, h),
            arch.vocab_size,
            1,
            fl,
            st,
            x_dtype=stream,
            x_grad=g,
            src=SRC_LINEAR,
        )
    return out


def loss(batch: int, seq: int, vocab: int) -> list[Saved]:
    """finetune/lora.py's loss (SRC_FIT) over the batch's first seq - 1 positions, in the
    head's 128-position chunks: each `cross_entropy(reduction="none")` keeps its log-softmax
    [batch x chunk, vocab] fp32 and a 0-dim fp32 total_weight; nll_loss keeps its target
    chunk, `targets[..., 1:]` split and reshaped: views of the whole int64 targets [batch,
    seq] for one sequence, else a copy [batch x chunk] each; the divisor is 0-dim int64."""
    fp32, i64 = kernels.FP32, kernels.INT64
    chunks = _chunks(seq - 1)
    out = [
        kernels.saved(f"log_softmax.{i}", (batch * c, vocab), fp32, "LogSoftmaxBackward0", SRC_FIT)
        for i, c in enumerate(chunks)
    ]
    if batch == 1:
        out.append(kernels.saved("targets", (batch * seq,), i64, "NllLossBackward0", SRC_FIT))
    else:
        out += [
            kernels.saved(f"targets.{i}", (batch * c,), i64, "NllLossBackward0", SRC_FIT)
            for i, c in enumerate(chunks)
        ]
    return [
        *out,
        kernels.saved("total_weight", (len(chunks),), fp32, "NllLossBackward0", SRC_FIT),
        kernels.saved("divisor", (), i64, "DivBackward0", SRC_FIT),
    ]


def loss_gradient(batch: int, seq: int, vocab: int) -> int:
    """The most the chunked loss's backward holds at once beyond the saved tensors: the
    engine runs each chunk's nll_loss backward then its log_softmax backward (the last chunk
    first); while chunk k's log_softmax backward writes its [batch x chunk, vocab] fp32
    gradient, nll_loss's gradient of the same size is alive, and every later chunk's
    log_softmax gradient has taken the place of that chunk's saved log-softmax, freed once
    its node ran (torch/csrc/autograd/engine.cpp releases a node's saved variables after
    it runs): two gradients of the largest chunk. Measured on CPU against litgpt 0.5.9 by
    tests/test_litgpt_lora.py (tests/litgpt_probe.py::loss_backward_excess)."""
    return 2 * batch * max(_chunks(seq - 1)) * vocab * dtype_bytes(kernels.FP32)


def unsupported(st: Setting) -> str:
    """What LitGPT's LoRA rule does not cover beyond memplan.model.stacks.litgpt's, or ''."""
    if (st.stream, st.matmul) not in (
        (kernels.FP32, kernels.FP32),
        ("bf16", "bf16"),
        (kernels.FP32, "bf16"),
    ):
        return (
            "LitGPT's LoRA is proved for 32-true, bf16-true and bf16-mixed (memplan precision "
            "fp32, bf16, amp-bf16): 16-true and 16-mixed are not modelled"
        )
    if st.sequence < 2:
        return "finetune/lora.py drops the last position: a sequence needs 2 tokens or more"
    return ""


def saved(
    arch: Architecture, st: Setting, fl: Flags, q: litgpt_qlora.Quant | None = None
) -> Activations:
    """litgpt.lora.GPT's forward and finetune/lora.py's loss on one GPU: see the module
    docstring. `q`: QLoRA (finetune/lora.py --quantize bnb.*)."""
    why = litgpt.unsupported(arch, st) or unsupported(st)
    if not why and q is not None and st.stream != st.matmul:
        why = (
            'finetune/lora.py refuses --quantize with a *-mixed precision ("Quantization and '
            'mixed precision is not supported."): use precision bf16 or fp32'
        )
    if not why and litgpt_configs.unit_offset(arch):
        # Measured: +256 B per norm on the tiny Gemma in fp32 and bf16-mixed (the frozen
        # `1 + weight`), not in bf16-true; the LoRA rule's frozen norms have no such term yet.
        why = (
            "LitGPT's LoRA is proved on its Llama-shaped configs (Llama, Qwen2.5, Mistral, "
            "Phi-3): Gemma's frozen add_unit_offset norms (`1 + weight`, a new fp32 tensor the "
            "multiply keeps) are not in the LoRA rule"
        )
    if why:
        return litgpt.refused(f"activations not modelled: {why}.")
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    blocks = [
        Block(
            name="embeddings",
            count=1,
            tensors=tuple(litgpt_qlora.stable_embedding_saves(arch, st, q)),
        )
    ]
    # The frozen embedding's output does not require grad (LoRA; QLoRA without the swap,
    # litgpt_qlora.SRC_NO_SWAP); StableEmbedding's does (litgpt_qlora.SRC_STABLE).
    g = q is not None and q.stable_embedding
    runs: list[tuple[list[Saved], int]] = []
    for _ in range(arch.num_layers):
        layer, g_out = _layer(arch, st, fl, g, q)
        if runs and runs[-1][0] == layer:
            runs[-1] = (layer, runs[-1][1] + 1)
        else:
            runs.append((layer, 1))
        g = g_out
    for layer, count in runs:
        name = "layers"  # one block per run of equal layers, as memplan.activations.lora
        if st.checkpointing == "full" and layer:
            kept = kernels.saved(
                "checkpoint.x", (b, s, h), st.stream, "Noop", litgpt.SRC_CHECKPOINT
            )
            blocks.append(
                Block(name=name, count=count, tensors=(kept,), recompute=tuple(layer), layered=True)
            )
        elif st.checkpointing == "full":
            # A block that records nothing packs no saved tensor: nothing references the
            # checkpoint's frame, which holds the block input (torch/utils/checkpoint.py::
            # _CheckpointFrame.save_inputs, kept alive only by the packed tensors' hooks).
            blocks.append(Block(name=name, count=count, tensors=(), layered=True))
        else:
            blocks.append(Block(name=name, count=count, tensors=tuple(layer), layered=True))
    blocks.append(Block(name="head", count=1, tensors=tuple(_head(arch, st, fl, g, q))))
    blocks.append(Block(name="loss", count=1, tensors=tuple(loss(b, s, vocab))))
    notes: tuple[str, ...] = (
        f"litgpt {litgpt.VERSION}'s LoRA GPT (lora.py; r={fl.r}, dropout={fl.dropout}, "
        f"query={fl.query}, key={fl.key}, value={fl.value}, projection={fl.projection}, "
        f"mlp={fl.mlp}, head={fl.head}), every other parameter frozen "
        "(mark_only_lora_as_trainable), the head and chunked_cross_entropy in 128-position "
        "chunks as finetune/lora.py::fit runs them.",
        "LitGPT's fit loop keeps Fabric's fp32 logits chunks until the next forward returns: "
        "the step holds them in every phase (memplan.step.transients.litgpt_logits).",
    )
    if q is not None:
        embedding = (
            "the embedding swapped for bitsandbytes' StableEmbedding (litgpt >= 0.5.0), whose "
            "weight requires grad: its indices and LayerNorm are saved and every layer's input "
            "requires grad"
            if q.stable_embedding
            else "the embedding the frozen model's (finetune.stable_embedding false: no "
            "StableEmbedding swap, as litgpt <= 0.4.13 ran), its output needing no grad"
        )
        notes += (
            "QLoRA as finetune/lora.py --quantize bnb.* runs it: every Linear, lm_head "
            "included, a bnb Linear4bit (Lightning's BitsandbytesPrecision); "
            + embedding
            + (
                "; bitsandbytes before 0.43.2 keeps every 4-bit matmul's input "
                "(MatMul4Bit ctx.tensors = (A, B))."
                if q.keeps_input
                else "; bitsandbytes from 0.43.2 keeps no 4-bit matmul input."
            ),
        )
    return Activations(
        modelled=True,
        blocks=tuple(blocks),
        logits_bytes=t * vocab * dtype_bytes(st.matmul),
        upcast_bytes=t * vocab * dtype_bytes(kernels.FP32) if st.matmul != kernels.FP32 else 0,
        hidden_bytes=t * h * dtype_bytes(st.stream),
        loss_gradient_bytes=loss_gradient(b, s, vocab),
        notes=notes,
        implementation="litgpt",
    )
