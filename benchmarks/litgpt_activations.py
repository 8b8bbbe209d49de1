"""LitGPT's own GPT (`model.implementation: litgpt`): memplan's rule against the real model,
the whole matrix, and LitGPT against transformers' Llama at Llama 3.1 8B's shape.

Part 1, `matrix`: litgpt 0.5.9's `litgpt.model.GPT` built tiny on CPU (tests/litgpt_probe.py:
n_embd 64, 4 heads, LLaMAMLP 192, vocab 256) and run by Lightning Fabric's own precision
plugins, forward + pretrain.py's `chunked_cross_entropy(logits, targets)`, what it holds for
backward measured by the storages still alive, against memplan.model.stacks.litgpt, for
32-true / bf16-true / bf16-mixed (memplan fp32 / bf16 / amp-bf16) x no checkpointing / LitGPT's
per-Block checkpointing x 4 / 2 / 1 k/v heads x batch 1 and 2 x 2 and 3 layers x sequence 16
and 100 (one loss chunk, or several with a short last one).

Part 1b, `fsdp_bf16_mixed`: Lightning's FSDPPrecision("bf16-mixed") without the sharding
(bf16 parameters and buffers under torch.autocast, tests/litgpt_probe.py::
held_bytes_fsdp_mixed) against the rule memplan applies to amp-bf16 over fsdp2 (bf16, no
autocast: memplan.report.estimate.setting_of).

Part 1c, `architectures`: the same measure for litgpt/config.py's other architectures the rule
covers, each a tiny model built with litgpt's own Config and the fields of a named entry
(tests/litgpt_probe.py::ARCHS) against the HF config.json memplan reads for it
(tests/litgpt_probe.py::hf_config): Qwen2.5 (qkv bias, 2 k/v heads), Mistral-7B-v0.1
(sliding window on every layer, 2 k/v heads), Phi-3-mini-4k (sliding window, multi-head),
Phi-4-mini (rotary_percentage 0.75 of a 32-dim head, 2 k/v heads),
Gemma (multi-query, head_size 32 over n_embd 64, and 4 heads of 16), gemma-2-9b (score and
logit softcapping, post-norms, the window on every other layer; 2 and 4 k/v heads), Pythia
(LayerNorm, parallel residual, GptNeoxMLP, biases, a quarter of each head rotated), Falcon-7B
(one shared norm, multi-query), Falcon-40B (two norms, 2 k/v heads) and phi-1.5 / phi-2
(one shared norm, biases, GELU tanh, half / 0.4 of each head rotated, lm_head bias), x 32-true /
bf16-true /
bf16-mixed x none / full x batch 1 and 2 x 2 and 3 layers x sequence 16 and 100.

Part 1d, `at_scale_fake`: two blocks of "Qwen2.5-7B", "Mistral-7B-v0.1",
"Phi-3-mini-4k-instruct", "Gemma-7b" and "gemma-2-9b" at 1 x 4096 and "pythia-1b",
"falcon-7b" and "phi-2" at 1 x 2048 under FakeTensorMode, fp32 and bf16, none and full
(tests/litgpt_probe.py::AT_SCALE).

Part 2, `llama31_8b_fake`: two blocks of Llama 3.1 8B at 1 x 8192 under FakeTensorMode (CPU
kernels' meta functions), fp32 and bf16, none and full, against the rule.

Part 3, `vs_transformers`: Llama 3.1 8B (32 layers), 1 x 8192 tokens, the saved bytes per
layer and per token per layer of LitGPT's GPT and of transformers' LlamaForCausalLM (memplan's
two rules, each proved against its own library), bf16 / amp-bf16 / fp32, CPU and CUDA kernels.

    PYTHONPATH=$PWD python benchmarks/litgpt_activations.py   # ~15 s on 2 cores
    # writes benchmarks/results/litgpt-activations.json

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

from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.settings import setting_of  # noqa: E402
from tests.litgpt_probe import (  # noqa: E402
    AT_SCALE,
    LLAMA31_8B,
    PRECISION,
    Shape,
    held_bytes,
    held_bytes_fake,
    held_bytes_fsdp_mixed,
    hf_config,
)

OUT = ROOT / "benchmarks" / "results" / "litgpt-activations.json"


def config(shape: Shape) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": max(128, shape.seq),
    }


def predict(
    cfg: dict[str, Any],
    precision: str,
    mode: str,
    *,
    batch: int,
    seq: int,
    implementation: str = "litgpt",
    device: str = "cpu",
) -> activations.Activations:
    spec = validate(
        {
            "model": {"architecture": cfg, "implementation": implementation},
            "precision": precision,
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": batch,
                "sequence_length": seq,
                "activation_checkpointing": mode,
            },
            "hardware": {"device": device},
        }
    ).spec
    saved = activations.predict(from_config(cfg), setting_of(spec))
    assert saved.modelled, saved.notes
    return saved


def matrix() -> list[dict[str, Any]]:
    rows = []
    for precision in PRECISION:
        for mode in ("none", "full"):
            for kv in (4, 2, 1):
                for batch in (1, 2):
                    for layers in (2, 3):
                        for seq in (16, 100):
                            shape = Shape(layers=layers, batch=batch, seq=seq, kv_heads=kv)
                            measured = held_bytes(precision, mode, shape)
                            memplan = predict(
                                config(shape), precision, mode, batch=batch, seq=seq
                            ).bytes
                            rows.append(
                                {
                                    "precision": precision,
                                    "fabric_precision": PRECISION[precision],
                                    "checkpointing": mode,
                                    "kv_heads": kv,
                                    "batch": batch,
                                    "layers": layers,
                                    "sequence": seq,
                                    "measured": measured,
                                    "memplan": memplan,
                                    "exact": measured == memplan,
                                }
                            )
                            print(json.dumps(rows[-1]), flush=True)
    return rows


VARIANTS = {
    "qwen2.5": {"kv_heads": 2},
    "mistral": {"kv_heads": 2},
    "phi-3": {"kv_heads": 4},
    "phi-4-mini": {"kv_heads": 2, "head_size": 32},
    "gemma-mqa": {"kv_heads": 1, "head_size": 32},
    "gemma-mha": {"kv_heads": 4},
    "gemma-2": {"kv_heads": 2},
    "gemma-2-mha": {"kv_heads": 4},
    "pythia": {"kv_heads": 4, "ffn": 256},
    "falcon-7b": {"kv_heads": 1, "ffn": 256},
    "falcon-40b": {"kv_heads": 2, "ffn": 256},
    "phi-1.5": {"kv_heads": 4, "ffn": 256},
    "phi-2": {"kv_heads": 4, "ffn": 256},
}
"""Part 1c's tiny models: each architecture's k/v heads (Phi-3-mini and Gemma-7b are
multi-head, Gemma-2b multi-query) and Gemma's head_size apart from n_embd // n_head."""


