"""The GPU catalog: memory capacity in bytes, each with its source."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    name: str
    memory_bytes: int
    """Total device memory as the driver reports it (`nvidia-smi --query-gpu=memory.total`,
    `torch.cuda.get_device_properties(0).total_memory`): what the CUDA allocator can ever see."""
    source: str


# memory.total as nvidia-smi / rocm-smi print it in MiB. HBM capacity is binary: "80GB" A100
# is 80 GiB = 81920 MiB; H100 reserves part of it (81559 MiB). Override with hardware.memory
# when your driver reports another figure.
CATALOG: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu(
            name="A100-40GB",
            memory_bytes=40960 * MIB,
            source="NVIDIA A100 datasheet (40GB HBM2); nvidia-smi memory.total 40960 MiB",
        ),
        Gpu(
            name="A100-80GB",
            memory_bytes=81920 * MIB,
            source="NVIDIA A100 datasheet (80GB HBM2e); nvidia-smi memory.total 81920 MiB",
        ),
        Gpu(
            name="H100-80GB",
            memory_bytes=81559 * MIB,
            source="NVIDIA H100 SXM5 (80GB HBM3); nvidia-smi memory.total 81559 MiB",
        ),
        Gpu(
            name="H100-94GB",
            memory_bytes=95830 * MIB,
            source="NVIDIA H100 NVL (94GB HBM3); nvidia-smi memory.total 95830 MiB",
        ),
        Gpu(
            name="H200",
            memory_bytes=143771 * MIB,
            source="NVIDIA H200 datasheet (141GB HBM3e); nvidia-smi memory.total 143771 MiB",
        ),
        Gpu(
            name="B200",
            memory_bytes=183359 * MIB,
            source="NVIDIA DGX B200 (180GB HBM3e per GPU); nvidia-smi memory.total 183359 MiB",
        ),
        Gpu(
            name="MI300X",
            memory_bytes=192 * 1024 * MIB,
            source="AMD Instinct MI300X datasheet (192GB HBM3 = 8 stacks x 24 GiB)",
        ),
        Gpu(
            name="L4",
            memory_bytes=23034 * MIB,
            source="NVIDIA L4 datasheet (24GB GDDR6); nvidia-smi memory.total 23034 MiB",
        ),
        Gpu(
            name="A10G",
            memory_bytes=23028 * MIB,
            source="NVIDIA A10G (AWS g5, 24GB GDDR6); nvidia-smi memory.total 23028 MiB",
        ),
        Gpu(
            name="V100-32GB",
            memory_bytes=32768 * MIB,
            source="NVIDIA V100 datasheet (32GB HBM2); nvidia-smi memory.total 32768 MiB",
        ),
        Gpu(
            name="RTX-4090",
            memory_bytes=24564 * MIB,
            source="NVIDIA GeForce RTX 4090 (24GB GDDR6X); nvidia-smi memory.total 24564 MiB",
        ),
        Gpu(
            name="RTX-3090",
            memory_bytes=24576 * MIB,
            source="NVIDIA GeForce RTX 3090 (24GB GDDR6X); nvidia-smi memory.total 24576 MiB",
        ),
    )
}


# Short names people type, each to the catalog entry it most often means.
ALIASES: dict[str, str] = {
    "A100": "A100-80GB",
    "H100": "H100-80GB",
    "H100-SXM": "H100-80GB",
    "H100-NVL": "H100-94GB",
    "H200-141GB": "H200",
    "V100": "V100-32GB",
    "4090": "RTX-4090",
    "3090": "RTX-3090",
}


def nearest(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
