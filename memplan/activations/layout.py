"""Activations under model parallelism: what one GPU of a TP x SP x CP x PP x EP layout saves.

The single-GPU rules (memplan.activations.predict) describe transformers' forward pass tensor
by tensor. A model-parallel rank runs the same layer on a slice, the way Megatron-LM builds it:

- Tensor parallelism (megatron/core/tensor_parallel/layers.py: Column/RowParallelLinear,
  VocabParallelEmbedding): each rank holds heads / TP query and key/value heads, intermediate /
  TP of the MLP (and of every expert) and the padded vocabulary / TP (make_vocab_size_divisible_by
  x TP). The rank's saved tensors are the single-GPU rules applied to that narrower model, so
  every tensor inside the attention core, the MLP and the loss shrinks by TP, and every tensor
  outside them (norms, residual dropout masks, the inputs of the column-parallel linears) stays
  whole: replicated on every TP rank (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", sec. 4.2.1, the 10 sbh of eq. 2).
- Sequence parallelism splits the sequence dimension of exactly those replicated tensors over
  the TP ranks (sec. 4.2.2; the column-parallel linears save their sequence-parallel input and
  all-gather it again in backward: layers.py::LinearWithGradAccumulationAndAsyncCommunication).
  A tensor is "replicated" when the narrower model leaves its shape unchanged; the exceptions,
  which Megatron keeps whole on every TP rank, are the embedding's indices and the RoPE tables
  (computed before the scatter to the sequence-parallel region), the loss's targets, and the MoE
  experts' tokens, which the token dispatcher all-gathers over TP before the experts run
  (moe/token_dispatcher.py::MoEAlltoAllTokenDispatcher.dispatch_postprocess). torch's own
  DTensor sequence parallelism (engine fsdp2 or ddp, torchtitan's layout) differs in one place:
  the column-parallel linears save their all-gathered, whole-sequence input (`_COLUMN_INPUT`).
  Both rules are measured against 2-rank DTensor runs on CPU to the byte
  (tests/test_tp_activations_real.py, tests/test_tp_sp_activations_real.py).
- Context parallelism splits the sequence of every tensor over CP ranks (each rank runs
  sequence / CP tokens). Attention runs as ring attention on flash kernels (Transformer Engine
  attention/dot_product_attention/context_parallel.py::AttnFuncWithCPAndKVP2P): it saves the
  local q, one key/value chunk, the output and the softmax statistics, i.e. the SDPA rule at
  sequence / CP; the key/value chunks it exchanges are transient buffers (`buffers`).
- Pipeline parallelism: a rank holds its stages' layers, the first the embeddings and the last
  the final norm, head and loss; the schedule decides how many micro-batches each keeps in
  flight (`in_flight`).
- Expert parallelism: experts split over EP ranks; with the token dispatcher's all-to-all a
  rank's experts receive, on balanced routing, top_k x tokens (token, expert) pairs, as on one
  GPU; with a capacity factor the buffers are padded to capacity (moe_utils.py::get_capacity).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.memory import Transient
from memplan.model.families import family_of
from memplan.model.forward.tensors import Activations, Block, Saved, Setting, not_modelled
from memplan.model.inventory import Architecture
from memplan.precision import dtype_bytes
from memplan.states.layout import Layout
from memplan.states.parallel import vocab_rows

SRC_TP = (
    "megatron/core/tensor_parallel/layers.py (Column/RowParallelLinear, VocabParallelEmbedding)"
)
SRC_SP = (
    "megatron/core/tensor_parallel/layers.py::LinearWithGradAccumulationAndAsyncCommunication "
    "(sequence_parallel: all-gather into get_global_memory_buffer())"
)
SRC_CP = (
    "TransformerEngine attention/dot_product_attention/context_parallel.py::"
    "AttnFuncWithCPAndKVP2P (p2p_comm_buffers; backward: dq_buffer, 2 x [2, *kv.shape])"
)
SRC_MOE = (
    "megatron/core/transformer/moe/token_dispatcher.py::MoEAlltoAllTokenDispatcher "
    "(permute -> all_to_all -> TP all-gather; combine mirrors it)"
)
# Saved tensors Megatron keeps whole on every TP rank under sequence parallelism (see above).
_NOT_SEQUENCE_SPLIT = (".indices", ".input_mask", "rotary_emb.", "rotary.", "experts.")
# The inputs of the column-parallel linears. torch DTensor sequence parallelism all-gathers
# them before the linear as a separate op (torch/distributed/tensor/parallel/style.py, 2.13:
# PrepareModuleInput._prepare_input_arg redistributes Shard(1) -> Replicate, and
# ColwiseParallel._prepare_input_fn does the same for a Shard(1) input), so the linear saves
# the whole sequence; Megatron's linear saves its shard and gathers again in backward.
# Measured on 2 gloo ranks: tests/test_tp_sp_activations_real.py.
_COLUMN_INPUT = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|c_attn|c_fc|"
    r"query_key_value|dense_h_to_4h|query|key|value|lm_head|embed_out)\.input$"
)


def check(arch: Architecture, st: Setting, lay: Layout) -> str:
    """Why this layout's activations are outside the rules, or ''. Raises on a sequence the
    layout cannot split."""
    if lay.context > 1:
        if st.sequence % lay.context:
            raise MemplanError(
                f"context parallelism {lay.context} does not divide sequence_length "
                f"{st.sequence}; use a degree that divides it.",
                field="parallelism.context",
            )
        if st.attention != "sdpa":
            return (
                "activations not modelled for context parallelism with eager attention "
                "(ring attention runs flash kernels): set training.attention: sdpa"
            )
    if lay.sequence_parallel and (st.sequence // lay.context) % lay.tensor:
        raise MemplanError(
            f"sequence parallelism splits the {st.sequence // lay.context} tokens of each "
            f"sequence (per context rank) over {lay.tensor} tensor ranks: they must divide "
            "evenly (Megatron asserts seq_length % tensor_model_parallel_size == 0).",
            field="parallelism.sequence_parallel",
        )
    family = family_of(arch.model_type)
    if lay.tensor > 1 and family is not None and family.tp_refusal:
        return family.tp_refusal
    return ""


def local_architecture(arch: Architecture, lay: Layout) -> Architecture:
    """The slice of the model one TP rank runs (SRC_TP): heads, key/value heads, the MLP's,
    each expert's and the shared expert's intermediate size, each / TP, and the rank's
    vocabulary rows (padded, or torch.chunk's)."""
    tp = lay.tensor
    if tp == 1:
        return arch
    extra = dict(arch.extra)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in extra:
            extra[key] = int(extra[key]) // tp
    return replace(
        arch,
        num_attention_heads=arch.num_attention_heads // tp,
        num_key_value_heads=arch.num_key_value_heads // tp,
        intermediate_size=arch.intermediate_size // tp,
        vocab_size=vocab_rows(arch.vocab_size, tp, lay.vocab_multiple, lay.vocab_split)[
            lay.tensor_rank
        ],
        extra=extra,
    )


def profile_slices(arch: Architecture, lay: Layout) -> tuple[tuple[int, int], ...]:
    """(TP degree, vocabulary rows) of each TP rank class of `lay` whose activations a model
    without a hand rule takes from a profile of its slice (memplan.activations.traced;
    memplan.verify.trace.traced_profiles traces them)."""
    if lay.tensor == 1:
        return ()
    rows = vocab_rows(arch.vocab_size, lay.tensor, lay.vocab_multiple, lay.vocab_split)
    return tuple(sorted({(lay.tensor, r) for r in rows if r}))


def local_setting(st: Setting, lay: Layout) -> Setting:
    """One context-parallel rank's forward pass: sequence / CP tokens per sequence."""
    if lay.context == 1:
        return st
    return replace(st, sequence=st.sequence // lay.context)


SRC_GATHERED_BLOCKS = (
    "torchtitan 05a6cb3 torchtitan/models/llama4/infra/parallelize.py::apply_moe_ep_tp ('moe': "
    "PrepareModuleInputOutput(Shard(1) -> Replicate, use_local_input=True, output Partial -> "
    "Shard(1)), router NoParallel, shared experts ColwiseParallel / RowwiseParallel(Partial), "
    "experts TensorParallel or, with EP, ExpertTensorParallel); torchtitan 3e3a19f "
    "torchtitan/models/deepseek_v3/infra/parallelize.py::apply_non_moe_tp (MLA: 'attention' "
    "PrepareModuleInput(Shard(1) -> Replicate), wkv_a / kv_norm / wq_a / q_norm NoParallel)"
)
GATHERED_NOTE = (
    "DTensor sequence parallelism over a MoE block or an MLA attention as torchtitan lays it "
    "out: the module's input all-gathered once, everything it saves at the whole sequence "
    f"({SRC_GATHERED_BLOCKS})."
)


# The submodules that name such a module: a MoE block's routed experts; MLA's latent key/value
# projections and norm (transformers deepseek_v2/v3 DeepseekV3Attention; a traced profile names
# a storage by its first saver, so kv_a_proj_with_mqa, which shares q_a_proj's input, may not
# appear, while kv_a_layernorm and kv_b_proj always save their own).
_GATHERED_MARKERS = (".experts", ".kv_a_proj_with_mqa", ".kv_a_layernorm", ".kv_b_proj")


@lru_cache(maxsize=64)
def _gathered_names(names: tuple[str, ...]) -> frozenset[str]:
    """Those of a block's tensor `names` saved inside a module `gathered_blocks` names (a
    profile's or a rule's names repeat over plan's layouts: cached)."""
    prefixes = tuple(f"{m}{c}" for m in gathered_blocks(names) for c in ".#")
    return frozenset(n for n in names if prefixes and n.startswith(prefixes))


def gathered_blocks(names: Iterable[str]) -> tuple[str, ...]:
    """Modules (relative to a decoder layer) that torch DTensor sequence parallelism runs
    entirely on the all-gathered sequence, as torchtitan lays them out (SRC_GATHERED_BLOCKS):
    a MoE block (the module holding `.experts`) gathers its input ONCE at its boundary, its
    router, shared experts and routed experts all read that one whole-sequence storage and its
    partial output is reduce-scattered back to the sequence shards; an MLA attention (the module
    holding `kv_a_layernorm`: _GATHERED_MARKERS) gathers its input before the replicated
    low-rank projections and their norms, and leaves only through o_proj's reduce-scatter.
    Nothing such a module saves is split over the sequence. Measured on 2 gloo ranks for
    Qwen2-MoE, Mixtral and DeepSeek-V3 (tests/tp_sp_moe_probe.py, tests/test_profile_tp.py)."""
    out: set[str] = set()
    for name in names:
        base = "." + name.split("#")[0]
        for marker in _GATHERED_MARKERS:
            if marker in base:
                prefix = base.split(marker)[0][1:]
                if prefix:
                    out.add(prefix)
    return tuple(sorted(out))


def _whole_and_gathered(
    full: Activations, local: Activations, lay: Layout
) -> tuple[dict[tuple[str, str], tuple[int, ...]], dict[str, frozenset[str]]]:
    """For `split` and `split_traced`: each (block, tensor)'s shape in the whole model's
    prediction `full`, and per block of `local` the tensor names a `gathered_blocks` module
    saves (none unless the layout gathers inputs: DTensor)."""
    whole = {(b.name, t.name): t.shape for b in full.blocks for t in (*b.tensors, *b.recompute)}
    gathered = {
        b.name: _gathered_names(tuple(t.name for t in (*b.tensors, *b.recompute)))
        if lay.gathered_inputs
        else frozenset()
        for b in local.blocks
    }
    return whole, gathered


def _split_each(
    local: Activations,
    lay: Layout,
    gathered: dict[str, frozenset[str]],
    sp: Callable[[Block, Saved], Saved],
) -> Activations:
    """`local` with `sp` applied to every saved and recomputed tensor, the hidden-state
    gradient split over the TP ranks, and GATHERED_NOTE where a module ran gathered."""
    blocks = tuple(
        replace(
            b,
            tensors=tuple(sp(b, t) for t in b.tensors),
            recompute=tuple(sp(b, t) for t in b.recompute),
            held=tuple(sp(b, t) for t in b.held),
        )
        for b in local.blocks
    )
    notes = (GATHERED_NOTE,) if any(gathered.values()) else ()
    return replace(
        local,
        blocks=blocks,
        hidden_bytes=local.hidden_bytes // lay.tensor,
        notes=(*local.notes, *notes),
    )


def split(full: Activations, local: Activations, st: Setting, lay: Layout) -> Activations:
    """`local` (the TP slice's activations at sequence / CP) with sequence parallelism applied:
    the tensors TP leaves whole (same shape in `full`, the whole model's prediction at the same
    sequence) have their token dimension split over the TP ranks."""
    if not (lay.sequence_parallel and lay.tensor > 1):
        return local
    whole, gathered = _whole_and_gathered(full, local, lay)

    def sp(block: Block, t: Saved) -> Saved:
        if block.name == "loss" or any(k in t.name for k in _NOT_SEQUENCE_SPLIT):
            return t
        if lay.gathered_inputs and _COLUMN_INPUT.search(t.name):
            return t
        if t.name in gathered[block.name]:
            return t  # run on the whole sequence (gathered_blocks)
        if whole.get((block.name, t.name)) != t.shape:
            return t  # split by TP already
        shape = _split_tokens(t.shape, st, lay.tensor)
        return t if shape is None else replace(t, shape=shape)

    return _split_each(local, lay, gathered, sp)


# A traced profile's names (memplan.model.profile: the module that saved a storage first, and
# its order there): a linear's only saved activation is its input, so the column-parallel
# linears' inputs are these.
_COLUMN_INPUT_TRACED = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|c_attn|c_fc|"
    r"query_key_value|dense_h_to_4h|query|key|value|lm_head|embed_out)#\d+$"
)


def split_traced(
    full: Activations,
    local: Activations,
    st: Setting,
    lay: Layout,
    token_major: frozenset[tuple[str, str]],
) -> Activations:
    """`split` for activations read from traced profiles (memplan.model.profile): their saved
    tensors are flat element counts, so a tensor is split over the TP ranks when its fit is
    tokens x width alone (`token_major`: (block, name), memplan.model.profile.Profile.
    token_major), the TP slice leaves it as wide as the whole model's (`full`: the TP-1
    profile's), and it is none of the tensors Megatron keeps whole (`_NOT_SEQUENCE_SPLIT`: the
    loss's, the embedding's integer indices, the experts'), nor, under DTensor, a
    column-parallel linear's gathered input or anything a module `gathered_blocks` names saves
    (a MoE block, an MLA attention: on one device their one input storage is listed under its
    first saver, the router or a shared expert's linear, whatever the plan gathers)."""
    if not (lay.sequence_parallel and lay.tensor > 1):
        return local
    whole, gathered = _whole_and_gathered(full, local, lay)

    def sp(block: Block, t: Saved) -> Saved:
        if block.name == "loss" or (block.name, t.name) not in token_major:
            return t
        if t.name in gathered[block.name]:
            return t  # run on the whole sequence (gathered_blocks)
        if block.name == "embeddings" and t.dtype.startswith(("int", "uint")):
            return t  # the embedding's indices (`_NOT_SEQUENCE_SPLIT`'s ".indices")
        if "experts" in t.name:
            return t
        if lay.gathered_inputs and _COLUMN_INPUT_TRACED.search(t.name):
            return t
        if whole.get((block.name, t.name)) != t.shape or t.shape[0] % st.tokens:
            return t  # split by TP already
        return replace(t, shape=(t.shape[0] // lay.tensor,))

    return _split_each(local, lay, gathered, sp)


SRC_NO_LOSS_PARALLEL = (
    "torchtitan 0.3.0 torchtitan/models/llama3/parallelize.py::apply_tp (output: "
    "ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate()))"
)


def whole_vocabulary_loss(local: Activations, whole: Activations) -> Activations:
    """DTensor TP without loss_parallel (torchtitan's disable_loss_parallel): the LM head's
    output is all-gathered to whole [tokens, vocabulary] logits on every TP rank and the loss
    runs on them, so the head's and the loss's tensors are those of the whole vocabulary
    (`whole`: the TP slice's prediction with the whole vocabulary)."""
    by = {b.name: b for b in whole.blocks}
    blocks = tuple(by[b.name] if b.name in ("head", "loss") else b for b in local.blocks)
    return replace(
        local,
        blocks=blocks,
        logits_bytes=whole.logits_bytes,
        upcast_bytes=whole.upcast_bytes,
        notes=(
            *local.notes,
            "no loss_parallel: the logits all-gathered whole on every TP rank "
            f"({SRC_NO_LOSS_PARALLEL}).",
        ),
    )


def _split_tokens(shape: tuple[int, ...], st: Setting, parts: int) -> tuple[int, ...] | None:
    """`shape` with its token dimension ([tokens, ...] or [batch, seq, ...]) / parts."""
    if len(shape) >= 3 and shape[:2] == (st.batch, st.sequence):
        return (shape[0], shape[1] // parts, *shape[2:])
    if len(shape) >= 3 and shape[:2] == (st.sequence, st.batch):
        return (shape[0] // parts, *shape[1:])  # Megatron's [s, b, h]
    if shape and shape[0] == st.tokens:
        return (shape[0] // parts, *shape[1:])
    return None


def buffers(arch: Architecture, st: Setting, lay: Layout) -> tuple[Transient, ...]:
    """Communication buffers of the layout, alive during forward and backward (not saved);
    `st` is one context-parallel rank's setting (`local_setting`)."""
    out: list[Transient] = []
    cp, tp = lay.context, lay.tensor
    tokens = st.tokens  # `st` is one context-parallel rank's (local_setting)
    width = dtype_bytes(st.stream)
    if lay.sequence_parallel and tp > 1 and not (lay.gathered_inputs and not st.autocast):
        # torch DTensor SP saves the gathered input itself (counted in the activations); under
        # autocast the linears save bf16 casts of it and the gathered tensor is transient.
        n = tokens * arch.hidden_size * dtype_bytes(st.stream if lay.gathered_inputs else st.matmul)
        out.append(
            Transient(
                name="sequence_parallel_all_gather",
                bytes=n,
                phases=("forward", "loss", "backward_start", "backward"),
                formula=f"[{tokens}, {arch.hidden_size}] in {st.matmul} (one gathered input)",
                source=SRC_SP,
            )
        )
    if cp > 1:
        kv_heads = max(arch.num_key_value_heads // tp, 1)
        chunk = 2 * tokens * kv_heads * arch.head_dim * dtype_bytes(st.matmul)
        q = tokens * (arch.num_attention_heads // tp) * arch.head_dim * dtype_bytes(st.matmul)
        out.append(
            Transient(
                name="context_parallel_kv_forward",
                bytes=(cp - 1) * chunk,
                phases=("forward",),
                formula=f"(CP - 1) x {chunk:,} B key/value chunks received in the ring "
                "(the last one is saved)",
                source=SRC_CP,
            )
        )
        out.append(
            Transient(
                name="context_parallel_kv_backward",
                bytes=4 * chunk + q,
                phases=("backward",),
                formula=f"2 x [2, key/value chunk] ({4 * chunk:,} B: k/v and dk/dv, "
                f"double-buffered) + dq {q:,} B",
                source=SRC_CP,
            )
        )
    if arch.num_experts and (lay.expert > 1 or tp > 1):
        pairs = expert_pairs(arch, tokens, lay) // tp
        n = 2 * pairs * arch.hidden_size * width
        out.append(
            Transient(
                name="moe_token_dispatch",
                bytes=n,
                phases=("forward", "backward"),
                formula=f"2 x [{pairs}, {arch.hidden_size}] (permuted tokens before and after "
                "the all-to-all)",
                source=SRC_MOE,
            )
        )
    return tuple(out)


def expert_pairs(arch: Architecture, tokens: int, lay: Layout) -> int:
    """(token, expert) pairs one rank's experts process per layer: top_k x tokens on balanced
    dropless routing; with a capacity factor c, every local expert's buffer padded to
    capacity = ceil(tokens / TP x top_k / E x c) from each of the TP x EP ranks
    (token_dispatcher.py::MoEAlltoAllTokenDispatcher.preprocess, moe_utils.py::get_capacity)."""
    k, e = arch.num_experts_per_token, arch.num_experts
    if lay.expert_capacity_factor is None:
        return tokens * k
    per_rank = tokens // lay.tensor
    capacity = math.ceil(per_rank * k / e * lay.expert_capacity_factor)
    return (e // lay.expert) * capacity * lay.tensor * lay.expert


def refused(why: str) -> Activations:
    return not_modelled(f"{why}: per_gpu.activations is 0 and the peak leaves them out.")
