"""memplan.step.device against the sources it cites (tests/data/device_sources.json records the
constants and formulas as NCCL 2.30.7 and torch's CublasHandlePool.cpp spell them, and the
published measurements), and the composition for typical layouts. Torch-free."""

from __future__ import annotations

import json

import pytest

from memplan import memory
from memplan.errors import MemplanError
from memplan.step import device
from tests.conftest import DATA

SOURCES = json.loads((DATA / "device_sources.json").read_text(encoding="utf-8"))
NCCL = SOURCES["nccl"]
H = NCCL["src/include/device.h"]
MIB = 2**20


def _c_expr(expr: str, names: dict[str, int]) -> int:
    """A C constant expression as the source spells it (a sum of products of names and
    integers, or one shift such as `(1 << 22)`), its names' values from `names`."""
    text = expr.split("/*")[0].strip()
    if "<<" in text:
        base, shift = text.strip("()").split("<<")
        return int(base) << int(shift)
    total = 0
    for term in text.split("+"):
        product = 1
        for factor in (f.strip() for f in term.split("*")):
            product *= names[factor] if factor in names else int(factor)
        total += product
    return total


SIZES = {**H, "sizeof(uint64_t)": 8}


# --- NCCL constants: against the source text -------------------------------------------------


def test_nccl_protocol_buffers_match_source() -> None:
    init = NCCL["src/init.cc"]
    assert device.NCCL_LL_BUFFSIZE == _c_expr(init["DEFAULT_LL_BUFFSIZE"], SIZES) == 512 * 1024
    assert device.NCCL_LL128_BUFFSIZE == _c_expr(init["DEFAULT_LL128_BUFFSIZE"], SIZES)
    assert device.NCCL_LL128_BUFFSIZE == 4_915_200
    assert device.NCCL_BUFFSIZE == _c_expr(init["DEFAULT_BUFFSIZE"], SIZES) == 4 * MIB
    assert device.NCCL_STEPS == H["NCCL_STEPS"]
    assert device.CUDA_IPC_MIN == NCCL["src/include/comm.h"]["CUDA_IPC_MIN"]


def test_nvls_constants_match_source() -> None:
    nvls = NCCL["src/transport/nvls.cc"]
    assert device.NVLS_CHANNELS_SM90 == nvls["NVLS_NCHANNELS_SM90"]
    assert device.NVLS_CHANNELS_SM100 == nvls["NVLS_NCHANNELS_SM100"]
    assert device.NVLS_CHANNELS_SM100_NVL == nvls["NVLS_NCHANNELS_SM100_NVL"]
    assert device.NVLS_CHUNKSIZE == nvls["NCCL_NVLS_CHUNKSIZE"]


def test_default_channels_match_logged_h800() -> None:
    logged = NCCL["logged"]["NVIDIA/nccl#892 (8x H800, one node)"]
    assert logged.startswith(f"{device.DEFAULT_CHANNELS} coll channels")
    assert logged.endswith(f"{device.DEFAULT_CHANNELS} p2p channels per peer")
    assert device.DEFAULT_CHANNELS <= H["MAXCHANNELS"]


def test_nvls_formula_reproduces_logged_total() -> None:
    """nvls.cc's formula (recorded) gives vllm#9699's logged nvlsPerRankSize/nvlsTotalSize when
    fed that NCCL's 4 MiB + 2 MiB per channel and 24 channels x 8 heads: the formula memplan
    uses (with today's 1 MiB NVLS buffer) is the one NCCL logs."""
    per_rank, heads = 301_989_888, 8
    assert per_rank == 24 * 2 * (4_194_304 + 2_097_152)
    assert per_rank * heads == 2_415_919_104


# --- connection memory: p2p.cc's sizing, worked from the recorded constants -------------------


@pytest.mark.parametrize("p2p_read", [True, False])
def test_connection_pair_is_12_mib(p2p_read: bool) -> None:
    """p2pSendSetup/p2pRecvSetup: send = ncclSendMem (+ Simple with read), recv = ncclRecvMem +
    LL + LL128 (+ Simple without read), each rounded to CUDA_IPC_MIN. Worked by hand:
    read: 4096 + 4 MiB -> 6 MiB, 4096 + 512 KiB + 4,915,200 -> 6 MiB; write: 2 MiB + 10 MiB."""
    assert device.connection_bytes(p2p_read=p2p_read) == 12 * MIB


def test_pin_connection_follows_buffsize() -> None:
    assert device.connection_bytes(buffsize=1 * MIB, p2p_read=True) == 2 * MIB + 6 * MIB


