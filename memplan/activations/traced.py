"""One micro-batch's activations from traced profiles (models without a hand rule) under
tensor, sequence, context and expert parallelism, as the hand rules split theirs.
memplan.activations.micro_batch dispatches here."""

from __future__ import annotations

from dataclasses import replace

from memplan.activations.saved import FINETUNE_PARALLEL, from_profile
from memplan.config.finetune import FinetuneSpec
from memplan.memo import IdentityMemo
from memplan.model import profile
from memplan.model.forward.tensors import Activations, Setting
from memplan.model.inventory import Architecture, Inventory
from memplan.states.layout import Layout


def tensor_parallel_profile(
    inventory: Inventory, arch: Architecture, st: Setting, lay: Layout, ft: FinetuneSpec
) -> Activations:
    """A model without a hand rule on one TP and CP rank, as the hand rules do it: the
    profile traced for the rank's slice (memplan.verify.trace.tp.local_config, the profile's
    `tensor` and `vocab_rows`; the whole model's at TP 1) at sequence / CP (layout.
    local_setting: ring attention saves the SDPA's tensors at the local length), the whole
    vocabulary's head and loss from the TP-1 profile without loss_parallel under DTensor,
    sequence parallelism splitting what the slice leaves as wide as the TP-1 profile
    (memplan.activations.layout.split_traced; under DTensor never inside a MoE block or an MLA
    attention, which torchtitan's plan runs on the all-gathered sequence: layout.
    gathered_blocks), and the layout's communication buffers. With
    EP > 1 as over a TP-1 profile (EP_OVER_PROFILE: dropless routing, grouped_mm experts whose
    saved tensors hold per rank)."""
    from memplan.activations import layout

    rows = layout.local_architecture(arch, lay).vocab_size if lay.tensor > 1 else 0
    local_p = profile.serving(inventory.profiles, st, tensor=lay.tensor, vocab_rows=rows)
    whole_p = profile.serving(inventory.profiles, st)
    if local_p is None:
        return layout.refused(
            f"activations from a traced profile under tensor parallelism need the profile of "
            f"one TP rank's slice (tensor {lay.tensor}, {rows} vocabulary rows), not traced: "
            "with torch and transformers installed `memplan estimate` and `plan` trace it"
        )
    why = layout.check(arch, st, lay)
    if why:
        return layout.refused(why)
    if ft.method != "full" or ft.freeze:
        return layout.refused(FINETUNE_PARALLEL)
    needs_whole = lay.sequence_parallel or (
        lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss
    )
    if needs_whole and whole_p is None:
        return layout.refused(
            "activations from a traced profile under sequence parallelism or without "
            "loss_parallel need the whole model's profile beside the TP slice's, not traced"
        )
    if lay.expert > 1 and not (
        lay.expert_capacity_factor is None and local_p.experts == "grouped_mm"
    ):
        return layout.refused(EP_REFUSED)
    if local_p.head != "lm":
        return layout.refused(
            f"activations of a {local_p.head} head from a traced profile are not split for "
            "tensor parallelism (memplan slices language-model heads only)"
        )
    st = layout.local_setting(st, lay)  # CP: one rank's sequence / CP tokens, as the rules
    local = _sliced(local_p, whole_p if needs_whole else None, arch, st, lay)
    notes = (EP_OVER_PROFILE,) if lay.expert > 1 else ()
    return replace(local, buffers=layout.buffers(arch, st, lay), notes=(*local.notes, *notes))


def _sliced(
    local_p: profile.Profile,
    whole_p: profile.Profile | None,
    arch: Architecture,
    st: Setting,
    lay: Layout,
) -> Activations:
    """The saved tensors of `tensor_parallel_profile` (its checks passed; `st` at the rank's
    own sequence, layout.local_setting): the slice's profile read, its head and loss from the
    whole model's `whole_p` where the layout needs them, sequence parallelism applied. Kept
    per profile objects, setting and layout without its expert degree, which none of this
    reads: plan's layouts at each expert degree share it (DeepSeek-V3 on 2,048 GPUs: 1,435
    calls, 211 distinct)."""
    lay = replace(lay, expert=1, expert_capacity_factor=None)
    key = (arch.num_layers, st, lay)  # _read reads the layer count of `arch`
    hit = _SLICED.get((local_p, whole_p), key)
    if hit is not None:
        return hit
    from memplan.activations import layout

    local = _read(local_p, arch, st)
    # the TP-1 profile's tensors serve only these two (needs_whole)
    full = _read(whole_p, arch, st) if whole_p is not None else local
    if lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss:
        # The head (final norm, the LM head's input) and the loss are as wide as the hidden
        # size and the vocabulary, never the sliced heads or MLP: the TP-1 profile's are the
        # slice's with the whole vocabulary (the rule's `whole`; tests/test_profile_tp.py).
        local = layout.whole_vocabulary_loss(local, full)
    if lay.sequence_parallel:
        local = layout.split_traced(full, local, st, lay, local_p.token_major())
    return _SLICED.put((local_p, whole_p), key, local)


_SLICED: IdentityMemo[Activations] = IdentityMemo(512)
_READ: IdentityMemo[Activations] = IdentityMemo(512)


def _read(traced: profile.Profile, arch: Architecture, st: Setting) -> Activations:
    """`saved.from_profile`, kept per profile object, layer count and setting: plan's layouts read
    the same few slices at the same few settings thousands of times (a profile holds a dict,
    so it is keyed by identity: IdentityMemo)."""
    key = (arch.num_layers, st)
    hit = _READ.get((traced,), key)
    return hit if hit is not None else _READ.put((traced,), key, from_profile(traced, arch, st))


EP_REFUSED = (
    "activations from a traced profile are split over experts with dropless routing of "
    "transformers' grouped_mm experts only (no expert_capacity_factor)"
)
EP_OVER_PROFILE = (
    "expert parallelism over a traced profile: on balanced dropless routing a rank's experts "
    "receive top_k x tokens (token, expert) pairs, the rows the traced grouped_mm experts save "
    "whatever the routing, so the profile's tensors hold per rank (memplan.activations.layout."
    "expert_pairs); tensors sized by the expert count (the grouped GEMM's [E] offsets) are "
    "counted whole."
)


def expert_parallel_only(traced: profile.Profile, lay: Layout) -> bool:
    """A profile serves a layout split only over experts, with dropless routing, when its
    experts ran transformers' grouped_mm (sizes independent of the routing)."""
    return (
        lay.expert > 1
        and lay.tensor == 1
        and lay.context == 1
        and lay.expert_capacity_factor is None
        and traced.experts == "grouped_mm"
    )
