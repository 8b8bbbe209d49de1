"""The step timeline of `memplan estimate`: one bar per phase, stacked by category, in the
terminal (`timeline_view`) or as a chart file (`save_plot`, --plot)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.text import Text

from memplan.cli.render import human
from memplan.errors import MemplanError
from memplan.report.result import Report
from memplan.step.timeline import Timeline

GIB = 2**30

# One character and colour per category of the timeline bars.
BAR_STYLE = {
    "parameters": ("█", "blue"),
    "gradients": ("█", "magenta"),
    "optimizer_states": ("█", "yellow"),
    "buffers": ("█", "cyan"),
    "activations": ("█", "green"),
    "transient": ("▓", "red"),
}
BAR_WIDTH = 48


def timeline_view(
    report: Report, *, width: int = BAR_WIDTH, columns: int | None = None
) -> RenderableType:
    """One bar per phase of the step, stacked by category, the GPU's capacity marked. With
    `columns` (the console's width), the bars narrow so that no line wraps."""
    tl = report.timeline
    cap = report.capacity_bytes
    label_width = max(len(p.label) for p in tl.points)
    if columns is not None:
        tail = max(len(f" {human(p.total_bytes)} <- peak") for p in tl.points)
        width = max(8, min(width, columns - label_width - 1 - tail))
    top = max([p.total_bytes for p in tl.points] + ([cap] if cap else []))
    scale = max(top / width, 1.0)
    mark = None if not cap else min(width - 1, int(cap / scale))
    items = [
        Text.assemble((char, style), f" {name.replace('_', ' ')}")
        for name, (char, style) in BAR_STYLE.items()
    ]
    if mark is not None:
        items.append(Text.assemble(("│", "dim"), f" GPU memory ({human(cap or 0)})"))
    return Group(
        Text("Step timeline", style="bold"),
        _bars(tl, width=width, label_width=label_width, scale=scale, mark=mark),
        _packed(items, columns),
        # One fact a line: a long line wraps at a word bound, never inside a figure.
        *(Text(f, overflow="fold") for f in _facts(report)),
    )


def _bars(tl: Timeline, *, width: int, label_width: int, scale: float, mark: int | None) -> Text:
    """A line per phase: its label, its bar (`scale` bytes a cell, the capacity marked at cell
    `mark`) and its total."""
    lines = Text()
    for p in tl.points:
        cells: list[tuple[str, str]] = []
        done = 0
        for category, n in p.by_category:
            end = done + n
            count = round(end / scale) - round(done / scale)
            char, style = BAR_STYLE[category]
            cells += [(char, style)] * count
            done = end
        cells += [(" ", "")] * (width - len(cells))
        if mark is not None:
            char = "┃" if cells[mark][0] != " " else "│"
            cells[mark] = (char, "bold red" if cells[mark][0] != " " else "dim")
        lines.append(f"{p.label:<{label_width}} ")
        for char, style in cells[: max(width, len(cells))]:
            lines.append(char, style=style)
        star = " <- peak" if p is tl.peak else ""
        lines.append(f" {human(p.total_bytes)}{star}\n", style="bold" if star else "")
    return lines


def _facts(report: Report) -> list[str]:
    """The peak, the allocator's likely reserve, the CUDA context and the memory left (with a
    replay, the device table below says the last three)."""
    tl = report.timeline
    facts = [f"peak {human(tl.peak_bytes)} {tl.peak.label}"]
    if report.allocator is not None:
        return facts
    if tl.reserved_bytes is not None:
        facts.append(f"torch.cuda.memory_reserved() likely >= {human(tl.reserved_bytes)}")
    if tl.cuda_context_bytes:
        facts.append(f"CUDA context ~{human(tl.cuda_context_bytes)} (assumed)")
    if tl.usable_bytes is not None:
        facts.append(f"usable memory left {human(tl.usable_bytes)}")
    return facts


class TimelineFit:
    """The timeline drawn to the console's width (known only when it renders)."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> Iterator[RenderableType]:
        yield timeline_view(self.report, columns=options.max_width)


def _packed(items: list[Text], columns: int | None) -> Text:
    """Legend entries two spaces apart, a line break only between entries."""
    out = Text("  ")
    used = 2
    for item in items:
        if used > 2:
            if columns is not None and used + 2 + len(item) > columns:
                out.append("\n  ")
                used = 2
            else:
                out.append("  ")
                used += 2
        out.append_text(item)
        used += len(item)
    return out


def plot_title(report: Report) -> str:
    """The plot's title: model, engine and ZeRO stage, degrees, and the peak."""
    p = report.layout
    degrees = " ".join(f"{name}={n}" for name, n in report.degrees if n > 1 or name == "dp")
    return (
        f"{report.model.name} ({report.model.num_parameters:,} parameters), {report.recipe.name}\n"
        f"{p.engine} ZeRO-{p.stage}, {degrees}: one training step, peak "
        f"{human(report.peak_bytes)}"
    )


# Bar colours of the chart, per category.
PLOT_COLOURS = {
    "parameters": "#4c72b0",
    "gradients": "#c44e52",
    "optimizer_states": "#dd8452",
    "buffers": "#8172b3",
    "activations": "#55a868",
    "transient": "#937860",
}


def save_plot(report: Report, path: str) -> None:
    """The timeline as a stacked bar chart (PNG or SVG by the file's suffix). matplotlib is an
    optional extra (`pip install memplan[plot]`), imported only here."""
    import importlib

    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as err:
        raise MemplanError(
            "--plot needs matplotlib: pip install 'memplan[plot]' (or pip install matplotlib)."
        ) from err
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    tl = report.timeline
    labels = [p.label for p in tl.points]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(tl.points)
    for category, colour in PLOT_COLOURS.items():
        values = [p.of(category) / GIB for p in tl.points]  # type: ignore[arg-type]
        ax.bar(labels, values, bottom=bottom, label=category.replace("_", " "), color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if report.capacity_bytes:
        ax.axhline(report.capacity_bytes / GIB, color="red", linestyle="--", label="GPU memory")
    ax.set_ylabel("GiB")
    ax.set_title(plot_title(report), fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
