"""`main` runs a plain `memplan estimate` without typer (memplan.cli.entry): held to typer.

The oracle is typer itself: wherever memplan.cli.entry.estimate_options takes a command line,
typer's own parse of it (the click context of memplan.cli.app's `estimate`) has the same
parameters; and the output of `main` equals, byte for byte, what the typer app prints for the
same command line, on stdout, stderr and in the exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from memplan.cli.app import app
from memplan.cli.entry import estimate_options
from tests.conftest import ROOT

SPEC = "configs/llama-3-8b.yaml"


def typer_params(args: list[str]) -> dict[str, Any]:
    """The parameters typer gives memplan.cli.app.estimate for `memplan ARGS`."""
    group = get_command(app)
    parent = group.make_context("memplan", list(args))
    command = group.get_command(parent, args[0])
    assert command is not None
    return dict(command.make_context(args[0], list(args[1:]), parent=parent).params)


TAKEN = [
    [SPEC],
    [SPEC, "--json"],
    ["--json", SPEC],
    [SPEC, "--ranks", "--explain"],
    [SPEC, "--no-trace"],
    [SPEC, "--trace", "--json"],
    [SPEC, "--width", "140"],
    ["--width=80", SPEC, "--ranks"],
    [SPEC, "--width", "0"],
    [SPEC, "--width", "007"],
    ["--explain", "--width", "100", "--no-trace", "--json", "--ranks", SPEC],
    ["configs/does-not-exist.yaml"],  # memplan says so itself, as under typer
]
"""Command lines the fast path takes (the test fails if it declines one)."""


@pytest.mark.parametrize("rest", TAKEN, ids=" ".join)
def test_taken_command_lines_parse_as_typer_parses_them(rest: list[str]) -> None:
    args = ["estimate", *rest]
    options = estimate_options(args, {})
    assert options is not None
    assert options == typer_params(args)


DECLINED = [
    [],
    ["--version"],
    ["estimate"],
    ["estimate", "--help"],
    ["estimate", SPEC, "--help"],
    ["estimate", SPEC, "--debug"],
    ["estimate", SPEC, "--plot", "t.png"],
    ["estimate", SPEC, "--json", "--json"],
    ["estimate", SPEC, "--trace", "--no-trace"],
    ["estimate", SPEC, "--width"],
    ["estimate", SPEC, "--width", "wide"],
    ["estimate", SPEC, "--width", "-1"],
    ["estimate", SPEC, "--width", " 80"],
    ["estimate", SPEC, "--width", "1e3"],
    ["estimate", SPEC, "--width", "٣"],  # a digit to str.isdigit, not to click's int
    ["estimate", SPEC, "--width=", "--json"],
    ["estimate", SPEC, "--json=1"],
    ["estimate", SPEC, "--jso"],
    ["estimate", SPEC, "-h"],
    ["estimate", SPEC, "--"],
    ["estimate", SPEC, SPEC],
    ["estimate", "-"],
    ["estimate", ""],
    ["estimat", SPEC],
    ["plan", SPEC],
    ["--debug", "estimate", SPEC],
]
"""Command lines typer parses (help, errors, the options the fast path leaves to typer)."""


@pytest.mark.parametrize("args", DECLINED, ids=" ".join)
def test_other_command_lines_go_to_typer(args: list[str]) -> None:
    assert estimate_options(args, {}) is None


def test_shell_completion_goes_to_typer() -> None:
    assert estimate_options(["estimate", SPEC], {}) is not None
    assert estimate_options(["estimate", SPEC], {"_MEMPLAN_COMPLETE": "bash_complete"}) is None


def test_an_unreadable_spec_goes_to_typer(tmp_path: Path) -> None:
    """typer refuses a spec that exists and cannot be read (its own message, exit 2)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {}\n")
    spec.chmod(0)
    try:
        readable = os.access(spec, os.R_OK)  # root reads it anyway
        assert (estimate_options(["estimate", str(spec)], {}) is None) == (not readable)
    finally:
        spec.chmod(0o644)


# Run as the console script runs (`main`), and as the typer app alone: same bytes, same code.
MAIN = """
import sys
from memplan.cli.entry import main
sys.argv = ["memplan", *sys.argv[1:]]
try:
    main()
finally:
    sys.stdout.flush()
    sys.stderr.write("\\n@@" + str("typer" in sys.modules))
"""
TYPER = """
import sys
from memplan.cli.app import app
sys.argv = ["memplan", *sys.argv[1:]]
app()
"""


def run(code: str, args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "configs/mistral-7b.yaml"],
        ["estimate", "configs/mixtral-8x7b.yaml", "--json"],
        ["estimate", "configs/llama-3-8b-lora.yaml", "--ranks", "--explain", "--width", "150"],
        ["estimate", "configs/no-such-spec.yaml"],
        ["estimate", "configs/gpt2.yaml", "--jso"],
    ],
    ids=" ".join,
)
def test_main_prints_what_the_typer_app_prints(args: list[str]) -> None:
    code, out, err = run(MAIN, args)
    err, typer_imported = err.rsplit("\n@@", 1)
    assert (code, out, err) == run(TYPER, args)
    if code == 0:  # a plain estimate never imports typer (an error line is typer.echo's)
        assert typer_imported == str(estimate_options(args, {}) is None)


def test_main_exits_as_typer_does_on_a_spec_error(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {hf_config: nowhere.json}\nextra_key: 1\n")
    code, out, err = run(MAIN, ["estimate", str(spec), "--json"])
    assert code == 1 and out == "" and err.startswith("error: ")
    assert (code, out, err.rsplit("\n@@", 1)[0]) == run(TYPER, ["estimate", str(spec), "--json"])
