"""torch.distributed.pipelining in memplan: torch's schedules against memplan, and what the
PP terms do to torchtitan's published Llama 3.1 405B PP 8 rows.

1. Schedules: for every (schedule, P, virtual stages, micro-batches) below, every rank's
   in-flight micro-batches per local stage from torch's own schedule objects (torch 2.13
   torch/distributed/pipelining/schedules.py: Schedule1F1B, ScheduleGPipe,
   ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, built over stub stages; the oracle of
   tests/test_torch_schedules.py) against memplan.activations.layout.in_flight(runtime="torch"),
   and how often Megatron's count (the rule memplan used before for every engine) differs.
2. torchtitan's table 5 (../shared/reference/published/torchtitan-llama3-h100.md): 405B,
   FSDP 8 x TP 8 (SP) x PP 8, local batch 32 = 8 micro-batches x 4, seq 8192, full AC,
   1F1B (82.5 GiB) and interleaved 1F1B (72.7 GiB), max reserved over GPUs; memplan with
   engine fsdp2 and implementation torchtitan (activations not modelled until their rule
   lands) and transformers (transformers' Llama's activations as a stand-in): every stage's
   peak, and the new terms' bytes on the most-loaded stage.

Run (about 90 s on 2 cores; needs torch for part 1):

    python benchmarks/torch_pipelining.py     # writes benchmarks/results/torch-pipelining.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memplan.activations import layout  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402

GIB = 2**30
PUBLISHED = {"1f1b": 82.5, "interleaved": 72.7}
TERMS = (
    "fsdp2_pipeline_accumulated_grads",
    "fsdp2_pipeline_accumulated_grads_drain",
    "tp_loss_parallel_log_softmax",
    "tp_loss_parallel_gradient",
)


def schedules() -> dict[str, Any]:
    from tests.test_torch_schedules import _torch_peak

    cases = 0
    mismatches: list[Any] = []
    megatron_differs = 0
    for p in (2, 3, 4, 6, 8, 16):
        for m in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            for schedule, v in (
                ("1f1b", 1),
                ("gpipe", 1),
                ("interleaved", 2),
                ("interleaved", 3),
                ("interleaved", 4),
                ("zbv", 2),
            ):
                if schedule == "interleaved" and m % max(1, m // p):
                    continue  # torch refuses (ScheduleInterleaved1F1B.__init__)
                if schedule == "1f1b" and m < p:
                    continue  # torch refuses (Schedule1F1B.__init__)
                for rank in range(p):
                    cases += 1
                    expected = _torch_peak(schedule, p, v, rank, m)
                    got = layout.in_flight(schedule, p, v, rank, m, runtime="torch")
                    if got != expected:
                        mismatches.append([schedule, p, v, m, rank, got, expected])
                    if schedule != "zbv" and layout.in_flight(schedule, p, v, rank, m) != got:
                        megatron_differs += 1
    return {"cases": cases, "mismatches": mismatches, "megatron_differs": megatron_differs}


def spec(implementation: str, schedule: str) -> dict[str, Any]:
    par: dict[str, Any] = {
        "engine": "fsdp2",
        "data": 8,
        "tensor": 8,
        "sequence_parallel": True,
        "pipeline": 8,
    }
    if schedule == "interleaved":
        # 126 layers over 16 stages (torchtitan splits unevenly too)
        par.update(schedule="interleaved", virtual_stages=2, layers_per_stage=[8] * 14 + [7] * 2)
    else:
        par.update(layers_per_stage=[16] * 6 + [15] * 2)
    return {
        "model": {"preset": "llama-3.1-405b", "implementation": implementation},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 8,
            "sequence_length": 8192,
            "activation_checkpointing": "full",
        },
        "parallelism": par,
        "hardware": {"gpu": "H100-80GB"},
    }


def rows() -> list[dict[str, Any]]:
    out = []
    for implementation in ("torchtitan", "transformers"):
        for schedule in ("1f1b", "interleaved"):
            loaded = validate(spec(implementation, schedule))
            report = estimate(loaded.spec, load_inventory(loaded))
            tl = report.timeline
            terms = {t.name: round(t.bytes / GIB, 3) for t in tl.transients if t.name in TERMS}
            out.append(
                {
                    "implementation": implementation,
                    "schedule": schedule,
                    "published_gib": PUBLISHED[schedule],
                    "peak_gib": round(tl.peak_bytes / GIB, 2),
                    "reserved_gib": round((tl.reserved_bytes or 0) / GIB, 2),
                    "peak_phase": tl.peak.phase,
                    "most_loaded_stage": report.stage,
                    "stage_peaks_gib": [
                        None if s is None else round(s[1] / GIB, 2) for s in report.stage_peaks
                    ],
                    "activations_modelled": report.activations.modelled,
                    "terms_gib": terms,
                }
            )
    return out


def main() -> None:
    start = time.perf_counter()
    result = {"schedules": schedules(), "torchtitan_405b_pp8": rows()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = ROOT / "benchmarks" / "results" / "torch-pipelining.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
