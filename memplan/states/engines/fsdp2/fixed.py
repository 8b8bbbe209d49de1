"""What FSDP2's step buffers take from the groups and the dtypes alone, not from the step's
activations: each group's bytes, HSDP's held all-reduce outputs, the unsharded parameters and
all-gather outputs, and the end of backward's terms (memplan.states.engines.fsdp2.step asks
for them once per layout; plan asks again for every micro-batch and recomputation policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from memplan.memo import IdentityMemo
from memplan.memory import Phase, Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp2.buffers import (
    AG_COPY_OUT,
    AG_KEPT,
    AG_OUT,
    AG_STREAMS,
    ALL_GATHER_STREAM,
    HSDP_HOLD,
    POST_BW,
    PREFETCH,
    RESHARD,
    Fsdp2Bytes,
    OwnDtypes,
    fsdp2_bytes,
    term,
    unsharded_formula,
)
from memplan.states.engines.fsdp2.groups import Fsdp2Group, Fsdp2Groups
from memplan.states.engines.fsdp2.moments import end_terms, reduce_holds_more


@dataclass(frozen=True, slots=True, eq=False)
class Fixed:
    """What `step_buffers` works out from the groups and the dtypes alone, not the step's
    activations (plan asks again for every micro-batch size and recomputation policy of a
    layout): the groups' bytes, HSDP's held outputs, and per end of backward (`at_reduce`,
    end_of_backward) its terms and the unsharded parameters and the head's gradients before
    them."""

    groups: Fsdp2Groups
    world: int
    param: str
    grad: str
    reduce: str
    shard: str
    reshard: bool
    gloo: bool
    widths: tuple[int, int, int, int]
    """dtype_bytes of param, grad, shard and reduce (fsdp2_bytes' order)."""
    root: Fsdp2Bytes
    block: Fsdp2Bytes
    held: tuple[Transient, ...]
    ends: dict[bool, tuple[list[Transient], list[Transient]]] = field(default_factory=dict)

    def end_of_backward(
        self, embedding: Transient | None
    ) -> tuple[bool, list[Transient], list[Transient]]:
        """(at_reduce, its backward_end terms, the unsharded parameters and the head's
        gradients), fresh lists."""
        at_reduce = reduce_holds_more(
            self.groups,
            self.root,
            self.block,
            widths=self.widths,
            gloo=self.gloo,
            embedding=embedding,
        )
        if at_reduce not in self.ends:
            self.ends[at_reduce] = self._end(at_reduce)
        end, before = self.ends[at_reduce]
        return at_reduce, list(end), list(before)

    def _end(self, at_reduce: bool) -> tuple[list[Transient], list[Transient]]:
        groups, g = self.groups, self.widths[1]
        end = end_terms(
            at_reduce,
            groups,
            self.root,
            self.block,
            world=self.world,
            grad=self.grad,
            reduce=self.reduce,
            shard=self.shard,
            gloo=self.gloo,
        )
        # At the embedding's backward the root is still unsharded.
        root_end: tuple[Phase, ...] = () if at_reduce else ("backward_end",)
        before = unsharded(
            groups,
            self.root,
            self.block,
            world=self.world,
            param=self.param,
            reshard=self.reshard,
            end=root_end,
        )
        before += term(
            "fsdp2_unsharded_head_grads",
            groups.head_grads * g,
            ("backward",),
            f"{groups.head_grads:,} elements x {g} B ({self.grad}): the root's gradients "
            "computed before the layers' backward (LM head, final norm), unsharded until the "
            "root's post-backward",
            POST_BW,
        )
        return end, before


_FIXED: IdentityMemo[Fixed] = IdentityMemo(4096)


def fixed_of(
    groups: Fsdp2Groups,
    *,
    world: int,
    param: str,
    grad: str,
    shard: str,
    reshard: bool,
    gloo: bool,
    reduce: str,
    replicate: int,
    own: OwnDtypes,
) -> Fixed:
    """`Fixed` of these arguments, remembered per groups object."""
    key = (world, param, grad, shard, reshard, gloo, reduce, replicate, own)
    hit = _FIXED.get((groups,), key)
    if hit is not None:
        return hit
    p, g, o, r = dtype_bytes(param), dtype_bytes(grad), dtype_bytes(shard), dtype_bytes(reduce)
    root = fsdp2_bytes(groups.root, world, p, g, o, r, own)
    block = fsdp2_bytes(groups.block, world, p, g, o, r, own)
    held = _hsdp_held(groups, block, replicate=replicate, reduce=reduce, shard=shard)
    if held:
        # Each reduced layer keeps its all-reduced output besides its sharded gradients.
        block = replace(block, sharded_grads=block.sharded_grads + block.reduce_out)
    fixed = Fixed(
        groups=groups,
        world=world,
        param=param,
        grad=grad,
        reduce=reduce,
        shard=shard,
        reshard=reshard,
        gloo=gloo,
        widths=(p, g, o, r),
        root=root,
        block=block,
        held=tuple(held),
    )
    return _FIXED.put((groups,), key, fixed)


def _hsdp_held(
    groups: Fsdp2Groups, block: Fsdp2Bytes, *, replicate: int, reduce: str, shard: str
) -> list[Transient]:
    """HSDP's all-reduced outputs still held at the end of backward (HSDP_HOLD): every
    decoder layer's, where the reduce dtype is not the shards'."""
    if replicate <= 1 or reduce == shard:
        return []
    # torchtitan's head group runs its post-backward twice (the output projection's, then
    # the final norm's: _head_group_buffers), the second replacing the first's state, so it
    # keeps only the norm's few elements (not counted).
    return term(
        "hsdp_all_reduce_outputs",
        groups.layers * block.reduce_out,
        ("backward_end",),
        f"{groups.layers} layers x {block.reduce_out:,} B: all-reduced outputs ({reduce}) kept "
        f"until finalize_backward, the sharded gradients being {shard} copies",
        HSDP_HOLD,
    )


def flat_root(root: Fsdp2Bytes, phase: Phase, what: str) -> list[Transient]:
    """The root group's flat all-gather output, on the all-gather stream for a moment as
    `phase` begins (momentary: below the phase's peak, so in no phase point; the between-phase
    excess terms count it where it tops a point)."""
    if root.unsharded <= 0:
        return []
    return [
        Transient(
            name=f"fsdp2_all_gather_output_root_{phase}",
            bytes=root.unsharded,
            phases=(),
            formula=f"{root.unsharded:,} B: {what}",
            source=f"{AG_OUT}; {AG_STREAMS}; {AG_KEPT}",
            stream=ALL_GATHER_STREAM,
            momentary=phase,
        )
    ]


def unsharded(
    groups: Fsdp2Groups,
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    *,
    world: int,
    param: str,
    reshard: bool,
    end: tuple[Phase, ...],
) -> list[Transient]:
    """The unsharded parameters and the flat all-gather outputs, the root's first (alive
    from forward to the backward point, and at `end`)."""
    layers = groups.layers

    def up(g: Fsdp2Group) -> str:
        return unsharded_formula(g, world, param)

    out = term(
        "fsdp2_unsharded_root",
        root.unsharded,
        ("forward", "loss", "backward_start", "backward", *end),
        up(groups.root) + ": the root's all-gathered parameters (from its "
        "pre-forward to its post-forward, again from its pre-backward to its post-backward)",
        f"{AG_COPY_OUT}; {RESHARD}",
    )
    out += flat_root(
        root,
        "forward",
        "the root's flat all-gather output, kept (all_gather_state) until the first layer's "
        "copy-out",
    )
    if reshard:
        out += flat_root(
            root,
            "backward_start",
            "the root's pre-backward all-gather output, freed after its copy-out",
        )
        out += term(
            "fsdp2_unsharded_block",
            block.unsharded if layers else 0,
            ("forward", "backward"),
            up(groups.block) + ": the decoder layer that runs",
            f"{AG_COPY_OUT}; {RESHARD}",
        )
        out += term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward", "loss", "backward_start") + (("backward",) if layers > 1 else ()),
            up(groups.block) + ": one layer's flat all-gather output (the last "
            "layer's, kept until the root's post-forward; in backward the next layer's, "
            "prefetched)",
            f"{AG_OUT}; {AG_KEPT}; {PREFETCH}",
            stream=ALL_GATHER_STREAM,
        )
        return out
    out += term(
        "fsdp2_unsharded_blocks",
        layers * block.unsharded,
        ("forward", "loss", "backward_start", "backward"),
        f"{layers} layers x " + up(groups.block) + ": every layer stays "
        "unsharded from its forward to its post-backward (reshard_after_forward=False)",
        f"{AG_COPY_OUT}; {RESHARD}",
    )
    out += term(
        "fsdp2_all_gather_output",
        block.unsharded if layers else 0,
        ("forward", "loss"),
        up(groups.block) + ": the last layer's flat all-gather output, "
        "kept until the root's post-forward",
        f"{AG_OUT}; {AG_KEPT}",
        stream=ALL_GATHER_STREAM,
    )
    return out
