"""What a GPU holds outside torch's caching allocator: nvidia-smi's used memory for a training
process is `torch.cuda.max_memory_reserved()` plus the terms here (the CUDA context, NCCL's
communicator buffers and, under AsyncTP, torch's symmetric-memory workspace).
cuBLAS/cuBLASLt workspaces are *not* among them: torch allocates them through the caching
allocator, so they are already inside reserved (`allocator_workspaces`
sizes them for the timeline).

Every term names its source; where no measurement exists the term says "assumed" and keeps
memplan's 512 MiB context assumption (`memplan.memory.CUDA_CONTEXT_BYTES`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memplan import memory
from memplan.errors import MemplanError
from memplan.hardware import ALIASES, CATALOG, nearest

MIB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceTerm:
    """One block of device memory, with how it was worked out."""

    name: str
    bytes: int
    """Bytes on one GPU."""
    formula: str
    source: str


# --- GPU architecture --------------------------------------------------------------------------

# Compute capability (major*10 + minor) of the CUDA GPUs in memplan.hardware.CATALOG, from
# NVIDIA's "CUDA GPUs - Compute Capability" table (developer.nvidia.com/cuda-gpus): Volta 7.0,
# Ampere 8.0 (A100) / 8.6 (A10G, A40, RTX A6000, RTX 3090), Ada 8.9, Hopper 9.0, Blackwell 10.0.
# NVSWITCH marks the boards whose 8-GPU systems route NVLink through NVSwitch (HGX/DGX A100,
# H100, H200, B200 datasheets), which NVLS (NVLink SHARP, Hopper and later) needs.
SM: dict[str, int] = {
    "V100-32GB": 70,
    "A100-40GB": 80,
    "A100-80GB": 80,
    "A10G": 86,
    "A40": 86,
    "A6000": 86,
    "RTX-3090": 86,
    "L4": 89,
    "L40": 89,
    "L40S": 89,
    "RTX-4090": 89,
    "H100-80GB": 90,
    "H100-94GB": 90,
    "H200": 90,
    "B200": 100,
}
NVSWITCH = frozenset({"A100-40GB", "A100-80GB", "H100-80GB", "H200", "B200"})
CUDA_MAJORS = (11, 12, 13)


def cuda_gpu(gpu: str) -> str:
    """The catalog name of an NVIDIA `gpu` (aliases resolved), or a MemplanError naming
    hardware.gpu."""
    name = ALIASES.get(gpu, gpu)
    if name not in CATALOG:
        raise MemplanError(
            f"unknown gpu {gpu!r}{nearest(gpu, CATALOG)}; known: {', '.join(CATALOG)}",
            field="hardware.gpu",
        )
    if name not in SM:
        raise MemplanError(
            f"{name} is not a CUDA GPU: the device terms (CUDA context, NCCL buffers) cover "
            "NVIDIA GPUs only; give hardware.cuda_context for the runtime's own overhead",
            field="hardware.gpu",
        )
    return name


def _check_cuda(cuda_major: int) -> None:
    if cuda_major not in CUDA_MAJORS:
        raise MemplanError(
            f"CUDA major version {cuda_major} is not one of {', '.join(map(str, CUDA_MAJORS))}",
            field="hardware.cuda_version",
        )


# --- CUDA context ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ContextMeasurement:
    bytes: int
    source: str


# nvidia-smi's used memory of a process that has created its CUDA context and allocated
# (almost) nothing, keyed by (catalog GPU, CUDA major, lazy module loading). Only rows someone
# measured; the context depends on the GPU (its local-memory reservation scales with the SM
# count) and on how many kernel images are loaded, so no row stands in for another GPU.
CONTEXT_MEASURED: dict[tuple[str, int, bool], ContextMeasurement] = {
    ("RTX-3090", 12, True): ContextMeasurement(
        bytes=256 * MIB,
        source="invoke-ai/InvokeAI#9413: idle process, nvidia-smi 256 MiB, RTX 3090, "
        "torch 2.7.1+cu128 (lazy loading, torch's default)",
    ),
    ("RTX-3090", 11, False): ContextMeasurement(
        bytes=1687 * MIB,
        source="pytorch/pytorch#55277 (comment 2022-04-12): `torch.Tensor(1).cuda()`, "
        "nvidia-smi 1687 MiB, RTX 3090, torch 1.8.2+cu111 (CUDA 11.1: eager loading only)",
    ),
}

# Eager module loading (CUDA_MODULE_LOADING=EAGER, or CUDA before 11.7) loads every kernel
# image of torch's libraries at context creation. pytorch/pytorch#86509 measured
# cudaMemGetInfo total - free after one small tensor with torch 1.13 (CUDA 11.7) on an
# unnamed GPU: 666,632,192 bytes eager vs 287,047,680 bytes lazy; the difference is the
# kernel images lazy loading defers.
EAGER_KERNEL_IMAGES_BYTES = 666_632_192 - 287_047_680


def cuda_context(
    *, gpu: str, cuda_major: int = 12, lazy_loading: bool = True, override: int | None = None
) -> tuple[DeviceTerm, ...]:
    """The CUDA context of one process on `gpu`: driver state, the local-memory reservation
    and loaded kernel images. `override` (hardware.cuda_context: nvidia-smi's used memory
    minus torch.cuda.memory_reserved() of an idle process) replaces it whole."""
    name = cuda_gpu(gpu)
    _check_cuda(cuda_major)
    if override is not None:
        return (
            DeviceTerm(
                name="cuda_context",
                bytes=override,
                formula="hardware.cuda_context",
                source="given in the spec (hardware.cuda_context)",
            ),
        )
    measured = CONTEXT_MEASURED.get((name, cuda_major, lazy_loading))
    if measured is not None:
        return (
            DeviceTerm(
                name="cuda_context",
                bytes=measured.bytes,
                formula=f"measured ({name}, CUDA {cuda_major}, "
                f"{'lazy' if lazy_loading else 'eager'} loading)",
                source=measured.source,
            ),
        )
    base = DeviceTerm(
        name="cuda_context",
        bytes=memory.CUDA_CONTEXT_BYTES,
        formula="memplan.memory.CUDA_CONTEXT_BYTES",
        source=f"assumed: no measurement for {name} with CUDA {cuda_major}; a few hundred MiB "
        "with lazy loading (pytorch/pytorch#107667 ~300 MB, #109888 ~400 MB, "
        "unslothai/unsloth-zoo#1053 426 MiB on an RTX 6000 Ada with torch 2.10+cu130)",
    )
    if lazy_loading:
        return (base,)
    return (
        base,
        DeviceTerm(
            name="eager_kernel_images",
            bytes=EAGER_KERNEL_IMAGES_BYTES,
            formula="666,632,192 - 287,047,680 (eager - lazy)",
            source="pytorch/pytorch#86509 (torch 1.13, CUDA 11.7, GPU not named); assumed "
            "for other torch builds (the number of kernels varies by build)",
        ),
    )


# --- cuBLAS / cuBLASLt workspaces (inside reserved) -------------------------------------------

# pytorch/pytorch@26a39059 (main as stored; torch 2.13's copy not checked)
# aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize: without
# CUBLAS_WORKSPACE_CONFIG, ":4096:2:16:8" (2 x 4096 KiB + 8 x 16 KiB) and 32 MiB on sm90
# (4096 KiB x 8); one workspace per (cuBLAS handle, stream), from
# c10::cuda::CUDACachingAllocator (getNewWorkspace), so inside torch.cuda.memory_reserved().
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_SM90 = 4096 * 8 * 1024
# Same file, parseCUDABlasLtWorkspaceSize: CUBLASLT_WORKSPACE_SIZE in KiB, default 1024
# (pytorch#73328); getCUDABlasLtWorkspace allocates it from the caching allocator per
# (handle, stream) unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=1 makes cuBLASLt reuse the cuBLAS
# workspace.
CUBLASLT_WORKSPACE_KIB = 1024


def cublas_workspace_config_bytes(config: str) -> int:
    """Bytes of a CUBLAS_WORKSPACE_CONFIG value such as ":4096:8" or ":4096:2:16:8": the sum of
    SIZE KiB x COUNT over its pairs (parseChosenWorkspaceSize)."""
    parts = config.split(":")
    if parts[0] != "" or len(parts) < 3 or len(parts) % 2 == 0:
        raise MemplanError(
            f"CUBLAS_WORKSPACE_CONFIG {config!r} is not of the form :SIZE:COUNT[:SIZE:COUNT]",
            field="hardware.cublas_workspace_config",
        )
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise MemplanError(
            f"CUBLAS_WORKSPACE_CONFIG {config!r}: SIZE and COUNT must be integers",
            field="hardware.cublas_workspace_config",
        ) from None
    return sum(size * 1024 * count for size, count in zip(numbers[::2], numbers[1::2], strict=True))


def allocator_workspaces(
    *,
    gpu: str,
    streams: int = 1,
    cublas_workspace_config: str | None = None,
    unified_cublaslt: bool = False,
) -> tuple[DeviceTerm, ...]:
    """The cuBLAS and cuBLASLt workspaces torch keeps per (handle, stream) that runs GEMMs.
    They come from the caching allocator: part of reserved, not added to it."""
    name = cuda_gpu(gpu)
    if cublas_workspace_config is not None:
        per_stream = cublas_workspace_config_bytes(cublas_workspace_config)
        formula = f"CUBLAS_WORKSPACE_CONFIG={cublas_workspace_config}"
    elif SM[name] == 90:
        per_stream, formula = CUBLAS_WORKSPACE_SM90, "4096 KiB x 8 (sm90)"
    else:
        per_stream, formula = CUBLAS_WORKSPACE_DEFAULT, "4096 KiB x 2 + 16 KiB x 8"
    source = "pytorch/pytorch@26a39059 aten/src/ATen/cuda/CublasHandlePool.cpp "
    terms = [
        DeviceTerm(
            name="cublas_workspace",
            bytes=per_stream * streams,
            formula=f"({formula}) x {streams} stream(s)",
            source=source + "parseChosenWorkspaceSize / getNewWorkspace",
        )
    ]
    if not unified_cublaslt:
        terms.append(
            DeviceTerm(
                name="cublaslt_workspace",
                bytes=CUBLASLT_WORKSPACE_KIB * 1024 * streams,
                formula=f"{CUBLASLT_WORKSPACE_KIB} KiB x {streams} stream(s)",
                source=source + "parseCUDABlasLtWorkspaceSize / getCUDABlasLtWorkspace",
            )
        )
    return tuple(terms)


# --- NCCL --------------------------------------------------------------------------------------

# NCCL 2.30.7 (NVIDIA/nccl master), src/include/device.h and src/init.cc computeBuffSizes: the
# per-connection buffer of each protocol. LL: NCCL_LL_LINES_PER_THREAD 8 x NCCL_LL_MAX_NTHREADS
# 512 x NCCL_STEPS 8 x sizeof(ncclLLFifoLine) 16; LL128: NCCL_LL128_ELEMS_PER_THREAD 120 x
# NCCL_LL128_MAX_NTHREADS 640 x NCCL_STEPS 8 x sizeof(uint64_t) 8; Simple: DEFAULT_BUFFSIZE
# 1 << 22 (NCCL_BUFFSIZE). NCCL_LL_BUFFSIZE / NCCL_LL128_BUFFSIZE / NCCL_BUFFSIZE override.
NCCL_STEPS = 8
NCCL_LL_BUFFSIZE = 8 * 512 * NCCL_STEPS * 16
NCCL_LL128_BUFFSIZE = 120 * 640 * NCCL_STEPS * 8
NCCL_BUFFSIZE = 1 << 22
# src/include/comm.h: ncclSendMem / ncclRecvMem are padded to MEM_ALIGN (4096) and every P2P
# transport allocation is rounded up to CUDA_IPC_MIN (2 MiB) (src/transport/p2p.cc
# p2pSendSetup / p2pRecvSetup).
NCCL_CONN_MEM = 4096
CUDA_IPC_MIN = 2 * MIB
# src/transport/nvls.cc: NVLS_NCHANNELS_SM90 16, NVLS_NCHANNELS_SM100 32 (several nodes),
# NVLS_NCHANNELS_SM100_NVL 24 (one node), NCCL_NVLS_CHUNKSIZE default 128 KiB.
NVLS_CHANNELS_SM90 = 16
NVLS_CHANNELS_SM100 = 32
NVLS_CHANNELS_SM100_NVL = 24
NVLS_CHUNKSIZE = 128 * 1024
# Channels NCCL picks from its topology search; not derivable without the topology. NCCL
# issue NVIDIA/nccl#892 logs 8x H800 in one node: "16 coll channels, 0 nvls channels, 16 p2p
# channels, 16 p2p channels per peer"; assumed for other GPUs (NCCL_MIN_NCHANNELS /
# NCCL_MAX_NCHANNELS fix it; MAXCHANNELS is 64 in src/include/device.h).
DEFAULT_CHANNELS = 16


def _align(n_bytes: int, to: int) -> int:
    return -(-n_bytes // to) * to


def connection_bytes(*, buffsize: int = NCCL_BUFFSIZE, p2p_read: bool = True) -> int:
    """GPU memory one ring-style connection pair (this rank's send side to the next peer and
    receive side from the previous) takes per channel, as p2pSendSetup / p2pRecvSetup size it:
    the send side holds ncclSendMem (+ the Simple buffer with P2P read, NCCL's default over
    NVLink on Ampere and later), the receive side ncclRecvMem + the LL and LL128 buffers (+
    Simple without P2P read), each rounded up to CUDA_IPC_MIN."""
    simple = buffsize
    send = NCCL_CONN_MEM + (simple if p2p_read else 0)
    recv = NCCL_CONN_MEM + NCCL_LL_BUFFSIZE + NCCL_LL128_BUFFSIZE + (0 if p2p_read else simple)
    return _align(send, CUDA_IPC_MIN) + _align(recv, CUDA_IPC_MIN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Communicator:
    """One NCCL communicator this rank belongs to (one per process group that communicates)."""

    name: str
    """The group, e.g. "data", "tensor", "pipeline" or "world"."""
    ranks: int
    """Ranks in the communicator."""
    local_ranks: int
    """Of them, ranks on this rank's node (NVLS spans these)."""
    collectives: bool = True
    """Runs collectives (ring buffers); False for a send/recv-only group such as pipeline."""
    barrier_only: bool = False
    """Only barriers (tiny all-reduces) run on it: the default group when every parallel
    dimension has a group of its own."""
    p2p_peers: int = 0
    """Peers this rank sends to / receives from point-to-point (2 for an inner pipeline stage)."""
    channels: int = DEFAULT_CHANNELS
    """Collective channels NCCL builds (ring)."""
    p2p_channels_per_peer: int = DEFAULT_CHANNELS
    """P2P channels per peer."""


