"""The README's `memplan verify` table, measured: each case through memplan.verify's machinery.

    PYTHONPATH=. python benchmarks/verify_table.py     # about 2 min on 2 cores; writes
                                                       # benchmarks/results/verify.json

Each case is a tiny model (hidden 64, 2 layers, vocabulary 1,041, batch 2 x 16, the verify
tests' shapes: tests/test_verify_support.py; a Mixtral with 4 experts on the same shapes),
with the step settings of tests/test_verify_step.py (full and selective recomputation, eager
attention, dropout), built with transformers, stepped with the real torch
optimizer on one process or on gloo ranks, and compared category by category with memplan's
prediction (`memplan verify --json`'s document, kept whole per case and rank). The last case is
Llama-2-7B at full size under FakeTensorMode. scripts/gen_readme.py turns the file into the
README's table; nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1041,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": 1041,
}
# Mixtral's sparse MLP on the tiny Llama's shapes: 4 experts of intermediate 160, top-2 routing.
TINY_MIXTRAL: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "mixtral",
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
LLAMA_2_7B = ROOT / "tests" / "data" / "hf-configs" / "Llama-2-7b-hf.json"


def spec(model: dict[str, Any], **sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": model,
        "precision": "fp32",
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 2, "sequence_length": 16},
        "parallelism": {"engine": "ddp", "data": 1},
        "hardware": {"device": "cpu"},
    }
    doc.update(sections)
    return doc


LLAMA = {"architecture": TINY_LLAMA}


def training(**settings: Any) -> dict[str, Any]:
    """The default batch (2 x 16) with the step settings of issue 15 (`training.attention`,
    `dropout`, `activation_checkpointing`)."""
    return {"micro_batch_size": 2, "sequence_length": 16, **settings}


# (name, spec, verify options, ranks the README shows)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[int]]] = [
    ("Llama fp32, 1 process", spec(LLAMA), {}, [0]),
    ("Llama bf16-mixed, 1 process", spec(LLAMA, precision="bf16-mixed"), {}, [0]),
    (
        "GPT-2 fp32, SGD momentum",
        spec({"architecture": TINY_GPT2}, optimizer={"name": "sgd", "momentum": 0.9}),
        {},
        [0],
    ),
    (
        "Mixtral MoE (4 experts, top-2) fp32, 1 process",
        spec({"architecture": TINY_MIXTRAL}),
        {},
        [0],
    ),
    (
        "Llama fp32, full recomputation",
        spec(LLAMA, training=training(activation_checkpointing="full")),
        {},
        [0],
    ),
    (
        "Llama fp32, selective recomputation",
        spec(LLAMA, training=training(activation_checkpointing="selective")),
        {},
        [0],
    ),
    (
        "Llama fp32, eager attention + dropout",
        spec(LLAMA, training=training(attention="eager", dropout=True)),
        {},
        [0],
    ),
    (
        "FSDP2 ZeRO-3, 4 ranks",
        spec(LLAMA, parallelism={"engine": "fsdp2", "zero_stage": 3, "data": 4}),
        {"nproc": 4},
        [0, 3],
    ),
    (
        "DDP + ZeroRedundancyOptimizer (ZeRO-1), 4 ranks",
        spec(LLAMA, parallelism={"engine": "ddp", "zero_stage": 1, "data": 4}),
        {"nproc": 4},
        [0, 1, 2, 3],
    ),
    (
        "FSDP2 + TP 2 (DTensor, sequence parallel), bf16-mixed",
        spec(
            LLAMA,
            precision="bf16-mixed",
            parallelism={
                "engine": "fsdp2",
                "zero_stage": 3,
                "data": 1,
                "tensor": 2,
                "sequence_parallel": True,
            },
        ),
        {"nproc": 2},
        [0, 1],  # TP rank 1 holds 520 of the 1,041 vocabulary rows (torch.chunk)
    ),
    (
        "FSDP2 2-D (data 2 x TP 2), 4 ranks",
        spec(
            LLAMA,
            parallelism={"engine": "fsdp2", "zero_stage": 3, "data": 2, "tensor": 2},
        ),
        {"nproc": 4},
        [0, 1],
    ),
    (
        "DDP + TP 2 (DTensor), bf16-mixed",
        spec(
            LLAMA,
            precision="bf16-mixed",
            parallelism={"engine": "ddp", "data": 1, "tensor": 2},
        ),
        {"nproc": 2},
        [0, 1],
    ),
    (
        "Llama-2-7B bf16-mixed, `--fake` (full size, no memory)",
        spec(
            {"hf_config": str(LLAMA_2_7B)},
            precision="bf16-mixed",
            training={"micro_batch_size": 1, "sequence_length": 512},
        ),
        {"fake": True},
        [0],
    ),
]


def run_case(doc: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify

    result = verify(validate(doc), Options(**options), lambda _rank, _what: None)
    return to_json(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-fake", action="store_true", help="skip the full-size fake case")
    args = parser.parse_args(argv)
    import torch
    import transformers

    cases = []
    start = time.perf_counter()
    for name, doc, options, ranks in CASES:
        if args.no_fake and options.get("fake"):
            continue
        t0 = time.perf_counter()
        out = run_case(doc, options)
        seconds = time.perf_counter() - t0
        per_rank = out.get("ranks", [out["categories"]])
        model = doc["model"].get("hf_config") or doc["model"]["architecture"]["model_type"]
        cases.append(
            {
                "name": name,
                "spec": {**doc, "model": {"hf_config": Path(model).name}}
                if "hf_config" in doc["model"]
                else doc,
                "options": options,
                "shown_ranks": ranks,
                "ok": out["ok"],
                "failures": out["failures"],
                "notes": out["notes"],
                "ranks": per_rank,
                "seconds": round(seconds, 1),
            }
        )
        print(f"{name}: {'ok' if out['ok'] else 'FAIL'} ({seconds:.1f} s)", flush=True)
    result = {
        "stamp": stamp(
            seconds=round(time.perf_counter() - start, 1),
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
        ),
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
