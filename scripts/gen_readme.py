"""Write the README's measured figures from benchmarks/results/*.json, never by hand.

    python scripts/gen_readme.py           # rewrite the generated blocks of README.md
    python scripts/gen_readme.py --check   # exit 1 and print a diff when README.md is stale
                                           # (CI: tests/test_readme.py)

Each block sits between

    <!-- generated:NAME (scripts/gen_readme.py from benchmarks/results/FILE @ COMMIT) -->
    ...
    <!-- /generated -->

and is rewritten whole, the marker line included, from the results file it names: a table, or
a whole paragraph when the figures are prose. COMMIT is the commit the file was measured at
(`+dirty` when memplan/ or benchmarks/ had uncommitted changes then). Counts are "N of M" as the
data has them; "every" only when N == M. Re-measure with the writer each file names (its
`stamp.argv`, or the README's regenerate block), then run this script.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
BLOCK = re.compile(
    r"<!-- generated:(?P<name>[a-z0-9-]+) \(scripts/gen_readme\.py from "
    r"(?P<file>\S+) @ (?P<commit>\S+)\) -->\n(?P<body>.*?)<!-- /generated -->",
    re.S,
)

Doc = dict[str, Any]


# --- wording ---------------------------------------------------------------------------------


def n(value: float) -> str:
    """An integer with thousands separators."""
    return f"{value:,.0f}"


def pct(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f}%"


def signed_pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:+.{digits}f}%"


def of(count: int, total: int, what: str) -> str:
    """ "every one of the 6 cells" only when the data says so, else "4 of 6 cells"."""
    return f"all {total} {what}" if count == total else f"{count} of {total} {what}"


def stamp_of(doc: Doc) -> Doc:
    """The stamp of a results file: `stamp` (new writers) or accuracy.json's `environment`."""
    stamp = doc.get("stamp") or doc.get("environment") or (doc if "commit" in doc else None)
    if not stamp or not stamp.get("commit"):
        raise SystemExit("a results file without a commit stamp")
    return dict(stamp)


def commit_of(doc: Doc) -> str:
    stamp = stamp_of(doc)
    dirty = stamp.get("dirty", stamp.get("tree_dirty"))
    return f"{stamp['commit']}{'+dirty' if dirty else ''}"


def where(doc: Doc) -> str:
    """ "at commit abc1234, 2026-12-05 17:02 UTC, x86_64, 2 CPUs" from the stamp."""
    stamp = stamp_of(doc)
    parts = [f"commit {commit_of(doc)}"]
    if stamp.get("date"):
        parts.append(stamp["date"])
    parts.append(stamp.get("machine") or f"{stamp.get('cpus')} CPUs")
    return ", ".join(parts)


def wrap(body: str, width: int = 96) -> str:
    """Prose paragraphs folded at `width` (tables left as they are), so diffs stay readable."""
    paragraphs = body.strip("\n").split("\n\n")
    out = [
        p
        if p.startswith("|")
        else textwrap.fill(
            " ".join(p.split("\n")), width, break_long_words=False, break_on_hyphens=False
        )
        for p in paragraphs
    ]
    return "\n\n".join(out) + "\n"


def table(head: list[str], rows: list[list[str]], right: int = 1) -> str:
    align = ["---"] * right + ["---:"] * (len(head) - right)
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


# --- blocks ----------------------------------------------------------------------------------


def startup(speed: Doc) -> str:
    rows = {(r["command"], r["kind"]): r for r in speed["rows"]}
    floor = rows[(speed["floor"], "floor")]
    typer_app = next(r for r in speed["rows"] if r["command"].startswith("empty typer app"))
    mine = [r for r in speed["rows"] if r["kind"] == "memplan" and " estimate " in r["command"]]
    low, high = min(r["median_ms"] for r in mine), max(r["median_ms"] for r in mine)
    ratios = [r["ratio_to_floor"] for r in mine]
    ratio = f"{min(ratios):.1f}-{max(ratios):.1f}"
    app = typer_app["ratio_to_floor"]
    link = "[benchmarks/results/estimate-speed.json](benchmarks/results/estimate-speed.json)"
    floor_ms = floor["median_ms"]
    before = [r for r in speed["rows"] if r["kind"] == "before"]
    earlier = ""
    if before:
        b_ratios = [r["ratio_to_floor"] for r in before]
        earlier = (
            f" (the baseline checkout timed beside it: {min(b_ratios):.1f}-{max(b_ratios):.1f}x)"
        )
    phases = speed.get("phases_ms", {})

    def ms(*prefixes: str) -> float:
        return sum(v for name, v in phases.items() if name.startswith(prefixes))

    # What a plain estimate spends beyond the floor (benchmarks/estimate_speed.py::PHASES): the
    # spec's pydantic models, memplan's own imports, and the work itself.
    models = ms("pydantic: BaseModel", "memplan: import the spec models")
    imports = ms("memplan: import memplan.model.load", "memplan: import the calculator")
    work = ms("memplan: read and validate", "memplan: the model's", "memplan: the estimate")
    return (
        f"`memplan estimate` never imports torch: it takes {low:.0f}-{high:.0f} ms on four "
        f"shipped configs, table or `--json` (medians of {speed['runs']} fresh processes), "
        f"{ratio}x the import floor of typer, rich, pydantic and yaml ({floor_ms:.0f} ms) in "
        f"the same run{earlier}. A plain `memplan estimate SPEC` parses its few options itself "
        "and never imports typer (`memplan/cli/entry.py`; every other command line, help and "
        f"error goes to the typer app, whose empty form with `estimate`'s options alone takes "
        f"{app:.2f}x). Beyond the floor, the `--json` path spends about {models:.0f} ms on "
        f"pydantic and the spec's models, {imports:.0f} ms importing memplan's model loading "
        f"and calculator, and {work:.0f} ms reading the spec and estimating, so issue 21's "
        f"1.5x is not met ({where(speed)}, {link}).\n"
    )


