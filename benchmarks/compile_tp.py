"""What a torch.compile'd torchtitan dense block keeps for backward under tensor parallelism,
traced on gloo ranks against memplan's rule (memplan.model.forward.compiled_tp.layer,
op_sac_layer), and `memplan estimate` of Llama 3.1 70B at TP 8 with training.compile true and
false.

Part 1, `cases`: tests/compile_tp_probe.py on 2 gloo ranks (TP 2) and on 4 (TP 4): torchtitan
0.3.0's Llama 3 block (tests/torchtitan_probe.py's tiny Llama: dim 64, 4 heads, 2 k/v heads,
FFN 192, one block; 8 heads, 4 k/v heads at TP 4) and its dense Qwen3 block (QWEN3_TINY, per-
head q/k norms) laid out by torchtitan's own sharding configs (set_llama3_sharding_config /
set_qwen3_sharding_config, Module.parallelize, DTensor backend), sequence parallelism on and
off, checkpointed (none, SelectiveAC, FullAC), compiled as apply_compile compiles it
(fullgraph), forward + loss + backward run; per rank, every tensor the compiled forward passes
to its backward (dtype, shape, bytes). The rule at the same shape must give the same multiset of
(dtype, bytes) on every rank: "exact". A case torch or torchtitan itself fails on holds each
rank's error and memplan's refusal, which quotes it ("exact" when it does).

Part 2, `estimates`: `memplan estimate` of Llama 3.1 70B (memplan's preset), torchtitan's code,
FSDP2 8 x TP 8 with sequence parallelism (torchtitan's published 70B layout), local batch 1 x
8192, bf16-mixed AdamW, H100-80GB: activations and peak allocated for training.compile false
and true under none / selective-op / full (full: modelled as eager, with the failure part 1
records as a note).

    PYTHONPATH=$PWD python benchmarks/compile_tp.py   # ~20 min on 2 busy cores
    # writes benchmarks/results/compile-tp.json; tests/test_compile_tp.py checks the rule
    # against every stored trace and re-traces one case
"""

from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.forward import compiled_tp as rule  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-tp.json"
DIMS = {
    "llama": {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "inter": 192},
    "qwen3": {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32, "inter": 192},
}
"""tests/torchtitan_probe.py's Shape() and QWEN3_TINY widths."""


def grid() -> dict[int, list[Any]]:
    from tests.compile_tp_probe import Case

    two = [
        Case("bf16", "none", True),
        Case("bf16", "none", False),
        Case("bf16", "selective-op", True),
        Case("bf16", "selective-op", False),
        Case("bf16", "full", True),
        Case("bf16", "full", False),
        Case("fp32", "none", True),
        Case("fp32", "selective-op", False),
        Case("bf16", "none", True, batch=1, seq=32),
        Case("bf16", "none", False, seq=64),
        Case("bf16", "none", True, model="qwen3"),
        Case("bf16", "selective-op", True, model="qwen3"),
        Case("bf16", "none", False, model="qwen3"),
    ]
    four = [
        Case("bf16", "none", True, heads=8, kv_heads=4),
        Case("bf16", "none", False, heads=8, kv_heads=4),
        Case("bf16", "selective-op", True, heads=8, kv_heads=4),
        Case("bf16", "none", True),  # 2 k/v heads at TP 4: torchtitan fails (KV_HEADS)
    ]
    return {2: two, 4: four}


def _dims(case: dict[str, Any], tp: int) -> dict[str, Any]:
    dims = dict(DIMS[case["model"]])
    if case["heads"]:
        dims["heads"], dims["kv_heads"] = case["heads"], case["kv_heads"]
        dims["head_dim"] = dims["hidden"] // case["heads"]
    return {
        **dims,
        "batch": case["batch"],
        "seq": case["seq"],
        "dtype": case["dtype"],
        "tp": tp,
        "sequence_parallel": case["sequence_parallel"],
    }


def rule_tensors(case: dict[str, Any], tp: int) -> Counter[tuple[str, int]]:
    """(dtype, bytes) of each tensor the rule keeps on one TP rank. `case`: a Case as a dict."""
    dims = _dims(case, tp)
    if case["mode"] == "selective-op":
        kept = rule.op_sac_layer(**dims)
    else:
        kept = rule.layer(qk_norm=case["model"] == "qwen3", **dims)
    return Counter((t.dtype, t.bytes) for t in kept)


def traced_tensors(kept: list[list[Any]]) -> Counter[tuple[str, int]]:
    return Counter((dtype, nbytes) for _, dtype, _, nbytes in kept)


