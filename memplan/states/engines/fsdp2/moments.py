"""torch FSDP2's moments between the timeline's phase points: a layer's all-gather in forward,
the root's pre-backward all-gather, and the decoder layers' backward with their
reduce-scatters, each counted as its excess over the nearest point; and the end of backward,
the embedding's backward or the root's reduce-scatter, whichever holds more
(memplan.states.engines.fsdp2.step puts them in the step)."""

from __future__ import annotations

from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.base import StepActivations
from memplan.states.engines.fsdp2.buffers import (
    AG_COPY_OUT,
    AG_KEPT,
    AG_OUT,
    FSDP2_SRC,
    GLOO_RS,
    POST_BW,
    POST_BW_HOOK,
    PREFETCH,
    REDUCE_SCATTER_STREAM,
    RS_CAST,
    RS_DTYPE,
    RS_IN,
    RS_LAST,
    RS_OUT,
    Fsdp2Bytes,
    term,
)
from memplan.states.engines.fsdp2.groups import TITAN_WRAP, Fsdp2Groups


def between_phases(
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    *,
    layers: int,
    reshard: bool,
    layer: int,
    acts: StepActivations,
    head: Fsdp2Bytes | None = None,
) -> list[Transient]:
    """FSDP2 moments between the timeline's phase points, each counted at the nearest point
    where it holds more than that point, as the excess over it (the bytes the point holds
    and the moment does not are subtracted; a term only where the excess is positive):

    - forward: a layer's all-gather and copy-out, while the previous group's flat
      all-gather output is still kept (AG_KEPT) and this layer and the later ones have
      saved nothing yet (with ZeRO-2 the later layers are not gathered yet either). Layer j
      holds more than the forward point by the previous output - (L - j) layers' saved
      tensors - the forward working set (- (L - 1 - j) layers with ZeRO-2): largest at the
      first layer (the previous group is the root) or at the last one;
    - backward_start (ZeRO-3): the root's pre-backward all-gather, before the loss gradient
      (the root was resharded after forward).
    With torchtitan's head group (`head`, TITAN_WRAP) the root is the embedding group,
    resharded after its forward (its all-gather output kept as above), and forward has one
    more moment: the head group's all-gather and copy-out after the last layer (its
    all-gather output and parameters, the last layer resharded, its all-gather output still
    held, no forward working set); the root is not gathered again at backward_start.
    The decoder layers' backward is layer_backward."""
    out: list[Transient] = []
    if head is not None:
        layers_only = between_phases(
            root, block, layers=layers, reshard=reshard, layer=layer, acts=acts
        )
        out = [t for t in layers_only if t.name == "fsdp2_all_gather_forward"]
        h_excess = 2 * head.unsharded - (block.unsharded if reshard and layers else 0)
        h_excess -= acts.forward_working_set
        if h_excess <= max([0, *(t.bytes for t in out)]):
            return out
        resharded = f" - {block.unsharded:,} B last layer resharded" if reshard and layers else ""
        return [
            Transient(
                name="fsdp2_all_gather_forward",
                bytes=h_excess,
                phases=("forward",),
                formula=f"at the head group's all-gather: 2 x {head.unsharded:,} B (its "
                f"all-gather output and parameters){resharded} - "
                f"{acts.forward_working_set:,} B forward working set, gone",
                source=f"{TITAN_WRAP}; {AG_OUT}; {AG_COPY_OUT}; {AG_KEPT}",
            )
        ]
    if layers:
        later = 0 if reshard else block.unsharded

        def excess(j: int) -> int:
            kept = root.unsharded if j == 0 else block.unsharded
            return kept - (layers - j) * layer - acts.forward_working_set - (layers - 1 - j) * later

        j = max(sorted({0, layers - 1}), key=lambda i: (excess(i), -i))
        if excess(j) > 0:
            kept = "the root's" if j == 0 else "the previous layer's"
            unsharded = root.unsharded if j == 0 else block.unsharded
            not_yet = (
                f" - {layers - 1 - j} x {block.unsharded:,} B layers not gathered yet"
                if later and layers - 1 - j
                else ""
            )
            out.append(
                Transient(
                    name="fsdp2_all_gather_forward",
                    bytes=excess(j),
                    phases=("forward",),
                    formula=f"at layer {j}'s all-gather: {unsharded:,} B {kept} all-gather "
                    f"output still kept - {layers - j} x {layer:,} B saved tensors - "
                    f"{acts.forward_working_set:,} B forward working set, not made yet"
                    f"{not_yet}",
                    source=f"{AG_OUT}; {AG_KEPT}",
                )
            )
    if reshard:
        # The root's pre-backward: its all-gather output and parameters; the backward_start
        # point holds its parameters, the last layer's prefetched all-gather output and the
        # loss gradient.
        prefetch = block.unsharded if layers else 0
        n_bytes = root.unsharded - prefetch - acts.logits_gradient
        if n_bytes > 0:
            out.append(
                Transient(
                    name="fsdp2_root_all_gather_backward",
                    bytes=n_bytes,
                    phases=("backward_start",),
                    formula=f"at the root's pre-backward: {root.unsharded:,} B root all-gather "
                    f"output - {prefetch:,} B last layer's all-gather (prefetched after it) - "
                    f"{acts.logits_gradient:,} B loss gradient (made after it)",
                    source=f"{AG_OUT}; {FSDP2_SRC}_fsdp_param_group.py::wait_for_unshard "
                    f"L486-489 (freed after the copy-out in backward); {PREFETCH}",
                )
            )
    return out


