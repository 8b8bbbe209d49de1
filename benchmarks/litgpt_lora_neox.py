"""LitGPT's LoRA and QLoRA on its parallel-residual Block (GPT-NeoX: Pythia, StableLM Alpha;
Falcon): memplan's rule (memplan.model.stacks.litgpt_lora_neox.neox_layer) against litgpt 0.5.9's
real `litgpt.lora.GPT` on CPU, the sibling of benchmarks/litgpt_lora.py (Llama-shaped) and
benchmarks/litgpt_qlora.py.

The models are litgpt's own Config with the fields of tests/litgpt_probe.py::ARCHS:
"pythia" (LayerNorm with bias, parallel_residual, GptNeoxMLP exact GELU, biases, rotary
0.25; part `configs` checks that these are litgpt/config.py's own "stablelm-base-alpha-3b"
and "pythia-1b" entries but for the sizes), "falcon-7b" (shared_attention_norm, one k/v
head, no biases), "falcon-40b" (two norms, grouped queries) and "phi-1.5" / "phi-2"
(shared_attention_norm, biases, GELU tanh, rotary 0.5 / 0.4, lm_head bias: litgpt's
"phi-1_5" / "phi-2" entries but for the sizes), each against the config.json
of its checkpoint type (tests/litgpt_probe.py::hf_config), stored with every row so that
tests/test_litgpt_lora_neox.py can replay the rule without torch.

Part 1, `lora`: tests/litgpt_probe.py::held_bytes_lora (Fabric's own precision plugin,
finetune/lora.py::fit's forward and chunked loss, what autograd holds measured by the
storages still alive) for 32-true / bf16-true / bf16-mixed (memplan fp32 / bf16 / amp-bf16)
x no checkpointing / LitGPT's per-Block checkpointing x benchmarks/litgpt_lora.py's five
target sets (q+v, q+k+v+o, q+v+mlp, o, all-linear+head) x LoRA dropout 0 and 0.05 x (batch,
sequence) (1, 200), (2, 16), (2, 300): the whole matrix for pythia (4 heads, multi-head: one
grouped conv1d), and q+v and all+head at dropout 0 and 0.05 for the two Falcons (a conv1d
per part) and the two Phis.

Part 2, `qlora`: tests/litgpt_probe.py::held_bytes_qlora (every Linear a bitsandbytes
Linear4bit quantized on CPU, its bias a frozen copy as Lightning's _convert_layers makes it,
the embedding swapped for StableEmbedding) for 32-true / bf16-true x nf4 with and without
double quantization x q+v and all+head x dropout 0 and 0.05 x (1, 200), (2, 16), with the
installed bitsandbytes (>= 0.43.2: no matmul input kept).

Part 3, `stablelm_3b_fake`: two blocks of StableLM Alpha 3B (n_embd 4096, 32 heads,
GptNeoxMLP 16384, padded vocab 50688) under FakeTensorMode at the 1034 tokens of LitGPT's
published resource table (micro-batch 1, 2, 4), bf16-true, r 8, dropout 0.05 on query +
value (finetune/lora.py's defaults).

Part 4, `phi_1_5_fake`: the same for two blocks of phi-1.5 (n_embd 2048, 32 heads, GptNeoxMLP
8192, padded vocab 51200) at the published table's 1044 tokens.

    PYTHONPATH=$PWD python benchmarks/litgpt_lora_neox.py   # ~5 min on 2 cores
    # writes benchmarks/results/litgpt-lora-neox.json

Installed as benchmarks/litgpt_lora.py and benchmarks/litgpt_qlora.py say.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.litgpt_lora import TARGETS, flags  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.litgpt_probe import (  # noqa: E402
    PRECISION,
    Shape,
    config,
    held_bytes_lora,
    held_bytes_lora_fake,
    held_bytes_qlora,
    hf_config,
)

OUT = ROOT / "benchmarks" / "results" / "litgpt-lora-neox.json"

KV = {"pythia": 4, "falcon-7b": 1, "falcon-40b": 2, "phi-1.5": 4, "phi-2": 4}
"""Each architecture's k/v heads of 4 (Pythia multi-head, Falcon-7B multi-query, Falcon-40B
grouped, phi-1.5 / phi-2 multi-head)."""
SHAPES = ((1, 200), (2, 16), (2, 300))


def spec_doc(
    cfg: dict[str, Any],
    precision: str,
    mode: str,
    batch: int,
    seq: int,
    targets: tuple[str, ...] | str,
    dropout: float,
    double: bool | None = None,
) -> dict[str, Any]:
    """The memplan spec of one case (`double` None: LoRA; else QLoRA nf4 with or without
    double quantization). tests/test_litgpt_lora_neox.py builds the same from a row."""
    finetune: dict[str, Any] = {
        "method": "lora" if double is None else "qlora",
        "rank": 8,
        "alpha": 16,
        "dropout": dropout,
        "target_modules": list(targets),
    }
    if double is not None:
        finetune |= {"quant_type": "nf4", "double_quant": double}
    return {
        "model": {"architecture": cfg, "implementation": "litgpt"},
        "precision": precision,
        "optimizer": {"name": "adamw" if double is None else "paged_adamw"},
        "training": {
            "micro_batch_size": batch,
            "sequence_length": seq,
            "activation_checkpointing": mode,
        },
        "finetune": finetune,
        "hardware": {"device": "cpu"},
    }


def predict(doc: dict[str, Any]) -> int:
    spec = validate(doc).spec
    saved = activations.micro_batch(
        from_config(doc["model"]["architecture"]), setting_of(spec), layout_of(spec), spec.finetune
    )
    assert saved.modelled, saved.notes
    return saved.bytes


def _row(arch: str, shape: Shape, cfg: dict[str, Any], **case: Any) -> dict[str, Any]:
    return {
        "architecture": arch,
        "config": cfg,
        **case,
        "batch": shape.batch,
        "sequence": shape.seq,
    }


def lora() -> list[dict[str, Any]]:
    rows = []
    for arch, kv in KV.items():
        names = list(TARGETS) if arch == "pythia" else ["q+v", "all+head"]
        for precision in ("fp32", "bf16", "amp-bf16"):
            for mode in ("none", "full"):
                for name in names:
                    for dropout in (0.0, 0.05):
                        for batch, seq in SHAPES:
                            shape = Shape(arch=arch, layers=2, batch=batch, seq=seq, kv_heads=kv)
                            cfg = hf_config(shape)
                            targets = TARGETS[name]
                            measured = held_bytes_lora(
                                precision, mode, shape, flags(targets, dropout)
                            )
                            doc = spec_doc(cfg, precision, mode, batch, seq, targets, dropout)
                            memplan = predict(doc)
                            rows.append(
                                _row(
                                    arch,
                                    shape,
                                    cfg,
                                    precision=precision,
                                    fabric_precision=PRECISION[precision],
                                    checkpointing=mode,
                                    targets=name,
                                    dropout=dropout,
                                    measured=measured,
                                    memplan=memplan,
                                    exact=measured == memplan,
                                )
                            )
                            print(json.dumps({**rows[-1], "config": "..."}), flush=True)
    return rows


def qlora() -> list[dict[str, Any]]:
    rows = []
    for arch, kv in KV.items():
        for precision in ("fp32", "bf16"):
            for double in (False, True):
                for name in ("q+v", "all+head"):
                    for dropout in (0.0, 0.05):
                        for batch, seq in SHAPES[:2]:
                            shape = Shape(arch=arch, layers=2, batch=batch, seq=seq, kv_heads=kv)
                            cfg = hf_config(shape)
                            targets = TARGETS[name]
                            lo = flags(targets, dropout)
                            measured = held_bytes_qlora(precision, shape, lo, double=double)
                            doc = spec_doc(
                                cfg, precision, "none", batch, seq, targets, dropout, double
                            )
                            memplan = predict(doc)
                            rows.append(
                                _row(
                                    arch,
                                    shape,
                                    cfg,
                                    precision=precision,
                                    double_quant=double,
                                    targets=name,
                                    dropout=dropout,
                                    measured=measured,
                                    memplan=memplan,
                                    exact=measured == memplan,
                                )
                            )
                            print(json.dumps({**rows[-1], "config": "..."}), flush=True)
    return rows


STABLELM_3B = Shape(
    arch="pythia",
    layers=2,
    batch=1,
    seq=1034,
    dim=4096,
    heads=32,
    kv_heads=32,
    ffn=16384,
    vocab=50688,
)
"""Two blocks of litgpt/config.py's "stablelm-base-alpha-3b" (part `configs`: the same fields)
at the published table's 1034 tokens."""