def tiny(case: dict[str, Any], tp: int) -> tuple[Any, dict[str, Any]]:
    """The memplan spec and architecture of a traced case: the probe's one-block model
    (torchtitan's code) at the case's batch, sequence, dtype, checkpointing and TP, compiled."""

    dims = _dims(case, tp)
    cfg: dict[str, Any] = {
        "model_type": case["model"],
        "hidden_size": dims["hidden"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "intermediate_size": dims["inter"],
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    return traced_spec(cfg, case, tp), cfg


def traced_spec(cfg: dict[str, Any], case: dict[str, Any], tp: int) -> Any:
    """The memplan spec of a traced case's one-block model `cfg`: torchtitan's code, compiled,
    at the case's batch, sequence, dtype, checkpointing, TP and sequence parallelism."""
    from tests.conftest import make_spec

    return make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        precision="fp32" if case["dtype"] == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": case["batch"],
            "sequence_length": case["seq"],
            "activation_checkpointing": case["mode"],
            "compile": True,
        },
        parallelism={
            "engine": "fsdp2",
            "tensor": tp,
            "sequence_parallel": case["sequence_parallel"],
        },
        hardware={"device": "cpu"},
    )


def refused(case: dict[str, Any], tp: int) -> str:
    """What memplan says of a case torch or torchtitan fails on: its refusal (which quotes the
    error), or, where it models the case anyway (FullAC: compiled_tp.FULL_AC_FAILS), its
    notes, which quote it too."""
    from memplan.model.sources import from_config
    from tests.conftest import micro_batch_of

    spec, cfg = tiny(case, tp)
    saved = micro_batch_of(spec, from_config(cfg))
    return " ".join(saved.notes) if saved.modelled else saved.notes[0]


def quoted(error: str) -> str:
    """The part of a rank's error memplan's refusal must quote: the inner RuntimeError's first
    sentence of a Dynamo error, else the error's first line before any list of types."""
    inner = re.search(r'got RuntimeError\("([^.]*)\.', error)
    if inner:
        return inner.group(1)
    return error.split(", got types")[0].splitlines()[0]


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
                refusal = refused(spec, world)
                errors = [r.get("error", "") for r in per_rank]
                rows.append(
                    {
                        "tp": world,
                        "case": case.name,
                        **spec,
                        "error": errors,
                        "memplan": refusal,
                        "exact": bool(refusal) and all(quoted(e) in refusal for e in errors),
                        "seconds": round(time.time() - t0, 1),
                    }
                )
                print(f"TP {world} {case.name:42s} {errors[0][:120]}", flush=True)
                continue
            want = rule_tensors(spec, world)
            exact = all(traced_tensors(r["kept"]) == want for r in per_rank)
            rows.append(
                {
                    "tp": world,
                    "case": case.name,
                    **spec,
                    "traced_bytes": [sum(k[3] for k in r["kept"]) for r in per_rank],
                    "rule_bytes": sum(n * c for (_, n), c in want.items()),
                    "exact": exact,
                    "kept": [r["kept"] for r in per_rank],
                    "seconds": round(time.time() - t0, 1),
                }
            )
            row = rows[-1]
            print(
                f"TP {world} {case.name:42s} traced {row['traced_bytes']} rule "
                f"{row['rule_bytes']} {'exact' if exact else 'DIFFERENT'} ({row['seconds']} s)",
                flush=True,
            )
    return rows


MODES = ("none", "selective-op", "full")


def spec_of(mode: str, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"preset": "llama-3.1-70b", "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 1,
            "sequence_length": 8192,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": 8, "tensor": 8, "sequence_parallel": True},
        "hardware": {"gpu": "H100-80GB"},
    }


def estimates(
    spec: Callable[[str, bool], dict[str, Any]] | None = None,
    modes: tuple[str, ...] = MODES,
    label: str = "Llama 3.1 70B TP 8",
) -> list[dict[str, Any]]:
    """memplan's estimate of `spec(mode, compile)` (default: this file's `spec_of`) for each
    checkpointing mode, eager and compiled (benchmarks/compile_moe_tp.py reads it too)."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    rows = []
    for mode in modes:
        for compile_ in (False, True):
            loaded = validate((spec or spec_of)(mode, compile_))
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
                f"{label} {mode:12s} compile {compile_!s:5s} activations "
                f"{report.activations.bytes / 2**30:7.2f} GiB peak allocated "
                f"{report.peak_bytes / 2**30:7.2f} GiB",
                flush=True,
            )
    return rows


def main() -> None:
    import torch

    start = time.time()
    est = estimates()
    rows = cases()
    exact = sum(r["exact"] for r in rows)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_tp.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": "0.3.0",
            "python": platform.python_version(),
        },
        "summary": f"{exact} of {len(rows)} cases exact on every rank",
        "cases": rows,
        "estimates": est,
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
