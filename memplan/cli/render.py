"""Turning reports into rich tables. The only place that converts bytes to KiB/MiB/GiB."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.activations import Activations
from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, fold_name
from memplan.model.sources import counts
from memplan.plan.search import PlanResult
from memplan.precision import dtype_bytes
from memplan.report.estimate import VERDICT_TEXT, Report, Verdict
from memplan.states.engines import RankStates, Term
from memplan.versions import rules_note

# Binary units (IEC): GPU memory is sized in powers of two. Decimal GB only on request.
UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def human(n_bytes: int) -> str:
    """1,610,612,736 -> '1.50 GiB' (binary units, labelled as such)."""
    for unit, size in UNITS:
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:,.2f} {unit}"
    return f"{n_bytes:,} B"


def _share(n_bytes: int, capacity: int | None) -> str:
    return "" if not capacity else f"{100 * n_bytes / capacity:.1f}%"


def _rows(terms: Iterable[Term]) -> list[Term]:
    order = {"parameters": 0, "gradients": 1, "optimizer_states": 2, "buffers": 3}
    return sorted(terms, key=lambda t: order[t.category])


def estimate_table(report: Report, *, explain: bool = False) -> Table:
    cap = report.capacity_bytes
    gpu = report.per_gpu
    first, count = gpu.ranks[0], len(report.ranks)
    who = "every rank" if count == 1 else f"rank {first}, the most loaded"
    per = "GPU" if report.placement.device == "cuda" else "process (CPU)"
    table = Table(title=f"Memory per {per} ({who})", box=box.SIMPLE_HEAVY, title_justify="left")
    # Figures never wrap: at 80 columns a long label folds instead.
    table.add_column("category", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    if cap:
        share = "of GPU" if report.placement.device == "cuda" else "of mem"
        table.add_column(share, justify="right", no_wrap=True)

    refs = 0

    def add(label: str, dtype: str, n_bytes: int, *, style: str = "", note: str = "") -> None:
        nonlocal refs
        if explain and note:
            refs += 1
            label = f"{label} [{refs}]"
        cells = [label, dtype, f"{n_bytes:,}", human(n_bytes)]
        if cap:
            cells.append(_share(n_bytes, cap))
        table.add_row(*cells, style=style)

    last_category = None
    for term in _rows((*gpu.terms, *report.buffers)):
        if term.category == "optimizer_states" and last_category != "optimizer_states":
            add("optimizer states", "", gpu.bytes_of("optimizer_states"), style="bold")
        label = f"  {term.name}" if term.category == "optimizer_states" else term.name
        add(label, term.dtype, term.bytes, note=f"{term.formula}  [{term.source}]")
        last_category = term.category
    saved = report.activations
    if saved.modelled:
        add("activations", report.recipe.compute, report.activations_bytes, note="blocks")
    else:
        add("activations (not modelled)", "", 0, style="dim")
    peak = report.timeline.peak
    alive = report.timeline.transient_at(peak.phase)
    add("transient at the peak", "", report.transient_bytes, note="terms" if alive else "")
    table.add_section()
    add(f"peak ({peak.label})", "", report.peak_bytes, style="bold")
    table.caption = "peak: the step's highest phase (timeline below), not the sum of the rows"
    table.caption_justify = "left"
    return table


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
    top = max([p.total_bytes for p in tl.points] + ([cap] if cap else []))
    lines = Text()
    label_width = max(len(p.label) for p in tl.points)
    if columns is not None:
        tail = max(len(f" {human(p.total_bytes)} <- peak") for p in tl.points)
        width = max(8, min(width, columns - label_width - 1 - tail))
    scale = max(top / width, 1.0)
    mark = None if not cap else min(width - 1, int(cap / scale))
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
    items = [
        Text.assemble((char, style), f" {name.replace('_', ' ')}")
        for name, (char, style) in BAR_STYLE.items()
    ]
    if mark is not None:
        items.append(Text.assemble(("│", "dim"), f" GPU memory ({human(cap or 0)})"))
    parts: list[RenderableType] = [
        Text("Step timeline", style="bold"),
        lines,
        _packed(items, columns),
    ]
    facts = [f"peak {human(tl.peak_bytes)} {tl.peak.label}"]
    if tl.reserved_bytes is not None:
        facts.append(f"torch.cuda.memory_reserved() likely >= {human(tl.reserved_bytes)}")
    if tl.cuda_context_bytes:
        facts.append(f"CUDA context ~{human(tl.cuda_context_bytes)} (assumed)")
    if tl.usable_bytes is not None:
        facts.append(f"usable memory left {human(tl.usable_bytes)}")
    # One fact a line: a long line wraps at a word bound, never inside a figure.
    parts.extend(Text(f, overflow="fold") for f in facts)
    return Group(*parts)


class _TimelineFit:
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
    p = report.placement
    degrees = " ".join(f"{name}={n}" for name, n in report.degrees if n > 1 or name == "dp")
    return (
        f"{report.model.name} ({report.model.num_parameters:,} parameters), {report.recipe.name}\n"
        f"{p.engine} ZeRO-{p.stage}, {degrees}: one training step, peak "
        f"{human(report.peak_bytes)}"
    )


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
    colours = {
        "parameters": "#4c72b0",
        "gradients": "#c44e52",
        "optimizer_states": "#dd8452",
        "buffers": "#8172b3",
        "activations": "#55a868",
        "transient": "#937860",
    }
    for category, colour in colours.items():
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


def explanations(report: Report) -> Text:
    """The formula and source of each model-state row, numbered as in the table."""
    terms = _rows((*report.per_gpu.terms, *report.buffers))
    lines = [f"[{i}] {t.name}: {t.formula}\n    source: {t.source}" for i, t in enumerate(terms, 1)]
    i = len(terms)
    saved = report.activations
    if saved.modelled:
        i += 1
        lines.append(f"[{i}] activations: " + _blocks_formula(saved))
    alive = report.timeline.transient_at(report.timeline.peak.phase)
    if alive:
        i += 1
        total = " + ".join(f"{t.bytes:,}" for t in alive)
        lines.append(f"[{i}] transient at {report.timeline.peak.label}: {total} B")
        lines += [f"    {t.name} = {t.formula}\n      source: {t.source}" for t in alive]
    return Text("\n".join(lines), style="dim")


def _blocks_formula(saved: Activations) -> str:
    """What autograd saves, block by block: count x (each tensor), and the rules' sources
    (memplan.activations: each Saved names the kernel or modeling file that saves it)."""
    on_gpu = [b for b in saved.blocks if not b.on_host]
    out = [" + ".join(f"{b.count} x {b.bytes_each:,} ({b.name})" for b in on_gpu)]
    out[0] += f" = {saved.bytes:,} B"
    for b in on_gpu:
        parts = ", ".join(f"{t.name} [{','.join(map(str, t.shape))}] {t.dtype}" for t in b.tensors)
        out.append(f"    {b.name} x{b.count}: {parts}")
        for src in dict.fromkeys(t.source for t in b.tensors):
            out.append(f"      source: {src}")
    return "\n".join(out)


def stages_table(report: Report) -> Table:
    """One row per pipeline stage; the most-loaded stage is marked."""
    table = Table(title="Pipeline stages", box=box.SIMPLE, title_justify="left")
    columns = ("stage", "layers", "parameters held", "model states", "activations", "peak", "")
    for name in columns:
        table.add_column(name, justify="left" if name in ("stage", "layers", "") else "right")
    for st, peaks in zip(report.stages, report.stage_peaks, strict=True):
        layers = f"{st.layers[0]}-{st.layers[-1]}" if st.layers else "-"
        if st.layers and len(st.layers) != st.layers[-1] - st.layers[0] + 1:
            layers = ", ".join(map(str, st.layers))
        mark = "most loaded" if st.stage == report.stage else ""
        acts, peak = (human(peaks[0]), human(peaks[1])) if peaks else ("-", "-")
        table.add_row(
            str(st.stage),
            layers,
            f"{st.num_parameters:,}",
            human(st.model_state_bytes),
            acts,
            peak,
            mark,
        )
    return table


def host_table(report: Report) -> Table:
    """What one rank keeps in host memory, and the node total."""
    table = Table(title="Host memory", box=box.SIMPLE, title_justify="left")
    for name in ("what", "dtype", "bytes", "size"):
        table.add_column(name, justify="right" if name in ("bytes", "size") else "left")
    for t in report.per_gpu.host_terms:
        table.add_row(t.name, t.dtype, f"{t.bytes:,}", human(t.bytes))
    offloaded = report.activations.host_bytes
    if offloaded:
        table.add_row("offloaded activations", "", f"{offloaded:,}", human(offloaded))
    table.add_section()
    table.add_row("per rank", "", f"{report.host_bytes:,}", human(report.host_bytes))
    node = report.host_bytes_per_node
    n = report.ranks_per_node
    table.add_row(f"per node ({n} rank{'s' * (n > 1)})", "", f"{node:,}", human(node))
    cap = report.host_capacity_bytes
    if cap is not None:
        verdict = "fits" if node <= cap else "does NOT fit"
        table.caption = f"{verdict} the node's {human(cap)} of host memory"
        table.caption_style = "green" if node <= cap else "bold red"
    return table


def ranks_table(report: Report) -> Table:
    table = Table(title="Every rank", box=box.SIMPLE, title_justify="left")
    # TP ranks differ only where torch's DTensor gives the last ones fewer vocabulary rows.
    tensor = any(r.tensor_ranks for r in report.ranks)
    names = ("ranks", "TP ranks") if tensor else ("ranks",)
    for name in (*names, "parameters", "gradients", "optimizer states", "total"):
        table.add_column(name, justify="left" if name in names else "right")
    for states in report.ranks:
        table.add_row(
            _rank_label(states),
            *([_label(states.tensor_ranks)] if tensor else []),
            *(human(states.bytes_of(c)) for c in ("parameters", "gradients", "optimizer_states")),
            human(states.total_bytes),
        )
    return table


def _rank_label(states: RankStates) -> str:
    return _label(states.ranks)


def _label(r: tuple[int, ...]) -> str:
    return str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}"


def _dtypes(report: Report, category: str) -> list[str]:
    """The dtypes the rank's rows of `category` are stored in, in row order."""
    rows = (*report.per_gpu.terms, *report.per_gpu.host_terms)
    return list(dict.fromkeys(t.dtype for t in rows if t.category == category and t.dtype))


