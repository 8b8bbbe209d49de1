"""The GPU catalog: memory capacity in bytes, each with its source."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Gpu:
    name: str
    memory_bytes: int
    """Total device memory as the driver reports it (`nvidia-smi --query-gpu=memory.total`,
    `torch.cuda.get_device_properties(0).total_memory`): what the CUDA allocator can ever see."""
    source: str
    bf16_flops: float
    """Dense bf16 (fp16 on V100) tensor-core peak, FLOP/s, from the vendor datasheet."""
    intra_node_bytes_per_s: float
    """GPU-to-GPU bandwidth inside a node, one direction (NVLink / Infinity Fabric / PCIe)."""
    inter_node_bytes_per_s: float
    """Network bandwidth per GPU between nodes, one direction (the usual NIC per GPU)."""


# memory.total as nvidia-smi / rocm-smi print it in MiB. HBM capacity is binary: "80GB" A100
# is 80 GiB = 81920 MiB; H100 reserves part of it (81559 MiB). Override with hardware.memory
# when your driver reports another figure. Peak FLOP/s are the datasheets' dense figures
# (without sparsity); link speeds are per direction: NVLink 3 600 GB/s, NVLink 4 900 GB/s,
# NVLink 5 1.8 TB/s bidirectional per GPU; one 200 Gb/s (HDR), 400 Gb/s (NDR) or 800 Gb/s
# (XDR) NIC per GPU between nodes, as in DGX A100 / H100 / B200. plan can override both.
GB = 10**9
T = 10**12
CATALOG: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu(
            name="A100-40GB",
            memory_bytes=40960 * MIB,
            bf16_flops=312 * T,
            intra_node_bytes_per_s=300 * GB,
            inter_node_bytes_per_s=25 * GB,
            source="NVIDIA A100 datasheet (40GB HBM2, 312 TF bf16, NVLink 600 GB/s); "
            "nvidia-smi memory.total 40960 MiB",
        ),
        Gpu(
            name="A100-80GB",
            memory_bytes=81920 * MIB,
            bf16_flops=312 * T,
            intra_node_bytes_per_s=300 * GB,
            inter_node_bytes_per_s=25 * GB,
            source="NVIDIA A100 datasheet (80GB HBM2e, 312 TF bf16, NVLink 600 GB/s); "
            "nvidia-smi memory.total 81920 MiB",
        ),
        Gpu(
            name="H100-80GB",
            memory_bytes=81559 * MIB,
            bf16_flops=989 * T,
            intra_node_bytes_per_s=450 * GB,
            inter_node_bytes_per_s=50 * GB,
            source="NVIDIA H100 SXM5 datasheet (80GB HBM3, 989 TF bf16, NVLink 900 GB/s); "
            "nvidia-smi memory.total 81559 MiB",
        ),
        Gpu(
            name="H100-94GB",
            memory_bytes=95830 * MIB,
            bf16_flops=835 * T,
            intra_node_bytes_per_s=300 * GB,
            inter_node_bytes_per_s=50 * GB,
            source="NVIDIA H100 NVL datasheet (94GB HBM3, 835 TF bf16, NVLink bridge 600 GB/s); "
            "nvidia-smi memory.total 95830 MiB",
        ),
        Gpu(
            name="H200",
            memory_bytes=143771 * MIB,
            bf16_flops=989 * T,
            intra_node_bytes_per_s=450 * GB,
            inter_node_bytes_per_s=50 * GB,
            source="NVIDIA H200 SXM datasheet (141GB HBM3e, 989 TF bf16, NVLink 900 GB/s); "
            "nvidia-smi memory.total 143771 MiB",
        ),
        Gpu(
            name="B200",
            memory_bytes=183359 * MIB,
            bf16_flops=2250 * T,
            intra_node_bytes_per_s=900 * GB,
            inter_node_bytes_per_s=100 * GB,
            source="NVIDIA DGX B200 datasheet (180GB HBM3e, 2.25 PF bf16 dense, NVLink 1.8 "
            "TB/s); nvidia-smi memory.total 183359 MiB",
        ),
        Gpu(
            name="MI300X",
            memory_bytes=192 * 1024 * MIB,
            bf16_flops=1307 * T,
            intra_node_bytes_per_s=448 * GB,
            inter_node_bytes_per_s=50 * GB,
            source="AMD Instinct MI300X datasheet (192GB HBM3, 1307 TF bf16, Infinity Fabric "
            "896 GB/s)",
        ),
        Gpu(
            name="L4",
            memory_bytes=23034 * MIB,
            bf16_flops=121 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA L4 datasheet (24GB GDDR6, 121 TF bf16, PCIe Gen4 x16); nvidia-smi "
            "memory.total 23034 MiB",
        ),
        Gpu(
            name="A10G",
            memory_bytes=23028 * MIB,
            bf16_flops=125 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA A10 datasheet (24GB GDDR6, 125 TF bf16, PCIe Gen4 x16); AWS g5 "
            "nvidia-smi memory.total 23028 MiB",
        ),
        Gpu(
            name="L40S",
            memory_bytes=46068 * MIB,
            bf16_flops=362 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA L40S datasheet (48GB GDDR6 with ECC, 362.05 TF bf16 dense, PCIe "
            "Gen4 x16, no NVLink); nvidia-smi memory.total 46068 MiB (ECC on, the default)",
        ),
        Gpu(
            name="L40",
            memory_bytes=46068 * MIB,
            bf16_flops=181 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA L40 datasheet (48GB GDDR6 with ECC, 181.05 TF bf16 dense, PCIe Gen4 "
            "x16, no NVLink); memory.total as the L40S's board, 46068 MiB with ECC on (assumed)",
        ),
        Gpu(
            name="A40",
            memory_bytes=46068 * MIB,
            bf16_flops=149.7 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA A40 datasheet (48GB GDDR6 with ECC, 149.7 TF bf16 dense, PCIe Gen4 "
            "x16; NVLink bridge pairs only); 46068 MiB with ECC on, the default (assumed: "
            "48 GiB less ECC's 1/16, less 12 MiB, as the L40S reports)",
        ),
        Gpu(
            name="A6000",
            memory_bytes=49140 * MIB,
            bf16_flops=154.8 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA RTX A6000 datasheet (48GB GDDR6, 309.7 TF tensor with sparsity = "
            "154.8 TF bf16 dense, PCIe Gen4 x16; NVLink bridge pairs only); nvidia-smi "
            "memory.total 49140 MiB with ECC off, the workstation default",
        ),
        Gpu(
            name="V100-32GB",
            memory_bytes=32768 * MIB,
            bf16_flops=125 * T,
            intra_node_bytes_per_s=150 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA V100 SXM2 datasheet (32GB HBM2, 125 TF fp16 (no bf16), NVLink 300 "
            "GB/s); nvidia-smi memory.total 32768 MiB",
        ),
        Gpu(
            name="RTX-4090",
            memory_bytes=24564 * MIB,
            bf16_flops=165 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA Ada whitepaper (RTX 4090: 24GB GDDR6X, 165 TF bf16 with fp16 "
            "accumulate, PCIe Gen4 x16); nvidia-smi memory.total 24564 MiB",
        ),
        Gpu(
            name="RTX-3090",
            memory_bytes=24576 * MIB,
            bf16_flops=71 * T,
            intra_node_bytes_per_s=32 * GB,
            inter_node_bytes_per_s=12.5 * GB,
            source="NVIDIA Ampere GA102 whitepaper (RTX 3090: 24GB GDDR6X, 71 TF bf16, PCIe "
            "Gen4 x16); nvidia-smi memory.total 24576 MiB",
        ),
    )
}


# Short names people type, each to the catalog entry it most often means.
ALIASES: dict[str, str] = {
    "A100": "A100-80GB",
    "H100": "H100-80GB",
    "H100-SXM": "H100-80GB",
    "H100-NVL": "H100-94GB",
    # The H100 NVL carries 96GB of HBM3 (6 stacks), 94GB of it enabled (NVL datasheet).
    "H100-96GB": "H100-94GB",
    "RTX-A6000": "A6000",
    "H200-141GB": "H200",
    "V100": "V100-32GB",
    "4090": "RTX-4090",
    "3090": "RTX-3090",
}


def nearest(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
