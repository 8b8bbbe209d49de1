"""The step's own transient terms: tensors a training step makes around its saved ones (the
logits, the loss's upcast and gradient, the layers' working sets, the embedding's backward),
the caching allocator's rounding, and the copies fp8 and QLoRA make of the weights.

What the engines add (buckets, gathers, the optimizer step's temporaries) is theirs:
memplan.states.engines (EngineStep) and memplan.states.optimizer_step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from memplan import memory
from memplan.config.finetune import FinetuneSpec
from memplan.memory import PHASES, Phase, Transient
from memplan.model.finetune import qlora
from memplan.model.forward import compiled
from memplan.model.forward.tensors import Activations, Block
from memplan.model.inventory import Inventory, TensorSpec
from memplan.precision import Recipe, dtype_bytes
from memplan.states import fp8
from memplan.states.engines.base import StepCache


def activation_terms(saved: Activations) -> list[Transient]:
    """Tensors a step makes around its saved ones: the logits, the loss's fp32 upcast, the
    gradient of the log-softmax (two [tokens, vocab] fp32 tensors at once: nll_loss_backward's
    output and log_softmax_backward's), and working sets (an estimate: the op producing the
    largest saved tensor of a layer has its input alive too; in backward, that tensor's
    gradient and its input's, plus two hidden-state gradients: `working_sets`), and what
    checkpointing holds that no node saves (Activations.checkpoint_held: the eager mask)."""
    if not saved.modelled:
        return []
    src = "transformers loss/loss_utils.py::ForCausalLMLoss; " + "tools/autograd/derivatives.yaml"
    out = [
        Transient(
            name="logits",
            bytes=saved.logits_bytes,
            phases=("loss",),
            formula="[tokens, vocab] in the matmul dtype (the model output; dropped before "
            "backward, as transformers' Trainer.compute_loss does)",
            source=src,
        ),
        Transient(
            name="loss_fp32_upcast",
            bytes=saved.upcast_bytes,
            phases=("loss",),
            formula="logits.float(): [tokens, vocab] x 4 B",
            source=src,
        ),
        Transient(
            name="logits_gradient",
            bytes=2 * (saved.upcast_bytes or saved.logits_bytes),
            phases=("backward_start",),
            formula="2 x [tokens, vocab] x 4 B (nll_loss and log_softmax backward outputs)",
            source=src,
            pieces=2,
        )
        if saved.loss_gradient_bytes is None
        else Transient(
            name="logits_gradient",
            bytes=saved.loss_gradient_bytes,
            phases=("backward_start",),
            formula="[tokens, vocab] in the logits' dtype: the compiled loss's backward, one "
            "fused kernel writing the logits' gradient",
            source=compiled.SRC,
        ),
    ]
    if saved.implementation == "litgpt":
        out[:2] = [litgpt_logits(saved)]
        if saved.loss_gradient_bytes is not None:
            out[1] = litgpt_chunked_loss_gradient(saved.loss_gradient_bytes)
    layers = saved.block("layers")
    if layers is not None:
        out += working_sets(saved, layers)
    cache = autocast_cache(saved)
    if cache is not None:
        out.append(cache)
    out += saved.checkpoint_held
    return out


SRC_AUTOCAST_CACHE = (
    "torch 2.13 aten/src/ATen/autocast_mode.cpp::cached_cast (lower-precision casts of fp32 "
    "leaf tensors that require grad kept in `cached_casts`), clear_cache (called when the "
    "outermost torch.autocast exits: torch/amp/autocast_mode.py::autocast.__exit__)"
)


def autocast_cache(saved: Activations) -> Transient | None:
    """The copies autocast's cast cache alone holds (Block.held: the weights' casts under full
    checkpointing, whose layers save nothing else in the forward; the biases', which no op
    saves): made as the forward runs, all alive at its end and through the loss (transformers'
    models compute it inside their forward, in the autocast region), freed when the region
    exits. One allocation per copy, in forward order."""
    parts = tuple(t.bytes for b in saved.blocks if b.held for _ in range(b.count) for t in b.held)
    if not sum(parts):
        return None
    return Transient(
        name="autocast_cast_cache",
        bytes=sum(parts),
        phases=("forward", "loss"),
        formula=f"{len(parts)} cast copies held by autocast's cache and no saved tensor",
        source=SRC_AUTOCAST_CACHE,
        parts=parts,
    )


SRC_RECOMPUTE = (
    "torch 2.13 torch/utils/checkpoint.py::_checkpoint_without_reentrant_generator "
    "(unpack_hook: the first saved tensor the backward unpacks reruns the region's forward, "
    "whose saved tensors are made in forward order and kept until their node's backward)"
)


SRC_LAYER_SCATTER = (
    "torchtitan 9dec370 parallelisms/parallelize_llama.py::apply_tp (`attention.wo`, "
    "`feed_forward.w2`: RowwiseParallel(output_layouts=Shard(1)), the layer input gathered by "
    "SequenceParallel / PrepareModuleInput and kept by the attention and feed-forward until "
    "their output is reduce-scattered); torch 2.13 torch/distributed/_functional_collectives.py"
    "::reduce_scatter_single (scatter_dim != 0: torch/_utils.py::_chunk_or_narrow_cat); "
    "traced op by op: benchmarks/torchtitan_70b_trace.py"
)


def working_sets(saved: Activations, layers: Block) -> list[Transient]:
    """A decoder layer's working sets, as the tensors the step makes (`parts`, in the order it
    makes them; the allocator replay allocates each, so a working set fills the free blocks
    below it as the real step's tensors do, not one block as large as their sum):
    - forward: the op producing the layer's largest saved tensor (of what it re-creates under
      checkpointing) with its input alive: two tensors of that size. Under torchtitan's
      sequence parallelism (Activations.layer_scatter_bytes), the largest saved tensor (the
      gathered layer input) alive while a row-parallel output and its chunks concatenated are
      made for the reduce-scatter (SRC_LAYER_SCATTER): three tensors, as the traced step makes
      them.
    - backward: the layer's output gradient (made by the layer above, or the head); what
      checkpointing re-creates, each saved tensor of the rule's `recompute` list in forward
      order (SRC_RECOMPUTE); the largest saved tensor's gradient and its input's, with what
      one op's backward holds beside them where the rule names it (Block.
      backward_temporaries: BLOOM's GELU); the layer's input gradient (the layer's last op,
      passed on to the layer below).
    The sizes are the rule's own tensors; an estimate of which are alive at once, checked by
    memplan verify's measured peak and, op by op, against traced steps
    (benchmarks/torchtitan_70b_trace.py, benchmarks/bert_op_trace.py).

    A traced CPU profile records both working sets from the model's own step instead
    (Block.forward_working / backward_working: memplan.verify.trace.working, the most bytes
    alive beyond the saved tensors while a layer runs forward, and while the layers run
    backward): those replace the estimate (`traced_working_sets`)."""
    inner = layers.recompute or layers.tensors
    largest = max((t.bytes for t in inner if not t.pooled), default=0)  # pooled: a sum
    hidden = saved.hidden_bytes
    recomputed = tuple(t.bytes for t in layers.recompute if t.bytes > 0)
    forward = Transient(
        name="forward_working_set",
        bytes=2 * largest,
        phases=("forward",),
        formula=f"2 x {largest:,} B (a layer's largest saved tensor and its input)",
        source="memplan estimate (checked by memplan verify's measured peak)",
        parts=(largest, largest),
    )
    scatter = saved.layer_scatter_bytes
    if 2 * scatter > largest:
        forward = replace(
            forward,
            bytes=largest + 2 * scatter,
            formula=f"{largest:,} B (a layer's largest saved tensor: its gathered input) + "
            f"2 x {scatter:,} B (a row-parallel output, Partial, and its chunks concatenated "
            "for the sequence-parallel reduce-scatter)",
            source=SRC_LAYER_SCATTER,
            parts=(largest, scatter, scatter),
        )
    extra = tuple(t.bytes for t in layers.backward_temporaries)
    more = ""
    if extra:
        more = f" + {sum(extra):,} B held inside one op's backward ({len(extra)} temporaries)"
    backward = Transient(
        name="backward_working_set",
        bytes=2 * largest + 2 * hidden + layers.recompute_bytes + sum(extra),
        phases=("backward",),
        formula=f"2 x {largest:,} B + 2 x {hidden:,} B (hidden-state gradients) + "
        f"{layers.recompute_bytes:,} B recomputed by checkpointing ({len(recomputed)} "
        f"tensors){more}",
        source="memplan estimate; recompute: "
        + SRC_RECOMPUTE
        + "".join(f"; {src}" for src in sorted({t.source for t in layers.backward_temporaries})),
        parts=(hidden, *recomputed, largest, *extra, largest, hidden),
    )
    return traced_working_sets(layers, forward, backward)


SRC_TRACED_WORKING = (
    "memplan.verify.trace.working (the profile's trace: a forward + backward under "
    "FakeTensorMode, every storage an op makes counted until freed)"
)


def traced_working_sets(layers: Block, forward: Transient, backward: Transient) -> list[Transient]:
    """The estimate's forward and backward working sets, each replaced by the one the
    profile traced where it has one (Block.forward_working / backward_working; one
    allocation each: CPU profiles, no allocator replay)."""
    out = [forward, backward]
    traced = (layers.forward_working, layers.backward_working)
    for i, (term, size) in enumerate(zip(out, traced, strict=True)):
        if size is None:
            continue
        what = "a layer's forward" if i == 0 else "the layers' backward (gradients excluded)"
        out[i] = replace(
            term,
            bytes=size,
            formula=f"{size:,} B traced: the most {what} holds beyond the saved tensors",
            source=SRC_TRACED_WORKING,
            parts=(size,),
        )
    return out


SRC_OUTPUT_CHUNKS = (
    "torch 2.13 torch/distributed/pipelining/stage.py::_PipelineStageBase.forward_one_chunk "
    "(`if self.is_last and save_forward_output: self.output_chunks.append(output)`), "
    "clear_runtime_states (`output_chunks.clear()`, at the start of the next step()); "
    "schedules.py::PipelineScheduleSingle.step / PipelineScheduleMulti.step "
    "(return_outputs=True by default: _merge_outputs(output_chunks) at the end)"
)


def pipeline_output_chunks(saved: Activations, *, held: int) -> list[Transient]:
    """torch.distributed.pipelining's last stage keeps its output (the logits, as the model
    returns them: TP-local under loss_parallel) of every micro-batch in `stage.output_chunks`
    until the next step() clears them; the backward only detaches it (SRC_OUTPUT_CHUNKS).
    `held` earlier micro-batches' outputs are alive at the rank's peak (memplan.activations.
    pipeline.torch_outputs_held), from its forward to the optimizer step; the current
    micro-batch's output, which the `logits` term holds at the loss only, stays too from the
    loss's backward on. Empty on the other stages (no logits there).

    Not in the timeline: step()'s `_merge_outputs` concatenates the m outputs when the
    schedule ends (m more outputs for a moment, after the gradients' reduce-scatter and
    before the optimizer step); it holds less than the peak on the 405B rows (see
    benchmarks/published.py's notes)."""
    if saved.logits_bytes <= 0:
        return []
    out = []
    if held > 0:
        out.append(
            Transient(
                name="pipeline_output_chunks",
                bytes=held * saved.logits_bytes,
                phases=PHASES[1:],
                formula=f"{held} earlier micro-batches x {saved.logits_bytes:,} B (the last "
                "stage's output, kept in stage.output_chunks until the next step)",
                source=SRC_OUTPUT_CHUNKS,
            )
        )
    out.append(
        Transient(
            name="pipeline_output_chunks_current",
            bytes=saved.logits_bytes,
            phases=("backward_start", "backward", "backward_end", "optimizer_step"),
            formula=f"{saved.logits_bytes:,} B: the current micro-batch's output, kept in "
            "stage.output_chunks after its loss",
            source=SRC_OUTPUT_CHUNKS,
        )
    )
    return out


def litgpt_logits(saved: Activations) -> Transient:
    """The logits of LitGPT's training loops, in place of the model output and the loss's
    upcast: Fabric's `_FabricModule.forward` returns the output cast to fp32 (precision
    plugins' `convert_output`, lightning 2.6; the 16-bit output is freed inside it) and
    pretrain.py::fit / finetune/full.py::fit keep it bound (`logits = model(input_ids)`,
    litgpt 0.5.9) until the next iteration's forward returns: one [tokens, vocab] fp32 tensor
    alive in every phase of a steady-state step. chunked_cross_entropy reads it without
    another copy."""
    return Transient(
        name="logits",
        bytes=saved.upcast_bytes or saved.logits_bytes,
        phases=memory.ALWAYS,
        formula="[tokens, vocab] x 4 B (Fabric's fp32 output, held by the loop's `logits` "
        "until the next forward returns)",
        source="litgpt 0.5.9 pretrain.py::fit, finetune/full.py::fit; lightning/fabric/"
        "wrappers.py::_FabricModule.forward",
    )


def litgpt_chunked_loss_gradient(size: int) -> Transient:
    """The gradient of LitGPT's chunked loss (finetune/lora.py: the head and
    chunked_cross_entropy in 128-position chunks), in place of the whole-vocabulary one:
    two [batch x chunk, vocab] fp32 gradients of the largest chunk at once
    (memplan.model.stacks.litgpt_lora.loss_gradient)."""
    return Transient(
        name="logits_gradient",
        bytes=size,
        phases=("backward_start",),
        formula="2 x [batch x 128, vocab] x 4 B (one chunk's nll_loss and log_softmax "
        "backward outputs; the later chunks' gradients replace their freed log-softmax)",
        source="litgpt 0.5.9 finetune/lora.py::fit, utils.py::chunked_cross_entropy; "
        "memplan.model.stacks.litgpt_lora.loss_gradient",
        pieces=2,
    )


def embedding_backward(
    inventory: Inventory, saved: Activations, grad: str, cache: StepCache | None = None
) -> Transient:
    """The last op of backward: the embedding's gradient is built from the hidden-state
    gradient [tokens, hidden] (aten embedding_dense_backward: a zeroed [vocab, hidden] tensor
    that becomes `.grad`). With the LM head tied to the embedding, `.grad` already holds the
    head's gradient and accumulating the embedding's takes two more [vocab, hidden] tensors
    (measured with torch MemTracker on CPU: GPT-2 peaks here)."""
    width = dtype_bytes(grad)
    # The word embedding as this rank holds it (vocab-parallel under TP); tied to a head on
    # the same rank only without pipeline parallelism (the last stage keeps its own copy).
    table = (
        _embedding_table(inventory)
        if cache is None
        else cache.get(("embedding table", inventory), lambda: _embedding_table(inventory))
    )
    tied_here = bool(inventory.tied) and saved.block("head") is not None
    tied = 2 * table.numel * width if tied_here and table is not None else 0
    return Transient(
        name="embedding_backward",
        bytes=saved.hidden_bytes + tied,
        phases=("backward_end",),
        formula=f"{saved.hidden_bytes:,} B hidden-state gradient"
        + (f" + 2 x {list(table.shape)} x {width} B (tied head)" if table and tied else ""),
        source="aten native/Embedding.cpp::embedding_dense_backward_cpu; "
        "torch/csrc/autograd/functions/accumulate_grad.h",
    )


def _embedding_table(inventory: Inventory) -> TensorSpec | None:
    """The largest word-embedding tensor this rank holds (None: none)."""
    return max(
        (t for t in inventory.parameters if t.role == "embedding"),
        key=lambda t: t.numel,
        default=None,
    )


SRC_ROUNDING = "c10/cuda/CUDACachingAllocator.cpp::round_size (kMinBlockSize = 512)"


def rounding(
    saved: Activations,
    inventory: Inventory,
    recipe: Recipe,
    cache: StepCache,
    *,
    storage_shards: int | None,
) -> list[Transient]:
    """The caching allocator's 512-byte blocks (memory.ALLOCATOR_BLOCK) over every saved tensor
    and, for engines that keep one storage per parameter (EngineStep.storage_shards: ddp,
    fsdp2), over each parameter's parameter, gradient and optimizer-state tensors, each
    ceil(numel / storage_shards) elements (flat-buffer engines: negligible)."""
    acts = sum(b.count * b.rounding_each for b in saved.blocks if not b.on_host)
    out = [
        Transient(
            name="allocator_rounding_activations",
            bytes=acts,
            phases=("forward", "loss", "backward_start", "backward"),
            formula="sum over saved tensors of (round_up(bytes, 512) - bytes)",
            source=SRC_ROUNDING,
        )
    ]
    if storage_shards is None:
        return out
    widths = [dtype_bytes(recipe.parameters), dtype_bytes(recipe.gradients)]
    widths += [dtype_bytes(recipe.optimizer_states)] * 2
    shards = storage_shards
    states = cache.get(
        ("rounding", inventory, shards, tuple(widths)),
        lambda: sum(
            k * memory.rounding(-(-numel // shards) * w for w in widths)
            for numel, k in Counter(t.numel for t in inventory.parameters).items()
        ),
    )
    out.append(
        Transient(
            name="allocator_rounding_states",
            bytes=states,
            phases=PHASES,
            formula="per parameter tensor: parameter, gradient and two state tensors "
            "rounded up to 512 B",
            source=SRC_ROUNDING,
        )
    )
    return out


def fp8_weights(
    inventory: Inventory, *, engine: str, accumulation: int, gpu: str | None
) -> Transient:
    """Transformer Engine's fp8 copies of the GEMM weights (memplan.states.fp8)."""
    n, phases, formula = fp8.weight_transient(
        inventory.parameters, engine=engine, accumulation=accumulation, gpu=gpu
    )
    return Transient(
        name="fp8_weights", bytes=n, phases=phases, formula=formula, source=fp8.SRC_WEIGHT
    )


def qlora_dequantized(
    inventory: Inventory,
    finetune: FinetuneSpec,
    *,
    compute: str,
    implementation: str = "",
    parameters: str | None = None,
) -> list[Transient]:
    """The largest 4-bit weight QLoRA dequantizes for its matmul (memplan.model.finetune.qlora);
    [] without QLoRA. Under LitGPT, Lightning quantized it from fp16
    (qlora.LIGHTNING_STATE_DTYPE). Under transformers the weights were loaded in `parameters`
    (the recipe's parameter dtype): where the backward's copy differs from the forward's (the
    weights loaded in fp32 under an amp recipe, or the LM head quantized too, whose backward
    is `qlora_head_backward`'s), the forward's and the layers' backward's are two terms."""
    state = qlora.LIGHTNING_STATE_DTYPE if implementation == "litgpt" else None
    dequantized = qlora.dequantize_transient(
        inventory, finetune, compute=compute, state_dtype=state
    )
    if dequantized is None:
        return []
    backward = None
    if implementation != "litgpt" and parameters is not None:
        backward = qlora.backward_dequantized(
            inventory, finetune, compute=compute, state_dtype=parameters
        )
    if backward is not None and backward[0] == dequantized[0]:
        backward = None
    forward = Transient(
        name="qlora_dequantized_weight",
        bytes=dequantized[0],
        # Alive only inside a 4-bit matmul (MatMul4Bit's forward and its input's gradient):
        # the last layer's forward and the first layer's backward, not the loss and its
        # backward, where the step peaks (measured by `memplan verify` on the CPU:
        # benchmarks/qlora_verify.py).
        phases=("forward",) if backward is not None else ("forward", "backward"),
        formula=dequantized[1],
        source=qlora.SRC_BNB_DEQUANT,
    )
    if backward is None:
        return [forward]
    return [
        forward,
        Transient(
            name="qlora_dequantized_weight_backward",
            bytes=backward[0],
            phases=("backward",),
            formula=backward[1],
            source=qlora.SRC_BNB_BACKWARD,
        ),
    ]


def qlora_fsdp2_bias(
    inventory: Inventory, finetune: FinetuneSpec, *, compute: str, parameters: str
) -> list[Transient]:
    """The 4-bit Linears' biases FSDP2 keeps unsharded in the compute dtype
    (qlora.fsdp2_bias_copies): held through every phase of a steady-state step."""
    copies = qlora.fsdp2_bias_copies(inventory, finetune, compute=compute, parameters=parameters)
    if copies is None:
        return []
    return [
        Transient(
            name="qlora_fsdp2_bias_copy",
            bytes=copies[0],
            phases=PHASES,
            formula=copies[1],
            source=f"{qlora.SRC_BNB_BIAS}; {qlora.SRC_FSDP2_BIAS}",
        )
    ]


def qlora_head_backward(
    inventory: Inventory, finetune: FinetuneSpec, saved: Activations, *, recipe: Recipe
) -> Transient | None:
    """What the backward of a 4-bit LM head holds beyond the loss's backward before it
    (memplan.model.finetune.qlora.head_backward), alive in that phase: transformers' model
    with the eager loss, whose loss block saves the log-softmax; None otherwise."""
    if (
        finetune.method != "qlora"
        or saved.implementation != "transformers"
        or not saved.modelled
        or saved.loss_gradient_bytes is not None
    ):
        return None
    loss = saved.block("loss")
    log_softmax = next((s for s in loss.tensors if s.name == "log_softmax"), None) if loss else None
    if log_softmax is None:
        return None
    gradients = 2 * (saved.upcast_bytes or saved.logits_bytes)
    head = qlora.head_backward(
        inventory,
        finetune,
        compute=recipe.compute,
        state_dtype=recipe.parameters,
        logits_elems=log_softmax.numel,
        loss_backward_bytes=log_softmax.bytes + gradients,
    )
    if head is None:
        return None
    return Transient(
        name="qlora_head_backward",
        bytes=head[0],
        phases=("backward_start",),
        formula=head[1],
        source=qlora.SRC_BNB_BACKWARD,
    )


SRC_FIRST_LAYER = (
    "torch 2.13 torch/csrc/autograd/functions/accumulate_grad.h (each parameter's .grad made "
    "by its AccumulateGrad node as the backward reaches it, kept until zero_grad); "
    "torch/csrc/autograd/engine.cpp (a node's saved variables released once it has run: "
    "the layers' saved tensors go layer by layer, the last layer's first)"
)


def first_layer_backward(
    inventory: Inventory,
    saved: Activations,
    gradients: dict[Phase, int],
    *,
    cuda: bool,
    cache: StepCache | None = None,
) -> Transient | None:
    """The first decoder layer's backward (the last the backward runs), counted as its excess
    over the timeline's backward point (the last layer's backward starting: every layer's
    saved tensors, the head's gradients only, the backward working set). By then the layers
    after the first have made their gradients (kept until zero_grad) and freed their saved
    tensors; the working set is the same layer's again, the embeddings' saved tensors still
    held. Alive bytes are linear in the layers walked, so the backward's worst moment inside
    the layers is at one of the two ends: this term is the difference, where the first layer's
    end holds more (full recomputation saves little per layer; a layer's gradients
    outweigh it). None where it does not.

    `gradients`: the timeline's gradient bytes per phase (timeline._gradients): what appears
    between the backward point and the end of backward is what autograd makes in the layers'
    backward and the embedding's; the layers' after the first are their share of every
    gradient the step makes, by trainable parameters (`_later_layers_share`). The engine
    decides whether its gradients appear so (EngineStep.gradients: GradientLife.
    layer_by_layer; memplan.step.timeline.totals asks). The first layer's own gradients,
    made while its backward runs, are not counted (where its working set peaks among them is
    not known here: a lower bound of that moment)."""
    layered = [b for b in saved.blocks if b.layered and not b.on_host]
    if not saved.modelled or not layered:
        return None
    share = (
        _later_layers_share(inventory)
        if cache is None
        else cache.get(("later layers", inventory), lambda: _later_layers_share(inventory))
    )
    made = max(gradients.values()) - min(gradients.values())
    grads = min(gradients["backward_end"] - gradients["backward"], int(made * share))
    # The first layer's block: the model order's first (Activations.layer_order: a traced
    # profile's several layer blocks), else the first in the forward's order.
    order = saved.layer_order
    first = next((b for b in layered if order and b.name == order[0]), layered[0])
    freed = sum(b.bytes for b in layered) - first.bytes_each
    # On CUDA the allocator rounds each saved tensor (the timeline's
    # allocator_rounding_activations term): freed with it.
    rounded = sum(b.count * b.rounding_each for b in layered) - first.rounding_each if cuda else 0
    # What checkpointing held for the later layers only (their eager masks, where the first
    # layer takes none: memplan.activations.checkpoint_held) is freed by then too.
    released = saved.checkpoint_released_bytes
    excess = grads - freed - rounded - released
    if excess <= 0:
        return None
    layers = sum(b.count for b in layered)
    rounding_text = f" - {rounded:,} B their allocator rounding" if rounded else ""
    if released:
        rounding_text += f" - {released:,} B the eager masks their checkpoints held"
    return Transient(
        name="first_layer_backward",
        bytes=excess,
        phases=("backward",),
        formula=f"the first decoder layer's backward over the last's: {grads:,} B gradients "
        f"of the {layers - 1} layers after it ({share:.4f} of the {made:,} B made) - "
        f"{freed:,} B their saved tensors, freed{rounding_text}",
        source=SRC_FIRST_LAYER,
    )


def _later_layers_share(inventory: Inventory) -> float:
    """Share of the trainable parameters in the decoder layers after this rank's first one
    (their gradients exist when the first layer's backward runs)."""
    trained = [t for t in inventory.parameters if t.trainable]
    total = sum(t.numel for t in trained)
    indices = [t.layer for t in trained if t.layer is not None]
    if not total or not indices:
        return 0.0
    first = min(indices)
    later = sum(t.numel for t in trained if t.layer is not None and t.layer != first)
    return later / total
