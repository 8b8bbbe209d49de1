"""`memplan plan`: the layouts that fit, fastest first, and what the search pruned."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.cli.render import human
from memplan.plan.result import Candidate, PlanResult
from memplan.plan.steptime import StepTime

# Column -> what it shows of a layout; the text columns are left-aligned.
COLUMNS = (
    "#", "layout", "engine", "mbs x ga", "recompute", "offload", "peak/GPU", "headroom", "step",
    "tokens/s",
)  # fmt: skip
TEXT_COLUMNS = ("layout", "engine", "recompute", "offload")


def layout_text(c: Candidate) -> str:
    """The degrees and what goes with them: `dp2 tp4+sp pp8 1f1b cp2 ep1`, `pp4x2 interleaved`
    (pipeline ranks x model chunks per rank); degrees of 1 left out but dp."""
    parts = [f"dp{c.data}"]
    if c.tensor > 1:
        parts.append(f"tp{c.tensor}" + ("+sp" if c.sequence_parallel else ""))
    if c.pipeline > 1:
        chunks = f"x{c.virtual_stages}" if c.virtual_stages > 1 else ""
        parts.append(f"pp{c.pipeline}{chunks} {c.schedule}")
    if c.context > 1:
        parts.append(f"cp{c.context}")
    if c.expert > 1:
        parts.append(f"ep{c.expert}")
    return " ".join(parts)


def shared_assumptions(layouts: tuple[Candidate, ...]) -> str:
    """What every shown row assumes alike (also each row's JSON keys and its --emit spec)."""
    if not layouts:
        return ""
    first = layouts[0]
    said = [f"model code {first.implementation}"]
    if len({c.compile for c in layouts}) == 1:
        said.append("compiled" if first.compile else "eager")
    wraps = {c.fsdp_wrap for c in layouts if c.fsdp_wrap}
    if len(wraps) == 1:
        said.append(f"FSDP2 wrapping {wraps.pop()}")
    return "every row: " + ", ".join(said) + " (--emit N writes row N as a spec)"


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def plan_view(result: PlanResult) -> RenderableType:
    """The top layouts, fastest first, and what the search pruned."""
    head = Text.assemble(
        ("Layouts that fit", "bold"),
        f"  {result.gpus} GPUs, global batch {result.global_batch_size} sequences, budget "
        f"{human(result.budget_bytes)} per GPU of {human(result.capacity_bytes)}",
    )
    parts: list[RenderableType] = [head]
    if result.layouts:
        parts.append(layouts_table(result.layouts[: result.top]))
        parts.append(Text(shared_assumptions(result.layouts[: result.top]), style="dim"))
        parts.append(best_step(result.layouts[0].time))
    else:
        parts.append(Text(result.suggestion, style="bold red"))
    parts.extend(Text(f"note: {n}", style="yellow") for n in partial_rows(result))
    parts.extend(Text(f"note: {n}", style="yellow") for n in result.notes)
    fitting = len(result.layouts)
    pruned = ", ".join(f"{n:,} {why}" for why, n in result.pruned.items()) or "none"
    parts.append(
        Text(
            f"{fitting:,} of {result.searched:,} evaluated layouts fit; pruned: {pruned}",
            style="dim",
        )
    )
    return Group(*parts)


def partial_rows(result: PlanResult) -> list[str]:
    """The shown rows whose fit is on a partial figure, by what they leave out."""
    rows: dict[tuple[str, ...], list[str]] = {}
    for i, c in enumerate(result.layouts[: result.top], 1):
        if c.not_modelled:
            rows.setdefault(c.not_modelled, []).append(str(i))
    return [
        f"row{'s' if len(ids) > 1 else ''} {', '.join(ids)} fit before {', '.join(missing)} "
        "(not modelled: `memplan estimate` on the row's spec says more)"
        for missing, ids in rows.items()
    ]


def layouts_table(layouts: tuple[Candidate, ...]) -> Table:
    """One row per layout, numbered from 1; a `compile` column when the rows differ in it
    (else shared_assumptions says it once)."""
    table = Table(box=box.SIMPLE_HEAVY)
    mixed = len({c.compile for c in layouts}) > 1
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in TEXT_COLUMNS else "right")
        if name == "recompute" and mixed:
            table.add_column("compile", justify="left")
    for i, c in enumerate(layouts, 1):
        table.add_row(
            str(i),
            layout_text(c),
            f"{c.engine} z{c.zero_stage}",
            f"{c.micro_batch_size} x {c.gradient_accumulation_steps}",
            c.recompute,
            *(["yes" if c.compile else "no"] if mixed else []),
            c.offload,
            human(c.peak_bytes),
            human(c.headroom_bytes),
            _seconds(c.time.total_s),
            f"{c.tokens_per_s:,.0f}",
        )
    return table


def best_step(best: StepTime) -> Text:
    """The fastest layout's step time by part."""
    return Text(
        f"best step: compute {_seconds(best.compute_s)}, bubble {_seconds(best.bubble_s)}, "
        f"TP {_seconds(best.tensor_s)}, PP {_seconds(best.pipeline_s)}, DP "
        f"{_seconds(best.data_s)}, EP {_seconds(best.expert_s)}, CP "
        f"{_seconds(best.context_s)}, offload {_seconds(best.offload_s)} "
        "(memplan.plan.steptime: a ranking model, not a promise)",
        style="dim",
    )
