"""What AsyncTP takes out of the caching allocator on torchtitan's Llama 3.1 70B row (FSDP 32 x
TP 8, full AC, compile + Float8: published max reserved 71.9 GiB, 67.6 GiB with AsyncTP), read
off the op-by-op trace of benchmarks/torchtitan_70b_trace.py and replayed through memplan's
caching-allocator model.

The trace (torchtitan 9dec370's model and apply_tp with torchao's Float8 TP styles, one TP rank
under FakeTensorMode, eager blocks) records the step's allocations as the unfused code makes
them. Two edits of that event list, each from the source:

1. `wait_tensor` made a second storage in the trace: its Meta kernel is `torch.empty_like(self)`
   (torch 2.13 torch/distributed/_functional_collectives.py::_wait_tensor_meta), while the
   real op returns its input (the collective's output, c10d Functional.cpp). Every
   collective's output was so counted twice while both were alive. Fixed here: the wait's
   storage is the collective's, freed when the later of the two is.
2. AsyncTP: Inductor's micro_pipeline_tp pass (torch/_inductor/fx_passes/micro_pipeline_tp.py)
   replaces, inside the compiled blocks,
   - an all-gather along the sequence whose result feeds matmuls (the attention's and the
     feed-forward's fp8 inputs in forward and in the recomputed forward; the row-parallel
     layers' fp8 output gradients in backward) by fused_all_gather_matmul, which gathers into
     one [tokens, K] buffer (_fused_all_gather_matmul_impl: A_flat) where the functional
     collective made the gathered [TP x tokens / TP, K] output and then torch.cat's reordered
     copy (_functional_collectives.py::all_gather_tensor, gather_dim 1): the collective's
     output goes, the cat (as A_flat) stays;
   - a reduce-scatter of a matmul's output (wo and w2 in forward and in the recomputed
     forward) by fused_matmul_reduce_scatter, whose [tokens, N] stacked partials replace the
     matmul's output (_fused_matmul_reduce_scatter_impl), with no torch.cat reorder before
     the reduce-scatter (reduce_scatter_tensor, scatter_dim 1): the cat goes. The backward's
     reduce-scatters of the column-parallel input gradients reduce a sum of matmuls
     (autograd's add), not one matmul's output (micro_pipeline_tp.py::_find_producer_matmul),
     and stay.
   The head (`output`, not Float8, not compiled) and the embedding keep their collectives:
   only fp8 gathers and `_scaled_mm` producers are rewritten.

Not modelled: Inductor's own buffer reuse in compiled blocks (the trace is eager), the order in
which the fused ops allocate; the symmetric-memory workspace is outside the allocator
(memplan.step.device.symmetric_memory_workspace) and not in these figures.

    PYTHONPATH=$PWD python benchmarks/async_tp_trace.py   # ~2 min on 2 quiet cores
    # writes benchmarks/results/async-tp-trace.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from benchmarks import torchtitan_70b_trace as t70  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan.step import allocator  # noqa: E402
from memplan.step.alloc_conf import AllocConf  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "async-tp-trace.json"
GIB = 1 << 30
PUBLISHED = {"unfused": 71.9, "async_tp": 67.6}
WAIT = "_c10d_functional.wait_tensor.default"
ALL_GATHER = "_c10d_functional.all_gather_into_tensor.default"
REDUCE_SCATTER = "_c10d_functional.reduce_scatter_tensor.default"
CAT = "aten.cat.default"
SCALED_MM = "aten._scaled_mm.default"

Event = tuple[Any, ...]


def _op(made: dict[int, tuple[str, tuple[int, ...], str]], i: int) -> str:
    return made[i][0]


def without(events: list[Event], drop: set[int], moved_free: dict[int, int]) -> list[Event]:
    """`events` without the allocations and frees of `drop`, and with the frees of
    `moved_free`'s keys made where the frees of its values are."""
    by_free = {v: k for k, v in moved_free.items()}
    out: list[Event] = []
    for e in events:
        if e[0] == "alloc" and e[1] in drop:
            continue
        if e[0] == "free":
            if e[1] in moved_free:
                continue
            if e[1] in by_free:
                out.append(("free", by_free[e[1]]))
            if e[1] in drop:
                continue
        out.append(e)
    return out