def communicator_terms(
    comm: Communicator, *, gpu: str | None, nvls: bool = True, buffsize: int = NCCL_BUFFSIZE
) -> tuple[DeviceTerm, ...]:
    """NCCL's buffers for `comm` on one GPU. NCCL allocates them itself (src/transport/p2p.cc
    p2pAllocateShareableBuffer -> ncclCuMemAlloc; nvls.cc cuMemCreate), outside torch's caching
    allocator, unless buffers are registered from torch's NCCL mem pool. NCCL_RUNTIME_CONNECT=1
    (the default, src/init.cc) connects an algorithm when a collective first uses it, so these
    are the buffers after the first step. Tree (inter-node all-reduce) and CollNet buffers are
    not modelled. `gpu` None: a GPU outside the SM table (given by hardware.memory only, or not
    NVIDIA's), whose NVLS buffers are not charged."""
    name = None if gpu is None else cuda_gpu(gpu)
    if comm.ranks < 2:
        return ()
    per_channel = connection_bytes(buffsize=buffsize)
    terms = [
        *([_ring(comm, per_channel)] if comm.collectives else []),
        *([_nvls(comm, name)] if nvls and name is not None and _uses_nvls(comm, name) else []),
        *([_p2p(comm, per_channel)] if comm.p2p_peers else []),
    ]
    return tuple(terms)