# --- cuBLAS workspaces: torch's formula, and that they sit inside reserved ---------------------


def test_cublas_workspace_defaults_match_torch_source() -> None:
    src = SOURCES["torch"]["aten/src/ATen/cuda/CublasHandlePool.cpp"]
    sm90_expr, other_expr = src["parseChosenWorkspaceSize default"].split("?")[1].split(":")
    assert device.CUBLAS_WORKSPACE_SM90 == _c_expr(sm90_expr, {}) == 32 * MIB
    assert device.CUBLAS_WORKSPACE_DEFAULT == _c_expr(other_expr, {}) == 8_519_680
    assert device.CUBLASLT_WORKSPACE_KIB == src["parseCUDABlasLtWorkspaceSize default KiB"]
    assert "CUDACachingAllocator" in src["getNewWorkspace"]


@pytest.mark.parametrize(
    ("config", "expected"),
    # torch's documented deterministic settings (torch.use_deterministic_algorithms docs):
    # ":4096:8" is 8 x 4 MiB, ":16:8" is 8 x 16 KiB.
    [(":4096:8", 32 * MIB), (":16:8", 128 * 1024), (":4096:2:16:8", 8_519_680)],
)
def test_cublas_workspace_config(config: str, expected: int) -> None:
    assert device.cublas_workspace_config_bytes(config) == expected


def test_allocator_workspaces_by_generation() -> None:
    h100 = {t.name: t.bytes for t in device.allocator_workspaces(gpu="H100")}
    a100 = {t.name: t.bytes for t in device.allocator_workspaces(gpu="A100-80GB", streams=2)}
    assert h100 == {"cublas_workspace": 32 * MIB, "cublaslt_workspace": 1 * MIB}
    assert a100 == {"cublas_workspace": 2 * 8_519_680, "cublaslt_workspace": 2 * MIB}
    unified = device.allocator_workspaces(gpu="H200", unified_cublaslt=True)
    assert [t.name for t in unified] == ["cublas_workspace"]


def test_workspaces_are_not_device_terms() -> None:
    """The workspaces come from the caching allocator, so nvidia-smi = reserved + device_terms
    must not count them again."""
    names = {t.name for t in device.device_terms(gpu="H100")}
    assert not names & {"cublas_workspace", "cublaslt_workspace"}


# --- CUDA context ------------------------------------------------------------------------------


def test_context_measured_rows_match_sources() -> None:
    measured = SOURCES["cuda_context_measured"]
    rtx = device.CONTEXT_MEASURED[("RTX-3090", 12, True)]
    assert (
        rtx.bytes
        == measured["invoke-ai/InvokeAI#9413 (RTX 3090, torch 2.7.1+cu128, nvidia-smi)"]["lazy_mib"]
        * MIB
    )
    eager = device.CONTEXT_MEASURED[("RTX-3090", 11, False)]
    assert (
        eager.bytes
        == measured["pytorch/pytorch#55277 (RTX 3090, torch 1.8.2+cu111, nvidia-smi)"]["eager_mib"]
        * MIB
    )
    pair = measured["pytorch/pytorch#86509 (torch 1.13, CUDA 11.7, cudaMemGetInfo total-free)"]
    assert device.EAGER_KERNEL_IMAGES_BYTES == pair["eager"] - pair["lazy"]


def test_context_unmeasured_gpu_keeps_the_assumption() -> None:
    (term,) = device.cuda_context(gpu="H100-80GB", cuda_major=12)
    assert term.bytes == memory.CUDA_CONTEXT_BYTES
    assert term.source.startswith("assumed")


def test_context_eager_adds_kernel_images() -> None:
    terms = device.cuda_context(gpu="A100-80GB", lazy_loading=False)
    assert [t.name for t in terms] == ["cuda_context", "eager_kernel_images"]


def test_context_override_replaces_everything() -> None:
    terms = device.cuda_context(gpu="L4", lazy_loading=False, override=300 * MIB)
    assert [(t.name, t.bytes) for t in terms] == [("cuda_context", 300 * MIB)]


def test_context_measured_row_used() -> None:
    (term,) = device.cuda_context(gpu="3090", cuda_major=12)
    assert term.bytes == 256 * MIB and "InvokeAI#9413" in term.source


# --- communicators and composition -------------------------------------------------------------


def test_dp8_has_one_communicator() -> None:
    comms = device.communicators(data=8)
    assert [(c.name, c.ranks, c.local_ranks) for c in comms] == [("world", 8, 8)]


