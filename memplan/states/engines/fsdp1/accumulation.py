"""torch FSDP1 with gradient accumulation as accelerate runs it: every micro-batch but the
last inside `no_sync()` (accelerate 1.16 accelerator.py::Accelerator.accumulate and
no_sync, `sync_each_batch` False by default), the last one synchronising.

Read from torch 2.13 torch/distributed/fsdp/_runtime_utils.py (POST_BW = _post_backward_hook,
FREE = _should_free_in_backward, FINAL = _finalize_params) and _flat_param.py
(PREP = FlatParamHandle.prepare_gradient_for_backward):

- inside no_sync() (`state._sync_gradients` False) POST_BW reshards and returns before the
  reduction: the FlatParameter's `.grad` stays the unsharded gradient autograd made, in the
  compute dtype (the unsharded flat parameter's: bf16 under MixedPrecision), of the unpadded
  unsharded size (use_orig_params pads each flat parameter to the world size itself, so it
  is the padded size too); FINAL leaves it ("`.grad` remains the unsharded gradient from
  prior no_sync() iterations") and PREP keeps it for the next backward, where autograd
  accumulates into it. So from the second micro-batch's forward every unit's unsharded
  gradient is alive, until the last micro-batch's POST_BW reduce-scatters it and clears
  `.grad` (_reduce_grad: `flat_param.grad = None`).
- FREE: inside no_sync() the unsharded parameter is freed in POST_BW only for the
  strategies that reshard after forward (FULL_SHARD); SHARD_GRAD_OP keeps every unit's
  gathered from the first micro-batch to the last one's post-backward, which
  memplan.states.engines.fsdp1.step already counts from each forward to its post-backward
  (the root under FULL_SHARD is freed in its POST_BW and gathered again in the next
  forward, also as step counts it).
- the sharded gradient (`_saved_grad_shard`) is made only in the last micro-batch's POST_BW:
  no sharded gradient is alive before the last backward (GradientLife.pipelined).

The last micro-batch holds the most (the earlier ones hold the same unsharded gradients and
no reduction), so memplan's timeline, which is the last micro-batch's, adds them there.
Measured: benchmarks/results/fsdp1-accumulation.json (tests/test_fsdp1_accumulation.py).

NO_SHARD the same (POST_BW returns before _reduce_grad_no_shard's all-reduce when not
syncing): under MixedPrecision the kept `.grad` is the bf16 gradient of `_mp_shard`'s
views, as above (accumulated_gradients); without it the kept `.grad` is the fp32 gradient,
the model-state gradients themselves, alive from the first micro-batch (GradientLife's
default), and in each later backward autograd makes a unit's new flat gradient (the
concatenation of its original parameters' gradients, _flat_param.py::
FlatParamHandle._get_unflat_views_aligned) beside it before adding it in
(new_gradients_beside_kept). Measured: benchmarks/results/fsdp1-offload.json
(tests/test_fsdp1_offload.py).
"""

from __future__ import annotations

from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp1.sharding import FlatUnit

SRC = (
    "torch/distributed/fsdp/_runtime_utils.py::_post_backward_hook, _finalize_params; "
    "_flat_param.py::FlatParamHandle.prepare_gradient_for_backward (2.13); "
    "accelerate/accelerator.py::Accelerator.accumulate (1.16)"
)
ACCUMULATED = "fsdp1 accumulated unsharded gradients"
NEW_BESIDE_KEPT = "fsdp1 new flat gradient beside the kept one"


def accumulated_gradients(units: tuple[FlatUnit, ...], *, param: str) -> list[Transient]:
    """Every unit's unsharded gradient kept by no_sync() from the earlier micro-batches,
    alive in the last micro-batch from its forward through the backward point (memplan's
    backward point is the start of backward, before any unit's post-backward); at the end
    of backward only the root's is left (memplan.states.engines.fsdp1.step.step_buffers
    counts it there, beside the embedding's backward, or as the reduction's input)."""
    pb = dtype_bytes(param)
    total = sum(u.padded for u in units)
    if not total:
        return []
    return [
        Transient(
            name=ACCUMULATED,
            bytes=total * pb,
            phases=("forward", "loss", "backward_start", "backward"),
            formula=f"{len(units)} units' unsharded gradients, {total:,} x {pb} B ({param}), "
            "kept by no_sync() from the earlier micro-batches",
            source=SRC,
        )
    ]


def new_gradients_beside_kept(units: tuple[FlatUnit, ...], *, param: str) -> list[Transient]:
    """NO_SHARD without MixedPrecision, accumulating: the largest decoder layer's new flat
    gradient at the end of its backward (its pieces, the original parameters' gradients,
    counted where its saved tensors were, as fsdp1.step counts them) beside the kept
    `.grad`, which AccumulateGrad then adds it into; at the end of backward the root's
    (beside its pieces: fsdp1.step.root_gradient_pieces)."""
    pb = dtype_bytes(param)
    layer = max((u.padded for u in units if u.name != "root"), default=0)
    root = next((u.padded for u in units if u.name == "root"), 0)
    out = []
    for phase, elements, what in (
        ("backward", layer, "a decoder layer's"),
        ("backward_end", root, "the root's"),
    ):
        if elements:
            out.append(
                Transient(
                    name=NEW_BESIDE_KEPT,
                    bytes=elements * pb,
                    phases=(phase,),  # type: ignore[arg-type]
                    formula=f"{what} new flat gradient {elements:,} x {pb} B ({param}), "
                    "beside the gradient kept from the earlier micro-batches",
                    source="torch/distributed/fsdp/_flat_param.py::FlatParamHandle."
                    "_get_unflat_views_aligned (2.13, torch.split); torch/csrc/autograd/"
                    "functions/accumulate_grad.h::AccumulateGrad::accumulateGrad",
                )
            )
    return out
