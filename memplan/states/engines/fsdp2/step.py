"""torch FSDP2's part of a training step: the buffers `fully_shard` holds at each phase, on
top of the sharded model states (memplan.states.engines.fsdp2.sharding) and the saved
activations, and when its gradients exist. Measured against memplan verify's FSDPMemTracker
runs by tests/test_fsdp2_peak.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.memory import COMPUTE_STREAM, Phase, Transient
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.base import StepActivations
from memplan.states.engines.fsdp2.groups import (
    TITAN_WRAP,
    Fsdp2Group,
    Fsdp2Groups,
)

# torch FSDP2 (`fully_shard`, torch 2.13) as memplan verify wraps a model
# (memplan/verify/rank.py::_wrap): one parameter group per decoder layer, then the root (every
# parameter outside the layers), each call given reshard_after_forward explicitly (True for
# ZeRO-3, False for ZeRO-2), so with ZeRO-3 the root is resharded after forward too (only
# reshard_after_forward=None keeps the root unsharded: _fully_shard.py L246, _fsdp_state.py
# L205). Files below are under torch/distributed/fsdp/_fully_shard/; lines are torch 2.13's.
_FSDP2 = "torch/distributed/fsdp/_fully_shard/"
_AG_OUT = _FSDP2 + "_fsdp_collectives.py::foreach_all_gather L351-353 (all_gather_output)"
_AG_COPY_OUT = (
    _FSDP2 + "_fsdp_collectives.py::foreach_all_gather_copy_out L457-463 "
    "(alloc_all_gather_outputs: the unsharded parameters' storage, padded)"
)
_AG_KEPT = (
    _FSDP2 + "_fsdp_param_group.py::wait_for_unshard L476-485 (all_gather_state kept in "
    "forward), dropped by the next group's wait_for_unshard L429-432 but held by its local "
    "`prev_all_gather_state` through that group's copy-out, or freed by the root's "
    "post-forward (_fsdp_state.py L335-342)"
)
_PREFETCH = _FSDP2 + "_fsdp_param_group.py::_backward_prefetch L795-830 (unshard only)"
_RESHARD = (
    _FSDP2 + "_fsdp_param_group.py::post_forward L557-566, reshard L498-509 "
    "(reshard_after_forward), post_backward L637-638 (reshard_after_backward)"
)
_POST_BW = _FSDP2 + "_fsdp_param_group.py::post_backward L618-630 (unsharded_param.grad)"
_POST_BW_HOOK = (
    _FSDP2 + "_fsdp_param_group.py::_register_post_backward_hook L891-907, "
    "RegisterPostBackwardFunction.backward L1125-1127 (applied to the layer's inputs in its "
    "pre-forward, so post_backward runs once their gradients exist)"
)
_RS_IN = (
    _FSDP2 + "_fsdp_collectives.py::foreach_reduce L592-606 (reduce_scatter_input, padded); "
    "kept in comm_ctx.reduce_scatter_states until the next group's post_backward "
    "(_fsdp_param_group.py L647-658, L717-719) or the final callback (_fsdp_state.py L431)"
)
_RS_OUT = _FSDP2 + "_fsdp_collectives.py::foreach_reduce L612-616 (reduce_output)"
# The streams FSDP2 allocates on (FSDPCommContext.lazy_init, _fsdp_param_group.py L80-102):
# in forward and pre-backward the flat all-gather output is made on all_gather_copy_in_stream
# (get_all_gather_streams L116-127, foreach_all_gather L336-353); the reduce-scatter output,
# and so the sharded gradients that are its views or its cast, on reduce_scatter_stream
# (foreach_reduce L611-616, L685-696: "The RS output is allocated in the RS stream and used
# in the default stream (for optimizer)"). The unsharded parameters (copy-out) and the
# reduce-scatter input are made on the default stream (L431-463, L592-606).
ALL_GATHER_STREAM = "fsdp2_all_gather_copy_in"
REDUCE_SCATTER_STREAM = "fsdp2_reduce_scatter"
_AG_STREAMS = _FSDP2 + "_fsdp_param_group.py::get_all_gather_streams L116-127"
# MixedPrecisionPolicy.reduce_dtype: FSDPParam.init_dtype_attrs clamps it to None when it
# equals param_dtype (_fsdp_param.py L589-593) and foreach_reduce falls back to the
# gradients' dtype (`reduce_dtype = reduce_dtype or grad_dtype`, _fsdp_collectives.py L560);
# the reduce-scatter input and output are allocated in it (L592-616), the unsharded gradients
# (param_dtype) cast into the input by the copy-in (`torch._chunk_cat(..., out=...)`,
# foreach_reduce_scatter_copy_in L778-786), and the output is cast to the sharded
# parameters' dtype only if it differs (_to_dtype_if_needed L696: with reduce_dtype fp32 and
# fp32 sharded parameters the sharded gradients are views of the output, no cast).
_RS_DTYPE = _FSDP2 + "_fsdp_collectives.py::foreach_reduce L560, L592-616, L696"
# HSDP (a 2-D replicate x shard mesh): foreach_reduce all-reduces the reduce-scatter output
# over the replicate dimension in place (L658) and returns it as `all_reduce_input` (L671);
# the group keeps it in `_all_reduce_state` (_fsdp_param_group.py L759) until its next
# post-backward or finalize_backward at the end of backward (L768). Where reduce_dtype is the
# sharded parameters' dtype the sharded gradients are views of it (no extra bytes); otherwise
# the gradients are a cast copy and every reduced group's output stays besides.
_HSDP_HOLD = (
    _FSDP2 + "_fsdp_collectives.py::foreach_reduce L658-671; _fsdp_param_group.py L759, L768"
)
_RS_CAST = _FSDP2 + "_fsdp_collectives.py::foreach_reduce L696 (_to_dtype_if_needed)"
_RS_LAST = (
    _FSDP2 + "_fsdp_collectives.py::foreach_reduce L580-590: the loop variable "
    "`unsharded_grad` still holds the last gradient after `unsharded_grads.clear()` (L606), "
    "until foreach_reduce returns"
)
# gloo has no reduce-scatter of its own: it all-reduces a copy of the input and copies this
# rank's chunk out when the caller waits (the copy goes with the work object). Its worker
# thread drops its own reference only after waking the caller, so now and then the copy
# outlives the collective by a few ops (seen as a rare one-rank spike in memplan verify).
_GLOO_RS = (
    "torch/csrc/distributed/c10d/ProcessGroupGloo.cpp::reduce_scatter_tensor_coalesced "
    "(`buffers.push_back(inputTensors[i].clone())`, all-reduced, then "
    "`outputTensors[i].copy_(buffers[i].chunk(worldSize)[rank])` in the LambdaWork's wait)"
)


@dataclass(frozen=True, slots=True)
class _Fsdp2Bytes:
    """The buffers of one group, in bytes (see step_buffers())."""

    unsharded: int
    """world x padded x param dtype: the all-gather output, and again the parameters."""
    grads: int
    reduce_in: int
    """world x grad_padded x the reduce dtype (_RS_IN, _RS_DTYPE)."""
    reduce_out: int
    sharded_grads: int
    last: int


def _fsdp2_bytes(
    g: Fsdp2Group, world: int, param: int, grad: int, shard: int, reduce: int
) -> _Fsdp2Bytes:
    ew = g.expert_world
    return _Fsdp2Bytes(
        unsharded=(world * g.padded + ew * g.expert_padded) * param,
        grads=g.grads * grad,
        reduce_in=(world * g.grad_padded + ew * g.expert_grad_padded) * reduce,
        reduce_out=(g.grad_padded + g.expert_grad_padded) * reduce,
        sharded_grads=(g.grad_padded + g.expert_grad_padded) * shard,
        last=g.last * grad,
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
) -> list[Transient]:
    """FSDP2's buffers at each phase of the step, on top of the sharded model states.

    `param` is MixedPrecisionPolicy.param_dtype (the all-gather and compute dtype), `grad` the
    unsharded gradients' dtype, `reduce` MixedPrecisionPolicy.reduce_dtype (the reduce-scatter
    input's and output's dtype; None: `grad`, _RS_DTYPE), `shard` the sharded parameters' and
    gradients' dtype. With `reshard` (ZeRO-3) a decoder layer is
    unsharded only while it runs (and the next one prefetched in backward); without it
    (ZeRO-2) every group stays unsharded from its forward until its post-backward. `gloo`:
    the CPU process group, whose reduce-scatter copies its input (_GLOO_RS).

    At the end of backward the larger of two moments counts: the embedding's backward (the
    root still unsharded with all its unsharded gradients, the first layer's reduce-scatter
    input still held, and `acts.embedding_backward`, returned only then) or the root's own
    reduce-scatter (input, output, gloo's copy, the last unsharded gradient; the root's
    sharded gradients not yet made, see fsdp2_root_gradients). The decoder layers' backward
    is the worst of several moments (_fsdp2_layer_backward); with a decoder layer's
    activations (`acts.layer`), two all-gathers of the root between phase points are added
    where they hold more (between_phases).

    With torchtitan's head group (`groups.head`) the root is the embedding group and the
    head's buffers follow its own life (_head_group_buffers); `loss_in_forward` says whether
    the loss runs inside the root module's forward (transformers' `labels`), which keeps the
    last group's all-gather output until after it."""
    reduce = reduce or grad
    p, g, o, r = dtype_bytes(param), dtype_bytes(grad), dtype_bytes(shard), dtype_bytes(reduce)
    root = _fsdp2_bytes(groups.root, world, p, g, o, r)
    block = _fsdp2_bytes(groups.block, world, p, g, o, r)
    held = _hsdp_held(groups, block, replicate=replicate, reduce=reduce, shard=shard)
    if held:
        # Each reduced layer keeps its all-reduced output besides its sharded gradients.
        block = replace(block, sharded_grads=block.sharded_grads + block.reduce_out)
    if groups.head is not None:
        head = _fsdp2_bytes(groups.head, world, p, g, o, r)
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
    at_reduce, end = _end_of_backward(
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
    # At the embedding's backward the root is still unsharded.
    root_end: tuple[Phase, ...] = () if at_reduce else ("backward_end",)
    out = _unsharded(groups, root, block, world=world, param=param, reshard=reshard, end=root_end)
    out += _term(
        "fsdp2_unsharded_head_grads",
        groups.head_grads * g,
        ("backward",),
        f"{groups.head_grads:,} elements x {g} B ({grad}): the root's gradients computed "
        "before the layers' backward (LM head, final norm), unsharded until the root's "
        "post-backward",
        _POST_BW,
    )
    layer = _fsdp2_layer_backward(
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


def _hsdp_held(
    groups: Fsdp2Groups, block: _Fsdp2Bytes, *, replicate: int, reduce: str, shard: str
) -> list[Transient]:
    """HSDP's all-reduced outputs still held at the end of backward (_HSDP_HOLD): every
    decoder layer's, where the reduce dtype is not the shards'."""
    if replicate <= 1 or reduce == shard:
        return []
    # torchtitan's head group runs its post-backward twice (the output projection's, then
    # the final norm's: _head_group_buffers), the second replacing the first's state, so it
    # keeps only the norm's few elements (not counted).
    return _term(
        "hsdp_all_reduce_outputs",
        groups.layers * block.reduce_out,
        ("backward_end",),
        f"{groups.layers} layers x {block.reduce_out:,} B: all-reduced outputs ({reduce}) kept "
        f"until finalize_backward, the sharded gradients being {shard} copies",
        _HSDP_HOLD,
    )


def _head_group_buffers(
    groups: Fsdp2Groups,
    root: _Fsdp2Bytes,
    block: _Fsdp2Bytes,
    head: _Fsdp2Bytes,
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
    post-backward (_RS_IN). The decoder layers as step_buffers has them; the end of backward
    as step_buffers has it with the embedding group as the root."""
    assert groups.head is not None
    layers = groups.layers
    o = dtype_bytes(shard)
    saved = acts.layer  # None: no decoder layer's activations modelled
    embedding = acts.embedding_backward if saved is not None else None
    at_reduce, end = _end_of_backward(
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

    def up(elements: int) -> str:
        return (
            f"{world} ranks x {elements:,} padded shard elements x {dtype_bytes(param)} B ({param})"
        )

    src = f"{TITAN_WRAP}; {_AG_COPY_OUT}; {_RESHARD}"
    emb_end: tuple[Phase, ...] = () if at_reduce else ("backward_end",)
    whole: tuple[Phase, ...] = ("forward", "loss", "backward_start", "backward")
    out = _term(
        "fsdp2_unsharded_embedding",
        root.unsharded,
        (() if reshard else whole) + emb_end,
        up(groups.root.padded)
        + ": the embedding group's all-gathered parameters"
        + (
            " (resharded after its forward, gathered again in the first layer's backward)"
            if reshard
            else " (not resharded after forward)"
        ),
        src,
    )
    out += _flat_root(
        root,
        "forward",
        "the embedding group's flat all-gather output, kept (all_gather_state) until the "
        "first layer's copy-out",
    )
    out += _term(
        "fsdp2_unsharded_head",
        head.unsharded,
        ("loss", "backward_start"),
        up(groups.head.padded) + ": the head group's all-gathered parameters (final norm, "
        "output; reshard_after_forward=False), from after the last layer's forward to its "
        "post-backward",
        src,
    )
    out += _term(
        "fsdp2_all_gather_output_head",
        head.unsharded if loss_in_forward else 0,
        ("loss",),
        up(groups.head.padded) + ": the head group's flat all-gather output, kept until the "
        "root's post-forward, after the loss (computed inside the model's forward)",
        f"{_AG_OUT}; {_AG_KEPT}",
        stream=ALL_GATHER_STREAM,
    )
    if reshard:
        out += _term(
            "fsdp2_unsharded_block",
            block.unsharded if layers else 0,
            ("forward", "backward"),
            up(groups.block.padded) + ": the decoder layer that runs",
            src,
        )
        gathered: tuple[Phase, ...] = ("forward", "backward") if layers > 1 else ("forward",)
        out += _term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            gathered,
            up(groups.block.padded) + ": one layer's flat all-gather output (in forward the "
            "running layer's; in backward the next layer's, prefetched; the last layer's is "
            "prefetched by the head group's pre-backward, after the loss gradient, so not at "
            "backward_start)",
            f"{_AG_OUT}; {_AG_KEPT}; {_PREFETCH}",
            stream=ALL_GATHER_STREAM,
        )
    else:
        out += _term(
            "fsdp2_unsharded_blocks",
            layers * block.unsharded,
            whole,
            f"{layers} layers x " + up(groups.block.padded) + ": every layer stays "
            "unsharded from its forward to its post-backward (reshard_after_forward=False)",
            src,
        )
        out += _term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward",),
            up(groups.block.padded) + ": the last layer's flat all-gather output",
            f"{_AG_OUT}; {_AG_KEPT}",
            stream=ALL_GATHER_STREAM,
        )
    out += _term(
        "fsdp2_sharded_head_grads",
        head.sharded_grads,
        ("backward",),
        f"{groups.head.grad_padded:,} elements x {o} B ({shard}): the head group's sharded "
        "gradients, made in its post-backward before the layers' backward",
        f"{TITAN_WRAP}; {_RS_CAST}",
        stream=REDUCE_SCATTER_STREAM,
    )
    # The head group's post-backward: its parameters resharded, its reduce-scatter (as a
    # layer's, _fsdp2_layer_backward), a hidden-state gradient alive, every layer's saved
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
    layer = _fsdp2_layer_backward(
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


def _term(
    name: str,
    n_bytes: int,
    phases: tuple[Phase, ...],
    formula: str,
    source: str,
    stream: str = COMPUTE_STREAM,
) -> list[Transient]:
    """A one-term list, or none when it holds no bytes."""
    if n_bytes <= 0 or not phases:
        return []
    return [
        Transient(
            name=name, bytes=n_bytes, phases=phases, formula=formula, source=source, stream=stream
        )
    ]


def _flat_root(root: _Fsdp2Bytes, phase: Phase, what: str) -> list[Transient]:
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
            source=f"{_AG_OUT}; {_AG_STREAMS}; {_AG_KEPT}",
            stream=ALL_GATHER_STREAM,
            momentary=phase,
        )
    ]


def _unsharded(
    groups: Fsdp2Groups,
    root: _Fsdp2Bytes,
    block: _Fsdp2Bytes,
    *,
    world: int,
    param: str,
    reshard: bool,
    end: tuple[Phase, ...],
) -> list[Transient]:
    """The unsharded parameters and the flat all-gather outputs, the root's first (alive
    from forward to the backward point, and at `end`)."""
    layers = groups.layers

    def up(elements: int) -> str:
        return (
            f"{world} ranks x {elements:,} padded shard elements x {dtype_bytes(param)} B ({param})"
        )

    out = _term(
        "fsdp2_unsharded_root",
        root.unsharded,
        ("forward", "loss", "backward_start", "backward", *end),
        up(groups.root.padded) + ": the root's all-gathered parameters (from its "
        "pre-forward to its post-forward, again from its pre-backward to its post-backward)",
        f"{_AG_COPY_OUT}; {_RESHARD}",
    )
    out += _flat_root(
        root,
        "forward",
        "the root's flat all-gather output, kept (all_gather_state) until the first layer's "
        "copy-out",
    )
    if reshard:
        out += _flat_root(
            root,
            "backward_start",
            "the root's pre-backward all-gather output, freed after its copy-out",
        )
        out += _term(
            "fsdp2_unsharded_block",
            block.unsharded if layers else 0,
            ("forward", "backward"),
            up(groups.block.padded) + ": the decoder layer that runs",
            f"{_AG_COPY_OUT}; {_RESHARD}",
        )
        out += _term(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward", "loss", "backward_start") + (("backward",) if layers > 1 else ()),
            up(groups.block.padded) + ": one layer's flat all-gather output (the last "
            "layer's, kept until the root's post-forward; in backward the next layer's, "
            "prefetched)",
            f"{_AG_OUT}; {_AG_KEPT}; {_PREFETCH}",
            stream=ALL_GATHER_STREAM,
        )
        return out
    out += _term(
        "fsdp2_unsharded_blocks",
        layers * block.unsharded,
        ("forward", "loss", "backward_start", "backward"),
        f"{layers} layers x " + up(groups.block.padded) + ": every layer stays "
        "unsharded from its forward to its post-backward (reshard_after_forward=False)",
        f"{_AG_COPY_OUT}; {_RESHARD}",
    )
    out += _term(
        "fsdp2_all_gather_output",
        block.unsharded if layers else 0,
        ("forward", "loss"),
        up(groups.block.padded) + ": the last layer's flat all-gather output, "
        "kept until the root's post-forward",
        f"{_AG_OUT}; {_AG_KEPT}",
        stream=ALL_GATHER_STREAM,
    )
    return out


def _end_of_backward(
    groups: Fsdp2Groups,
    root: _Fsdp2Bytes,
    block: _Fsdp2Bytes,
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
    g, o, r = dtype_bytes(grad), dtype_bytes(shard), dtype_bytes(reduce)
    at_embedding = root.unsharded + root.grads + (block.reduce_in if groups.layers else 0)
    copy = root.reduce_in if gloo else 0
    at_reduce = root.reduce_in + root.reduce_out + root.last + copy
    cast = root.reduce_in + root.reduce_out + root.sharded_grads + root.last if r != o else 0
    if max(at_reduce, cast) <= at_embedding + (embedding.bytes if embedding else 0):
        return False, [
            *_term(
                "fsdp2_unsharded_root_grads",
                root.grads,
                ("backward_end",),
                f"{groups.root.grads:,} elements x {g} B ({grad}): every root gradient, "
                "unsharded, at the embedding's backward",
                _POST_BW,
            ),
            *_term(
                "fsdp2_reduce_scatter_input_block",
                block.reduce_in if groups.layers else 0,
                ("backward_end",),
                f"{world} x {groups.block.grad_padded:,} elements x {r} B ({reduce}): the "
                "first layer's reduce-scatter input, held until the root's post-backward",
                f"{_RS_IN}; {_RS_DTYPE}",
            ),
        ]
    rs = f"{groups.root.grad_padded:,} padded elements x {r} B ({reduce})"
    out = [
        *_term(
            "fsdp2_reduce_scatter_input_root",
            root.reduce_in,
            ("backward_end",),
            f"{world} x {rs}: the root's reduce-scatter input",
            f"{_RS_IN}; {_RS_DTYPE}",
        ),
        *_term(
            "fsdp2_reduce_scatter_output_root",
            root.reduce_out,
            ("backward_end",),
            f"{rs}: the root's reduce-scatter output",
            f"{_RS_OUT}; {_RS_DTYPE}",
            stream=REDUCE_SCATTER_STREAM,
        ),
        *_term(
            "fsdp2_last_unsharded_grad",
            root.last,
            ("backward_end",),
            f"{groups.root.last:,} elements x {g} B ({grad}): the root's last gradient, "
            "unsharded, through its reduce-scatter",
            _RS_LAST,
        ),
    ]
    if at_reduce >= cast:
        out += _term(
            "gloo_reduce_scatter_copy",
            copy,
            ("backward_end",),
            f"{world} x {rs}: gloo's copy of the reduce-scatter input",
            _GLOO_RS,
        )
    else:
        out += _term(
            "fsdp2_sharded_root_grads",
            root.sharded_grads,
            ("backward_end",),
            f"{groups.root.grad_padded:,} elements x {o} B ({shard}): the root's "
            f"sharded gradients, cast from {reduce} beside the reduce-scatter output",
            _RS_CAST,
            stream=REDUCE_SCATTER_STREAM,
        )
    return True, out


def between_phases(
    root: _Fsdp2Bytes,
    block: _Fsdp2Bytes,
    *,
    layers: int,
    reshard: bool,
    layer: int,
    acts: StepActivations,
    head: _Fsdp2Bytes | None = None,
) -> list[Transient]:
    """FSDP2 moments between the timeline's phase points, each counted at the nearest point
    where it holds more than that point, as the excess over it (the bytes the point holds
    and the moment does not are subtracted; a term only where the excess is positive):

    - forward: a layer's all-gather and copy-out, while the previous group's flat
      all-gather output is still kept (_AG_KEPT) and this layer and the later ones have
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
    The decoder layers' backward is _fsdp2_layer_backward."""
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
                source=f"{TITAN_WRAP}; {_AG_OUT}; {_AG_COPY_OUT}; {_AG_KEPT}",
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
                    source=f"{_AG_OUT}; {_AG_KEPT}",
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
                    source=f"{_AG_OUT}; {_FSDP2}_fsdp_param_group.py::wait_for_unshard "
                    f"L486-489 (freed after the copy-out in backward); {_PREFETCH}",
                )
            )
    return out


