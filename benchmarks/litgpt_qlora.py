"""LitGPT's QLoRA (`model.implementation: litgpt`, `finetune.method: qlora`): memplan's rule
(memplan.model.stacks.litgpt_qlora, litgpt_lora) against litgpt 0.5.9's real LoRA model with
bitsandbytes' own 4-bit linears and StableEmbedding on CPU, the whole matrix.

Lightning's own BitsandbytesPrecision cannot run here (lightning 2.6 fabric/plugins/precision/
bitsandbytes.py::_Linear4bit.quantize raises "Unexpected device type: cpu"), so the probe
(tests/litgpt_probe.py::held_bytes_qlora) does what it does with bitsandbytes' CPU code: the
Linears Lightning's convert_module picks (run on the meta device: every Linear, lm_head
included) become bitsandbytes Linear4bit quantized from fp16, the embedding is swapped for
StableEmbedding as finetune/lora.py::main swaps it, and Fabric (32-true or bf16-true) runs
finetune/lora.py::fit's forward and loss.

Part 1, `matrix`: 32-true / bf16-true (memplan fp32 / bf16) x nf4 with and without double
quantization x five target sets (as benchmarks/litgpt_lora.py) x LoRA dropout 0 and 0.05 x
4 and 2 k/v heads x (batch, sequence) (1, 200), (2, 16), (2, 300); the saved bytes measured
against the rule's, with the installed bitsandbytes (>= 0.43.2: no matmul input kept).

Part 2, `llama2_7b_quant_state`: each distinct 4-bit weight shape of Llama 2 7B as LitGPT
builds it (fused qkv [12288, 4096], proj, fc_1 / fc_2, mlp proj, lm_head [32000, 4096]),
quantized by bitsandbytes' quantize_4bit on CPU (nf4, nf4-dq): the packed weights' and the
quantization state's bytes against memplan's inventory of the published rows' model (the
quantization codes differ by memplan's two more weights per layer: transformers' q, k, v).

Part 3, `optimizer_held`: finetune/lora.py::main's order (setup_module, litgpt's own
instantiate_bnb_optimizer -> bitsandbytes' PagedAdamW over model.parameters(), then the
StableEmbedding swap) run for two real steps on CPU (PagedAdamW keeps ordinary tensors there)
at 32-true / bf16-true x nf4 with and without double quantization x the five target sets: the
optimizer's state bytes, the gradients still allocated after zero_grad (the StableEmbedding's),
the replaced embedding weight its param_groups keep, and how many trainable parameters have
no state, against memplan's estimate.

Parts 4-6, `*_no_stable_embedding`: the same without the StableEmbedding swap
(`finetune.stable_embedding: false`: litgpt <= 0.4.13 and lit-gpt 2023 ran none; the swap came
in litgpt PR #1770, commit ae798aba, first tagged v0.5.0): the probes skip the swap statements
(tests/litgpt_probe.py, stable_embedding=False), so the embedding stays the frozen model's.
Part 4 is Part 1's matrix; Part 5 the parallel-residual Block (benchmarks/litgpt_lora_neox.py's
five architectures x 32-true / bf16-true x nf4 / nf4-dq x q+v / all+head x dropout 0 / 0.05 x
(1, 200), (2, 16)); Part 6 is Part 3's optimizer run.

    PYTHONPATH=$PWD python benchmarks/litgpt_qlora.py   # ~2 min on 2 cores
    # writes benchmarks/results/litgpt-qlora.json

Needs bitsandbytes (pip install bitsandbytes; 0.50.2 here) besides benchmarks/litgpt_lora.py's
litgpt 0.5.9 and lightning 2.6.6.
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
from benchmarks.litgpt_lora import TARGETS, flags  # noqa: E402
from benchmarks.published_others import litgpt as published_spec  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.finetune import lora as finetune  # noqa: E402
from memplan.model.load import load_inventory  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.model.stacks import litgpt_qlora  # noqa: E402
from memplan.precision import dtype_bytes  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.litgpt_probe import (  # noqa: E402
    PRECISION,
    Shape,
    held_bytes_qlora,
    hf_config,
    qlora_optimizer_held,
)

OUT = ROOT / "benchmarks" / "results" / "litgpt-qlora.json"


def cfg_of(shape: Shape) -> dict[str, Any]:
    """The HF config of a probe shape: benchmarks.litgpt_activations' Llama-shaped one, else
    the parallel-residual architectures' (tests/litgpt_probe.py::hf_config)."""
    return config(shape) if shape.arch == "llama" else hf_config(shape)


