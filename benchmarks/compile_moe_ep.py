"""What a torch.compile'd torchtitan Qwen3-MoE block keeps for backward under expert parallelism,
traced on gloo ranks against memplan's rule (memplan.model.forward.compiled_ep.
qwen3_moe_ep_layer, op_sac_moe_ep_layer), and `memplan estimate` of Qwen3-30B-A3B at EP 8 with
training.compile true and false.

Part 1, `cases`: tests/compile_ep_probe.py on 2 gloo ranks (EP 2) and on 4 (EP 4): torchtitan
0.3.0's Qwen3-MoE block (tests/torchtitan_probe.py's tiny Qwen3-MoE, dim 64, 4 x 32 heads, 2
k/v heads, one block) laid out by its own EP (ParallelDims, set_qwen3_sharding_config,
Module.parallelize), checkpointed (none, FullAC, SelectiveAC), compiled as apply_compile
compiles it (fullgraph), forward + loss + backward run; per rank, the rows R its experts
received (an eager forward's routing, read apart from the compiled graph) and every tensor the
compiled forward passes to its backward (dtype, shape, bytes, read when the graph runs). The
rule at the same shape with that rank's R must give the same multiset of (dtype, bytes):
"exact". `balanced_rule_bytes`: the rule at R = tokens x top_k, what `memplan estimate` uses.

Grid: bf16 parameters, no checkpointing, under the three routings (seeded: R differs per rank;
torchtitan's balanced round-robin: R = N; collapsed: every token on experts 0 .. top_k - 1, so
rank 0 receives EP x N rows and the others none); fp32 parameters; SelectiveAC under seeded and
collapsed routing; FullAC, which torch 2.13 itself fails on under EP (the row holds the error
each rank raised and memplan's refusal, which quotes it: "exact" when it does); batch 1
against 2; 16 experts top 4 of hidden 32; at EP 4 none and SelectiveAC.

Part 2, `estimates`: `memplan estimate` of Qwen3-30B-A3B (memplan's preset), torchtitan's
code, FSDP2 over 64 GPUs at EP 8, local batch 2 x 4096, bf16-mixed AdamW, H100-80GB,
expandable segments: activations and peak allocated for training.compile false and true under
none / full / selective-op.

    PYTHONPATH=$PWD python benchmarks/compile_moe_ep.py   # ~15 min on 2 busy cores
    # writes benchmarks/results/compile-moe-ep.json; tests/test_compile_moe_ep.py checks the
    # rule against every stored trace and re-traces one case
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.forward import compiled_ep as rule  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-moe-ep.json"
DIMS = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32}
"""tests/torchtitan_probe.py::QWEN3_MOE_TINY's attention widths."""
MODES = ("none", "full", "selective-op")


def grid() -> dict[int, list[Any]]:
    from tests.compile_ep_probe import Case

    two = [
        Case("bf16", "none", "seeded"),
        Case("bf16", "none", "balanced"),
        Case("bf16", "none", "collapsed"),
        Case("fp32", "none", "seeded"),
        Case("bf16", "selective-op", "seeded"),
        Case("bf16", "selective-op", "collapsed"),
        Case("bf16", "full", "seeded"),
        Case("bf16", "none", "seeded", batch=1),
        Case("bf16", "none", "seeded", experts=16, top_k=4, moe_ffn=32),
    ]
    four = [
        Case("bf16", "none", "seeded"),
        Case("bf16", "selective-op", "seeded"),
    ]
    return {2: two, 4: four}


def rule_tensors(case: dict[str, Any], ep: int, received: int | None) -> Counter[tuple[str, int]]:
    """(dtype, bytes) of each tensor the rule keeps on a rank that received `received` rows
    (None: the balanced tokens x top_k). `case`: a Case as a dict."""
    dims = {
        **DIMS,
        "batch": case["batch"],
        "seq": case["seq"],
        "experts": case["experts"],
        "top_k": case["top_k"],
        "dtype": case["dtype"],
        "ep": ep,
        "received": received,
    }
    if case["mode"] == "full":
        # Full checkpointing keeps the block's input alone (memplan.model.stacks.torchtitan).
        width = 2 if case["dtype"] == "bf16" else 4
        return Counter({(case["dtype"], case["batch"] * case["seq"] * DIMS["hidden"] * width): 1})
    if case["mode"] == "selective-op":
        kept = rule.op_sac_moe_ep_layer(**dims)
    else:
        kept = rule.qwen3_moe_ep_layer(**dims, moe_inter=case["moe_ffn"], router=case["dtype"])
    return Counter((t.dtype, t.bytes) for t in kept)


