"""torchtitan's decoder blocks under `training.compile` (0.3.0's apply_compile compiles each
block; embeddings, norm, output and loss stay eager): what Inductor's min-cut partition keeps
of each block, traced on torchtitan's own blocks (memplan.model.forward.compiled, compiled_ep,
compiled_mla), in place of the eager blocks memplan.model.stacks.torchtitan builds (blocks);
and which compiled Qwen3-MoE settings those traces cover (compiled_moe_uncovered).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan.model.forward import compiled, compiled_ep, compiled_mla, kernels
from memplan.model.forward.tensors import Block, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan_moe


def compiled_moe_uncovered(arch: Architecture, st: Setting) -> str:
    """Why the traced compiled Qwen3-MoE block (memplan.model.forward.compiled.qwen3_moe_layer,
    op_sac_moe_layer) does not cover this MoE setting under training.compile, or ''."""
    if arch.model_type != torchtitan_moe.QWEN3_MOE:
        return (
            f"model_type {arch.model_type!r} (traced MoE blocks: Qwen3-MoE here, DeepSeek-V3 "
            "in memplan.model.forward.compiled_mla)"
        )
    if st.float8 != "none":
        return "torchao Float8 (not traced on a MoE block)"
    if torchtitan_moe.expert_count(arch, st) < arch.num_experts and st.checkpointing == "full":
        return compiled_ep.FULL_AC_FAILS
    return ""


def blocks(
    arch: Architecture, st: Setting, layers: list[Block], *, qk_norm: bool
) -> tuple[list[Block], str]:
    """The decoder blocks compiled (torchtitan's apply_compile compiles each block; embeddings,
    norm, output and loss stay eager): what Inductor's min-cut partition keeps, traced on
    torchtitan 0.3.0's block (memplan.model.forward.compiled; tests/test_compile.py). Full
    checkpointing keeps each block's input either way. `qk_norm`: the block has Qwen3's q_norm
    and k_norm (traced on Qwen3TransformerBlock)."""
    if st.checkpointing == "full":
        return layers, (
            "training.compile with full checkpointing: each block keeps its input, as eager "
            "(traced); the recompute working set is the eager one (an upper bound)."
        )
    _, a, g, d = kernels.attention_dims(arch)
    op_sac = st.checkpointing == "selective-op"
    if arch.model_type == torchtitan_moe.DEEPSEEK_V3:
        return compiled_mla.blocks(arch, st, layers)
    if torchtitan_moe.is_moe(arch):
        return _compiled_moe(arch, st, layers, op_sac=op_sac)
    kept = (compiled.op_sac_layer if op_sac else compiled.llama_layer)(
        batch=st.batch,
        seq=st.sequence,
        hidden=arch.hidden_size,
        heads=a,
        kv_heads=g,
        head_dim=d,
        inter=arch.intermediate_size,
        dtype=st.matmul,
        **({} if op_sac else {"float8": st.float8 != "none", "qk_norm": qk_norm}),
    )
    eager = layers[0].bytes_each
    out = [replace(b, tensors=kept) for b in layers]
    return out, (
        f"training.compile: each block keeps what Inductor's min-cut partition keeps "
        f"({out[0].bytes_each:,} B per block, eager {eager:,} B); embeddings, norm, output "
        "and loss run eager."
    )


def _compiled_moe(
    arch: Architecture, st: Setting, layers: list[Block], *, op_sac: bool
) -> tuple[list[Block], str]:
    """torchtitan's Qwen3-MoE blocks compiled (memplan.model.forward.compiled.qwen3_moe_layer,
    op_sac_moe_layer; traced by benchmarks/compile_moe.py), checkpointing none or
    selective-op (full: `blocks`, each block keeps its input as eager)."""
    _, a, g, d = kernels.attention_dims(arch)
    dims: dict[str, Any] = {
        "batch": st.batch,
        "seq": st.sequence,
        "hidden": arch.hidden_size,
        "heads": a,
        "kv_heads": g,
        "head_dim": d,
        "top_k": arch.num_experts_per_token,
        "dtype": st.matmul,
    }
    local = torchtitan_moe.expert_count(arch, st)
    if local < arch.num_experts:
        # Expert parallelism: the all-to-all dispatcher's compiled block, balanced routing.
        ep_dims = {**dims, "experts": arch.num_experts, "ep": arch.num_experts // local}
        if op_sac:
            kept = compiled_ep.op_sac_moe_ep_layer(**ep_dims)
        else:
            kept = compiled_ep.qwen3_moe_ep_layer(
                **ep_dims,
                moe_inter=int(arch.extra.get("moe_intermediate_size", arch.intermediate_size)),
                router=torchtitan_moe.router_dtype(st),
            )
    elif op_sac:
        kept = compiled.op_sac_moe_layer(**dims)
    else:
        kept = compiled.qwen3_moe_layer(
            **dims,
            experts=arch.num_experts,
            moe_inter=int(arch.extra.get("moe_intermediate_size", arch.intermediate_size)),
            router=torchtitan_moe.router_dtype(st),
        )
    eager = layers[0].bytes_each
    out = [replace(b, tensors=kept) for b in layers]
    return out, (
        f"training.compile: each MoE block keeps what Inductor's min-cut partition keeps "
        f"({out[0].bytes_each:,} B per block, eager {eager:,} B); embeddings, norm and output "
        "run eager, the loss as training.compile_loss says."
    )
