"""torch.distributed.pipelining in memplan: torch's schedules against memplan, and what the
PP terms do to torchtitan's published Llama 3.1 405B PP 8 rows.

1. Schedules: for every (schedule, P, virtual stages, micro-batches) below, every rank's
   in-flight micro-batches per local stage from torch's own schedule objects (torch 2.13
   torch/distributed/pipelining/schedules.py: Schedule1F1B, ScheduleGPipe,
   ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, built over stub stages; the oracle of
   tests/test_torch_schedules.py) against memplan.activations.pipeline.in_flight(runtime="torch"),
   and how often Megatron's count (the rule memplan used before for every engine) differs.
2. torchtitan's table 5 (../shared/reference/published/torchtitan-llama3-h100.md): 405B,
   FSDP 8 x TP 8 (SP) x PP 8, local batch 32 = 8 micro-batches x 4, seq 8192, full AC,
   1F1B (82.5 GiB) and interleaved 1F1B (72.7 GiB), max reserved over GPUs; memplan with
   engine fsdp2 and implementation torchtitan (activations not modelled until their rule
   lands) and transformers (transformers' Llama's activations as a stand-in): every stage's
   peak, and the new terms' bytes on the most-loaded stage. The spec keeps the last stage's
   outputs (`pipeline_return_outputs: true`): 9dec370's train.py calls `pp_schedule.step()`
   without `return_outputs`, which torch only gained in Oct 2025 (pytorch#165822).
3. The same rows' ranks walked along torch's own action lists (`walk`): the terms that change
   during a step (in-flight layer micro-batches, the fp32 accumulated gradients of each local
   stage from its first backward on, the last stage's held outputs) and the stages' receive
   buffers and in-flight outputs (memplan's pipeline_recv_buffers, pipeline_stage_outputs),
   at every forward and
   every backward (a backward counted with its micro-batch still in flight and its stage's
   gradients made: an upper bound of that moment), to show where each rank peaks and which
   rank is the maximum under each schedule (benchmarks/published.py's notes on table 5).

Run (about 90 s on 2 cores; needs torch for parts 1 and 3):

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

from benchmarks.published import split  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan.activations import pipeline  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.precision import dtype_bytes  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402

GIB = 2**30
PUBLISHED = {"1f1b": 82.5, "interleaved": 72.7}
TERMS = (
    "fsdp2_pipeline_accumulated_grads",
    "fsdp2_pipeline_accumulated_grads_drain",
    "tp_loss_parallel_log_softmax",
    "tp_loss_parallel_gradient",
    "pipeline_output_chunks",
    "pipeline_output_chunks_current",
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
                    got = pipeline.in_flight(schedule, p, v, rank, m, runtime="torch")
                    if got != expected:
                        mismatches.append([schedule, p, v, m, rank, got, expected])
                    if schedule != "zbv" and pipeline.in_flight(schedule, p, v, rank, m) != got:
                        megatron_differs += 1
    return {"cases": cases, "mismatches": mismatches, "megatron_differs": megatron_differs}


def spec(implementation: str, schedule: str) -> dict[str, Any]:
    par: dict[str, Any] = {
        "engine": "fsdp2",
        "data": 8,
        "tensor": 8,
        "sequence_parallel": True,
        "pipeline": 8,
        # torchtitan 9dec370's train.py: step() without return_outputs (torch kept them).
        "pipeline_return_outputs": True,
    }
    # 126 layers split as torchtitan 9dec370 splits them (benchmarks/published.py::split).
    if schedule == "interleaved":
        par.update(schedule="interleaved", virtual_stages=2, layers_per_stage=split(126, 16))
    else:
        par.update(layers_per_stage=split(126, 8))
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


def walk() -> dict[str, Any]:
    """Table 5's ranks along torch's action lists (part 3 of the module doc): per schedule,
    each rank's largest sum of the terms that change during the step, with the moment and
    its parts, in GiB; sizes from memplan's terms for the torchtitan rows of `spec`."""
    from memplan.states.parallel import stage_inventories
    from tests.test_torch_schedules import _torch_order

    out: dict[str, Any] = {}
    for schedule in ("1f1b", "interleaved"):
        loaded = validate(spec("torchtitan", schedule))
        inventory = load_inventory(loaded)
        report = estimate(loaded.spec, inventory)
        lay = report.layout
        layer_mb = report.activations.block("layers").bytes_each  # type: ignore[union-attr]
        hidden = report.activations.hidden_bytes  # a stage boundary: [4, 8192 / TP, 16384]
        per_rank = stage_inventories(inventory, lay)
        layers = list(lay.layers_per_stage or [])
        starts = [sum(layers[:s]) for s in range(len(layers))]
        grads = [0] * len(layers)  # fp32 accumulated gradients per (virtual) stage
        for inv in per_rank:
            for t in inv.parameters:
                if t.layer is not None:
                    grads[max(s for s in range(len(layers)) if starts[s] <= t.layer)] += t.numel * 4
                else:
                    grads[0 if t.role == "embedding" else -1] += t.numel * 4
        # The last stage's output: [micro-batch, seq, its LM head rows] in the compute dtype.
        head = next(t for t in per_rank[-1].parameters if t.role == "head")
        t = loaded.spec.training
        logits = t.micro_batch_size * t.sequence_length * head.shape[0]
        logits *= dtype_bytes(report.recipe.compute)
        p, v = lay.pipeline, lay.virtual_stages
        m = loaded.spec.training.gradient_accumulation_steps
        order = _torch_order(schedule, p, v, m)
        last = p * v - 1
        ranks = []
        for rank in range(p):
            stages = [rank + c * p for c in range(v)]
            alive = dict.fromkeys(stages, 0)
            backed: set[int] = set()
            held = 0
            best: dict[str, Any] = {"gib": 0.0}
            for action in order[rank]:
                if action is None:
                    continue
                kind, s = str(action.computation_type.value), action.stage_index
                if kind == "F":
                    alive[s] += 1
                elif kind == "B":
                    backed.add(s)
                # Receive buffers (inputs beyond the in-flight ones, which are their first
                # layer's saved input; gradients) and non-last stages' outputs in fwd_cache.
                boundary = sum(
                    (m - alive[x] if x > 0 else 0) + (m + alive[x] if x < last else 0)
                    for x in stages
                )
                parts = {
                    "activations": sum(alive[x] * layers[x] for x in stages) * layer_mb,
                    "accumulated_grads": sum(grads[x] for x in backed),
                    "held_outputs": held * logits,
                    "stage_buffers": boundary * hidden,
                }
                total = sum(parts.values()) / GIB
                if total > best["gib"]:
                    best = {
                        "gib": round(total, 2),
                        "at": f"{kind}{action.microbatch_index} of stage {s}",
                        "in_flight": [alive[x] for x in stages],
                        **{k: round(b / GIB, 2) for k, b in parts.items()},
                    }
                if kind == "F" and s == last:
                    held += 1
                elif kind == "B":
                    alive[s] -= 1
            ranks.append(best)
        out[schedule] = {
            "ranks": ranks,
            "max_rank": max(range(p), key=lambda r: ranks[r]["gib"]),
            "sizes_gib": {
                "layer_micro_batch": round(layer_mb / GIB, 4),
                "stage_boundary": round(hidden / GIB, 4),
                "logits": round(logits / GIB, 4),
                "stage_accumulated_grads": [round(g / GIB, 2) for g in grads],
            },
        }
    return out


def main() -> None:
    start = time.perf_counter()
    result = {
        "stamp": stamp(),
        "schedules": schedules(),
        "torchtitan_405b_pp8": rows(),
        "walk_405b_pp8": walk(),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = ROOT / "benchmarks" / "results" / "torch-pipelining.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
