"""Time to build an activation profile (memplan.verify.trace.profile.build) for a 100-layer model,
and `memplan estimate`'s start-up when a stored profile serves against a hand-ruled family.

Build: the trace runs two layers of each structure under FakeTensorMode, in their places in the
full-depth model (memplan.verify.trace.structure), and checks the grouping with one forward of
every layer at one size: building the full-depth fake model and that check forward grow with
the layer count, the fitted traces do not. This times a Llama-3-8B-shaped config at 100 layers
and at 2 layers (sdpa and eager; the CPU kernels, and the CUDA kernels emulated on the CPU
build: device=cuda, memplan.verify.trace.cuda), and gpt-oss-120b's config (two layer kinds,
MoE) at 100 layers.

Start-up: `python -m memplan estimate SPEC --json` in a fresh process per run, as a user runs
it, the cases interleaved run by run (the machine is shared) and the median kept:

  rule     the llama-3-8b preset (hand-written family: its saved-tensor rule)
  profile  the gpt-oss-120b preset (no family: the inventory and the activation profile
           memplan ships in memplan/model/profiles/, benchmarks/flagships.py)

with an empty MEMPLAN_CACHE, the same layout (bf16-mixed AdamW, FSDP2 over 64 H100-80GB,
micro-batch 1, sequence 4,096, full checkpointing, device cuda; gpt-oss with 8-way expert
parallelism). Each process reports whether
`torch` (or `transformers`) is in `sys.modules` after the command: both must say no.

    PYTHONPATH=$PWD python benchmarks/profile_build.py [--runs 7] [--no-build]

Writes benchmarks/results/profile-build.json (stamped with the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "profile-build.json"

LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}

SPEC = """model:
  preset: {preset}
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 1
  sequence_length: 4096
  activation_checkpointing: full
  attention: {attention}
parallelism:
  engine: fsdp2
  data: 64
  expert: {expert}
hardware:
  gpu: H100-80GB
"""
CASES = {"rule": ("llama-3-8b", "sdpa", 1), "profile": ("gpt-oss-120b", "eager", 8)}
# The command as `memplan` runs it, then what it imported.
ESTIMATE = (
    "import sys, runpy; sys.argv = ['memplan', 'estimate', {spec!r}, '--json']\n"
    "try:\n    runpy.run_module('memplan', run_name='__main__')\n"
    "except SystemExit as e:\n    assert not e.code, e.code\n"
    "sys.stderr.write('IMPORTED=%s\\n' % ','.join(m for m in ('torch', 'transformers') "
    "if m in sys.modules))\n"
)


def builds() -> list[dict[str, Any]]:
    from memplan.verify.trace.profile import build

    gpt_oss = json.loads((ROOT / "memplan/model/presets/gpt-oss-120b.json").read_text())
    rows = []
    started = time.perf_counter()
    build({**LLAMA_8B, "num_hidden_layers": 2}, stream="bf16", matmul="bf16", autocast=False,
          attention="sdpa")  # fmt: skip
    rows.append({"case": "warm-up (imports, first FakeTensorMode)",
                 "seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        (f"llama-8b-shaped, {n} layers", {**LLAMA_8B, "num_hidden_layers": n}, attention, device)
        for device in ("cpu", "cuda")
        for n in (100, 2)
        for attention in ("sdpa", "eager")
    ]
    kinds = ["sliding_attention", "full_attention"] * 50
    cases.append(
        (
            "gpt-oss-120b's config at 100 layers (two layer kinds, MoE)",
            {**gpt_oss, "num_hidden_layers": 100, "layer_types": kinds},
            "eager",
            "cpu",
        )
    )
    for name, config, attention, device in cases:
        started = time.perf_counter()
        doc = build(
            config,
            stream="bf16",
            matmul="bf16",
            autocast=False,
            attention=attention,
            checkpointing="full",
            device=device,
        )
        seconds = time.perf_counter() - started
        counts = doc["model"]["layer_counts"]
        print(f"{name} {attention} bf16 {device}, full checkpointing: {seconds:.2f} s ({counts})")
        rows.append(
            {
                "case": name,
                "attention": attention,
                "device": device,
                "layer_counts": counts,
                "seconds": round(seconds, 2),
            }
        )
    return rows


def startup(runs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {case: [] for case in CASES}
    imported: dict[str, set[str]] = {case: set() for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEMPLAN_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(ROOT)}
        specs = {}
        for case, (preset, attention, expert) in CASES.items():
            specs[case] = Path(tmp) / f"{case}.yaml"
            specs[case].write_text(SPEC.format(preset=preset, attention=attention, expert=expert))
        for _ in range(runs):
            for case in CASES:  # interleaved
                started = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", ESTIMATE.format(spec=str(specs[case]))],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env=env,
                    check=True,
                )
                times[case].append(time.perf_counter() - started)
                doc = json.loads(out.stdout)
                source = doc["activations"]["source"]
                assert source == case, f"{case}: activations.source {source}"
                line = [x for x in out.stderr.splitlines() if x.startswith("IMPORTED=")][-1]
                imported[case] |= {m for m in line.removeprefix("IMPORTED=").split(",") if m}
    return {
        case: {
            "preset": CASES[case][0],
            "runs_s": [round(t, 3) for t in times[case]],
            "median_s": round(statistics.median(times[case]), 3),
            "imported": sorted(imported[case]),
        }
        for case in CASES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-build", action="store_true", help="only the start-up part")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {}
    if not args.no_build:
        doc["build"] = builds()
    doc["startup"] = startup(args.runs)
    for case, row in doc["startup"].items():
        imported = ", ".join(row["imported"]) or "neither torch nor transformers"
        print(
            f"estimate start-up, {case} ({row['preset']}): median {row['median_s']:.2f} s "
            f"of {args.runs}; imported: {imported}"
        )
    doc["stamp"] = stamp(argv=["benchmarks/profile_build.py", *(argv or sys.argv[1:])])
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
