"""torchtitan's activation checkpointing on the blocks of its Llama 3, Qwen3, Qwen3-MoE and
DeepSeek-V3 (memplan.model.stacks.torchtitan builds a block's saved tensors; this module says
what each kind of checkpointing keeps of them): FullAC keeps each block's input and recomputes
the rest in backward (SRC_CHECKPOINT); every-Nth-layer checkpointing (`checkpoint_every`)
wraps the blocks torchtitan's counter picks (checkpointed_layers); the per-op SelectiveAC
(`selective-op`) keeps the block's input, the outputs of every second matmul it counts and, on
CUDA, the flash attention op's outputs (SRC_SAC).

Read from torchtitan 0.3.0 distributed/activation_checkpoint.py (FullAC and SelectiveAC wrap
each block in `ptd_checkpoint_wrapper`: torch.utils.checkpoint, non-reentrant) and 9dec370's
parallelisms/parallelize_llama.py::_apply_ac_to_transformer_block (the layer counter).
"""

from __future__ import annotations

from memplan.model.forward import attention, kernels
from memplan.model.forward.tensors import Block, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan_mla, torchtitan_moe

VERSION = torchtitan_moe.VERSION
SRC_CHECKPOINT = (
    "torch/utils/checkpoint.py::_checkpoint_without_reentrant_generator (_NoopSaveInputs keeps "
    f"the block input); torchtitan {VERSION} distributed/activation_checkpoint.py::FullAC"
)
SRC_SAC = (
    f"torchtitan {VERSION} distributed/activation_checkpoint.py::SelectiveAC._wrap_block "
    "(MUST_SAVE: the save ops' outputs, every second mm/linear recomputed) and "
    "_get_default_save_ops; torch/utils/checkpoint.py::_CachingTorchDispatchMode keeps each "
    "MUST_SAVE output"
)


def _matmuls(arch: Architecture, *, fused_qkv: bool, moe: bool) -> list[tuple[str, int]]:
    """The block's matmuls SelectiveAC counts (`meta["forward_mm_count"]`, restarted per
    block), in the order its forward runs them, with their output widths. `moe`: the block's
    feed-forward half is a MoE, whose router gate SelectiveAC recomputes uncounted
    (`force_recompute_mm_shapes_by_fqns=["moe.router.gate"]`) with every other mm whose
    weight has the gate's shape, [experts, hidden] (`_wrap_block` matches by shape: MLA's
    wq / wq_a or wkv_a, or the shared experts' w1 and w3, when their width equals the expert
    count); the grouped mms are not mm ops (memplan.model.stacks.torchtitan_moe.SRC_SAC)."""
    h, a, kv, d = kernels.attention_dims(arch)
    if arch.model_type == torchtitan_moe.DEEPSEEK_V3:
        attn = torchtitan_mla.matmuls(arch)
    else:
        qkv = (
            [("attention.wqkv", h, (a + 2 * kv) * d)]
            if fused_qkv
            else [
                ("attention.wq", h, a * d),
                ("attention.wk", h, kv * d),
                ("attention.wv", h, kv * d),
            ]
        )
        attn = [*qkv, ("attention.wo", a * d, h)]
    if moe:
        gate = (h, arch.num_experts)
        counted = [*attn, *torchtitan_moe.shared_matmuls(arch)]
        return [(name, out) for name, i, out in counted if (i, out) != gate]
    inter = arch.intermediate_size
    dense = [
        *attn,
        ("feed_forward.w1", h, inter),
        ("feed_forward.w3", h, inter),
        ("feed_forward.w2", inter, h),
    ]
    return [(name, out) for name, _, out in dense]


def _selective_op(
    arch: Architecture, st: Setting, core: attention.Core | None, *, fused_qkv: bool, moe: bool
) -> list[Saved]:
    """What a block under SelectiveAC holds after its forward (SRC_SAC): the checkpoint's
    input, the outputs of the odd-numbered matmuls (1st, 3rd, ...: `forward_mm_count % 2 == 1`)
    and, on CUDA, every output of the flash attention op
    (`aten._scaled_dot_product_flash_attention` is in torch._functorch.partitioners.
    get_default_op_list().compute_intensive_ops): out, logsumexp and the philox state. The CPU
    kernel, `_scaled_dot_product_flash_attention_for_cpu`, is in neither list: recomputed."""
    t = st.tokens
    kept = [_block_input(arch, st)]
    for i, (name, width) in enumerate(_matmuls(arch, fused_qkv=fused_qkv, moe=moe), start=1):
        if i % 2 == 1:
            kept.append(
                kernels.saved(f"{name}.output", (t, width), st.matmul, "MUST_SAVE", SRC_SAC)
            )
    if core is None:
        kept += torchtitan_mla.selective_kept(arch, st)
    elif st.device == "cuda":
        kept += [
            kernels.saved(c.name, c.shape, c.dtype, "MUST_SAVE", SRC_SAC)
            for c in (*core.core, *core.output)
            if c.name in ("attn.output", "attn.logsumexp", "attn.rng_state", "attn.unused")
        ]
    if moe:
        kept += torchtitan_moe.selective_kept(arch, st)
    return kept


def _block_input(arch: Architecture, st: Setting) -> Saved:
    shape = (st.batch, st.sequence, arch.hidden_size)
    return kernels.saved("checkpoint.hidden_states", shape, st.stream, "Noop", SRC_CHECKPOINT)


def layer_blocks(
    arch: Architecture,
    st: Setting,
    n: int,
    name: str,
    layer: list[Saved],
    core: attention.Core | None,
    *,
    moe: bool,
    fused_qkv: bool,
) -> list[Block]:
    """`n` blocks of one kind (`moe`: MoE feed-forward) under `st`'s checkpointing: `layer` is
    what one block saves without checkpointing, `core` its SDPA core (None for MLA's math
    kernel; memplan.model.stacks.torchtitan._layer)."""
    if st.checkpointing == "full":
        ckpt = checkpointed_layers(n, st.checkpoint_every)
        out = [
            Block(
                name=name,
                count=ckpt,
                tensors=(_block_input(arch, st),),
                recompute=tuple(layer),
                layered=True,
            )
        ]
        if n - ckpt:
            out.append(Block(name=name, count=n - ckpt, tensors=tuple(layer), layered=True))
        return out
    if st.checkpointing == "selective-op":
        kept = _selective_op(arch, st, core, fused_qkv=fused_qkv, moe=moe)
        held = {k.name for k in kept}
        # Backward re-runs the block; the cached outputs are reused, the rest made again.
        again = tuple(x for x in layer if x.name not in held and x.name != "attn.output")
        return [Block(name=name, count=n, tensors=tuple(kept), recompute=again, layered=True)]
    return [Block(name=name, count=n, tensors=tuple(layer), layered=True)]


def checkpointed_layers(num_layers: int, every: int) -> int:
    """Blocks torchtitan's layer SAC checkpoints: it counts the blocks it wraps from 1 and
    checkpoints block `count % every == 0` (9dec370 parallelize_llama.py::
    _apply_ac_to_transformer_block: `ptd_checkpoint_wrapper._count += 1; if not ac_freq or
    _count % ac_freq == 0`), i.e. layers every-1, 2 x every - 1, ...: num_layers // every."""
    return num_layers // every
