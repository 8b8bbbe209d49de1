"""torchtitan's Llama 3 under torchao Float8 tensor parallelism: what each rank holds for
backward, measured on 2 gloo ranks against memplan's rule (memplan.activations.
torchtitan_float8), with the bf16 plan beside it.

torchtitan 0.3.0's Llama 3 built tiny on CPU (tests/torchtitan_probe.py: dim 64, 4 heads, 2 k/v
heads, ffn 192, sequence 16, batch 2, SDPA, bf16 parameters as FSDP2's param_dtype gives them),
its decoder Linears converted to torchao 0.18 Float8Linear (tensorwise, torchtitan's
module_filter_fn) and sharded with 018740b's Float8 TP plan (PrepareFloat8ModuleInput,
Float8ColwiseParallel, Float8RowwiseParallel: tests/torchtitan_float8_tp_probe.py); the `bf16`
cases run the same model unconverted with torch's own styles. none / full / selective-op x
sequence parallelism on and off x fused wqkv (0.3.0) or wq / wk / wv (018740b). gloo has no
float8 type, so the fp8 activation all-gather runs on uint8 views of the same storages
(benchmarks/fsdp2_float8_tp.py::gloo_fp8_shim). One more case, an FFN width of 200 (not a
multiple of 16: w1 / w2 / w3 stay nn.Linear), records the error torchao raises and memplan's
refusal. Then the first decoder layer's forward (checkpointing none): what it keeps and the most
it holds for a moment beyond that, bf16 and Float8, SP on and off, beside memplan's forward
working set and Float8 cast term (memplan.activations.torchtitan_float8.casts).

    PYTHONPATH=$PWD python benchmarks/torchtitan_float8_tp_activations.py   # ~2 min on 2 cores
    # writes benchmarks/results/torchtitan-float8-tp-activations.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from memplan.activations import torchtitan_parallel  # noqa: E402
from memplan.model.forward.tensors import Activations  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from tests.conftest import make_spec  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-float8-tp-activations.json"
WORLD = 2
DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH, SEQ = 64, 4, 2, 192, 256, 2, 16
"""tests/torchtitan_probe.py's shape (that module imports torch; main checks they agree)."""
REFUSED_FFN = 200
"""An FFN width torchtitan's module_filter_fn does not convert (200 % 16 = 8)."""


def config(layers: int = 2, ffn: int = FFN) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
    }


def predicted_activations(
    *,
    float8: bool,
    mode: str,
    sequence_parallel: bool,
    fused_qkv: bool,
    rank: int,
    ffn: int = FFN,
) -> Activations:
    """memplan's activations of TP rank `rank` (engine fsdp2: the model in bf16, torchtitan's
    param_dtype; precision.fp8 torchao-tensorwise for `float8`). Pure: no torch."""
    spec = make_spec(
        model={"architecture": config(ffn=ffn), "implementation": "torchtitan"},
        precision={"preset": "bf16-mixed", **({"fp8": "torchao-tensorwise"} if float8 else {})},
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "activation_checkpointing": mode,
        },
        parallelism={
            "engine": "fsdp2",
            "data": 2,
            "tensor": WORLD,
            "sequence_parallel": sequence_parallel,
        },
        hardware={"device": "cpu"},
    )
    arch = from_config(config(ffn=ffn)).architecture
    assert arch is not None
    lay = layout_of(spec).for_tensor_rank(rank)
    return torchtitan_parallel.micro_batch(arch, setting_of(spec), lay, fused_qkv=fused_qkv)


def cases() -> list[Any]:
    from tests.torchtitan_float8_tp_probe import Case

    return [
        Case(f8, mode, sp, fused)
        for f8 in (False, True)
        for mode in ("none", "full", "selective-op")
        for sp in (True, False)
        for fused in (True, False)
    ] + [Case(True, "none", True, True, ffn=REFUSED_FFN)]


def layer_cases() -> list[Any]:
    """The first decoder layer's forward, checkpointing none, fused wqkv (layer_forward)."""
    from tests.torchtitan_float8_tp_probe import Case

    return [Case(f8, "none", sp, True) for f8 in (False, True) for sp in (True, False)]


