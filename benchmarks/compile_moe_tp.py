"""What a torch.compile'd torchtitan Qwen3-MoE block keeps for backward under tensor parallelism
(expert parallelism 1), traced on gloo ranks against memplan's rule (memplan.model.forward.
compiled_moe_tp.layer, op_sac_layer), and `memplan estimate` of Qwen3-30B-A3B at TP 2 with
training.compile true and false.

Part 1, `cases`: tests/compile_tp_probe.py on 2 gloo ranks (TP 2) and on 4 (TP 4): torchtitan
0.3.0's Qwen3-MoE block (tests/torchtitan_probe.py's QWEN3_MOE_TINY: dim 64, 4 heads of 32, 2
k/v heads, 8 experts of width 48, top 2, one block; 8 heads / 4 k/v heads at TP 4; one case with
48 experts and top 8, Qwen3-30B-A3B's top_k, past the softmax-statistics and route_norm
thresholds of compiled.qwen3_moe_layer) laid out by set_qwen3_sharding_config(enable_ep=False),
Module.parallelize (DTensor backend), sequence parallelism on and off, checkpointed (none,
SelectiveAC), compiled as apply_compile compiles it (fullgraph), forward + loss + backward run,
with the router as initialised ("seeded"), every token on the same experts ("collapsed") and
torchtitan's debug round-robin routing ("balanced", which fails: recorded). Per rank, every
tensor the compiled forward passes to its backward (dtype, shape, storage bytes). The rule at
the same shape must give the same multiset of (dtype, bytes) on every rank: "exact"; a traced
case memplan refuses (checkpointing none at TP 4: compiled_moe_tp.NONE_ABOVE_TP2) holds the
refusal in "memplan".

Part 2, `estimates`: `memplan estimate` of Qwen3-30B-A3B (its Hugging Face config), torchtitan's
code, FSDP2 4 x TP 2 with sequence parallelism, local batch 1 x 4096, bf16-mixed AdamW,
H100-80GB: activations and peak allocated, training.compile false and true, none /
selective-op.

    PYTHONPATH=$PWD python benchmarks/compile_moe_tp.py   # ~8 min on 2 busy cores
    # writes benchmarks/results/compile-moe-tp.json; tests/test_compile_moe_tp.py checks the
    # rule against every stored trace and re-traces one case
"""

from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compile_tp import traced_spec, traced_tensors  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.forward import compiled_moe_tp as rule  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-moe-tp.json"
DIMS = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32, "experts": 8, "top_k": 2}
"""tests/torchtitan_probe.py's QWEN3_MOE_TINY."""
MOE_INTER = 48
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
"""Qwen/Qwen3-30B-A3B's config.json (the fields memplan reads)."""


def grid() -> dict[int, list[Any]]:
    from tests.compile_tp_probe import Case

    def moe(dtype: str, mode: str, sp: bool, **kw: Any) -> Any:
        return Case(dtype, mode, sp, model="qwen3_moe", **{"routing": "seeded", **kw})

    two = [
        moe("bf16", "none", True),
        moe("bf16", "none", False),
        moe("bf16", "selective-op", True),
        moe("bf16", "selective-op", False),
        moe("bf16", "none", True, routing="collapsed"),
        moe("bf16", "none", True, experts=48, top_k=8),
        moe("fp32", "none", True),
        moe("fp32", "selective-op", False),
        moe("fp32", "none", False, experts=16, top_k=2),  # past fp32's softmax-stats threshold
        moe("bf16", "none", True, routing="balanced"),  # torchtitan's debug routing: fails
    ]
    four = [  # expert width 96: 48 / 4 = 12 bf16 columns fail _grouped_mm's 16-byte stride
        moe("bf16", "none", True, heads=8, kv_heads=4, moe_ffn=96),
        moe("bf16", "none", False, heads=8, kv_heads=4, moe_ffn=96),
        moe("bf16", "selective-op", True, heads=8, kv_heads=4, moe_ffn=96),
        moe("bf16", "none", True, heads=8, kv_heads=4),  # 48 / 4: torch fails (recorded)
    ]
    return {2: two, 4: four}


def _dims(case: dict[str, Any], tp: int) -> dict[str, Any]:
    dims = dict(DIMS)
    if case["heads"]:  # Qwen3's head_dim is explicit: the probe keeps 32
        dims["heads"], dims["kv_heads"] = case["heads"], case["kv_heads"]
    if case["experts"]:
        dims["experts"], dims["top_k"] = case["experts"], case["top_k"]
    return {
        **dims,
        "batch": case["batch"],
        "seq": case["seq"],
        "dtype": case["dtype"],
        "tp": tp,
        "sequence_parallel": case["sequence_parallel"],
    }