VERIFY_COLUMNS = ("parameters", "gradients", "optimizer_states", "activations", "peak")


def verify_cell(row: Doc | None) -> str:
    if row is None or row["predicted"] is None or row["measured"] is None:
        return ""
    text = f"{n(row['predicted'])} / {n(row['measured'])}"
    return text + (" **(off)**" if row["ok"] is False else "")


def verify_table(doc: Doc) -> str:
    cases = doc["cases"]
    versions = stamp_of(doc).get("versions", {})
    passed = [c for c in cases if c["ok"]]
    fake = [c for c in cases if c["options"].get("fake")]
    lines = [
        f"Measured by `benchmarks/verify_table.py` ({where(doc)}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + "; predicted / measured bytes; tiny configs: hidden 64, 2 layers, vocabulary 1,041, "
        f"batch 2 x 16): {of(len(passed), len(cases), 'cases')} pass every category on every "
        "rank.\n",
    ]
    rows, sentences = [], []
    for case in cases:
        shown = case["shown_ranks"]
        if len(shown) > 2:  # one column over many ranks: a sentence, not rows
            states = [case["ranks"][r]["optimizer_states"] for r in shown]
            exact = sum(1 for s in states if s["ok"])
            sentences.append(
                f"{case['name']}: optimizer states "
                + " / ".join(n(s["measured"]) for s in states)
                + f" B on ranks {shown[0]} to {shown[-1]}, {of(exact, len(states), 'ranks')} "
                "exact to the byte."
            )
            continue
        for r in shown:
            cats = case["ranks"][r]
            label = case["name"] + (f", rank {r}" if len(case["ranks"]) > 1 else "")
            rows.append([label, *(verify_cell(cats.get(c)) for c in VERIFY_COLUMNS)])
    head = ["case", "parameters", "gradients", "optimizer states", "activations", "peak"]
    lines.append(table(head, rows).rstrip("\n"))
    lines.append("")
    for case in cases:
        if case["ok"]:
            continue
        misses = [
            f"rank {r}: {c.replace('_', ' ')} {n(row['predicted'])} / {n(row['measured'])}"
            for r, cats in enumerate(case["ranks"])
            for c, row in cats.items()
            if c in VERIFY_COLUMNS and row["ok"] is False
        ]
        notes = [x for x in case["notes"] if "predicts" in x]
        sentences.append(
            f"{case['name']} misses ({'; '.join(misses)})"
            + (f"; verify's note: {notes[0]}" if notes else ".")
        )
    for case in fake:
        spec = case["spec"]
        sentences.append(
            f"`--fake` ran {case['name'].split(' ')[0]} at full size (micro-batch "
            f"{spec['training']['micro_batch_size']} x {n(spec['training']['sequence_length'])} "
            f"tokens) in {case['seconds']:.0f} s."
        )
    lines.append(" ".join(sentences))
    return "\n".join(lines) + "\n"


def tp_table(doc: Doc) -> str:
    cells = agree = 0
    rows = []
    for case in doc["cases"]:
        row = [f"{case['precision']}, {case['attention']}"]
        for kind in ("tp", "sp", "whole"):
            values = {v for rank in case["measured"][kind] for v in rank}
            predicted = case["predicted"][kind]
            cells += 1
            if values == {predicted}:
                agree += 1
                row.append(n(predicted))
            else:
                measured = ", ".join(n(v) for v in sorted(values))
                row.append(f"{measured} (predicted {n(predicted)})")
        rows.append(row)
    stamp = stamp_of(doc)
    head = [
        "case",
        f"TP={stamp['ranks']}",
        f"TP={stamp['ranks']} + sequence parallel (torch rule)",
        "TP=1",
    ]
    intro = (
        f"Proof, measured by `benchmarks/tp_activations.py` on {stamp['ranks']} gloo ranks with "
        f"torch's DTensor tensor parallelism on a tiny Llama ({where(doc)}; bytes one decoder "
        f"layer saves on one rank, batch {stamp['batch']} x {stamp['sequence']}): measured = "
        f"predicted in {of(agree, cells, 'cells')}, on every layer of every rank "
        "(`tests/test_tp_activations_real.py` and `tests/test_tp_sp_activations_real.py` also "
        "compare them tensor by tensor):\n"
    )
    saved = [c["predicted"]["sp"] - c["predicted"]["sp_megatron"] for c in doc["cases"]]
    rule = (
        "The sequence-parallel rule depends on the engine, and the measurement is why: torch's\n"
        "`PrepareModuleInput` all-gathers before the linear, so the linear saves the whole "
        "sequence\n(engine `fsdp2` or `ddp`), while Megatron's linear saves its shard and "
        "gathers again in\nbackward (engine `megatron`; "
        f"{n(min(saved))} to {n(max(saved))} B less per layer in the cases above).\n"
    )
    return intro + "\n" + table(head, rows) + "\n" + rule


MODEL_NAMES = {
    "tiny-llama": "a tiny Llama",
    "tiny-gpt2": "a tiny GPT-2",
    "tiny-mixtral": "a tiny Mixtral (MoE)",
    "tiny-qwen2-moe": "a tiny Qwen2-MoE",
    "gpt2": "GPT-2 (124M)",
    "pythia-160m": "Pythia-160M",
    "qwen2.5-0.5b": "Qwen2.5-0.5B",
}


OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD (momentum)"}


def engine_name(case: Doc) -> str:
    if case["engine"] == "ddp":
        return "DDP" if case["zero_stage"] == 0 else "ZeroRedundancyOptimizer (ZeRO-1)"
    return f"{case['engine'].upper()} ZeRO-{case['zero_stage']}"


def by_engine(case: Doc) -> tuple[str, int]:
    return case["engine"], case["zero_stage"]