def _ring(comm: Communicator, per_channel: int) -> DeviceTerm:
    source = (
        "NCCL 2.30.7 src/transport/p2p.cc p2pSendSetup/p2pRecvSetup, src/init.cc "
        "computeBuffSizes; channel count assumed (NVIDIA/nccl#892)"
    )
    if comm.barrier_only:
        source += (
            "; assumed: a barrier's all-reduce connects the ring (NCCL picks the algorithm by "
            "size; Tree/NVLS not charged)"
        )
    return DeviceTerm(
        name=f"nccl_{comm.name}_ring",
        bytes=comm.channels * per_channel,
        formula=f"{comm.channels} channels x {per_channel} B per connection pair",
        source=source,
    )


def _uses_nvls(comm: Communicator, gpu: str) -> bool:
    """NVLS (NVLink SHARP) needs NVSwitch and sm90+ (src/graph/search.cc: no NVS node or
    ccMin < 90 -> no NVLS graph) and more than 2 GPUs of the communicator in the node
    (vllm-project/vllm#9699 found it enabled only for n > 2)."""
    return (
        comm.collectives
        and not comm.barrier_only
        and gpu in NVSWITCH
        and SM[gpu] >= 90
        and comm.local_ranks > 2
    )


def _nvls(comm: Communicator, gpu: str) -> DeviceTerm:
    if SM[gpu] >= 100:
        several_nodes = comm.ranks > comm.local_ranks
        channels = NVLS_CHANNELS_SM100 if several_nodes else NVLS_CHANNELS_SM100_NVL
    else:
        channels = NVLS_CHANNELS_SM90
    buff = NVLS_CHUNKSIZE * NCCL_STEPS
    heads = comm.local_ranks
    return DeviceTerm(
        name=f"nccl_{comm.name}_nvls",
        bytes=channels * 2 * buff * heads,
        formula=f"{channels} NVLS channels x 2 x ({NVLS_CHUNKSIZE} x {NCCL_STEPS}) x {heads} heads",
        source="NCCL 2.30.7 src/transport/nvls.cc ncclNvlsBufferSetup (nvlsTotalSize; one head "
        "per local GPU, src/graph/search.cc); NCCL_NVLS_ENABLE=0 drops it",
    )


