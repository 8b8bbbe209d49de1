"""FSDP2 under torch.distributed.pipelining (torchtitan's PP): the stage's gradients are
accumulated unsharded over the micro-batches and reduce-scattered once, after the last one.

torch 2.13, torch/distributed/pipelining/stage.py:
- `_PipelineStageBase.backward_maybe_with_nosync` (L844-848): for an `FSDPModule` stage every
  micro-batch's backward runs with `set_requires_gradient_sync(False)`,
  `set_reshard_after_backward(False)` and `set_is_last_backward(False)`, so no group
  reduce-scatters and none reshards after its backward;
- `perform_reduce_grad` (L1164-1191), the REDUCE_GRAD action schedules.py::_add_reduce_grad
  puts right after each stage's last backward, turns them back on and runs every group's
  `post_backward`, which reduce-scatters the accumulated gradients and reshards.

torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::post_backward L603-612 (reduce_grads
False): `accumulate_unsharded_grad_if_needed`, then `to_accumulated_grad_if_needed`, which
(_fsdp_param.py L802-813) moves the unsharded gradient into `unsharded_accumulated_grad`,
cast to `reduce_dtype` when that differs from the gradient's dtype (torchtitan: param_dtype
bf16, reduce_dtype fp32, so the stage's unsharded gradients are kept in fp32). Later
micro-batches add their gradient into it (`accumulate_unsharded_grad_if_needed`, L815-821).
So from the first micro-batch's backward to the end of the step, every parameter of the
stage (TP-local, not FSDP-sharded) holds one unsharded gradient in that dtype; in 1F1B's
steady state the later micro-batches' forwards run beside it.

The sharded gradients appear only in `perform_reduce_grad` (GradientLife.pipelined).
"""

from __future__ import annotations

from functools import lru_cache

from memplan.memory import Transient
from memplan.model.inventory import Inventory
from memplan.precision import dtype_bytes
from memplan.states.engines.base import StepActivations, StepStates

SRC_PP_FSDP = (
    "torch 2.13 torch/distributed/pipelining/stage.py::backward_maybe_with_nosync L844-848 "
    "(set_requires_gradient_sync(False), set_reshard_after_backward(False)), "
    "perform_reduce_grad L1164-1191; torch/distributed/fsdp/_fully_shard/_fsdp_param.py::"
    "to_accumulated_grad_if_needed L802-813, accumulate_unsharded_grad_if_needed L815-821"
)


def accumulated_dtype(states: StepStates) -> str:
    """The dtype of the accumulated unsharded gradients: reduce_dtype when set (FSDP2 casts
    the gradient to it), else the unsharded gradients' own."""
    return states.layout.reduce_dtype or states.recipe.gradients


def accumulated_gradients(states: StepStates, acts: StepActivations) -> list[Transient]:
    """The stage's unsharded gradients accumulated over the pipeline's micro-batches.

    A rank that runs a forward after its first backward (1F1B's steady state: it holds fewer
    layer-micro-batches at its peak than it runs forwards, `acts.layers_in_flight` < m x its
    layers) holds them beside its peak in-flight activations: alive from the forward to the
    end of backward. With several local stages (interleaved, zbv) every stage's gradients
    are counted there, an upper bound: a stage's exist only after its first backward, and
    the steady state may end before the first stage's has run. A rank whose micro-batches
    are all in flight before the first backward (m <= its in-flight count: 1F1B's first
    ranks when m <= P, GPipe) has them only once backward runs: at the end of backward, and
    at the backward point beyond what that point holds by the gradients less one
    micro-batch's decoder layers (the first micro-batch's
    backward done: its saved tensors gone, every gradient of the stage made)."""
    if states.layout.pipeline <= 1:
        return []
    _, layers = _trainable_and_layers(states.inventory)
    steady = acts.layer is None or acts.layers_in_flight < acts.microbatches * layers
    # Remembered per inventory (plan asks again for every micro-batch size, recomputation
    # policy and engine view of a layout): a fresh list.
    layer = None if steady else acts.layer or 0
    return list(_accumulated(states.inventory, accumulated_dtype(states), layer))


@lru_cache(maxsize=4096)
def _accumulated(inventory: Inventory, dtype: str, layer: int | None) -> tuple[Transient, ...]:
    """`accumulated_gradients` of a pipelined rank whose model is `inventory`, its gradients
    accumulated in `dtype`: `layer` None in 1F1B's steady state, else one decoder layer's
    saved bytes."""
    elements, layers = _trainable_and_layers(inventory)
    n_bytes = elements * dtype_bytes(dtype)
    if n_bytes <= 0:
        return ()
    what = (
        f"{elements:,} stage parameters (unsharded) x {dtype_bytes(dtype)} B ({dtype}): every "
        "group's unsharded_accumulated_grad, kept until the last micro-batch's reduce-scatter"
    )
    if layer is None:
        return (
            Transient(
                name="fsdp2_pipeline_accumulated_grads",
                bytes=n_bytes,
                phases=("forward", "loss", "backward_start", "backward", "backward_end"),
                formula=what,
                source=SRC_PP_FSDP,
            ),
        )
    one = layers * layer
    out = [
        Transient(
            name="fsdp2_pipeline_accumulated_grads",
            bytes=n_bytes,
            phases=("backward_end",),
            formula=what,
            source=SRC_PP_FSDP,
        )
    ]
    if n_bytes > one:
        out.append(
            Transient(
                name="fsdp2_pipeline_accumulated_grads_drain",
                bytes=n_bytes - one,
                phases=("backward",),
                formula=f"{n_bytes:,} B accumulated gradients - {layers} layers x "
                f"{layer:,} B saved by the micro-batch whose backward is done "
                "(every micro-batch was in flight before the first backward)",
                source=SRC_PP_FSDP,
            )
        )
    return tuple(out)


@lru_cache(maxsize=64)
def _trainable_and_layers(inventory: Inventory) -> tuple[int, int]:
    """The stage's trainable elements and its decoder layers (inventories hash by identity;
    plan asks for every layout of a search)."""
    elements = sum(t.numel for t in inventory.parameters if t.trainable)
    layers = len({t.layer for t in inventory.parameters if t.layer is not None})
    return elements, layers