def accuracy_intro(doc: Doc) -> str:
    cases = doc["cases"]
    env = stamp_of(doc)

    def listed(values: list[str]) -> str:
        seen = list(dict.fromkeys(values))
        return ", ".join(seen[:-1]) + " and " + seen[-1] if len(seen) > 1 else seen[0]

    def settings(c: Doc) -> list[str]:
        """The step settings of a case beyond the default (sdpa, no recomputation, no
        dropout); accuracy.json before issue 15's cases has none of the keys."""
        out = []
        if c.get("activation_checkpointing", "none") != "none":
            out.append(f"{c['activation_checkpointing']} recomputation")
        if c.get("attention", "sdpa") == "eager":
            out.append("eager attention")
        if c.get("dropout"):
            out.append("dropout")
        return out

    counts: dict[str, int] = {}
    for c in cases:
        for what in settings(c):
            counts[what] = counts.get(what, 0) + 1
    steps = (
        "; step settings: " + ", ".join(f"{what} in {k}" for what, k in counts.items())
        if counts
        else ""
    )
    ranks = sorted({c["ranks"] for c in cases})
    mbs = sorted({c["micro_batch_size"] for c in cases})
    seq = sorted({c["sequence_length"] for c in cases})
    return (
        f"`benchmarks/accuracy.py` ran a grid of {len(cases)} training steps ({where(doc)}, "
        f"{env['seconds']:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
        + ") and measured each one with `memplan verify`'s machinery (the real transformers "
        "model and torch optimizer, real steps on gloo ranks, storages counted per category, the "
        "step's peak from torch's MemTracker). Models: "
        + listed([MODEL_NAMES.get(c["model"], c["model"]) for c in cases])
        + "; "
        + listed([c["precision"] for c in cases])
        + "; "
        + listed([OPTIMIZER_NAMES.get(c["optimizer"], c["optimizer"]) for c in cases])
        + f"; {ranks[0]} to {ranks[-1]} ranks with "
        + listed([engine_name(c) for c in sorted(cases, key=by_engine)])
        + f"; micro-batch {mbs[0]} to {mbs[-1]}, sequence {seq[0]} to {seq[-1]}{steps}. "
        "For each case "
        "memplan and the tools people compare it with predict the same setting, and each is "
        "compared with the measurement on the most-loaded rank. Relative error = (predicted - "
        f"measured) / measured; cases = how many of the {len(cases)} the tool can express:\n"
    )


def accuracy_table(doc: Doc) -> str:
    def cols(s: Doc) -> list[str]:
        if not s["cases"]:
            return ["0", "—", "—"]
        return [str(s["cases"]), pct(s["median_abs_error"]), pct(s["max_abs_error"])]

    rows = [
        [tool, *cols(s), *cols(s["model_states"]), *cols(s["activations"])]
        for tool, s in doc["tools"].items()
    ]
    head = ["tool", "total: cases", "median", "max"]
    head += ["model states: cases", "median", "max", "activations: cases", "median", "max"]
    return table(head, rows)


def accuracy_misses(doc: Doc) -> str:
    cases = doc["cases"]
    ours = [(c, c["tools"]["memplan"]) for c in cases]
    worst_case, worst = max(ours, key=lambda p: abs(p[1]["error_total"]))
    exact_states = sum(1 for c in cases if c["model_states_exact"])
    act = [(c, m["error_activations"]) for c, m in ours if m["error_activations"] is not None]
    act_close = [c for c, e in act if abs(e) <= 1e-4]
    act_off = [(c, e) for c, e in act if abs(e) > 1e-4]
    fsdp2 = [m["error_total"] for c, m in ours if c["engine"] == "fsdp2"]
    # Peaks further off than 0.1%: named one by one, so a miss is never averaged away.
    peak_off = [(c, m["error_total"]) for c, m in ours if abs(m["error_total"]) > 1e-3]
    parts = [
        f"Where memplan misses: by at most {pct(abs(worst['error_total']))} on the peak "
        f"({worst_case['case']}); model states are exact to the byte in "
        f"{of(exact_states, len(cases), 'cases')}; the {len(fsdp2)} FSDP2 cases are within "
        f"{pct(max(abs(e) for e in fsdp2))} on the peak."
    ]
    if peak_off:
        parts.append(
            f"The peak is within 0.1% in {of(len(cases) - len(peak_off), len(cases), 'cases')}; "
            "the others: " + ", ".join(f"{c['case']} {signed_pct(e)}" for c, e in peak_off) + "."
        )
    if act_off:
        models = sorted({MODEL_NAMES.get(c["model"], c["model"]) for c, _ in act_off})
        errors = sorted({signed_pct(e) for _, e in act_off})
        parts.append(
            f"Saved activations are within 0.01% in {of(len(act_close), len(act), 'cases')}; "
            f"the others ({', '.join(models)}, {len(act_off)} "
            f"{'case' if len(act_off) == 1 else 'cases'}) come out "
            f"{' to '.join(errors)} against the measurement, without moving the peak past the "
            "figure above."
        )
    else:
        parts.append(f"Saved activations are within 0.01% in {of(len(act), len(act), 'cases')}.")
    ds = [
        c["tools"]["deepspeed"]["error_total"]
        for c in cases
        if c["engine"] == "fsdp2"
        and not c["model"].startswith("tiny")
        and c["tools"]["deepspeed"].get("error_total") is not None
    ]
    if ds:
        parts.append(
            f"Where a peer lands close (DeepSpeed at {signed_pct(min(ds))} to "
            f"{signed_pct(max(ds))} on the {len(ds)} real-size FSDP2 cases), an over-count of "
            "model states (16-bit weights kept whole, fp32 gradients torch does not keep) "
            "offsets the activations it leaves out."
        )
    return " ".join(parts) + "\n"


