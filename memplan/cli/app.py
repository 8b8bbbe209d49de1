"""The `memplan` command's typer app: parse, call the calculator, render. Nothing else lives
here. `main` (memplan.cli.entry, the console script) runs a plain `memplan estimate` without
this module (memplan.cli.run.estimate, which this module's `estimate` calls too)."""

from __future__ import annotations

import gc
import os
import sys
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from memplan import __version__
from memplan.cli import run
from memplan.cli.entry import main
from memplan.errors import MemplanError

app = typer.Typer(
    name="memplan",
    help="How much memory will this training job need, per GPU and per host, and which "
    "layout fits?",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog="Example: memplan estimate configs/llama-3-8b.yaml --explain",
)

SpecArg = Annotated[Path, typer.Argument(help="A memplan spec (YAML).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON (stable keys).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
WidthOpt = Annotated[int | None, typer.Option("--width", help="Table width in columns.")]
TraceOpt = Annotated[
    bool,
    typer.Option(
        "--trace/--no-trace",
        help="When the model has no activation rule and no stored profile serves the spec, "
        "trace one with torch and transformers (if installed) and cache it.",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """memplan: exact memory accounting for training jobs."""


@app.command()
def estimate(
    spec: SpecArg,
    as_json: JsonOpt = False,
    ranks: Annotated[bool, typer.Option("--ranks", help="Also show every rank's bytes.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Save the step timeline as a .png or .svg chart.")
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show each row's formula and source.")
    ] = False,
    width: WidthOpt = None,
    trace: TraceOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Memory per GPU for one training step, tensor by tensor.

    Example: memplan estimate configs/llama-3-8b.yaml --ranks
    """
    run.estimate(
        spec,
        as_json=as_json,
        ranks=ranks,
        plot=plot,
        explain=explain,
        width=width,
        trace=trace,
        debug=debug,
    )


@app.command()
def inventory(
    spec: SpecArg,
    as_json: JsonOpt = False,
    width: WidthOpt = None,
    debug: DebugOpt = False,
) -> None:
    """The model's tensors: name, shape, dtype, numel and bytes, layers folded.

    Example: memplan inventory configs/mixtral-8x7b.yaml
    """
    from memplan.config import load
    from memplan.model import load as model_load
    from memplan.model.sources import Inventory
    from memplan.verify.trace import fallback_inventory

    def work() -> tuple[Inventory, str]:
        loaded = load.load_spec(spec)
        return model_load.load_inventory(
            loaded, unsupported=fallback_inventory
        ), loaded.spec.recipe().parameters

    inv, dtype = run.run(debug, work)
    if as_json:
        from memplan.report.json import inventory_json

        run.print_json(inventory_json(inv, dtype))
        return
    from memplan.cli import render
    from memplan.cli.inventory_view import inventory_table

    render.console(width).print(inventory_table(inv, dtype))


@app.command()
def verify(
    spec: SpecArg,
    device: Annotated[
        str, typer.Option("--device", help="Run on cpu or cuda.", case_sensitive=False)
    ] = "cpu",
    nproc: Annotated[
        int | None,
        typer.Option("--nproc", help="Ranks on torch.distributed (default: parallelism.data)."),
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option("--layers", help="Build K decoder layers; extrapolate to full depth."),
    ] = None,
    fake: Annotated[
        bool, typer.Option("--fake", help="FakeTensorMode: no real memory, any model size.")
    ] = False,
    as_json: JsonOpt = False,
    width: WidthOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Build the real model and optimizer, run real steps, and compare every category with
    the prediction (exit 3 when one misses its tolerance). Needs torch and transformers.

    Example: memplan verify configs/gpt2.yaml --fake --layers 2

    Under torchrun (any number of nodes) every process is one rank of the spec's layout and
    rank 0 reports: torchrun --nnodes N --nproc-per-node P -m memplan verify SPEC
    """
    gc.enable()  # main turned it off for start-up; verify measures memory
    if device not in ("cpu", "cuda"):
        typer.echo(f"error: --device must be cpu or cuda, got {device!r}.", err=True)
        raise typer.Exit(2)
    from memplan.config import load
    from memplan.verify import render as vrender
    from memplan.verify import runner, torchrun
    from memplan.verify.job import STEPS, Options

    options = Options(
        device="cuda" if device == "cuda" else "cpu", nproc=nproc, layers=layers, fake=fake
    )
    world = run.run(debug, torchrun.launched)
    if world is not None:
        _verify_torchrun(spec, options, world, as_json, width, debug)
        return

    def work() -> runner.VerifyResult:
        loaded = load.load_spec(spec)
        par = loaded.spec.parallelism
        world = nproc if nproc is not None else par.data * par.tensor
        with vrender.progress_bar(world, STEPS, enabled=not as_json) as on_event:
            with load.locating(loaded):
                return runner.verify(loaded, options, on_event)

    result = run.run(debug, work)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        run.print_json(runner.to_json(result))
    else:
        from memplan.cli import render

        render.console(width).print(vrender.verify_view(result))
    if not result.ok:
        raise typer.Exit(3)


def _verify_torchrun(
    spec: Path, options: Any, world: Any, as_json: bool, width: int | None, debug: bool
) -> None:
    """`verify` as one rank of a torchrun world (memplan.verify.torchrun): rank 0 prints the
    report and the errors every rank agreed on, a rank that failed while running its own
    error; every rank exits with the same code (3 when a category missed)."""
    from memplan.verify import render as vrender
    from memplan.verify import torchrun
    from memplan.verify.job import STEPS

    lead = world.rank == 0
    try:
        with vrender.progress_bar(1, STEPS, enabled=lead and not as_json) as on_event:
            outcome = torchrun.verify(spec, options, world, lambda _rank, what: on_event(0, what))
    except MemplanError as err:
        if debug:
            raise
        if lead or isinstance(err, torchrun.RankFailed):
            typer.echo(f"error: {err}", err=True)
        _end_rank(err.exit_code)
    result = outcome.result
    if lead:
        from memplan.verify import runner

        for warning in result.warnings:
            typer.echo(f"warning: {warning}", err=True)
        if as_json:
            run.print_json(runner.to_json(result))
        else:
            from memplan.cli import render

            render.console(width).print(vrender.verify_view(result))
    _end_rank(0 if outcome.ok else 3)


def _end_rank(code: int) -> NoReturn:
    """End a torchrun rank without the interpreter's finalization, as multiprocessing ends
    the self-spawned ranks (its children leave through os._exit). gloo's worker threads
    (`pt_gloo_runloop`) outlive destroy_process_group (measured: still running after it and
    a gc.collect(), torch 2.13) and may drop the last reference to a tensor of the final
    collective; if that happens while the main thread finalizes, the thread's wait for the
    GIL ends it by forced unwinding and the rank dies of SIGABRT ("terminate called without
    an active exception"): the likely cause, not proved, of the two rank deaths .ci/run saw
    under load (pytorch/pytorch PR #179291 describes the same crash)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def plan(
    spec: SpecArg,
    as_json: JsonOpt = False,
    top: Annotated[int | None, typer.Option("--top", help="Layouts to show.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Override plan.gpus.")] = None,
    emit: Annotated[
        int | None,
        typer.Option(
            "--emit",
            min=1,
            help="Print row N (1 = the fastest) as a spec: `memplan estimate` on it gives the "
            "row's bytes.",
        ),
    ] = None,
    width: WidthOpt = None,
    trace: TraceOpt = True,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            min=1,
            help="Processes to search with (default: every CPU, at most 16; large searches "
            "only, on Linux). The answer is the same with any number.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Search the layouts that fit the GPUs' memory and rank them by estimated step time.

    Example: memplan plan configs/plan-llama-3-8b.yaml --top 5
    """
    import time

    from memplan.config import load
    from memplan.config.plan import PlanSpec
    from memplan.model import load as model_load
    from memplan.plan import search as planner
    from memplan.plan.result import PlanResult
    from memplan.plan.space import recompute_options
    from memplan.verify.trace import fallback_inventory

    started = time.monotonic()
    progress_bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal progress_bar
        if progress_bar is None and time.monotonic() - started > 1.0 and done < total:
            from rich.progress import Progress

            progress_bar = Progress(transient=True, console=render_console(stderr=True))
            progress_bar.start()
            progress_bar.add_task("searching layouts", total=total)
        if progress_bar is not None:
            progress_bar.update(0, completed=done)

    def work() -> PlanResult:
        loaded = load.load_spec(spec)
        settings = loaded.spec.plan or PlanSpec()
        update = {k: v for k, v in (("top", top), ("gpus", gpus)) if v is not None}
        if update:
            settings = settings.model_copy(update=update)
        run_spec = loaded.spec.model_copy(update={"plan": settings})
        searched.append(run_spec)
        try:
            with load.locating(loaded):
                inv = model_load.load_inventory(loaded, unsupported=fallback_inventory)
                if trace:
                    recompute = recompute_options(settings, loaded.spec.model.implementation)
                    inv = run.traced(  # and the TP ranks it tries, for a model without a rule
                        loaded, inv, recompute, said, partial(planner.tensor_slices, run_spec, inv)
                    )
                from memplan.plan.workers import default_workers

                workers = jobs or default_workers()
                return planner.plan(run_spec, inv, progress=progress, workers=workers)
        finally:
            if progress_bar is not None:
                progress_bar.stop()

    said: list[str] = []
    searched: list[Any] = []  # the spec the search ran on (--emit writes its rows)
    result = run.run(debug, work)
    run.say(said)
    if emit is not None:
        run.run(debug, lambda: _emit_row(spec, searched[0], result, emit))
    elif as_json:
        from memplan.plan.json import plan_json

        run.print_json(plan_json(result))
    else:
        from memplan.cli import render
        from memplan.cli.plan_view import plan_view

        render.console(width).print(plan_view(result))
    if not result.layouts:
        raise typer.Exit(3)


def _emit_row(spec: Path, searched: Any, result: Any, n: int) -> None:
    """`plan --emit N`: row N of `result` (a search of the spec `searched`, read from the file
    `spec`) as a YAML spec on stdout."""
    import yaml

    from memplan.cli.render import human
    from memplan.plan.rows import row_document

    if not result.layouts:
        return  # the caller exits 3: nothing fits, nothing to emit
    if n > len(result.layouts):
        raise MemplanError(
            f"only {len(result.layouts):,} layouts fit: give a row from 1 to "
            f"{len(result.layouts):,}.",
            field="--emit",
        )
    row = result.layouts[n - 1]
    doc = row_document(searched, row)
    sys.stdout.write(
        f"# Row {n} of `memplan plan {spec}`: {human(row.peak_bytes)} per GPU at the peak, "
        f"{row.time.total_s:.2f} s per step.\n# `memplan estimate` on this file reproduces "
        "the row's bytes.\n" + yaml.safe_dump(doc, sort_keys=False)
    )


class Document(str, Enum):
    """The commands that print a `--json` report."""

    estimate = "estimate"
    plan = "plan"
    verify = "verify"
    inventory = "inventory"


@app.command()
def profile(
    spec: SpecArg,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the profile here instead of the memplan cache."),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Trace what the spec's model saves for backward (torch FakeTensorMode, two layers of each
    kind) and store it as a profile that estimate and plan use when the family has no rule.

    Example: memplan profile configs/my-model.yaml
    """
    gc.enable()  # main turned it off for start-up; tracing runs torch
    from memplan.config import load
    from memplan.model import load as model_load
    from memplan.model.families import family_of

    def work() -> Path:
        try:
            from memplan.verify.trace import profile as tracer
        except ImportError as err:
            raise MemplanError(
                f"memplan profile needs torch and transformers ({err}): "
                "pip install 'memplan[verify]'."
            ) from None
        loaded = load.load_spec(spec)
        with load.locating(loaded):
            doc, path = tracer.for_spec(loaded)
        target = out or path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(tracer.dumps(doc), encoding="utf-8")
        config = model_load.model_config(loaded)
        if config is not None and family_of(str(config.get("model_type"))) is None:
            # Its inventory beside it, so that estimate needs no torch (memplan.model.stored).
            from memplan.verify.trace import stored

            typer.echo(f"inventory written: {stored.write(config, target.parent)}")
        return target

    written = run.run(debug, work)
    typer.echo(f"profile written: {written}")


@app.command()
def schema(
    command: Annotated[
        Document,
        typer.Argument(help="The command whose --json report to describe.", show_default=False),
    ],
) -> None:
    """Print the JSON Schema (draft 2020-12) of a command's --json report.

    Example: memplan schema estimate > estimate.schema.json
    """
    from memplan.report.schema import json_schema

    run.print_json(json_schema(command.value))


def render_console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


if __name__ == "__main__":
    main()
