"""torch FSDP2's part of a training step: the buffers `fully_shard` holds at each phase, on
top of the sharded model states (memplan.states.engines.fsdp2.sharding) and the saved
activations, and when its gradients exist. Measured against memplan verify's FSDPMemTracker
runs by tests/test_fsdp2_peak.py.
"""

from __future__ import annotations

from memplan.memo import IdentityMemo
from memplan.memory import Phase, Transient
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.base import StepActivations
from memplan.states.engines.fsdp2.buffers import (
    AG_COPY_OUT,
    AG_KEPT,
    AG_OUT,
    ALL_GATHER_STREAM,
    PREFETCH,
    REDUCE_SCATTER_STREAM,
    RESHARD,
    RS_CAST,
    Fsdp2Bytes,
    OwnDtypes,
    fsdp2_bytes,
    term,
    unsharded_formula,
)
from memplan.states.engines.fsdp2.fixed import fixed_of, flat_root
from memplan.states.engines.fsdp2.groups import TITAN_WRAP, Fsdp2Group, Fsdp2Groups
from memplan.states.engines.fsdp2.moments import (
    between_phases,
    end_of_backward,
    layer_backward,
)


def step_buffers(
    groups: Fsdp2Groups,
    *,
    world: int,
    param: str,
    grad: str,
    shard: str,
    reshard: bool,
    gloo: bool,
    acts: StepActivations,
    reduce: str | None = None,
    loss_in_forward: bool = True,
    replicate: int = 1,
    cast: bool = False,
) -> list[Transient]:
    """FSDP2's buffers at each phase of the step, on top of the sharded model states.

    `param` is MixedPrecisionPolicy.param_dtype (the all-gather and compute dtype), `grad` the
    unsharded gradients' dtype, `reduce` MixedPrecisionPolicy.reduce_dtype (the reduce-scatter
    input's and output's dtype; None: `grad`, RS_DTYPE), `shard` the sharded parameters' and
    gradients' dtype. With `reshard` (ZeRO-3) a decoder layer is
    unsharded only while it runs (and the next one prefetched in backward); without it
    (ZeRO-2) every group stays unsharded from its forward until its post-backward. `gloo`:
    the CPU process group, whose reduce-scatter copies its input (GLOO_RS). `cast`: whether
    MixedPrecisionPolicy sets param_dtype (`param`); parameters held in a fixed dtype are
    gathered and reduced in their own where it does not cast them (OWN_DTYPE).

    At the end of backward the larger of two moments counts: the embedding's backward (the
    root still unsharded with all its unsharded gradients, the first layer's reduce-scatter
    input still held, and `acts.embedding_backward`, returned only then) or the root's own
    reduce-scatter (input, output, gloo's copy, the last unsharded gradient; the root's
    sharded gradients not yet made, see fsdp2_root_gradients). The decoder layers' backward
    is the worst of several moments (layer_backward); with a decoder layer's
    activations (`acts.layer`), two all-gathers of the root between phase points are added
    where they hold more (between_phases).

    With torchtitan's head group (`groups.head`) the root is the embedding group and the
    head's buffers follow its own life (_head_group_buffers); `loss_in_forward` says whether
    the loss runs inside the root module's forward (transformers' `labels`), which keeps the
    last group's all-gather output until after it.

    Remembered per groups object and the other arguments (plan's layouts that differ in
    what these do not read, offload or the optimizer, and its micro-batches and
    recomputation policies whose activations read the same, ask again): a fresh list."""
    key = (world, param, grad, shard, reshard, gloo, acts, reduce, loss_in_forward, replicate, cast)
    hit = _BUFFERS.get((groups,), key)
    if hit is None:
        hit = _BUFFERS.put(
            (groups,),
            key,
            tuple(
                _step_buffers(
                    groups,
                    world=world,
                    param=param,
                    grad=grad,
                    shard=shard,
                    reshard=reshard,
                    gloo=gloo,
                    acts=acts,
                    reduce=reduce,
                    loss_in_forward=loss_in_forward,
                    replicate=replicate,
                    cast=cast,
                )
            ),
        )
    return list(hit)


_BUFFERS: IdentityMemo[tuple[Transient, ...]] = IdentityMemo(4096)