def spec_of(
    shape: Shape,
    precision: str,
    targets: tuple[str, ...] | str,
    dropout: float,
    double: bool,
    swap: bool = True,
) -> Any:
    """The memplan spec of one matrix case (validated); `swap` False: finetune.
    stable_embedding false (no StableEmbedding swap, litgpt <= 0.4.13)."""
    cfg = cfg_of(shape)
    swap_key = {} if swap else {"stable_embedding": False}
    return validate(
        {
            "model": {"architecture": cfg, "implementation": "litgpt"},
            "precision": precision,
            "optimizer": {"name": "paged_adamw"},
            "training": {"micro_batch_size": shape.batch, "sequence_length": shape.seq},
            "finetune": {
                "method": "qlora",
                "rank": 8,
                "alpha": 16,
                "dropout": dropout,
                "target_modules": list(targets),
                "quant_type": "nf4",
                "double_quant": double,
                **swap_key,
            },
            "hardware": {"device": "cpu"},
        }
    ).spec


def predict(
    shape: Shape,
    precision: str,
    targets: tuple[str, ...] | str,
    dropout: float,
    double: bool,
    swap: bool = True,
) -> activations.Activations:
    spec = spec_of(shape, precision, targets, dropout, double, swap)
    saved = activations.micro_batch(
        from_config(cfg_of(shape)), setting_of(spec), layout_of(spec), spec.finetune
    )
    assert saved.modelled, saved.notes
    return saved


