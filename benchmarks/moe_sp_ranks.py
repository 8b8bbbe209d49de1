"""Traced MoE profiles under torch DTensor TP + sequence parallelism, against real ranks.

    PYTHONPATH=. python benchmarks/moe_sp_ranks.py   # about 30-60 s on 2 cores; writes
                                                     # benchmarks/results/moe-sp-ranks.json

Runs tests/tp_sp_moe_probe.py (2 gloo ranks, torchtitan's MoE / MLA layout on transformers'
modules: the MoE block's input all-gathered once, router, shared and routed experts on the
whole sequence) on the tiny Qwen2-MoE (shared expert and its gate), Mixtral (no shared expert)
and DeepSeek-V3 (MLA with a q LoRA, a dense first layer, shared experts) of
tests/test_profile_tp.py, in bf16 (the precision MoE profiles are traced in) with sdpa and
eager attention, and records per decoder layer and rank the bytes the rank holds for backward beside
memplan's profile path (the family hidden: memplan.activations.traced with layout.
gathered_blocks) and the hand rule where the family has one. tests/test_profile_tp.py runs the
bf16 / sdpa column.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402


def main() -> None:
    from tests.test_profile_tp import MOE_RANKS, dtensor_sp_layers, held_per_layer
    from tests.tp_probe import Case
    from tests.tp_sp_moe_probe import run_ranks

    # bf16 only: fp32 experts (fp32, and amp-bf16's fp32 stream) cannot be traced
    # (memplan.verify.trace.moe.check: the meta kernel of _grouped_mm accepts bf16 only)
    cases = [Case("bf16", a) for a in ("sdpa", "eager")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(MOE_RANKS, cases, Path(tmp))
    rows: list[dict[str, Any]] = []
    for name, config in MOE_RANKS.items():
        for case in cases:
            traced, rule = dtensor_sp_layers(config, case.precision, case.attention)
            runs = [r[f"{name}/{case.name}"] for r in ranks]
            measured = [held_per_layer(run) for run in runs]
            row = {
                "model": name,
                "precision": case.precision,
                "attention": case.attention,
                "measured_per_rank": measured,
                "traced": traced,
                "hand_rule": rule,
                "max_logit_diff": max(run["max_logit_diff"] for run in runs),
                "traced_exact": all(m == traced for m in measured),
                "hand_rule_exact": None if rule is None else all(m == rule for m in measured),
            }
            rows.append(row)
            print(
                f"{name:12} {case.name:15} measured {measured[0]} traced {traced} "
                f"rule {rule} exact {row['traced_exact']}"
            )
    exact = sum(r["traced_exact"] for r in rows)
    print(f"{exact} of {len(rows)} cases exact on every layer of every rank")
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=. python benchmarks/moe_sp_ranks.py",
        "tensor": 2,
        "batch": 2,
        "sequence": 32,
        "seconds": round(time.perf_counter() - start, 1),
        "exact": exact,
        "cases": rows,
    }
    out = ROOT / "benchmarks" / "results" / "moe-sp-ranks.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
