"""What a torch.compile'd torchtitan 0.3.0 dense block (Llama 3, Qwen3) keeps for backward on one
rank of tensor parallelism, with sequence parallelism on and off (`training.compile` with
`parallelism.tensor` > 1, checkpointing none or selective-op).

How torchtitan 0.3.0 lays it out and compiles it: models/llama3/parallelize.py::
parallelize_llama (Qwen3: models/qwen3/parallelize.py::parallelize_qwen3) runs
`model.parallelize(parallel_dims)` with the sharding configs of models/llama3/sharding.py::
set_llama3_sharding_config (models/qwen3/sharding.py::set_qwen3_sharding_config), i.e.
models/common/decoder_sharding.py: wqkv, w1, w3 colwise (weight Shard(0)), wo, w2 rowwise
(weight Shard(1), output Partial, then reduce-scattered to the sequence shard under SP, all-
reduced without), the norms on the sequence shard under SP, the attention's and the FFN's
input all-gathered to Replicate; then activation checkpointing; then distributed/compile.py::
apply_compile: each TransformerBlock whole, `fullgraph=True`. AOTAutograd desugars the
DTensors to their local tensors, so the compiled block is one graph of local tensors with
the collectives in it (torch 2.13 _c10d_functional ops), and the min-cut partitioner
(torch/_functorch/partitioners.py::min_cut_rematerialization_partition, which never
recomputes a collective) decides what each rank keeps.

What it keeps, traced on 2 and 4 gloo ranks (tests/compile_tp_probe.py: torchtitan's real block
laid out by its own sharding configs, forward + loss + backward run; benchmarks/compile_tp.py,
results/compile-tp.json), per rank, with t = batch x sequence tokens, t_sp = batch x sequence /
TP under SP (t without), a / TP query heads, g / TP key/value heads, f / TP FFN width, w the
compute dtype:

checkpointing none (`layer`): the single-rank set (memplan.model.forward.compiled.llama_layer)
on the rank's heads and FFN slice, except

    the block's input, attention_norm's rstd, ffn_norm's rstd: on t_sp tokens (the residual
        stream's shard);
    attention_norm's and ffn_norm's outputs [t, h]: under SP the all-gathers' outputs (wqkv's,
        w1's / w3's input), kept: a collective is never recomputed;
    in place of wo's output [t, h], the residual sum x + wo's reduced output [t_sp, h]
        (ffn_norm's input): wo's reduction stands between them and cannot be recomputed;
    without SP, two tensors DTensor's backward of the row-parallel wo reads, gathered in the
        forward graph: the attention output all-gathered over the heads [t, a x d] and wo's
        weight all-gathered [h, a x d] (the whole weight, on every rank: its size does not
        depend on the tokens; traced at 32 and 128 tokens, TP 2 and 4).

checkpointing selective-op (`op_sac_layer`, torchtitan's SelectiveAC: every second mm
recomputed, the default save ops MUST_SAVE): the single-rank set (compiled.op_sac_layer) on the
rank's slice, the input on t_sp tokens, and

    under SP, wo's reduce-scatter output [t_sp, h] (MUST_SAVE: _get_default_save_ops lists
        _c10d_functional.reduce_scatter_tensor; w2's, also MUST_SAVE, is read by no backward:
        dropped);
    without SP, w2's output [t, h] (mm 5, the Partial sum before its all-reduce) and the same
        two all-gathered tensors as under none.

Qwen3's q_norm / k_norm (per head, on the rank's Shard(2) heads) add what they add on one rank
(compiled.llama_layer(qk_norm=True)) on a / TP and g / TP heads under none, nothing under
selective-op. Under full checkpointing torch 2.13 itself failed on gloo ranks (`FULL_AC_FAILS`):
modelled as eager (each block keeps its input, as before) with that failure as a note, since
torchtitan's published Llama 3.1 70B / 405B rows ran compile + TP + FullAC (9dec370, with Dec
2024's torch). Qwen3-MoE's block at expert parallelism 1: memplan.model.forward.compiled_moe_tp
(wired here, `_moe_kept`). Not traced, so refused: MLA and other MoE blocks (DeepSeek-V3,
gpt-oss) under TP, Qwen3-MoE under EP x TP compiled or with an expert width TP does not divide,
torchao Float8, context parallelism with TP, TP with fewer key/value heads than ranks
(torchtitan 0.3.0 fails there itself: `KV_HEADS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from memplan.model.forward import compiled
from memplan.model.forward.kernels import saved
from memplan.model.forward.tensors import Activations, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan_moe


class Layout(Protocol):
    """What these rules read of a layout (memplan.states.layout.Layout, a layer above this
    one: the model layer does not import it)."""

    @property
    def tensor(self) -> int: ...
    @property
    def expert(self) -> int: ...
    @property
    def context(self) -> int: ...
    @property
    def sequence_parallel(self) -> bool: ...


SRC = (
    f"{compiled.SRC}; torchtitan 0.3.0 distributed/compile.py::apply_compile, "
    "models/llama3/sharding.py::set_llama3_sharding_config, models/qwen3/sharding.py::"
    "set_qwen3_sharding_config, models/common/decoder_sharding.py (colwise_config, "
    "rowwise_config, norm_config, set_gqa_attention_sharding) with the DTensor backend; torch "
    "2.13 _c10d_functional all_gather_into_tensor / reduce_scatter_tensor / all_reduce in the "
    "graph (traced on gloo ranks: tests/compile_tp_probe.py, benchmarks/compile_tp.py)"
)
SRC_SAC = (
    f"{SRC}; torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops "
    "(_c10d_functional.reduce_scatter_tensor.default: MUST_SAVE)"
)
KV_HEADS = (
    "fewer key/value heads than tensor-parallel ranks: torchtitan 0.3.0's fused wqkv view "
    'fails under compile (Dynamo: "Cannot unflatten unevenly sharded tensor: output '
    'dimension 0 (size 2) is not evenly divisible by mesh dimension 0 (size 4)", 2 k/v heads '
    "at TP 4, traced)"
)
FULL_AC_FAILS = (
    "training.compile with full checkpointing under tensor parallelism: modelled as eager (each "
    "block keeps its input), but on 2 gloo ranks torch 2.13 itself failed there: its "
    "AOTAutograd runtime wrapper (_functorch/_aot_autograd/runtime_wrappers.py::"
    '_AutogradSavedState.save_from_forward) raises "AssertionError: expected all '
    "tensors_saved_with_vc_check to be Tensors\" in the compiled block's forward (the TP "
    "DeviceMesh the partition saves for the backward's collectives stands before a saved "
    "tensor; run on 2 gloo ranks with sequence parallelism on and off: tests/compile_tp_probe.py, "
    "as compiled_ep.FULL_AC_FAILS under EP); torchtitan's published Llama 3.1 70B / 405B rows "
    "ran it with the torch of Dec 2024, so it stays modelled, with this warning"
)
"""The note on FullAC + compile under TP (traced: benchmarks/compile_tp.py): not refused, since
torchtitan's published rows (9dec370, Dec 2024's torch) ran that layout."""
TRACED_MODEL_TYPES = ("llama", "qwen3")
"""torchtitan models whose compiled dense block is traced under TP (Llama 3, dense Qwen3)."""
MOE_MODEL_TYPE = "qwen3_moe"
"""torchtitan's MoE model whose compiled block is traced under TP at expert parallelism 1
(memplan.model.forward.compiled_moe_tp)."""


def _moe_inter(arch: Architecture) -> int:
    """Each routed expert's hidden width (Hugging Face's moe_intermediate_size)."""
    return int(arch.extra.get("moe_intermediate_size", arch.intermediate_size))


def _dims(
    *, batch: int, seq: int, heads: int, kv_heads: int, inter: int, tp: int, sp: bool
) -> tuple[int, int, int, int, int]:
    """(tokens, tokens on the residual stream's shard, local q heads, local kv heads, local
    FFN width) of one TP rank."""
    t = batch * seq
    return t, batch * (seq // tp) if sp else t, heads // tp, kv_heads // tp, inter // tp


def _on_rank(
    one_rank: Callable[..., tuple[Saved, ...]],
    *,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    inter: int,
    tp: int,
    sequence_parallel: bool,
    **rest: Any,
) -> tuple[int, int, tuple[Saved, ...]]:
    """(tokens, tokens on the residual stream's shard, `one_rank`'s compiled set at this TP
    rank's heads, k/v heads and FFN width): the set the TP rules start from."""
    t, ts, a, g, f = _dims(
        batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, inter=inter, tp=tp,
        sp=sequence_parallel,
    )  # fmt: skip
    local = one_rank(batch=batch, seq=seq, heads=a, kv_heads=g, inter=f, **rest)
    return t, ts, local


def _gathered(
    *, t: int, hidden: int, heads: int, head_dim: int, dtype: str, src: str
) -> tuple[Saved, ...]:
    """Without SP: the attention output all-gathered over the heads [t, a x d] and wo's weight
    all-gathered [h, a x d], which the backward of the row-parallel wo reads (traced)."""
    return (
        saved("attention.sdpa_out_gathered", (t, heads * head_dim), dtype, compiled.BY, src),
        saved("attention.wo.weight_gathered", (hidden, heads * head_dim), dtype, compiled.BY, src),
    )


def layer(
    *,
    qk_norm: bool = False,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    dtype: str,
    tp: int,
    sequence_parallel: bool,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 dense block on one TP rank, no checkpointing (module
    docstring); `heads`, `kv_heads`, `inter` are the whole model's."""
    t, ts, local = _on_rank(
        compiled.llama_layer, qk_norm=qk_norm, batch=batch, seq=seq, hidden=hidden,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, inter=inter, dtype=dtype, tp=tp,
        sequence_parallel=sequence_parallel,
    )  # fmt: skip
    shard = {
        "input": (ts, hidden),
        "attention_norm.rstd": (ts, 1),
        "ffn_norm.rstd": (ts, 1),
    }
    out: list[Saved] = []
    for s in local:
        if s.name == "attention.wo_out":
            out.append(saved("attention.residual", (ts, hidden), dtype, compiled.BY, SRC))
        else:
            out.append(replace(s, shape=shard.get(s.name, s.shape), source=SRC))
    if not sequence_parallel:
        out += _gathered(t=t, hidden=hidden, heads=heads, head_dim=head_dim, dtype=dtype, src=SRC)
    return tuple(out)


def op_sac_layer(
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    dtype: str,
    tp: int,
    sequence_parallel: bool,
) -> tuple[Saved, ...]:
    """One compiled torchtitan 0.3.0 dense block on one TP rank under SelectiveAC (module
    docstring); `heads`, `kv_heads`, `inter` are the whole model's."""
    t, ts, local = _on_rank(
        compiled.op_sac_layer, batch=batch, seq=seq, hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, inter=inter, dtype=dtype, tp=tp,
        sequence_parallel=sequence_parallel,
    )  # fmt: skip
    out = [
        replace(s, shape=(ts, hidden) if s.name == "input" else s.shape, source=SRC_SAC)
        for s in local
    ]
    if sequence_parallel:
        out.append(saved("attention.wo.reduce_scatter", (ts, hidden), dtype, compiled.BY, SRC_SAC))
    else:
        out.append(saved("feed_forward.w2_out", (t, hidden), dtype, compiled.BY, SRC_SAC))
        out += _gathered(
            t=t, hidden=hidden, heads=heads, head_dim=head_dim, dtype=dtype, src=SRC_SAC
        )
    return tuple(out)


def uncovered(arch: Architecture, st: Setting, lay: Layout) -> str:
    """Why the traced TP block does not describe this compiled layout, or '' (TP 1 and
    compile off are not this rule's; full checkpointing is modelled as eager, with
    FULL_AC_FAILS as a note: `apply`)."""
    if not st.compile or lay.tensor == 1 or st.checkpointing == "full":
        return ""
    moe = arch.model_type == MOE_MODEL_TYPE and lay.expert == 1
    if not moe and (arch.num_experts or arch.model_type not in TRACED_MODEL_TYPES):
        return (
            f"model_type {arch.model_type!r} (traced under TP: torchtitan's dense "
            f"{' and '.join(TRACED_MODEL_TYPES)} blocks and its Qwen3-MoE block at expert "
            "parallelism 1; MLA blocks are not)"
        )
    if moe and _moe_inter(arch) % lay.tensor:
        return (
            f"moe_intermediate_size {_moe_inter(arch)} that TP {lay.tensor} does not divide "
            "(traced: even expert widths)"
        )
    if moe:
        from memplan.model.forward import compiled_moe_tp

        misaligned = compiled_moe_tp.grouped_mm_misaligned(
            moe_inter=_moe_inter(arch), tp=lay.tensor
        )
        if misaligned:
            return misaligned
        if lay.tensor > compiled_moe_tp.NONE_TRACED_TP and st.checkpointing == "none":
            return compiled_moe_tp.NONE_ABOVE_TP2
    if st.float8 != "none":
        return "torchao Float8 (not traced under TP)"
    if lay.context > 1:
        return "context parallelism with TP (not traced)"
    if arch.num_key_value_heads % lay.tensor:
        return KV_HEADS
    return ""


def apply(acts: Activations, arch: Architecture, st: Setting, lay: Layout) -> Activations:
    """`acts` (one TP rank's activations as the eager TP rule builds them from the compiled
    single-rank block) with each decoder block's kept set replaced by this rank's traced
    compiled set (`layer`, `op_sac_layer`); unchanged for full checkpointing, TP 1 or compile
    off. `arch` is the whole model, `st` the rank's local setting."""
    if not (st.compile and lay.tensor > 1) or not acts.modelled:
        return acts
    if st.checkpointing == "full":
        return replace(acts, notes=(*acts.notes, FULL_AC_FAILS + "."))
    dims: dict[str, Any] = {
        **compiled.block_dims(arch, st),
        "tp": lay.tensor,
        "sequence_parallel": lay.sequence_parallel,
    }
    if arch.model_type == MOE_MODEL_TYPE:
        kept = _moe_kept(arch, st, dims)
    elif st.checkpointing == "selective-op":
        kept = op_sac_layer(**dims)
    else:
        kept = layer(qk_norm=arch.model_type in compiled.QK_NORM_MODEL_TYPES, **dims)
    blocks = tuple(replace(b, tensors=kept) if b.name == "layers" else b for b in acts.blocks)
    per_block = sum(s.bytes for s in kept)
    note = (
        f"training.compile under tensor parallelism {lay.tensor}"
        + (" with sequence parallelism" if lay.sequence_parallel else "")
        + f": each block keeps what Inductor's min-cut partition keeps on this rank "
        f"({per_block:,} B per block; memplan.model.forward.compiled_tp, traced)."
    )
    notes = tuple(n for n in acts.notes if not n.startswith("training.compile: each block"))
    return replace(acts, blocks=blocks, notes=(*notes, note))


def _moe_kept(arch: Architecture, st: Setting, dims: dict[str, Any]) -> tuple[Saved, ...]:
    """A compiled Qwen3-MoE block on this TP rank (memplan.model.forward.compiled_moe_tp)."""
    from memplan.model.forward import compiled_moe_tp

    moe = {k: v for k, v in dims.items() if k != "inter"}
    moe["top_k"] = arch.num_experts_per_token
    if st.checkpointing == "selective-op":
        return compiled_moe_tp.op_sac_layer(**moe)
    return compiled_moe_tp.layer(
        **moe,
        experts=arch.num_experts,
        moe_inter=_moe_inter(arch),
        router=torchtitan_moe.router_dtype(st),
    )
