"""torchtitan's MoE (memplan.model.stacks.torchtitan_moe) under expert parallelism on one rank:
what EP adds to memplan.activations.torchtitan_parallel.micro_batch's rule. Alone, EP is the
whole model's rule at the rank's E / EP experts with the all-to-all's input and output alive
together while it runs (token_dispatch).

Expert parallelism with tensor parallelism (torchtitan's MoE, `expert_tensor_parallel`): EP
borrows its ranks from data x TP (0.3.0 distributed/parallel_dims.py: the sparse mesh
(efsdp, ep) over the same ranks as the dense (fsdp, tp), efsdp = fsdp x TP / EP), and with
enable_ep the MoE keeps its input on the sequence shard (SRC_EP_TP): the router, the
all-to-all dispatch and the grouped experts run on sequence / TP tokens, with E / EP experts
that TP does not split; DeepSeek-V3's shared experts gather the whole sequence for themselves
(`_ep_tp_moe`); the attention and the rest are the TP rule's. Measured equal on 2 and 4 gloo
ranks (Qwen3-MoE at TP 2 x EP 2, TP 2 x EP 4, TP 4 x EP 2, TP 4 x EP 4; DeepSeek-V3 at TP 2 x
EP 2 and 4; benchmarks/torchtitan_moe_ep.py). Without sequence parallelism torchtitan 0.3.0
itself fails (refused with its error).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.activations import layout
from memplan.memory import Transient
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan, torchtitan_moe
from memplan.precision import dtype_bytes
from memplan.states.layout import Layout

EP_NOTE = (
    "expert parallelism {ep} as torchtitan runs it (AllToAllTokenDispatcher): balanced routing "
    "assumed, every rank receiving tokens x top_k rows (torchtitan's _debug_force_load_balance "
    "routing, measured); real routing varies the received rows per rank and step."
)


SRC_EP_TP = (
    f"torchtitan {torchtitan.VERSION} models/common/moe_sharding.py::_moe_sharding_config, "
    "_router_sharding_config, _routed_experts_sharding_configs (enable_ep True: the MoE's "
    "input Shard(1) over TP, the router and the dispatcher on the rank's token shard, the "
    "routed experts expert_param_placement_sparse: Shard(0) over `ep` only, not split over "
    "TP); models/common/token_dispatcher.py::AllToAllTokenDispatcher.dispatch ('With SP, "
    "x_TD/topk_scores_TK/topk_expert_ids_TK are already the local SP shard')"
)
EP_TP_NOTE = (
    "expert parallelism {ep} with tensor parallelism {tp} as torchtitan runs it: the router "
    "and the all-to-all dispatch on each TP rank's 1 / {tp} of the tokens, the routed experts "
    "whole (not split over TP), balanced routing assumed (memplan.activations."
    "torchtitan_parallel)."
)


def token_dispatch(arch: Architecture, st: Setting) -> Transient:
    """torchtitan's EP all-to-all on one rank, per MoE layer while it runs (read from the
    source, not measured: a transient, not a saved tensor): the reordered tokens [N, D] sent
    and the [R, D] received (R = N, balanced) alive together in dispatch, and the unpermuted
    [R, D] with the [N, D] returned in combine, in the stream dtype. The same name and bytes as
    the hand rules' Megatron dispatcher term (memplan.activations.layout.buffers)."""
    pairs = st.tokens * arch.num_experts_per_token
    return Transient(
        name="moe_token_dispatch",
        bytes=2 * pairs * arch.hidden_size * dtype_bytes(st.stream),
        phases=("forward", "backward"),
        formula=f"2 x [{pairs}, {arch.hidden_size}] (the tokens sent and received by the "
        "all-to-all)",
        source=f"{torchtitan_moe.SRC_EP}; torch 2.13 _functional_collectives.py::all_to_all_single",
    )


