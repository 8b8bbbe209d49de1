"""Offload: which model-state bytes move from the GPU to host memory (or NVMe), per engine.

DeepSpeed ZeRO-Offload / ZeRO-Infinity (deepspeed 0.19.6, see /docs/engines.md):
- stage 1/2 `offload_optimizer: cpu` (stage_1_and_2.py::DeepSpeedZeroOptimizer.__init__): the
  fp32 partition, its optimizer states and a persistent fp32 `.grad` of the partition live on
  the CPU, with a 16-bit copy of the partition (`param_buffer_of_bit16_for_cpu_offload_groups`)
  and a 16-bit staging buffer of the largest parameter (`temp_grad_buffer_for_cpu_offload`);
  the GPU keeps a 16-bit staging buffer of the largest parameter
  (`temp_grad_buffer_for_gpu_offload`) instead of gradients.
- stage 3 `offload_optimizer: cpu` (stage3.py::_setup_for_real_optimizer): the fp32 sub-group
  partitions, their states and `grad_partitions_flat_buffer` live on the CPU.
- stage 3 `offload_param: cpu` (partition_parameters.py::Init, remote_device): the parameter
  partitions live on the CPU; persistent (gathered) parameters stay on the GPU.
- `nvme`: the same bytes go to NVMe instead of host memory.
torch FSDP2 `CPUOffloadPolicy` (_fully_shard/_fsdp_api.py): sharded parameters and gradients on
the CPU, so the optimizer steps there and keeps its states there too; FSDP1's
`CPUOffload(offload_params=True)` the same (_flat_param.py, memplan.states.engines.fsdp1.offload).
Megatron-LM `--optimizer-cpu-offload` (megatron/core/optimizer/cpu_offloading/
hybrid_optimizer.py): fp32 main params and optimizer states on the CPU.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory
from memplan.precision import dtype_bytes
from memplan.states.terms import RankStates, Term, fmt, term

SRC_S12_OFFLOAD = (
    "deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer.__init__ (cpu_offload)"
)
SRC_S3_OFFLOAD = "deepspeed/runtime/zero/stage3.py::_setup_for_real_optimizer (offload_optimizer)"
SRC_FSDP2_OFFLOAD = "torch/distributed/fsdp/_fully_shard/_fsdp_api.py::CPUOffloadPolicy (2.13)"
SRC_MEGATRON_OFFLOAD = "megatron/core/optimizer/cpu_offloading/hybrid_optimizer.py (core_r0.12)"


def _moved(t: Term, where: str) -> Term:
    return replace(t, formula=f"{t.formula}; offloaded to {where}")


def apply(
    states: RankStates,
    *,
    engine: str,
    stage: int,
    optimizer: str,
    parameters: str,
    inventory: Inventory,
    param_dtype: str,
) -> tuple[RankStates, tuple[Term, ...]]:
    """(GPU/host split of `states`, terms moved to NVMe) for the offload settings."""
    if optimizer == "none" and parameters == "none":
        return states, ()
    if engine == "ddp":
        raise MemplanError(
            "torch DDP has no offload; use engine: deepspeed or fsdp2.", field="parallelism.offload"
        )
    if engine == "megatron" and parameters != "none":
        raise MemplanError(
            "Megatron-LM offloads the optimizer only (--optimizer-cpu-offload).",
            field="parallelism.offload.parameters",
        )
    host: list[Term] = list(states.host_terms)
    nvme: list[Term] = []

    def off(t: Term, target: str) -> None:
        (nvme if target == "nvme" else host).append(_moved(t, target))

    if engine in ("fsdp2", "fsdp1"):
        # CPUOffloadPolicy (FSDP1: CPUOffload(offload_params=True), memplan.states.engines.
        # fsdp1.offload) moves sharded parameters and gradients; the optimizer follows them.
        target = parameters if parameters != "none" else optimizer
        for t in states.terms:
            off(t, target)
        return replace(states, terms=(), host_terms=tuple(host)), tuple(nvme)
    gpu: list[Term] = []
    for t in states.terms:
        if t.category == "optimizer_states" and optimizer != "none":
            off(t, optimizer)
        elif t.category == "parameters" and parameters != "none":
            off(t, parameters)
        elif t.category == "gradients" and optimizer != "none" and engine == "deepspeed":
            if stage == 3:
                off(t, optimizer)
                continue
            on_gpu, moved = _zero12_gradient_offload(t, states, inventory, stage, param_dtype)
            gpu.append(on_gpu)
            for target, m in moved:
                off(m, optimizer if target == "optimizer" else target)
        else:
            gpu.append(t)
    return replace(states, terms=tuple(gpu), host_terms=tuple(host)), tuple(nvme)


def _zero12_gradient_offload(
    grads: Term, states: RankStates, inventory: Inventory, stage: int, param_dtype: str
) -> tuple[Term, list[tuple[str, Term]]]:
    """DeepSpeed ZeRO-1/2 with the optimizer offloaded: (what stays on the GPU, [(where, term)]
    moved off it; where "optimizer" is the optimizer's offload target). Gradients reach the
    CPU partition through an fp32 `.grad` of the partition on the host and a 16-bit staging
    buffer of the largest tensor on each side; stage 2 keeps no other gradient on the GPU,
    stage 1 keeps every 16-bit .grad until the boundary."""
    part = next(x.elements for x in states.terms if x.name == "master_weights")
    largest = max((p.numel for p in inventory.parameters if p.trainable), default=0)
    width = dtype_bytes(param_dtype)

    def row(name: str, dtype: str, elements: int, formula: str) -> Term:
        return term("gradients", name, dtype, 1, elements, formula, SRC_S12_OFFLOAD)

    moved = [
        (
            "optimizer",
            row("fp32 grad partition", "fp32", part, f"{fmt(part)} elements x 4 B (fp32)"),
        ),
        (
            "cpu",
            row("bit16 partition copy", param_dtype, part, f"{fmt(part)} elements x {width} B"),
        ),
        (
            "cpu",
            row(
                "cpu staging buffer",
                param_dtype,
                largest,
                f"largest tensor {fmt(largest)} elements",
            ),
        ),
    ]
    if stage == 1:
        return grads, moved
    staging = row(
        "gpu staging buffer",
        param_dtype,
        largest,
        f"largest tensor {fmt(largest)} elements x {width} B",
    )
    return staging, moved
