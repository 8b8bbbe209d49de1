"""LitGPT's adapter and adapter_v2 (`model.implementation: litgpt`, `finetune.method: adapter`
or `adapter_v2`): memplan's inventory (memplan.model.stacks.litgpt_adapter) against litgpt
0.5.9's own adapter GPTs, and what their forward saves, measured for the rule to come.

Part 1, `inventory`: memplan's presets against litgpt's own config entries (Llama-3-8B,
Qwen2.5-0.5B, Mistral-7B-v0.1, Llama-2-7b-hf; phi-1_5 and phi-2 from their config.json sizes)
x adapter / adapter_v2 x Fabric's 32-true /
bf16-true / bf16-mixed (memplan fp32 / bf16 / amp-bf16): `litgpt.adapter(_v2).GPT` built on
the meta device under Fabric's precision plugin's module_init_context, marked by its own
mark_only_adapter(_v2)_as_trainable (tests/litgpt_probe.py::adapter_parameters), with the
trainable flag of what gets a gradient in finetune/adapter(_v2).py::fit's order
(adapter_fit_grads: the no-grad validation first, then training). A row is exact when every
name, shape, dtype and trainable flag is equal.

Part 2, `optimizer`: the tiny model (n_embd 64, 4 heads, 4 layers; Llama-shaped with 4, 2
and 1 k/v heads, and Phi-1.5-shaped) run on CPU in fit's order
with litgpt's own instantiate_torch_optimizer("AdamW", model.parameters()), two steps
(tests/litgpt_probe.py::adapter_optimizer_held): the parameters with state, exp_avg and
exp_avg_sq bytes, gradient bytes and the adapter_kv_cache storages against memplan's
estimate.

Part 3, `activations_measured`: what litgpt's adapter forward and fit's chunked loss hold for
backward on the tiny model (tests/litgpt_probe.py::held_bytes_adapter), each row's `memplan`
now the rule's bytes (memplan.model.stacks.litgpt_adapter_saved.activations) and `exact` whether
they are equal.

Part 4, `activations`: the rule against the same measure over the Llama-, Qwen2.5-, Mistral-,
Phi-3-, phi-1.5- and phi-2-shaped tiny configs (phi: the parallel-residual Block with one
shared LayerNorm) and a Pythia-shaped one (GPT-NeoX, StableLM Alpha's Block: two LayerNorms,
a quarter of each head rotated) (tests/litgpt_probe.py::ARCHS; Llama also
multi-query) x adapter / adapter_v2 x 32-true / bf16-true / bf16-mixed x adapter_start_layer
0 / 2 x (batch, sequence, adapter_prompt_length) (1, 200, 10) / (2, 300, 7), three layers, and
(2, 300, 7) again with LitGPT's recomputation (every Block checkpointed:
tests/litgpt_probe.py::held_bytes_adapter, checkpointed).

    PYTHONPATH=$PWD python benchmarks/litgpt_adapter.py   # every part
    PYTHONPATH=$PWD python benchmarks/litgpt_adapter.py --activations   # parts 3 and 4 only
    # writes benchmarks/results/litgpt-adapter.json
"""

from __future__ import annotations

import importlib
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

from benchmarks.published_others import PHI_1_5  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations as memplan_activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.finetune import lora as finetune  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.precision import dtype_bytes  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.litgpt_probe import (  # noqa: E402
    PRECISION,
    Shape,
    adapter_fit_grads,
    adapter_optimizer_held,
    adapter_parameters,
    held_bytes_adapter,
    hf_config,
)
from tests.test_litgpt_activations import tiny  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "litgpt-adapter.json"
PHI_2: dict[str, Any] = {
    **PHI_1_5,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "partial_rotary_factor": 0.4,
}
"""microsoft/phi-2 config.json's sizes (hidden 2560, 32 layers, 32 heads, intermediate 10240,
partial_rotary_factor 0.4, vocabulary 51200), litgpt 0.5.9 config.py's "phi-2" entry."""
MODELS: list[tuple[str | dict[str, Any], str]] = [
    ("llama-3-8b", "Llama-3-8B"),
    ("qwen2.5-0.5b", "Qwen2.5-0.5B"),
    ("mistral-7b", "Mistral-7B-v0.1"),
    ("llama-2-7b", "Llama-2-7b-hf"),
    (PHI_1_5, "phi-1_5"),
    (PHI_2, "phi-2"),
]
"""memplan's preset (or config.json) and litgpt's own config entry of each part 1 model."""
METHODS = ("adapter", "adapter_v2")
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}


