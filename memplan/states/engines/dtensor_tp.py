"""Transients of torch's DTensor tensor parallelism (torchtitan's plan, as memplan verify runs
it: memplan/verify/tensor_parallel.py) that the single-device terms leave out, under either
torch engine (ddp, fsdp2; FSDP2's own end of backward under TP: memplan.states.engines.fsdp2.tp).

loss_parallel's backward (loss_parallel_gradient): torch's handler fuses nll_loss and
log_softmax backward over the rank's vocabulary shard
(torch/distributed/tensor/parallel/loss.py::_nll_loss_and_log_softmax_backward):
`grad_input = torch.zeros_like(x)` ... `return (grad_input + torch.exp(x)) * grad_output`, so
three [tokens, vocab / TP] fp32 tensors are alive at once (grad_input, the sum and the
product) where the unsharded nll_loss_backward + _log_softmax_backward_data hold two
(timeline's logits_gradient): one more comes on top. Measured on a 2-D (data 2 x tensor 2)
bf16-mixed FSDP2 run, whose peak is this moment (tests/test_verify_tp.py).
"""

from __future__ import annotations

from memplan.memory import Transient

SRC_LOSS_PARALLEL = (
    "torch 2.13 torch/distributed/tensor/parallel/loss.py::_nll_loss_and_log_softmax_backward "
    "(grad_input, grad_input + exp(x), and their product with grad_output)"
)
SRC_WHOLE_MASTER_GRAD = (
    "memplan/verify/build.py::MasterWeights.grads_in (`p.grad.to(master.dtype)`: the cast of "
    "a Replicate DTensor is Replicate, torch 2.13 torch/distributed/tensor/_ops/"
    "_tensor_ops.py::default_strategy) over the whole embedding gradient of "
    "torch/distributed/tensor/_ops/_embedding_ops.py::embedding_dense_backward_strategy"
)
# The model-state row of DDP over DTensor TP holding the rows of the embedding's gradient
# other TP ranks own (memplan.states.stages._whole_embedding_gradient).
WHOLE_EMBEDDING_GRADIENT = "embedding gradient (whole)"


def loss_parallel_gradient(sharded_logits_fp32: int) -> Transient:
    """The third [tokens, vocab / TP] fp32 tensor of loss_parallel's backward, at
    `backward_start` (`sharded_logits_fp32`: bytes of one such tensor on this rank)."""
    return Transient(
        name="tp_loss_parallel_gradient",
        bytes=sharded_logits_fp32,
        phases=("backward_start",),
        formula="[tokens, vocab / TP] x 4 B (the third tensor of the fused backward)",
        source=SRC_LOSS_PARALLEL,
    )


SRC_LOG_SOFTMAX = (
    "torch 2.13 torch/distributed/tensor/parallel/loss.py::_log_softmax (shifted = x - x_max; "
    "torch.sum(torch.exp(shifted)); result = shifted - shifted_logsumexp)"
)


def loss_parallel_log_softmax(sharded_logits_fp32: int) -> Transient:
    """loss_parallel's forward log-softmax is decomposed (SRC_LOG_SOFTMAX): beside the fp32
    logits and the output it saves, `shifted` is alive while torch.exp(shifted) is summed
    and while the output is computed: one more [tokens, vocab / TP] fp32 tensor than the
    fused _log_softmax kernel holds, at the loss."""
    return Transient(
        name="tp_loss_parallel_log_softmax",
        bytes=sharded_logits_fp32,
        phases=("loss",),
        formula="[tokens, vocab / TP] x 4 B (`shifted`, or exp(shifted) before the output exists)",
        source=SRC_LOG_SOFTMAX,
    )


def whole_embedding_master_gradient(extra_elements: int, master_bytes: int) -> Transient:
    """DDP over DTensor TP with fp32 master weights: the embedding's 16-bit gradient is whole
    (Replicate [vocab, hidden], the WHOLE_EMBEDDING_GRADIENT row), so its master gradient,
    cast from it for the step, is whole too: the rows other TP ranks own come on top of
    master_gradients (the rank's own master elements, memplan.states.optimizer_step), at the
    optimizer step. Measured: TP 2 ddp bf16-mixed (tests/test_verify_tp.py)."""
    return Transient(
        name="tp_master_gradient_whole_embedding",
        bytes=extra_elements * master_bytes,
        phases=("optimizer_step",),
        formula=f"{extra_elements:,} elements (rows other TP ranks own) x {master_bytes} B",
        source=SRC_WHOLE_MASTER_GRAD,
    )
