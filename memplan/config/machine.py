"""The spec's `hardware:` section: the GPU, its memory and what lives beside it, the node."""

import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import field_validator

from memplan.config.base import MAX_COUNT, Degree, Frozen
from memplan.hardware import ALIASES, CATALOG, nearest

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_UNIT = {
    None: 1,
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}


def parse_bytes(value: int | str) -> int:
    """`80GiB`, `80 GB`, `85899345920` -> bytes. Units: B, KiB..TiB (binary), KB..TB (decimal)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '80GiB'")
    if isinstance(value, int):
        out = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 80GiB, 40 GB or 85899345920")
        # Decimal, not float: exact, and a thousand-digit number does not become inf.
        out = int(Decimal(match.group(1)) * _UNIT[match.group(2)])
    if out <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    if out > MAX_COUNT:
        raise ValueError(f"a size must be at most {MAX_COUNT:,} bytes (8 EiB)")
    return out


class HardwareSpec(Frozen):
    """The accelerator (optional): a catalog name or an explicit memory size."""

    gpu: str | None = None
    """A name from `memplan.hardware.CATALOG` (A100-80GB, H100-80GB, ...)."""
    memory: int | None = None
    """GPU memory in bytes; accepts strings such as `80GiB` (binary) or `80GB` (decimal)."""
    gpus_per_node: Degree = 8
    """GPUs per host: host memory is summed over the ranks of one node."""
    host_memory: int | None = None
    """CPU memory per node in bytes (accepts `2TiB`, `512GB`): checked when offloading."""
    cuda_context: int | None = None
    """Bytes the CUDA context takes outside the allocator (default: memplan.activations'
    assumed figure; measure yours with nvidia-smi minus torch.cuda.memory_reserved())."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where the step runs (kernels save different activations on CPU and CUDA)."""
    alloc_conf: str = ""
    """PYTORCH_CUDA_ALLOC_CONF the job runs with (e.g. `expandable_segments:True`; empty:
    torch's defaults): the caching allocator's replay (memplan.step.allocator) follows it.
    Checked by memplan.step.alloc_conf.AllocConf.parse when the estimate runs."""
    cuda_version: Literal[11, 12, 13] = 12
    """CUDA major version of the torch build: picks the measured CUDA context
    (memplan.step.device.cuda_context)."""
    cuda_lazy_loading: bool = True
    """CUDA_MODULE_LOADING=LAZY (the default since CUDA 11.7); false: eager loading adds every
    kernel image to the CUDA context."""
    nccl_nvls: bool = True
    """NCCL_NVLS_ENABLE: NVLink SHARP buffers on NVSwitch systems (Hopper and later) with
    more than 2 GPUs of a communicator in the node; false drops them."""

    @field_validator("memory", "host_memory", "cuda_context", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        value = ALIASES.get(value, value) if value is not None else None
        if value is not None and value not in CATALOG:
            raise ValueError(
                f"unknown gpu {value!r}{nearest(value, CATALOG)}; known: {', '.join(CATALOG)}; "
                "or give hardware.memory: 48GB (the memory nvidia-smi reports)"
            )
        return value
