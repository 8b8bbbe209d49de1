"""torchtitan's own MoE block (`model.implementation: torchtitan`, model_type qwen3_moe): what
its router, token reordering and grouped experts save for backward, with no checkpointing
and under its per-op SelectiveAC. The attention, the norms, the embeddings, the head and the
loss are the dense Qwen3 rule's (memplan.model.stacks.torchtitan), which calls this module for
the block's feed-forward half.

Read from torchtitan 0.3.0 (pip `torchtitan==0.3.0`):
- models/qwen3/model.py::Qwen3TransformerBlock.forward: `x = x + moe(ffn_norm(x))` in every
  layer of a MoE flavor (models/qwen3/__init__.py::_build_qwen3_moe_layers: every layer MoE,
  router `score_func="softmax", route_norm=True`, no shared experts, `make_moe_config`'s
  `load_balance_coeff=1e-3`: the `expert_bias_E` buffer is added to the scores for the top-k
  choice only).
- models/common/moe.py::TokenChoiceTopKRouter.forward: the gate under
  `torch.autocast(device_type, dtype=torch.float32)`; softmax; `topk(scores + expert_bias)`
  (indices kept); `scores.gather(-1, ids)`; route_norm: `/ (sum(-1, keepdim) + 1e-20)`;
  `* route_scale`. CPU autocast supports only bf16 / fp16 and disables itself for fp32 (torch
  2.13 torch/amp/autocast_mode.py::autocast.__init__: "Disabling autocast"), so on CPU the
  gate runs in the parameters' dtype; CUDA autocast runs it in fp32, casting its input and
  weight (aten/src/ATen/autocast_mode.h::cached_cast; linear is a lower_precision_fp op).
- models/common/moe.py::MoE.forward: the routing map and the token counts are made without
  grad; `routed_experts(x, scores, ids, counts)`.
- models/common/token_dispatcher.py::LocalTokenDispatcher._local_reorder (the `standard`
  backend's AllToAllTokenDispatcher.dispatch falls back to it when the EP mesh is None):
  `argsort(ids.view(-1), stable=True)`, `scores.view(-1)[order]`, `order // top_k`,
  `x[order // top_k]`; combine: `(out.to(float32) * scores_sorted.reshape(-1, 1)).to(out.dtype)`
  and ops/scatter_add.py::deterministic_scatter_add (its autograd saves the index, an expanded
  view of `order // top_k`).
- models/common/moe.py::GroupedExperts.forward: `offsets = cumsum(counts, dtype=int32)`;
  `silu(_grouped_mm(x.bfloat16(), w1.bfloat16().T, offs)) * _grouped_mm(x.bfloat16(),
  w3.bfloat16().T, offs)`, `_grouped_mm(h, w2.bfloat16().T, offs).type_as(x)`: the experts run
  in bf16 whatever the model's dtype (a model not in bf16 casts x twice and each weight once).
  `torch._grouped_mm` is the only expert path in 0.3.0 (no for-loop path); it runs on CPU and
  on CUDA, and its backward saves the same tensors on both (derivatives.yaml _grouped_mm:
  `self`, `mat2`, `offs`).

Routing: with expert parallelism 1 the token dispatcher neither pads nor drops: every
routed tensor has N = tokens x top_k rows whatever the routing, so the rule holds for any
routing (the test measures a seeded router and torchtitan's balanced round-robin one).

SelectiveAC (distributed/activation_checkpoint.py::SelectiveAC, `_get_default_save_ops`):
`force_recompute_mm_shapes_by_fqns=["moe.router.gate"]` recomputes the gate's mm without
counting it, `aten.topk` is in the save list (both its outputs kept), `_grouped_mm` is in
neither the save list nor `mm_ops` (recomputed, not counted).

Expert parallelism (`parallelism.expert` > 1, no context parallelism; memplan.
activations.torchtitan_parallel passes `Setting.local_experts` = E / EP, and under TP the
rank's token shard): the `standard`
backend's models/common/token_dispatcher.py::AllToAllTokenDispatcher.dispatch, once
RoutedExperts.parallelize has wired the EP mesh (the experts' weights Shard(0) over `ep`,
models/common/moe_sharding.py::expert_param_placement_sparse): the local reorder as above,
the token counts exchanged (`_token_count_exchange`, an all_to_all_single of the [EP, E / EP]
int64 counts, without grad), `all_to_all_single` of the reordered tokens, then `_permute` to
expert-major order: `routed_input_RD[permuted_indices, :]` saves `permuted_indices` [R] int64
(the same storage `_unpermute`'s index_put saves in combine); the grouped experts run on the
[R, D] tokens of the E / EP local experts (offsets [E / EP]); combine unpermutes,
all-to-alls back to N rows and scores them as at EP 1. The all-to-alls' autograd
(torch 2.13 _functional_collectives.py, register_autograd) saves no tensor.
Routing under EP: the rule assumes every rank receives as many rows as it sends, R = N =
tokens x top_k (balanced routing: torchtitan's `_debug_force_load_balance` round-robin, with
E dividing tokens x top_k, is what tests/torchtitan_ep_probe.py measures). With real routing
R differs per rank and per step: the rule is then the balanced average, not a bound.
Under SelectiveAC `_c10d_functional.all_to_all_single` is in the save list (comm_ops): the
dispatch and combine all-to-alls' outputs ([R, D] and [N, D], the stream dtype) and the
count exchange's [EP, E / EP] int64 output are kept (SRC_SAC_EP).

Tensor parallelism (EP 1, Qwen3-MoE and DeepSeek-V3): see `model_parallel`. Expert and tensor
parallelism together (with sequence parallelism): memplan.activations.torchtitan_parallel
(SRC_EP_TP): the router and the dispatcher run on each TP rank's token shard, the routed
experts whole over TP, DeepSeek-V3's shared experts as under TP alone. Refused: context
parallelism on MoE blocks, EP x TP without sequence parallelism (torchtitan 0.3.0 itself fails
there, with the error quoted).

FSDP2 (distributed/fsdp.py::apply_fsdp_to_decoder): with expert parallelism 1 a MoE block is
one `fully_shard` group, as a dense block; the experts go on dim 1 when the FSDP degree
(efsdp x EP under EP) exceeds the number of experts (memplan.states.engines.fsdp2.sharding.
SRC_DIM1).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import kernels
from memplan.model.forward.mlp import gated_mlp_saves
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture

VERSION = "0.3.0"
QWEN3_MOE = "qwen3_moe"
DEEPSEEK_V3 = "deepseek_v3"
MODEL_TYPES = (QWEN3_MOE, DEEPSEEK_V3)
"""The MoE model_types torchtitan's own code is modelled for (models/qwen3 MoE flavors,
models/deepseek_v3)."""
SRC_DEEPSEEK = (
    f"torchtitan {VERSION} models/deepseek_v3/__init__.py::build_mla_moe_layers (layers below "
    "n_dense_layers dense; router sigmoid with node-limited groups, route_norm, route_scale; "
    "shared experts a FeedForward of moe_hidden_dim x num_shared_experts)"
)
BF16 = "bf16"
SRC_ROUTER = f"torchtitan {VERSION} models/common/moe.py::TokenChoiceTopKRouter.forward"
SRC_DISPATCH = (
    f"torchtitan {VERSION} models/common/token_dispatcher.py::LocalTokenDispatcher."
    "_local_reorder, combine; ops/scatter_add.py::deterministic_scatter_add"
)
SRC_EXPERTS = (
    f"torchtitan {VERSION} models/common/moe.py::GroupedExperts.forward; "
    f"{kernels.DERIV}: _grouped_mm"
)
SRC_AUTOCAST = (
    "aten/src/ATen/autocast_mode.h::cached_cast (the gate under CUDA autocast fp32); torch "
    "2.13 torch/amp/autocast_mode.py::autocast.__init__ disables CPU autocast for fp32"
)
SRC_EP = (
    f"torchtitan {VERSION} models/common/token_dispatcher.py::AllToAllTokenDispatcher.dispatch, "
    "_permute (routed_input_RD[permuted_indices, :]), _unpermute, combine"
)
SRC_SAC_EP = (
    f"torchtitan {VERSION} distributed/activation_checkpoint.py::_get_default_save_ops "
    "(comm_ops: _c10d_functional.all_to_all_single.default); token_dispatcher.py::"
    "AllToAllTokenDispatcher._token_count_exchange, _dispatch_token_exchange, "
    "_combine_token_exchange"
)
SRC_SAC = (
    f"torchtitan {VERSION} distributed/activation_checkpoint.py::SelectiveAC._wrap_block "
    "(force_recompute_mm_shapes_by_fqns moe.router.gate) and _get_default_save_ops "
    "(aten.topk.default: MUST_SAVE)"
)


MODEL_PARALLEL = (
    "activations of torchtitan's MoE model code under context parallelism are not modelled "
    "(ring attention over MoE blocks needs CUDA kernels: not proved)"
)


def model_parallel(arch: Architecture, tensor: int, context: int) -> str:
    """Why torchtitan's MoE under this TP x CP is outside the rules, or ''. Under TP alone
    (expert parallelism 1) Qwen3-MoE's plan (models/common/moe_sharding.py::
    set_moe_sharding_config, enable_ep False: the block's input gathered to Replicate, the
    router and the experts on the whole sequence, each expert's hidden dim split: w1 / w3
    Shard(1), w2 Shard(2), the output Partial reduce-scattered to the sequence shard) is the
    single-device rule on the TP rank's slice (moe_intermediate_size / TP) with the dense TP
    splits around it (memplan.activations.torchtitan_parallel), measured by tests/
    torchtitan_ep_probe.py on 2 gloo ranks. DeepSeek-V3 alike (models/deepseek_v3/sharding.py::
    _set_deepseek_v3_layer_sharding: MLA's input all-gathered once, wkv_a / kv_norm (and wq_a /
    q_norm) replicated on the whole sequence, wq (wq_b) and wkv_b column-parallel over the
    heads, wo row-parallel; the shared experts column / row parallel, reduce-scattered to the
    sequence shard on their own), measured the same way."""
    if not is_moe(arch) or (tensor == 1 and context == 1):
        return ""
    if context > 1:
        return MODEL_PARALLEL
    return ""


DROPLESS = (
    "torchtitan's `standard` token dispatcher is dropless (models/common/token_dispatcher.py): "
    "parallelism.expert_capacity_factor does not apply to its MoE"
)


def is_moe(arch: Architecture) -> bool:
    return arch.model_type in MODEL_TYPES


def dense_layers(arch: Architecture) -> int:
    """The dense layers before the first MoE layer (DeepSeek-V3's first_k_dense_replace);
    0 for Qwen3-MoE."""
    layers = tuple(arch.extra.get("moe_layers", range(arch.num_layers)))
    return layers[0] if layers else arch.num_layers


def unsupported(arch: Architecture, st: Setting) -> str:
    """Why torchtitan's MoE rule does not cover this MoE config or setting, or ''."""
    x = arch.extra
    if st.expert_pairs is not None:
        return DROPLESS
    if arch.model_type == DEEPSEEK_V3:
        return _deepseek_unsupported(arch, st)
    layers = tuple(x.get("moe_layers", range(arch.num_layers)))
    if not arch.num_experts or len(layers) != arch.num_layers:
        return (
            "torchtitan's Qwen3-MoE makes every layer a MoE layer (models/qwen3/__init__.py::"
            "_build_qwen3_moe_layers): this config has dense layers (mlp_only_layers, "
            "decoder_sparse_step > 1)"
        )
    if not x.get("norm_topk_prob", False):
        return (
            "torchtitan's Qwen3-MoE router normalises the top-k scores (route_norm=True): "
            "this config sets norm_topk_prob false"
        )
    return ""


def _deepseek_unsupported(arch: Architecture, st: Setting) -> str:
    x = arch.extra
    k = dense_layers(arch)
    if tuple(x.get("moe_layers", ())) != tuple(range(k, arch.num_layers)) or not arch.num_experts:
        return (
            "torchtitan's DeepSeek-V3 has dense layers first and MoE layers after "
            "(build_mla_moe_layers): this config's MoE layers are not the last ones "
            "(moe_layer_freq > 1?)"
        )
    groups, limited = x.get("n_group"), x.get("topk_group")
    if bool(groups) != bool(limited) or (groups and arch.num_experts // int(groups) < 2):
        return (
            "torchtitan's node-limited routing takes n_group and topk_group together, with at "
            "least 2 experts per group (TokenChoiceTopKRouter._get_node_limited_routing_scores)"
        )
    if str(x.get("hidden_act", "silu")) not in ("silu", "swish"):
        return "torchtitan's DeepSeek-V3 experts are SwiGLU (hidden_act silu)"
    if st.device == "cuda":
        return (
            "torchtitan's DeepSeek-V3 on CUDA is not modelled: its ScaledDotProductAttention "
            "allows cuDNN, flash and math only (models/common/attention.py), flash refuses "
            "MLA's unequal q/k and v head dims, and cuDNN takes a 192-wide q/k head only on "
            "Hopper with cuDNN >= 9.10 (torch sdp_utils.cpp::check_cudnn_tensor_shapes), so "
            "the kernel (cuDNN, or math with an fp32 [b, h, s, s] softmax per layer) depends "
            "on the cuDNN runtime (0.3.0's flavors default to flex attention); the rule is "
            "proved on CPU"
        )
    if st.checkpoint_every > 1 and k:
        return (
            "checkpoint_every > 1 over DeepSeek-V3's dense and MoE layers is not modelled "
            "(two layer kinds)"
        )
    return ""


def router_dtype(st: Setting) -> str:
    """The gate's and the scores' dtype: fp32 under CUDA autocast, the model's dtype on CPU
    (autocast disabled there for fp32: SRC_AUTOCAST)."""
    return kernels.FP32 if st.device == "cuda" else st.matmul


def saves(arch: Architecture, st: Setting) -> list[Saved]:
    """What `moe(ffn_norm(x))` saves after ffn_norm's own saves (memplan.model.stacks.
    torchtitan.rms_norm): the gate's input, the router's, the dispatcher's and the grouped
    experts' tensors (module docstring)."""
    e, k, h = arch.num_experts, arch.num_experts_per_token, arch.hidden_size
    inter = int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))
    t, x = st.tokens, st.stream
    n = t * k
    local = expert_count(arch, st)
    r = router_dtype(st)
    deepseek = arch.model_type == DEEPSEEK_V3
    shared = int(arch.extra.get("n_shared_experts") or 0) * inter if deepseek else 0

    def add(name: str, shape: tuple[int, ...], dtype: str, by: str, src: str) -> Saved:
        return kernels.saved(f"moe.{name}", shape, dtype, by, src)

    if r == x:
        # The gate saves ffn_norm's output itself (and the shared experts' w1, w3 with it).
        out = [add("router.gate.input", (t, h), x, "MmBackward0", SRC_ROUTER)]
    else:
        out = [
            add("router.gate.input_fp32", (t, h), r, "MmBackward0", SRC_AUTOCAST),
            add("router.gate.weight_fp32", (e, h), r, "MmBackward0", SRC_AUTOCAST),
        ]
        if shared:
            out.append(add("shared_experts.w1.input", (t, h), x, "MmBackward0", SRC_DEEPSEEK))
    # softmax (Qwen3) or sigmoid (DeepSeek-V3) saves its output, which gather saves too (one
    # storage). The node-limited group choice only feeds topk's indices (no grad): nothing
    # of it is saved.
    score = (
        ("router.sigmoid", "SigmoidBackward0")
        if deepseek
        else ("router.softmax", "SoftmaxBackward0")
    )
    out += [
        add(score[0], (t, e), r, score[1], SRC_ROUTER),
        add("router.topk_indices", (t, k), kernels.INT64, "TopkBackward0", SRC_ROUTER),
    ]
    if not deepseek or arch.extra.get("norm_topk_prob"):
        # route_norm: the gathered scores and their sum (+ 1e-20), saved by the division.
        out += [
            add("router.topk_scores", (t, k), r, "DivBackward0", SRC_ROUTER),
            add("router.topk_sum", (t, 1), r, "DivBackward0", SRC_ROUTER),
        ]
    # `* route_scale` (a Python float) saves no tensor.
    out += [
        # argsort's order, saved by `scores.view(-1)[order]`.
        add("dispatch.order", (n,), kernels.INT64, "IndexBackward0", SRC_DISPATCH),
        # order // top_k: saved by `x[...]` and by the scatter_add (an expanded view).
        add("dispatch.token_indices", (n,), kernels.INT64, "IndexBackward0", SRC_DISPATCH),
    ]
    if local < e:
        # EP: the received rows (R = n, balanced) put in expert-major order by index.
        out.append(add("dispatch.permuted_indices", (n,), kernels.INT64, "IndexBackward0", SRC_EP))
    if x == BF16:
        out.append(add("experts.input", (n, h), x, "GroupedMmBackward0", SRC_EXPERTS))
    else:
        # x.bfloat16() twice (w1's and w3's), each weight cast once.
        out += [
            add("experts.w1.input_bf16", (n, h), BF16, "GroupedMmBackward0", SRC_EXPERTS),
            add("experts.w3.input_bf16", (n, h), BF16, "GroupedMmBackward0", SRC_EXPERTS),
            add("experts.w1_bf16", (local, inter, h), BF16, "GroupedMmBackward0", SRC_EXPERTS),
            add("experts.w3_bf16", (local, inter, h), BF16, "GroupedMmBackward0", SRC_EXPERTS),
            add("experts.w2_bf16", (local, h, inter), BF16, "GroupedMmBackward0", SRC_EXPERTS),
        ]
    out.append(add("experts.offsets", (local,), "int32", "GroupedMmBackward0", SRC_EXPERTS))
    # silu(w1 x) * (w3 x), then w2: the gated MLP's four [N, inter] saves, in bf16.
    mlp = gated_mlp_saves("moe.experts", n, inter, "silu", replace(st, matmul=BF16))
    assert mlp is not None  # silu has a rule
    out += [replace(m, source=SRC_EXPERTS) for m in mlp]
    out += [
        # combine: out.to(float32) * scores_sorted: the multiply saves both.
        add("combine.output_fp32", (n, h), kernels.FP32, "MulBackward0", SRC_DISPATCH),
        add("combine.scores_sorted", (n,), r, "MulBackward0", SRC_DISPATCH),
    ]
    if shared:
        # MoE.forward: `shared_experts(x)`, a FeedForward (w2(silu(w1(x)) * w3(x))).
        mlp = gated_mlp_saves("moe.shared_experts", t, shared, "silu", st)
        assert mlp is not None
        out += [replace(m, source=SRC_DEEPSEEK) for m in mlp]
    return out


