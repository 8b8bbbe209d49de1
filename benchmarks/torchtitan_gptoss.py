"""torchtitan 0.3.0's own gpt-oss (`model.implementation: torchtitan`, model_type gpt_oss):
memplan's rule (memplan.model.stacks.torchtitan_gptoss) against torchtitan's real model, the
whole matrix; the parameter count of torchtitan's own 20b and 120b flavors against memplan's
inventory of the presets; `memplan estimate` of gpt-oss-20b and gpt-oss-120b with torchtitan's
model code beside transformers'.

Part 1, `matrix`: torchtitan's GptOssModel built tiny on CPU from its own layer factory
(tests/torchtitan_gptoss_probe.py: dim 64, vocab 256, sequence 16, bf16 parameters, the
default varlen attention with a CPU kernel for `torch_attn::_varlen_attn` that allocates its
outputs as the op's own fake does), forward + cross_entropy_loss, what it holds for backward
measured by the storages still alive, against the rule's CPU branch (`traced=True`), for two
attention shapes (4 heads x 16 over 2 k/v heads; 4 x 16 over 4, no GQA) x two expert shapes
(8 experts, top 2, hidden 32; 16 experts, top 4, hidden 24) x none / full (FullAC) /
selective-op (SelectiveAC) x batch 1 and 2 x 1, 2 and 3 layers; then two documents per row
(VarlenMetadata with 2 x batch sequences) for each recompute mode, and every-Nth-layer full
checkpointing (4 and 6 layers, N = 2 and 3).

Part 2, `parameters`: torchtitan's `20b` and `120b` flavors built on the meta device
(models/gpt_oss/__init__.py::gptoss_configs, named_parameters: sinks and every bias) against
the parameter count of memplan's inventory of the gpt-oss-20b and gpt-oss-120b presets
(transformers' GptOssForCausalLM, stored): an independent count of the model states.

Part 3, `estimates`: `memplan estimate` of gpt-oss-20b (FSDP2 over 8 H100-80GB, 1 x 8192 as
torchtitan's config_registry.py::gpt_oss_20b, bf16-mixed AdamW) and gpt-oss-120b (FSDP2 over
64), for none / full / selective-op with torchtitan's model code and full with transformers':
activations, peak allocated and max reserved; plus the refusals (hardware.device cpu).

    PYTHONPATH=$PWD python benchmarks/torchtitan_gptoss.py   # ~2 min on 2 cores
    # writes benchmarks/results/torchtitan-gptoss.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchtitan  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.model.inventory import Architecture  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.model.stacks import torchtitan_gptoss as rule  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from memplan.report.settings import setting_of  # noqa: E402
from tests.torchtitan_gptoss_probe import GptOssShape, held_bytes, parameter_count  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-gptoss.json"
GIB = 2**30
HEADS = ((4, 2, 16), (4, 4, 16))
"""(heads, k/v heads, head_dim): GQA as the 20b / 120b (64 over 8), and none."""
EXPERTS = ((8, 2, 32), (16, 4, 24))
"""(experts, top_k, expert hidden): 1/4 of the experts per token, top 4 as the 20b / 120b."""
MODES = ("none", "full", "selective-op")


def architecture(shape: GptOssShape) -> Architecture:
    """`shape` as memplan's Architecture of a gpt_oss config."""
    return Architecture(
        model_type="gpt_oss",
        hidden_size=shape.dim,
        num_layers=shape.layers,
        vocab_size=shape.vocab,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.ffn,
        num_experts=shape.experts,
        num_experts_per_token=shape.top_k,
        max_position_embeddings=4096,
    )


def setting(mode: str, shape: GptOssShape, every: int = 1) -> Setting:
    """The Setting memplan derives for a bf16-mixed FSDP2 spec on CPU (report.settings.
    setting_of; the spec's architecture is a stand-in llama of the same shape: only the
    training and precision keys reach the Setting)."""
    spec = validate(
        {
            "model": {
                "architecture": {
                    "model_type": "llama",
                    "hidden_size": shape.dim,
                    "intermediate_size": 128,
                    "num_hidden_layers": shape.layers,
                    "num_attention_heads": shape.heads,
                    "num_key_value_heads": shape.kv_heads,
                    "vocab_size": shape.vocab,
                    "max_position_embeddings": 128,
                },
                "implementation": "torchtitan",
            },
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": shape.batch,
                "sequence_length": shape.seq,
                "activation_checkpointing": mode,
                "checkpoint_every": every,
            },
            "parallelism": {"engine": "fsdp2", "data": 8},
            "hardware": {"device": "cpu"},
        }
    ).spec
    return setting_of(spec)


