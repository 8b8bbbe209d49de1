"""LitGPT's LoRA (`model.implementation: litgpt`, `finetune.method: lora`): memplan's rule
(memplan.model.stacks.litgpt_lora) against litgpt 0.5.9's real LoRA model, the whole matrix.

Part 1, `matrix`: `litgpt.lora.GPT` built tiny on CPU (tests/litgpt_probe.py: n_embd 64,
4 heads, LLaMAMLP 192, vocab 256), `mark_only_lora_as_trainable`, run by Lightning Fabric's
own precision plugin with finetune/lora.py::fit's forward and loss (`lm_head_chunk_size=128`,
the last position dropped, `chunked_cross_entropy`), what it holds for backward measured by
the storages still alive (tests/litgpt_probe.py::held_bytes_lora), for 32-true / bf16-true /
bf16-mixed (memplan fp32 / bf16 / amp-bf16) x no checkpointing / LitGPT's per-Block
checkpointing x five target sets (q+v: finetune/lora.py's default; q+k+v+o; q+v+mlp; o only;
all-linear+head) x LoRA dropout 0 and 0.05 x 4 (MHA: one grouped conv1d) and 2 (GQA: a
conv1d per part) k/v heads x (batch, sequence) (1, 200), (2, 16), (2, 300) (one head chunk,
or several with a short last one; one sequence, whose head chunks and targets are views, or
two, whose are copies).

Part 1b, `architectures`: the same for litgpt/config.py's Llama-shaped relatives the LoRA rule
covers (tests/litgpt_probe.py::ARCHS, against the config.json of each: hf_config): Qwen2.5
(qkv bias, 2 k/v heads), Mistral-7B-v0.1 (a sliding-window mask per layer, 2 k/v heads),
Phi-3-mini-4k (sliding window, multi-head), Phi-4-mini (rotary_percentage 0.75) x 32-true /
bf16-true / bf16-mixed x none / full x q+v and all+head x LoRA dropout 0.05 x (batch,
sequence) (1, 200), (2, 300). Gemma and Gemma 2 are refused by the LoRA rule
(memplan.model.stacks.litgpt_lora.saved says why); Pythia, StableLM Alpha and Falcon are
benchmarks/litgpt_lora_neox.py's.

Part 2, `llama2_7b_fake`: two blocks of Llama 2 7B (n_embd 4096, 32 heads, MHA, LLaMAMLP
11008, vocab 32000) under FakeTensorMode at the published rows' 1304 tokens, micro-batch 1
and 2, bf16-true, LoRA r 8 dropout 0.05 on query + value (the settings of
benchmarks/reference/litgpt-lora-a100.md), against the rule.

    PYTHONPATH=$PWD python benchmarks/litgpt_lora.py   # ~1 min on 2 cores
    # writes benchmarks/results/litgpt-lora.json

Installed with: pip install --no-deps litgpt==0.5.9 lightning==2.6.6
lightning-utilities==0.15.3 torchmetrics==1.9.0
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.litgpt_activations import config  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.litgpt_probe import (  # noqa: E402
    PRECISION,
    Lora,
    Shape,
    held_bytes_lora,
    held_bytes_lora_fake,
    hf_config,
)

OUT = ROOT / "benchmarks" / "results" / "litgpt-lora.json"

TARGETS: dict[str, tuple[str, ...] | str] = {
    "q+v": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "q+v+mlp": ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
    "o": ("o_proj",),
    "all+head": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head"),
}  # fmt: skip
"""peft's names, as a memplan spec gives them -> LitGPT's lora_* flags (Lora below)."""


def flags(targets: tuple[str, ...] | str, dropout: float) -> Lora:
    on = set(targets)
    return Lora(
        r=8,
        alpha=16,
        dropout=dropout,
        query="q_proj" in on,
        key="k_proj" in on,
        value="v_proj" in on,
        projection="o_proj" in on,
        mlp="gate_proj" in on,
        head="lm_head" in on,
    )


def predict(
    shape: Shape, precision: str, mode: str, targets: tuple[str, ...] | str, dropout: float
) -> activations.Activations:
    cfg = config(shape) if shape.arch == "llama" else hf_config(shape)
    loaded = validate(
        {
            "model": {"architecture": cfg, "implementation": "litgpt"},
            "precision": precision,
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": shape.batch,
                "sequence_length": shape.seq,
                "activation_checkpointing": mode,
            },
            "finetune": {
                "method": "lora",
                "rank": 8,
                "alpha": 16,
                "dropout": dropout,
                "target_modules": list(targets),
            },
            "hardware": {"device": "cpu"},
        }
    )
    spec = loaded.spec
    saved = activations.micro_batch(
        from_config(cfg), setting_of(spec), layout_of(spec), spec.finetune
    )
    assert saved.modelled, saved.notes
    return saved


def matrix() -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16", "amp-bf16"):
        for mode in ("none", "full"):
            for name, targets in TARGETS.items():
                for dropout in (0.0, 0.05):
                    for kv in (4, 2):
                        for batch, seq in ((1, 200), (2, 16), (2, 300)):
                            shape = Shape(layers=2, batch=batch, seq=seq, kv_heads=kv)
                            lora = flags(targets, dropout)
                            measured = held_bytes_lora(precision, mode, shape, lora)
                            memplan = predict(shape, precision, mode, targets, dropout).bytes
                            rows.append(
                                {
                                    "precision": precision,
                                    "fabric_precision": PRECISION[precision],
                                    "checkpointing": mode,
                                    "targets": name,
                                    "dropout": dropout,
                                    "kv_heads": kv,
                                    "batch": batch,
                                    "sequence": seq,
                                    "measured": measured,
                                    "memplan": memplan,
                                    "exact": measured == memplan,
                                }
                            )
                            print(json.dumps(rows[-1]), flush=True)
    return rows


ARCH_KV = {"qwen2.5": 2, "mistral": 2, "phi-3": 4, "phi-4-mini": 2}
"""Part 1b's architectures and their k/v heads (Phi-3-mini is multi-head)."""