def rule_tensors(case: dict[str, Any], tp: int) -> Counter[tuple[str, int]]:
    """(dtype, bytes) of each tensor the rule keeps on one TP rank. `case`: a Case as a dict.
    The router's dtype is the model's (CPU: autocast off, torchtitan_moe.router_dtype)."""
    dims = _dims(case, tp)
    if case["mode"] == "selective-op":
        dims.pop("experts")
        kept = rule.op_sac_layer(**dims)
    else:
        kept = rule.layer(**dims, moe_inter=case["moe_ffn"] or MOE_INTER, router=case["dtype"])
    return Counter((t.dtype, t.bytes) for t in kept)


def tiny(case: dict[str, Any], tp: int) -> tuple[Any, dict[str, Any]]:
    """The memplan spec and architecture of a traced case: the probe's one-block Qwen3-MoE
    (torchtitan's code) at the case's batch, sequence, dtype, checkpointing and TP, compiled."""

    dims = _dims(case, tp)
    cfg: dict[str, Any] = {
        "model_type": "qwen3_moe",
        "hidden_size": dims["hidden"],
        "intermediate_size": 192,
        "moe_intermediate_size": case["moe_ffn"] or MOE_INTER,
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "num_experts": dims["experts"],
        "num_experts_per_tok": dims["top_k"],
        "norm_topk_prob": True,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    return traced_spec(cfg, case, tp), cfg


def refused(case: dict[str, Any], tp: int) -> str:
    """What memplan says of a case torch or torchtitan fails on: its refusal, or for torchtitan's
    debug routing (which memplan's spec does not express) compiled_moe_tp.BALANCED_ERROR's
    docstring's claim, checked against the error."""
    from memplan.model.sources import from_config
    from tests.conftest import micro_batch_of

    if case["routing"] == "balanced":
        return rule.BALANCED_ERROR
    spec, cfg = tiny(case, tp)
    micro = micro_batch_of(spec, from_config(cfg))
    return "" if micro.modelled else micro.notes[0]


def quoted(error: str) -> str:
    """The part of a rank's error memplan must quote: the inner RuntimeError's message."""
    inner = re.search(r"got RuntimeError\('(.*?)'\)", error)
    return inner.group(1) if inner else error.splitlines()[0]


def cases() -> list[dict[str, Any]]:
    from tests.compile_tp_probe import asdict, run

    rows = []
    for world, matrix in grid().items():
        for case in matrix:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                measured = run([case], Path(d), world=world)
            per_rank = [m[case.name] for m in measured]
            spec = asdict(case)
            if any("error" in r for r in per_rank):
                errors = [r.get("error", "") for r in per_rank]
                says = refused(spec, world)
                rows.append(
                    {
                        "tp": world,
                        "case": case.name,
                        **spec,
                        "error": errors,
                        "memplan": says,
                        "exact": all(quoted(e) in says for e in errors),
                        "seconds": round(time.time() - t0, 1),
                    }
                )
                print(f"TP {world} {case.name:48s} {errors[0][:120]}", flush=True)
                continue
            want = rule_tensors(spec, world)
            exact = all(traced_tensors(r["kept"]) == want for r in per_rank)
            says = refused(spec, world)
            rows.append(
                {
                    "tp": world,
                    "case": case.name,
                    **spec,
                    "memplan": says or "modelled",
                    "traced_bytes": [sum(k[3] for k in r["kept"]) for r in per_rank],
                    "rule_bytes": sum(n * c for (_, n), c in want.items()),
                    "exact": exact,
                    "kept": [r["kept"] for r in per_rank],
                    "seconds": round(time.time() - t0, 1),
                }
            )
            row = rows[-1]
            print(
                f"TP {world} {case.name:48s} traced {row['traced_bytes']} rule "
                f"{row['rule_bytes']} {'exact' if exact else 'DIFFERENT'} ({row['seconds']} s)",
                flush=True,
            )
    return rows


MODES = ("none", "selective-op")


def spec_of(mode: str, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"architecture": QWEN3_30B_A3B, "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 1,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": 4, "tensor": 2, "sequence_parallel": True},
        "hardware": {"gpu": "H100-80GB"},
    }


def estimates() -> list[dict[str, Any]]:
    from benchmarks.compile_tp import estimates as of_spec

    return of_spec(spec_of, MODES, "Qwen3-30B-A3B TP 2")


def main() -> None:
    import torch

    start = time.time()
    est = estimates()
    rows = cases()
    traced = [r for r in rows if "error" not in r and r["memplan"] == "modelled"]
    exact = sum(r["exact"] for r in traced)
    unruled = sum(1 for r in rows if "error" not in r and r["memplan"] != "modelled")
    quoted_ = sum(r["exact"] for r in rows if "error" in r)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_moe_tp.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": "0.3.0",
            "python": platform.python_version(),
        },
        "summary": f"{exact} of {len(traced)} modelled traced cases exact on every rank; "
        f"{unruled} traced but refused (NONE_ABOVE_TP2); "
        f"{len(rows) - len(traced) - unruled} failed in torch / torchtitan, "
        f"{quoted_} quoted by memplan",
        "cases": rows,
        "estimates": est,
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