def expert_count(arch: Architecture, st: Setting) -> int:
    """The routed experts this rank runs: E / EP under expert parallelism, else E."""
    return st.local_experts or arch.num_experts


def shared_matmuls(arch: Architecture) -> list[tuple[str, int, int]]:
    """The shared experts' matmuls, (name, input width, output width), counted by
    SelectiveAC after the uncounted gate."""
    if arch.model_type != DEEPSEEK_V3 or not arch.extra.get("n_shared_experts"):
        return []
    h = arch.hidden_size
    inter = int(arch.extra["moe_intermediate_size"]) * int(arch.extra["n_shared_experts"])
    return [
        ("moe.shared_experts.w1", h, inter),
        ("moe.shared_experts.w3", h, inter),
        ("moe.shared_experts.w2", inter, h),
    ]


def selective_kept(arch: Architecture, st: Setting) -> list[Saved]:
    """What SelectiveAC keeps of the MoE block (SRC_SAC): topk's two outputs, the values
    and the indices. The values are of `scores + expert_bias_E`, fp32 whatever the router's
    dtype: MoE.__init__ registers the bias as an fp32 buffer (`load_balance_coeff` 1e-3 in
    config_utils.py::make_moe_config), which FSDP2's param_dtype does not cast. The gate's mm
    is recomputed and not counted; the grouped mms are neither saved nor counted."""
    t, k = st.tokens, arch.num_experts_per_token
    kept = []
    groups, limited = arch.extra.get("n_group"), arch.extra.get("topk_group")
    if arch.model_type == DEEPSEEK_V3 and groups and limited:
        # _get_node_limited_routing_scores: `topk(2)` in each group, then `topk(limited)` of
        # the group scores: both topks' outputs are kept too.
        g, lim = int(groups), int(limited)
        kept += [
            kernels.saved(
                "moe.router.group_top2_values", (t, g, 2), kernels.FP32, "MUST_SAVE", SRC_SAC
            ),
            kernels.saved(
                "moe.router.group_top2_indices", (t, g, 2), kernels.INT64, "MUST_SAVE", SRC_SAC
            ),
            kernels.saved("moe.router.group_values", (t, lim), kernels.FP32, "MUST_SAVE", SRC_SAC),
            kernels.saved(
                "moe.router.group_indices", (t, lim), kernels.INT64, "MUST_SAVE", SRC_SAC
            ),
        ]
    kept += [
        kernels.saved("moe.router.topk_values", (t, k), kernels.FP32, "MUST_SAVE", SRC_SAC),
        kernels.saved("moe.router.topk_indices", (t, k), kernels.INT64, "MUST_SAVE", SRC_SAC),
    ]
    local = expert_count(arch, st)
    if local < arch.num_experts:
        # EP: the all-to-alls' outputs (SRC_SAC_EP), R = N = t x top_k rows (balanced).
        ep, h, x = arch.num_experts // local, arch.hidden_size, st.stream
        kept += [
            kernels.saved(
                "moe.dispatch.token_counts", (ep, local), kernels.INT64, "MUST_SAVE", SRC_SAC_EP
            ),
            kernels.saved("moe.dispatch.all_to_all", (t * k, h), x, "MUST_SAVE", SRC_SAC_EP),
            kernels.saved("moe.combine.all_to_all", (t * k, h), x, "MUST_SAVE", SRC_SAC_EP),
        ]
    return kept