def _fsdp2_layer_backward(
    block: _Fsdp2Bytes,
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
    until this layer's post-backward, _RS_IN) and k layers' sharded gradients, minus k
    layers' saved tensors (`saved` each), minus k resharded layers under ZeRO-2 and the
    prefetch the first layer does not make under ZeRO-3 (_PREFETCH). At the end of its
    backward its saved tensors are gone and its gradients made (_POST_BW); then its
    post-backward reshards it and pops the previous input before allocating its own, copying
    the gradients in and reduce-scattering (output, gloo's copy, the last gradient: _RS_OUT,
    _GLOO_RS, _RS_LAST). Those two moments come after the layer's autograd ops (FSDP2's
    post-backward runs from RegisterPostBackwardFunction's backward once the gradient has
    reached the layer's inputs: _POST_BW_HOOK), so the backward point's working set is gone
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
            source=f"{TITAN_WRAP}; {_POST_BW}; {_RS_IN}; {_RS_OUT}; {_RS_DTYPE}; {_RS_LAST}; "
            f"{_GLOO_RS}; {_PREFETCH}",
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
        source=f"{_POST_BW}; {_POST_BW_HOOK}; {_RS_IN}; {_RS_OUT}; {_RS_DTYPE}; {_RS_LAST}; "
        f"{_GLOO_RS}; {_PREFETCH}",
    )


def shard_dtype(recipe: Recipe) -> str:
    """The sharded parameters' and gradients' dtype: the accumulation dtype, else the master
    weights' (the sharded parameters stay in it; MixedPrecisionPolicy.param_dtype, the
    recipe's parameters, is only the unsharded copy's), else the parameters'."""
    return recipe.gradient_accumulation or recipe.master_weights or recipe.parameters
