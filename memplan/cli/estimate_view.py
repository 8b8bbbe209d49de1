"""`memplan estimate`: the most-loaded GPU's memory, row by row, then (as asked or as the
layout needs) each row's formula, every rank, the pipeline stages, host memory, the step
timeline and the verdict."""

from __future__ import annotations

from collections.abc import Iterable

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.activations import Activations
from memplan.cli.render import human
from memplan.cli.timeline_view import TimelineFit
from memplan.config.parallelism import DeepSpeedSpec
from memplan.memory import COMPUTE_STREAM
from memplan.report.result import VERDICT_TEXT, Report, Verdict
from memplan.states.engines import Term
from memplan.versions import rules_note


def estimate_view(
    report: Report, *, show_ranks: bool = False, explain: bool = False
) -> RenderableType:
    """The whole `memplan estimate` output, top to bottom."""
    parts: list[RenderableType] = [heading(report), estimate_table(report, explain=explain)]
    if explain:
        parts.append(explanations(report))
    if show_ranks and len(report.ranks) > 1:
        parts.append(ranks_table(report))
    if len(report.stages) > 1:
        parts.append(stages_table(report))
    if report.host_bytes:
        parts.append(host_table(report))
    parts.append(TimelineFit(report))
    if report.allocator is not None:
        parts.append(device_table(report))
    v = report.verdict
    if v is not None:
        parts.append(verdict_line(report, v))
    parts.extend(Text(f"note: {n}", style="yellow") for n in report.notes)
    parts.append(Text(f"note: {rules_note(report.rules_transformers)}", style="dim"))
    return Group(*parts)


# --- the heading: model, stored dtypes, optimizer, layout ----------------------------------------


def heading(report: Report) -> Text:
    model = report.model
    p = report.layout
    return Text.assemble(
        (model.name, "bold"),
        f"  {model.num_parameters:,} parameters in {model.num_parameter_tensors:,} tensors",
        _held(report),
        "\n",
        f"{_stored(report)}, {report.optimizer.name}, "
        f"{p.engine} ZeRO-{p.stage} over {p.data} data-parallel rank{'s' * (p.data > 1)}",
        _hierarchy(p.deepspeed) if p.engine == "deepspeed" else "",
        f", {p.implementation}'s model code" if p.implementation != "transformers" else "",
    )


def _hierarchy(ds: DeepSpeedSpec) -> str:
    """DeepSpeed's hierarchical ZeRO-3, as the heading names it."""
    if ds.mics:
        return f" (MiCS: sharded within groups of {ds.mics_shard_size})"
    if ds.zero_hpz_partition_size > 1:
        return f" (ZeRO++ hpZ: secondary partition over groups of {ds.zero_hpz_partition_size})"
    return ""


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
    if report.layout.engine == "fsdp2" and r.master_weights in params:
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


# --- the table of the most-loaded GPU and its explanations ---------------------------------------


def _share(n_bytes: int, capacity: int | None) -> str:
    return "" if not capacity else f"{100 * n_bytes / capacity:.1f}%"


def _rows(terms: Iterable[Term]) -> list[Term]:
    order = {"parameters": 0, "gradients": 1, "optimizer_states": 2, "buffers": 3}
    return sorted(terms, key=lambda t: order[t.category])


