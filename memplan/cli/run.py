"""What `memplan estimate` does once its arguments are parsed, and the helpers every command
shares, without typer.

memplan.cli.app's typer commands call these; memplan.cli.entry calls `estimate` directly for a
plain `memplan estimate SPEC [--json] ...` and never imports typer (measured in
benchmarks/results/estimate-speed.json: typer's import and its click commands were about a
ninth of that command's start). typer is imported here only to print a stderr line
(`echo_err`: an error or a note, never on a plain run), so that such a line is the bytes
typer.echo writes under either parser.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from memplan.errors import MemplanError

T = TypeVar("T")


def echo_err(line: str) -> None:
    """`line` on stderr as typer.echo(line, err=True) writes it (click's echo: ANSI codes
    stripped when stderr is no terminal)."""
    import typer

    typer.echo(line, err=True)


def run(debug: bool, work: Callable[[], T]) -> T:
    """Run `work`; a MemplanError becomes one paragraph on stderr and its exit code (exit
    status as typer.Exit gives it: typer's main turns that into the same SystemExit)."""
    try:
        return work()
    except MemplanError as err:
        if debug:
            raise
        echo_err(f"error: {err}")
        raise SystemExit(err.exit_code) from None


def traced(
    loaded: Any,
    inventory: Any,
    checkpointing: tuple[str, ...],
    said: list[str],
    tensor_slices: Callable[[], tuple[tuple[int, int], ...]] | None = None,
) -> Any:
    """`inventory` with the activation profiles traced for it (memplan.verify.trace.
    traced_profiles: with `tensor_slices` None, those of the spec's own layout); what each
    trace did goes to `said`, shown (`say`) once the command succeeds, so that an error stays
    one paragraph."""
    from memplan.verify.trace import traced_profiles

    inventory, lines = traced_profiles(
        loaded, inventory, checkpointing=checkpointing, tensor_slices=tensor_slices
    )
    said.extend(lines)
    return inventory


def say(lines: list[str]) -> None:
    for line in lines:
        echo_err(f"note: {line}")


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def estimate(
    spec: Path,
    *,
    as_json: bool,
    ranks: bool,
    plot: Path | None,
    explain: bool,
    width: int | None,
    trace: bool,
    debug: bool,
) -> None:
    """`memplan estimate` (memplan.cli.app.estimate holds its options and help)."""
    from memplan.config import load
    from memplan.model import load as model_load
    from memplan.report import estimate as calc
    from memplan.report.result import Report
    from memplan.verify.trace import fallback_inventory

    said: list[str] = []

    def work() -> Report:
        loaded = load.load_spec(spec)
        with load.locating(loaded):
            inv = model_load.load_inventory(loaded, unsupported=fallback_inventory)
            if trace:
                inv = traced(loaded, inv, (), said)
            return calc.estimate(loaded.spec, inv)

    report = run(debug, work)
    say(said)
    if plot is not None:
        from memplan.cli.timeline_view import save_plot

        run(debug, lambda: save_plot(report, str(plot)))
    if as_json:  # before the views are imported: rich's console is not needed for JSON
        from memplan.report.json import estimate_json

        print_json(estimate_json(report))
        return
    from memplan.cli import render
    from memplan.cli.estimate_view import estimate_view

    render.console(width).print(estimate_view(report, show_ranks=ranks, explain=explain))