def speed(doc: Doc) -> str:
    cold, warm = doc["cold_ms"], doc["warm_ms"]
    stamp = stamp_of(doc)
    text = (
        f"Speed, measured in one run of `benchmarks/speed.py` ({where(doc)}, load average "
        f"{stamp.get('load_average_1min', doc.get('load_average_1min')):.1f}; Llama-3-8B, "
        f"medians of {doc['runs']} runs): `memplan estimate` takes "
        f"{cold['memplan'] / 1000:.2f} s as a command"
    )
    if "accelerate" in cold:
        text += (
            f" against {cold['accelerate'] / 1000:.1f} s for accelerate's `estimate-memory` code "
            f"on the same config ({cold['accelerate'] / cold['memplan']:.1f}x; it imports torch "
            "and transformers and builds the model on the meta device)"
        )
    text += f", and {warm['memplan']:.1f} ms as a library call"
    if "accelerate" in warm:
        text += (
            f" against {warm['accelerate']:.0f} ms ({warm['accelerate'] / warm['memplan']:.0f}x)"
        )
    return text + ".\n"


def plan_speed(doc: Doc) -> str:
    runs = doc["runs_s"]
    met = doc["median_s"] < doc["target_s"]
    return (
        f"`memplan plan` searches {n(doc['searched'])} layouts ({n(doc['fit'])} fit) for "
        f"Llama-3.1-405B on {n(doc['gpus'])} GPUs in {min(runs):.2f} to {max(runs):.2f} s over "
        f"{len(runs)} runs{_workers(doc)}, each with memplan's in-process caches emptied as in "
        f"a fresh `memplan plan` (median {doc['median_s']:.2f} s, about "
        f"{n(doc['searched'] / doc['median_s'])} layouts/s; `benchmarks/plan_speed.py`, "
        f"{where(doc)}, load average {stamp_of(doc)['load_average_1min']:.1f}): "
        f"{'within' if met else 'over'} the {doc['target_s']:.1f} s target."
        + _one_process(doc)
        + _deepseek_speed(doc.get("deepseek_v3"))
        + _baseline_speed(doc.get("baseline"))
        + "\n"
    )


def _workers(doc: Doc, short: bool = False) -> str:
    """How the timed searches ran: on how many forked workers (plan_speed.py records it)."""
    if not doc.get("forked"):
        return " in one process"
    if short:
        return f" on {doc['workers']} worker processes"
    return (
        f" on {doc['workers']} worker processes (every CPU of the machine, `memplan plan`'s "
        "default)"
    )


def _one_process(doc: Doc) -> str:
    alone = doc.get("one_process")
    if not alone or not doc.get("forked"):
        return ""
    return (
        f" In one process (`--jobs 1`), alternated with those runs: a median "
        f"{alone['median_s']:.2f} s; CPU seconds, workers included: {doc['median_cpu_s']:.2f} "
        f"on {doc['workers']} workers against {alone['median_cpu_s']:.2f} in one process."
    )


def _baseline_speed(before: Doc | None) -> str:
    """The checkout timed alternately with this one (plan_speed.py --baseline), if any: the
    same search's spread there says how much of a difference is the machine's."""
    if not before:
        return ""
    runs = before["runs_s"]
    return (
        f" The baseline checkout, timed alternately in the same run{_workers(before)}: "
        f"{min(runs):.2f} to "
        f"{max(runs):.2f} s (median {before['median_s']:.2f} s) for the 405B search, "
        f"{before['deepseek_v3']['median_s']:.2f} s for DeepSeek-V3 "
        f"({n(before['deepseek_v3']['searched'])} layouts searched there)."
    )


def _deepseek_speed(moe: Doc | None) -> str:
    if not moe:
        return ""
    met = moe["median_s"] < moe["target_s"]
    alone = moe.get("one_process")
    one = f", {alone['median_s']:.2f} s in one process" if alone and moe.get("forked") else ""
    return (
        f" DeepSeek-V3 (MoE, its activations traced once and cached) on {n(moe['gpus'])} GPUs: "
        f"{n(moe['searched'])} layouts ({n(moe['fit'])} fit) in a median {moe['median_s']:.2f} s"
        f"{_workers(moe, short=True)}{one}: {'within' if met else 'over'} the "
        f"{moe['target_s']:.1f} s target."
    )


def published_layouts(doc: Doc) -> str:
    rows = doc["rows"]

    def top(row: Doc) -> Doc:
        return dict(row["top"][0])

    tp = sum(1 for r in rows if top(r)["tensor"] == r["meta"]["tensor"])
    pp = sum(1 for r in rows if top(r)["pipeline"] == r["meta"]["pipeline"])
    exact = [r for r in rows if r["meta_rank"] == 1]
    layouts = [
        f"TP{r['meta']['tensor']} CP{r['meta']['context']} PP{r['meta']['pipeline']} "
        f"DP{r['meta']['data']} at {n(r['sequence'] // 1024)}K"
        for r in exact
    ]
    ranks = ", ".join(
        f"#{r['meta_rank']} of {n(r['fitting'])}" if r["meta_rank"] else "not fitting" for r in rows
    )
    return (
        f"Against Meta's {len(rows)} published Llama-3.1-405B layouts (Llama 3 paper, Table 4), "
        f"`plan`'s top layout agrees on TP in {of(tp, len(rows), 'rows')} and on PP in "
        f"{of(pp, len(rows), 'rows')}, and is Meta's layout exactly in "
        f"{of(len(exact), len(rows), 'rows')}"
        + (f" ({'; '.join(layouts)})" if layouts else "")
        + f"; Meta's degrees rank {ranks} ({where(doc)}). "
        + _top_sentence(doc)
        + "[benchmarks/results/published-layouts.md](benchmarks/results/published-layouts.md) "
        "explains each row.\n"
    )


