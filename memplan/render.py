"""Turning reports into rich tables. The only place that converts bytes to KiB/MiB/GiB."""

from __future__ import annotations

from collections.abc import Iterable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.estimate import Report
from memplan.models.inventory import Inventory, TensorSpec, fold_name
from memplan.precision import dtype_bytes
from memplan.sharding import RankStates, Term

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
    table = Table(title=f"Memory per GPU ({who})", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("category")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    if cap:
        table.add_column("of GPU", justify="right")

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
    add("activations", report.recipe.compute, report.activations_bytes)
    add("transient", "", report.transient_bytes)
    table.add_section()
    add("peak", "", report.peak_bytes, style="bold")
    return table


def explanations(report: Report) -> Text:
    """The formula and source of each model-state row, numbered as in the table."""
    terms = _rows((*report.per_gpu.terms, *report.buffers))
    lines = [f"[{i}] {t.name}: {t.formula}\n    source: {t.source}" for i, t in enumerate(terms, 1)]
    return Text("\n".join(lines), style="dim")


def stages_table(report: Report) -> Table:
    """One row per pipeline stage; the most-loaded stage is marked."""
    table = Table(title="Pipeline stages", box=box.SIMPLE, title_justify="left")
    for name in ("stage", "layers", "parameters held", "model states", ""):
        table.add_column(name, justify="left" if name in ("stage", "layers", "") else "right")
    for st in report.stages:
        layers = f"{st.layers[0]}-{st.layers[-1]}" if st.layers else "-"
        if st.layers and len(st.layers) != st.layers[-1] - st.layers[0] + 1:
            layers = ", ".join(map(str, st.layers))
        mark = "most loaded" if st.stage == report.stage else ""
        table.add_row(
            str(st.stage), layers, f"{st.num_parameters:,}", human(st.model_state_bytes), mark
        )
    return table


def host_table(report: Report) -> Table:
    """What one rank keeps in host memory, and the node total."""
    table = Table(title="Host memory", box=box.SIMPLE, title_justify="left")
    for name in ("what", "dtype", "bytes", "size"):
        table.add_column(name, justify="right" if name in ("bytes", "size") else "left")
    for t in report.per_gpu.host_terms:
        table.add_row(t.name, t.dtype, f"{t.bytes:,}", human(t.bytes))
    table.add_section()
    table.add_row("per rank", "", f"{report.host_bytes:,}", human(report.host_bytes))
    node = report.host_bytes_per_node
    table.add_row(f"per node ({report.gpus_per_node} GPUs)", "", f"{node:,}", human(node))
    cap = report.host_capacity_bytes
    if cap is not None:
        verdict = "fits" if node <= cap else "does NOT fit"
        table.caption = f"{verdict} the node's {human(cap)} of host memory"
        table.caption_style = "green" if node <= cap else "bold red"
    return table


def ranks_table(report: Report) -> Table:
    table = Table(title="Every rank", box=box.SIMPLE, title_justify="left")
    for name in ("ranks", "parameters", "gradients", "optimizer states", "total"):
        table.add_column(name, justify="right" if name != "ranks" else "left")
    for states in report.ranks:
        table.add_row(
            _rank_label(states),
            *(human(states.bytes_of(c)) for c in ("parameters", "gradients", "optimizer_states")),
            human(states.total_bytes),
        )
    return table


def _rank_label(states: RankStates) -> str:
    r = states.ranks
    return str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}"


def estimate_view(
    report: Report, *, show_ranks: bool = False, explain: bool = False
) -> RenderableType:
    model = report.model
    p = report.placement
    head = Text.assemble(
        (model.name, "bold"),
        f"  {model.num_parameters:,} parameters in {model.num_parameter_tensors:,} tensors\n",
        f"{report.recipe.name} ({report.recipe.description}), {report.optimizer.name}, "
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
    if report.capacity_bytes is not None:
        headroom = report.capacity_bytes - report.peak_bytes
        gpu_name = report.gpu or "the GPU"
        if report.fits:
            parts.append(
                Text(
                    f"fits {gpu_name} ({human(report.capacity_bytes)}): {human(headroom)} left",
                    style="green",
                )
            )
        else:
            parts.append(
                Text(
                    f"does NOT fit {gpu_name} ({human(report.capacity_bytes)}): "
                    f"{human(-headroom)} over",
                    style="bold red",
                )
            )
    parts.extend(Text(f"note: {n}", style="yellow") for n in report.notes)
    return Group(*parts)


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
    params = inventory.parameters
    total = inventory.num_parameters
    embed = sum(t.numel for t in params if t.role in ("embedding", "head", "position"))
    lines = [
        f"parameters: {total:,} in {len(params):,} tensors"
        + (f" (tied: {', '.join(a for a, _ in inventory.tied)})" if inventory.tied else ""),
        f"non-embedding parameters: {total - embed:,}",
    ]
    if params:
        big = max(params, key=lambda t: t.numel)
        lines.append(f"largest tensor: {big.name} {list(big.shape)} ({big.numel:,})")
    layers = _layer_sizes(params)
    if layers:
        index, size = max(layers.items(), key=lambda kv: (kv[1], -kv[0]))
        lines.append(f"largest layer: {index} ({size:,} parameters)")
    if inventory.buffers:
        lines.append(
            f"buffers: {len(inventory.buffers)} tensors, "
            f"{sum(b.numel for b in inventory.buffers):,} elements"
        )
    lines.extend(f"note: {n}" for n in inventory.notes)
    return Text("\n".join(lines))


def _layer_sizes(params: Iterable[TensorSpec]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in params:
        if t.layer is not None:
            sizes[t.layer] = sizes.get(t.layer, 0) + t.numel
    return sizes


def console(width: int | None = None) -> Console:
    return Console(width=width, highlight=False, soft_wrap=False)