def layer_backward(
    block: Fsdp2Bytes,
    *,
    layers: int,
    reshard: bool,
    gloo: bool,
    saved: int,
    done: int = 0,
    grad: str,
    reduce: str,
    shard: str,
    held_first: int = 0,
    first_prefetch: int = 0,
    extra: tuple[tuple[int, str], ...] = (),
) -> Transient | None:
    """The decoder layers' backward beyond the backward point's FSDP2 terms (the root, the
    running layer, the prefetched all-gather output, the head's gradients), which is the
    last layer at the start of its backward with every saved tensor. Layer k from the last
    (k = 0 is the last) adds, while it runs: the previous layer's reduce-scatter input (held
    until this layer's post-backward, RS_IN) and k layers' sharded gradients, minus k
    layers' saved tensors (`saved` each), minus k resharded layers under ZeRO-2 and the
    prefetch the first layer does not make under ZeRO-3 (PREFETCH). At the end of its
    backward its saved tensors are gone and its gradients made (POST_BW); then its
    post-backward reshards it and pops the previous input before allocating its own, copying
    the gradients in and reduce-scattering (output, gloo's copy, the last gradient: RS_OUT,
    GLOO_RS, RS_LAST). Those two moments come after the layer's autograd ops (FSDP2's
    post-backward runs from RegisterPostBackwardFunction's backward once the gradient has
    reached the layer's inputs: POST_BW_HOOK), so the backward point's working set is gone
    but for the layer's input gradient: `done` (working set - one hidden-state gradient) is
    subtracted from them (measured: tiny Mixtral fp32 on FSDP2 x2, whose reduce-scatter
    moment memplan put 344,064 B = 360,448 - 16,384 B too high). Each moment is linear in k,
    so the largest is at k = 0, 1, L - 2 or L - 1; the term is that largest excess (none when
    no moment exceeds the point).

    torchtitan's wrapping (_head_group_buffers): the head group's reduce-scatter input is
    held while the last layer runs (`held_first`), the first layer prefetches the embedding
    group (`first_prefetch` bytes) instead of nothing, and `extra` moments (excess, where)
    compete for the largest."""
    if not layers:
        return None
    slope = block.sharded_grads - saved - (0 if reshard else block.unsharded)
    copy = block.reduce_in if gloo else 0
    rs_moment = block.reduce_in + max(block.grads, block.reduce_out + block.last + copy)

    def moments(k: int) -> list[tuple[int, str]]:
        held = block.reduce_in if k else held_first
        no_prefetch = 0
        if reshard and k == layers - 1:
            no_prefetch = (block.unsharded if layers > 1 else 0) - first_prefetch
        mid = held + k * slope - no_prefetch
        return [
            (mid, "running"),
            (mid + block.grads - saved - done, "at the end of its backward"),
            (mid - held - block.unsharded + rs_moment - saved - done, "in its reduce-scatter"),
        ]

    ks = sorted({k for k in (0, 1, layers - 2, layers - 1) if 0 <= k < layers})
    candidates = [(n, k, where) for k in ks for n, where in moments(k)]
    candidates += [(n, -1, where) for n, where in extra]
    n_bytes, k, where = max(candidates, key=lambda c: (c[0], -abs(c[1])))
    if n_bytes <= 0:
        return None
    if k < 0:
        return Transient(
            name="fsdp2_layer_backward",
            bytes=n_bytes,
            phases=("backward",),
            formula=where,
            source=f"{TITAN_WRAP}; {POST_BW}; {RS_IN}; {RS_OUT}; {RS_DTYPE}; {RS_LAST}; "
            f"{GLOO_RS}; {PREFETCH}",
        )
    parts = []
    if not k and held_first:
        parts.append(f"{held_first:,} B head group's reduce-scatter input ({reduce})")
    if k:
        parts.append(f"{block.reduce_in:,} B previous reduce-scatter input ({reduce})")
        resharded = "" if reshard else f" - {block.unsharded:,} B resharded"
        parts.append(
            f"{k} x ({block.sharded_grads:,} B sharded gradients ({shard}) - {saved:,} B "
            f"saved{resharded})"
        )
        if reshard and layers > 1 and k == layers - 1:
            parts.append(f"-{block.unsharded:,} B prefetch not made")
        if reshard and k == layers - 1 and first_prefetch:
            parts.append(f"{first_prefetch:,} B embedding group prefetched")
    gone = f" - {done:,} B backward working set gone (but the input gradient)" if done else ""
    if where == "at the end of its backward":
        parts.append(f"{block.grads:,} B gradients ({grad}) - {saved:,} B saved{gone}")
    elif where == "in its reduce-scatter":
        if k:
            parts.append(f"-{block.reduce_in:,} B previous input popped")
        gloo_copy = " + gloo's copy" if gloo else ""
        parts.append(
            f"{rs_moment:,} B (reduce-scatter input + max(gradients, output + last gradient"
            f"{gloo_copy})) - {block.unsharded:,} B resharded - {saved:,} B saved{gone}"
        )
    return Transient(
        name="fsdp2_layer_backward",
        bytes=n_bytes,
        phases=("backward",),
        formula=f"layer {k} from the last, {where}: " + " + ".join(parts),
        source=f"{POST_BW}; {POST_BW_HOOK}; {RS_IN}; {RS_OUT}; {RS_DTYPE}; {RS_LAST}; "
        f"{GLOO_RS}; {PREFETCH}",
    )