def _top_sentence(doc: Doc) -> str:
    """How often Meta's layout is in plan's top rows, with transformers' model code and with
    Megatron-Core's TE code (issue 21's ranking check)."""
    top = doc.get("top", 5)
    te = doc.get("rows_megatron_core_te", [])

    def hits(rows: list[Doc]) -> int:
        return sum(1 for r in rows if r["meta_rank"] and r["meta_rank"] <= top)

    if not te:
        return ""
    te_ranks = ", ".join(
        f"#{r['meta_rank']} of {n(r['fitting'])}" if r["meta_rank"] else "not fitting" for r in te
    )
    return (
        f"Meta's layout is in plan's top {top} in {of(hits(doc['rows']), len(doc['rows']), 'rows')}"
        " with transformers' model code and in "
        f"{of(hits(te), len(te), 'rows')} with Megatron-Core's Transformer Engine code "
        f"({te_ranks}): at 8K tokens the step-time model prefers context to data "
        "parallelism where Meta's degrees need full recomputation to fit. "
    )


def megatron_ratio(doc: Doc) -> str:
    def ratios(rows: list[Doc]) -> str:
        found = sorted(
            {
                round(r["layer_bytes"]["memplan"] / r["layer_bytes"]["megatron_formula"], 2)
                for r in rows
                if "layer_bytes" in r
            }
        )
        return " to ".join(f"{x:.2f}" for x in found)

    te = ratios(doc.get("rows_megatron_core_te", []))
    return (
        "Activations are transformers' saved tensors unless `model.implementation` names other "
        "model code: Megatron-Core with Transformer Engine fuses norms and SwiGLU and saves "
        f"less (a Llama-3.1-405B layer of transformers' code saves {ratios(doc['rows'])}x what "
        "Megatron's own formula gives"
        + (f", memplan's `megatron-core` TE rule {te}x" if te else "")
        + ", `benchmarks/published_layouts.py`, "
        "[benchmarks/results/published-layouts.md](benchmarks/results/published-layouts.md)).\n"
    )


def gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def short(reason: str) -> str:
    """A reason's first clause (up to a parenthesis, colon or period)."""
    return re.split(r" \(|: |\. |\.$", reason, maxsplit=1)[0]


def flagships(doc: Doc) -> str:
    layout = doc["layout"]
    head = ["model", "parameters", "GPUs", "model states", "activations", "peak", "verdict"]
    rows, missing = [], []
    for row in doc["rows"]:
        est = row["estimate"]
        if "error" in est:
            rows.append([row["label"], "", n(row["gpus"]), "", "", "", est["error"]])
            continue
        states = est["parameters"] + est["gradients"] + est["optimizer_states"]
        traced = est["activations_source"] == "profile"
        acts = f"{gib(est['activations'])} ({est['activations_source']})" if traced else "-"
        if not traced:
            missing.append(row)
        rows.append(
            [
                row["label"],
                f"{est['num_parameters'] / 1e9:.1f} B",
                n(row["gpus"]) + (f" (EP {row['expert']})" if row.get("expert", 1) > 1 else ""),
                gib(states),
                acts,
                gib(est["peak"]) + ("" if traced else " + activations"),
                est["verdict"].replace("_", " "),
            ]
        )
    free = sum(1 for r in doc["rows"] if r["estimate"].get("torch_imported") is False)
    text = (
        f"`memplan estimate` on full-size flagship configs (`benchmarks/flagships.py`, "
        f"{where(doc)}): {layout['precision']} {layout['optimizer']}, {layout['engine']} "
        f"ZeRO-{layout['zero_stage']} on {layout['gpu']}, micro-batch "
        f"{layout['micro_batch_size']}, sequence {n(layout['sequence_length'])}, "
        f"{layout['activation_checkpointing']} activation checkpointing; GiB per GPU. "
        f"Activations come from the profiles memplan ships (traced for the "
        f"{layout['device'].upper()} kernels"
        + (", emulated on a CPU build" if layout["device"] == "cuda" else "")
        + f"); {of(free, len(doc['rows']), 'estimates')} ran without importing torch (shipped "
        "inventories). EP: expert parallelism over the data-parallel GPUs.\n\n"
    )
    text += table(head, rows)
    own = doc["stamp"].get("commit")
    older: dict[str, list[str]] = {}  # rows a `--only` run kept, by the commit they were made at
    for r in doc["rows"]:
        commit = (r.get("stamp") or {}).get("commit", own)
        if commit != own:
            older.setdefault(commit, []).append(r["label"])
    if older:
        text += "\nRows kept from earlier runs (`--only`): " + "; ".join(
            f"{', '.join(labels)} at commit {commit}" for commit, labels in older.items()
        )
        text += ".\n"
    if missing:
        text += "\nNo profile yet (the trace's reason, in full in the results file): " + "; ".join(
            f"{r['label']}: {short(r.get('trace', {}).get('reason', 'not traced'))}"
            for r in missing
        )
        text += ".\n"
    if any(r.get("expert", 1) > 1 and r["estimate"].get("fits") is False for r in doc["rows"]):
        text += (
            "\nThe MoE rows that do not fit are high where memplan's FSDP2 model is coarse: it "
            "gathers a whole decoder layer, experts included, over all data-parallel GPUs "
            "(memplan/states/engines/fsdp2/step.py), where torchtitan wraps the experts apart "
            "over the expert-data mesh; Llama 4's 16 experts, sharded on their first dimension "
            "over 64 GPUs, leave each GPU a whole expert.\n"
        )
    return text


