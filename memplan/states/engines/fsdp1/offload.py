"""torch FSDP1 with `CPUOffload(offload_params=True)` (parallelism.offload.parameters: cpu):
accelerate 1.16's `fsdp_offload_params: true` (utils/dataclasses.py::
FullyShardedDataParallelPlugin: `CPUOffload(offload_params=...)`), the HF Trainer's
`--fsdp "full_shard offload auto_wrap"`, Lightning's `FSDPStrategy(cpu_offload=True)`.

Read from torch 2.13 torch/distributed/fsdp/_flat_param.py (ATTRS =
FlatParamHandle.init_flat_param_attributes, PRE = pre_unshard, LOW = _use_low_precision_shard,
WB = _writeback_orig_params, PREP_BW = prepare_gradient_for_backward, PREP_OPT =
prepare_gradient_for_optim, SHARDED = _use_sharded_flat_param) and _runtime_utils.py (ACC =
_accumulate_sharded_grad, OFF = _offload_grad, CB = _post_backward_final_callback):

- on the host, per rank (memplan.states.engines.offload moves the model-state rows there):
  ATTRS keeps the sharded flat parameter as `_local_shard`, pinned (`.pin_memory()`), and
  pre-allocates the sharded gradient `_cpu_grad` (`torch.zeros_like(_local_shard)`, pinned),
  both the shard's padded size in the at-rest dtype; SHARDED points the FlatParameter at
  `_local_shard` after every reshard, and PREP_OPT makes `_cpu_grad` its `.grad`, so the
  optimizer, over the original parameters (1-D views of the shard, use_orig_params), steps
  on the host and keeps its states there.
- on the GPU: the unsharded flat parameters and the reduction's buffers as without offload
  (memplan.states.engines.fsdp1.step); ACC still keeps each unit's reduce-scattered shard,
  cast to the at-rest dtype, as `_saved_grad_shard` on the GPU (OFF copies it into
  `_cpu_grad`), until CB's PREP_OPT deletes it at the end of backward: the sharded gradients
  are on the GPU at the end of backward, none in the optimizer step. PRE, with offload, copies
  the host shard to the GPU before each all-gather (`flat_param_to(device)`, or LOW's
  `_local_shard.to(device)` under MixedPrecision): one unit's shard in the at-rest dtype, alive
  while the unit is gathered.
- on CPU ranks (`hardware.device: cpu`, gloo) the compute device is the host: PRE's copies
  are no-ops (`flat_param.device == self.device`), and under FULL_SHARD each unit gathered
  again in backward gets its sharded gradient from its pre-backward on: WB finds the original
  parameters' `.grad` (views of last step's `_cpu_grad`, left by the forward's reshard)
  without a FlatParameter `.grad` and makes one, `torch.zeros_like(flat_param)` (the shard),
  which PREP_BW keeps as `_saved_grad_shard` (the gradient is on the compute device) and ACC
  accumulates into. On a GPU machine that tensor is made on the host (the FlatParameter is
  then `_local_shard`) and PREP_BW drops it (`grad_offloaded`).

Measured on 2 gloo ranks: benchmarks/results/fsdp1-offload.json (tests/test_fsdp1_offload.py).
"""

from __future__ import annotations

from memplan.memory import Transient
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp1.sharding import FlatUnit

SRC_FP = "torch/distributed/fsdp/_flat_param.py"
SRC_RT = "torch/distributed/fsdp/_runtime_utils.py"
SRC_GRADS = (
    f"{SRC_RT}::_accumulate_sharded_grad, _offload_grad; "
    f"{SRC_FP}::FlatParamHandle.prepare_gradient_for_optim (2.13)"
)
SRC_COPY = f"{SRC_FP}::FlatParamHandle.pre_unshard, _use_low_precision_shard (2.13)"
SRC_WRITEBACK = (
    f"{SRC_FP}::FlatParamHandle._writeback_orig_params, prepare_gradient_for_backward (2.13)"
)
DEVICE_GRADIENTS = "fsdp1 offload: sharded gradients on the device"
SHARD_COPY = "fsdp1 offload: host shard copied to the device"
WRITEBACK = "fsdp1 offload on CPU ranks: gradient shards from the pre-backward"