def _stored(report: Report) -> str:
    """The recipe, described by what the table shows is stored: the recipe's own words when
    parameters and gradients are in its dtypes, else the stored dtypes (FSDP2 keeps the fp32
    masters as its sharded parameters; QLoRA packs 4-bit weights in uint8)."""
    r = report.recipe
    params, grads = _dtypes(report, "parameters"), _dtypes(report, "gradients")
    if params in ([], [r.parameters]) and grads in ([], [r.gradients]):
        return f"{r.name} ({r.description})"
    why = []
    if report.placement.engine == "fsdp2" and r.master_weights in params:
        why.append(f"FSDP2 shards the {r.master_weights} masters")
    if "uint8" in params:
        why.append("QLoRA's 4-bit weights packed two to a uint8")
    m = report.model
    if m.num_stored_tensors > m.num_parameter_tensors and grads:
        why.append(f"LoRA adapters in {grads[0]}")
    said = f" ({'; '.join(why)})" if why else ""
    grad = f", gradients {' + '.join(grads)}" if grads else ""
    return f"{r.name}: parameters stored {' + '.join(params)}{grad}{said}, compute {r.compute}"


def _held(report: Report) -> str:
    """What the job holds, when it differs from the model's own tensors."""
    m = report.model
    if (m.num_stored_elements, m.num_stored_tensors) == (
        m.num_parameters,
        m.num_parameter_tensors,
    ):
        return ""
    return f" (held as {m.num_stored_elements:,} elements in {m.num_stored_tensors:,} tensors)"


