"""Activations when only part of the model trains: peft LoRA adapters and frozen parameters.

Autograd records an op only when one of its inputs requires grad, and each node saves only
what the gradients it must produce need (tools/autograd/derivatives.yaml: a linear saves its
input for the weight's gradient, the weight for the input's; gen_variable_type.py saves each
one only when that gradient is wanted). So a frozen weight drops its linear's saved input (and
an RMSNorm weight its normalized input), and a layer whose input does not require grad — the
first one after a frozen embedding — records nothing until its first adapter.

`adjust` takes the full fine-tuning prediction of the family's rule (for the families whose
record has `lora_ends`, memplan.model.families) and keeps each saved tensor only where its
node still saves it, by the tensor's name and the trainability of the modules around it,
then adds what each LoRA adapter saves (peft 0.21.2 tuners/lora/layer.py::Linear.forward:
`result + lora_B(lora_A(dropout(x))) * scaling`, x first cast to the adapter's dtype):
- lora_A's input: x itself (the storage the base linear would save), or its cast to the
  adapter dtype, or the dropout output; with dropout active and x requiring grad, the mask;
- lora_B's input: lora_A's output [tokens, r];
- under autocast, lora_A's input cast to the matmul dtype and both adapter weights cast
  (aten/src/ATen/autocast_mode.h::cached_cast), not x.
Layers are grouped into blocks of identical trainability. Measured on CPU against peft models
in tests/test_finetune_peft.py.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.activations.lora_flow import (
    SRC_LORA_EMBEDDING,
    Flow,
    adapter_saved,
    adapter_tensors,
    embedding_adapter_saved,
    layer_flow,
    layer_tensors,
)
from memplan.activations.lora_scope import Adapter, Scope, param_wrapped, scopes
from memplan.config.finetune import FinetuneSpec
from memplan.model.families import all_families, family_of
from memplan.model.families.record import ModelEnds
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Inventory


def adjust(
    saved: Activations,
    inventory: Inventory,
    st: Setting,
    *,
    dropout: float,
    input_grad: bool = False,
) -> Activations:
    """`saved` (the full fine-tuning prediction) for a model whose parameters are partly
    frozen or carry LoRA adapters; `saved` itself when everything trains."""
    arch = inventory.architecture
    if not saved.modelled or arch is None:
        return saved
    layers, top, frozen = scopes(inventory, arch.num_layers, dropout=dropout, default=st.stream)
    if not frozen and not top.adapters and not any(sc.adapters for sc in layers):
        return saved
    family = family_of(arch.model_type)
    ends = family.lora_ends if family else None
    wrapped_elsewhere = (
        param_wrapped(inventory, (*(m for _, m in ends.embeddings), ends.head)) if ends else ""
    )
    if wrapped_elsewhere:
        return not_modelled(wrapped_elsewhere)
    if ends is None:
        modelled = [t for f in all_families() if f.lora_ends for t in f.model_types]
        return not_modelled(
            f"activations of model_type {arch.model_type!r} with frozen parameters or LoRA "
            f"are not modelled (modelled: {', '.join(modelled)}): "
            "per_gpu.activations is 0 and the peak leaves them out."
        )
    if arch.model_type in ends.moe:
        # LoRA on the MoE router and fused experts (lora.ParamWrapper): memplan.activations.
        # lora_moe (imported here: MoE families only)
        from memplan.activations.lora_moe import unwrap

        layers = tuple(unwrap(sc, arch) for sc in layers)
    flow_of = layer_flow(ends, str(arch.extra.get("hidden_act", "")), arch.model_type)
    # transformers' activation_checkpointing_enable (modeling_utils.py::
    # _activation_checkpointing_enable) and peft's prepare_model_for_kbit_training call
    # enable_input_require_grads(): the input embedding's output requires grad.
    emb_grad = input_grad or any(top.out_grad(m, False) for _, m in ends.embeddings)
    flows: list[Flow] = []
    g = emb_grad
    for sc in layers:
        flows.append(flow_of(sc, g, st))
        g = flows[-1].out
    blocks: list[Block] = []
    for block in saved.blocks:
        if block.name == "layers":
            blocks += _layer_blocks(block, layers, flows, st, start=emb_grad)
        elif block.name == "embeddings":
            rope = any(f.rope for f in flows)
            blocks.append(_ends(block, ends, top, st, rope=rope, final=g, emb_grad=emb_grad))
        elif block.name == "head":
            head = _ends(block, ends, top, st, rope=True, final=g, emb_grad=emb_grad)
            if st.autocast and top.four_bit:  # the head quantized too (skip_modules)
                head = replace(head, tensors=tuple(four_bit(head.tensors, top.four_bit, st, {})))
            blocks.append(head)
        else:
            blocks.append(block)
    # A 4-bit head's backward (its logits' gradient in the compute dtype beside its weight
    # dequantized) is a step transient: memplan.step.transients.qlora_head_backward.
    return replace(saved, blocks=tuple(blocks))


def _layer_blocks(
    block: Block, layers: tuple[Scope, ...], flows: list[Flow], st: Setting, *, start: bool
) -> list[Block]:
    """One block per run of consecutive layers with the same trainability and input."""
    out: list[Block] = []
    g_in = start
    runs: list[tuple[tuple[Scope, bool], Flow, int]] = []
    for sc, flow in zip(layers, flows, strict=True):
        key = (sc, g_in)
        if runs and runs[-1][0] == key:
            runs[-1] = (key, flow, runs[-1][2] + 1)
        else:
            runs.append((key, flow, 1))
        g_in = flow.out
    full = bool(block.recompute) and all(s.saved_by == "Noop" for s in block.tensors)
    for (sc, _), flow, count in runs:
        tensors = layer_tensors(block.tensors, flow, sc, st)
        recompute = layer_tensors(block.recompute, flow, sc, st)
        # Under full checkpointing the adapters' tensors are made again in backward.
        (recompute if full else tensors).extend(adapter_tensors(flow, sc, st))
        if st.autocast and sc.four_bit:
            tensors = four_bit(tensors, sc.four_bit, st, flow.four_bit_outputs, flow.four_bit_views)
            recompute = four_bit(
                recompute, sc.four_bit, st, flow.four_bit_outputs, flow.four_bit_views
            )
        # held=(): frozen weights are not cached (autocast_mode.cpp::cached_cast needs
        # requires_grad); the adapters' own cached copies are not modelled (a few MB at most)
        out.append(
            replace(block, count=count, tensors=tuple(tensors), recompute=tuple(recompute), held=())
        )
    return out


def _ends(
    block: Block,
    ends: ModelEnds,
    top: Scope,
    st: Setting,
    *,
    rope: bool,
    final: bool,
    emb_grad: bool,
) -> Block:
    """The embeddings or the head block: embedding indices kept for a trainable (or adapted)
    embedding, the shared RoPE cos/sin when some layer's RoPE is recorded, the final norm and
    the LM head's input by the same rules as inside a layer."""
    prefixes = dict(ends.embeddings)
    nf = final or ends.final_norm in top.params
    kept: list[Saved] = []
    for s in block.tensors:
        prefix, _, rest = s.name.partition(".")
        if s.saved_by == "Noop":
            keep = True
        elif prefix in prefixes and rest == "indices":
            module = prefixes[prefix]
            keep = module in top.weights or top.adapted(module) is not None
        elif prefix == "drop":
            keep = emb_grad
        elif prefix == "rotary_emb":
            keep = rope
        elif prefix == ends.final_prefix:
            # RMSNorm keeps x and rstd for x's gradient, y for the weight's; LayerNorm keeps
            # input, mean and rstd whenever recorded.
            if rest == "normalized":
                keep = ends.final_norm in top.weights
            else:
                keep = final if ends.rms_norm else nf
        elif ends.head_softcap and prefix == ends.head_softcap:
            keep = top.out_grad(ends.head, nf)  # tanh saves its result when the logits do
        elif prefix == ends.head:
            if rest == "input":
                keep = top.input_saved(ends.head, st)
            else:  # weight_cast
                keep = nf
        else:
            keep = True
        if keep:
            kept.append(s)
    if top.wrapped:
        kept += _ends_wrapped(block, ends, top, st, final=nf)
    for module, ad in top.adapters:
        if ad.embedding and block.name == "embeddings":
            kept += embedding_adapter_saved(module, ad, st)
            if ends.embed_scale:
                kept += _embed_scale_cast(module, ad, st)
        elif block.name == "head" and module == ends.head:
            kept += adapter_saved(module, ad, st, dropout=top.dropout, x_grad=nf)
    return replace(block, tensors=tuple(kept))


