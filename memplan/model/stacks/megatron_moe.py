"""Megatron-Core's MoE layer (`model.implementation: megatron-core`, local spec, model_type
mixtral and qwen3_moe): what its router, its token dispatcher and its experts save for
backward, in the vocabulary of memplan.model.forward; the rest of the layer is the dense rule's
(memplan.model.stacks.megatron, with Qwen3's per-head q/k RMSNorm: `_qk_norm`). The experts'
MLPs are the dense rule's (megatron.mlp) over the (token, expert) pairs; the transformers MoE
rule (memplan.model.forward.mlp.sparse_moe) shares the vocabulary and the balanced-routing
pair count (memplan.activations.layout.expert_pairs), not the tensors: grouped_mm there,
SequentialMLP here.

Read from megatron-core 0.12.0 (megatron/core/transformer/moe/), as
models/gpt/moe_module_specs.py::get_moe_module_spec builds it for the local spec
(get_gpt_layer_local_spec(num_experts=E), moe_grouped_gemm False): MoELayer with TopKRouter,
the default `moe_token_dispatcher_type` allgather (MoEAllGatherTokenDispatcher) and
SequentialMLP (one transformer/mlp.py::MLP per local expert, ColumnParallelLinear /
RowParallelLinear), or with `parallelism.moe_dispatcher: alltoall` the
MoEAlltoAllTokenDispatcher (below); no shared experts. Every storage below is measured
against the real GPTModel on CPU (memplan/verify/megatron_core.py, one rank and EP = 2 and 4
gloo ranks).

- router.py::TopKRouter.forward -> Router.gating: `F.linear(input, weight)` saves its input
  (pre_mlp_layernorm's output: the dense rule's `pre_mlp_layernorm.output`) and weight.
  moe_utils.py::topk_softmax_with_capacity (score_function softmax, use_pre_softmax False, no
  capacity): `torch.topk(logits, k)` saves its int64 indices [t, k]; `softmax(scores,
  dtype=float32).type_as(logits)` saves its fp32 output [t, k] (top-1, which TransformerConfig
  runs only with moe_router_pre_softmax: the softmax of every logit before top-k, [t, E]
  fp32, whose `type_as` copy nothing keeps); the probs scattered into
  [t, E] (`zeros_like(logits).scatter(1, top_indices, probs)`, the logits' dtype) and the bool
  routing map [t, E].
- TopKRouter.aux_loss_load_balancing (moe_router_load_balancing_type aux_loss) with
  moe_aux_loss_coeff > 0 (Megatron-LM's Mixtral recipe: 1e-2): compute_routing_scores_for_
  aux_loss's `softmax(logits, dtype=float32)` [t, E] fp32; moe_utils.py::
  switch_load_balancing_loss_func's `probs.sum(0) * tokens_per_expert` saves tokens_per_expert
  ([E] int64, topk_map.sum(0)); MoEAuxLossAutoScaler.forward saves the scalar loss (fp32).
  With the coefficient 0 none of the three is kept (apply_load_balancing_loss returns early).
- token_dispatcher.py::MoEAllGatherTokenDispatcher.token_permutation: over EP ranks the routing
  map, the probs and the hidden states are all-gathered over the TP x EP group (T = tokens x
  EP rows; the hidden states into parallel_state's global memory buffer); it keeps
  `self.local_map` and `self.local_probs` ([T, local experts], `.contiguous()`: the router's
  own tensors at EP = 1, copies otherwise) as Python attributes until the next forward, and
  moe_utils.py::permute's `sorted_indices` (`masked_select` of the transposed map, int64
  [pairs]) as `self.reversed_local_input_permutation_mapping`; `index_select` saves only those
  indices. SequentialMLP.forward `torch.split`s the permuted tokens [pairs, h] per expert
  (views: each expert's linear_fc1 saves its slice of one storage), each expert's MLP saves the
  dense rule's fc1 output, silu output and fc2 input over its tokens, and `torch.cat` makes the
  experts' output [pairs, h].
- MoEAllGatherTokenDispatcher.token_unpermutation: `local_probs.T.contiguous().masked_select(
  local_map.T.contiguous())` saves both transposed copies ([local experts, T]: the probs' dtype
  and bool; derivatives.yaml masked_select: masked_select_backward(grad, self, mask); with one
  local expert the transpose is contiguous already, so no copies: local_probs and local_map
  themselves); `hidden
  * permuted_probs.unsqueeze(-1)` saves the experts' output and the permuted probs [pairs];
  moe_utils.py::unpermute's `scatter_add_` saves the expanded sorted_indices (a view).
- token_dispatcher.py::MoEAlltoAllTokenDispatcher (`alltoall`, dropless): token_permutation
  keeps the router's own probs and routing map ([tokens, E]) as `self.probs` /
  `self.routing_map` and permute's sorted indices of the rank's tokens x top_k pairs; the
  permuted tokens go over the EP all-to-all (tensor_parallel/mappings.py::_AllToAll saves
  nothing; at EP 1 it returns its input) and, with more than one local expert,
  sort_chunks_by_idxs's split + cat (nothing saved) orders them by local expert: the experts
  save their input [pairs, h] as above. token_unpermutation sends the experts' output back
  (cat / all-to-all: nothing saved) and moe_utils.py::unpermute multiplies the rank's own
  tokens x top_k rows by `probs.T.contiguous().masked_select(routing_map.T.contiguous())`:
  the returned tokens, the permuted probs and both transposed copies [E, tokens] saved. No
  global memory buffer (all_to_all_single allocates its output). Its split sizes and
  per-expert counts (`input_splits`, `num_global_tokens_per_local_expert`, ...) are moved to
  the host (moe_utils.py::maybe_move_tensor_to_cpu): no device memory. Measured equal at EP
  1, 2 and 4 (benchmarks/megatron_activations.py).
- Drop and pad (`parallelism.expert_capacity_factor` c with the alltoall dispatcher:
  moe_expert_capacity_factor with moe_pad_expert_input_to_capacity): each expert takes
  capacity = ceil(tokens x top_k / E x c) tokens from each rank (moe_utils.py::get_capacity),
  padded. The router's topk_softmax_with_capacity keeps the same [tokens, E] probs
  (`topk_masked_gates * final_map`, which saves the bool map) and map; permute's sorted
  indices are argsort's first `capacity` per expert ([E x capacity] int64); every rank sends
  and receives E x capacity rows (fixed splits), the experts run E x capacity pairs
  (memplan.activations.layout.expert_pairs); unpermute picks the probs with
  `index_select` (saves only its int64 indices [E x capacity], no transposed copies) and
  multiplies the returned E x capacity rows by them. preprocess's per-expert counts are
  `torch.full` with no device: host memory on CUDA, counted on the CPU. Measured equal at
  factors 0.5 (dropping), 1.0 and 1.5, EP 1, 2 and 4. A capacity over the rank's tokens
  (c > E / top_k) makes the router's `topk(k=capacity)` raise: refused.
- Recompute: full (transformer_block.py::_checkpointed_forward) runs the layer under no_grad,
  which skips the aux loss (apply_load_balancing_loss runs only when grad is enabled) but still
  sets the dispatcher's three attributes: they stay alive beside the checkpointed input.
  Selective core_attn leaves the MoE layer as it is.

Routing: balanced and dropless (or padded to capacity, above). Every expert receives tokens x
top_k / E (token, expert) pairs from every rank, so a rank's local experts process tokens x
top_k pairs at any EP
(memplan.activations.layout.expert_pairs); the oracle forces that routing
(memplan.verify.megatron_cpu.balanced_routing). Skewed routing moves the experts' share
(pairs) between ranks; the router's and dispatcher's tensors do not depend on it.

Refused, with the source: GroupedMLP (moe_grouped_gemm: the `grouped_gemm` CUDA extension,
moe/grouped_gemm_util.py) and TEGroupedMLP (Transformer Engine: CUDA only); the TE spec's MoE;
TP > 1 (the local spec refuses sequence parallelism and moe_layer.py::MoELayer.forward raises
for MoE with TP but without it: run on gloo ranks, SRC_TP); a capacity factor with the
allgather dispatcher (measured with alltoall only); shared experts (Qwen2-MoE's gated one:
SRC_SHARED_GATE; DeepSeek); Qwen's norm_topk_prob false; dense layers beside MoE layers
(mlp_only_layers, decoder_sparse_step); sliding-window attention; recompute_modules ["moe"]
(moe_layer_recompute: no memplan setting names it).
"""

