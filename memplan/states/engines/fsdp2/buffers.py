"""torch FSDP2's buffers: the bytes one parameter group holds (`Fsdp2Bytes`), the streams
FSDP2 allocates on, and the torch 2.13 source lines every FSDP2 term cites
(memplan.states.engines.fsdp2.step and .moments build the terms from them)."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.memory import COMPUTE_STREAM, Phase, Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp2.fp8 import FP8_BYTES
from memplan.states.engines.fsdp2.groups import Fsdp2Group

# torch FSDP2 (`fully_shard`, torch 2.13) as memplan verify wraps a model
# (memplan/verify/rank.py::_wrap): one parameter group per decoder layer, then the root (every
# parameter outside the layers), each call given reshard_after_forward explicitly (True for
# ZeRO-3, False for ZeRO-2), so with ZeRO-3 the root is resharded after forward too (only
# reshard_after_forward=None keeps the root unsharded: _fully_shard.py L246, _fsdp_state.py
# L205). Files below are under torch/distributed/fsdp/_fully_shard/; lines are torch 2.13's.
FSDP2_SRC = "torch/distributed/fsdp/_fully_shard/"
AG_OUT = FSDP2_SRC + "_fsdp_collectives.py::foreach_all_gather L351-353 (all_gather_output)"
AG_COPY_OUT = (
    FSDP2_SRC + "_fsdp_collectives.py::foreach_all_gather_copy_out L457-463 "
    "(alloc_all_gather_outputs: the unsharded parameters' storage, padded)"
)
AG_KEPT = (
    FSDP2_SRC + "_fsdp_param_group.py::wait_for_unshard L476-485 (all_gather_state kept in "
    "forward), dropped by the next group's wait_for_unshard L429-432 but held by its local "
    "`prev_all_gather_state` through that group's copy-out, or freed by the root's "
    "post-forward (_fsdp_state.py L335-342)"
)
PREFETCH = FSDP2_SRC + "_fsdp_param_group.py::_backward_prefetch L795-830 (unshard only)"
RESHARD = (
    FSDP2_SRC + "_fsdp_param_group.py::post_forward L557-566, reshard L498-509 "
    "(reshard_after_forward), post_backward L637-638 (reshard_after_backward)"
)
POST_BW = FSDP2_SRC + "_fsdp_param_group.py::post_backward L618-630 (unsharded_param.grad)"
POST_BW_HOOK = (
    FSDP2_SRC + "_fsdp_param_group.py::_register_post_backward_hook L891-907, "
    "RegisterPostBackwardFunction.backward L1125-1127 (applied to the layer's inputs in its "
    "pre-forward, so post_backward runs once their gradients exist)"
)
RS_IN = (
    FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L592-606 (reduce_scatter_input, padded); "
    "kept in comm_ctx.reduce_scatter_states until the next group's post_backward "
    "(_fsdp_param_group.py L647-658, L717-719) or the final callback (_fsdp_state.py L431)"
)
RS_OUT = FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L612-616 (reduce_output)"
# The streams FSDP2 allocates on (FSDPCommContext.lazy_init, _fsdp_param_group.py L80-102):
# in forward and pre-backward the flat all-gather output is made on all_gather_copy_in_stream
# (get_all_gather_streams L116-127, foreach_all_gather L336-353); the reduce-scatter output,
# and so the sharded gradients that are its views or its cast, on reduce_scatter_stream
# (foreach_reduce L611-616, L685-696: "The RS output is allocated in the RS stream and used
# in the default stream (for optimizer)"). The unsharded parameters (copy-out) and the
# reduce-scatter input are made on the default stream (L431-463, L592-606).
ALL_GATHER_STREAM = "fsdp2_all_gather_copy_in"
REDUCE_SCATTER_STREAM = "fsdp2_reduce_scatter"
AG_STREAMS = FSDP2_SRC + "_fsdp_param_group.py::get_all_gather_streams L116-127"
# MixedPrecisionPolicy.reduce_dtype: FSDPParam.init_dtype_attrs clamps it to None when it
# equals param_dtype (_fsdp_param.py L589-593) and foreach_reduce falls back to the
# gradients' dtype (`reduce_dtype = reduce_dtype or grad_dtype`, _fsdp_collectives.py L560);
# the reduce-scatter input and output are allocated in it (L592-616), the unsharded gradients
# (param_dtype) cast into the input by the copy-in (`torch._chunk_cat(..., out=...)`,
# foreach_reduce_scatter_copy_in L778-786), and the output is cast to the sharded
# parameters' dtype only if it differs (_to_dtype_if_needed L696: with reduce_dtype fp32 and
# fp32 sharded parameters the sharded gradients are views of the output, no cast).
RS_DTYPE = FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L560, L592-616, L696"
# HSDP (a 2-D replicate x shard mesh): foreach_reduce all-reduces the reduce-scatter output
# over the replicate dimension in place (L658) and returns it as `all_reduce_input` (L671);
# the group keeps it in `_all_reduce_state` (_fsdp_param_group.py L759) until its next
# post-backward or finalize_backward at the end of backward (L768). Where reduce_dtype is the
# sharded parameters' dtype the sharded gradients are views of it (no extra bytes); otherwise
# the gradients are a cast copy and every reduced group's output stays besides.
HSDP_HOLD = (
    FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L658-671; _fsdp_param_group.py L759, L768"
)
RS_CAST = FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L696 (_to_dtype_if_needed)"
RS_LAST = (
    FSDP2_SRC + "_fsdp_collectives.py::foreach_reduce L580-590: the loop variable "
    "`unsharded_grad` still holds the last gradient after `unsharded_grads.clear()` (L606), "
    "until foreach_reduce returns"
)
# gloo has no reduce-scatter of its own: it all-reduces a copy of the input and copies this
# rank's chunk out when the caller waits (the copy goes with the work object). Its worker
# thread drops its own reference only after waking the caller, so now and then the copy
# outlives the collective by a few ops (seen as a rare one-rank spike in memplan verify).
GLOO_RS = (
    "torch/csrc/distributed/c10d/ProcessGroupGloo.cpp::reduce_scatter_tensor_coalesced "
    "(`buffers.push_back(inputTensors[i].clone())`, all-reduced, then "
    "`outputTensors[i].copy_(buffers[i].chunk(worldSize)[rank])` in the LambdaWork's wait)"
)


@dataclass(frozen=True, slots=True)
class Fsdp2Bytes:
    """The buffers of one group, in bytes (see step_buffers())."""

    unsharded: int
    """world x padded x param dtype: the all-gather output, and again the parameters (with
    fp8 all-gather, world x fp8_padded of them at 1 B: memplan.states.engines.fsdp2.fp8)."""
    grads: int
    reduce_in: int
    """world x grad_padded x the reduce dtype (RS_IN, RS_DTYPE)."""
    reduce_out: int
    sharded_grads: int
    last: int


# A parameter held in a dtype of its own (Fsdp2Group.fixed) is all-gathered, unsharded,
# given its gradient and reduced in that dtype unless MixedPrecisionPolicy casts it:
# _fsdp_param.py::FSDPParam.init_dtype_attrs L586-600 clamps param_dtype to None where it
# equals the sharded parameter's dtype or that dtype is not floating point (packed 4-bit
# codes in uint8), and reduce_dtype to None where it equals param_dtype; the all-gather input
# is the shard cast to param_dtype if set (_to_dtype_if_needed, L901-907), else the shard
# itself. _fsdp_collectives.py::foreach_all_gather L338-353 gathers a group of mixed input
# dtypes as bytes (_get_all_gather_input_metadatas L789-808 turns the output dtype into
# uint8, each input `.view(torch.uint8)`), so the flat output holds each parameter's own
# bytes, and foreach_all_gather_copy_out L453-462 allocates each unsharded parameter in its
# all-gather input's dtype (_fsdp_param.py::FSDPParam.init_all_gather_outputs L617-628).
# foreach_reduce L552-560 requires the group's gradients to be of one dtype (else
# "FSDP reduce-scatter expects uniform gradient dtype") and reduces in `reduce_dtype or
# grad_dtype`; the sharded gradient is cast back to the sharded parameter's dtype (L696).
OWN_DTYPE = (
    FSDP2_SRC + "_fsdp_param.py::FSDPParam.init_dtype_attrs L586-600, init_all_gather_outputs "
    "L617-628; _fsdp_collectives.py::foreach_all_gather L338-353, "
    "_get_all_gather_input_metadatas L789-808, foreach_reduce L552-560, L696"
)
FLOATING = frozenset({"fp32", "fp16", "bf16", "fp8", "fp64"})
"""The dtypes torch calls floating point (`torch.dtype.is_floating_point`)."""


@dataclass(frozen=True, slots=True)
class OwnDtypes:
    """MixedPrecisionPolicy as FSDP2 applies it to a parameter held in a fixed dtype."""

    param_dtype: str | None
    """MixedPrecisionPolicy.param_dtype (None: every parameter computes in its own dtype;
    memplan verify sets it only under a recipe with master weights)."""
    reduce_dtype: str | None
    """MixedPrecisionPolicy.reduce_dtype (None: each group reduces in its gradients' dtype)."""

    def gathered(self, held: str) -> str:
        """The dtype a parameter held in `held` is all-gathered and computed in, and so its
        unsharded gradient's (init_dtype_attrs L597-599)."""
        if self.param_dtype is not None and held in FLOATING:
            return self.param_dtype
        return held

    def reduced(self, held: str) -> str:
        """The dtype its gradient is reduce-scattered in (init_dtype_attrs L592-593,
        foreach_reduce L560)."""
        if self.reduce_dtype is not None and self.reduce_dtype != self.param_dtype:
            return self.reduce_dtype
        return self.gathered(held)


def fsdp2_bytes(
    g: Fsdp2Group,
    world: int,
    param: int,
    grad: int,
    shard: int,
    reduce: int,
    own: OwnDtypes | None = None,
) -> Fsdp2Bytes:
    """`g`'s buffers with every parameter at the recipe's widths (param, grad, shard and
    reduce bytes), and with `own` those held in a fixed dtype at their own (OWN_DTYPE)."""
    ew = g.expert_world
    # fp8 all-gather (fsdp2.fp8, SRC_GATHER): the Float8Linear weights' share at 1 B each.
    fp8 = world * g.fp8_padded * (param - FP8_BYTES)
    unsharded = (world * g.padded + ew * g.expert_padded) * param - fp8
    grads = g.grads * grad
    reduce_in = (world * g.grad_padded + ew * g.expert_grad_padded) * reduce
    reduce_out = (g.grad_padded + g.expert_grad_padded) * reduce
    sharded_grads = (g.grad_padded + g.expert_grad_padded) * shard
    last = g.last * grad
    if own is not None:
        for part in g.fixed:
            up = dtype_bytes(own.gathered(part.dtype))
            down = dtype_bytes(own.reduced(part.dtype))
            unsharded += part.gathered * (up - param)
            grads += part.grads * (up - grad)
            reduce_in += part.reduce_in * (down - reduce)
            reduce_out += part.reduce_out * (down - reduce)
            sharded_grads += part.reduce_out * (dtype_bytes(part.dtype) - shard)
        if g.last_dtype is not None:
            last = g.last * dtype_bytes(own.gathered(g.last_dtype))
    return Fsdp2Bytes(
        unsharded=unsharded,
        grads=grads,
        reduce_in=reduce_in,
        reduce_out=reduce_out,
        sharded_grads=sharded_grads,
        last=last,
    )


def unsharded_formula(g: Fsdp2Group, world: int, param: str) -> str:
    """How `fsdp2_bytes(g, ...).unsharded` is made up, in words."""
    own = (
        "; of them "
        + ", ".join(f"{p.gathered:,} gathered elements held in {p.dtype}" for p in g.fixed)
        + ", at their own width where MixedPrecisionPolicy does not cast them (OWN_DTYPE)"
        if g.fixed
        else ""
    )
    if not g.fp8_padded:
        p = dtype_bytes(param)
        return f"{world} ranks x {g.padded:,} padded shard elements x {p} B ({param}){own}"
    return (
        f"{world} ranks x ({g.padded - g.fp8_padded:,} padded shard elements x "
        f"{dtype_bytes(param)} B ({param}) + {g.fp8_padded:,} Float8Linear weight elements x "
        f"{FP8_BYTES} B (fp8 all-gather: torchao 0.18 fsdp_pre_all_gather, memplan.states."
        "engines.fsdp2.fp8))" + own
    )


def term(
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