def _p2p(comm: Communicator, per_channel: int) -> DeviceTerm:
    source = (
        "NCCL 2.30.7 src/transport/p2p.cc sizes send/recv connections as ring ones; channels "
        "per peer assumed (NVIDIA/nccl#892)"
    )
    if comm.local_ranks < 2:
        source += (
            "; assumed for peers on other nodes too (src/transport/net.cc pools p2p buffers "
            "with NCCL_NET_SHARED_BUFFERS and uses fewer channels per net peer: not derived)"
        )
    return DeviceTerm(
        name=f"nccl_{comm.name}_p2p",
        bytes=comm.p2p_peers * comm.p2p_channels_per_peer * per_channel,
        formula=f"{comm.p2p_peers} peers x {comm.p2p_channels_per_peer} channels x "
        f"{per_channel} B per connection pair",
        source=source,
    )


def communicators(
    *,
    data: int = 1,
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    context: int = 1,
    gpus_per_node: int = 8,
) -> tuple[Communicator, ...]:
    """The communicators one rank of a DP x TP x PP (x CP, EP) job holds: one per process group
    of more than one rank that it belongs to, plus the default (world) group that
    torch.distributed.init_process_group creates and barriers use. A group that spans the
    whole world *is* the default group (DDP/FSDP on the default group), so it is counted once.
    Groups are laid out Megatron-style, tensor innermost (fastest-varying rank), then context,
    expert (folded into data), data, pipeline outermost."""
    degrees = {
        "parallelism.data": data,
        "parallelism.tensor": tensor,
        "parallelism.pipeline": pipeline,
        "parallelism.expert": expert,
        "parallelism.context": context,
        "hardware.gpus_per_node": gpus_per_node,
    }
    for field, degree in degrees.items():
        if degree < 1:
            raise MemplanError(f"{degree} is not a positive degree", field=field)
    world = data * tensor * pipeline * context
    groups: list[Communicator] = []

    def local(size: int, stride: int) -> int:
        # Ranks of a group of `size` whose members are `stride` apart that share a node.
        return max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1

    named = (
        ("tensor", tensor, 1),
        ("context", context, tensor),
        ("expert", expert, tensor * context),
        ("data", data, tensor * context),
    )
    for group, size, stride in named:
        if 1 < size < world:
            groups.append(Communicator(name=group, ranks=size, local_ranks=local(size, stride)))
    if 1 < pipeline < world:
        stride = tensor * context * data
        groups.append(
            Communicator(
                name="pipeline",
                ranks=pipeline,
                local_ranks=local(pipeline, stride),
                collectives=False,
                p2p_peers=min(2, pipeline - 1),
            )
        )
    if world > 1:
        # The default group does the work of a dimension that spans the world, else it only
        # serves barriers.
        spans = [
            name
            for name, size in (
                ("data", data),
                ("tensor", tensor),
                ("context", context),
                ("pipeline", pipeline),
            )
            if size == world
        ]
        groups.insert(
            0,
            Communicator(
                name="world",
                ranks=world,
                local_ranks=min(world, gpus_per_node),
                collectives=spans != ["pipeline"],
                barrier_only=not spans,
                p2p_peers=min(2, pipeline - 1) if spans == ["pipeline"] else 0,
            ),
        )
    return tuple(groups)


