"""benchmarks/gpu_check.py runs (issue 20, part 5): its `--dry-run` goes through the same
children, the same verify and the same writer as the CUDA grid, on CPU with tiny models, so
the script cannot rot on machines without a GPU. On a CUDA machine the `gpu` test runs the
smallest model's cells for real.

The measured bytes come from torch (verify's MemTracker peak on CPU, max_memory_allocated and
max_memory_reserved on CUDA) and NVML; the predicted ones from the calculator. The checks on
the grid's shape are pinning tests of the script's own definition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--only", "tiny-llama", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    files = list(out.glob("gpu-*.json"))
    assert len(files) == 1, proc.stdout + proc.stderr
    return proc, json.loads(files[0].read_text())


def test_dry_run_measures_every_cell_and_writes_a_stamped_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc, doc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "gpu-cpu.json").is_file()
    assert doc["device"] == "cpu" and doc["dry_run"] is True and doc["skipped"] == []
    assert {"commit", "dirty", "date", "torch", "transformers", "cuda", "gpus"} <= set(doc["stamp"])
    runs = doc["runs"]
    assert [(r["model"], r["recipe"], r["engine"], r["ranks"]) for r in runs] == [
        ("tiny-llama", "bf16-mixed", "ddp", 1),
        ("tiny-llama", "fp32", "ddp", 1),
    ]
    for r in runs:
        assert r["ok"] is True, r["verify"]["failures"]
        assert r["verify"]["setup"]["attention"] == "sdpa"
        assert r["verify"]["setup"]["device"] == "cpu"
        # torch's MemTracker peak against the calculator's, within verify's 3%.
        measured, predicted = r["measured"]["allocated"], r["predicted"]["allocated"]
        assert measured > 0 and abs(measured - predicted) <= 0.03 * predicted
        # No CUDA allocator and no NVML on CPU: recorded as null, not as 0.
        assert r["measured"]["reserved"] is None and r["measured"]["nvml_used"] is None
        assert r["predicted"]["reserved"] is None and r["predicted"]["nvml_used"] is None
    # The table: a header, one line per run, a summary.
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model") and "allocated pred/meas MiB" in lines[0]
    assert sum(line.startswith("tiny-llama") for line in lines) == 2
    assert lines[-1].startswith("2 run(s), 0 could not run, 0 skipped")


def test_budget_spent_skips_and_records_the_rest(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc, doc = _run(tmp_path, "--dry-run", "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr
    assert doc["runs"] == []
    assert [(s["model"], s["recipe"]) for s in doc["skipped"]] == [
        ("tiny-llama", "bf16-mixed"),
        ("tiny-llama", "fp32"),
    ]


def test_pin_grid_one_gpu_and_several() -> None:
    one = gpu_check.grid(dry_run=False, ranks=1, only=None)
    # 3 models x 2 recipes x DDP on one GPU x expandable segments off and on.
    assert len(one) == 12
    assert {(c["engine"], c["ranks"]) for c in one} == {("ddp", 1)}
    assert {c["alloc_conf"] for c in one} == set(gpu_check.ALLOC_CONFS)
    assert all(c["spec"]["training"]["attention"] == "sdpa" for c in one)
    assert all(c["spec"]["hardware"]["device"] == "cuda" for c in one)
    four = gpu_check.grid(dry_run=False, ranks=4, only=None)
    assert {(c["engine"], c["ranks"]) for c in four} == {("ddp", 1), ("fsdp2", 4), ("ddp", 4)}
    fsdp = [c for c in four if c["engine"] == "fsdp2"]
    assert all(c["spec"]["parallelism"]["zero_stage"] == 3 for c in fsdp)
    # The dry run: CPU, the verify tests' tiny shapes, one allocator setting (CUDA's only).
    dry = gpu_check.grid(dry_run=True, ranks=1, only=None)
    assert len(dry) == 6 and all(c["spec"]["hardware"]["device"] == "cpu" for c in dry)
    assert all(c["spec"]["training"]["sequence_length"] == 16 for c in dry)
    assert all("architecture" in c["spec"]["model"] for c in dry)


def test_llama_3_2_1b_has_the_published_parameter_count() -> None:
    """The grid's ~1B model is Llama-3.2-1B: 1,235,814,400 parameters counted from its
    checkpoint (embeddings tied) in ModelCloud/GPTQModel tests/test_parameter_count.py
    (LLAMA_3_2_1B_PARAMETER_COUNT)."""
    from memplan.model import sources

    inventory = sources.from_config(gpu_check.LLAMA_3_2_1B, origin="model")
    assert inventory.num_parameters == 1_235_814_400


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_cells_of_the_smallest_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        pytest.skip("needs a CUDA device and nvidia-smi")
    proc, doc = _run(tmp_path, "--budget-s", "240")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(doc["runs"]) == 4 and doc["stamp"]["gpus"]
    for r in doc["runs"]:
        m, p = r["measured"], r["predicted"]
        assert m["allocated"] > 0 and m["reserved"] >= m["allocated"]
        assert m["nvml_used"] >= m["reserved"]  # NVML also holds the CUDA context
        assert p["reserved"] is not None and p["nvml_used"] > p["reserved"]
        assert r["expandable_segments_seen"] is r["alloc_conf"].endswith("True")
