"""torch FSDP1's part of a training step: the unsharded flat parameters and the gradient
reduction's buffers on top of the sharded model states (memplan.states.engines.fsdp1.sharding).

Read from torch 2.13 torch/distributed/fsdp/_runtime_utils.py (abbreviations: PRE_FW =
_pre_forward_unshard, POST_FW = _post_forward_reshard, ROOT = _root_pre_forward,
POST_BW = _post_backward_hook, RG = _reduce_grad, RST = _get_reduce_scatter_tensors,
CAST = _cast_grad_to_param_dtype) and _flat_param.py (UNSHARD = FlatParamHandle.unshard,
_alloc_padded_unsharded_flat_param: `_full_param_padded`, the unsharded flat parameter in
the compute dtype; _use_low_precision_shard: `_mp_shard`, the shard cast to param_dtype
before the all-gather, freed after it). The wrapping and knobs are accelerate's under the HF
Trainer (memplan.states.engines.fsdp1.sharding): backward_prefetch None (Trainer's
"NO_PREFETCH"), limit_all_gathers True, so at most one decoder layer is gathered at a time
with FULL_SHARD. What exists when:

- forward: the root's flat parameter is unsharded by ROOT and not resharded after forward
  (POST_FW: `free_unsharded_flat_param = not state._is_root and ...`), so it stays gathered
  until its post-backward; each decoder layer is gathered by PRE_FW and, under FULL_SHARD,
  freed by POST_FW; under SHARD_GRAD_OP it stays gathered until its post-backward.
- backward: FULL_SHARD gathers each layer again in its pre-backward hook; POST_BW frees the
  unsharded parameter (`_post_backward_reshard`, before the reduction), then RG
  reduce-scatters the unsharded gradient (the padded unsharded size in the compute dtype:
  autograd's gradient of the flat parameter; RST pads only when the world size does not
  divide it, which use_orig_params' padding rules out) into a new shard (`empty_like` of one
  chunk, reduce dtype), and CAST casts that shard to the at-rest dtype (the kept sharded
  gradient, `_saved_grad_shard`); the unsharded gradient dies when the hook returns.
- NO_SHARD keeps the whole flat parameter (and, under MixedPrecision, `_mp_shard`, its
  param_dtype copy, from its forward until its post-backward) and all-reduces the gradient.

Phase points are memplan.memory's; a moment between two points is counted at the point it
exceeds (tests/test_fsdp1.py holds the sum to the measured peaks of each phase).
"""

from __future__ import annotations

from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp1.prefetch import post_freed, prefetched_layer
from memplan.states.engines.fsdp1.sharding import FlatUnit

SRC_RT = "torch/distributed/fsdp/_runtime_utils.py (2.13)"
SRC_UNSHARD = "torch/distributed/fsdp/_flat_param.py::FlatParamHandle.unshard (2.13)"

UNSHARDED_ROOT = "fsdp1 unsharded root"
UNSHARDED_LAYERS = "fsdp1 unsharded layers"
REDUCE_LAYER = "fsdp1 layer gradient reduction"
REDUCE_ROOT = "fsdp1 root gradient reduction"


def _reduction(
    unit: FlatUnit, *, param: int, reduce: int, at_rest: int, sharded: bool
) -> tuple[int, str]:
    """POST_BW of one unit, the unsharded parameter already freed: the unsharded gradient in
    the compute dtype, the reduce-scatter output in the reduce dtype (NO_SHARD all-reduces
    the gradient in place: _reduce_grad_no_shard) and its cast to the at-rest dtype (CAST;
    no cast when the dtypes agree)."""
    grad = unit.padded * param
    out = unit.shard * reduce if sharded else 0
    cast = unit.shard * at_rest if at_rest != reduce else 0
    return (
        grad + out + cast,
        f"unsharded gradient {unit.padded:,} x {param} B"
        + (f" + reduce-scatter output {unit.shard:,} x {reduce} B" if out else "")
        + (f" + cast {unit.shard:,} x {at_rest} B" if cast else ""),
    )