PHI_1_5 = Shape(
    arch="phi-1.5",
    layers=2,
    batch=1,
    seq=1044,
    dim=2048,
    heads=32,
    kv_heads=32,
    ffn=8192,
    vocab=51200,
)
"""Two blocks of litgpt/config.py's "phi-1_5" (part `configs`: the same fields) at the
published table's 1044 tokens."""


def phi_1_5_fake() -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 2, 4):
        shape = Shape(**{**PHI_1_5.__dict__, "batch": batch})
        cfg = hf_config(shape)
        targets = TARGETS["q+v"]
        measured = held_bytes_lora_fake("bf16", "none", shape, flags(targets, 0.05))
        memplan = predict(spec_doc(cfg, "bf16", "none", batch, shape.seq, targets, 0.05))
        rows.append(
            _row(
                "phi-1_5",
                shape,
                cfg,
                precision="bf16",
                checkpointing="none",
                targets="q+v",
                dropout=0.05,
                measured=measured,
                memplan=memplan,
                exact=measured == memplan,
            )
        )
        print(json.dumps({**rows[-1], "config": "..."}), flush=True)
    return rows


def stablelm_3b_fake() -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 2, 4):
        shape = Shape(**{**STABLELM_3B.__dict__, "batch": batch})
        cfg = hf_config(shape)
        targets = TARGETS["q+v"]
        measured = held_bytes_lora_fake("bf16", "none", shape, flags(targets, 0.05))
        memplan = predict(spec_doc(cfg, "bf16", "none", batch, shape.seq, targets, 0.05))
        rows.append(
            _row(
                "stablelm-base-alpha-3b",
                shape,
                cfg,
                precision="bf16",
                checkpointing="none",
                targets="q+v",
                dropout=0.05,
                measured=measured,
                memplan=memplan,
                exact=measured == memplan,
            )
        )
        print(json.dumps({**rows[-1], "config": "..."}), flush=True)
    return rows