def _gpu_columns(report: Report) -> Table:
    """The empty table: a share-of-memory column only with a capacity."""
    gpu = report.per_gpu
    first, count = gpu.ranks[0], len(report.ranks)
    who = "every rank" if count == 1 else f"rank {first}, the most loaded"
    per = "GPU" if report.layout.device == "cuda" else "process (CPU)"
    table = Table(title=f"Memory per {per} ({who})", box=box.SIMPLE_HEAVY, title_justify="left")
    # Figures never wrap: at 80 columns a long label folds instead.
    table.add_column("category", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    if report.capacity_bytes:
        share = "of GPU" if report.layout.device == "cuda" else "of mem"
        table.add_column(share, justify="right", no_wrap=True)
    table.caption = "peak: the step's highest phase (timeline below), not the sum of the rows"
    table.caption_justify = "left"
    return table


def estimate_table(report: Report, *, explain: bool = False) -> Table:
    """The most-loaded GPU: model-state rows, activations, transients and the peak. With
    `explain`, rows that have a formula are numbered as in `explanations`."""
    cap = report.capacity_bytes
    gpu = report.per_gpu
    table = _gpu_columns(report)
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
    if report.activations.modelled:
        add("activations", report.recipe.compute, report.activations_bytes, note="blocks")
    else:
        add("activations (not modelled)", "", 0, style="dim")
    peak = report.timeline.peak
    alive = report.timeline.transient_at(peak.phase)
    add("transient at the peak", "", report.transient_bytes, note="terms" if alive else "")
    table.add_section()
    add(f"peak ({peak.label})", "", report.peak_bytes, style="bold")
    return table


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


# --- every rank, the pipeline stages, host memory, the verdict -----------------------------------


def ranks_table(report: Report) -> Table:
    table = Table(title="Every rank", box=box.SIMPLE, title_justify="left")
    # TP ranks differ only where torch's DTensor gives the last ones fewer vocabulary rows.
    tensor = any(r.tensor_ranks for r in report.ranks)
    names = ("ranks", "TP ranks") if tensor else ("ranks",)
    for name in (*names, "parameters", "gradients", "optimizer states", "total"):
        table.add_column(name, justify="left" if name in names else "right")
    for states in report.ranks:
        table.add_row(
            _label(states.ranks),
            *([_label(states.tensor_ranks)] if tensor else []),
            *(human(states.bytes_of(c)) for c in ("parameters", "gradients", "optimizer_states")),
            human(states.total_bytes),
        )
    return table


def _label(r: tuple[int, ...]) -> str:
    return str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}"


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


def device_table(report: Report) -> Table:
    """The three layers of GPU memory at the peak, each explained: allocated (the tensors),
    reserved (the caching allocator's segments, replayed), device (nvidia-smi: reserved plus
    what lives outside the allocator)."""
    alloc = report.allocator
    assert alloc is not None
    table = Table(title="What the GPU will show", box=box.SIMPLE, title_justify="left")
    for name in ("layer", "size", "what it is"):
        table.add_column(name, justify="right" if name == "size" else "left")
    peak = report.peak_bytes
    table.add_row(
        "allocated",
        human(peak),
        "tensors alive at the peak: torch.cuda.max_memory_allocated()",
    )
    conf = report_alloc_conf(report)
    table.add_row(
        "reserved",
        human(alloc.peak_reserved),
        f"+{human(alloc.peak_reserved - peak)}: the caching allocator's segments, the step "
        f"replayed twice ({conf}); {human(alloc.fragmentation)} cached but unused at its "
        "peak: torch.cuda.max_memory_reserved()",
    )
    for stream, n_bytes in alloc.reserved_by_stream:
        if stream != COMPUTE_STREAM:
            table.add_row(
                f"    {stream}",
                human(n_bytes),
                "of it: this stream's own pool at its highest (only it reuses the blocks it frees)",
            )
    for t in report.device_terms:
        table.add_row(f"  + {t.name}", human(t.bytes), t.formula)
    used = report.device_used or 0
    table.add_row(
        "device",
        human(used),
        "what nvidia-smi shows at the peak: reserved + the terms outside the allocator",
    )
    return table


def report_alloc_conf(report: Report) -> str:
    """hardware.alloc_conf as the table names it."""
    alloc = report.allocator
    text = report.alloc_conf_text
    if alloc is None or not text:
        return "PYTORCH_CUDA_ALLOC_CONF unset"
    return f"PYTORCH_CUDA_ALLOC_CONF={text}"


def verdict_line(report: Report, v: Verdict) -> Text:
    """The verdict (memplan.report.result.verdict) on the memory left: capacity minus what
    the device table shows nvidia-smi would (without a replay, the timeline's usable memory)."""
    usable = report.usable_bytes or 0
    device = "the GPU" if report.layout.device == "cuda" else "the memory"
    where = f"{report.gpu or device} ({human(report.capacity_bytes or 0)})"
    left = f"{human(usable)} usable left" if usable >= 0 else f"{human(-usable)} over"
    text = f"{VERDICT_TEXT[v]} {where}: {left}"
    if v == "model_states_fit_activations_unknown":
        text += " before activations (not modelled)"
    elif report.not_modelled:
        text += f", before {', '.join(report.not_modelled)} (not modelled: see the notes)"
    style = {"fits": "green", "model_states_fit_activations_unknown": "yellow"}.get(v, "bold red")
    return Text(text, style=style)