def estimate_view(
    report: Report, *, show_ranks: bool = False, explain: bool = False
) -> RenderableType:
    model = report.model
    p = report.placement
    head = Text.assemble(
        (model.name, "bold"),
        f"  {model.num_parameters:,} parameters in {model.num_parameter_tensors:,} tensors",
        _held(report),
        "\n",
        f"{_stored(report)}, {report.optimizer.name}, "
        f"{p.engine} ZeRO-{p.stage} over {p.data} data-parallel rank{'s' * (p.data > 1)}",
    )
    parts: list[RenderableType] = [head, estimate_table(report, explain=explain)]
    if explain:
        parts.append(explanations(report))
    if show_ranks and len(report.ranks) > 1:
        parts.append(ranks_table(report))
    if len(report.stages) > 1:
        parts.append(stages_table(report))
    if report.host_bytes:
        parts.append(host_table(report))
    parts.append(_TimelineFit(report))
    v = report.verdict
    if v is not None:
        parts.append(verdict_line(report, v))
    parts.extend(Text(f"note: {n}", style="yellow") for n in report.notes)
    parts.append(Text(f"note: {rules_note(report.rules_transformers)}", style="dim"))
    return Group(*parts)


def verdict_line(report: Report, v: Verdict) -> Text:
    """The verdict (memplan.report.estimate.verdict) on the usable memory the timeline prints."""
    usable = report.usable_bytes or 0
    device = "the GPU" if report.placement.device == "cuda" else "the memory"
    where = f"{report.gpu or device} ({human(report.capacity_bytes or 0)})"
    left = f"{human(usable)} usable left" if usable >= 0 else f"{human(-usable)} over"
    text = f"{VERDICT_TEXT[v]} {where}: {left}"
    if v == "model_states_fit_activations_unknown":
        text += " before activations (not modelled)"
    style = {"fits": "green", "model_states_fit_activations_unknown": "yellow"}.get(v, "bold red")
    return Text(text, style=style)


