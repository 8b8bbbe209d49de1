"""torchtitan's own MoE under its expert parallelism and its FSDP2 expert sharding (issue 19):
memplan's rules (memplan.model.stacks.torchtitan_moe with `Setting.local_experts`,
memplan.activations.torchtitan_parallel, memplan.states.engines.fsdp2.sharding.dim1_experts)
against torchtitan 0.3.0 itself, the whole matrix, then `memplan estimate` of Qwen3-30B-A3B
at EP 1 and EP 8 on 64 GPUs (also as data 32 x TP 2) and at data 256.

Part 1, `ranks`: tests/torchtitan_ep_probe.py on 2 and 4 gloo ranks: torchtitan's tiny
Qwen3-MoE (dim 64, 8 experts top 2 of hidden 48; 2 experts of hidden 48 for the dim-1 states)
and DeepSeek-V3 (MLA, one dense layer, 8 experts top 2 of hidden 24, one shared expert) laid out
by its own ParallelDims(dp_shard=world, ep), sharding configs and Module.parallelize, under
its balanced round-robin routing; per rank, what forward + loss hold for backward (fp32 and
bf16 x none / full / selective-op x EP 2 and 4 x batch 1 and 2) and, after
apply_fsdp_to_decoder and one AdamW step, the parameters, gradients and AdamW moments
(EP 1, 2, 4; 8 experts, and 2 experts so that efsdp x EP exceeds them: dim-1 shards); and
Qwen3-MoE under torchtitan's own TP 2 (EP 1; world 2: fp32 and bf16 x none / full /
selective-op x SP on and off; world 4, data 2 x TP 2: bf16 with SP), its model states too;
EP x TP with SP (EP borrowing ranks from data x TP): Qwen3-MoE at TP 2 x EP 2 on 2 and 4 ranks,
TP 2 x EP 4, TP 4 x EP 2 and TP 4 x EP 4 on 4 (4 key/value heads at TP 4), held and states;
without SP torchtitan itself fails, and the row compares memplan's refusal, which quotes the
error, with the error each rank records; DeepSeek-V3 (experts' hidden 32, so that TP's halves
keep _grouped_mm's 16-byte strides) under TP 2 at EP 1 (SP on and off, batch 1 and 2) and EP 2
on 2 ranks, EP 2 and 4 on 4, with a q_lora_rank too.

Part 2, `fake`: FSDP2's own padded shard sizes of two blocks of torchtitan's Qwen3-30B-A3B
(128 experts) over a fake process group of 64, 128, 256 and 512 ranks at EP 1, 8 and 16
(tests/torchtitan_ep_probe.py::fake_sharded), against memplan's per-rank parameters. At 512
ranks and EP 1 the experts' dim 1 (768) does not split evenly: FSDP2 raises
NotImplementedError and memplan refuses (parallelism.data); the row counts as agreeing when
both refuse.

Part 3, `estimates`: `memplan estimate` of Qwen3-30B-A3B (memplan's preset) with torchtitan's
code, FSDP2 over 64 GPUs, 2 x 4096, bf16-mixed AdamW, H100-80GB, expandable segments, EP 1 and
EP 8 x none / full / selective-op; at data 256, EP 1 and 8 (the experts' dim-1 shards); and
at data 32 x TP 2 (+ SP), EP 1 and 8 (EP x TP: the MoE on the token shard).

    PYTHONPATH=$PWD python benchmarks/torchtitan_moe_ep.py   # ~7 min on 2 busy cores
    # writes benchmarks/results/torchtitan-moe-ep.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from tests.conftest import make_spec  # noqa: E402
from tests.test_torchtitan_moe import qwen3_moe  # noqa: E402
from tests.test_torchtitan_moe_ep import predicted  # noqa: E402
from tests.torchtitan_ep_probe import QWEN3_30B_A3B, Case, fake_sharded, run  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-moe-ep.json"
GIB = 2**30
MODES = ("none", "full", "selective-op")


def cases(world: int) -> list[Case]:
    out = []
    for ep in (2, 4) if world == 4 else (2,):
        for dtype in ("bf16", "fp32"):
            for mode in MODES:
                for batch in (1, 2):
                    out.append(Case(dtype, mode, ep, batch=batch))
    for ep in (1, 2, 4) if world == 4 else (1, 2):
        for experts in (8, 2):
            if experts % ep:
                continue  # EP must divide the experts (memplan refuses; FSDP2 fails at init)
            out.append(Case("bf16", "none", ep, experts=experts, what="states"))
    for dtype in ("bf16", "fp32") if world == 2 else ("bf16",):
        for mode in MODES:
            for sp in (True, False) if world == 2 else (True,):
                out.append(Case(dtype, mode, 1, tp=2, sp=sp))
    out.append(Case("bf16", "none", 1, tp=2, what="states"))
    # EP x TP (+ SP): EP borrows ranks from data x TP (efsdp = data x TP / EP); TP 4 needs the
    # 4 key/value heads. Without SP torchtitan itself fails (`refused`).
    shapes = ((2, 2, 2),) if world == 2 else ((2, 2, 2), (4, 2, 2), (2, 4, 4), (4, 4, 4))
    for ep, tp, kv in shapes:
        for dtype in ("bf16", "fp32") if (ep, tp) == (2, 2) else ("bf16",):
            for mode in MODES if tp == 2 else ("none", "selective-op"):
                out.append(Case(dtype, mode, ep, tp=tp, kv_heads=kv))
        out.append(Case("bf16", "none", ep, tp=tp, kv_heads=kv, what="states"))
    if world == 4:
        out.append(Case("bf16", "none", 2, tp=2, experts=2, what="states"))
        out.append(Case("bf16", "none", 2, tp=2, batch=1))
        out.append(Case("bf16", "none", 2, tp=2, sp=False))
    if world == 2:
        for dtype in ("bf16", "fp32"):
            for mode in MODES:
                out.append(Case(dtype, mode, 2, layers=3, moe_ffn=24, model="deepseek_v3"))
        out.append(
            Case("bf16", "none", 2, layers=3, moe_ffn=24, model="deepseek_v3", what="states")
        )
        # DeepSeek-V3 under TP 2 (EP 1): the experts' hidden 32 / TP = 16 (torch's
        # _grouped_mm needs 16-byte strides: 24 / 2 = 12 bf16 fails on CPU).
        ds = {"layers": 3, "moe_ffn": 32, "model": "deepseek_v3", "tp": 2}
        for dtype in ("bf16", "fp32"):
            for mode in MODES:
                out.append(Case(dtype, mode, 1, **ds))
        for mode in ("none", "selective-op"):
            out.append(Case("bf16", mode, 1, sp=False, **ds))
        out.append(Case("bf16", "none", 1, batch=1, **ds))
        out.append(Case("bf16", "none", 1, what="states", **ds))
        # ... and under EP 2 x TP 2.
        for dtype in ("bf16", "fp32"):
            for mode in MODES:
                out.append(Case(dtype, mode, 2, **ds))
        out.append(Case("bf16", "none", 2, what="states", **ds))
        # MLA with a q_lora_rank (wq_a and q_norm replicated, wq_b column-parallel).
        for ep in (1, 2):
            for dtype, mode in (("bf16", "none"), ("bf16", "selective-op"), ("fp32", "none")):
                out.append(Case(dtype, mode, ep, q_lora=16, **ds))
    if world == 4:
        ds = {"layers": 3, "moe_ffn": 32, "model": "deepseek_v3", "tp": 2}
        for ep in (2, 4):
            for mode in ("none", "selective-op"):
                out.append(Case("bf16", mode, ep, **ds))
            out.append(Case("bf16", "none", ep, what="states", **ds))
    return out


def ranks() -> list[dict[str, Any]]:
    rows = []
    for world in (2, 4):
        matrix = cases(world)
        with tempfile.TemporaryDirectory() as d:
            measured = run(matrix, Path(d), world=world)
        for case in matrix:
            got = [r[case.name] for r in measured]
            ep_tp_off = case.tp > 1 and case.ep > 1 and not case.sp
            want = refused(case, world) if ep_tp_off else predicted(case, world)
            rows.append(
                {
                    "world": world,
                    "case": case.name,
                    "model": case.model,
                    "what": case.what,
                    "ep": case.ep,
                    "measured": got,
                    "predicted": want,
                    "exact": got == want,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def refused(case: Case, world: int) -> Any:
    """What memplan says of a case torchtitan fails on: its refusal, quoting torchtitan's
    error, on every rank (equal to what the probe records when the error is the same)."""
    from memplan.model.sources import from_config
    from tests.conftest import micro_batch_of
    from tests.test_torchtitan_moe_ep import _spec, config_of

    cfg = config_of(case)
    tp = {"tensor": case.tp, "sequence_parallel": case.sp}
    spec = _spec(cfg, case.dtype, case.mode, world // case.tp, case.ep, case.batch, **tp)
    saved = micro_batch_of(spec, from_config(cfg))
    assert not saved.modelled
    quoted = saved.notes[0].split('raises "')[1].split('" (run')[0]
    return [{"error": quoted}] * world


def fake() -> list[dict[str, Any]]:
    s = QWEN3_30B_A3B
    cfg = {
        **qwen3_moe(s.layers, experts=s.experts, top_k=s.top_k),
        "hidden_size": s.dim,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "moe_intermediate_size": s.moe_ffn,
    }
    rows = []
    for world, ep in ((64, 1), (64, 8), (128, 1), (128, 8), (256, 1), (256, 8), (256, 16),
                      (512, 1), (512, 8)):  # fmt: skip
        spec = make_spec(
            model={"architecture": cfg, "implementation": "torchtitan"},
            parallelism={"engine": "fsdp2", "data": world, "expert": ep},
            precision="bf16-mixed",
            training={"micro_batch_size": 1, "sequence_length": 64},
        )
        try:
            want: int | str = estimate(spec, from_config(cfg)).ranks[0].bytes_of("parameters")
        except MemplanError as e:
            want = f"refused: {e.field}"
        try:
            shards = fake_sharded(world, ep)
        except NotImplementedError as e:  # FSDP2's uneven dim-1 shard
            got: int | str = f"NotImplementedError: {e}"
            experts = 0
        else:
            got = 4 * sum(shards.values())
            experts = 4 * sum(v for k, v in shards.items() if "inner_experts" in k)
        refused = isinstance(want, str) and isinstance(got, str)
        rows.append(
            {
                "world": world,
                "ep": ep,
                "dim1": world > s.experts,
                "measured_parameters": got,
                "measured_expert_parameters": experts,
                "predicted_parameters": want,
                "exact": got == want or refused,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spec_of(mode: str, data: int, ep: int, tp: int = 1) -> dict[str, Any]:
    tensor = {"tensor": tp, "sequence_parallel": True} if tp > 1 else {}
    return {
        "model": {"preset": "qwen3-30b-a3b", "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
        },
        "parallelism": {"engine": "fsdp2", "data": data, "expert": ep, **tensor},
        "hardware": {"gpu": "H100-80GB", "alloc_conf": "expandable_segments:True"},
    }


def estimates() -> list[dict[str, Any]]:
    rows = []
    rows_of = ((64, (1, 8), MODES, 1), (256, (1, 8), ("full",), 1), (32, (1, 8), MODES, 2))
    for data, eps, modes, tp in rows_of:
        for ep in eps:
            for mode in modes:
                loaded = validate(spec_of(mode, data, ep, tp))
                report = estimate(loaded.spec, load_inventory(loaded))
                reserved = report.peak_reserved
                assert reserved is not None and report.activations.modelled
                g = report.per_gpu
                row = {
                    "model": "Qwen3-30B-A3B",
                    "data": data,
                    "tensor": tp,
                    "expert": ep,
                    "checkpointing": mode,
                    "parameters_gib": round(g.bytes_of("parameters") / GIB, 3),
                    "gradients_gib": round(g.bytes_of("gradients") / GIB, 3),
                    "optimizer_states_gib": round(g.bytes_of("optimizer_states") / GIB, 3),
                    "activations_gib": round(report.activations.bytes / GIB, 2),
                    "peak_allocated_gib": round(report.peak_bytes / GIB, 2),
                    "peak_reserved_gib": round(reserved / GIB, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    warnings.filterwarnings("ignore", message="In CPU autocast")  # the router's fp32 autocast
    start = time.time()
    measured = ranks()
    big = fake()
    est = estimates()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_moe_ep.py",
        "routing": "torchtitan's _debug_force_load_balance round-robin (balanced)",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": "0.3.0",
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(measured) + len(big),
            "exact": sum(r["exact"] for r in (*measured, *big)),
            "seconds": round(time.time() - start, 1),
        },
        "ranks": measured,
        "fake": big,
        "estimates": est,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