# --- torch symmetric memory (AsyncTP) ---------------------------------------------------------

SRC_SYMM_WORKSPACE = (
    "torch 2.13 torch/distributed/_symmetric_memory/__init__.py (the same in pytorch/pytorch "
    "as stored, 2025): get_symm_mem_workspace keeps one workspace per group, re-allocated to "
    "max(size, min_size) when a request exceeds it; _pipelined_produce_and_all2all "
    "(_fused_matmul_reduce_scatter_impl) asks 2 x out_chunks[0] bytes, "
    "_pipelined_multi_all_gather_and_consume (_fused_all_gather_matmul_impl) the shard's "
    "bytes; pytorch/pytorch torch/csrc/distributed/c10d/CUDASymmetricMemory.cu (2024) "
    "CUDASymmetricMemoryAllocator::alloc: signal_pad_offset = round_up(size, 16), block = "
    "round_up(offset + signal_pad_size 2048, granularity), cuMemCreate + cuMemMap: outside "
    "c10::cuda::CUDACachingAllocator, so not in torch.cuda.memory_reserved()"
)
SYMM_SIGNAL_PAD = 2048
"""CUDASymmetricMemory.cu (2024) `constexpr size_t signal_pad_size = 2048`."""
SYMM_GRANULARITY = 2 * MIB
"""cuMemGetAllocationGranularity(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), a driver query; assumed
2 MiB (the page of CUDA's virtual memory management on current NVIDIA GPUs)."""