def expert_parallel(
    arch: Architecture, st: Setting, lay: Layout, *, fused_qkv: bool
) -> Activations:
    """Expert parallelism without TP (`st` the rank's local setting): the whole model's rule
    with this rank's E / EP experts (memplan.model.stacks.torchtitan_moe, SRC_EP), and the
    all-to-all's input and output alive together while it runs (token_dispatch)."""
    ep_st = replace(st, local_experts=arch.num_experts // lay.expert)
    local = torchtitan.saved(arch, ep_st, fused_qkv=fused_qkv)
    if local.modelled:
        ep_notes = (*local.notes, EP_NOTE.format(ep=lay.expert))
        local = replace(local, notes=ep_notes, buffers=(token_dispatch(arch, ep_st),))
    return local


_SHARED = "moe.shared_experts."


def _ep_tp_moe(
    whole: tuple[Saved, ...], shard: tuple[Saved, ...], st: Setting, hidden: int
) -> list[Saved]:
    """A MoE block's tensors under EP x TP: the router's, the dispatcher's and the routed
    experts' of the token shard (`shard`), and DeepSeek-V3's shared experts as TP alone runs
    them (`whole`: moe_sharding.py::_shared_experts_sharding_configs gathers their input to
    Replicate, w1 / w3 column-parallel, w2 row-parallel). That gathered [tokens, hidden] input
    is a storage of its own (TP alone shares it with the router's gate input), saved by w1 and
    w3: added where the block's whole saved set is (the router's gate input is in it)."""
    routed = [t for t in shard if t.name.startswith("moe.") and not t.name.startswith(_SHARED)]
    shared = [t for t in whole if t.name.startswith(_SHARED)]
    names = {t.name for t in (*routed, *shared)}
    if shared and "moe.router.gate.input" in names and f"{_SHARED}w1.input" not in names:
        gathered = kernels.saved(
            f"{_SHARED}w1.input", (st.tokens, hidden), st.stream, "MmBackward0", SRC_EP_TP
        )
        shared = [gathered, *shared]
    return routed + shared


def _moe_first(tensors: tuple[Saved, ...], moe: list[Saved]) -> tuple[Saved, ...]:
    """`tensors` with its MoE tensors (named `moe.`) replaced by `moe`, where the first was."""
    at = next((i for i, t in enumerate(tensors) if t.name.startswith("moe.")), None)
    if at is None:
        return tensors
    rest = tuple(t for t in tensors if not t.name.startswith("moe."))
    return (*rest[:at], *moe, *rest[at:])


def expert_tensor_parallel(
    arch: Architecture, st: Setting, lay: Layout, *, fused_qkv: bool
) -> Activations:
    """EP x TP (SRC_EP_TP), measured on 4 gloo ranks (tests/torchtitan_ep_probe.py): the
    attention, the norms, the embedding and the loss are the TP rule's (with sequence
    parallelism, torchtitan's default); the MoE half is the EP rule on the rank's token
    shard (sequence / TP tokens: the MoE's input stays Shard(1), so the router's gate saves
    the shard, not an all-gathered sequence) with E / EP whole experts; its output is already
    the sequence shard (no reduce-scatter). The all-to-all's transients are of the shard."""
    if not lay.sequence_parallel:
        why = (
            "torchtitan 0.3.0 cannot run its MoE under expert x tensor parallelism without "
            "sequence parallelism: models/common/moe_sharding.py::_routed_experts_sharding_"
            "configs asks the routed experts' Shard(1) output for Partial, and torch 2.13's "
            'DTensor.redistribute raises "RuntimeError: Can not redistribute from S(1) to '
            'P(sum), redistributing to Partial is for internal use only!" (run on 4 gloo '
            "ranks); turn parallelism.sequence_parallel on (torchtitan's default)"
        )
        return replace(layout.refused(why), implementation="torchtitan")
    ep_st = replace(st, local_experts=arch.num_experts // lay.expert)
    tp_lay = replace(lay, expert=1)
    extra = {**layout.local_architecture(arch, lay).extra}
    extra["moe_intermediate_size"] = arch.extra.get("moe_intermediate_size")
    whole_experts = replace(layout.local_architecture(arch, lay), extra=extra)
    shard = replace(ep_st, sequence=ep_st.sequence // lay.tensor)
    # The TP rule this composes with (it dispatches EP x TP here: imported here, not above).
    from memplan.activations.torchtitan_parallel import micro_batch

    local = micro_batch(arch, st, tp_lay, fused_qkv=fused_qkv)
    if not local.modelled:
        return local
    ours = torchtitan.saved(whole_experts, shard, fused_qkv=fused_qkv, whole=arch)
    if not ours.modelled:
        # What the rule refuses at this rank's E / EP experts (compiled FullAC under EP, ...).
        return ours
    blocks = []
    for b in local.blocks:
        mine = ours.block(b.name)
        if not b.name.startswith("layers") or mine is None:
            blocks.append(b)
            continue
        moe = _ep_tp_moe(b.tensors, mine.tensors, st, arch.hidden_size)
        again = _ep_tp_moe(b.recompute, mine.recompute, st, arch.hidden_size)
        tensors = _moe_first(b.tensors, moe)
        if moe and st.checkpointing == "selective-op":
            # No reduce-scatter at the routed experts' output: it is the sequence shard
            # already (the shared experts' own stays).
            tensors = tuple(t for t in tensors if t.name != "feed_forward.w2.reduce_scatter")
        blocks.append(replace(b, tensors=tensors, recompute=_moe_first(b.recompute, again)))
    notes = (*local.notes, EP_TP_NOTE.format(ep=lay.expert, tp=lay.tensor))
    return replace(
        local,
        blocks=tuple(blocks),
        notes=notes,
        buffers=(*local.buffers, token_dispatch(arch, shard)),
    )