def architectures() -> list[dict[str, Any]]:
    rows = []
    for arch, kv in ARCH_KV.items():
        for precision in ("fp32", "bf16", "amp-bf16"):
            for mode in ("none", "full"):
                for name in ("q+v", "all+head"):
                    targets = TARGETS[name]
                    for batch, seq in ((1, 200), (2, 300)):
                        shape = Shape(arch=arch, layers=2, batch=batch, seq=seq, kv_heads=kv)
                        lora = flags(targets, 0.05)
                        measured = held_bytes_lora(precision, mode, shape, lora)
                        memplan = predict(shape, precision, mode, targets, 0.05).bytes
                        rows.append(
                            {
                                "architecture": arch,
                                "model_type": hf_config(shape)["model_type"],
                                "precision": precision,
                                "checkpointing": mode,
                                "targets": name,
                                "dropout": 0.05,
                                "kv_heads": kv,
                                "batch": batch,
                                "sequence": seq,
                                "measured": measured,
                                "memplan": memplan,
                                "exact": measured == memplan,
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
    return rows


LLAMA2_7B = Shape(
    layers=2, batch=1, seq=1304, dim=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000
)
"""Two blocks of Llama 2 7B (litgpt/config.py "Llama-2-7b{}-hf") at the published 1304 tokens."""


def llama2_7b_fake() -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 2):
        shape = Shape(**{**LLAMA2_7B.__dict__, "batch": batch})
        targets = TARGETS["q+v"]
        measured = held_bytes_lora_fake("bf16", "none", shape, flags(targets, 0.05))
        memplan = predict(shape, "bf16", "none", targets, 0.05).bytes
        rows.append(
            {
                "precision": "bf16",
                "checkpointing": "none",
                "targets": "q+v",
                "dropout": 0.05,
                "layers": shape.layers,
                "batch": batch,
                "sequence": shape.seq,
                "measured": measured,
                "memplan": memplan,
                "exact": measured == memplan,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    start = time.time()
    rows = matrix()
    archs = architectures()
    fake = llama2_7b_fake()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/litgpt_lora.py",
        "versions": {
            "torch": torch.__version__,
            "litgpt": version("litgpt"),
            "lightning": version("lightning"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows) + len(archs) + len(fake),
            "exact": sum(r["exact"] for r in (*rows, *archs, *fake)),
            "architectures": {
                a: f"{sum(r['exact'] for r in archs if r['architecture'] == a)} of "
                f"{sum(r['architecture'] == a for r in archs)} exact"
                for a in ARCH_KV
            },
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "architectures": archs,
        "llama2_7b_fake": fake,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