from __future__ import annotations

import math

from memplan.memory import ALWAYS, Transient
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture

VERSION = "0.12.0"
SRC = f"megatron-core {VERSION} megatron/core/transformer/moe/"
SRC_ROUTER = SRC + "moe_utils.py::topk_softmax_with_capacity"
SRC_PRE_SOFTMAX = (
    f"megatron-core {VERSION} megatron/core/transformer/transformer_config.py::"
    "TransformerConfig.__post_init__ ('Please use --moe-router-pre-softmax when topk is 1.')"
)
SRC_AUX = (
    SRC + "router.py::TopKRouter.aux_loss_load_balancing; moe_utils.py::"
    "switch_load_balancing_loss_func, MoEAuxLossAutoScaler.forward"
)
SRC_DISPATCH = SRC + "token_dispatcher.py::MoEAllGatherTokenDispatcher.token_permutation"
SRC_PERMUTE = SRC + "moe_utils.py::permute"
SRC_UNPERMUTE = SRC + "token_dispatcher.py::MoEAllGatherTokenDispatcher.token_unpermutation"
SRC_A2A = SRC + "token_dispatcher.py::MoEAlltoAllTokenDispatcher.token_permutation"
SRC_A2A_UNPERMUTE = (
    SRC + "token_dispatcher.py::MoEAlltoAllTokenDispatcher.token_unpermutation; moe_utils.py::"
    "unpermute"
)
SRC_EXPERTS = SRC + "experts.py::SequentialMLP.forward"
SRC_TRACKER = SRC + "moe_utils.py::save_to_aux_losses_tracker"
SRC_GROUPED = (
    SRC + "moe_module_specs.py::get_moe_module_spec (moe_grouped_gemm: GroupedMLP needs the "
    "`grouped_gemm` CUDA extension, moe/grouped_gemm_util.py; TEGroupedMLP is Transformer "
    "Engine's, CUDA only)"
)
SRC_TP = (
    SRC + "moe_layer.py::MoELayer.forward (raises for training with tensor parallelism and no "
    "sequence parallelism, which the local spec's torch norms refuse: transformer/torch_norm.py"
    "::WrappedTorchNorm asserts 'sequence parallel not supported by torch LayerNorm', and "
    "models/gpt/gpt_layer_specs.py::get_gpt_layer_local_spec takes WrappedTorchNorm for "
    "RMSNorm even where apex is installed; both raised on 2 and 4 gloo ranks, TP 2 and TP 2 x "
    "EP 2, either dispatcher: benchmarks/megatron_activations.py `moe_not_run`)"
)


