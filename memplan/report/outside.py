"""What one rank holds on its GPU outside the caching allocator (the CUDA context, NCCL's
buffers, AsyncTP's symmetric memory), and hardware.alloc_conf parsed: the device side of an
estimate (memplan.report.estimate assembles it). Pure: no I/O, no torch."""

from __future__ import annotations

from functools import lru_cache

from memplan import memory
from memplan.config.spec import Spec
from memplan.precision import dtype_bytes
from memplan.states.layout import Layout
from memplan.step import device
from memplan.step.alloc_conf import AllocConf


@lru_cache(maxsize=64)
def alloc_conf(text: str) -> AllocConf:
    """hardware.alloc_conf parsed as torch 2.13 parses PYTORCH_CUDA_ALLOC_CONF (a
    MemplanError naming hardware.alloc_conf otherwise; the CLI adds its YAML line)."""
    return AllocConf.parse(text)


def outside_allocator(
    spec: Spec, layout: Layout, *, hidden: int | None = None
) -> tuple[device.DeviceTerm, ...]:
    """The GPU memory one rank holds outside the caching allocator (memplan.step.device): the
    CUDA context for hardware.gpu, CUDA version and module loading (hardware.cuda_context
    overrides it), then NCCL's buffers for each communicator of the layout, then under
    AsyncTP the TP group's symmetric-memory workspace (`hidden`: the model's hidden size;
    None, no architecture: not charged). A GPU outside device.SM (hardware.memory only, or
    not NVIDIA's) keeps the assumed context and no NVLS."""
    hw = spec.hardware
    gpu = hw.gpu if hw.gpu in device.SM else None
    if gpu is None:
        context: tuple[device.DeviceTerm, ...] = (
            device.DeviceTerm(
                name="cuda_context",
                bytes=memory.CUDA_CONTEXT_BYTES if hw.cuda_context is None else hw.cuda_context,
                formula="memplan.memory.CUDA_CONTEXT_BYTES"
                if hw.cuda_context is None
                else "hardware.cuda_context",
                source="assumed: no CUDA context measurement for this GPU"
                if hw.cuda_context is None
                else "given in the spec (hardware.cuda_context)",
            ),
        )
    else:
        context = device.cuda_context(
            gpu=gpu,
            cuda_major=hw.cuda_version,
            lazy_loading=hw.cuda_lazy_loading,
            override=hw.cuda_context,
        )
    comms = device.communicators(
        data=layout.data,
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        expert=layout.expert,
        context=layout.context,
        gpus_per_node=hw.gpus_per_node,
    )
    nccl = [t for c in comms for t in device.communicator_terms(c, gpu=gpu, nvls=hw.nccl_nvls)]
    symm: tuple[device.DeviceTerm, ...] = ()
    if layout.async_tp and hidden is not None:
        t = spec.training
        symm = (
            device.symmetric_memory_workspace(
                tokens=t.micro_batch_size * (t.sequence_length // layout.context),
                hidden=hidden,
                tensor=layout.tensor,
                width=dtype_bytes(spec.recipe().compute),
            ),
        )
    return (*context, *nccl, *symm)
