"""GPU check (issue 20, part 5): `memplan verify --device cuda` over a small grid, with the
predicted and measured allocated, reserved and NVML-used bytes of each run.

    PYTHONPATH=. python benchmarks/gpu_check.py            # a CUDA machine: 12 runs on one GPU
                                                           # (36 on several), at most --budget-s
                                                           # (480 s); writes benchmarks/results/
                                                           # gpu-<gpu>.json
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run  # the same grid on CPU, tiny models
                                                           # (6 runs, about 40 s on 2 cores),
                                                           # into a temporary folder

Each run is a fresh interpreter (`--child`) with PYTORCH_CUDA_ALLOC_CONF set in its
environment before torch starts, so every run has its own CUDA context, allocator and peaks.
The child runs verify in-process (memplan.verify.runner.verify, what `memplan verify --json`
runs) and adds what verify does not measure:

- reserved: torch.cuda.max_memory_reserved() in the child after verify (verify resets the peak
  counters before its measured step, so this is that step's peak, like the allocated peak). A
  run on several ranks holds its memory in the rank processes, which the child cannot read:
  there it is the largest torch.cuda.memory_reserved() verify records at the end of a phase of
  the measured step (`phases`, most-loaded rank), a lower bound.
- NVML used: this process samples each GPU's used memory (pynvml when installed, else
  `nvidia-smi --query-gpu=memory.used`, MiB) every 50 ms while the child runs, and once more
  after the child has written its result while it still holds its CUDA context and cached
  blocks; the figure is the largest rise over the GPU's used memory before the child started.

Predicted: verify's predicted peak (the calculator's bytes allocated at the step's peak), the
replayed reserved bytes (the estimate's per_gpu.peak_reserved: memplan.step.replay under the
cell's alloc_conf; the timeline's packing bound beside it) and, for NVML, the estimate's
per_gpu.device_used (reserved plus the CUDA context and NCCL buffers, memplan.step.device).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.verify_table import TINY_GPT2, TINY_LLAMA  # noqa: E402

# Llama-3.2-1B's shapes (huggingface.co/meta-llama/Llama-3.2-1B, config.json): 1.24 B
# parameters, embeddings tied. Its llama3 rope_scaling is left out: it changes the values of
# the rotary `inv_freq` buffer, not its size.
LLAMA_3_2_1B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}

# The grid. Models: name -> (model section, (micro-batch, sequence), the dry run's stand-in).
# The dry run builds every model at the verify tests' tiny shapes (batch 2 x 16).
MODELS: dict[str, tuple[dict[str, Any], tuple[int, int], dict[str, Any]]] = {
    "tiny-llama": ({"architecture": TINY_LLAMA}, (2, 16), {"architecture": TINY_LLAMA}),
    "gpt2": ({"preset": "gpt2"}, (2, 512), {"architecture": TINY_GPT2}),
    "llama-3.2-1b": (
        {"architecture": LLAMA_3_2_1B},
        (1, 256),
        {"architecture": {**TINY_LLAMA, "tie_word_embeddings": True}},
    ),
}
RECIPES = ("bf16-mixed", "fp32")
# PYTORCH_CUDA_ALLOC_CONF configures the CUDA caching allocator only: the dry run (CPU) runs the
# first value alone.
ALLOC_CONFS = ("expandable_segments:False", "expandable_segments:True")
DRY_BATCH = (2, 16)


def engines(ranks: int) -> list[tuple[str, int]]:
    """DDP on one GPU; with more GPUs visible, FSDP2 (ZeRO-3) and DDP on all of them (nccl)."""
    return [("ddp", 1)] + ([("fsdp2", ranks), ("ddp", ranks)] if ranks > 1 else [])


def grid(*, dry_run: bool, ranks: int, only: list[str] | None) -> list[dict[str, Any]]:
    cells = []
    confs = ALLOC_CONFS[:1] if dry_run else ALLOC_CONFS
    for (name, (model, batch, tiny)), recipe, (engine, n), conf in itertools.product(
        MODELS.items(), RECIPES, engines(ranks), confs
    ):
        if only and name not in only:
            continue
        micro, sequence = DRY_BATCH if dry_run else batch
        spec = {
            "model": tiny if dry_run else model,
            "precision": recipe,
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": micro,
                "sequence_length": sequence,
                "attention": "sdpa",
            },
            "parallelism": {
                "engine": engine,
                "data": n,
                "zero_stage": 3 if engine == "fsdp2" else 0,
            },
            # hardware.alloc_conf: the prediction replays the allocator the child runs with.
            "hardware": {"device": "cpu" if dry_run else "cuda", "alloc_conf": conf},
        }
        cells.append(
            {
                "model": name,
                "recipe": recipe,
                "engine": engine,
                "ranks": n,
                "alloc_conf": conf,
                "spec": spec,
            }
        )
    return cells


def nvml_used() -> list[int] | None:
    """Bytes used on each GPU as NVML reports them, or None without NVML or nvidia-smi."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        return [int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in handles]
    except Exception:  # noqa: BLE001 - not installed, or no driver: fall back to nvidia-smi
        pass
    rows = _smi("memory.used")
    return None if rows is None else [int(r[0]) << 20 for r in rows]


