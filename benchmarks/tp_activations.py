"""The README's tensor-parallel activation table, measured: 2 gloo ranks with torch's DTensor TP.

    PYTHONPATH=. python benchmarks/tp_activations.py   # about 30-60 s on 2 cores; writes
                                                       # benchmarks/results/tp-activations.json

Runs the probes the tests use (tests/tp_probe.py: TP=2 and the unsharded control;
tests/tp_sp_probe.py: TP=2 with torchtitan's sequence parallelism) on the tiny Llama of
tests/conftest.py, and records, per precision x attention case, the bytes each decoder layer
saves on each rank, beside memplan's prediction for the same layout (engine megatron for TP
alone and for Megatron's SP rule, engine fsdp2 for torch's SP rule). scripts/gen_readme.py turns
the file into the README's table; it says "measured = predicted" only for the cells where that
holds on every layer of every rank.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

TP = 2


def predicted(config: dict[str, Any], case: Any, engine: str, tensor: int, sp: bool) -> int:
    from memplan import activations as acts
    from memplan.model.sources import from_config
    from memplan.report.settings import layout_of, setting_of
    from tests.conftest import make_spec
    from tests.tp_probe import BATCH, SEQ

    spec = make_spec(
        precision=case.precision,
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "attention": case.attention,
            "dropout": False,
        },
        hardware={"device": "cpu"},
        parallelism={"engine": engine, "tensor": tensor, "sequence_parallel": sp},
    )
    inventory = from_config(config)
    saved = acts.micro_batch(inventory, setting_of(spec), layout_of(spec), spec.finetune)
    block = saved.block("layers")
    assert block is not None
    return block.bytes_each


def main() -> int:
    import torch
    import transformers

    from tests import tp_probe, tp_sp_probe
    from tests.conftest import TINY_LLAMA

    config = dict(TINY_LLAMA)
    layers = config["num_hidden_layers"]
    cases = [tp_probe.Case(p, a) for p in tp_probe.PRECISIONS for a in ("eager", "sdpa")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tp").mkdir()
        (Path(tmp) / "sp").mkdir()
        tp_ranks = tp_probe.run_ranks(config, cases, Path(tmp) / "tp", world=TP)
        sp_ranks = tp_sp_probe.run_ranks(config, cases, Path(tmp) / "sp", world=TP)

    def per_layer(run: dict[str, Any], kind: str) -> list[int]:
        regions = run["regions"]
        if kind == "sp":
            return [sum(s["bytes"] for s in regions[f"layers.{i}"]) for i in range(layers)]
        return [sum(n for n, _, _ in regions[f"layers.{i}"]["storages"]) for i in range(layers)]

    rows = []
    for case in cases:
        measured = {
            "tp": [per_layer(r[case.name]["tp"], "tp") for r in tp_ranks],
            "sp": [per_layer(r[case.name]["sp"], "sp") for r in sp_ranks],
            "whole": [per_layer(r[case.name]["whole"], "tp") for r in tp_ranks],
        }
        rows.append(
            {
                "precision": case.precision,
                "attention": case.attention,
                # bytes one decoder layer saves, [rank][layer]
                "measured": measured,
                "predicted": {
                    "tp": predicted(config, case, "megatron", TP, False),
                    "sp": predicted(config, case, "fsdp2", TP, True),
                    "whole": predicted(config, case, "megatron", 1, False),
                    "sp_megatron": predicted(config, case, "megatron", TP, True),
                },
            }
        )
        print(case.name, {k: v[0][0] for k, v in measured.items()}, flush=True)
    doc = {
        "stamp": stamp(
            seconds=round(time.perf_counter() - start, 1),
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
            ranks=TP,
            model="tests/conftest.py::TINY_LLAMA",
            batch=tp_probe.BATCH,
            sequence=tp_probe.SEQ,
        ),
        "cases": rows,
    }
    out = ROOT / "benchmarks" / "results" / "tp-activations.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