def waits_aliased(events: list[Event], made: dict[int, Any]) -> list[Event]:
    """Edit 1: each wait_tensor's storage is its collective's (the allocation just before it),
    freed at the later of the two frees."""
    order = {e[1]: k for k, e in enumerate(events) if e[0] == "free"}
    drop: set[int] = set()
    moved: dict[int, int] = {}
    last_alloc: int | None = None
    for e in events:
        if e[0] != "alloc":
            continue
        i = e[1]
        if _op(made, i) == WAIT and last_alloc is not None:
            collective = _op(made, last_alloc)
            assert collective.startswith("_c10d_functional.") and collective != WAIT, collective
            drop.add(i)
            if order.get(i, len(events)) > order.get(last_alloc, len(events)):
                moved[last_alloc] = i  # the collective's storage lives as long as the wait's
        last_alloc = i
    return without(events, drop, moved)


def async_tp(events: list[Event], made: dict[int, Any]) -> tuple[list[Event], dict[str, int]]:
    """Edit 2 on an event list that already has edit 1: drop the fused all-gathers' collective
    outputs and the fused reduce-scatters' cat copies."""
    drop: set[int] = set()
    counts = {"all_gather_matmul": 0, "matmul_reduce_scatter": 0}
    allocs = [e for e in events if e[0] == "alloc"]
    for k, e in enumerate(allocs):
        i = e[1]
        if _op(made, i) != CAT or k == 0:
            continue
        prev = allocs[k - 1][1]
        dtype = made[i][2]
        if _op(made, prev) == ALL_GATHER and dtype == "uint8":
            # the fp8 payload gathered along the sequence, then reordered (blocks only: the
            # head gathers bf16)
            drop.add(prev)
            counts["all_gather_matmul"] += 1
        elif (
            _op(made, prev) == SCALED_MM
            and allocs[k - 1][2] == e[2]
            and k + 1 < len(allocs)
            and _op(made, allocs[k + 1][1]) == REDUCE_SCATTER
        ):
            drop.add(i)
            counts["matmul_reduce_scatter"] += 1
    return without(events, drop, {}), counts


def replayed(rec: t70.Recorder, events: list[Event], row: dict[str, Any]) -> dict[str, Any]:
    copy = t70.Recorder()
    copy.events, copy.made = events, rec.made
    out: dict[str, Any] = {}
    full = t70.replay_events(copy, row)
    for name, conf in t70.CONFS.items():
        r = allocator.replay(full, AllocConf.parse(conf) if conf else None)
        out[name] = {
            "allocated_gib": round(r.peak_allocated / GIB, 2),
            "reserved_gib": round(r.peak_reserved / GIB, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--torchtitan-repo", type=Path, default=Path("/work/.mirror/pytorch+torchtitan/repo")
    )
    parser.add_argument("--layers", type=int, default=t70.LAYERS)
    ns = parser.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    row = t70.memplan_row()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t70.TP)
    try:
        rec = t70.trace(ns.torchtitan_repo, float8=True, layers=ns.layers)
    finally:
        dist.destroy_process_group()
    traced = time.perf_counter() - start
    fixed = waits_aliased(rec.events, rec.made)
    fused, counts = async_tp(fixed, rec.made)
    variants = {
        "as traced (torchtitan_70b_trace.py)": replayed(rec, rec.events, row),
        "wait_tensor aliased": replayed(rec, fixed, row),
        "wait_tensor aliased + AsyncTP": replayed(rec, fused, row),
    }
    for name, v in variants.items():
        print(f"{name:40s} " + ", ".join(f"{c} {x['reserved_gib']:.2f} GiB reserved "
                                         f"({x['allocated_gib']:.2f} allocated)"
                                         for c, x in v.items()))  # fmt: skip
    base, asy = variants["wait_tensor aliased"], variants["wait_tensor aliased + AsyncTP"]
    delta = {c: round(asy[c]["reserved_gib"] - base[c]["reserved_gib"], 2) for c in t70.CONFS}
    measured = round(PUBLISHED["async_tp"] - PUBLISHED["unfused"], 2)
    print(f"fused: {counts}; AsyncTP's reserved delta {delta} GiB, measured {measured} GiB")
    out = {
        **stamp(),
        "row": "table 4: Llama 3.1 70B, 256 H100s, FSDP 32 x TP 8, full AC, compile + Float8",
        "published_gib": PUBLISHED,
        "torchtitan": t70.COMMIT,
        "layers": ns.layers,
        "fused_ops": counts,
        "variants": variants,
        "async_tp_reserved_delta_gib": delta,
        "measured_delta_gib": measured,
        "trace_s": round(traced, 1),
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
