"""How exact is memplan, and how exact are the tools users compare it with? Measured in one run.

For each case of a grid (real transformers models, dense and MoE, fp32 / bf16 / bf16-mixed,
AdamW and SGD, 1-4 ranks with FSDP2 and ZeroRedundancyOptimizer, micro-batch and sequence
varied, full and selective recomputation, eager attention, dropout) the truth
is measured by `memplan verify`'s machinery (`memplan.verify.runner.verify`: the real model
and optimizer, real steps on torch.distributed ranks, storages counted per category, the
step's peak from torch's MemTracker). memplan's prediction and each peer's (benchmarks/peers/)
are compared with it on the most-loaded rank:

  model states  parameters + gradients + optimizer states (+ master weights, buffers)
  total         the tool's per-GPU figure against the measured peak of the step

Errors are relative: (predicted - measured) / measured. A peer that has no input for a case
(an optimizer, precision or sharding it does not model) is shown as "n/a: why".

  python benchmarks/accuracy.py                 # the full grid; writes benchmarks/results/
  python benchmarks/accuracy.py --quick --json  # six tiny cases (< 4 min on 2 cores), JSON
  python benchmarks/accuracy.py --list          # the cases

Peers come from the benchmark environment (benchmarks/requirements.txt); a peer whose package
is not importable is skipped. --no-peers measures memplan alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # memplan from this checkout, even when not installed

from peers import (  # noqa: E402
    NotExpressible,
    Prediction,
    Setting,
    accelerate_sizes,
    deepspeed_zero,
    llm_analysis_train,
    megatron,
)

PEERS = (deepspeed_zero, accelerate_sizes, llm_analysis_train, megatron)
MEMPLAN = "memplan"
# (a tool's figure, the measured figure it is compared with)
CATEGORIES = (("total", "peak"), ("model_states", "model_states"), ("activations", "activations"))

# Shapes of tests/test_verify_support.py: a 1,041-token vocabulary, which no world size up to
# 8 divides, so FSDP2's padded shards and ZeroRedundancyOptimizer's uneven split both show.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1041,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
    "vocab_size": 1041,
}
# MoE on the tiny Llama's shapes (tests/test_verify_step.py's families): Mixtral's sparse MLP
# (4 experts, top-2) and Qwen2-MoE's (4 narrower experts, top-2, plus a gated shared expert).
TINY_MIXTRAL: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "mixtral",
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
TINY_QWEN2_MOE: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 64,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 96,
}
# Real sizes come from memplan's shipped config.json presets (memplan/model/presets/SOURCES.md).
INLINE_MODELS = {
    "tiny-llama": TINY_LLAMA,
    "tiny-gpt2": TINY_GPT2,
    "tiny-mixtral": TINY_MIXTRAL,
    "tiny-qwen2-moe": TINY_QWEN2_MOE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    model: str
    """A key of INLINE_MODELS or a memplan preset name."""
    precision: str
    optimizer: str
    engine: str
    stage: int
    ranks: int
    micro_batch_size: int
    sequence_length: int
    attention: str = "sdpa"
    """training.attention: sdpa or eager."""
    checkpointing: str = "none"
    """training.activation_checkpointing: none, selective or full."""
    dropout: bool = False
    """training.dropout: the model's dropout forced on (False: the config's, 0 here)."""
    quick: bool = False
    """In the --quick grid."""

    @property
    def name(self) -> str:
        layout = {0: "ddp", 1: "zero1", 2: "fsdp2-z2", 3: "fsdp2-z3"}[self.stage]
        settings = "".join(
            [
                f"-{self.checkpointing}" if self.checkpointing != "none" else "",
                "-eager" if self.attention == "eager" else "",
                "-dropout" if self.dropout else "",
            ]
        )
        return (
            f"{self.model}-{self.precision}-{self.optimizer}-{layout}-x{self.ranks}"
            f"-b{self.micro_batch_size}s{self.sequence_length}{settings}"
        )


def _case(spec: str, quick: bool = False) -> Case:
    """'model precision optimizer engine stage ranks micro_batch sequence [settings]', the
    settings any of `full`, `selective`, `eager`, `dropout`."""
    model, precision, optimizer, engine, stage, ranks, mb, seq, *settings = spec.split()
    assert set(settings) <= {"full", "selective", "eager", "dropout"}, settings
    return Case(
        model=model,
        precision=precision,
        optimizer=optimizer,
        engine=engine,
        stage=int(stage),
        ranks=int(ranks),
        micro_batch_size=int(mb),
        sequence_length=int(seq),
        attention="eager" if "eager" in settings else "sdpa",
        checkpointing=next((s for s in settings if s in ("full", "selective")), "none"),
        dropout="dropout" in settings,
        quick=quick,
    )


# The smallest case first: CI runs it alone (tests/test_benchmarks.py).
CASES = (
    _case("tiny-llama  fp32       adamw ddp   0 1 2 16", quick=True),
    _case("tiny-llama  bf16       adamw ddp   0 1 2 64"),
    _case("tiny-llama  bf16-mixed adamw ddp   0 1 1 32", quick=True),
    _case("tiny-llama  bf16-mixed sgd   ddp   0 1 4 16"),
    _case("tiny-gpt2   fp32       sgd   ddp   0 1 2 32", quick=True),
    _case("tiny-gpt2   bf16-mixed adamw ddp   0 2 2 16"),
    _case("tiny-llama  bf16-mixed adamw fsdp2 3 2 2 32", quick=True),
    _case("tiny-llama  fp32       adamw fsdp2 3 4 1 16"),
    _case("tiny-llama  bf16-mixed adamw fsdp2 2 4 2 16", quick=True),
    _case("tiny-gpt2   bf16-mixed adamw fsdp2 3 4 1 32"),
    _case("tiny-llama  bf16-mixed adamw ddp   1 2 2 16", quick=True),
    _case("tiny-llama  fp32       adamw ddp   1 4 1 32"),
    _case("tiny-gpt2   bf16-mixed sgd   ddp   1 2 2 16"),
    _case("gpt2        fp32       adamw ddp   0 1 1 128"),
    _case("gpt2        bf16-mixed adamw ddp   0 1 2 128"),
    _case("gpt2        fp32       adamw ddp   0 1 4 256"),
    _case("gpt2        bf16-mixed adamw ddp   0 2 2 128"),
    _case("gpt2        bf16-mixed adamw fsdp2 3 2 1 128"),
    _case("gpt2        bf16-mixed adamw fsdp2 2 4 1 64"),
    _case("gpt2        bf16-mixed adamw ddp   1 2 1 64"),
    _case("pythia-160m bf16-mixed adamw fsdp2 3 2 1 128"),
    _case("pythia-160m bf16-mixed adamw fsdp2 2 2 1 64"),
    _case("pythia-160m bf16-mixed adamw ddp   0 1 4 256"),
    _case("pythia-160m bf16       sgd   ddp   0 1 2 128"),
    _case("qwen2.5-0.5b bf16      adamw ddp   0 1 1 64"),
    # MoE (issue 16): experts in the dense data-parallel group (no expert parallelism).
    _case("tiny-mixtral   bf16-mixed adamw ddp   0 1 2 32"),
    _case("tiny-mixtral   fp32       adamw fsdp2 3 2 2 32"),
    _case("tiny-qwen2-moe bf16-mixed adamw ddp   0 1 2 32"),
    # The step settings of issue 15 (tests/test_verify_step.py): recomputation, eager
    # attention, dropout.
    _case("tiny-llama  bf16-mixed adamw ddp   0 1 2 64 full"),
    _case("tiny-llama  bf16-mixed adamw ddp   0 1 2 64 selective"),
    _case("tiny-llama  bf16-mixed adamw ddp   0 1 2 64 eager"),
    _case("tiny-llama  bf16-mixed adamw ddp   0 1 2 64 dropout"),
    _case("tiny-llama  bf16-mixed adamw fsdp2 3 2 2 32 full dropout"),
    _case("gpt2        bf16-mixed adamw ddp   0 1 2 128 full"),
    _case("gpt2        bf16-mixed adamw ddp   0 1 2 128 selective eager"),
    _case("gpt2        bf16-mixed adamw ddp   0 1 2 128 eager dropout"),
    _case("pythia-160m bf16-mixed adamw fsdp2 3 2 1 128 full"),
)


def model_config(model: str) -> dict[str, Any]:
    if model in INLINE_MODELS:
        return dict(INLINE_MODELS[model])
    from memplan.model.load import PRESET_DIR, read_json

    data = read_json(PRESET_DIR / f"{model}.json", what="preset")
    assert isinstance(data, dict)
    return data


def spec_dict(case: Case) -> dict[str, Any]:
    """The memplan spec of a case (what `memplan verify SPEC` would read)."""
    model = (
        {"architecture": INLINE_MODELS[case.model]}
        if case.model in INLINE_MODELS
        else {"preset": case.model}
    )
    optimizer: dict[str, Any] = {"name": case.optimizer}
    if case.optimizer == "sgd":
        optimizer["momentum"] = 0.9
    return {
        "model": model,
        "precision": case.precision,
        "optimizer": optimizer,
        "training": {
            "micro_batch_size": case.micro_batch_size,
            "sequence_length": case.sequence_length,
            "attention": case.attention,
            "activation_checkpointing": case.checkpointing,
            **({"dropout": True} if case.dropout else {}),
        },
        "parallelism": {"engine": case.engine, "data": case.ranks, "zero_stage": case.stage},
        "hardware": {"device": "cpu"},
    }


def setting(case: Case) -> Setting:
    return Setting(
        name=case.name,
        config=model_config(case.model),
        precision=case.precision,
        optimizer=case.optimizer,
        engine=case.engine,
        stage=case.stage,
        ranks=case.ranks,
        micro_batch_size=case.micro_batch_size,
        sequence_length=case.sequence_length,
        attention=case.attention,
        checkpointing=case.checkpointing,
        dropout=case.dropout,
    )


# --- the truth and memplan's prediction, from memplan verify ------------------------------

_STATE_ROWS = ("parameters", "gradients", "optimizer_states", "buffers")


def _sum(rows: dict[str, Any], side: str) -> int | None:
    values = [getattr(rows[name], side) for name in _STATE_ROWS]
    return None if any(v is None for v in values) else sum(values)


def measure(case: Case) -> dict[str, Any]:
    """Run memplan verify on the case; the most-loaded rank's measured and predicted bytes.

    "Most loaded" is taken on each side separately (the largest measured and the largest
    predicted figure over the ranks): that is what a per-GPU figure has to cover."""
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.runner import verify

    loaded = validate(spec_dict(case))
    result = verify(loaded, Options(nproc=case.ranks), lambda _rank, _what: None)
    ranks = [{row.name: row for row in r.rows} for r in result.ranks]

    def most(values: list[int | None]) -> int | None:
        return None if any(v is None for v in values) else max(v for v in values if v is not None)

    return {
        "measured": {
            "model_states": most([_sum(r, "measured") for r in ranks]),
            "activations": most([r["activations"].measured for r in ranks]),
            "peak": most([r["peak"].measured for r in ranks]),
        },
        "memplan": {
            "model_states": most([_sum(r, "predicted") for r in ranks]),
            "activations": most([r["activations"].predicted for r in ranks]),
            "peak": most([r["peak"].predicted for r in ranks]),
        },
        "model_states_exact": all(
            r[name].delta == 0 for r in ranks for name in _STATE_ROWS if r[name].checked
        ),
        "verify_notes": list(result.notes),
    }


# --- one case ------------------------------------------------------------------------------


def error(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def ask_peer(peer: Any, s: Setting) -> dict[str, Any]:
    try:
        answer = peer.predict(s)
    except Exception as err:  # a peer's crash is a result too, not the end of the run
        return {"na": f"error: {type(err).__name__}: {err}"[:200]}
    if isinstance(answer, NotExpressible):
        return {"na": answer.reason}
    assert isinstance(answer, Prediction)
    return {
        "model_states": answer.model_states,
        "activations": answer.activations,
        "total": answer.total,
        "how": answer.how,
        "extra": answer.extra,
    }


def run_case(case: Case, peers: list[Any]) -> dict[str, Any]:
    start = time.perf_counter()
    truth = measure(case)
    seconds = time.perf_counter() - start
    measured = truth["measured"]
    ours = truth["memplan"]
    tools: dict[str, dict[str, Any]] = {}
    tools[MEMPLAN] = {
        "model_states": ours["model_states"],
        "activations": ours["activations"],
        "total": ours["peak"],
    }
    if ours["peak"] is None:
        tools[MEMPLAN]["na_total"] = "activations not modelled"
    s = setting(case)
    for peer in peers:
        tools[peer.NAME] = ask_peer(peer, s)
    for answer in tools.values():
        if "na" in answer:
            continue
        for part, truth_key in CATEGORIES:
            answer[f"error_{part}"] = error(answer.get(part), measured[truth_key])
    return {
        "case": case.name,
        "model": case.model,
        "precision": case.precision,
        "optimizer": case.optimizer,
        "engine": case.engine,
        "zero_stage": case.stage,
        "ranks": case.ranks,
        "micro_batch_size": case.micro_batch_size,
        "sequence_length": case.sequence_length,
        "attention": case.attention,
        "activation_checkpointing": case.checkpointing,
        "dropout": case.dropout,
        "measured": measured,
        "model_states_exact": truth["model_states_exact"],
        "tools": tools,
        "verify_seconds": round(seconds, 2),
    }


# --- summary, tables, plot -----------------------------------------------------------------


def _stats(errors: list[float]) -> dict[str, Any]:
    magnitudes = [abs(e) for e in errors]
    return {
        "median_abs_error": statistics.median(magnitudes) if magnitudes else None,
        "max_abs_error": max(magnitudes) if magnitudes else None,
        "cases": len(magnitudes),
    }


def summarize(rows: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    """Per tool: |relative error| of the total per-GPU bytes against the measured peak
    (median, max, how many cases the tool could express), and the same for model states and
    activations under their own keys."""
    out = {}
    for tool in tools:
        answers = [r["tools"][tool] for r in rows if tool in r["tools"]]

        def errors(part: str, answers: list[dict[str, Any]] = answers) -> list[float]:
            return [a[f"error_{part}"] for a in answers if a.get(f"error_{part}") is not None]

        out[tool] = {
            **_stats(errors("total")),
            "model_states": _stats(errors("model_states")),
            "activations": _stats(errors("activations")),
        }
    return out


def _pct(e: float | None) -> str:
    if e is None:
        return "—"
    if e == 0:
        return "0 (exact)"
    if abs(e) < 1e-5:
        return f"{'+' if e > 0 else '-'}<0.001%"
    if abs(e) < 0.01:
        return f"{100 * e:+.3f}%"
    return f"{100 * e:+.1f}%" if abs(e) < 0.1 else f"{100 * e:+.0f}%"


def _cell(answer: dict[str, Any] | None, key: str) -> str:
    if answer is None:
        return "not installed"
    if "na" in answer:
        return f"n/a: {answer['na']}"
    if key == "error_total" and answer.get("na_total"):
        return f"n/a: {answer['na_total']}"
    value = answer.get(key)
    if value is None:
        return "not reported"
    return _pct(value)


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB"


TITLES = {
    "total": "Total per GPU: each tool's figure against the measured peak of the step",
    "model_states": "Model states (parameters + gradients + optimizer states + buffers)",
    "activations": "Activations (bytes autograd saves for backward, loss included)",
}


def markdown(doc: dict[str, Any]) -> str:
    tools = list(doc["tools"])
    rows = doc["cases"]

    def p(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f}%"

    def stats(s: dict[str, Any]) -> str:
        return f"{s['cases']} | {p(s['median_abs_error'])} | {p(s['max_abs_error'])}"

    out = [
        "### Summary: |relative error| per tool (cases the tool could express, median, max)",
        "",
        "| tool | total: cases | median | max | model states: cases | median | max "
        "| activations: cases | median | max |",
        "| --- |" + " ---: |" * 9,
    ]
    for tool, s in doc["tools"].items():
        out.append(
            f"| {tool} | {stats(s)} | {stats(s['model_states'])} | {stats(s['activations'])} |"
        )
    header = "| case | measured |" + "".join(f" {t} |" for t in tools)
    rule = "| --- | ---: |" + " ---: |" * len(tools)
    for part, truth_key in CATEGORIES:
        out += ["", f"### {TITLES[part]}", "", header, rule]
        for r in rows:
            cells = "".join(f" {_cell(r['tools'].get(t), f'error_{part}')} |" for t in tools)
            out.append(f"| {r['case']} | {_mib(r['measured'][truth_key])} |{cells}")
    for f in doc.get("skipped_cases", []):
        out += ["", f"Not run: {f['case']} ({f['why']})"]
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars per case and tool, on a log axis: |relative error| of the total per-GPU
    figure, of the model states and of the activations (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = doc["cases"]
    tools = list(doc["tools"])
    floor = 1e-5  # errors below 0.001% (memplan's exact model states: 0) are drawn there
    fig, axes = plt.subplots(3, 1, figsize=(max(9.0, 0.55 * len(rows) + 3), 13.0), sharex=True)
    width = 0.8 / len(tools)
    panels = (
        ("error_total", "total per GPU vs the measured peak", ""),
        (
            "error_model_states",
            "model states (parameters + gradients + optimizer states)",
            "model_states",
        ),
        ("error_activations", "activations (saved for backward)", "activations"),
    )
    for ax, (key, title, sub) in zip(axes, panels, strict=True):
        handles = []
        for i, tool in enumerate(tools):
            xs, ys = [], []
            for j, r in enumerate(rows):
                e = r["tools"].get(tool, {}).get(key)
                if e is not None:
                    xs.append(j + (i - (len(tools) - 1) / 2) * width)
                    ys.append(max(abs(e), floor) * 100)
            s = doc["tools"][tool][sub] if sub else doc["tools"][tool]
            median = "—" if s["median_abs_error"] is None else f"{100 * s['median_abs_error']:.2g}%"
            color = plt.get_cmap("tab10")(i)
            ax.bar(xs, ys, width=width, color=color)
            label = f"{tool}: median {median} over {s['cases']} cases"
            handles.append(Patch(color=color, label=label))
        ax.set_yscale("log")
        ax.set_ylim(floor * 100 / 2, 300)
        ax.set_ylabel("|predicted - measured| / measured (%)")
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xticks(range(len(rows)))
    axes[-1].set_xticklabels([r["case"] for r in rows], rotation=60, ha="right", fontsize=7)
    fig.suptitle(
        "memplan and its peers against memplan verify's measurement, one training step per case\n"
        "(no bar: the tool cannot express the case or does not report the part; "
        "bars at 0.001%: exact or below)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(doc: dict[str, Any], out: Path) -> None:
    """accuracy.json, accuracy.md and accuracy.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(doc, indent=1) + "\n")
    env = doc["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    head = (
        f"# memplan accuracy: {len(doc['cases'])} cases, measured by memplan verify on CPU\n\n"
        f"Generated by `python benchmarks/accuracy.py` in {env['seconds']:.0f} s on "
        f"{env['cpus']} cores at commit {env['commit']}"
        f"{' (memplan/ had uncommitted changes)' if env['tree_dirty'] else ''}; "
        f"versions: {versions}.\n"
        "Errors are (predicted - measured) / measured on the most-loaded rank.\n\n"
    )
    (out / "accuracy.md").write_text(head + markdown(doc))
    try:
        plot(doc, out / "accuracy.png")
    except ImportError:
        print("matplotlib is not installed: no accuracy.png", file=sys.stderr)


