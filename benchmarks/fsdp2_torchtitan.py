"""FSDP2 as torchtitan runs it (issue 19): reduce_dtype, torchtitan's wrapping and experts over
the expert-data mesh, proved on real FSDP2 runs and shown on the published / flagship rows.

    PYTHONPATH=$PWD python benchmarks/fsdp2_torchtitan.py            # everything (~3 min)
    PYTHONPATH=$PWD python benchmarks/fsdp2_torchtitan.py --no-runs  # the estimates only

1. `verify`: memplan verify's FSDP2 path on gloo CPU ranks (torch's own fully_shard, measured
   by FSDPMemTracker on every rank) for tiny Llama (tests/conftest.py::TINY_LLAMA) bf16-mixed,
   over {reduce_dtype: default (bf16) | fp32} x {fsdp_wrap: layers | torchtitan} x {ZeRO-3
   4 ranks b1 s16, ZeRO-3 2 ranks b2 s32, ZeRO-2 4 ranks b2 s16, HSDP 2 x 2 ZeRO-3 b1 s16}:
   memplan's predicted peak
   against each rank's measured one (gloo's race, tests/test_fsdp2_peak.py, may add one
   FSDP2 buffer to a rank now and then: the best rank is reported beside the worst).
2. `llama3_8b`: `memplan estimate` of the published torchtitan row (Llama 3.1 8B, FSDP 8,
   local batch 2 x 8192, bf16-mixed AdamW, H100) with `model.implementation: torchtitan`
   (activations not modelled yet: per_gpu.activations is 0) and, for the FSDP2 terms beside
   real activations, with transformers' model under full checkpointing; each with the old
   FSDP2 (reduce_dtype bf16, fsdp_wrap layers) and the new defaults. Peak allocated per phase.
3. `flagships`: benchmarks/flagships.py's DeepSeek-V3.2 and GLM-4.5 rows (their specs, the
   shipped profiles, `--no-trace`): per-GPU peak and transient with experts over the
   expert-data ranks, and with torchtitan's reduce_dtype and wrapping on top.

Writes benchmarks/results/fsdp2-torchtitan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.flagships import FLAGSHIPS, spec_text  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-torchtitan.json"
GIB = 2**30

VERIFY_CASES = [
    # ZeRO stage, ranks, micro-batch, sequence, HSDP replicate degree
    (3, 4, 1, 16, 1),
    (3, 2, 2, 32, 1),
    (2, 4, 2, 16, 1),
    (3, 4, 1, 16, 2),
]


def verify_rows() -> list[dict[str, Any]]:
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.runner import verify
    from tests.conftest import TINY_LLAMA

    rows = []
    for stage, ranks, mb, seq, replicate in VERIFY_CASES:
        for reduce_dtype in (None, "fp32"):
            for wrap in ("layers", "torchtitan"):
                par: dict[str, Any] = {"engine": "fsdp2", "data": ranks, "zero_stage": stage}
                par["fsdp_wrap"] = wrap
                if replicate > 1:
                    par["data_replicate"] = replicate
                if reduce_dtype:
                    par["reduce_dtype"] = reduce_dtype
                spec = validate(
                    {
                        "model": {"architecture": TINY_LLAMA},
                        "precision": "bf16-mixed",
                        "optimizer": {"name": "adamw"},
                        "training": {"micro_batch_size": mb, "sequence_length": seq},
                        "parallelism": par,
                        "hardware": {"device": "cpu"},
                    }
                )
                start = time.time()
                result = verify(spec, Options(nproc=ranks), lambda _rank, _what: None)
                peaks = []
                for rank in result.ranks:
                    row = rank.row("peak")
                    peaks.append((rank.rank, row.predicted, row.measured))
                errors = [(p - m) / m for _, p, m in peaks if p is not None and m]
                rows.append(
                    {
                        "zero_stage": stage,
                        "ranks": ranks,
                        "data_replicate": replicate,
                        "micro_batch": mb,
                        "sequence": seq,
                        "reduce_dtype": reduce_dtype or "default (bf16)",
                        "fsdp_wrap": wrap,
                        "peaks": [{"rank": r, "predicted": p, "measured": m} for r, p, m in peaks],
                        "best_error": min(errors, key=abs),
                        "worst_error": max(errors, key=abs),
                        "seconds": round(time.time() - start, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _estimate(text: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text)
        out = subprocess.run(
            [sys.executable, "-m", "memplan", "estimate", str(path), "--json", "--no-trace"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
    doc = json.loads(out.stdout)
    g = doc["per_gpu"]
    return {
        "peak_gib": round(g["peak"] / GIB, 3),
        "peak_reserved_gib": round(g["peak_reserved"] / GIB, 3),
        "transient_gib": round(g["transient"] / GIB, 3),
        "activations_gib": round(g["activations"] / GIB, 3),
        "peak_phase": doc["timeline"]["peak"]["phase"],
        "by_phase_gib": {
            p["phase"]: round(p["peak_allocated"] / GIB, 3) for p in g["reserved_by_phase"]
        },
    }


LLAMA3_8B = """model:
  preset: llama-3-8b
  implementation: {implementation}
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 2
  sequence_length: 8192
  activation_checkpointing: {ac}
parallelism:
  engine: fsdp2
  data: 8
  zero_stage: 3
{fsdp}hardware:
  gpu: H100-80GB
"""
OLD_FSDP2 = "  reduce_dtype: bf16\n  fsdp_wrap: layers\n"
TITAN_FSDP2 = "  reduce_dtype: fp32\n  fsdp_wrap: torchtitan\n"


def llama3_8b_rows() -> list[dict[str, Any]]:
    rows = []
    for implementation, ac in (("torchtitan", "none"), ("transformers", "full")):
        for label, fsdp in (
            ("old FSDP2: reduce bf16, per-layer wrap", OLD_FSDP2),
            ("reduce fp32 only", "  reduce_dtype: fp32\n  fsdp_wrap: layers\n"),
            ("torchtitan wrap only", "  reduce_dtype: bf16\n  fsdp_wrap: torchtitan\n"),
            ("torchtitan's: reduce fp32 + its wrap", TITAN_FSDP2),
        ):
            text = LLAMA3_8B.format(implementation=implementation, ac=ac, fsdp=fsdp)
            rows.append(
                {"implementation": implementation, "checkpointing": ac, "fsdp2": label}
                | _estimate(text)
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def flagship_rows() -> list[dict[str, Any]]:
    rows = []
    for flagship in FLAGSHIPS:
        if flagship["preset"] not in ("deepseek-v3.2", "glm-4.5"):
            continue
        base = spec_text(flagship, "cuda")
        for label, extra in (
            ("flagships.py spec (experts over the expert-data ranks)", ""),
            ("+ torchtitan's reduce fp32 and wrap", TITAN_FSDP2),
        ):
            text = base.replace("hardware:\n", extra + "hardware:\n")
            rows.append({"preset": flagship["preset"], "variant": label} | _estimate(text))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-runs", action="store_true", help="skip the real FSDP2 runs")
    args = parser.parse_args()
    doc: dict[str, Any] = stamp()
    doc["llama3_8b"] = llama3_8b_rows()
    doc["flagships"] = flagship_rows()
    if not args.no_runs:
        doc["verify"] = verify_rows()
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