def _ends_wrapped(
    block: Block, ends: ModelEnds, top: Scope, st: Setting, *, final: bool
) -> list[Saved]:
    """What a lora.ParamWrapper on an input embedding's or the LM head's weight saves beyond
    the module it wraps (memplan.activations.lora_moe.wrapped_saved: the adapters' casts where
    the delta's mm made them; the merged weight where the module's op keeps its weight for
    its input's gradient). The head's F.linear keeps it where its input requires grad
    (`final`); an embedding never does (torch derivatives.yaml `embedding`: only the indices,
    kept by `_ends` since the weight trains). Measured: benchmarks/lora_param_wrapper.py's
    `ends` cases."""
    from memplan.activations.lora_moe import wrapped_saved  # lora.ParamWrapper cases only

    if block.name == "embeddings":
        modules = {m for _, m in ends.embeddings}
        inputs = dict.fromkeys(modules, False)
    else:
        modules = {ends.head}
        inputs = {ends.head: final}
    mine = tuple((n, w) for n, w in top.wrapped if n.removesuffix(".weight") in modules)
    if not mine:
        return []
    flow = Flow(keep={}, inputs=inputs, linears={})
    return wrapped_saved(flow, replace(top, wrapped=mine), st)


def _embed_scale_cast(module: str, ad: Adapter, st: Setting) -> list[Saved]:
    """peft 0.21.2 tuners/lora/layer.py::Embedding.forward scales the adapter's output by the
    base layer's embed_scale (GemmaTextScaledWordEmbedding: a 0-dim buffer in the parameters'
    dtype): `adapter_output * embed_scale.to(adapter_output.dtype)`, and the multiply saves
    that cast, a new tensor where the adapter's output is in another dtype (the buffer itself,
    not counted, where not)."""
    out = st.matmul if st.autocast and st.matmul != ad.dtype else ad.dtype
    if out == st.stream:
        return []
    by = "MulBackward0"
    return [kernels.saved(f"{module}.embed_scale_cast", (), out, by, SRC_LORA_EMBEDDING)]


