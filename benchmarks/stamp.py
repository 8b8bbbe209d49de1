"""The stamp every results file under benchmarks/results/ carries: where and when it was measured.

scripts/gen_readme.py prints the commit into the README next to each generated block, and
tests/test_readme.py fails when a block names a results file without one.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def stamp(**extra: Any) -> dict[str, Any]:
    """commit (`git rev-parse --short HEAD`), dirty (uncommitted changes to tracked files under
    memplan/ or benchmarks/, which could have moved the numbers; benchmarks/results/ itself
    does not count), UTC date and the machine."""
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(
            git(
                "status",
                "--porcelain",
                "--untracked-files=no",
                "memplan",
                "benchmarks",
                ":(exclude)benchmarks/results",
            )
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        **extra,
    }