NOTE = (
    "Megatron-Core MoE layers (local spec): TopKRouter with the aux loss (moe_aux_loss_coeff "
    "> 0), the allgather token dispatcher, SequentialMLP; balanced dropless routing assumed "
    "(every expert tokens x top_k / E pairs from every rank)."
)


def note(st: Setting) -> str:
    """NOTE, naming the token dispatcher `st` runs (parallelism.moe_dispatcher)."""
    out = NOTE.replace("the allgather token", f"the {st.moe_dispatcher} token")
    if st.expert_capacity is not None:
        out = out.replace(
            "balanced dropless routing assumed (every expert tokens x top_k / E pairs from "
            "every rank)",
            f"drop and pad: every expert's buffer {st.expert_capacity} tokens from every rank "
            "(moe_pad_expert_input_to_capacity), whatever the routing",
        )
    return out


def is_moe(arch: Architecture) -> bool:
    """A model whose layers run Megatron-Core's MoELayer (routed experts)."""
    return arch.num_experts > 0


SRC_SHARED_GATE = (
    f"megatron-core {VERSION} megatron/core/models/gpt/moe_module_specs.py::get_moe_module_spec "
    "(`ModuleSpec(module=SharedExpertMLP, params={'gate': False})`)"
)
OTHER_FAMILIES = {
    "qwen2_moe": (
        "Qwen2-MoE's shared expert is sigmoid-gated, and the GPT layer specs build "
        f"Megatron-Core's shared expert without its gate ({SRC_SHARED_GATE})"
    ),
}
"""MoE model_types the megatron-core rule refuses, with why (deepseek falls to the generic
refusal: MLA and shared experts)."""