def profile_build(doc: Doc) -> str:
    def span(rows: list[Doc]) -> str:
        low, high = min(r["seconds"] for r in rows), max(r["seconds"] for r in rows)
        return f"{low:.1f} s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f} to {high:.1f} s"

    llama = [
        row
        for row in doc["build"]
        if row["case"].startswith("llama") and row.get("device", "cpu") == "cpu"
    ]
    cuda = [row for row in doc["build"] if row.get("device") == "cuda" and "100" in row["case"]]
    others = [
        row
        for row in doc["build"]
        if "100 layers" in row["case"] and not row["case"].startswith("llama")
    ]
    rule, profile = doc["startup"]["rule"], doc["startup"]["profile"]
    clean = not rule["imported"] and not profile["imported"]
    text = (
        "Tracing a profile (two layers of each structure traced, the full depth built and "
        "checked once on fake tensors) takes "
        f"{span([r for r in llama if '100 layers' in r['case']])} for a 100-layer "
        f"Llama-3-8B-shaped model and {span([r for r in llama if '2 layers' in r['case']])} "
        "for the same at 2 layers (sdpa and eager, CPU kernels)"
        + (f", {span(cuda)} at 100 layers for the CUDA kernels" if cuda else "")
    )
    text += "".join(f", {span([r])} for {r['case']}" for r in others)
    return text + (
        f". With a stored profile `memplan estimate` starts in {profile['median_s']:.2f} s "
        f"({profile['preset']}, shipped profile and inventory) against "
        f"{rule['median_s']:.2f} s for a hand-ruled family ({rule['preset']}), medians of "
        f"{len(rule['runs_s'])} interleaved runs, "
        + ("neither importing torch" if clean else "torch imported")
        + f" (`benchmarks/profile_build.py`, {where(doc)}).\n"
    )


def profile_verify(doc: Doc) -> str:
    types = doc["types"]
    verified, off = [], []
    for name, row in types.items():
        cases = row["settings"]
        if row.get("not_traced"):
            continue  # one setting run, to record why the trace refuses it (listed below)
        if cases and all(c.get("ok") and c.get("ratio") is not None for c in cases):
            verified.append(name)
        for c in cases:
            if c.get("ratio") not in (None, 1.0):
                off.append((name, c))
    seen = {c["checkpointing"] for r in types.values() for c in r["settings"]}
    policies = [p for p in ("none", "full", "selective") if p in seen]
    lows: dict[str, list[float]] = {}
    for name, c in off:
        lows.setdefault(name, []).append(c["ratio"])
    spread = "; ".join(
        f"{name} {min(r):.7f}" + (f" to {max(r):.7f}" if max(r) != min(r) else "")
        for name, r in lows.items()
    )
    refused = [name for name, r in types.items() if r.get("not_traced")]
    failing = [
        name
        for name in types
        if name not in verified and name not in refused and types[name]["settings"]
    ]
    cases = sum(len(r["settings"]) for r in types.values())
    served = sum(1 for r in types.values() for c in r["settings"] if c.get("ratio") is not None)
    untraced = [
        name
        for name, r in types.items()
        if r["settings"] and all(c.get("ratio") is None for c in r["settings"])
    ]
    return (
        f"On CPU, {of(len(verified), len(types), 'model types')} memplan has no rule for verify "
        f"in every setting ({cases} verify runs: eager/sdpa x fp32/bf16/amp-bf16 x "
        f"{'/'.join(policies)} recomputation; MoE in bf16 and bf16-mixed): "
        f"{', '.join(verified)}. In the {n(served)} runs a profile served, activations equal "
        "the real tensors'"
        + (f" except these ratios of predicted to measured: {spread}" if spread else "")
        + (
            f"; not traced (the reason in the results file): {', '.join(untraced)}"
            if untraced
            else ""
        )
        + (
            f"; refused by the trace, one setting run to record why: {', '.join(refused)}"
            if refused
            else ""
        )
        + (
            f"; not verified in every setting (the caveat in the results file): "
            f"{', '.join(failing)}"
            if failing
            else ""
        )
        + f" (`benchmarks/profile_verify.py`, {where(doc)}).\n"
    )


def stacks_torchtitan(doc: Doc) -> str:
    summary = doc["summary"]
    kinds = sorted({r["checkpointing"] for r in doc["matrix"]})
    return (
        f"torchtitan's activations: {of(summary['exact'], summary['cases'], 'cases')} equal to "
        f"the byte what torchtitan {doc['versions']['torchtitan']}'s own Llama 3 holds after "
        f"forward and loss on CPU (fp32 and bf16; checkpointing {', '.join(kinds)}; "
        f"`benchmarks/torchtitan_activations.py`, {where(doc)}).\n"
    )


def stacks_fsdp2(doc: Doc) -> str:
    runs = doc["verify"]
    errors = [abs(p["predicted"] / p["measured"] - 1) for run in runs for p in run["peaks"]]
    close = sum(
        all(abs(p["predicted"] / p["measured"] - 1) <= 0.0002 for p in run["peaks"]) for run in runs
    )
    return (
        f"FSDP2 as torchtitan runs it, against torch's own `fully_shard` on gloo ranks: "
        f"{of(close, len(runs), 'runs')} within 0.02% of the measured peak on every rank, the "
        f"worst {pct(max(errors))} (`benchmarks/fsdp2_torchtitan.py`, {where(doc)}).\n"
    )


def stacks_deepspeed(doc: Doc) -> str:
    cases = doc["cases"]
    exact = sum(c["model_states_exact"] for c in cases)
    plain = [c for c in cases if not c.get("deepspeed_config")]
    stages = sorted({c["zero_stage"] for c in plain})
    ranks = sorted({c["ranks"] for c in plain})
    precisions = sorted({c["precision"] for c in cases})
    hierarchical = []
    for key, name in (("zero_hpz_partition_size", "ZeRO++ hpZ"), ("mics_shard_size", "MiCS")):
        runs = [c for c in cases if key in c.get("deepspeed_config", {})]
        if runs:
            first = runs[0]
            hierarchical.append(
                f"{name} ({key} {first['deepspeed_config'][key]} of {first['ranks']} ranks, "
                f"DeepSpeed {first['deepspeed']})"
            )
    extra = f"; {' and '.join(hierarchical)}" if hierarchical else ""
    return (
        f"DeepSpeed {stamp_of(doc).get('deepspeed')}'s own engine on CPU gloo ranks: model states "
        f"(parameters, gradients, each optimizer state) equal to the byte on every rank in "
        f"{of(exact, len(cases), 'cases')} (ZeRO-{stages[0]} to {stages[-1]}, "
        f"{' and '.join(precisions)}, {' and '.join(map(str, ranks))} ranks{extra}; "
        f"`benchmarks/verify_deepspeed.py`, {where(doc)}).\n"
    )