def _smi(fields: str) -> list[list[str]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return [[f.strip() for f in line.split(",")] for line in proc.stdout.splitlines()]


def run(cell: dict[str, Any], *, device: str, timeout: float) -> dict[str, Any]:
    """One cell in a fresh interpreter, NVML sampled around it."""
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        # PYTORCH_ALLOC_CONF (torch's newer name for the same setting) is dropped, so that the
        # value set here is the one the allocator reads.
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ALLOC_CONF"}
        env["PYTORCH_CUDA_ALLOC_CONF"] = cell["alloc_conf"]
        before = nvml_used() if device == "cuda" else None
        peak = list(before) if before else None
        start = time.perf_counter()
        command = [sys.executable, __file__, "--child", json.dumps(cell), "--result", str(result)]
        with log.open("w") as err:
            # A session of its own, so that a timeout also ends the ranks verify starts.
            child = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=err,
                stderr=err,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            timed_out = False
            while True:  # until the result is written (the child then waits) or it exits
                done = result.exists() or child.poll() is not None
                if peak is not None:
                    peak = [max(a, b) for a, b in zip(peak, nvml_used() or peak, strict=True)]
                if done:
                    break
                if time.perf_counter() - start > timeout:
                    timed_out = True
                    os.killpg(child.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            assert child.stdin is not None
            child.stdin.close()  # lets the child exit
            child.wait()
        seconds = round(time.perf_counter() - start, 1)
        if not result.exists():
            why = f"timed out after {timeout:.0f} s" if timed_out else log.read_text()[-2000:]
            return {**_key(cell), "seconds": seconds, "error": why.strip()}
        out = json.loads(result.read_text())
    if before is not None and peak is not None:
        out["measured"]["nvml_used"] = max(p - b for p, b in zip(peak, before, strict=True))
        out["nvml_used_per_gpu"] = [p - b for p, b in zip(peak, before, strict=True)]
    return {**_key(cell), "seconds": seconds, **out}


def _key(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in ("model", "recipe", "engine", "ranks", "alloc_conf", "spec")}


def child(cell: dict[str, Any], result: Path) -> None:
    """The child: verify in-process, then the allocator's reserved peak; the result is written
    atomically, and the child holds its CUDA memory until the parent closes stdin."""
    import torch

    from memplan.config.load import validate
    from memplan.verify import job as jobs
    from memplan.verify import runner
    from memplan.verify.job import Options

    device = cell["spec"]["hardware"]["device"]
    loaded = validate(cell["spec"])
    options = Options(device=device, nproc=cell["ranks"])
    _job, report, _full = jobs.plan(loaded, options)
    doc = runner.to_json(runner.verify(loaded, options, lambda _rank, _what: None))
    timeline = report.timeline
    reserved, source, expandable = None, None, None
    if device == "cuda" and not doc["setup"]["distributed"]:
        reserved, source = int(torch.cuda.max_memory_reserved()), "max_memory_reserved"
        # Whether the setting took: the allocator marks each segment it maps expandably.
        cuda: Any = torch.cuda  # memory_snapshot is untyped
        expandable = any(s.get("is_expandable", False) for s in cuda.memory_snapshot())
    elif device == "cuda" and doc.get("phases"):
        reserved = max(p["reserved"] for p in doc["phases"])
        source = "memory_reserved at phase ends (rank processes; a lower bound)"
    # issue 20: the allocator replay (memplan.step.replay) and the device terms on top of it;
    # the timeline's packing bound is kept beside it for comparison.
    predicted_reserved = report.peak_reserved
    out = {
        "ok": doc["ok"],
        "predicted": {
            "allocated": doc["categories"]["peak"]["predicted"],
            "reserved": predicted_reserved,
            "reserved_packing_bound": timeline.reserved_bytes,
            "nvml_used": report.device_used,
        },
        "measured": {
            "allocated": doc["categories"]["peak"]["measured"],
            "reserved": reserved,
            "nvml_used": None,
        },
        "reserved_source": source,
        "expandable_segments_seen": expandable,
        "verify": doc,
    }
    partial = result.with_suffix(".part")
    partial.write_text(json.dumps(out))
    partial.rename(result)
    sys.stdin.read()


def gpu_info() -> dict[str, Any]:
    """GPU name, driver, and torch's CUDA and torch / transformers versions."""
    from importlib.metadata import version

    import torch

    rows = _smi("name,driver_version,memory.total") or []
    return {
        "gpus": [{"name": r[0], "driver": r[1], "memory_mib": int(r[2])} for r in rows],
        "cuda": torch.version.cuda,
        "torch": version("torch"),
        "transformers": version("transformers"),
    }


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<13}{'recipe':<11}{'engine':<9}{'expand':<7}"
    head += "".join(f"{c + ' pred/meas MiB':>26}" for c in ("allocated", "reserved", "NVML"))
    lines = [head + f"{'s':>7}  ok"]
    for r in rows:
        engine = f"{r['engine']}x{r['ranks']}"
        line = f"{r['model']:<13}{r['recipe']:<11}{engine:<9}"
        line += f"{'on' if r['alloc_conf'].endswith('True') else 'off':<7}"
        if "error" in r:
            lines.append(line + f"  error: {r['error'].splitlines()[-1][:80]}")
            continue
        for c in ("allocated", "reserved", "nvml_used"):
            pair = f"{_mib(r['predicted'][c])}/{_mib(r['measured'][c])}"
            line += f"{pair:>26}"
        lines.append(line + f"{r['seconds']:>7.1f}  {'ok' if r['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, temp folder")
    parser.add_argument("--out", type=Path, help="folder (default benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=480, help="skip the rest after this")
    parser.add_argument("--ranks", type=int, help="GPUs for the multi-rank engines (all)")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), help="these models")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child), args.result)
        return 0
    info = gpu_info()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not info["gpus"]:
        parser.error("nvidia-smi finds no GPU here; use --dry-run")
    ranks = args.ranks if args.ranks is not None else 1 if args.dry_run else len(info["gpus"])
    cells = grid(dry_run=args.dry_run, ranks=ranks, only=args.only)
    start = time.perf_counter()
    rows, skipped = [], []
    print(table([]), flush=True)
    for cell in cells:
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            skipped.append(_key(cell))
            continue
        rows.append(run(cell, device=device, timeout=left))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    gpu = info["gpus"][0]["name"] if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or (Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{slug}.json"
    document = {
        "stamp": stamp(seconds=round(time.perf_counter() - start, 1), **info),
        "device": device,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "runs": rows,
        "skipped": skipped,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    failed = sum(1 for r in rows if "error" in r)
    print(f"{len(rows)} run(s), {failed} could not run, {len(skipped)} skipped; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