def forward_terms(*, float8: bool, sequence_parallel: bool, rank: int) -> dict[str, int]:
    """memplan's forward terms of a decoder layer for the case: the working set (memplan.step.
    transients.working_sets, read here) and the Float8 cast (memplan.activations.
    torchtitan_float8.casts; 0 without Float8). Pure: no torch."""
    from memplan.step.transients import working_sets

    saved = predicted_activations(
        float8=float8, mode="none", sequence_parallel=sequence_parallel, fused_qkv=True, rank=rank
    )
    layers = saved.block("layers")
    assert layers is not None
    cast = sum(t.bytes for t in saved.buffers if t.name == "float8_cast_forward")
    return {
        "memplan_forward_working_set": working_sets(saved, layers)[0].bytes,
        "memplan_float8_cast_forward": cast,
    }


def main() -> None:
    import torch
    import torchao  # type: ignore[import-untyped]

    from tests import torchtitan_probe as probe
    from tests.torchtitan_float8_tp_probe import run

    shape = (probe.DIM, probe.HEADS, probe.KV_HEADS, probe.FFN, probe.VOCAB, probe.BATCH)
    assert shape + (probe.SEQ,) == (DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH, SEQ)
    start = time.time()
    todo = cases()
    with tempfile.TemporaryDirectory() as out:
        ranks = run(todo, Path(out))
    rows, refused = [], []
    for case in todo:
        for r in range(WORLD):
            saved = predicted_activations(
                float8=case.float8,
                mode=case.mode,
                sequence_parallel=case.sequence_parallel,
                fused_qkv=case.fused_qkv,
                rank=r,
                ffn=case.ffn,
            )
            measured = ranks[r][case.name]
            if isinstance(measured, dict):
                refused.append(
                    {
                        "case": case.name,
                        "rank": r,
                        "torchao": measured["error"],
                        "memplan": saved.notes[0] if not saved.modelled else None,
                    }
                )
                continue
            rows.append(
                {
                    "case": case.name,
                    "float8": case.float8,
                    "mode": case.mode,
                    "sequence_parallel": case.sequence_parallel,
                    "fused_qkv": case.fused_qkv,
                    "rank": r,
                    "measured_bytes": measured,
                    "memplan_bytes": saved.bytes,
                }
            )
    with tempfile.TemporaryDirectory() as out:
        layer_ranks = run(layer_cases(), Path(out), detail="layer")
    layer_rows = []
    for case in layer_cases():
        for r in range(WORLD):
            got = layer_ranks[r][case.name]
            layer_rows.append(
                {
                    "case": case.name,
                    "rank": r,
                    **got,
                    "kept_bytes": got["end"] - got["start"],
                    "transient_bytes": got["peak"] - got["end"],
                    **forward_terms(
                        float8=case.float8, sequence_parallel=case.sequence_parallel, rank=r
                    ),
                }
            )
    exact = sum(row["measured_bytes"] == row["memplan_bytes"] for row in rows)
    doc = {
        "stamp": stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/torchtitan_float8_tp_activations.py",
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "platform": platform.platform(),
        "shape": {**config(), "batch": BATCH, "sequence": SEQ},
        "seconds": round(time.time() - start, 1),
        "exact": f"{exact} of {len(rows)}",
        "rows": rows,
        "refused": refused,
        "layer_forward": {
            "what": "the first decoder layer's forward (checkpointing none, fused wqkv): bytes "
            "of storages made since the forward began alive when it starts (start), ends (end) "
            "and at most after any op (peak); transient = peak - end, what the layer holds for "
            "a moment beyond what it keeps; momentary: the storages alive at the peak and "
            "freed by the end, [bytes, dtype] (tests/torchtitan_float8_tp_probe.py::"
            "layer_forward)",
            "rows": layer_rows,
        },
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{exact} of {len(rows)} rank-cases to the byte; wrote {OUT}")
    for row in rows:
        if row["measured_bytes"] != row["memplan_bytes"]:
            print("  differs:", row)
    for row in refused:
        print("  refused:", row)
    for row in layer_rows:
        print("  layer forward:", row)


if __name__ == "__main__":
    main()
