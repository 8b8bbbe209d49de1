"""What a torch.compile'd torchtitan DeepSeek-V3 MoE block keeps for backward under expert
parallelism, traced on gloo ranks against memplan's rule (memplan.model.forward.compiled_mla.
moe_ep_layer, op_sac_ep_layer), and `memplan estimate` of a tiny DeepSeek-V3 at EP 2 with
training.compile true and false.

Part 1, `cases`: tests/compile_mla_ep_probe.py (the driver of tests/compile_ep_probe.py) on 2
gloo ranks (EP 2) and on 4 (EP 4): torchtitan 0.3.0's DeepSeek-V3 MoE block (tests/
torchtitan_probe.py::deepseek_v3_config at benchmarks/compile_mla.py's base widths: dim 64, 4
heads, kv_lora 32, nope 16, rope 8, v 16, 8 experts top 2 of hidden 48, one shared expert, 4
groups of which 2 limited, route_norm, route_scale 2.5) laid out by its own EP (ParallelDims,
set_deepseek_v3_sharding_config, Module.parallelize), checkpointed (none, FullAC,
SelectiveAC), compiled as apply_compile compiles it (fullgraph), forward + loss + backward run;
per rank, the rows R its experts received (an eager forward's routing, read apart from the
compiled graph) and every tensor the compiled forward passes to its backward (dtype, shape,
whole storage's bytes, read when the graph runs). The rule at the same shape with that rank's R
must give the same multiset of (dtype, bytes): "exact". `balanced_rule_bytes`: the rule at
R = tokens x top_k, what `memplan estimate` uses.

Grid (EP 2): bf16 parameters, no checkpointing, under the three routings (seeded: R differs per
rank; torchtitan's balanced round-robin: R = N; collapsed: every token on experts 0 ..
top_k - 1, so rank 0 receives EP x N rows and the others none); fp32; q_lora_rank 24; no
node-limited groups; top 6 of 16 experts (route_norm's sum kept); fp32 at batch 1 x 32 (v a view
of wkv_b's output); SelectiveAC under seeded and collapsed routing, in fp32, with q_lora 24;
FullAC (seeded, collapsed, fp32, q_lora 24, top 6 of 16), which torch 2.13 runs on this block
under EP, unlike Qwen3-MoE's (benchmarks/compile_moe_ep.py; a case torch fails on would
hold the error each rank raised and memplan's refusal: "exact" when the refusal quotes it).
EP 4: none, SelectiveAC and FullAC.

Part 2, `estimates`: `memplan estimate` of the tiny DeepSeek-V3 (benchmarks/compile_mla.py::
deepseek_v3: one dense layer, one MoE layer), torchtitan's code, CPU, FSDP2 over 2 ranks at EP 2,
micro batch 2 x 16, bf16-mixed: activations and peak allocated for training.compile false and
true under none / full / selective-op.

    PYTHONPATH=$PWD python benchmarks/compile_mla_ep.py   # 1,141 s on 2 busy cores
    PYTHONPATH=$PWD python benchmarks/compile_mla_ep.py --rescore   # the rule against the
        # stored traces again, no tracing
    # writes benchmarks/results/compile-mla-ep.json; tests/test_compile_mla_ep.py checks the
    # rule against every stored trace on every rank and re-traces one case (slow)
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
from memplan.model.forward import compiled_mla as rule  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-mla-ep.json"
MODES = ("none", "full", "selective-op")
WIDTH = {"bf16": 2, "fp32": 4}
SHAPE: dict[str, Any] = {
    "hidden": 64,
    "heads": 4,
    "kv_lora": 32,
    "nope": 16,
    "rope": 8,
    "v_dim": 16,
}
"""The traced block's attention widths: benchmarks/compile_mla.py's base shape (tests/
torchtitan_probe.py::Mla's defaults); tests/compile_mla_ep_probe.py builds it."""


def grid() -> dict[int, list[Any]]:
    from tests.compile_mla_ep_probe import MlaCase

    two = [
        MlaCase("bf16", "none", "seeded"),
        MlaCase("bf16", "none", "balanced"),
        MlaCase("bf16", "none", "collapsed"),
        MlaCase("fp32", "none", "seeded"),
        MlaCase("bf16", "none", "seeded", q_lora=24),
        MlaCase("bf16", "none", "seeded", groups=0, limited=0),
        MlaCase("bf16", "none", "seeded", experts=16, top_k=6),
        MlaCase("fp32", "none", "seeded", batch=1, seq=32),
        MlaCase("bf16", "selective-op", "seeded"),
        MlaCase("bf16", "selective-op", "collapsed"),
        MlaCase("fp32", "selective-op", "seeded"),
        MlaCase("bf16", "selective-op", "seeded", q_lora=24),
        MlaCase("bf16", "full", "seeded"),
        MlaCase("bf16", "full", "collapsed"),
        MlaCase("fp32", "full", "seeded"),
        MlaCase("bf16", "full", "seeded", q_lora=24),
        MlaCase("bf16", "full", "seeded", experts=16, top_k=6),
    ]
    four = [
        MlaCase("bf16", "none", "seeded"),
        MlaCase("bf16", "selective-op", "seeded"),
        MlaCase("bf16", "full", "seeded"),
    ]
    return {2: two, 4: four}


def mla_moe(case: dict[str, Any]) -> tuple[rule.Mla, rule.Moe]:
    """The rule's widths of a case (an MlaCase as a dict)."""
    mla = rule.Mla(
        hidden=SHAPE["hidden"],
        heads=SHAPE["heads"],
        q_lora=case["q_lora"],
        kv_lora=SHAPE["kv_lora"],
        nope=SHAPE["nope"],
        rope=SHAPE["rope"],
        v_dim=SHAPE["v_dim"],
    )
    moe = rule.Moe(
        experts=case["experts"],
        top_k=case["top_k"],
        inter=case["moe_ffn"],
        shared_inter=case["moe_ffn"] * case["shared"],
        route_norm=case["route_norm"],
    )
    return mla, moe


def rule_tensors(case: dict[str, Any], ep: int, received: int | None) -> Counter[tuple[str, int]]:
    """(dtype, bytes) of each tensor the rule keeps on a rank that received `received` rows
    (None: the balanced tokens x top_k). `case`: an MlaCase as a dict."""
    b, s, dtype = case["batch"], case["seq"], case["dtype"]
    if case["mode"] == "full":
        # Full checkpointing keeps the block's input alone (memplan.model.stacks.torchtitan).
        return Counter({(dtype, b * s * SHAPE["hidden"] * WIDTH[dtype]): 1})
    mla, moe = mla_moe(case)
    fn = rule.op_sac_ep_layer if case["mode"] == "selective-op" else rule.moe_ep_layer
    kept = fn(batch=b, seq=s, mla=mla, moe=moe, dtype=dtype, ep=ep, received=received)
    return Counter((t.dtype, t.bytes) for t in kept)


def traced_tensors(kept: list[list[Any]]) -> Counter[tuple[str, int]]:
    return Counter((dtype, nbytes) for _, dtype, _, nbytes in kept)


def score(row: dict[str, Any]) -> None:
    """`row`'s rule_bytes, balanced_rule_bytes and exact from its stored trace."""
    ep = row["ep"]
    row["rule_bytes"] = [
        sum(n * c for (_, n), c in rule_tensors(row, ep, r).items()) for r in row["received"]
    ]
    row["balanced_rule_bytes"] = sum(n * c for (_, n), c in rule_tensors(row, ep, None).items())
    row["exact"] = all(
        traced_tensors(k) == rule_tensors(row, ep, r)
        for k, r in zip(row["kept"], row["received"], strict=True)
    )


def cases() -> list[dict[str, Any]]:
    from tests.compile_mla_ep_probe import asdict, run

    rows = []
    for world, matrix in grid().items():
        for case in matrix:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                measured = run([case], Path(d), world=world)
            per_rank = [m[case.name] for m in measured]
            spec = asdict(case)
            row: dict[str, Any] = {"world": world, "ep": world, "case": case.name, **spec}
            if any("error" in r for r in per_rank):
                refusal = refused(spec, world)
                row |= {
                    "error": [r.get("error") for r in per_rank],
                    "memplan": refusal,
                    "exact": all(r.get("error", "") in refusal for r in per_rank),
                    "seconds": round(time.time() - t0, 1),
                }
                rows.append(row)
                print(f"EP {world} {case.name:60s} {row['error']}", flush=True)
                continue
            row |= {
                "received": [r["received"] for r in per_rank],
                "traced_bytes": [sum(k[3] for k in r["kept"]) for r in per_rank],
                "kept": [r["kept"] for r in per_rank],
            }
            score(row)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(
                f"EP {world} {case.name:60s} R {row['received']} traced {row['traced_bytes']} "
                f"rule {row['rule_bytes']} {'exact' if row['exact'] else 'DIFFERENT'} "
                f"({row['seconds']} s)",
                flush=True,
            )
    return rows


def spec_of(
    mode: str, compile_: bool, *, ep: int = 2, batch: int = 2, seq: int = 16, dtype: str = "bf16"
) -> dict[str, Any]:
    """The tiny DeepSeek-V3 (benchmarks/compile_mla.py::deepseek_v3) on CPU at EP `ep`."""
    from benchmarks.compile_mla import deepseek_v3

    return {
        "model": {"architecture": deepseek_v3(), "implementation": "torchtitan"},
        "precision": "bf16-mixed" if dtype == "bf16" else "fp32",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": batch,
            "sequence_length": seq,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": ep, "expert": ep},
        "hardware": {"device": "cpu"},
    }


def refused(case: dict[str, Any], ep: int) -> str:
    """memplan's refusal of a case torch fails on (its note, which quotes the error)."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    loaded = validate(spec_of(case["mode"], True, ep=ep, batch=case["batch"], seq=case["seq"]))
    report = estimate(loaded.spec, load_inventory(loaded))
    return "" if report.activations.modelled else report.activations.notes[0]


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
                f"tiny DeepSeek-V3 EP 2 {mode:12s} compile {compile_!s:5s} modelled "
                f"{report.activations.modelled!s:5s} activations "
                f"{report.activations.bytes:>9,} B peak allocated {report.peak_bytes:>11,} B",
                flush=True,
            )
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    return f"{sum(r['exact'] for r in rows)} of {len(rows)} cases exact on every rank"


def rescore() -> None:
    """The rule against the stored traces again, without tracing (`--rescore`)."""
    doc = json.loads(OUT.read_text())
    for row in doc["cases"]:
        if "error" in row:
            row["memplan"] = refused(row, row["ep"])
            row["exact"] = all(e in row["memplan"] for e in row["error"])
        else:
            score(row)
    doc["summary"] = summary(doc["cases"])
    doc["estimates"] = estimates()
    doc["rescored"] = stamp()["date"]
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["summary"])


def main() -> None:
    if "--rescore" in sys.argv:
        rescore()
        return
    import torch

    start = time.time()
    rows = cases()
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_mla_ep.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": "0.3.0",
            "python": platform.python_version(),
        },
        "summary": summary(rows),
        "cases": rows,
        "estimates": estimates(),
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
