"""benchmarks/results/published-others.json against benchmarks/published_others.py: the
recorded rows are the script's rows (same sources, labels, published figures and specs), each
published figure is the one its reference file copied, and the rows memplan computes without
torch still give the recorded figure (the BERT rows trace a profile first: the script's run, not
this file's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "published-others.json"

sys.path.insert(0, str(ROOT))
from benchmarks import published_others as script  # noqa: E402


def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def test_results_hold_the_scripts_rows() -> None:
    """Same rows in the same order, each with the same spec, metric and published figure: a row
    added, dropped or edited in the script without rerunning it fails here."""
    rows = recorded()["rows"]
    assert [(r["source"], r["label"]) for r in rows] == [(r.source, r.label) for r in script.ROWS]
    for row, rec in zip(script.ROWS, rows, strict=True):
        assert rec["spec"] == json.loads(json.dumps(row.spec)), row.label
        assert (rec["metric"], rec["figure"]) == (row.metric, script.FIGURE[row.metric])
        assert (rec["published"], rec["unit"]) == (row.published, row.unit), row.label
        assert rec["unmodelled"] == list(row.unmodelled), row.label
    assert recorded()["sources"] == script.SOURCES


def test_every_published_figure_is_in_its_reference_file() -> None:
    """The figure a row compares against is the one copied, with its settings, into the
    source's reference file (benchmarks/reference/), and that file names the source's URL."""
    for key, source in script.SOURCES.items():
        text = (ROOT / source["reference"]).read_text()
        assert source["url"].split("/")[-1] in text, key
        for row in (r for r in script.ROWS if r.source == key):
            if row.published is None:
                figure = "OOM"
            else:
                figure = f"{row.published:.2f}" if row.unit != "MiB" else f"{row.published:.0f}"
            assert figure in text, row.label


def test_pin_recorded_figures_match_todays_memplan() -> None:
    """Pinning: the rows computed without torch (torchtitan's, and LitGPT's refusals) give
    today what the results file recorded; a change to memplan that moves them needs the script
    rerun."""
    rows = {(r["source"], r["label"]): r for r in recorded()["rows"]}
    for row in script.ROWS:
        if row.trace:
            continue
        now = script.measure(row)
        rec = rows[(row.source, row.label)]
        assert now["expressible"] == rec["expressible"], row.label
        if now["expressible"]:
            assert now["memplan_gib"] == rec["memplan_gib"], row.label
            assert now["error"] == rec["error"], row.label
            assert now["verdict"] == rec["verdict"], row.label
        else:
            assert now["why"] == rec["why"], row.label


def test_errors_are_the_recorded_figure_over_the_published_one() -> None:
    """Each expressible row's error is its memplan figure over the published one, in bytes
    (MiB and GiB binary, LitGPT's GB decimal), and the counts cover only the rows without
    unmodelled techniques."""
    doc = recorded()
    unit = {"MiB": 2**20, "GiB": 2**30, "GB": 10**9}
    done = []
    for r in doc["rows"]:
        if not r["expressible"]:
            assert r["why"]
            continue
        if r["published"] is None:
            continue  # an OOM row: a verdict, no error (test_oom_rows_are_verdicts)
        published = r["published"] * unit[r["unit"]] / 2**30
        assert abs(r["memplan_gib"] / published - 1 - r["error"]) < 1e-12
        if not r["unmodelled"]:
            done.append(r)
    assert doc["expressible"] == len(done)
    assert doc["within_10pct"] == sum(abs(r["error"]) <= 0.10 for r in done)
    assert doc["under_5pct"] == sum(r["error"] < -0.05 for r in done)


def test_oom_rows_are_verdicts() -> None:
    """A run its source printed as "OOM" is a row without a figure: recorded with memplan's
    verdict and whether it agrees (does not fit), and counted apart from the errors. The
    independent fact is the source's OOM; every recorded one agrees today."""
    doc = recorded()
    oom = [r for r in doc["rows"] if r["published"] is None]
    assert oom and all(r["expressible"] and r["error"] is None for r in oom)
    for r in oom:
        assert r["agrees"] == (r["verdict"] == "does_not_fit"), r["label"]
        # does not fit: what nvidia-smi would show is more than the GPU has (A100 40GB)
        assert r["device_used_gib"] > 40.0, r["label"]
    assert doc["oom_rows"] == len(oom)
    assert doc["oom_agree"] == sum(r["agrees"] for r in oom) == len(oom)


PUBLISHED_TRAINABLE = {
    "Llama 2 7B": 4_194_304,
    "Llama 2 13B": 6_553_600,
    "StableLM Alpha 3B": 2_097_152,
    "phi-1.5": 1_572_864,
    "Falcon 40B": 12_042_240,
}
"""LitGPT resource table's "Trainable parameters" column of its LoRA rows."""


def test_litgpt_rows_train_the_published_trainable_count() -> None:
    """Each LitGPT model's first LoRA row: memplan's adapters (LitGPT's default targets, its
    LoRAQKVLinear shape on Falcon's fused qkv) have the table's trainable count, which its
    reference file copies."""
    from memplan.config.load import validate
    from memplan.model.finetune.lora import apply, num_trainable
    from memplan.model.load import load_inventory

    text = (ROOT / script.SOURCES["litgpt"]["reference"]).read_text()
    for model, count in PUBLISHED_TRAINABLE.items():
        assert f"{count:,}" in text, model
        row = next(r for r in script.ROWS if r.source == "litgpt" and r.label.startswith(model))
        loaded = validate(row.spec)
        params = apply(loaded.spec, load_inventory(loaded)).parameters
        assert num_trainable(t for t in params if "lora_" in t.name) == count, model