def stacks_deepspeed_step(doc: Doc) -> str:
    cases = doc["cases"]
    ranks = [r for c in cases for r in c["step_transient"]]
    residues = [r["measured"] - r["predicted"] for r in ranks]
    exact = sum(x == 0 for x in residues)
    stages = sorted({c["zero_stage"] for c in cases})
    precisions = sorted({c["precision"] for c in cases})
    configs = [c.get("deepspeed_config", {}) for c in cases]
    hpz = sum(1 for c in configs if c.get("zero_hpz_partition_size", 1) > 1)
    mics = sum(1 for c in configs if c.get("mics_shard_size", -1) > 0)
    return (
        f"Its optimizer step too (`engine.step()` under torch's memory profiler on each rank, "
        f"gloo's own copies of collective outputs left out): the most bytes the step holds "
        f"beyond model states, predicted against measured on {len(ranks)} rank-steps "
        f"(ZeRO-{stages[0]} to {stages[-1]}, {' and '.join(precisions)}; {hpz} of the "
        f"{len(cases)} cases ZeRO++ hpZ and {mics} MiCS on 4 ranks, half of them with every "
        f"parameter persistent, where the step ends holding hpZ's secondary partitions beside "
        f"the re-gathered parameters): measured minus predicted {min(residues):,} to "
        f"{max(residues):,} B, {exact} to the byte (the rest 0-dim norm and overflow scalars; "
        f"`benchmarks/verify_deepspeed.py --step`, {where(doc)}"
        + "".join(
            f"; `--step-hierarchy`, {where({'stamp': stamp})}" for stamp in _latest_row_stamp(cases)
        )
        + ").\n"
    )


def _latest_row_stamp(cases: list[Doc]) -> list[Doc]:
    """The newest of the stamps rows carry when measured after the file's own (none: [])."""
    stamps = [c["stamp"] for c in cases if c.get("stamp")]
    return [max(stamps, key=lambda s: s.get("date", ""))] if stamps else []


def stacks_pipelining(doc: Doc) -> str:
    sched = doc["schedules"]
    wrong = len(sched["mismatches"])
    return (
        f"torch's pipeline schedules: memplan's micro-batches in flight per rank agree with the "
        f"action lists of torch's own schedule objects in {sched['cases'] - wrong:,} of "
        f"{sched['cases']:,} (schedule, stages, chunks, micro-batches, rank) cases; Megatron's "
        f"count differs from torch's in {sched['megatron_differs']} of them "
        f"(`benchmarks/torch_pipelining.py`, {where(doc)}).\n"
    )


def stacks_compile(doc: Doc) -> str:
    traced = doc["traced"]
    rule = doc["memplan_per_token_bytes"]
    eager = traced["torchtitan per-op SAC eager"]["per_token_bytes"]
    sac = traced["torchtitan per-op SAC + compile"]["per_token_bytes"]
    return (
        f"torch.compile, traced through Inductor's partition on CPU ({doc['model']}): a compiled "
        f"layer keeps {traced['torchtitan compile']['per_token_bytes']:,} B per token "
        f"(memplan's rule {rule['compiled rule']:,}; the eager transformers layer "
        f"{rule['eager transformers rule (CUDA)']:,}), {rule['compiled float8 rule']:,} with "
        f"torchao Float8Linear, and under torchtitan's per-op SAC {sac:,} against eager's "
        f"{eager:,} "
        f"(`benchmarks/compile_float8.py`, {where(doc)}).\n"
    )


def published(doc: Doc) -> str:
    """memplan against torchtitan's published max reserved (benchmarks/published.py)."""
    head = ["table", "model", "GPUs", "layout", "published", "memplan", "error",
            "TPS/GPU published", "step-time model"]  # fmt: skip
    rows = []
    for r in doc["rows"]:
        tps = [f"{r['published_tps_per_gpu']:,}", "-"]
        if r["expressible"]:
            error = signed_pct(r["error"])
            if r["unmodelled"]:
                error += " (not modelled: " + ", ".join(short(u) for u in r["unmodelled"]) + ")"
            memplan = gib(r["reserved_gib"] * 2**30)
            tps[1] = f"{r['steptime_tps_per_gpu']:,.0f}"
        else:
            memplan, error = "-", "not expressible: " + short(r["why"])
        rows.append(
            [str(r["table"]), r["model"], str(r["gpus"]), r["layout"],
             f"{r['published_gib']:.1f}", memplan, error, *tps]
        )  # fmt: skip
    done = doc["expressible"]
    rank = doc["steptime"]
    ranking = (
        f" The step-time model that ranks `plan`'s layouts, against the published TPS/GPU: "
        f"median error {rank['median_abs_error']:.0%} (it assumes 40% MFU and no overlap); of "
        f"{rank['pairs']} pairs of rows in one table it orders {rank['agree']} as published, "
        f"ties {rank['tied']} ({rank['note']}) and reverses {rank['disagree']}."
    )
    return (
        f"memplan against every row of torchtitan's published Llama 3.1 runs on H100 "
        f"({doc['source']}; metric: {doc['metric']}), GiB per GPU. Target: {doc['target']}. "
        f"{of(doc['within_10pct'], done, 'expressible rows')} within 10%, "
        f"{doc['under_5pct']} under by more than 5% (`benchmarks/published.py`, {where(doc)})."
        + ranking
        + "\n\n"
        + table(head, rows, right=4)
    )