def family_refusal(model_type: str) -> str:
    """Why an MoE family the rule does not build is refused under megatron-core, or ''."""
    why = OTHER_FAMILIES.get(model_type, "")
    covered = "memplan models Megatron-Core's MoE layer for Mixtral and Qwen3-MoE"
    return f"{why}: {covered}" if why else ""


def unsupported(arch: Architecture) -> str:
    """Why this MoE model is outside the rule (module docstring), or ''."""
    x = arch.extra
    if x.get("shared_expert_intermediate_size") or x.get("n_shared_experts"):
        return "Megatron-Core's shared experts (Qwen MoE, DeepSeek) are not modelled"
    if arch.num_experts_per_token > 1 and x.get("norm_topk_prob") is False:
        return (
            "Megatron-Core's router renormalises the top-k probabilities (softmax over the "
            f"top-k logits, {SRC_ROUTER}): norm_topk_prob false is not what it computes"
        )
    if x.get("sliding_window"):
        return "Megatron-Core's local attention has no sliding window (Mixtral sliding_window set)"
    if tuple(x.get("moe_layers", ())) != tuple(range(arch.num_layers)):
        return "the megatron-core MoE rule is for every layer an MoE layer (Mixtral)"
    return ""


def expert_parallel(arch: Architecture, st: Setting) -> tuple[int, int, int]:
    """(EP ranks, local experts, (token, expert) pairs a rank's experts process) for one rank:
    the layout's (memplan.activations.layout.expert_pairs), else all experts and tokens x
    top_k."""
    e = arch.num_experts
    local = e if st.local_experts is None else st.local_experts
    pairs = st.tokens * arch.num_experts_per_token if st.expert_pairs is None else st.expert_pairs
    return e // local, local, pairs


def _router(arch: Architecture, st: Setting) -> list[Saved]:
    t, e, k = st.tokens, arch.num_experts, arch.num_experts_per_token
    fp32, i64 = kernels.FP32, kernels.INT64
    # Top-1 needs moe_router_pre_softmax (SRC_PRE_SOFTMAX): the softmax runs over every
    # expert's logit before top-k and saves [t, E] fp32; else over the top-k scores, [t, k].
    probs = (t, e) if k == 1 else (t, k)
    return [
        kernels.saved("router.topk_indices", (t, k), i64, "TopkBackward0", SRC_ROUTER),
        kernels.saved("router.softmax", probs, fp32, "SoftmaxBackward0", SRC_ROUTER),
        kernels.saved("router.aux_scores", (t, e), fp32, "SoftmaxBackward0", SRC_AUX),
        kernels.saved("router.tokens_per_expert", (e,), i64, "MulBackward0", SRC_AUX),
        kernels.saved("router.aux_loss", (), fp32, "MoEAuxLossAutoScaler", SRC_AUX),
    ]


