"""`main`: the `memplan` console script and `python -m memplan`.

A plain estimate (`memplan estimate SPEC` with any of --json, --ranks, --explain, --trace or
--no-trace and --width N, each once, in any order) runs memplan.cli.run.estimate directly;
every other command line goes to the typer app (memplan.cli.app), which also holds the help,
every usage error and shell completion. typer is part of the import floor that issue 21 times
`memplan estimate` against, yet importing it and building the click commands of six commands
from their signatures took a ninth of that command's start
(benchmarks/results/estimate-speed.json), for parsing a few flags.

`estimate_options` takes a command line only where click's own parse has one meaning and
typer would accept it; anything else (--help, --debug, --plot, a repeated or unknown flag, a
value that is not plain digits, `--`, a second argument, an unreadable spec, a shell completion
request) returns None and typer parses it, with its own messages. tests/test_cli_entry.py holds
it to typer's parse: the same parameters wherever it takes a command line.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FLAGS = {
    "--json": ("as_json", True),
    "--ranks": ("ranks", True),
    "--explain": ("explain", True),
    "--trace": ("trace", True),
    "--no-trace": ("trace", False),
}
"""estimate's boolean options (memplan.cli.app.estimate): option -> (parameter, value)."""

DEFAULTS: dict[str, Any] = {
    "as_json": False,
    "ranks": False,
    "plot": None,
    "explain": False,
    "width": None,
    "trace": True,
    "debug": False,
}
"""estimate's parameters when their option is not given (memplan.cli.app.estimate's defaults,
which typer reads from its signature)."""

WIDTH = "--width"
MAX_WIDTH_DIGITS = 6


def _readable_or_absent(path: str) -> bool:
    """typer's check of a Path argument (typer/_param_types.py::coerce_cli_path, typer 0.29,
    with `exists=False, readable=True`): a path that does not exist passes (memplan says so
    itself), one that exists must be readable."""
    try:
        os.stat(path)
    except OSError:
        return True
    return os.access(path, os.R_OK)


def estimate_options(args: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The parameters of memplan.cli.run.estimate for the command line `memplan ARGS`, or None
    where typer should parse it (see the module's docstring)."""
    if os.name == "nt" or not args or args[0] != "estimate":
        return None  # on Windows typer expands wildcards in arguments first
    if any(key.startswith("_") and key.endswith("_COMPLETE") for key in environ):
        return None  # click's shell completion (`_MEMPLAN_COMPLETE=...`)
    options = dict(DEFAULTS)
    given: set[str] = set()
    spec: str | None = None
    tokens = iter(args[1:])
    for token in tokens:
        value: bool | int
        if token in FLAGS:
            name, value = FLAGS[token]
        elif token == WIDTH or token.startswith(WIDTH + "="):
            text = token[len(WIDTH) + 1 :] if "=" in token else next(tokens, "")
            if not (text.isascii() and text.isdigit() and len(text) <= MAX_WIDTH_DIGITS):
                return None
            name, value = "width", int(text)
        elif token.startswith("-") or not token or spec is not None:
            return None
        else:
            spec = token
            continue
        if name in given:
            return None
        given.add(name)
        options[name] = value
    if spec is None or not _readable_or_absent(spec):
        return None
    return {"spec": Path(spec), **options}


PLUGINS_OFF = "PYDANTIC_DISABLE_PLUGINS"
"""pydantic 2.13's switch for its plugins (pydantic/plugin/_loader.py::get_plugins): with it
unset, building the first model validator reads the entry points of every installed
distribution (3.9 ms of `memplan estimate`'s start on the 2-core machine, 157 distributions;
importlib.metadata itself is imported either way, by pydantic/plugin/_loader.py). The CLI's
models (the spec, the --json documents) are its own, for no plugin to observe: `main` turns
plugins off for them as typer 0.29 does for its option adapters (typer/_adapters.py::
disabled_pydantic_plugins), unless the user set the variable (an empty value,
`PYDANTIC_DISABLE_PLUGINS=`, keeps every plugin on)."""


def _command() -> None:
    options = estimate_options(sys.argv[1:], os.environ)
    if options is None:
        from memplan.cli import app

        app.app()
        return
    from memplan.cli import run

    try:
        run.estimate(**options)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # as typer/core.py::_main: Exit(130)
    except BrokenPipeError:
        # as typer/core.py::_main: stdout's reader has gone; exit 1 without the interpreter's
        # "Exception ignored" line when it flushes stdout (Python's docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    raise SystemExit(0)  # as typer's main ends a command (ctx.exit())


def main() -> None:
    # One command, then exit: the cyclic garbage collector's passes over the objects that
    # importing typer, pydantic and memplan creates cost `memplan estimate` 10-20 ms of CPU
    # (benchmarks/results/estimate-speed.json), and a run leaves little cyclic garbage:
    # `plan` on configs/plan-llama-3.1-405b.yaml peaks at the same RSS with it off (180.0 vs
    # 178.5 MB, output identical). The commands that run torch (verify, profile) turn it back
    # on first (`verify` measures memory that cyclic garbage would hold), and so does
    # memplan.verify.trace.traced_profiles before it traces a model with torch.
    gc.disable()
    if PLUGINS_OFF in os.environ:
        _command()
        return
    os.environ[PLUGINS_OFF] = "1"
    try:
        _command()
    finally:
        del os.environ[PLUGINS_OFF]