def published_others(doc: Doc) -> str:
    """memplan against other third-party measurements (benchmarks/published_others.py)."""
    head = ["source", "run", "metric", "published", "memplan", "error"]
    rows = []
    for r in doc["rows"]:
        published = "OOM" if r["published"] is None else f"{r['published_gib']:.2f} GiB"
        if r["expressible"] and r["published"] is None:
            # An "OOM" row: memplan's verdict on the device, not an error.
            memplan = f"{r['device_used_gib']:.2f} GiB on the device"
            error = ("agrees: " if r["agrees"] else "DISAGREES: ") + r["verdict"].replace("_", " ")
        elif r["expressible"]:
            error = signed_pct(r["error"])
            if r["unmodelled"]:
                error += " (not modelled: " + ", ".join(short(u) for u in r["unmodelled"]) + ")"
            memplan = f"{r['memplan_gib']:.2f} GiB"
        else:
            memplan, error = "-", "not expressible: " + short(r["why"])
        rows.append(
            [r["source"], r["label"], r["metric"].replace("_", " "), published, memplan, error]
        )  # fmt: skip
    sources = "; ".join(f"`{key}`: [{s['title']}]({s['url']})" for key, s in doc["sources"].items())
    done = doc["expressible"]
    count = of(doc["within_10pct"], done, "expressible rows")
    return (
        f"Other third-party measurements, each in the metric its source measured (max allocated "
        f"-> `per_gpu.peak`, max reserved -> `per_gpu.peak_reserved`, nvidia-smi -> "
        f"`per_gpu.device_used`; settings and assumptions in `benchmarks/reference/`): "
        f"{sources}. {count[0].upper() + count[1:]} without unmodelled "
        f"techniques within 10%, {doc['under_5pct']} under by more than 5%; "
        f"of the {doc['oom_rows']} runs a source printed as out of memory (OOM), memplan says "
        f'"does not fit" for {doc["oom_agree"]} '
        f"(`benchmarks/published_others.py`, {where(doc)}).\n\n" + table(head, rows, right=3)
    )


def verify_sweep(doc: Doc) -> str:
    """The sweep's counts by class (benchmarks/verify_sweep.py): every causal-LM model_type."""
    summary, setting = doc["summary"], doc["setting"]
    by = summary["by_class"]
    failed = by.get("crash", 0) + by.get("build-error", 0) + by.get("timeout", 0)
    return (
        f"Every causal-LM model_type transformers {stamp_of(doc).get('transformers', '?')} maps "
        f"({summary['types']}), one `memplan verify` each on CPU ({setting['precision']}, "
        f"{setting['attention']}, recomputation {setting['checkpointing']}, "
        f"{doc['batch'][0]} x {doc['batch'][1]} tokens, a 2-layer config shrunk from the type's "
        f"defaults; MoE in {doc['moe_precision']}): {by.get('verified', 0)} verified "
        f"({summary['verified_not_covered_elsewhere']} of the "
        f"{summary['types_not_covered_elsewhere']} no rule or profile_verify covers), "
        f"{by.get('unchecked', 0)} unchecked (what verify checked passed; nothing predicted "
        f"the activations), {by.get('off', 0)} off (a category out of tolerance), {failed} "
        "that fail before memplan compares (transformers' own config or model code, or a "
        "crash), each with its reason in the results file; the causes are grouped in "
        f"[docs/verify-sweep.md](docs/verify-sweep.md) (`benchmarks/verify_sweep.py`, "
        f"{where(doc)}).\n"
    )


BLOCKS: dict[str, tuple[str, Callable[[Doc], str]]] = {
    "startup": ("estimate-speed.json", startup),
    "verify-table": ("verify.json", verify_table),
    "tp-table": ("tp-activations.json", tp_table),
    "megatron-ratio": ("published-layouts.json", megatron_ratio),
    "accuracy-intro": ("accuracy.json", accuracy_intro),
    "accuracy-table": ("accuracy.json", accuracy_table),
    "accuracy-misses": ("accuracy.json", accuracy_misses),
    "speed": ("speed.json", speed),
    "plan-speed": ("plan-speed.json", plan_speed),
    "published-layouts": ("published-layouts.json", published_layouts),
    "flagships": ("flagships.json", flagships),
    "profile-build": ("profile-build.json", profile_build),
    "profile-verify": ("profile_verify.json", profile_verify),
    "verify-sweep": ("verify-sweep.json", verify_sweep),
    "published": ("published.json", published),
    "published-others": ("published-others.json", published_others),
    "stacks-torchtitan": ("torchtitan-activations.json", stacks_torchtitan),
    "stacks-fsdp2": ("fsdp2-torchtitan.json", stacks_fsdp2),
    "stacks-deepspeed": ("verify-deepspeed.json", stacks_deepspeed),
    "stacks-deepspeed-step": ("verify-deepspeed-step.json", stacks_deepspeed_step),
    "stacks-pipelining": ("torch-pipelining.json", stacks_pipelining),
    "stacks-compile": ("compile-float8.json", stacks_compile),
}


# --- the README ------------------------------------------------------------------------------


def render(readme: str, root: Path = ROOT) -> str:
    """README text with every generated block rewritten from its results file."""

    def one(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"README.md: unknown generated block {name!r}")
        file, fn = BLOCKS[name]
        path = f"{RESULTS}/{file}"
        doc = json.loads((root / path).read_text())
        return (
            f"<!-- generated:{name} (scripts/gen_readme.py from {path} @ {commit_of(doc)}) -->\n"
            f"{wrap(fn(doc))}<!-- /generated -->"
        )

    return BLOCK.sub(one, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    fresh = render(current)
    if not args.check:
        if fresh != current:
            args.readme.write_text(fresh)
        return 0
    if fresh == current:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        fresh.splitlines(keepends=True),
        "README.md",
        "README.md (scripts/gen_readme.py)",
    )
    sys.stderr.write("".join(diff))
    sys.stderr.write("README.md is stale: run `python scripts/gen_readme.py`\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