def symmetric_memory_workspace(*, tokens: int, hidden: int, tensor: int, width: int) -> DeviceTerm:
    """The TP group's symmetric-memory workspace under AsyncTP (ParallelismSpec.async_tp), on
    one GPU: the largest request of the fused ops Inductor's micro_pipeline_tp pass puts in a
    sequence-parallel block (torch/_inductor/fx_passes/micro_pipeline_tp.py::
    fuse_all_gather_matmul, fuse_matmul_reduce_scatter). A matmul + reduce-scatter (wo and w2
    in forward, the column-parallel input gradients in backward) asks for two output chunks of
    [ceil(tokens / TP), hidden] in the output dtype (`width` bytes), which is at least twice
    an all-gather + matmul's request (its shard, [tokens / TP, hidden] in bf16 or fp8), so
    that is the size the workspace grows to in the first step and keeps (`tokens`: one
    micro-batch's tokens on this rank). SRC_SYMM_WORKSPACE: allocated outside the caching
    allocator. Not charged: the peers' workspaces this rank maps (their memory, on their
    GPUs), the multicast object (bound to this same allocation) and the two [TP] pointer
    arrays CUDASymmetricMemory takes from the caching allocator (raw_alloc, 2 x TP x 8 B)."""
    chunk = -(-tokens // tensor) * hidden * width
    request = 2 * chunk
    block = _align(_align(request, 16) + SYMM_SIGNAL_PAD, SYMM_GRANULARITY)
    return DeviceTerm(
        name="symmetric_memory_workspace",
        bytes=block,
        formula=f"round_up(2 x ceil({tokens:,} tokens / TP {tensor}) x {hidden:,} x {width} B "
        f"(= {request:,} B) + {SYMM_SIGNAL_PAD:,} B signal pad, to "
        f"{SYMM_GRANULARITY // MIB} MiB)",
        source=SRC_SYMM_WORKSPACE,
    )


def device_terms(
    *,
    gpu: str,
    cuda_major: int = 12,
    lazy_loading: bool = True,
    cuda_context_override: int | None = None,
    comms: Iterable[Communicator] = (),
    nvls: bool = True,
    buffsize: int = NCCL_BUFFSIZE,
) -> tuple[DeviceTerm, ...]:
    """Everything one training process holds on its GPU outside torch's caching allocator:
    the CUDA context, then NCCL's buffers for each communicator."""
    terms = list(
        cuda_context(
            gpu=gpu,
            cuda_major=cuda_major,
            lazy_loading=lazy_loading,
            override=cuda_context_override,
        )
    )
    for comm in comms:
        terms.extend(communicator_terms(comm, gpu=gpu, nvls=nvls, buffsize=buffsize))
    return tuple(terms)


def device_used_bytes(reserved_bytes: int, terms: Iterable[DeviceTerm]) -> int:
    """What nvidia-smi shows for the process: the allocator's reserved bytes plus the terms
    outside it (`device_terms`)."""
    return reserved_bytes + sum(t.bytes for t in terms)