def step_buffers(
    units: tuple[FlatUnit, ...],
    *,
    stage: int,
    world: int,
    param: str,
    at_rest: str,
    embedding_backward: Transient | None,
    accumulating: bool = False,
    layer_done: int = 0,
    prefetch: str = "none",
    gloo: bool = False,
) -> list[Transient]:
    """FSDP1's buffers at each phase point (FULL_SHARD stage 3, SHARD_GRAD_OP stage 2;
    NO_SHARD stage 0 under MixedPrecision, its `_mp_shard` gathered and freed as FULL_SHARD
    gathers and frees: _flat_param.py::FlatParamHandle.post_reshard frees it "until the
    reshard", which POST_FW and POST_BW run). `accumulating`: the last of several
    micro-batches under no_sync() (memplan.states.engines.fsdp1.accumulation), whose root
    gradient, accumulated in place, is alive beside the embedding's backward too.
    `prefetch` (FULL_SHARD only): FSDP1's backward_prefetch, `pre` and `post`
    (fsdp1.prefetch). `gloo`: CPU ranks, whose reduce-scatter copies its input."""
    pb, rb, ab = dtype_bytes(param), dtype_bytes(param), dtype_bytes(at_rest)
    sharded = stage != 0
    root = next((u for u in units if u.name == "root"), None)
    layers = [u for u in units if u.name != "root"]
    out: list[Transient] = []
    root_bytes = root.padded * pb if root else 0
    if root is not None:
        out.append(
            Transient(
                name=UNSHARDED_ROOT,
                bytes=root_bytes,
                phases=("forward", "loss", "backward_start", "backward"),
                formula=f"the root's padded flat parameter {root.padded:,} x {pb} B ({param})",
                source=f"{SRC_RT}::_root_pre_forward, _post_forward_reshard; {SRC_UNSHARD}",
            )
        )
    if layers:
        one = max(u.padded for u in layers) * pb
        many = sum(u.padded for u in layers) * pb
        if prefetch == "pre" and stage == 3 and len(layers) > 1:
            out += prefetched_layer(layers, param=param, pb=pb)
        if stage in (3, 0):
            out.append(
                Transient(
                    name=UNSHARDED_LAYERS,
                    bytes=one,
                    phases=("forward", "backward"),
                    formula=f"one decoder layer's padded flat parameter, {one:,} B (FULL_SHARD)",
                    source=f"{SRC_RT}::_pre_forward_unshard, _post_forward_reshard",
                )
            )
        else:
            out.append(
                Transient(
                    name=UNSHARDED_LAYERS,
                    bytes=many,
                    phases=("forward", "loss", "backward_start", "backward"),
                    formula=f"{len(layers)} decoder layers' padded flat parameters, {many:,} B "
                    "(SHARD_GRAD_OP: kept from forward to their post-backward)",
                    source=f"{SRC_RT}::_post_forward_reshard (SHARD_GRAD_OP keeps them)",
                )
            )
        worst = max(layers, key=lambda u: u.padded)
        if prefetch == "post" and stage == 3:
            out += post_reduction(worst, layers=layers, pb=pb, rb=rb, ab=ab, gloo=gloo)
        else:
            held, formula = _reduction(worst, param=pb, reduce=rb, at_rest=ab, sharded=sharded)
            # On top of the layer's unsharded parameter (UNSHARDED_LAYERS) at the backward
            # point, the larger of two moments: at the end of the layer's backward the flat
            # gradient made beside the parameter (its pieces, the original parameters'
            # gradients, still alive where the layer's saved tensors were: counted as those);
            # in the post-backward hook the parameter freed first, then the reduction's tensors,
            # once the layer's backward has freed `layer_done` (its saved tensors and working
            # set). Measured: the first holds more in fp32, the second under bf16 MixedPrecision
            # (benchmarks/results/fsdp1.json).
            before = worst.padded * pb
            excess = max(before, held - worst.padded * pb - layer_done)
            out += [
                Transient(
                    name=REDUCE_LAYER,
                    bytes=excess,
                    phases=("backward",),
                    formula=f"max(unsharded gradient {before:,} B beside the parameter, "
                    f"{formula} - the freed parameter {worst.padded * pb:,} B - the layer's "
                    f"freed saved tensors and working set {layer_done:,} B)",
                    source=f"{SRC_RT}::_post_backward_hook, _reduce_grad, "
                    "_cast_grad_to_param_dtype",
                )
            ][: 1 if excess > 0 else 0]
    if root is not None:
        held, formula = _reduction(root, param=pb, reduce=rb, at_rest=ab, sharded=sharded)
        embedding = embedding_backward.bytes if embedding_backward is not None else 0
        # with accumulation the root's unsharded gradient (the reduction's input, `held`'s
        # first term) is alive during the embedding's backward too
        kept = root.padded * pb if accumulating else 0
        if embedding + root_bytes + kept > held:
            # the embedding's backward, the root still gathered, holds more
            out.append(
                Transient(
                    name=UNSHARDED_ROOT,
                    bytes=root_bytes,
                    phases=("backward_end",),
                    formula=f"the root's padded flat parameter {root.padded:,} x {pb} B, "
                    "gathered until its post-backward",
                    source=f"{SRC_RT}::_post_backward_hook",
                )
            )
            if kept:
                out.append(
                    Transient(
                        name="fsdp1 accumulated root gradient",
                        bytes=kept,
                        phases=("backward_end",),
                        formula=f"the root's unsharded gradient {root.padded:,} x {pb} B, "
                        "kept by no_sync() from the earlier micro-batches",
                        source=f"{SRC_RT}::_post_backward_hook, _finalize_params",
                    )
                )
            if embedding_backward is not None:
                out.append(embedding_backward)
        else:
            out.append(
                Transient(
                    name=REDUCE_ROOT,
                    bytes=held,
                    phases=("backward_end",),
                    formula=formula,
                    source=f"{SRC_RT}::_post_backward_hook, _reduce_grad",
                )
            )
    return out