def _step_buffers(
    groups: Fsdp2Groups,
    *,
    world: int,
    param: str,
    grad: str,
    shard: str,
    reshard: bool,
    gloo: bool,
    acts: StepActivations,
    reduce: str | None,
    loss_in_forward: bool,
    replicate: int,
    cast: bool,
) -> list[Transient]:
    """`step_buffers`, worked out."""
    own = OwnDtypes(param_dtype=param if cast else None, reduce_dtype=reduce)
    reduce = reduce or grad
    fixed = fixed_of(
        groups,
        world=world,
        param=param,
        grad=grad,
        shard=shard,
        reshard=reshard,
        gloo=gloo,
        reduce=reduce,
        replicate=replicate,
        own=own,
    )
    root, block, held = fixed.root, fixed.block, list(fixed.held)
    if groups.head is not None:
        head = fsdp2_bytes(groups.head, world, *fixed.widths, own)
        return (
            _head_group_buffers(
                groups,
                root,
                block,
                head,
                world=world,
                param=param,
                grad=grad,
                reduce=reduce,
                shard=shard,
                reshard=reshard,
                gloo=gloo,
                acts=acts,
                loss_in_forward=loss_in_forward,
            )
            + held
        )
    saved = acts.layer  # None: no decoder layer's activations modelled
    embedding = acts.embedding_backward if saved is not None else None
    at_reduce, end, out = fixed.end_of_backward(embedding)
    layer = layer_backward(
        block,
        layers=groups.layers,
        reshard=reshard,
        gloo=gloo,
        saved=saved or 0,
        done=max(0, acts.backward_working_set - acts.hidden_gradient) if saved is not None else 0,
        grad=grad,
        reduce=reduce,
        shard=shard,
    )
    out += [layer] if layer is not None else []
    out += end
    if saved is not None:
        out += between_phases(
            root, block, layers=groups.layers, reshard=reshard, layer=saved, acts=acts
        )
    return out + held + ([embedding] if embedding is not None and not at_reduce else [])