def end_of_backward(
    groups: Fsdp2Groups,
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    *,
    world: int,
    grad: str,
    reduce: str,
    shard: str,
    gloo: bool,
    embedding: Transient | None,
) -> tuple[bool, list[Transient]]:
    """(whether the root's reduce-scatter holds more than the embedding's backward, the
    backward_end terms of the larger moment besides the root's unsharded parameters and the
    embedding's backward itself)."""
    widths = (0, dtype_bytes(grad), dtype_bytes(shard), dtype_bytes(reduce))
    at_reduce = reduce_holds_more(
        groups, root, block, widths=widths, gloo=gloo, embedding=embedding
    )
    end = end_terms(
        at_reduce,
        groups,
        root,
        block,
        world=world,
        grad=grad,
        reduce=reduce,
        shard=shard,
        gloo=gloo,
    )
    return at_reduce, end


def reduce_holds_more(
    groups: Fsdp2Groups,
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    *,
    widths: tuple[int, int, int, int],
    gloo: bool,
    embedding: Transient | None,
) -> bool:
    """Whether the root's reduce-scatter holds more than the embedding's backward
    (`widths`: fsdp2_bytes' param, grad, shard and reduce dtype bytes)."""
    o, r = widths[2], widths[3]
    at_embedding = root.unsharded + root.grads + (block.reduce_in if groups.layers else 0)
    copy = root.reduce_in if gloo else 0
    at_reduce = root.reduce_in + root.reduce_out + root.last + copy
    cast = root.reduce_in + root.reduce_out + root.sharded_grads + root.last if r != o else 0
    return max(at_reduce, cast) > at_embedding + (embedding.bytes if embedding else 0)