SRC_CAPACITY = SRC + "moe_utils.py::get_capacity, topk_softmax_with_capacity (pad_to_capacity)"
SRC_PAD = (
    SRC + "token_dispatcher.py::MoEAlltoAllTokenDispatcher.preprocess (drop_and_pad); "
    "moe_utils.py::permute, unpermute (drop_and_pad)"
)


def capacity(arch: Architecture, tokens: int, factor: float) -> int:
    """Each expert's capacity from one rank: ceil(tokens x top_k / E x factor)
    (SRC_CAPACITY; the router and preprocess compute it alike)."""
    k, e = arch.num_experts_per_token, arch.num_experts
    return math.ceil((tokens * k / e) * factor)


def capacity_refusal(arch: Architecture, tokens: int, factor: float) -> str:
    """Why drop-and-pad does not run at this capacity, or '': the router picks each expert's
    tokens with `torch.topk(topk_masked_gates, k=capacity, dim=0)`, which raises when the
    capacity exceeds the rank's tokens (SRC_CAPACITY)."""
    cap = capacity(arch, tokens, factor)
    if cap <= tokens:
        return ""
    return (
        f"expert_capacity_factor {factor} gives each expert a capacity of {cap} tokens, more "
        f"than the {tokens} tokens a rank routes: Megatron-Core's router picks them with "
        f"torch.topk(k=capacity) over the tokens, which raises ({SRC_CAPACITY}); use a factor "
        f"up to E / top_k = {arch.num_experts / arch.num_experts_per_token:g}"
    )


def dispatcher_state(arch: Architecture, st: Setting) -> list[Saved]:
    """What the token dispatcher keeps as attributes until the next forward, grad or not.
    MoEAllGatherTokenDispatcher: the rank's routing map and probs over the T = tokens x EP
    gathered rows, and the permutation's sorted indices. MoEAlltoAllTokenDispatcher
    (`alltoall`): the router's own probs and routing map ([tokens, E], `self.probs`,
    `self.routing_map`) and the sorted indices of the rank's own tokens x top_k pairs
    (dropless: `num_out_tokens`); its split sizes and token counts are host copies on CUDA
    (moe_utils.py::maybe_move_tensor_to_cpu), no device memory."""
    ep, local, pairs = expert_parallel(arch, st)
    rows, c = st.tokens * ep, st.matmul
    if st.moe_dispatcher == "alltoall":
        t, e, sent = st.tokens, arch.num_experts, _sent(arch, st)
        out = [
            kernels.saved("dispatcher.probs", (t, e), c, "attribute", SRC_A2A),
            kernels.saved("dispatcher.routing_map", (t, e), "bool", "attribute", SRC_A2A),
            kernels.saved("dispatcher.sorted_indices", (sent,), kernels.INT64,
                          "IndexSelectBackward0", SRC_PERMUTE),
        ]  # fmt: skip
        if st.expert_capacity is not None and st.device == "cpu":
            # Drop and pad: preprocess's `num_global_tokens_per_local_expert = torch.full((E x
            # TP,), capacity)` has no device argument (permute_idx_device is None without
            # moe_permute_fusion): host memory beside a GPU, the device's own on the CPU.
            out.append(
                kernels.saved("dispatcher.tokens_per_expert", (e,), kernels.INT64,
                              "attribute", SRC_PAD)
            )  # fmt: skip
        return out
    return [
        kernels.saved("dispatcher.local_probs", (rows, local), c, "attribute", SRC_DISPATCH),
        kernels.saved("dispatcher.local_map", (rows, local), "bool", "attribute", SRC_DISPATCH),
        kernels.saved("dispatcher.sorted_indices", (pairs,), kernels.INT64,
                      "IndexSelectBackward0", SRC_PERMUTE),
    ]  # fmt: skip