def matrix(swap: bool = True) -> list[dict[str, Any]]:
    """Part 1 (Part 4 with `swap` False: no StableEmbedding swap, finetune.stable_embedding
    false, as litgpt <= 0.4.13's main)."""
    rows = []
    for precision in ("fp32", "bf16"):
        for double in (False, True):
            for name, targets in TARGETS.items():
                for dropout in (0.0, 0.05):
                    for kv in (4, 2):
                        for batch, seq in ((1, 200), (2, 16), (2, 300)):
                            shape = Shape(layers=2, batch=batch, seq=seq, kv_heads=kv)
                            lora = flags(targets, dropout)
                            measured = held_bytes_qlora(
                                precision, shape, lora, double=double, stable_embedding=swap
                            )
                            memplan = predict(
                                shape, precision, targets, dropout, double, swap
                            ).bytes
                            rows.append(
                                {
                                    "stable_embedding": swap,
                                    "precision": precision,
                                    "fabric_precision": PRECISION[precision],
                                    "double_quant": double,
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


def neox_no_swap() -> list[dict[str, Any]]:
    """Part 5: Part 4 on the parallel-residual Block (benchmarks/litgpt_lora_neox.py's
    architectures and k/v heads: Pythia, Falcon-7B, Falcon-40B, phi-1.5, phi-2; the shape of
    the published StableLM Alpha, phi-1.5 and Falcon rows), no StableEmbedding swap."""
    from benchmarks.litgpt_lora_neox import KV

    rows = []
    for arch, kv in KV.items():
        for precision in ("fp32", "bf16"):
            for double in (False, True):
                for name in ("q+v", "all+head"):
                    for dropout in (0.0, 0.05):
                        for batch, seq in ((1, 200), (2, 16)):
                            shape = Shape(arch=arch, layers=2, batch=batch, seq=seq, kv_heads=kv)
                            targets = TARGETS[name]
                            lora = flags(targets, dropout)
                            measured = held_bytes_qlora(
                                precision, shape, lora, double=double, stable_embedding=False
                            )
                            memplan = predict(
                                shape, precision, targets, dropout, double, swap=False
                            ).bytes
                            rows.append(
                                {
                                    "stable_embedding": False,
                                    "arch": arch,
                                    "precision": precision,
                                    "double_quant": double,
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


def optimizer_held(swap: bool = True) -> list[dict[str, Any]]:
    """Part 3: the optimizer litgpt instantiates, run for two steps after the StableEmbedding
    swap (tests/litgpt_probe.py::qlora_optimizer_held), against memplan's estimate; `swap`
    False (Part 6): without the swap, finetune.stable_embedding false."""
    rows = []
    for precision in ("fp32", "bf16"):
        for double in (False, True):
            for name, targets in TARGETS.items():
                shape = Shape(layers=2, batch=2, seq=16)
                real = qlora_optimizer_held(
                    precision, shape, flags(targets, 0.0), double=double, stable_embedding=swap
                )
                spec = spec_of(shape, precision, targets, 0.0, double, swap)
                inventory = from_config(config(shape))
                report = estimate(spec, inventory)
                held = finetune.apply(spec, inventory)
                start = dict(report.timeline.points[0].by_category)
                replaced = [
                    t for t in held.parameters if t.name.startswith(litgpt_qlora.REPLACED_PREFIX)
                ]
                measured = {
                    "state_bytes": real.state_bytes,
                    "kept_gradient_bytes": sum(real.kept_grads.values()),
                    "replaced_weight_bytes": real.outside_model,
                    "trainable_without_state": len(set(real.trainable) - set(real.with_state)),
                }
                mine = {
                    "state_bytes": report.per_gpu.bytes_of("optimizer_states")
                    + sum(t.bytes for t in report.per_gpu.host_terms),
                    "kept_gradient_bytes": start["gradients"],
                    "replaced_weight_bytes": sum(
                        t.numel * dtype_bytes(t.dtype or spec.recipe().parameters) for t in replaced
                    ),
                    "trainable_without_state": sum(
                        t.trainable and not t.stepped for t in held.parameters
                    ),
                }
                rows.append(
                    {
                        "stable_embedding": swap,
                        "precision": precision,
                        "double_quant": double,
                        "targets": name,
                        "with_state": list(real.with_state),
                        "measured": measured,
                        "memplan": mine,
                        "exact": measured == mine,
                    }
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "with_state"}))
    return rows


# Llama 2 7B as LitGPT builds it: (out, in) of each 4-bit Linear and how many there are.
LLAMA2_7B_LINEARS = {
    "attn.qkv": ((12288, 4096), 32),
    "attn.proj": ((4096, 4096), 32),
    "mlp.fc_1": ((11008, 4096), 32),
    "mlp.fc_2": ((11008, 4096), 32),
    "mlp.proj": ((4096, 11008), 32),
    "lm_head": ((32000, 4096), 1),
}


def llama2_7b_quant_state() -> list[dict[str, Any]]:
    import bitsandbytes.functional as F

    rows = []
    for double in (False, True):
        real = {"packed": 0, "absmax": 0, "nested_absmax": 0, "codes": 0, "weights": 0}
        for (out_f, in_f), count in LLAMA2_7B_LINEARS.values():
            packed, state = F.quantize_4bit(
                torch.ones(out_f, in_f, dtype=torch.half),
                blocksize=64,
                compress_statistics=double,
                quant_type="nf4",
            )
            real["packed"] += packed.nbytes * count
            real["weights"] += count
            tensors = {k: t for k, t in state.as_dict(packed=False).items() if torch.is_tensor(t)}
            if double:
                tensors["nested_offset"] = state.offset
            for key, t in tensors.items():
                group = key if key in ("absmax", "nested_absmax") else "codes"
                real[group] += t.nbytes * count
        loaded = validate(published_spec(1, "bnb.nf4-dq" if double else "bnb.nf4"))
        inv = finetune.apply(loaded.spec, load_inventory(loaded))

        def nbytes(ts: Any) -> int:
            return sum(t.numel * dtype_bytes(t.dtype) for t in ts)

        states = [t for t in inv.buffers if t.role == "quant_state"]
        leaf = {t.name: t.name.rsplit(".", 1)[-1] for t in states}
        packed_params = [t for t in inv.parameters if t.dtype == "uint8"]
        mine = {
            "packed": nbytes(packed_params),
            "absmax": nbytes(t for t in states if leaf[t.name] == "absmax"),
            "nested_absmax": nbytes(t for t in states if leaf[t.name] == "nested_absmax"),
            "codes": nbytes(t for t in states if leaf[t.name] not in ("absmax", "nested_absmax")),
            "weights": len(packed_params),
        }
        rows.append(
            {
                "quantize": "bnb.nf4-dq" if double else "bnb.nf4",
                "bitsandbytes": real,
                "memplan": mine,
                "exact": {k: real[k] == mine[k] for k in real},
                "memplan_minus_bitsandbytes": sum(
                    mine[k] - real[k] for k in real if k != "weights"
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import bitsandbytes

    start = time.time()
    quant = llama2_7b_quant_state()
    held = optimizer_held()
    rows = matrix()
    held_no_swap = optimizer_held(swap=False)
    rows_no_swap = matrix(swap=False)
    neox = neox_no_swap()
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/litgpt_qlora.py",
        "versions": {
            "torch": torch.__version__,
            "litgpt": version("litgpt"),
            "lightning": version("lightning"),
            "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(),
        },
        "summary": {
            "cases": len(rows),
            "exact": sum(r["exact"] for r in rows),
            "llama2_7b_quant_state": {
                r["quantize"]: f"packed, absmax, nested absmax exact: "
                f"{all(r['exact'][k] for k in ('packed', 'absmax', 'nested_absmax'))}; memplan "
                f"{r['memplan_minus_bitsandbytes']:+,} B in all (codes of its 64 more weights)"
                for r in quant
            },
            "optimizer_held": {
                "cases": len(held),
                "exact": sum(r["exact"] for r in held),
            },
            "no_stable_embedding": {
                "matrix": f"{sum(r['exact'] for r in rows_no_swap)} of {len(rows_no_swap)} exact",
                "neox": f"{sum(r['exact'] for r in neox)} of {len(neox)} exact",
                "optimizer_held": f"{sum(r['exact'] for r in held_no_swap)} of "
                f"{len(held_no_swap)} exact",
            },
            "seconds": round(time.time() - start, 1),
        },
        "matrix": rows,
        "optimizer_held": held,
        "llama2_7b_quant_state": quant,
        "matrix_no_stable_embedding": rows_no_swap,
        "neox_no_stable_embedding": neox,
        "optimizer_held_no_stable_embedding": held_no_swap,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