def test_tp8_pp2_has_three_communicators() -> None:
    comms = device.communicators(tensor=8, pipeline=2)
    assert [(c.name, c.ranks, c.local_ranks, c.collectives, c.p2p_peers) for c in comms] == [
        ("world", 16, 8, True, 0),  # barriers only
        ("tensor", 8, 8, True, 0),
        ("pipeline", 2, 1, False, 1),
    ]


def test_world_is_barrier_only_when_every_dimension_has_a_group() -> None:
    world, *_ = device.communicators(tensor=8, pipeline=2)
    assert world.barrier_only
    (pp_world,) = device.communicators(pipeline=4)
    assert (pp_world.collectives, pp_world.barrier_only, pp_world.p2p_peers) == (False, False, 2)
    (dp_world,) = device.communicators(data=8)
    assert not dp_world.barrier_only


def test_single_gpu_has_no_communicator() -> None:
    assert device.communicators() == ()


def test_dp8_h100_composition() -> None:
    """8x H100 (NVSwitch), DP8 in one node: context (assumed 512 MiB) + ring 16 x 12 MiB +
    NVLS 16 channels x 2 x 1 MiB x 8 heads."""
    terms = device.device_terms(gpu="H100", comms=device.communicators(data=8))
    got = {t.name: t.bytes for t in terms}
    assert got == {
        "cuda_context": 512 * MIB,
        "nccl_world_ring": 16 * 12 * MIB,
        "nccl_world_nvls": 16 * 2 * 1 * MIB * 8,
    }
    assert device.device_used_bytes(10 * 2**30, terms) == 10 * 2**30 + (512 + 192 + 256) * MIB


def test_nvls_off_and_a100_have_no_nvls() -> None:
    comms = device.communicators(data=8)
    off = device.device_terms(gpu="H100", comms=comms, nvls=False)
    a100 = device.device_terms(gpu="A100-80GB", comms=comms)
    h100_nvl = device.device_terms(gpu="H100-NVL", comms=comms)
    for terms in (off, a100, h100_nvl):
        assert not any(t.name.endswith("_nvls") for t in terms)


def test_tp8_pp2_h100_composition() -> None:
    terms = device.device_terms(gpu="H100", comms=device.communicators(tensor=8, pipeline=2))
    got = {t.name: t.bytes for t in terms}
    assert got == {
        "cuda_context": 512 * MIB,
        "nccl_world_ring": 16 * 12 * MIB,
        "nccl_tensor_ring": 16 * 12 * MIB,
        "nccl_tensor_nvls": 256 * MIB,
        "nccl_pipeline_p2p": 1 * 16 * 12 * MIB,
    }


def test_every_term_has_formula_and_source() -> None:
    terms = device.device_terms(
        gpu="B200", lazy_loading=False, comms=device.communicators(tensor=8, pipeline=4, data=2)
    )
    assert terms
    for t in terms:
        assert t.bytes > 0 and t.formula and t.source


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_gpu_is_one_error_naming_the_field() -> None:
    with pytest.raises(MemplanError, match=r"unknown gpu 'H1000'.*did you mean") as err:
        device.device_terms(gpu="H1000")
    assert err.value.field == "hardware.gpu"
    assert str(err.value).startswith("hardware.gpu: ")


def test_amd_gpu_is_refused() -> None:
    with pytest.raises(MemplanError, match="not a CUDA GPU") as err:
        device.cuda_context(gpu="MI300X")
    assert err.value.field == "hardware.gpu"


def test_unknown_cuda_version() -> None:
    with pytest.raises(MemplanError, match="CUDA major version 10") as err:
        device.cuda_context(gpu="H100", cuda_major=10)
    assert err.value.field == "hardware.cuda_version"


@pytest.mark.parametrize("config", ["4096:8", ":4096", ":a:8"])
def test_bad_cublas_workspace_config(config: str) -> None:
    with pytest.raises(MemplanError) as err:
        device.cublas_workspace_config_bytes(config)
    assert err.value.field == "hardware.cublas_workspace_config"


def test_every_cuda_catalog_gpu_has_an_architecture() -> None:
    from memplan.hardware import CATALOG

    assert set(CATALOG) - set(device.SM) == {"MI300X"}
    assert device.NVSWITCH <= set(device.SM)


def test_bad_degree_names_its_field() -> None:
    with pytest.raises(MemplanError, match="not a positive degree") as err:
        device.communicators(tensor=0)
    assert err.value.field == "parallelism.tensor"