def traced_tensors(kept: list[list[Any]]) -> Counter[tuple[str, int]]:
    return Counter((dtype, nbytes) for _, dtype, _, nbytes in kept)


def cases() -> list[dict[str, Any]]:
    from tests.compile_ep_probe import asdict, run

    rows = []
    for world, matrix in grid().items():
        for case in matrix:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                measured = run([case], Path(d), world=world)
            per_rank = [m[case.name] for m in measured]
            spec = asdict(case)
            if any("error" in r for r in per_rank):
                refusal = refused(spec, world)
                rows.append(
                    {
                        "world": world,
                        "ep": world,
                        "case": case.name,
                        **spec,
                        "error": [r.get("error") for r in per_rank],
                        "memplan": refusal,
                        "exact": all(r.get("error", "") in refusal for r in per_rank),
                        "seconds": round(time.time() - t0, 1),
                    }
                )
                print(f"EP {world} {case.name:42s} {rows[-1]['error']}", flush=True)
                continue
            exact = all(
                traced_tensors(r["kept"]) == rule_tensors(spec, world, r["received"])
                for r in per_rank
            )
            rows.append(
                {
                    "world": world,
                    "ep": world,
                    "case": case.name,
                    **spec,
                    "received": [r["received"] for r in per_rank],
                    "traced_bytes": [sum(k[3] for k in r["kept"]) for r in per_rank],
                    "rule_bytes": [
                        sum(n * c for (_, n), c in rule_tensors(spec, world, r["received"]).items())
                        for r in per_rank
                    ],
                    "balanced_rule_bytes": sum(
                        n * c for (_, n), c in rule_tensors(spec, world, None).items()
                    ),
                    "exact": exact,
                    "kept": [r["kept"] for r in per_rank],
                    "seconds": round(time.time() - t0, 1),
                }
            )
            row = rows[-1]
            print(
                f"EP {world} {case.name:42s} R {row['received']} traced {row['traced_bytes']} "
                f"rule {row['rule_bytes']} {'exact' if exact else 'DIFFERENT'} "
                f"({row['seconds']} s)",
                flush=True,
            )
    return rows


def refused(case: dict[str, Any], ep: int) -> str:
    """memplan's refusal of a case torch fails on (its note, which quotes the error)."""
    from memplan.model.sources import from_config
    from tests.conftest import make_spec, micro_batch_of
    from tests.test_torchtitan_moe import qwen3_moe

    cfg = {
        **qwen3_moe(1, experts=case["experts"], top_k=case["top_k"]),
        "moe_intermediate_size": case["moe_ffn"],
    }
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="fp32" if case["dtype"] == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": case["batch"],
            "sequence_length": case["seq"],
            "activation_checkpointing": case["mode"],
            "compile": True,
        },
        parallelism={"engine": "fsdp2", "data": ep, "expert": ep},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    return "" if saved.modelled else saved.notes[0]


def spec_of(mode: str, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"preset": "qwen3-30b-a3b", "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": 64, "expert": 8},
        "hardware": {"gpu": "H100-80GB", "alloc_conf": "expandable_segments:True"},
    }


def estimates() -> list[dict[str, Any]]:
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    rows = []
    for mode in MODES:
        for compile_ in (False, True):
            loaded = validate(spec_of(mode, compile_))
            report = estimate(loaded.spec, load_inventory(loaded))
            rows.append(
                {
                    "checkpointing": mode,
                    "compile": compile_,
                    "modelled": report.activations.modelled,
                    "activations_bytes": report.activations.bytes,
                    "peak_allocated_bytes": report.peak_bytes,
                    "notes": [n for n in report.activations.notes if "compile" in n],
                }
            )
            print(
                f"Qwen3-30B-A3B EP 8 {mode:12s} compile {compile_!s:5s} activations "
                f"{report.activations.bytes / 2**30:7.2f} GiB peak allocated "
                f"{report.peak_bytes / 2**30:7.2f} GiB",
                flush=True,
            )
    return rows


def main() -> None:
    import torch

    start = time.time()
    rows = cases()
    exact = sum(r["exact"] for r in rows)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_moe_ep.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": "0.3.0",
            "python": platform.python_version(),
        },
        "summary": f"{exact} of {len(rows)} cases exact on every rank",
        "cases": rows,
        "estimates": estimates(),
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