def architectures() -> list[dict[str, Any]]:
    rows = []
    for variant, fields in VARIANTS.items():
        arch = variant.removesuffix("-mqa").removesuffix("-mha")
        for precision in PRECISION:
            for mode in ("none", "full"):
                for batch in (1, 2):
                    for layers in (2, 3):
                        for seq in (16, 100):
                            shape = Shape(layers=layers, batch=batch, seq=seq, arch=arch, **fields)
                            measured = held_bytes(precision, mode, shape)
                            memplan = predict(
                                hf_config(shape), precision, mode, batch=batch, seq=seq
                            ).bytes
                            rows.append(
                                {
                                    "architecture": variant,
                                    "model_type": hf_config(shape)["model_type"],
                                    "precision": precision,
                                    "checkpointing": mode,
                                    "kv_heads": shape.kv_heads,
                                    "head_size": shape.head_size or shape.dim // shape.heads,
                                    "batch": batch,
                                    "layers": layers,
                                    "sequence": seq,
                                    "measured": measured,
                                    "memplan": memplan,
                                    "exact": measured == memplan,
                                }
                            )
                            print(json.dumps(rows[-1]), flush=True)
    return rows


def at_scale_fake() -> list[dict[str, Any]]:
    rows = []
    for name, shape in AT_SCALE.items():
        for precision in ("fp32", "bf16"):
            for mode in ("none", "full"):
                measured = held_bytes_fake(precision, mode, shape)
                memplan = predict(
                    hf_config(shape), precision, mode, batch=shape.batch, seq=shape.seq
                ).bytes
                rows.append(
                    {
                        "architecture": name,
                        "precision": precision,
                        "checkpointing": mode,
                        "layers": shape.layers,
                        "batch": shape.batch,
                        "sequence": shape.seq,
                        "measured": measured,
                        "memplan": memplan,
                        "exact": measured == memplan,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def fsdp_bf16_mixed() -> list[dict[str, Any]]:
    rows = []
    for mode in ("none", "full"):
        for kv in (4, 2, 1):
            shape = Shape(layers=2, batch=2, seq=100, kv_heads=kv)
            measured = held_bytes_fsdp_mixed(mode, shape)
            spec = validate(
                {
                    "model": {"architecture": config(shape), "implementation": "litgpt"},
                    "precision": "amp-bf16",
                    "optimizer": {"name": "adamw"},
                    "training": {
                        "micro_batch_size": shape.batch,
                        "sequence_length": shape.seq,
                        "activation_checkpointing": mode,
                    },
                    "parallelism": {"engine": "fsdp2", "data": 8},
                    "hardware": {"device": "cpu"},
                }
            ).spec
            st = setting_of(spec)
            assert not st.autocast
            memplan = activations.predict(from_config(config(shape)), st).bytes
            rows.append(
                {
                    "checkpointing": mode,
                    "kv_heads": kv,
                    "measured": measured,
                    "memplan": memplan,
                    "exact": measured == memplan,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def llama31_8b_fake() -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16"):
        for mode in ("none", "full"):
            measured = held_bytes_fake(precision, mode, LLAMA31_8B)
            memplan = predict(
                config(LLAMA31_8B), precision, mode, batch=LLAMA31_8B.batch, seq=LLAMA31_8B.seq
            ).bytes
            rows.append(
                {
                    "precision": precision,
                    "checkpointing": mode,
                    "layers": LLAMA31_8B.layers,
                    "batch": LLAMA31_8B.batch,
                    "sequence": LLAMA31_8B.seq,
                    "measured": measured,
                    "memplan": memplan,
                    "exact": measured == memplan,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vs_transformers() -> list[dict[str, Any]]:
    cfg = {**config(LLAMA31_8B), "num_hidden_layers": 32}
    seq = LLAMA31_8B.seq
    rows = []
    for device in ("cpu", "cuda"):
        for precision in ("bf16", "amp-bf16", "fp32"):
            row: dict[str, Any] = {"device": device, "precision": precision, "tokens": seq}
            for impl in ("litgpt", "transformers"):
                saved = predict(
                    cfg, precision, "none", batch=1, seq=seq, implementation=impl, device=device
                )
                layers = saved.block("layers")
                assert layers is not None
                row[impl] = {
                    "activations": saved.bytes,
                    "per_layer": layers.bytes_each,
                    "per_token_per_layer": round(layers.bytes_each / seq, 2),
                }
            row["litgpt_minus_transformers_per_token_per_layer"] = round(
                row["litgpt"]["per_token_per_layer"] - row["transformers"]["per_token_per_layer"], 2
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    start = time.time()
    rows = matrix()
    fsdp = fsdp_bf16_mixed()
    archs = architectures()
    scale = at_scale_fake()
    fake = llama31_8b_fake()
    versus = vs_transformers()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/litgpt_activations.py",
        "versions": {
            "torch": torch.__version__,
            "litgpt": version("litgpt"),
            "lightning": version("lightning"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows) + len(fsdp) + len(archs) + len(scale) + len(fake),
            "exact": sum(r["exact"] for r in (*rows, *fsdp, *archs, *scale, *fake)),
            "architectures": {
                v: f"{sum(r['exact'] for r in archs if r['architecture'] == v)} of "
                f"{sum(r['architecture'] == v for r in archs)} exact"
                for v in VARIANTS
            },
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "fsdp_bf16_mixed": fsdp,
        "architectures": archs,
        "at_scale_fake": scale,
        "llama31_8b_fake": fake,
        "vs_transformers_llama31_8b": versus,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
