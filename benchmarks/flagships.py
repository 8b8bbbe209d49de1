"""`memplan estimate` on full-size configs of this year's flagships, with activations: the README's
flagship table, and the profiles memplan ships for them.

    PYTHONPATH=$PWD python benchmarks/flagships.py              # refresh profiles, then estimate
    PYTHONPATH=$PWD python benchmarks/flagships.py --no-build   # estimate with what is shipped

For each flagship (memplan/model/presets/<preset>.json; sources in presets/SOURCES.md) the
script writes the spec below, traces its activation profile and stores the profile and the
model's inventory in memplan/model/profiles/ (what memplan ships: `estimate` then needs no torch;
memplan.model.stored, memplan.model.profile), then runs `python -m memplan estimate SPEC --json`
in a fresh process with an empty MEMPLAN_CACHE, so only the shipped files serve, and keeps the
per-GPU figures, the activations' source and whether torch was imported. A model the trace
cannot take yet is listed with the trace's own reason and its estimate without activations.

The layout, the same for every model so the rows compare: bf16-mixed AdamW, torch FSDP2
(ZeRO-3) over H100-80GB GPUs, micro-batch 1, sequence 4,096, full activation checkpointing
(each decoder layer keeps its input), sdpa attention (eager where transformers has no sdpa path
for the model: gpt-oss); the data-parallel degree (`gpus`) grows with the parameter count (8 to
256 GPUs). Expert parallelism (`expert`) where the model's experts run transformers'
grouped_mm (a traced profile holds per EP rank on balanced dropless routing,
memplan.activations.traced.EP_OVER_PROFILE); Llama 4's own expert code is not split, so it runs
plain FSDP2, which shards each expert tensor's first dimension (16 experts: a rank holds at least
one).
Under FSDP2 with expert parallelism memplan gathers a decoder layer's routed experts over the
expert-data ranks and the rest over the data-parallel group, as torchtitan wraps them
(memplan.states.engines.fsdp2.groups.EDP). `--device cuda` (the default): the
profiles are traced for CUDA kernels on the CPU build (memplan.verify.trace.cuda); `--device
cpu` traces the CPU kernels. The estimate runs with `--no-trace`: only shipped files serve.
A windowed model's shipped profile keeps its other sequence regime when the build traces one
(memplan.verify.trace.regimes.merge): Llama 4 Scout's regime past its 8,192-token chunk was
traced at the former unit (8,224) and is kept beside the regime below it, which 4,096 tokens
retraces (docs/profile-regimes.md: how it was added with `memplan profile --out`).

Writes benchmarks/results/flagships.json (stamped with the commit; scripts/gen_readme.py renders
its `flagships` block).
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

from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.load import PROFILE_DIR  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "flagships.json"

FLAGSHIPS: tuple[dict[str, Any], ...] = (
    {
        "preset": "gpt-oss-120b",
        "label": "gpt-oss-120b",
        "gpus": 64,
        "expert": 8,
        "attention": "eager",
    },
    {"preset": "qwen3.5-35b-a3b", "label": "Qwen3.5-35B-A3B (text)", "gpus": 16, "expert": 8},
    {
        "preset": "gemma-4-text-default",
        "label": "Gemma 4 (transformers' default text config)",
        "gpus": 8,
    },
    {"preset": "llama-4-scout-17b-16e", "label": "Llama 4 Scout 17B-16E (text)", "gpus": 64},
    {"preset": "deepseek-v3.2", "label": "DeepSeek-V3.2", "gpus": 256, "expert": 32},
    {"preset": "glm-4.5", "label": "GLM-4.5", "gpus": 128, "expert": 16},
)
LAYOUT = {
    "precision": "bf16-mixed",
    "optimizer": "adamw",
    "engine": "fsdp2",
    "zero_stage": 3,
    "gpu": "H100-80GB",
    "micro_batch_size": 1,
    "sequence_length": 4096,
    "activation_checkpointing": "full",
}
# The torch check runs in the estimate's own process, after the command.
ESTIMATE = (
    "import sys, runpy; sys.argv = ['memplan', 'estimate', {spec!r}, '--json', '--no-trace']\n"
    "try:\n    runpy.run_module('memplan', run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "sys.stderr.write('\\nTORCH_IMPORTED=%d\\n' % ('torch' in sys.modules))\n"
    "sys.exit(code)\n"
)


def spec_text(flagship: dict[str, Any], device: str) -> str:
    return (
        f"model:\n  preset: {flagship['preset']}\n"
        f"precision: {LAYOUT['precision']}\n"
        f"optimizer:\n  name: {LAYOUT['optimizer']}\n"
        "training:\n"
        f"  micro_batch_size: {LAYOUT['micro_batch_size']}\n"
        f"  sequence_length: {LAYOUT['sequence_length']}\n"
        f"  activation_checkpointing: {LAYOUT['activation_checkpointing']}\n"
        f"  attention: {flagship.get('attention', 'sdpa')}\n"
        "parallelism:\n"
        f"  engine: {LAYOUT['engine']}\n"
        f"  zero_stage: {LAYOUT['zero_stage']}\n"
        f"  data: {flagship['gpus']}\n"
        + (f"  expert: {flagship['expert']}\n" if flagship.get("expert", 1) > 1 else "")
        + f"hardware:\n  gpu: {LAYOUT['gpu']}\n  device: {device}\n"
    )


def build_profile(spec: Path) -> dict[str, Any]:
    """Trace the spec's profile and store it, with the model's inventory, in PROFILE_DIR."""
    from memplan.config import load
    from memplan.errors import MemplanError
    from memplan.model import load as model_load
    from memplan.verify.trace import profile as tracer
    from memplan.verify.trace import stored

    loaded = load.load_spec(spec)
    config = model_load.model_config(loaded)
    assert config is not None
    inventory = stored.write(config, PROFILE_DIR)  # model states need no torch either way
    out: dict[str, Any] = {"inventory": inventory.name, "inventory_bytes": inventory.stat().st_size}
    started = time.perf_counter()
    try:
        doc, path = tracer.for_spec(loaded)
    except MemplanError as err:
        return {**out, "built": False, "reason": str(err)}
    target = PROFILE_DIR / path.name
    target.write_text(tracer.dumps(doc), encoding="utf-8")
    return {
        **out,
        "built": True,
        "profile": target.name,
        "profile_bytes": target.stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
    }


def estimate(spec: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "MEMPLAN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", ESTIMATE.format(spec=str(spec))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    seconds = time.perf_counter() - started
    torch = "TORCH_IMPORTED=1" in out.stderr
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[0], "torch_imported": torch}
    doc = json.loads(out.stdout)
    per_gpu, acts = doc["per_gpu"], doc["activations"]
    return {
        "num_parameters": doc["model"]["num_parameters"],
        "parameters": per_gpu["parameters"],
        "gradients": per_gpu["gradients"],
        "optimizer_states": per_gpu["optimizer_states"],
        "activations": per_gpu["activations"],
        "activations_modelled": per_gpu["activations_modelled"],
        "activations_source": acts["source"],
        "profile_versions": acts["profile_versions"],
        "transient": per_gpu["transient"],
        "peak": per_gpu["peak"],
        "fits": doc["hardware"]["fits"],
        "verdict": doc["hardware"]["verdict"],
        "torch_imported": torch,
        "seconds": round(seconds, 2),
        "notes": [n for n in acts["notes"] if "not modelled" in n][:1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--no-build", action="store_true", help="estimate with shipped files")
    parser.add_argument(
        "--only",
        nargs="*",
        help="presets to run (default: all); the stored rows of the others are kept, each with "
        "the stamp it was made at",
    )
    args = parser.parse_args(argv)
    # Stamped before the run: it rewrites the shipped profiles, which would read as a dirty tree.
    stamped = stamp(argv=["benchmarks/flagships.py", *(argv or sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for flagship in FLAGSHIPS:
            if args.only and flagship["preset"] not in args.only:
                continue
            spec = Path(tmp) / f"{flagship['preset']}.yaml"
            spec.write_text(spec_text(flagship, args.device), encoding="utf-8")
            row: dict[str, Any] = {**flagship, "spec": spec.read_text()}
            if not args.no_build:
                row["trace"] = build_profile(spec)
            empty = Path(tmp) / "empty-cache"
            row["estimate"] = estimate(spec, empty)
            print(json.dumps({k: row[k] for k in ("preset", "estimate")}, default=str))
            rows.append(row)
    if args.only and RESULTS.is_file():  # the other presets' rows as stored, in FLAGSHIPS order
        old = json.loads(RESULTS.read_text(encoding="utf-8"))
        kept = {
            r["preset"]: {"stamp": old.get("stamp"), **r}
            for r in old.get("rows", ())
            if r["preset"] not in args.only
        }
        new = {r["preset"]: {**r, "stamp": stamped} for r in rows}
        rows = [{**kept, **new}[f["preset"]] for f in FLAGSHIPS if f["preset"] in {**kept, **new}]
    doc = {
        "layout": {**LAYOUT, "device": args.device},
        "rows": rows,
        "stamp": stamped,
    }
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
