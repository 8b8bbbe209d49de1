"""Wall time of `memplan estimate` beside the import floor, medians measured in one run.

Target (issue 21, "Speed at scale"): `memplan estimate` on a shipped config within 1.5x the import
floor, the wall time of `python -c "import typer, rich, pydantic, yaml"` measured in the same
run. It replaces issue 3's fixed 300 ms, which said nothing about the machine: the ratio does.

Every command is one fresh process (what a user waits for), run round-robin so that a change in
the machine's load hits every row alike; each row is the median of --runs, in wall time (the
target's measure) and in the child's CPU time (user + system: on a shared machine the steadier
of the two for comparing rows). The children run with bytecode writing allowed and one untimed
warm-up each, so that no row pays for compiling memplan (as after `pip install`).

Three reference rows, not targets, show the part of the wait that belongs to memplan's
dependencies rather than to memplan: the floor plus pydantic's BaseModel (the spec is pydantic
models); an empty typer app with `estimate`'s options (typer 0.29 coerces every option through a
pydantic TypeAdapter when the command runs, which `import typer` does not pay); and the floor
without typer, which a plain `memplan estimate` no longer imports (memplan/cli/entry.py parses
its options; any other command line still goes through typer). The last block splits one
`estimate --json` run into its phases, in process (PHASES below), and one run of the table
(`table_phases_ms`: the same phases to the estimate, then rich's console, the view and the
render).

Run:  python benchmarks/estimate_speed.py    # prints, writes benchmarks/results/estimate-speed.json
      python benchmarks/estimate_speed.py --baseline /tmp/memplan-106a436  # before/after rows
(--baseline: another checkout of memplan, e.g. `git archive 106a436 | tar -x -C DIR`, timed in
the same run; --no-write to only print.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "estimate-speed.json"
TARGET_RATIO = 1.5
FLOOR = "import typer, rich, pydantic, yaml"
CONFIGS = (
    "configs/llama-3-8b.yaml",  # dense Llama, DeepSpeed ZeRO-3
    "configs/mistral-7b.yaml",  # FSDP2
    "configs/mixtral-8x7b.yaml",  # MoE, DeepSpeed ZeRO-3
    "configs/llama-3-8b-lora.yaml",  # LoRA, DDP
)

# An empty typer app with `memplan estimate`'s options: what typer itself costs at run time.
TYPER_APP = """
from pathlib import Path
from typing import Annotated
import typer
app = typer.Typer()
@app.callback()
def root(version: Annotated[bool, typer.Option("--version")] = False) -> None: ...
@app.command()
def estimate(
    spec: Annotated[Path, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    ranks: Annotated[bool, typer.Option("--ranks")] = False,
    plot: Annotated[Path | None, typer.Option("--plot")] = None,
    explain: Annotated[bool, typer.Option("--explain")] = False,
    width: Annotated[int | None, typer.Option("--width")] = None,
    trace: Annotated[bool, typer.Option("--trace/--no-trace")] = True,
    debug: Annotated[bool, typer.Option("--debug")] = False,
) -> None: ...
app(["estimate", "configs/llama-3-8b.yaml", "--json"])
"""


# Where the time of `memplan estimate SPEC --json` goes, in one process, in the order the CLI
# does it (memplan/cli/entry.py::main and memplan/cli/run.py::estimate): each phase's wall time,
# perf_counter around it. Like `main`, it runs with the cyclic garbage collector off and
# pydantic's plugins off. The first phase imports the floor's four packages, typer among them,
# although a plain estimate imports no typer (memplan.cli.entry parses it): the phases after it
# are memplan's own.
PHASES = """
import gc, json, os, sys, time
from pathlib import Path
gc.disable(); os.environ["PYDANTIC_DISABLE_PLUGINS"] = "1"  # as memplan.cli.entry.main
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import typer, rich, pydantic, yaml; mark("floor: import typer, rich, pydantic, yaml")
from memplan.cli import entry, run
options = entry.estimate_options(["estimate", sys.argv[1], "--json"], os.environ)
assert options is not None
mark("memplan.cli.entry: import, the arguments parsed (no typer)")
from pydantic import BaseModel; mark("pydantic: BaseModel machinery (the spec's models need it)")
# what every model with a Field needs, and what building its first validator imports (the
# plugin loader, pydantic/plugin/_loader.py, imports importlib.metadata even with plugins off):
# pydantic's, not memplan's, though `import pydantic` (the floor) pays for neither
import pydantic.fields
mark("pydantic: BaseModel fields (pydantic.fields, .types, annotated_types)")
import importlib.metadata
mark("pydantic: BaseModel validators' plugin loader (importlib.metadata)")
from memplan.config import load; mark("memplan: import the spec models (memplan.config)")
from memplan.model import load as model_load; mark("memplan: import memplan.model.load")
from memplan.report import estimate as calc; mark("memplan: import the calculator")
from memplan.verify.trace import fallback_inventory; mark("memplan: import memplan.verify.trace")
loaded = load.load_spec(Path(sys.argv[1])); mark("memplan: read and validate the spec")
with load.locating(loaded):
    inv = model_load.load_inventory(loaded, unsupported=fallback_inventory)
    mark("memplan: the model's inventory")
    report = calc.estimate(loaded.spec, inv); mark("memplan: the estimate (calculation)")
if sys.argv[2:] == ["table"]:  # the table: what `estimate` prints without --json
    import io
    from memplan.cli import render; mark("rich: import rich.console (memplan.cli.render)")
    from memplan.cli.estimate_view import estimate_view
    mark("memplan: import memplan.cli.estimate_view (rich.table, rich.box)")
    console = render.console(120)
    console.file = io.StringIO()
    console.print(estimate_view(report)); mark("rich: render the table at 120 columns")
else:
    from memplan.report.json import estimate_json; mark("memplan: import memplan.report.json")
    text = json.dumps(estimate_json(report), indent=2)
    mark("memplan: build and dump the document (plain dicts)")
print(json.dumps([[b[0], (b[1] - a[1]) * 1000] for a, b in zip(marks, marks[1:])]))
"""


def child_env(checkout: Path) -> dict[str, str]:
    """The environment every timed child runs in: `checkout`'s memplan first on the path,
    bytecode writing allowed (a shell that sets PYTHONDONTWRITEBYTECODE would otherwise time
    the compiler, not memplan)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(checkout)
    return env


class Row:
    """One command: its wall times (what the target is about) and its CPU times (user + system
    of the child: what a shared machine's other work moves least, to compare rows by)."""

    def __init__(self, name: str, argv: list[str], cwd: Path, *, kind: str) -> None:
        self.name, self.argv, self.cwd, self.kind = name, argv, cwd, kind
        self.env = child_env(cwd)
        self.times: list[float] = []
        self.cpu: list[float] = []

    def run(self) -> tuple[float, float]:
        start = time.perf_counter()
        child = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = (time.perf_counter() - start) * 1000
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, self.argv)
        return wall, (usage.ru_utime + usage.ru_stime) * 1000

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def rows(baseline: Path | None) -> list[Row]:
    py = sys.executable
    out = [
        Row("python -c pass", [py, "-c", "pass"], ROOT, kind="python"),
        Row(f'python -c "{FLOOR}"', [py, "-c", FLOOR], ROOT, kind="floor"),
        Row(
            "floor + pydantic.BaseModel",
            [py, "-c", FLOOR + "; from pydantic import BaseModel"],
            ROOT,
            kind="reference",
        ),
        Row("empty typer app, estimate's options", [py, "-c", TYPER_APP], ROOT, kind="reference"),
        Row(
            'python -c "import rich, pydantic, yaml" (no typer)',
            [py, "-c", "import rich, pydantic, yaml"],
            ROOT,
            kind="reference",
        ),
        Row("memplan --version", [py, "-m", "memplan", "--version"], ROOT, kind="memplan"),
    ]
    checkouts = [(ROOT, "memplan")] + ([(baseline, "before")] if baseline else [])
    for config in CONFIGS:
        for checkout, kind in checkouts:
            for flags in ([], ["--json"]):
                name = " ".join(["memplan estimate", config, *flags])
                argv = [py, "-m", "memplan", "estimate", config, *flags]
                out.append(Row(name, argv, checkout, kind=kind))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Wall time of memplan estimate vs the floor.")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--baseline", type=Path, help="another memplan checkout to time too")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    table = rows(args.baseline.resolve() if args.baseline else None)
    load_before = os.getloadavg()[0]
    for row in table:  # untimed: writes the bytecode, warms the page cache
        row.run()
    for _ in range(args.runs):
        for row in table:
            wall, cpu = row.run()
            row.times.append(wall)
            row.cpu.append(cpu)
    phases: dict[str, list[float]] = {}
    table_phases: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for output, into in (([], phases), (["table"], table_phases)):
            out = subprocess.run(
                [sys.executable, "-c", PHASES, CONFIGS[0], *output],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=child_env(ROOT),
            ).stdout
            for name, ms in json.loads(out):
                into.setdefault(name, []).append(ms)
    python = table[0].median
    floor = table[1].median
    print(f"median of {args.runs} runs (wall clock, one process each, round-robin)")
    cpu_floor = table[1].cpu_median
    print(f"  {'wall ms':>8}  {'floor':>6}  {'python':>6}  {'cpu ms':>7}  {'floor':>6}")
    for row in table:
        tag = "  [before]" if row.kind == "before" else ""
        ratios = f"{row.median / floor:5.2f}x  {row.median / python:5.2f}x"
        cpu_cols = f"{row.cpu_median:7.1f}  {row.cpu_median / cpu_floor:5.2f}x"
        print(f"  {row.median:8.1f}  {ratios}  {cpu_cols}  {row.name}{tag}")
    estimates = [r for r in table if r.kind == "memplan" and r.name.startswith("memplan estimate")]
    before = {r.name: r for r in table if r.kind == "before"}
    if before:
        print("before -> after: wall ms, as a ratio to the floor; CPU ms")
        for r in estimates:
            b = before[r.name]
            print(
                f"  {b.median:6.1f} -> {r.median:6.1f} ms  {b.median / floor:4.2f}x -> "
                f"{r.median / floor:4.2f}x  ({r.median - b.median:+6.1f} ms);  cpu "
                f"{b.cpu_median:6.1f} -> {r.cpu_median:6.1f} ms "
                f"({r.cpu_median - b.cpu_median:+6.1f})  {r.name}"
            )
    print(f"where `memplan estimate {CONFIGS[0]} --json` spends its time (median ms, in-process):")
    print(f"  {python:8.1f}  python start-up (python -c pass, wall)")
    for name, times in phases.items():
        print(f"  {statistics.median(times):8.1f}  {name}")
    print(f"the table instead (`memplan estimate {CONFIGS[0]}`): its last phases (median ms)")
    for name, times in list(table_phases.items())[-3:]:
        print(f"  {statistics.median(times):8.1f}  {name}")
    worst = max(estimates, key=lambda r: r.median)
    ratio = worst.median / floor
    met = ratio <= TARGET_RATIO
    print(
        f"slowest estimate {worst.median:.1f} ms = {ratio:.2f}x the floor ({floor:.1f} ms): "
        f"{'meets' if met else 'MISSES'} the {TARGET_RATIO}x target ({TARGET_RATIO * floor:.1f} ms)"
    )
    if args.no_write:
        return
    doc: dict[str, Any] = {
        "stamp": stamp(load_average_1min_before=round(load_before, 2)),
        "command": "python benchmarks/estimate_speed.py"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + f" --runs {args.runs}",
        "target": f"memplan estimate within {TARGET_RATIO}x the floor (issue 21)",
        "floor": f'python -c "{FLOOR}"',
        "runs": args.runs,
        "python_ms": round(python, 1),
        "floor_ms": round(floor, 1),
        "target_ms": round(TARGET_RATIO * floor, 1),
        "slowest_estimate": worst.name,
        "slowest_ms": round(worst.median, 1),
        "slowest_ratio": round(ratio, 2),
        "met": met,
        "baseline": str(args.baseline) if args.baseline else None,
        "phases_ms": {name: round(statistics.median(t), 1) for name, t in phases.items()},
        "table_phases_ms": {
            name: round(statistics.median(t), 1) for name, t in table_phases.items()
        },
        "rows": [
            {
                "command": r.name,
                "kind": r.kind,
                "median_ms": round(r.median, 1),
                "ratio_to_floor": round(r.median / floor, 2),
                "cpu_median_ms": round(r.cpu_median, 1),
                "cpu_ratio_to_floor": round(r.cpu_median / cpu_floor, 2),
                "runs_ms": [round(t, 1) for t in r.times],
            }
            for r in table
        ],
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