def spec_of(model: dict[str, Any], method: str, precision: str) -> Any:
    return validate(
        {
            "model": {**model, "implementation": "litgpt"},
            "precision": precision,
            "optimizer": {"name": "adamw"},
            "finetune": {"method": method},
            "training": {"micro_batch_size": 2, "sequence_length": 16},
            "hardware": {"device": "cpu"},
        }
    )


def inventory() -> list[dict[str, Any]]:
    rows = []
    for preset, name in MODELS:
        for method in METHODS:
            config = importlib.import_module(f"litgpt.{method}").Config.from_name(name)
            trained = adapter_fit_grads(config, method)
            for precision in ("fp32", "bf16", "amp-bf16"):
                raw = adapter_parameters(name, method, PRECISION[precision])
                real = {n: (s, DTYPE_NAMES[d], trained[n]) for n, (s, d, _) in raw.items()}
                model = {"preset": preset} if isinstance(preset, str) else {"architecture": preset}
                loaded = spec_of(model, method, precision)
                inv = finetune.apply(loaded.spec, load_inventory(loaded))
                held = loaded.spec.recipe().parameters
                mine = {t.name: (t.shape, t.dtype or held, t.trainable) for t in inv.parameters}
                numel = {n: int(torch.Size(s).numel()) for n, (s, _, _) in real.items()}
                rows.append(
                    {
                        "model": name,
                        "preset": preset if isinstance(preset, str) else None,
                        "method": method,
                        "precision": precision,
                        "fabric_precision": PRECISION[precision],
                        "tensors": len(real),
                        "elements": sum(numel.values()),
                        "marked_trainable_elements": sum(numel[n] for n in raw if raw[n][2]),
                        "trained_elements": sum(numel[n] for n, v in real.items() if v[2]),
                        "memplan_trainable_elements": sum(
                            t.numel for t in inv.parameters if t.trainable
                        ),
                        "adapter_kv_cache_bytes": sum(
                            b.numel * dtype_bytes(b.dtype or held)
                            for b in inv.buffers
                            if "adapter_kv_cache" in b.name
                        ),
                        "exact": mine == real,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def optimizer() -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        for precision in ("fp32", "bf16", "amp-bf16"):
            for arch, kv in (("llama", 4), ("llama", 2), ("llama", 1), ("phi-1.5", 4)):
                layers = 4
                shape = Shape(arch=arch, layers=layers, kv_heads=kv)
                real = adapter_optimizer_held(precision, shape, method)
                cfg = tiny(layers, kv) if arch == "llama" else hf_config(shape)
                loaded = spec_of({"architecture": cfg}, method, precision)
                spec = loaded.spec
                inv = finetune.apply(spec, from_config(cfg))
                report = estimate(spec, from_config(cfg))
                terms = {t.name: t.bytes for t in report.per_gpu.terms}
                held = spec.recipe().parameters
                cache = sum(
                    b.numel * dtype_bytes(b.dtype or held)
                    for b in inv.buffers
                    if "adapter_kv_cache" in b.name
                )
                grads = sum(t.bytes for t in report.per_gpu.terms if t.category == "gradients")
                row = {
                    "method": method,
                    "precision": precision,
                    "architecture": arch,
                    "kv_heads": kv,
                    "layers": layers,
                    "with_state": len(real.with_state),
                    "memplan_trainable_tensors": sum(t.trainable for t in inv.parameters),
                    "exp_avg_measured": real.by_key["exp_avg"][1],
                    "exp_avg_memplan": terms["exp_avg"],
                    "grad_bytes_measured": real.grad_bytes,
                    "grad_bytes_memplan": grads,
                    "cache_bytes_measured": real.cache_bytes,
                    "cache_bytes_memplan": cache,
                }
                row["exact"] = (
                    set(real.with_state) == {t.name for t in inv.parameters if t.trainable}
                    and row["exp_avg_measured"] == row["exp_avg_memplan"]
                    and row["grad_bytes_measured"] == row["grad_bytes_memplan"]
                    and row["cache_bytes_measured"] == row["cache_bytes_memplan"]
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def predict(
    shape: Shape, method: str, precision: str, start: int, length: int, mode: str = "none"
) -> Any:
    """memplan's activations for the tiny model `shape` (its config.json: hf_config)."""
    cfg = hf_config(shape)
    loaded = validate(
        {
            "model": {"architecture": cfg, "implementation": "litgpt"},
            "precision": precision,
            "optimizer": {"name": "adamw"},
            "finetune": {
                "method": method,
                "adapter_start_layer": start,
                "adapter_prompt_length": length,
            },
            "training": {
                "micro_batch_size": shape.batch,
                "sequence_length": shape.seq,
                "activation_checkpointing": mode,
            },
            "hardware": {"device": "cpu"},
        }
    )
    spec = loaded.spec
    return memplan_activations.micro_batch(
        from_config(cfg), setting_of(spec), layout_of(spec), spec.finetune
    )


ARCH_KV = (
    ("llama", 2),
    ("llama", 1),
    ("qwen2.5", 2),
    ("mistral", 2),
    ("phi-3", 4),
    ("phi-1.5", 4),
    ("phi-2", 4),
    ("pythia", 4),
)
CASES = (("none", 1, 200, 10), ("none", 2, 300, 7), ("full", 2, 300, 7))
"""(activation_checkpointing, batch, sequence, adapter_prompt_length) of each part 4 row."""
"""Part 4's tiny architectures and their k/v heads (Phi-3-mini is multi-head; Llama also
multi-query, where the cached k/v are views of one head)."""


def activations() -> list[dict[str, Any]]:
    rows = []
    for arch, kv in ARCH_KV:
        for method in METHODS:
            for precision in ("fp32", "bf16", "amp-bf16"):
                for start in (0, 2):
                    for mode, batch, seq, length in CASES:
                        shape = Shape(arch=arch, layers=3, kv_heads=kv, batch=batch, seq=seq)
                        measured = held_bytes_adapter(
                            precision,
                            shape,
                            method,
                            start=start,
                            length=length,
                            checkpointed=mode != "none",
                        )
                        saved = predict(shape, method, precision, start, length, mode)
                        memplan = saved.bytes if saved.modelled else None
                        rows.append(
                            {
                                "architecture": arch,
                                "model_type": hf_config(shape)["model_type"],
                                "method": method,
                                "precision": precision,
                                "checkpointing": mode,
                                "adapter_start_layer": start,
                                "adapter_prompt_length": length,
                                "layers": 3,
                                "kv_heads": kv,
                                "batch": batch,
                                "sequence": seq,
                                "measured": measured,
                                "memplan": memplan,
                                "exact": measured == memplan,
                                "config": hf_config(shape),
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def activations_measured() -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        for precision in ("fp32", "bf16", "amp-bf16"):
            for start in (0, 2):
                for kv in (4, 2):
                    for batch, seq in ((2, 16), (1, 200)):
                        shape = Shape(layers=3, kv_heads=kv, batch=batch, seq=seq)
                        measured = held_bytes_adapter(precision, shape, method, start=start)
                        saved = predict(shape, method, precision, start, 10)
                        memplan = saved.bytes if saved.modelled else None
                        rows.append(
                            {
                                "method": method,
                                "precision": precision,
                                "adapter_start_layer": start,
                                "layers": 3,
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


def main() -> None:
    """Every part; with `--activations`, parts 3 and 4 only, the other parts' rows and summary
    lines kept from the results file."""
    start = time.time()
    only = "--activations" in sys.argv[1:]
    old = json.loads(OUT.read_text()) if only else {}
    inv = old["inventory"] if only else inventory()
    opt = old["optimizer"] if only else optimizer()
    act, matrix = activations_measured(), activations()
    summary = {
        "inventory": f"{sum(r['exact'] for r in inv)} of {len(inv)} exact",
        "optimizer": f"{sum(r['exact'] for r in opt)} of {len(opt)} exact",
        "activations_measured": (
            f"{sum(r['exact'] for r in act)} of {len(act)} exact (the rule against part 3's "
            "measured cases)"
        ),
        "activations": f"{sum(r['exact'] for r in matrix)} of {len(matrix)} exact",
        "seconds": round(time.time() - start, 1),
    }
    if only:
        summary["seconds_activations_only"] = summary.pop("seconds")
        summary["seconds"] = old["summary"].get("seconds")
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/litgpt_adapter.py"
        + (" --activations" if only else ""),
        "versions": {
            "torch": torch.__version__,
            "litgpt": version("litgpt"),
            "lightning": version("lightning"),
            "python": platform.python_version(),
        },
        "summary": summary,
        "inventory": inv,
        "optimizer": opt,
        "activations_measured": act,
        "activations": matrix,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