def predicted(mode: str, shape: GptOssShape, every: int = 1) -> int:
    saved = rule.saved(architecture(shape), setting(mode, shape, every), traced=True)
    assert saved.modelled, saved.notes
    return saved.bytes


def cases() -> list[tuple[str, GptOssShape, int]]:
    out = []
    for heads, kv, d in HEADS:
        for experts, top_k, ffn in EXPERTS:
            base = GptOssShape(
                heads=heads, kv_heads=kv, head_dim=d, experts=experts, top_k=top_k, ffn=ffn
            )
            for mode in MODES:
                for batch in (1, 2):
                    for layers in (1, 2, 3):
                        out.append((mode, replace(base, batch=batch, layers=layers), 1))
    for mode in MODES:
        out.append((mode, GptOssShape(documents=2), 1))
    for layers in (4, 6):
        for every in (2, 3):
            out.append(("full", GptOssShape(layers=layers), every))
    return out


def matrix() -> list[dict[str, Any]]:
    rows = []
    for mode, shape, every in cases():
        measured = held_bytes(mode, shape, every)
        memplan = predicted(mode, shape, every)
        rows.append(
            {
                "heads": shape.heads,
                "kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim,
                "experts": shape.experts,
                "top_k": shape.top_k,
                "expert_hidden": shape.ffn,
                "checkpointing": mode,
                "checkpoint_every": every,
                "layers": shape.layers,
                "batch": shape.batch,
                "documents": shape.documents,
                "measured": measured,
                "memplan": memplan,
                "exact": measured == memplan,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spec_of(preset: str, mode: str, implementation: str, data: int, **hw: Any) -> dict[str, Any]:
    return {
        "model": {"preset": preset, "implementation": implementation},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 1,
            "sequence_length": 8192,
            "activation_checkpointing": mode,
        },
        "parallelism": {"engine": "fsdp2", "data": data},
        "hardware": hw or {"gpu": "H100-80GB"},
    }


def parameters() -> list[dict[str, Any]]:
    rows = []
    for flavor, preset in (("20b", "gpt-oss-20b"), ("120b", "gpt-oss-120b")):
        loaded = validate(spec_of(preset, "full", "torchtitan", 8))
        inventory = load_inventory(loaded)
        memplan = sum(t.numel for t in inventory.parameters)
        measured = parameter_count(flavor)
        rows.append(
            {
                "flavor": flavor,
                "preset": preset,
                "torchtitan_named_parameters": measured,
                "memplan_inventory": memplan,
                "exact": measured == memplan,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


ESTIMATES = (
    ("gpt-oss-20b", "torchtitan", MODES, 8),
    ("gpt-oss-20b", "transformers", ("full",), 8),
    ("gpt-oss-120b", "torchtitan", MODES, 64),
    ("gpt-oss-120b", "transformers", ("full",), 64),
)


def estimates() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for preset, implementation, modes, data in ESTIMATES:
        for mode in modes:
            loaded = validate(spec_of(preset, mode, implementation, data))
            report = estimate(loaded.spec, load_inventory(loaded))
            saved = report.activations
            row: dict[str, Any] = {
                "model": preset,
                "implementation": implementation,
                "checkpointing": mode,
                "data": data,
                "activations_modelled": saved.modelled,
            }
            if saved.modelled:
                reserved = report.peak_reserved
                assert reserved is not None
                layers = saved.block("layers")
                row |= {
                    "activations": saved.bytes,
                    "activations_gib": round(saved.bytes / GIB, 2),
                    "activations_per_layer": layers.bytes_each if layers else None,
                    "peak_allocated_gib": round(report.peak_bytes / GIB, 2),
                    "peak_reserved_gib": round(reserved / GIB, 2),
                }
            else:
                row["why"] = saved.notes[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    loaded = validate(spec_of("gpt-oss-20b", "full", "torchtitan", 8, device="cpu"))
    saved = estimate(loaded.spec, load_inventory(loaded)).activations
    rows.append({"model": "gpt-oss-20b", "hardware": "cpu", "why": saved.notes[0]})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    warnings.filterwarnings("ignore", message="In CPU autocast")  # the router's fp32 autocast
    start = time.time()
    rows = matrix()
    params = parameters()
    est = estimates()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_gptoss.py",
        "versions": {
            "torch": torch.__version__,
            "torchtitan": getattr(torchtitan, "__version__", "0.3.0"),
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows),
            "exact": sum(r["exact"] for r in rows),
            "parameters_exact": all(r["exact"] for r in params),
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "parameters": params,
        "estimates": est,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