def four_bit(
    tensors: list[Saved] | tuple[Saved, ...],
    quantized: frozenset[str],
    st: Setting,
    outputs: dict[str, tuple[str, ...]],
    views: dict[str, tuple[str, str, str]] | None = None,
) -> list[Saved]:
    """What bitsandbytes' Linear4bit modules (`quantized`) change under autocast. Linear4bit
    casts its input to the compute dtype itself and its output back to the input's dtype
    (bitsandbytes 0.50 nn/modules.py::Linear4bit.forward: `x.to(self.compute_dtype)`, then
    `bnb.matmul_4bit(...).to(inp_dtype)`), and MatMul4Bit keeps the packed weight, not a copy
    (autograd/_functions.py::MatMul4Bit.forward: `ctx.tensors = (None, B)`). So unlike a
    linear under autocast it saves no cast of its weight, and what is made from its output
    before the next matmul (`outputs`, the layer's Flow.four_bit_outputs) stays in the
    stream's dtype when its input was, and a 16-bit output kept whole for a view the core
    saves becomes the core's cast of that view (`views`, Flow.four_bit_views). Measured by
    `memplan verify` on the CPU (benchmarks/qlora_verify.py)."""
    shapes = {s.name: s.shape for s in tensors}
    out = []
    for s in tensors:
        module, like, view = (views or {}).get(s.name, ("", "", ""))
        if module in quantized and like in shapes:
            out.append(replace(s, name=view, shape=shapes[like], dtype=st.matmul))
            continue
        base = s.name.removesuffix(".weight_cast")
        if base != s.name and base in quantized:
            continue
        made_by = outputs.get(s.name)
        if made_by and all(m in quantized for m in made_by):
            s = replace(s, dtype=st.stream)
        out.append(s)
    return out


def apply(ft: FinetuneSpec, inventory: Inventory, saved: Activations, st: Setting) -> Activations:
    """The hook memplan.activations.micro_batch calls: `saved` unchanged for a full fine-tune
    without frozen parameters, else `adjust`ed (`inventory` is memplan.model.finetune.lora's)."""
    if ft.method == "full" and not ft.freeze:
        return saved
    out = adjust(
        saved,
        inventory,
        st,
        dropout=ft.dropout if ft.method != "full" else 0.0,
        # transformers' activation_checkpointing_enable makes the embedding's output require
        # grad (modeling_utils.py::_activation_checkpointing_enable); prepare_model_for_kbit_
        # training does only with its use_gradient_checkpointing=True, which turns
        # checkpointing on too (peft 0.21 utils/other.py): without checkpointing, not.
        input_grad=st.checkpointing == "full",
    )
    if ft.method == "qlora" and out.modelled:
        note = (
            "qlora activations: the LoRA rules with bitsandbytes' 4-bit Linear (no weight copy "
            "saved, its input's dtype handed back) and, under prepare_model_for_kbit_training, "
            "an fp32 stream (measured by `memplan verify` on the CPU, bitsandbytes 0.50: "
            "benchmarks/qlora_verify.py)."
        )
        out = replace(out, notes=(*out.notes, note))
    return out