def root_gradient_pieces(units: tuple[FlatUnit, ...], *, param: str) -> Transient | None:
    """NO_SHARD without MixedPrecision, at the end of backward: the root's flat gradient is
    made (the backward of the flat parameter's split into its original parameters' views
    concatenates their gradients: _flat_param.py::FlatParamHandle._get_unflat_views_aligned,
    `split`) while those pieces are still alive; the timeline counts the flat gradients, the
    pieces (the root's padded size in the parameters' dtype) come on top. The all-reduce is
    in place (_reduce_grad_no_shard)."""
    root = next((u for u in units if u.name == "root"), None)
    if root is None:
        return None
    pb = dtype_bytes(param)
    return Transient(
        name="fsdp1 root gradient pieces",
        bytes=root.padded * pb,
        phases=("backward_end",),
        formula=f"the root's original parameters' gradients, {root.padded:,} x {pb} B ({param}), "
        "beside the flat gradient they are concatenated into",
        source="torch/distributed/fsdp/_flat_param.py::FlatParamHandle._get_unflat_views_aligned "
        "(2.13, torch.split); tools/autograd/derivatives.yaml: split_with_sizes_backward",
    )


def post_reduction(
    worst: FlatUnit, *, layers: list[FlatUnit], pb: int, rb: int, ab: int, gloo: bool
) -> list[Transient]:
    """A decoder layer's end of backward on top of its unsharded parameter
    (UNSHARDED_LAYERS) at the backward point: the larger of two moments. At the end of the
    layer's backward its flat gradient (`before`, the compute dtype) is made beside the
    parameter from its pieces, the original parameters' gradients (alive where the layer's
    saved tensors were: counted as those). In the post-backward hook the pieces are gone (as
    much as the flat gradient), the parameter is freed (under BACKWARD_POST the next layer
    gathered in its place, fsdp1.prefetch.post_freed) and the reduction adds its output
    (RST, the reduce dtype) and then its cast to the at-rest
    dtype (CAST), or during the collective gloo's copy of the input (CPU ranks). Measured
    (benchmarks/results/fsdp1.json, fsdp1-prefetch.json; hook by hook on 2 gloo ranks): the
    first holds more without prefetch, the second under BACKWARD_POST (+40,324 B bf16,
    +80,640 B fp32 over the first). (Without prefetch step_buffers keeps its earlier form of
    the hook's moment, less the layer's saved tensors and working set: it never holds more
    than the first moment there, and shipped estimates stay as they were.)"""
    before = worst.padded * pb
    out = worst.shard * rb
    cast = worst.shard * ab if ab != rb else 0
    copy = worst.padded * rb if gloo else 0
    freed = post_freed(layers, pb=pb)
    hook = out + max(copy, cast) - freed
    excess = max(before, hook)
    if excess <= 0:
        return []
    parts = [f"reduce-scatter output {worst.shard:,} x {rb} B"] if out else []
    if copy or cast:
        parts.append(
            f"gloo's input copy {worst.padded:,} x {rb} B" if copy >= cast else f"cast {cast:,} B"
        )
    return [
        Transient(
            name=REDUCE_LAYER,
            bytes=excess,
            phases=("backward",),
            formula=f"max(unsharded gradient {before:,} B beside the parameter, in the "
            f"post-backward hook {' + '.join(parts) or '0 B'} - the freed parameter "
            f"{freed:,} B (net of the next layer gathered in its place))",
            source=f"{SRC_RT}::_post_backward_hook, _reduce_grad, _cast_grad_to_param_dtype; "
            "_post_backward_reshard, _prefetch_handle"
            + ("; ProcessGroupGloo.cpp::reduce_scatter (input cloned)" if copy else ""),
        )
    ]
