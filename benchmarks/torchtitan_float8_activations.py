"""torchtitan's Llama 3 under torchao Float8Linear without tensor parallelism (eager, one rank:
the FSDP2-only layout), measured on CPU against memplan's rules: what forward + loss keep for
backward (memplan.activations.micro_batch from a spec, as memplan estimate builds it; memplan.
activations.torchtitan_float8_gemm.with_amax) and each Float8 GEMM's peak and what it leaves
(torchtitan_float8_gemm.gemm).

torchtitan 0.3.0's Llama 3 built tiny (tests/torchtitan_probe.py: dim 64, 4 heads, 2 k/v heads,
ffn 192, batch 2, SDPA, bf16 parameters as FSDP2's param_dtype gives them), its decoder Linears
converted by torchtitan 0.3.0's own Float8LinearConverter.convert (filter_fqns ["lm_head"]) to
torchao 0.18 Float8Linear, recipes tensorwise (018740b's default), rowwise and
rowwise_with_gw_hp, and the same model unconverted (bf16); checkpointing none, full and
selective-op; sequence 16 (32 tokens: the weight casts dominate) and 128 (256 tokens: the
activation casts dominate). Real CPU tensors: torch 2.13 has CPU kernels for torch._scaled_mm
(tensorwise and rowwise scales). tests/torchtitan_float8_probe.py says how it is measured.

    PYTHONPATH=$PWD python benchmarks/torchtitan_float8_activations.py   # ~1 min on 2 cores
    # writes benchmarks/results/torchtitan-float8-activations.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from memplan.activations.torchtitan_float8_gemm import Recipe, gemm  # noqa: E402
from memplan.config.spec import Spec  # noqa: E402
from memplan.model.forward.tensors import Activations  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from tests.conftest import make_spec, micro_batch_of  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-float8-activations.json"
DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH = 64, 4, 2, 192, 256, 2
"""tests/torchtitan_probe.py's shape (that module imports torch; main checks they agree)."""
SEQS = (16, 128)
RECIPES = ("bf16", "tensorwise", "rowwise", "rowwise_with_gw_hp")
MODES = ("none", "full", "selective-op")
SPEC_FP8 = {"tensorwise": "torchao-tensorwise", "rowwise": "torchao-rowwise"}
"""precision.fp8 for each recipe a spec can name (rowwise_with_gw_hp has no spec value)."""


def config(seq: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": max(128, seq),
    }


def spec_of(*, recipe: str, mode: str, seq: int) -> Spec:
    """The case as a spec: engine fsdp2 on 2 data ranks, no TP (the model in bf16,
    torchtitan's param_dtype); precision.fp8 for the recipe."""
    fp8 = {"fp8": SPEC_FP8[recipe]} if recipe in SPEC_FP8 else {}
    return make_spec(
        model={"architecture": config(seq), "implementation": "torchtitan"},
        precision={"preset": "bf16-mixed", **fp8},
        training={
            "micro_batch_size": BATCH,
            "sequence_length": seq,
            "activation_checkpointing": mode,
        },
        parallelism={"engine": "fsdp2", "data": 2},
        hardware={"device": "cpu"},
    )


def predicted_activations(*, recipe: str, mode: str, seq: int) -> Activations:
    """memplan's activations for the case, as memplan estimate builds them. Pure: no torch."""
    return micro_batch_of(spec_of(recipe=recipe, mode=mode, seq=seq), from_config(config(seq)))


def predicted_gemm(row: dict[str, Any], recipe: str, seq: int) -> dict[str, int]:
    """memplan's replay of one measured GEMM call (peak and after, relative to its start)."""
    g = gemm(
        row["phase"],
        tokens=BATCH * seq,
        in_features=row["in"],
        out_features=row["out"],
        recipe=cast(Recipe, recipe),
        dtype="bf16",
    )
    return {"memplan_peak": g.peak_bytes, "memplan_after": g.after_bytes}


def main() -> None:
    import torch
    import torchao  # type: ignore[import-untyped]

    from tests import torchtitan_probe as probe
    from tests.torchtitan_float8_probe import Case, run

    shape = (probe.DIM, probe.HEADS, probe.KV_HEADS, probe.FFN, probe.VOCAB, probe.BATCH)
    assert shape == (DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH)
    torch.set_num_threads(1)
    start = time.time()
    held_rows, gemm_rows = [], []
    for seq in SEQS:
        for recipe in RECIPES:
            for mode in MODES:
                case = Case(recipe, mode, probe.Shape(seq=seq))
                got = run(case)
                saved = predicted_activations(recipe=recipe, mode=mode, seq=seq)
                held_rows.append(
                    {
                        "case": case.name,
                        "recipe": recipe,
                        "mode": mode,
                        "seq": seq,
                        "measured_bytes": got["held"],
                        "memplan_bytes": saved.bytes,
                    }
                )
                if recipe == "bf16":
                    continue
                for g in got["gemms"]:
                    gemm_rows.append(
                        {
                            "case": case.name,
                            "recipe": recipe,
                            "mode": mode,
                            "seq": seq,
                            **{k: v for k, v in g.items() if k != "momentary"},
                            "measured_peak": g["peak"] - g["before"],
                            "measured_after": g["after"] - g["before"],
                            **predicted_gemm(g, recipe, seq),
                            "momentary": g["momentary"],
                        }
                    )
    exact_held = sum(r["measured_bytes"] == r["memplan_bytes"] for r in held_rows)
    none = [r for r in gemm_rows if r["mode"] == "none"]
    exact_gemm = sum(
        (r["measured_peak"], r["measured_after"]) == (r["memplan_peak"], r["memplan_after"])
        for r in none
    )
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_float8_activations.py",
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "platform": platform.platform(),
        "shape": {**config(SEQS[0]), "batch": BATCH, "sequences": list(SEQS)},
        "seconds": round(time.time() - start, 1),
        "exact_held": f"{exact_held} of {len(held_rows)}",
        "exact_gemms_checkpointing_none": f"{exact_gemm} of {len(none)}",
        "held": held_rows,
        "gemms": {
            "what": "every call of matmul_with_hp_or_float8_args.forward / .backward: bytes of "
            "storages made since the step began alive when it starts (before), returns (after) "
            "and at most after any op inside it (peak); measured_peak = peak - before, "
            "measured_after = after - before; stage: the step's forward or backward (a "
            "checkpointed block re-runs its forward GEMMs in backward); momentary: the "
            "storages alive at the peak and freed by the return, [bytes, dtype, op] "
            "(tests/torchtitan_float8_probe.py)",
            "rows": gemm_rows,
        },
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"held: {exact_held} of {len(held_rows)} to the byte; GEMMs (checkpointing none): ")
    print(f"{exact_gemm} of {len(none)} to the byte; wrote {OUT}")
    for r in held_rows:
        if r["measured_bytes"] != r["memplan_bytes"]:
            print("  held differs:", r)
    for r in none:
        if (r["measured_peak"], r["measured_after"]) != (r["memplan_peak"], r["memplan_after"]):
            print("  gemm differs:", {k: v for k, v in r.items() if k != "momentary"})


if __name__ == "__main__":
    main()
