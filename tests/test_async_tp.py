"""AsyncTP (`parallelism.async_tp`): torch's micro-pipelined tensor parallelism as torchtitan runs
it. What is checked, and against what:

- the symmetric-memory workspace's request, against torch's own fused ops
  (torch/distributed/_symmetric_memory/__init__.py, the installed torch) run on meta tensors
  with the workspace call intercepted (independent oracle: the library computes it);
- the allocation around the request (16-byte offset, 2,048-byte signal pad, 2 MiB granularity)
  from CUDASymmetricMemory.cu, which needs CUDA: a pinning test;
- where the workspace goes (device_terms, not allocated or reserved), the refusals and the JSON
  keys: structure checks on the published 70B row's spec.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.load import load_inventory
from memplan.report.estimate import estimate
from memplan.report.json import estimate_document
from memplan.step import device

GIB = 1 << 30
MIB = 1 << 20

# benchmarks/published.py's table 4 row (torchtitan 9dec370, Llama 3.1 70B, FSDP 32 x TP 8).
ROW_70B: dict[str, Any] = {
    "model": {"preset": "llama-3.1-70b", "implementation": "torchtitan"},
    "precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
    "optimizer": {"name": "adamw", "implementation": "foreach"},
    "training": {
        "sequence_length": 8192,
        "attention": "sdpa",
        "micro_batch_size": 16,
        "activation_checkpointing": "full",
        "compile": True,
        "compile_loss": False,
    },
    "parallelism": {
        "engine": "fsdp2",
        "fsdp_wrap": "layers",
        "sequence_parallel": True,
        "data": 32,
        "tensor": 8,
        "async_tp": True,
    },
    "hardware": {
        "gpu": "H100-80GB",
        "memory": "96GB",
        "gpus_per_node": 8,
        "alloc_conf": "expandable_segments:True",
    },
}


def _with(doc: dict[str, Any], section: str, **changes: Any) -> dict[str, Any]:
    return {**doc, section: {**doc[section], **changes}}


# --- the workspace's request, from torch's own code -------------------------------------------


class _Requested(Exception):
    def __init__(self, min_size: int) -> None:
        self.min_size = min_size


def _request(monkeypatch: pytest.MonkeyPatch, run: Any, tp: int) -> int:
    """The min_size torch's fused op asks get_symm_mem_workspace for, on meta tensors, with a
    stand-in TP group of `tp` ranks (symmetric memory itself needs CUDA)."""
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed import _symmetric_memory as symm

    class Group:
        def size(self) -> int:
            return tp

    def workspace(group_name: str, min_size: int) -> None:
        raise _Requested(min_size)

    monkeypatch.setattr(c10d, "_resolve_process_group", lambda name: Group())
    monkeypatch.setattr(c10d, "_get_group_size_by_name", lambda name: tp)
    monkeypatch.setattr(symm, "get_symm_mem_workspace", workspace)
    with pytest.raises(_Requested) as got:
        run(symm)
    return got.value.min_size


def test_workspace_is_torchs_own_largest_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 70B row's block, one TP rank: w2's matmul + reduce-scatter (A [b, s, ffn / TP],
    scattered along the sequence) asks for more than the feed-forward's all-gather + matmul
    (the [b, s / TP, hidden] shard, gathered along the sequence), and memplan's term holds
    exactly the larger request (plus the allocation's pad and rounding)."""
    import torch

    b, s, hidden, ffn, tp = 16, 8192, 8192, 28672, 8
    bf16, meta = torch.bfloat16, torch.device("meta")

    def matmul_reduce_scatter(symm: Any) -> None:
        a = torch.empty(b, s, ffn // tp, dtype=bf16, device=meta)
        w = torch.empty(ffn // tp, hidden, dtype=bf16, device=meta)
        symm._fused_matmul_reduce_scatter_impl(
            mm_out_op=torch.ops.aten.mm.out,
            A=a,
            B=w,
            kwargs={},
            out_dtype=bf16,
            reduce_op="sum",
            scatter_dim=1,
            group_name="tp",
        )

    def all_gather_matmul(symm: Any) -> None:
        shard = torch.empty(b, s // tp, hidden, dtype=bf16, device=meta)
        ws = [torch.empty(hidden, ffn // tp, dtype=bf16, device=meta) for _ in range(2)]
        symm._fused_all_gather_matmul_impl(
            torch.ops.aten.mm.out, shard, ws, None, [{}, {}], [None, None], 1, "tp", False
        )

    rs = _request(monkeypatch, matmul_reduce_scatter, tp)
    ag = _request(monkeypatch, all_gather_matmul, tp)
    assert rs == 2 * (b * s // tp) * hidden * 2
    assert ag < rs
    term = device.symmetric_memory_workspace(tokens=b * s, hidden=hidden, tensor=tp, width=2)
    assert rs <= term.bytes < rs + device.SYMM_SIGNAL_PAD + device.SYMM_GRANULARITY


def test_pin_workspace_allocation() -> None:
    """CUDASymmetricMemoryAllocator::alloc (CUDA only): round_up(size, 16) + 2,048 B of signal
    pad, rounded up to the allocation granularity (2 MiB assumed)."""
    term = device.symmetric_memory_workspace(tokens=16 * 8192, hidden=8192, tensor=8, width=2)
    assert term.bytes == 514 * MIB
    assert term.name == "symmetric_memory_workspace"
    # 405B, micro-batch 4: 2 x [4,096, 16,384] bf16 = 256 MiB, then the pad's page.
    term = device.symmetric_memory_workspace(tokens=4 * 8192, hidden=16384, tensor=8, width=2)
    assert term.bytes == 258 * MIB


# --- where it goes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reports() -> tuple[Any, Any]:
    on = validate(ROW_70B)
    off = validate(_with(ROW_70B, "parallelism", async_tp=False))
    inventory = load_inventory(on)
    return estimate(on.spec, inventory), estimate(off.spec, inventory)


def test_workspace_is_outside_the_allocator(reports: tuple[Any, Any]) -> None:
    """The workspace adds to device_used only: allocated and reserved are modelled as without
    AsyncTP (the fused ops allocate what the unfused ones did)."""
    on, off = reports
    names = [t.name for t in on.device_terms]
    assert "symmetric_memory_workspace" in names
    assert "symmetric_memory_workspace" not in [t.name for t in off.device_terms]
    assert on.peak_bytes == off.peak_bytes
    assert on.peak_reserved == off.peak_reserved
    assert on.device_used - off.device_used == 514 * MIB
    assert any(n.startswith("async_tp:") for n in on.notes)


def test_json_keys(reports: tuple[Any, Any]) -> None:
    on, off = reports
    doc = estimate_document(on)
    assert doc.parallelism.async_tp is True
    assert estimate_document(off).parallelism.async_tp is False
    terms = {t.name: t.bytes for t in doc.per_gpu.device_terms}
    assert terms["symmetric_memory_workspace"] == 514 * MIB


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "changes", "words"),
    [
        ("parallelism", {"tensor": 1, "sequence_parallel": False, "data": 256}, "tensor > 1"),
        ("parallelism", {"sequence_parallel": False}, "sequence_parallel: true"),
        ("parallelism", {"engine": "ddp", "fsdp_wrap": None}, "engine: fsdp2"),
    ],
)
def test_refused_outside_sequence_parallel_fsdp2(
    section: str, changes: dict[str, Any], words: str
) -> None:
    doc = _with(ROW_70B, section, **changes)
    if doc["parallelism"].get("fsdp_wrap") is None:
        doc["parallelism"] = {k: v for k, v in doc["parallelism"].items() if k != "fsdp_wrap"}
    with pytest.raises(MemplanError) as err:
        validate(doc)
    assert "parallelism.async_tp:" in str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("section", "changes", "words"),
    [
        ("training", {"compile": False, "compile_loss": False}, "training.compile: true"),
        ("model", {"implementation": "transformers"}, "model.implementation: torchtitan"),
    ],
)
def test_refused_outside_torchtitan_compiled(
    section: str, changes: dict[str, Any], words: str
) -> None:
    loaded = validate(_with(ROW_70B, section, **changes))
    with pytest.raises(MemplanError) as err:
        estimate(loaded.spec, load_inventory(loaded))
    assert err.value.field == "parallelism.async_tp"
    assert words in str(err.value)


# --- benchmarks/async_tp_trace.py's edits of a traced event list ---------------------------------


def test_trace_edits_on_a_hand_written_block() -> None:
    """One forward block as benchmarks/torchtitan_70b_trace.py records it (the attention's fp8
    all-gather, wait and cat; wo's _scaled_mm, cat, reduce-scatter and wait) and a backward
    reduce-scatter of a gradient sum: the waits become their collectives' storages, and AsyncTP
    drops the gather's collective output and the fused reduce-scatter's cat only."""
    pytest.importorskip("torch")
    from benchmarks import async_tp_trace as a

    made = {
        0: (a.ALL_GATHER, (128, 1024, 8192), "float8_e4m3fn"),
        1: (a.WAIT, (128, 1024, 8192), "float8_e4m3fn"),
        2: (a.CAT, (16, 8192, 8192), "uint8"),
        3: (a.SCALED_MM, (131072, 8192), "bfloat16"),
        4: (a.CAT, (128, 1024, 8192), "bfloat16"),
        5: (a.REDUCE_SCATTER, (16, 1024, 8192), "bfloat16"),
        6: (a.WAIT, (16, 1024, 8192), "bfloat16"),
        7: ("aten.add.Tensor", (16, 8192, 8192), "bfloat16"),
        8: (a.CAT, (128, 1024, 8192), "bfloat16"),
        9: (a.REDUCE_SCATTER, (16, 1024, 8192), "bfloat16"),
    }
    g, big, shard = 1 << 30, 2 << 30, 1 << 28
    events = [
        ("alloc", 0, g), ("alloc", 1, g), ("alloc", 2, g), ("free", 0), ("free", 1),
        ("alloc", 3, big), ("alloc", 4, big), ("alloc", 5, shard), ("alloc", 6, shard),
        ("free", 4), ("free", 5), ("free", 2), ("free", 3), ("free", 6),
        ("alloc", 7, big), ("alloc", 8, big), ("alloc", 9, shard), ("free", 8), ("free", 7),
        ("free", 9),
    ]  # fmt: skip
    fixed = a.waits_aliased(events, made)
    assert [e for e in fixed if e[0] == "alloc" and e[1] in (1, 6)] == []
    # the reduce-scatter's storage lives on as the wait's did
    assert fixed.index(("free", 5)) > fixed.index(("free", 3))
    fused, counts = a.async_tp(fixed, made)
    assert counts == {"all_gather_matmul": 1, "matmul_reduce_scatter": 1}
    kept = {e[1] for e in fused if e[0] == "alloc"}
    assert kept == {2, 3, 5, 7, 8, 9}
