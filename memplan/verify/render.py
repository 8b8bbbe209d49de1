"""Verify tables (stdout) and the progress bar (stderr). No torch here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from memplan.cli.render import human
from memplan.verify.job import Event
from memplan.verify.result import RankResult, Row, VerifyResult


def _status(row: Row) -> Text:
    if row.ok is None:
        if row.predicted is None:
            return Text("not modelled", style="dim")
        if not row.enforced:
            return Text("not checked", style="dim")
        return Text("not measured", style="dim")
    if row.ok:
        return Text("ok", style="green")
    return Text("MISS", style="bold red")


def _cell(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def rank_table(rank: RankResult, title: str) -> Table:
    """Bytes per category: predicted, measured, delta, ratio and the verdict."""
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("category (bytes)", no_wrap=True)
    for name in ("predicted", "measured", "delta", "ratio"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for row in rank.rows:
        label = f"  {row.name}" if row.state else row.name.replace("_", " ")
        ratio = "—" if row.ratio is None else f"{row.ratio:.4f}"
        style = "bold" if row.name in ("optimizer_states", "peak") else ""
        if row.name == "activations":
            table.add_section()
        table.add_row(
            label,
            _cell(row.predicted),
            _cell(row.measured),
            _cell(row.delta),
            ratio,
            _status(row),
            style=style,
        )
    return table


def ranks_summary(result: VerifyResult) -> Table:
    table = Table(title="Every rank", box=box.SIMPLE, title_justify="left")
    table.add_column("rank")
    for name in ("parameters", "gradients", "optimizer states", "measured total"):
        table.add_column(name, justify="right")
    table.add_column("")
    for rank in result.ranks:
        cells = []
        total = 0
        for category in ("parameters", "gradients", "optimizer_states"):
            row = rank.row(category)
            total += row.measured or 0
            mark = "" if row.ok else " ✗"
            cells.append(f"{_cell(row.measured)}{mark}")
        ok = Text("ok", style="green") if rank.ok else Text("MISS", style="bold red")
        table.add_row(str(rank.rank), *cells, f"{total:,}", ok)
    return table


def phases_table(result: VerifyResult) -> Table:
    table = Table(title="CUDA allocator, last step", box=box.SIMPLE, title_justify="left")
    for name in ("phase", "allocated", "max allocated", "reserved"):
        table.add_column(name, justify="left" if name == "phase" else "right")
    for p in result.phases:
        table.add_row(p.name, human(p.allocated), human(p.max_allocated), human(p.reserved))
    return table


def full_depth_table(result: VerifyResult) -> Table:
    s = result.setup
    table = Table(
        title=f"Full depth ({s['full_layers']} layers) from the {s['layers']}-layer run",
        box=box.SIMPLE,
        title_justify="left",
    )
    for name in ("category", "predicted B", "extrapolated B", "delta B"):
        table.add_column(name, justify="left" if name == "category" else "right")
    for row in result.full_depth:
        table.add_row(
            row.name.replace("_", " "), _cell(row.predicted), _cell(row.measured), _cell(row.delta)
        )
    return table


def _step_line(s: dict[str, Any]) -> str:
    """The step that was built: attention, checkpointing, dropout, key/value cache."""
    if "attention" not in s:
        return ""
    checkpointing = str(s["activation_checkpointing"])
    if s.get("activation_offload"):
        checkpointing += " (offloaded)"
    dropout = {True: "forced on", False: "forced off", None: "as the config"}[s["dropout"]]
    cache = "on" if s["use_cache"] else "off"
    line = (
        f"attention {s['attention']}, activation checkpointing {checkpointing}, dropout "
        f"{dropout}, key/value cache {cache}"
    )
    if s.get("activations_profile"):
        line += f"\nactivations from profile {s['activations_profile']} ("
        line += f"{s.get('activations_profile_origin') or 'stored'})"
    return line


def verify_view(result: VerifyResult) -> RenderableType:
    s = result.setup
    mode = "fake tensors" if s["fake"] else s["device"]
    head = Text.assemble(
        (str(s["model"]), "bold"),
        f"  {s['num_parameters']:,} parameters, {s['layers']} of {s['full_layers']} layers built\n",
        f"{s['precision']}, {s['optimizer']} ({s['optimizer_implementation']}), "
        f"{s['engine']} ZeRO-{s['zero_stage']} on {s['ranks']} rank{'s' * (s['ranks'] > 1)} "
        f"({mode}); batch {s['micro_batch_size']} x {s['sequence_length']} tokens, "
        f"{s['steps']} steps, torch {s['torch']}, transformers {s['transformers']}\n",
        _step_line(s),
    )
    many = len(result.ranks) > 1
    who = f"rank {result.most_loaded}, the most loaded" if many else "one process"
    parts: list[RenderableType] = [
        head,
        rank_table(result.headline, f"Predicted vs measured ({who})"),
    ]
    if many:
        parts.append(ranks_summary(result))
    if result.phases:
        parts.append(phases_table(result))
    if result.full_depth:
        parts.append(full_depth_table(result))
    for failure in result.failures():
        parts.append(Text(f"out of tolerance: {failure}", style="bold red"))
    parts.extend(Text(f"note: {n}", style="yellow") for n in result.notes)
    verdict = "verified" if result.ok else "NOT verified"
    parts.append(Text(verdict, style="bold green" if result.ok else "bold red"))
    return Group(*parts)


@contextmanager
def progress_bar(ranks: int, steps: int, *, enabled: bool = True) -> Iterator[Event]:
    """A rich progress bar on stderr over build / steps / ranks; yields the event callback."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
    )
    tasks = {
        "build": progress.add_task("build", total=ranks),
        "step": progress.add_task("steps", total=ranks * steps),
        "done": progress.add_task("ranks", total=ranks),
    }

    def on_event(_rank: int, what: str) -> None:
        task = tasks.get(what)
        if task is not None:
            progress.advance(task)

    with progress:
        yield on_event