def device_gradients(units: tuple[FlatUnit, ...], *, at_rest: str) -> list[Transient]:
    """ACC / OFF / PREP_OPT: every unit's `_saved_grad_shard` on the GPU at the end of
    backward, the root's excepted (made in the root's post-backward, the last: the reduction's
    output counted by memplan.states.engines.fsdp1.step's root moment)."""
    ab = dtype_bytes(at_rest)
    shards = sum(u.shard for u in units if u.name != "root")
    if not shards:
        return []
    return [
        Transient(
            name=DEVICE_GRADIENTS,
            bytes=shards * ab,
            phases=("backward_end",),
            formula=f"the decoder layers' sharded gradients, {shards:,} x {ab} B ({at_rest}), "
            "kept as _saved_grad_shard after their copy to the host until the end of backward",
            source=SRC_GRADS,
        )
    ]


def shard_copies(
    layers: list[FlatUnit], *, at_rest: str, forward_room: int, backward_room: int, stage: int
) -> list[Transient]:
    """PRE on a GPU: the largest decoder layer's host shard copied to the device beside its
    all-gather, where the layer's forward (and under FULL_SHARD its backward) has not yet made
    its saved tensors and working set: counted by how much it exceeds that room (`*_room`, the
    bytes the phase point holds for the running layer and the copy does not meet)."""
    if not layers:
        return []
    ab = dtype_bytes(at_rest)
    copy = max(u.shard for u in layers) * ab
    out = []
    for phase, room in (("forward", forward_room), ("backward", backward_room)):
        if phase == "backward" and stage != 3:
            continue  # SHARD_GRAD_OP keeps the layers gathered from forward to post-backward
        excess = copy - room
        if excess > 0:
            out.append(
                Transient(
                    name=SHARD_COPY,
                    bytes=excess,
                    phases=(phase,),  # type: ignore[arg-type]
                    formula=f"one decoder layer's shard {copy:,} B ({at_rest}) beside its "
                    f"all-gather - the layer's {phase} bytes it precedes {room:,} B",
                    source=SRC_COPY,
                )
            )
    return out


def cpu_writeback(
    units: tuple[FlatUnit, ...], *, at_rest: str, prefetch: str = "none"
) -> list[Transient]:
    """CPU ranks, FULL_SHARD: WB / PREP_BW keep each unit's gradient shard from its
    pre-backward, so the root's (its pre-backward runs first, at the loss) and the running
    layer's are alive at the backward point, and the root's beside its own reduction at the
    end of backward. With backward prefetch (`pre` or `post`, memplan.states.engines.fsdp1.
    prefetch) the next layer is gathered while the running one is (PREFETCH → `_unshard` →
    PRE → WB), so its gradient shard is made then, one layer early: two layers' shards at the
    backward point (measured on 2 gloo ranks, FULL_SHARD bf16 and fp32, pre and post: the
    backward peak with offload over the same case without it is `_cpu_grad` + the root's +
    two layers' shards, 221,672 B bf16, benchmarks/results/fsdp1-offload.json against
    fsdp1-prefetch.json)."""
    ab = dtype_bytes(at_rest)
    root = next((u.shard for u in units if u.name == "root"), 0)
    layer = max((u.shard for u in units if u.name != "root"), default=0)
    running = (
        (layer, "the root's and the running layer's")
        if prefetch == "none"
        else (2 * layer, "the root's, the running layer's and the prefetched layer's")
    )
    out = []
    for phases, elements, what in (
        (("backward_start", "backward_end"), root, "the root's"),
        (("backward",), root + running[0], running[1]),
    ):
        if elements:
            out.append(
                Transient(
                    name=WRITEBACK,
                    bytes=elements * ab,
                    phases=phases,  # type: ignore[arg-type]
                    formula=f"{what} gradient shards, {elements:,} x {ab} B ({at_rest}), "
                    "made by the pre-backward's writeback on the compute device (the host)",
                    source=SRC_WRITEBACK,
                )
            )
    return out