def moe_mlp(arch: Architecture, st: Setting) -> list[Saved]:
    """One MoE layer's router, dispatcher and experts (what replaces the dense MLP's
    tensors); the router's input is pre_mlp_layernorm's output, which the dense rule lists."""
    from memplan.model.stacks import megatron

    ep, local, pairs = expert_parallel(arch, st)
    h, c = arch.hidden_size, st.matmul
    inter = int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))
    rows = st.tokens * ep
    out = _router(arch, st) + dispatcher_state(arch, st)
    out.append(kernels.saved("experts.input", (pairs, h), c, "LinearWithGrad", SRC_EXPERTS))
    out += megatron.mlp("experts.", pairs, inter, c, fused=False)
    by = "MaskedSelectBackward0"
    if st.moe_dispatcher == "alltoall":
        return out + _alltoall_combine(arch, st)
    out.append(kernels.saved("experts.output", (pairs, h), c, "MulBackward0", SRC_UNPERMUTE))
    if local > 1:
        # With one local expert the transpose of [T, 1] is already contiguous: `.contiguous()`
        # returns local_probs and local_map themselves (dispatcher_state lists them).
        out += [
            kernels.saved("dispatcher.probs_t", (local, rows), c, by, SRC_UNPERMUTE),
            kernels.saved("dispatcher.map_t", (local, rows), "bool", by, SRC_UNPERMUTE),
        ]
    out.append(
        kernels.saved("dispatcher.permuted_probs", (pairs,), c, "MulBackward0", SRC_UNPERMUTE)
    )
    return out


def _sent(arch: Architecture, st: Setting) -> int:
    """Rows a rank sends to the experts (its permuted tokens): tokens x top_k dropless, E x
    capacity padded (`num_out_tokens`, SRC_PAD)."""
    if st.expert_capacity is not None:
        return arch.num_experts * st.expert_capacity
    return st.tokens * arch.num_experts_per_token


def _alltoall_combine(arch: Architecture, st: Setting) -> list[Saved]:
    """MoEAlltoAllTokenDispatcher.token_unpermutation (SRC_A2A_UNPERMUTE): the experts' output
    goes back over the EP all-to-all (tensor_parallel/mappings.py::_AllToAll saves nothing)
    to the rank's own tokens x top_k pairs, which moe_utils.py::unpermute multiplies by the
    permuted probs (the multiply saves both); the probs are picked by `probs.T.contiguous().
    masked_select(routing_map.T.contiguous())` over all E experts, so both transposed copies
    [E, tokens] are saved (with one token the transpose is contiguous: the router's own)."""
    t, e, h, c = st.tokens, arch.num_experts, arch.hidden_size, st.matmul
    sent = _sent(arch, st)
    by, src = "MaskedSelectBackward0", SRC_A2A_UNPERMUTE
    out = [kernels.saved("experts.output", (sent, h), c, "MulBackward0", src)]
    if st.expert_capacity is not None:
        # Drop and pad: unpermute picks the permuted probs with `probs.T.contiguous().view(-1)
        # .index_select(0, indices_1D)`, which saves only the int64 indices [E x capacity]
        # (derivatives.yaml index_select), not the transposed copy.
        return out + [
            kernels.saved("dispatcher.probs_index", (sent,), kernels.INT64,
                          "IndexSelectBackward0", SRC_PAD),
            kernels.saved("dispatcher.permuted_probs", (sent,), c, "MulBackward0", SRC_PAD),
        ]  # fmt: skip
    if t > 1:
        out += [
            kernels.saved("dispatcher.probs_t", (e, t), c, by, src),
            kernels.saved("dispatcher.map_t", (e, t), "bool", by, src),
        ]
    out.append(kernels.saved("dispatcher.permuted_probs", (sent,), c, "MulBackward0", src))
    return out


def aux_loss_tracker(arch: Architecture) -> Transient:
    """parallel_state's MoE logging tracker: the load-balancing loss of every layer, [layers]
    fp32, made by the first forward and kept (SRC_TRACKER)."""
    n = arch.num_layers
    return Transient(
        name="megatron moe aux loss tracker",
        bytes=n * 4,
        phases=ALWAYS,
        formula=f"layers {n} x 4 B (fp32)",
        source=SRC_TRACKER,
    )