def configs() -> dict[str, list[str]]:
    """The fields in which the probe's "pythia" Config differs from litgpt's own entries at
    their sizes (name, hf_config, vocab_size and padding_multiple are not model fields the
    GPT reads: it is built with padded_vocab_size)."""
    from litgpt.config import Config

    sizes = {
        "stablelm-base-alpha-3b": STABLELM_3B,
        "pythia-1b": Shape(arch="pythia", dim=2048, heads=8, kv_heads=8, ffn=8192, vocab=50304),
        "phi-1_5": PHI_1_5,
        "phi-2": Shape(arch="phi-2", dim=2560, heads=32, kv_heads=32, ffn=10240, vocab=51200),
    }
    out = {}
    for name, shape in sizes.items():
        own = asdict(Config.from_name(name))
        probe = asdict(config(Shape(**{**shape.__dict__, "layers": own["n_layer"]})))
        probe["block_size"] = own["block_size"]  # the probe's is max(128, seq)
        out[name] = sorted(k for k in own if own[k] != probe.get(k))
    return out


def main() -> None:
    start = time.time()
    same = configs()
    rows = lora()
    quant = qlora()
    fake = stablelm_3b_fake()
    phi = phi_1_5_fake()
    every = (*rows, *quant, *fake, *phi)
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/litgpt_lora_neox.py",
        "versions": {
            "torch": torch.__version__,
            "litgpt": version("litgpt"),
            "lightning": version("lightning"),
            "bitsandbytes": version("bitsandbytes"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(every),
            "exact": sum(r["exact"] for r in every),
            "by_architecture": {
                a: f"{sum(r['exact'] for r in every if r['architecture'] == a)} of "
                f"{sum(r['architecture'] == a for r in every)} exact"
                for a in (*KV, "stablelm-base-alpha-3b", "phi-1_5")
            },
            "configs_differ_from_litgpt_entries_in": same,
            "seconds": round(time.time() - start, 1),
        },
        "lora": rows,
        "qlora": quant,
        "stablelm_3b_fake": fake,
        "phi_1_5_fake": phi,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
