"""FSDP2 over torch's DTensor tensor parallelism (torchtitan's plan, as memplan verify runs it:
memplan/verify/tensor_parallel.py): the transients alive at the end of the backward that
memplan.states.engines.fsdp2.step leaves out (it models FSDP2 sharding over more than one
data rank; TP without data parallelism gives FSDP2 a one-rank mesh).

Measured on 2 gloo ranks (torch 2.13, FSDPMemTracker, tests/test_verify_tp.py): the step's
peak is in the root group's post-backward (foreach_reduce), right after the vocab-parallel
embedding's gradient is redistributed from Replicate to the parameter's Shard(0). Alive then,
beside the model states and every gradient the rank keeps:

- tp_fsdp2_unsharded_root: the root group's unsharded parameters. On a one-rank mesh FSDP2
  still copies every sharded parameter into its own unsharded storage
  (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::FSDPParamGroup.wait_for_unshard,
  `world_size == 1` branch: `alloc_storage(tensor); tensor.copy_(all_gather_input)`);
- tp_embedding_gradient_whole: the embedding's gradient as embedding backward makes it,
  Replicate [vocab, hidden] (torch/distributed/tensor/_ops/_embedding_ops.py::
  embedding_dense_backward_strategy), alive while its row shard is copied out
  (FSDPParam.unsharded_grad_data: `grad.redistribute(placements=...)`); the shard itself is
  the rank's gradient, counted in gradients;
- tp_fsdp2_previous_reduce_scatter_input: the last decoder layer group's reduce-scatter
  input, which FSDP2 keeps until the next group's reduce-scatter is issued
  (_fsdp_param_group.py::FSDPParamGroup.post_backward, `self.comm_ctx.reduce_scatter_state`
  is replaced only after the root's foreach_reduce returns).

A parameter held in a fixed dtype (TensorSpec.dtype: peft's fp32 adapters) is unsharded,
given its gradient and reduce-scattered in that dtype where MixedPrecisionPolicy sets no
param_dtype (memplan.states.engines.fsdp2.buffers.OWN_DTYPE): the one-rank copy above
allocates each unsharded parameter in its all-gather input's dtype
(`fsdp_param.init_all_gather_outputs([...], [all_gather_input.dtype], ...)`), as on a
sharding mesh. Measured on 2 fake-process-group ranks with a mixed-dtype root under TP 2
(benchmarks/fsdp2_own_dtype.py, tests/test_fsdp2_own_dtype.py).
"""

from __future__ import annotations

from memplan.memory import Transient
from memplan.model.inventory import Inventory
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp2.buffers import OWN_DTYPE, OwnDtypes, fsdp2_bytes
from memplan.states.engines.fsdp2.groups import Fsdp2Group, Fsdp2Groups

SRC_UNSHARD_ONE_RANK = (
    "torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::"
    "FSDPParamGroup.wait_for_unshard (world_size == 1: per-parameter copy)"
)
SRC_WHOLE_EMBEDDING_GRAD = (
    "torch 2.13 torch/distributed/tensor/_ops/_embedding_ops.py::"
    "embedding_dense_backward_strategy (Replicate output), redistributed to Shard(0) in "
    "torch/distributed/fsdp/_fully_shard/_fsdp_param.py::FSDPParam.unsharded_grad_data"
)
SRC_PREVIOUS_RS = (
    "torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::"
    "FSDPParamGroup.post_backward (comm_ctx.reduce_scatter_state holds the previous "
    "group's reduce-scatter input until this group's foreach_reduce returns)"
)


def backward_end(
    inventory: Inventory,
    groups: Fsdp2Groups,
    *,
    world: int,
    param: int,
    grad: int,
    reduce: int | None = None,
    own: OwnDtypes | None = None,
) -> list[Transient]:
    """The terms above at `backward_end`, in bytes on the most-loaded rank. `groups` are the
    TP-local groups sharded `world` (data) ways; `param`/`grad`/`reduce` are the bytes per
    element of FSDP2's unsharded parameters (MixedPrecisionPolicy.param_dtype), gradients and
    reduce-scatter buffers (reduce_dtype; None: the gradients',
    memplan.states.engines.fsdp2.buffers.RS_DTYPE); with `own` (the policy as FSDP2 applies
    it) the parameters held in a fixed dtype at their own width (OWN_DTYPE)."""
    out: list[Transient] = []
    rs = reduce or grad
    if groups.layers:
        block = groups.block
        # The recipe's shard width does not enter reduce_in: any stand-in will do.
        rs_in = fsdp2_bytes(block, world, param, grad, grad, rs, own).reduce_in
        out.append(
            Transient(
                name="tp_fsdp2_previous_reduce_scatter_input",
                bytes=rs_in,
                phases=("backward_end",),
                formula=f"{world} x {block.grad_padded:,} x {rs} B "
                "(the last layer group's reduce-scatter input)" + _own_note(block, own),
                source=SRC_PREVIOUS_RS + (f"; {OWN_DTYPE}" if own and block.fixed else ""),
            )
        )
    if world > 1:
        return out  # memplan.states.engines.fsdp2.step models the rest on a sharding mesh
    root = groups.root
    out.append(
        Transient(
            name="tp_fsdp2_unsharded_root",
            bytes=fsdp2_bytes(root, 1, param, grad, grad, rs, own).unsharded,
            phases=("backward_end",),
            formula=f"{root.padded:,} x {param} B (the root's unsharded parameters)"
            + _own_note(root, own),
            source=SRC_UNSHARD_ONE_RANK + (f"; {OWN_DTYPE}" if own and root.fixed else ""),
        )
    )
    arch = inventory.architecture
    table = next((t for t in inventory.parameters if t.role == "embedding" and t.trainable), None)
    if arch is not None and table is not None:
        whole = arch.vocab_size * (table.numel // table.shape[0])
        # Its gradient is in the dtype it is computed in: its own where held in a fixed one
        # and the policy does not cast it (OWN_DTYPE).
        g = dtype_bytes(own.gathered(table.dtype)) if own and table.dtype else grad
        out.append(
            Transient(
                name="tp_embedding_gradient_whole",
                bytes=whole * g,
                phases=("backward_end",),
                formula=f"[{arch.vocab_size:,}, {table.numel // table.shape[0]}] x {g} B "
                "(Replicate, before its row shard is copied out)",
                source=SRC_WHOLE_EMBEDDING_GRAD,
            )
        )
    return out


def _own_note(group: Fsdp2Group, own: OwnDtypes | None) -> str:
    """How a group's parameters held in a fixed dtype enter its formula, in words."""
    if own is None or not group.fixed:
        return ""
    held = ", ".join(f"{p.dtype}: {p.gathered:,} gathered elements" for p in group.fixed)
    return f"; those held in a fixed dtype ({held}) at their own width unless cast (OWN_DTYPE)"