def end_terms(
    at_reduce: bool,
    groups: Fsdp2Groups,
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    *,
    world: int,
    grad: str,
    reduce: str,
    shard: str,
    gloo: bool,
) -> list[Transient]:
    """end_of_backward's terms of the moment `at_reduce` picks."""
    g, o, r = dtype_bytes(grad), dtype_bytes(shard), dtype_bytes(reduce)
    copy = root.reduce_in if gloo else 0
    at_reduce_bytes = root.reduce_in + root.reduce_out + root.last + copy
    cast = root.reduce_in + root.reduce_out + root.sharded_grads + root.last if r != o else 0
    if not at_reduce:
        return [
            *term(
                "fsdp2_unsharded_root_grads",
                root.grads,
                ("backward_end",),
                f"{groups.root.grads:,} elements x {g} B ({grad}): every root gradient, "
                "unsharded, at the embedding's backward",
                POST_BW,
            ),
            *term(
                "fsdp2_reduce_scatter_input_block",
                block.reduce_in if groups.layers else 0,
                ("backward_end",),
                f"{world} x {groups.block.grad_padded:,} elements x {r} B ({reduce}): the "
                "first layer's reduce-scatter input, held until the root's post-backward",
                f"{RS_IN}; {RS_DTYPE}",
            ),
        ]
    rs = f"{groups.root.grad_padded:,} padded elements x {r} B ({reduce})"
    out = [
        *term(
            "fsdp2_reduce_scatter_input_root",
            root.reduce_in,
            ("backward_end",),
            f"{world} x {rs}: the root's reduce-scatter input",
            f"{RS_IN}; {RS_DTYPE}",
        ),
        *term(
            "fsdp2_reduce_scatter_output_root",
            root.reduce_out,
            ("backward_end",),
            f"{rs}: the root's reduce-scatter output",
            f"{RS_OUT}; {RS_DTYPE}",
            stream=REDUCE_SCATTER_STREAM,
        ),
        *term(
            "fsdp2_last_unsharded_grad",
            root.last,
            ("backward_end",),
            f"{groups.root.last:,} elements x {g} B ({grad}): the root's last gradient, "
            "unsharded, through its reduce-scatter",
            RS_LAST,
        ),
    ]
    if at_reduce_bytes >= cast:
        out += term(
            "gloo_reduce_scatter_copy",
            copy,
            ("backward_end",),
            f"{world} x {rs}: gloo's copy of the reduce-scatter input",
            GLOO_RS,
        )
    else:
        out += term(
            "fsdp2_sharded_root_grads",
            root.sharded_grads,
            ("backward_end",),
            f"{groups.root.grad_padded:,} elements x {o} B ({shard}): the root's "
            f"sharded gradients, cast from {reduce} beside the reduce-scatter output",
            RS_CAST,
            stream=REDUCE_SCATTER_STREAM,
        )
    return out
