"""torchtitan's Llama 3 and Qwen3 (memplan.model.stacks.torchtitan) on one rank of a tensor-,
sequence- and context-parallel layout, as torchtitan lays it out.

Tensor parallelism is torch's DTensor TP with torchtitan's plan (0.3.0
models/llama3/sharding.py + models/common/decoder_sharding.py; the same plan as 9dec370's
parallelisms/parallelize_llama.py::apply_tp, Dec 2024, which measured the published table):
ColwiseParallel wqkv (9dec370: wq, wk, wv), w1, w3; RowwiseParallel wo, w2; the vocabulary-
parallel embedding; lm_head ColwiseParallel with a Shard(-1) output and the loss run on each
rank's vocabulary slice (loss parallel, torchtitan's default). With sequence parallelism
(`enable_sequence_parallel`, on by default in both) the norms run on the sequence shard and
the attention / feed-forward inputs are all-gathered before their first matmul. A rank's saved
tensors are the single-GPU rule applied to its slice of the model (heads / TP, hidden_dim / TP,
ceil(V / TP) vocabulary rows, torch.chunk's split: memplan.activations.layout.
local_architecture), with these differences, each measured on 2 gloo ranks
(tests/test_torchtitan_tp_activations.py):

- sequence parallelism splits the tokens of every tensor the slice leaves whole (norms, the
  residual stream and so the checkpointed block input) except the three norm outputs the next
  matmul saves: those are the all-gathered, whole-sequence tensors (torch/distributed/tensor/
  parallel/style.py::PrepareModuleInput redistributes Shard(1) -> Replicate before the
  linear), and except the outputs of the row-parallel matmuls that SelectiveAC keeps (the
  mm's output is the Partial, whole-sequence sum before its reduce-scatter);
- the embedding (0.3.0 models/common/embedding.py::Embedding.forward with a tp_group) looks up
  a clamped local copy of the token ids (int64 [b, s], saved instead of the ids) and multiplies
  by the in-range mask `mask.unsqueeze(-1).to(out.dtype)` ([b, s, 1], saved);
- the loss is 0.3.0's components/loss.py::_LossParallelCrossEntropy: it saves log_probs
  [tokens, V / TP] fp32 and the labels, and no total_weight (9dec370 ran torch's
  `loss_parallel()` on F.cross_entropy instead: its temporaries are another term).

torchtitan's dense Qwen3 (memplan.model.stacks.torchtitan) is split the same way: 0.3.0's
models/qwen3/sharding.py::set_qwen3_sharding_config gives its attention, FFN, norms, embedding
and head the same plans (models/common/decoder_sharding.py), and its q_norm / k_norm run on the
Shard(2) head shards with a replicated weight, so they save per local head, as the rule on the
rank's slice has them. Measured on 2 gloo ranks with 0.3.0's own sharding configs and
Module.parallelize (DTensor backend), for Qwen3 and, alike, Llama 3
(tests/torchtitan_tp_probe.py::own_tp).

Expert parallelism, alone or with tensor parallelism (torchtitan's MoE), is
memplan.activations.torchtitan_expert's: the all-to-all's transients and the EP x TP rule.

Context parallelism (torch.distributed.tensor.experimental context_parallel, torchtitan 0.3.0
distributed/context_parallel/api.py::apply_cp_to_forward for SDPA) shards the inputs, labels and
RoPE positions along the sequence (load-balanced chunks, the same count per rank), so every
tensor of the rule is at sequence / CP; ring attention (torch 2.13 torch/distributed/tensor/
experimental/_context_parallel/_attention.py::_scaled_dot_product_ring_flash_attention) runs
the flash op on DTensors whose local tensors are the rank's q, k, v, so autograd saves those,
the merged out (q's dtype) and logsumexp (fp32) at sequence / CP: the single-GPU rule at the
local sequence. Ring attention needs CUDA's flash / efficient / cuDNN kernels
(_sdpa_handler's call_maps); CPU's kernel is not among them, so this part is held by the source
and a pinning test.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.activations import layout, torchtitan_expert
from memplan.activations import torchtitan_float8 as float8
from memplan.activations import torchtitan_float8_gemm as float8_gemm
from memplan.memory import Transient
from memplan.model.forward import compiled_tp, kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan, torchtitan_moe
from memplan.precision import dtype_bytes
from memplan.states.layout import Layout

SRC_EMBEDDING = (
    f"torchtitan {torchtitan.VERSION} models/common/embedding.py::Embedding.forward "
    "(tp_group set: clamp(input - offset) looked up, `out * mask.unsqueeze(-1).to(out.dtype)`)"
)
SRC_LOSS = (
    f"torchtitan {torchtitan.VERSION} components/loss.py::_LossParallelCrossEntropy.forward "
    "(ctx.save_for_backward(log_probs, labels_1d))"
)
SRC_SAC_COMM = (
    f"torchtitan {torchtitan.VERSION} distributed/activation_checkpoint.py::"
    "_get_default_save_ops (comm_ops: _c10d_functional.reduce_scatter_tensor; the same in "
    "9dec370's _save_list)"
)
SRC_RING = (
    "torch 2.13 torch/distributed/tensor/experimental/_context_parallel/_attention.py::"
    "_templated_ring_attention, _SDPAMerger, _templated_ring_attention_backward, "
    "_AllGatherRotater, _AllToAllRotater, _ContextParallelOptions (rotate_method ALL_GATHER, "
    "convert_to_f32 True)"
)

# Saved tensors that sequence parallelism leaves whole: the all-gathered norm outputs the
# next matmul saves, and the Partial outputs of the row-parallel matmuls SelectiveAC keeps.
_WHOLE = (
    "attention_norm.output",
    "ffn_norm.output",
    "norm.output",
    "attention.wo.output",
    "feed_forward.w2.output",
)


def refusal(st: Setting, lay: Layout, arch: Architecture | None = None) -> str:
    """Why this layout is outside the torchtitan rule, or ''."""
    if lay.expert_capacity_factor is not None:
        return torchtitan_moe.DROPLESS
    if lay.expert > 1 and lay.context > 1:
        return (
            "activations of torchtitan's MoE under expert parallelism with context "
            "parallelism are not modelled yet (ring attention needs CUDA kernels: not run)"
        )
    if st.compile and lay.tensor > 1:
        why = compiled_tp.uncovered(arch, st, lay) if arch is not None else "this model"
        if why:
            return (
                "activations of torchtitan's compiled blocks under tensor parallelism are "
                "traced for dense Llama 3 and Qwen3 blocks and Qwen3-MoE blocks at expert "
                "parallelism 1 with checkpointing none or selective-op (memplan.model."
                f"forward.compiled_tp, compiled_moe_tp), not under {why}"
            )
    return ""


def micro_batch(
    arch: Architecture, st: Setting, lay: Layout, *, fused_qkv: bool = True
) -> Activations:
    """One micro-batch's saved tensors on one GPU of a TP (+ SP) x CP layout (module docstring),
    every layer, on TP rank `lay.tensor_rank`; `fused_qkv` as in memplan.model.stacks.
    torchtitan.saved (False: 9dec370's wq, wk, wv)."""
    why = (
        layout.check(arch, st, lay)
        or refusal(st, lay, arch)
        or torchtitan_moe.model_parallel(arch, lay.tensor, lay.context)
        or (float8.refusal(arch, fused_qkv=fused_qkv) if float8.applies(arch, st, lay) else "")
    )
    if why:
        return replace(layout.refused(why), implementation="torchtitan")
    local_st = layout.local_setting(st, lay)
    eager_loss = lay.tensor > 1 and local_st.compile_loss
    if eager_loss:
        local_st = replace(local_st, compile_loss=False)
    if lay.expert > 1 and not torchtitan_moe.is_moe(arch):
        why = "expert parallelism splits the routed experts of torchtitan's MoE models only"
        return replace(layout.refused(why), implementation="torchtitan")
    if lay.expert > 1 and lay.tensor > 1:
        return torchtitan_expert.expert_tensor_parallel(arch, local_st, lay, fused_qkv=fused_qkv)
    if lay.expert > 1:
        return torchtitan_expert.expert_parallel(arch, local_st, lay, fused_qkv=fused_qkv)
    local = torchtitan.saved(
        layout.local_architecture(arch, lay), local_st, fused_qkv=fused_qkv, whole=arch
    )
    if not local.modelled or lay.tensor == 1:
        local = replace(local, buffers=ring_buffers(arch, local_st, lay))
        return float8_gemm.eager(local, arch, local_st, fused_qkv=fused_qkv)
    blocks = [_tensor_parallel(b, local_st, lay, arch.hidden_size) for b in local.blocks]
    on_float8 = float8.applies(arch, st, lay)
    sliced = layout.local_architecture(arch, lay)
    if on_float8:  # torchao's Float8 TP styles (torchtitan_float8)
        blocks = [float8.block(b, local_st, sliced, fused_qkv=fused_qkv) for b in blocks]
    logits, upcast = local.logits_bytes, local.upcast_bytes
    if not lay.vocab_parallel_loss:
        # parallelism.loss_parallel false (torchtitan's disable_loss_parallel): lm_head's
        # output all-gathered to the whole vocabulary and the plain cross-entropy on it
        # (memplan.activations.layout.whole_vocabulary_loss).
        full = torchtitan.saved(
            replace(layout.local_architecture(arch, lay), vocab_size=arch.vocab_size),
            local_st,
            fused_qkv=fused_qkv,
            whole=arch,
        )
        loss = full.block("loss")
        assert loss is not None
        blocks = [loss if b.name == "loss" else b for b in blocks]
        logits, upcast = full.logits_bytes, full.upcast_bytes
    notes = [
        *local.notes,
        f"tensor parallelism {lay.tensor} as torchtitan applies it"
        + (" with sequence parallelism" if lay.sequence_parallel else "")
        + " (memplan.activations.torchtitan_parallel).",
    ]
    if on_float8:
        notes.append(float8.NOTE)
    if eager_loss:
        notes.append(
            "training.compile_loss under tensor parallelism: the loss is modelled eager "
            "(its compiled loss-parallel cross entropy is not traced)."
        )
    if not lay.sequence_parallel:
        notes.append(
            "torchtitan enables sequence parallelism with TP by default "
            "(enable_sequence_parallel): this spec leaves parallelism.sequence_parallel off."
        )
    hidden = local.hidden_bytes // lay.tensor if lay.sequence_parallel else local.hidden_bytes
    tp_local = replace(
        local,
        blocks=tuple(blocks),
        hidden_bytes=hidden,
        logits_bytes=logits,
        upcast_bytes=upcast,
        notes=tuple(notes),
        buffers=(
            *ring_buffers(arch, local_st, lay),
            *sequence_parallel_ends(arch, local_st, lay),
            *(float8.casts(sliced, local_st, lay, fused_qkv=fused_qkv) if on_float8 else ()),
        ),
        layer_scatter_bytes=local_st.tokens * arch.hidden_size * dtype_bytes(local_st.stream)
        if lay.sequence_parallel
        else 0,
    )
    return compiled_tp.apply(tp_local, arch, local_st, lay)


def _tensor_parallel(block: Block, st: Setting, lay: Layout, hidden: int) -> Block:
    b, s = st.batch, st.sequence
    if block.name == "embeddings":
        mask = kernels.saved(
            "tok_embeddings.mask", (b, s, 1), st.stream, "MulBackward0", SRC_EMBEDDING
        )
        local = kernels.saved(
            "tok_embeddings.local_indices",
            (b, s),
            kernels.INT64,
            "EmbeddingBackward0",
            SRC_EMBEDDING,
        )
        return replace(block, tensors=(local, mask))
    if block.name == "loss" and lay.vocab_parallel_loss:
        log_probs, targets = block.tensors[0], block.tensors[1]
        return replace(
            block,
            tensors=(
                replace(
                    log_probs,
                    name="log_probs",
                    saved_by="_LossParallelCrossEntropy",
                    source=SRC_LOSS,
                ),
                replace(targets, saved_by="_LossParallelCrossEntropy", source=SRC_LOSS),
            ),
        )
    if block.name == "loss":
        return block  # the whole vocabulary's loss (micro_batch)
    if not lay.sequence_parallel:
        return block
    tensors = tuple(_sp(t, st, lay.tensor) for t in block.tensors)
    if block.name in ("layers", "layers.dense") and st.checkpointing == "selective-op":
        # SelectiveAC keeps every reduce_scatter_tensor output (SRC_SAC_COMM): with SP, wo's
        # and w2's (or the routed experts') reduce-scatters back to the sequence shard, and
        # DeepSeek-V3's shared experts' own (moe_sharding.py::_shared_experts_sharding_configs:
        # w2's Partial output to the sequence shard before the add).
        shard = (st.batch, st.sequence // lay.tensor, hidden)
        names = ["attention.wo", "feed_forward.w2"]
        if any(t.name.startswith("moe.shared_experts.") for t in block.recompute):
            names.append("moe.shared_experts.w2")
        tensors += tuple(
            kernels.saved(f"{name}.reduce_scatter", shard, st.matmul, "MUST_SAVE", SRC_SAC_COMM)
            for name in names
        )
    return replace(
        block,
        tensors=tensors,
        recompute=tuple(_sp(t, st, lay.tensor) for t in block.recompute),
    )


def _sp(t: Saved, st: Setting, tp: int) -> Saved:
    """`t` sequence-sharded over the TP ranks, unless sequence parallelism leaves it whole
    (_WHOLE) or TP split it already (its token dimension is whole but its width is sliced:
    the attention core and feed-forward interiors)."""
    if t.name in _WHOLE or not _replicated(t):
        return t
    shape = layout._split_tokens(t.shape, st, tp)  # noqa: SLF001 - the shared token rule
    return t if shape is None else replace(t, shape=shape)


_REPLICATED = ("checkpoint.hidden_states", "attention_norm.", "ffn_norm.", "norm.")


def _replicated(t: Saved) -> bool:
    """Tensors TP leaves whole, which SequenceParallel shards: the norms' (the residual stream's
    width) and the checkpointed block input."""
    return t.name.startswith(_REPLICATED)


def ring_buffers(arch: Architecture, st: Setting, lay: Layout) -> tuple[Transient, ...]:
    """Transients of torch's ring attention on one CP rank (`st` the rank's local setting),
    SRC_RING, per layer while its attention runs; none without CP. Read from the source, not
    measured (ring attention needs CUDA kernels). KV: one [k, v] pair of the rank, in the
    compute dtype; Q: the rank's query (and out) elements.

    Forward: the contiguous copies of the local key and value (SDPA hands transposed views),
    their concatenation sent, and the all-gathered CP x [k, v] (`_cp_options.rotate_method`
    ALL_GATHER, torch 2.13's default, which torchtitan 0.3.0 leaves as is: _AllGatherRotater
    gathers once and hands out chunks), plus _SDPAMerger's running out and the step's block out
    in fp32 (`convert_to_f32`, default True). Backward: the same key/value copies, concatenation
    and gather, the fp32 dq, dk, dv accumulators, and the [dk, dv] concatenation in fp32 with
    the one the all-to-all rotater (dkv_rotater, ALL_TO_ALL) returns."""
    if lay.context == 1:
        return ()
    tp, cp = lay.tensor, lay.context
    heads, kv_heads = arch.num_attention_heads // tp, max(arch.num_key_value_heads // tp, 1)
    t, d, w = st.tokens, arch.head_dim, dtype_bytes(st.matmul)
    kv = 2 * t * kv_heads * d
    q = t * heads * d
    rotation = (2 + cp) * kv * w
    forward = rotation + 2 * q * 4
    backward = rotation + (q + kv) * 4 + 2 * kv * 4
    return (
        Transient(
            name="context_parallel_ring_forward",
            bytes=forward,
            phases=("forward",),
            formula=f"(2 + CP) x [k, v] ({kv:,} elements in {st.matmul}: contiguous copies, the "
            f"chunk sent, the CP chunks gathered) + 2 x out in fp32 ({q:,} elements)",
            source=SRC_RING,
        ),
        Transient(
            name="context_parallel_ring_backward",
            bytes=backward,
            phases=("backward",),
            formula=f"(2 + CP) x [k, v] in {st.matmul} + fp32 dq, dk, dv ({q + kv:,} elements)"
            f" + 2 x [dk, dv] in fp32 ({kv:,} elements each)",
            source=SRC_RING,
        ),
    )


SRC_GATHER = (
    "torch 2.13 torch/distributed/_functional_collectives.py::all_gather_single "
    "(all_gather_into_tensor along dim 0, then torch/_utils.py::_maybe_view_chunk_cat: a view "
    "when the gathered dim 0 is the group size, else torch.cat of the chunks along "
    "gather_dim); torchtitan 9dec370 parallelisms/parallelize_llama.py::apply_tp (`output`: "
    "ColwiseParallel(input_layouts=Shard(1)))"
)
SRC_SCATTER = (
    "torch 2.13 torch/distributed/_functional_collectives.py::reduce_scatter_single "
    "(scatter_dim != 0: torch/_utils.py::_chunk_or_narrow_cat, a torch.cat of the chunks "
    "along dim 0, then reduce_scatter_tensor); torchtitan 9dec370 parallelisms/"
    "parallelize_llama.py::apply_tp (`tok_embeddings`: RowwiseParallel(input_layouts="
    "Replicate(), output_layouts=Shard(1)): the lookup on the rank's rows is a Partial "
    "[batch, sequence, hidden], reduce-scattered along the sequence)"
)


def sequence_parallel_ends(arch: Architecture, st: Setting, lay: Layout) -> tuple[Transient, ...]:
    """The two sequence-parallel collectives outside the decoder layers, momentary buffers
    the step makes around the tensors it keeps (`st` the rank's local setting; none without
    TP + SP; each only on a GPU that holds its block, `beside`):

    - forward, before the first layer (SRC_SCATTER): the embedding's Partial output [batch,
      sequence, hidden] and its chunks concatenated for the reduce-scatter, both alive while
      the rank's [batch, sequence / TP, hidden] output (the first layer's saved input) is made;
    - loss, before the logits (SRC_GATHER): the output layer's input (the final norm's
      sequence shard) all-gathered: the collective's [TP x batch, sequence / TP, hidden]
      output, then, with a micro-batch above 1, its chunks concatenated into the [batch,
      sequence, hidden] tensor the output matmul saves (the head's `norm.output`), the
      gather's output freed once copied. The output layer is not a Float8 linear
      (torchtitan's float8 filter skips `output`), so it is gathered in the compute dtype."""
    if lay.tensor == 1 or not lay.sequence_parallel:
        return ()
    whole = st.tokens * arch.hidden_size
    out = [
        Transient(
            name="tp_embedding_reduce_scatter",
            bytes=2 * whole * dtype_bytes(st.stream),
            phases=(),
            formula=f"2 x [tokens, hidden] ({st.tokens:,} x {arch.hidden_size:,}) in "
            f"{st.stream}: the embedding's Partial output and its chunks concatenated for the "
            "reduce-scatter",
            source=SRC_SCATTER,
            momentary="forward",
            beside="embeddings",
        )
    ]
    if st.batch > 1:
        out.append(
            Transient(
                name="tp_head_input_all_gather",
                bytes=whole * dtype_bytes(st.matmul),
                phases=(),
                formula=f"[tokens, hidden] ({st.tokens:,} x {arch.hidden_size:,}) in "
                f"{st.matmul}: the all-gather's output, copied into the output layer's saved "
                "input",
                source=SRC_GATHER,
                momentary="loss",
                beside="head",
            )
        )
    return tuple(out)