def _head_group_buffers(
    groups: Fsdp2Groups,
    root: Fsdp2Bytes,
    block: Fsdp2Bytes,
    head: Fsdp2Bytes,
    *,
    world: int,
    param: str,
    grad: str,
    reduce: str,
    shard: str,
    reshard: bool,
    gloo: bool,
    acts: StepActivations,
    loss_in_forward: bool,
) -> list[Transient]:
    """step_buffers under torchtitan's wrapping (TITAN_WRAP): the root is the embedding
    group (resharded after its forward with `reshard`, gathered again by the first layer's
    backward prefetch); the head group ([norm, output]) is gathered after the last layer's
    forward and stays unsharded until its post-backward, which reduce-scatters its
    gradients before the layers' backward and keeps that input until the last layer's
    post-backward (RS_IN). The decoder layers as step_buffers has them; the end of backward
    as step_buffers has it with the embedding group as the root."""
    assert groups.head is not None
    layers = groups.layers
    o = dtype_bytes(shard)
    saved = acts.layer  # None: no decoder layer's activations modelled
    embedding = acts.embedding_backward if saved is not None else None
    at_reduce, end = end_of_backward(
        groups,
        root,
        block,
        world=world,
        grad=grad,
        reduce=reduce,
        shard=shard,
        gloo=gloo,
        embedding=embedding,
    )

    def up(g: Fsdp2Group) -> str:
        return unsharded_formula(g, world, param)

    src = f"{TITAN_WRAP}; {AG_COPY_OUT}; {RESHARD}"
    emb_end: tuple[Phase, ...] = () if at_reduce else ("backward_end",)
    whole: tuple[Phase, ...] = ("forward", "loss", "backward_start", "backward")
    out = term(
        "fsdp2_unsharded_embedding",
        root.unsharded,
        (() if reshard else whole) + emb_end,
        up(groups.root)
        + ": the embedding group's all-gathered parameters"
        + (
            " (resharded after its forward, gathered again in the first layer's backward)"
            if reshard
            else " (not resharded after forward)"
        ),
        src,
    )
    out += flat_root(
        root,
        "forward",
        "the embedding group's flat all-gather output, kept (all_gather_state) until the "
        "first layer's copy-out",
    )
    out += term(
        "fsdp2_unsharded_head",
        head.unsharded,
        ("loss", "backward_start"),
        up(groups.head) + ": the head group's all-gathered parameters (final norm, "
        "output; reshard_after_forward=False), from after the last layer's forward to its "
        "post-backward",
        src,
    )
    out += term(
        "fsdp2_all_gather_output_head",
        head.unsharded if loss_in_forward else 0,
        ("loss",),
        up(groups.head) + ": the head group's flat all-gather output, kept until the "
        "root's post-forward, after the loss (computed inside the model's forward)",
        f"{AG_OUT}; {AG_KEPT}",
        stream=ALL_GATHER_STREAM,
    )
    if reshard:
        out += term(
            "fsdp2_unsharded_block",
            block.unsharded if layers else 0,
            ("forward", "backward"),
            up(groups.block) + ": the decoder layer that runs",
            src,
        )
        gathered: tuple[Phase, ...] = ("forward", "backward") if layers > 1 else ("forward",)
        out += term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            gathered,
            up(groups.block) + ": one layer's flat all-gather output (in forward the "
            "running layer's; in backward the next layer's, prefetched; the last layer's is "
            "prefetched by the head group's pre-backward, after the loss gradient, so not at "
            "backward_start)",
            f"{AG_OUT}; {AG_KEPT}; {PREFETCH}",
            stream=ALL_GATHER_STREAM,
        )
    else:
        out += term(
            "fsdp2_unsharded_blocks",
            layers * block.unsharded,
            whole,
            f"{layers} layers x " + up(groups.block) + ": every layer stays "
            "unsharded from its forward to its post-backward (reshard_after_forward=False)",
            src,
        )
        out += term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward",),
            up(groups.block) + ": the last layer's flat all-gather output",
            f"{AG_OUT}; {AG_KEPT}",
            stream=ALL_GATHER_STREAM,
        )
    out += term(
        "fsdp2_sharded_head_grads",
        head.sharded_grads,
        ("backward",),
        f"{groups.head.grad_padded:,} elements x {o} B ({shard}): the head group's sharded "
        "gradients, made in its post-backward before the layers' backward",
        f"{TITAN_WRAP}; {RS_CAST}",
        stream=REDUCE_SCATTER_STREAM,
    )
    # The head group's post-backward: its parameters resharded, its reduce-scatter (as a
    # layer's, layer_backward), a hidden-state gradient alive, every layer's saved
    # tensors; the backward point holds instead the head's sharded gradients, the last
    # layer's parameters and the next one's prefetched all-gather output (reshard) and the
    # backward working set. Measured (tiny Llama, 4 gloo ranks, a probe on foreach_reduce):
    # the group of two modules runs its post-backward twice, first after the output
    # projection's backward (reducing its gradient only) with no layer prefetched yet, then
    # after the final norm's (its pre-backward gathers the group again); the first holds more,
    # and 6,216 B of the final norm's saved tensors and gradients more than counted here.
    copy = head.reduce_in if gloo else 0
    cast = head.reduce_out + head.sharded_grads + head.last if reduce != shard else 0
    at_head = head.reduce_in + max(head.grads, head.reduce_out + head.last + copy, cast)
    hidden = acts.hidden_gradient if saved is not None else 0
    working = acts.backward_working_set if saved is not None else 0
    head_excess = at_head + hidden - head.sharded_grads - working
    head_excess -= block.unsharded if reshard and layers else 0
    prefetched = block.unsharded if reshard and layers > 1 else 0
    head_excess -= prefetched
    head_moment = (
        head_excess,
        f"the head group's reduce-scatter: {head.reduce_in:,} B input ({reduce}) + max("
        f"{head.grads:,} B gradients ({grad}), output + last gradient"
        + (" + gloo's copy" if gloo else "")
        + (", output + sharded gradients + last gradient" if cast else "")
        + f") + {hidden:,} B hidden-state gradient - {head.sharded_grads:,} B sharded head "
        f"gradients not made yet - {working:,} B backward working set"
        + (f" - {block.unsharded:,} B last layer not copied out yet" if reshard and layers else "")
        + (f" - {prefetched:,} B next layer not prefetched yet" if prefetched else ""),
    )
    layer = layer_backward(
        block,
        layers=layers,
        reshard=reshard,
        gloo=gloo,
        saved=saved or 0,
        done=max(0, acts.backward_working_set - acts.hidden_gradient) if saved is not None else 0,
        grad=grad,
        reduce=reduce,
        shard=shard,
        held_first=head.reduce_in,
        first_prefetch=root.unsharded if reshard else 0,
        extra=(head_moment,),
    )
    out += [layer] if layer is not None else []
    out += end
    if saved is not None:
        out += between_phases(
            root, block, layers=layers, reshard=reshard, layer=saved, acts=acts, head=head
        )
    return out + ([embedding] if embedding is not None and not at_reduce else [])


def shard_dtype(recipe: Recipe) -> str:
    """The sharded parameters' and gradients' dtype: the accumulation dtype, else the master
    weights' (the sharded parameters stay in it; MixedPrecisionPolicy.param_dtype, the
    recipe's parameters, is only the unsharded copy's), else the parameters'."""
    return recipe.gradient_accumulation or recipe.master_weights or recipe.parameters
