"""The MLPs several families share, as saved tensors: a plain MLP's activation (GPT-2's
`act(c_fc(x))` and its copies), Llama's gated MLP and the routed experts of a sparse MoE layer
(Mixtral, Qwen MoE)."""

from __future__ import annotations

from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture

SRC_GPT2 = "transformers models/gpt2/modeling_gpt2.py"
SRC_LLAMA = "transformers models/llama/modeling_llama.py"
SRC_MOE = "transformers integrations/moe.py::grouped_mm_experts_forward"


def mlp_act(
    prefix: str, tokens: int, width: int, act: str, st: Setting, *, out_name: str = "mlp.c_proj"
) -> list[Saved] | None:
    """The MLP activation and the input of the linear after it, `out_name` (None: no rule
    for `act`)."""
    mm = st.matmul
    if act == "gelu_new":
        out = kernels.gelu_new(prefix, tokens, width, mm, st)
        return out + kernels.linear_inputs(
            [out_name], tokens, width, kernels.gelu_new_out(mm, st), st
        )
    saves_input = kernels.act_saves_input(act)
    if saves_input is None:
        return None
    c_proj = kernels.linear_inputs([out_name], tokens, width, mm, st)
    if not saves_input:
        return c_proj  # relu saves its output: the same storage c_proj saves
    return [
        kernels.saved(f"{prefix}.input", (tokens, width), mm, "GeluBackward0", SRC_GPT2),
        *c_proj,
    ]


def gated_mlp_saves(
    prefix: str, tokens: int, inter: int, act: str, st: Setting
) -> list[Saved] | None:
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))` (LlamaMLP.forward): the activation's
    saved tensor (gate output for silu/gelu, its output for relu), the product's two inputs
    (act output, up output) and down_proj's input. None for an activation with no rule."""
    saves_input = kernels.act_saves_input(act)
    if saves_input is None:
        return None
    shape = (tokens, inter)
    mm = st.matmul
    out = []
    if saves_input:
        out.append(
            kernels.saved(f"{prefix}.gate_proj.output", shape, mm, "SiluBackward0", SRC_LLAMA)
        )
    out += [
        kernels.saved(f"{prefix}.act_output", shape, mm, "MulBackward0", SRC_LLAMA),
        kernels.saved(f"{prefix}.up_proj.output", shape, mm, "MulBackward0", SRC_LLAMA),
        kernels.saved(f"{prefix}.down_proj.input", shape, mm, "MmBackward0", SRC_LLAMA),
    ]
    return out


def sparse_moe(
    prefix: str,
    tokens: int,
    arch: Architecture,
    x_dtype: str,
    st: Setting,
    *,
    renormalize: bool = True,
    weights_dtype: str = kernels.FP32,
) -> list[Saved]:
    """`MixtralSparseMoeBlock` with transformers' default experts implementation,
    `grouped_mm` (modeling_utils.py::get_correct_experts_implementation).

    Router (modeling_mixtral.py::MixtralTopKRouter): F.linear saves its input, softmax of the
    fp32 logits saves [tokens, E] fp32, topk saves int64 indices, the in-place renormalisation
    saves the top-k values and their sum. Experts, over S = tokens x top_k (token, expert)
    pairs sorted by expert: two int64 gather indices, the int32 group offsets, the gathered
    input [S, hidden], the gate_up output [S, 2 x inter] (silu's input, a view of it, and the
    up half), the act output and the product [S, inter], the routing weights [S, 1] fp32 and
    the down output [S, hidden] of the weighting multiply, the inverse permutation.
    `torch._grouped_mm` is not on CPU autocast's lists: under autocast the experts run in the
    stream dtype (measured; CUDA autocast not measured).

    Qwen's routers (Qwen2MoeTopKRouter, Qwen3MoeTopKRouter) renormalise only with
    `norm_topk_prob` (`renormalize`) and cast the routing weights to the router logits' dtype
    (`weights_dtype`).
    """
    e, k, h = arch.num_experts, arch.num_experts_per_token, arch.hidden_size
    inter = int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))
    pairs = tokens * k if st.expert_pairs is None else st.expert_pairs
    local = e if st.local_experts is None else st.local_experts
    x = st.stream
    out = kernels.linear_inputs([f"{prefix}.gate"], tokens, h, x_dtype, st)
    out += kernels.weight_casts([(f"{prefix}.gate", (e, h))], st)

    def add(name: str, shape: tuple[int, ...], dtype: str, by: str) -> None:
        out.append(kernels.saved(f"{prefix}.{name}", shape, dtype, by, SRC_MOE))

    add("router.softmax", (tokens, e), kernels.FP32, "SoftmaxBackward0")
    add("router.topk_indices", (tokens, k), kernels.INT64, "TopkBackward0")
    if renormalize:
        add("router.topk_values", (tokens, k), kernels.FP32, "DivBackward0")
        add("router.topk_sum", (tokens, 1), kernels.FP32, "DivBackward0")
    add("experts.token_index", (pairs,), kernels.INT64, "IndexBackward0")
    add("experts.perm", (pairs,), kernels.INT64, "IndexBackward0")
    add("experts.offsets", (local,), "int32", "GroupedMmBackward0")
    add("experts.input", (pairs, h), x, "GroupedMmBackward0")
    add("experts.gate_up_output", (pairs, 2 * inter), x, "SiluBackward0")
    add("experts.act_output", (pairs, inter), x, "MulBackward0")
    add("experts.down_input", (pairs, inter), x, "GroupedMmBackward0")
    add("experts.routing_weights", (pairs, 1), weights_dtype, "MulBackward0")
    add("experts.down_output", (pairs, h), x, "MulBackward0")
    add("experts.inverse_perm", (pairs,), kernels.INT64, "IndexBackward0")
    return out