def inventory_table(inventory: Inventory, param_dtype: str) -> RenderableType:
    """Tensors by name with layers folded: `model.layers.*.mlp.up_proj.weight  x32`."""
    folded: dict[tuple[str, tuple[int, ...], str, str], int] = {}
    for t in (*inventory.parameters, *inventory.buffers):
        key = (fold_name(t.name), t.shape, t.kind, t.dtype or param_dtype)
        folded[key] = folded.get(key, 0) + 1
    table = Table(title=f"Tensors of {inventory.name}", box=box.SIMPLE, title_justify="left")
    for col in ("name", "kind", "shape", "dtype", "count", "numel", "bytes"):
        table.add_column(col, justify="right" if col in ("count", "numel", "bytes") else "left")
    for (name, shape, kind, dtype), count in folded.items():
        numel = 1
        for d in shape:
            numel *= d
        table.add_row(
            name,
            kind,
            str(list(shape)),
            dtype,
            f"x{count}",
            f"{numel * count:,}",
            human(numel * count * dtype_bytes(dtype)),
        )
    return Group(table, inventory_summary(inventory))


def inventory_summary(inventory: Inventory) -> Text:
    """Totals, non-embedding and active counts, the largest tensor and layer, and the notes."""
    params = inventory.parameters
    total = inventory.num_parameters
    lines = [
        f"parameters: {total:,} in {len(params):,} tensors"
        + (f" (tied: {', '.join(a for a, _ in inventory.tied)})" if inventory.tied else ""),
        f"non-embedding parameters: {counts.non_embedding_parameters(inventory):,} "
        "(without token/position embeddings and the LM head)",
    ]
    active = counts.active_parameters(inventory)
    arch = inventory.architecture
    if counts.routed_expert_parameters(inventory) and active is not None and arch is not None:
        bare = counts.active_parameters(inventory, embeddings=False) or 0
        lines += [
            f"active parameters per token: {active:,} with embeddings and head, {bare:,} "
            f"without (top_k={arch.num_experts_per_token} of {arch.num_experts} experts)",
            f"  {counts.ACTIVE_DEFINITION}",
        ]
    elif active is not None:
        lines.append("active parameters per token: all of them (no routed experts)")
    else:
        lines.append(
            "active parameters per token: unknown (needs the tensors and, for experts, "
            "top_k and num_experts from config.json)"
        )
    big = counts.largest_tensor(inventory)
    if big is not None:
        lines.append(f"largest tensor: {big.name} {list(big.shape)} ({big.numel:,})")
    layer = counts.largest_layer(inventory)
    if layer is not None:
        lines.append(f"largest layer: {layer[0]} ({layer[1]:,} parameters)")
    if inventory.buffers:
        lines.append(
            f"buffers: {len(inventory.buffers)} tensors, "
            f"{sum(b.numel for b in inventory.buffers):,} elements"
        )
    lines.extend(f"note: {n}" for n in inventory.notes)
    return Text("\n".join(lines))


def console(width: int | None = None) -> Console:
    return Console(width=width, highlight=False, soft_wrap=False)


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
        table = Table(box=box.SIMPLE_HEAVY)
        for name in (
            "#",
            "dp",
            "tp",
            "pp",
            "vp",
            "cp",
            "ep",
            "engine",
            "zero",
            "mbs",
            "ga",
            "recompute",
            "offload",
            "peak/GPU",
            "headroom",
            "step",
            "tokens/s",
        ):
            table.add_column(
                name, justify="left" if name in ("engine", "recompute", "offload") else "right"
            )
        for i, c in enumerate(result.layouts[: result.top], 1):
            table.add_row(
                str(i),
                str(c.data),
                str(c.tensor),
                str(c.pipeline),
                str(c.virtual_stages),
                str(c.context),
                str(c.expert),
                c.engine,
                str(c.zero_stage),
                str(c.micro_batch_size),
                str(c.gradient_accumulation_steps),
                c.recompute,
                c.offload,
                human(c.peak_bytes),
                human(c.headroom_bytes),
                _seconds(c.time.total_s),
                f"{c.tokens_per_s:,.0f}",
            )
        parts.append(table)
        best = result.layouts[0].time
        parts.append(
            Text(
                f"best step: compute {_seconds(best.compute_s)}, bubble {_seconds(best.bubble_s)}, "
                f"TP {_seconds(best.tensor_s)}, PP {_seconds(best.pipeline_s)}, DP "
                f"{_seconds(best.data_s)}, EP {_seconds(best.expert_s)}, CP "
                f"{_seconds(best.context_s)}, offload {_seconds(best.offload_s)} "
                "(memplan.plan.steptime: a ranking model, not a promise)",
                style="dim",
            )
        )
    else:
        parts.append(Text(result.suggestion, style="bold red"))
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