def environment(grid: str, seconds: float) -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "grid": grid,
        "seconds": round(seconds, 1),
        "commit": git("rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "memplan")),
        # When and where: scripts/gen_readme.py prints the commit beside the README's figures.
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {
            d: version(d)
            for d in ("torch", "transformers", "deepspeed", "accelerate", "llm-analysis")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the six-case grid")
    parser.add_argument("--only", action="append", default=[], help="run this case (repeat)")
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.add_argument("--no-peers", action="store_true", help="memplan alone")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-render accuracy.md/.png beside this accuracy.json without measuring",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write accuracy.json/.md/.png here (default: benchmarks/results/ for the full "
        "grid; nothing for --quick and --only)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name}{'  (quick)' if c.quick else ''}")
        return 0
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
        write(doc, args.from_json.parent)
        return 0
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.only if n not in by_name]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; --list shows the names")
    if args.only:
        cases, grid = [by_name[n] for n in args.only], "only"
    elif args.quick:
        cases, grid = [c for c in CASES if c.quick], "quick"
    else:
        cases, grid = list(CASES), "full"
    out = args.out if args.out is not None else (RESULTS if grid == "full" else None)

    peers = [] if args.no_peers else [p for p in PEERS if p.available()]
    skipped = [] if args.no_peers else [p.NAME for p in PEERS if not p.available()]
    tools = [MEMPLAN, *(p.NAME for p in peers)]
    start = time.perf_counter()
    rows, failed = [], []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_case(case, peers))
        except Exception as err:  # e.g. verify refuses a case that does not fit here
            why = f"{type(err).__name__}: {err}"
            print(f"    skipped: {why}", file=sys.stderr)
            failed.append({"case": case.name, "why": why})
            continue
        r = rows[-1]
        print(
            f"    measured peak {_mib(r['measured']['peak'])} in {r['verify_seconds']:.1f} s; "
            + ", ".join(f"{t} {_cell(r['tools'].get(t), 'error_total')}" for t in tools),
            file=sys.stderr,
        )
    doc = {
        "tools": summarize(rows, tools),
        "skipped_peers": skipped,
        "skipped_cases": failed,
        "cases": rows,
        "environment": environment(grid, time.perf_counter() - start),
    }
    if out is not None:
        write(doc, out)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(markdown(doc))
        if skipped:
            print(f"not installed (skipped): {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
