"""QLoRA as transformers, bitsandbytes and peft run it, measured on the CPU.

bitsandbytes runs its 4-bit Linear on the CPU from 0.46 on, so `memplan verify` builds a QLoRA
job as a training script does (memplan.verify.peft_support.quantized) and measures every
category. benchmarks/qlora_verify.py stored those measurements for 46 settings, bitsandbytes'
8-bit and paged optimizers and FSDP2 on two ranks included
(benchmarks/results/qlora-verify.json); the default run holds today's prediction to each
stored measurement (the oracle is the real run, not memplan), and the slow tests run cases
live.

What the measurements showed memplan had wrong before (each fails here without its fix):
- prepare_model_for_kbit_training's fp32 parameters make the whole stream fp32 without
  autocast (memplan.report.settings._kbit_prepared); memplan had the recipe's 16-bit stream;
- under autocast a 4-bit Linear saves no weight copy and hands back its input's dtype
  (memplan.activations.lora.four_bit);
- without checkpointing the embedding's output does not require grad;
- bitsandbytes casts a 4-bit Linear's bias to the compute dtype at its first forward
  (memplan.model.finetune.qlora.quantize_4bit); under FSDP2 only the unsharded parameter,
  which keeps that copy (qlora.fsdp2_bias_copies; Qwen2's q/k/v biases: 160 B of parameters
  and 480 B of peak a rank were missing);
- the dequantized weight lives inside a 4-bit matmul only, not at the loss where the step
  peaks (memplan.step.transients.qlora_dequantized);
- bitsandbytes makes its optimizer's qmaps with the first 8-bit state only: none where every
  trainable tensor is under min_8bit_size (memplan.states.terms);
- a 4-bit LM head's backward holds its logits' gradient in the compute dtype beside its weight
  dequantized in the load dtype and cast (memplan.step.transients.qlora_head_backward);
- under FSDP2 each Linear4bit keeps its quantization state on the module
  (memplan.verify.peft_support.quant_states).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.model.load import load_inventory
from memplan.report.estimate import estimate
from memplan.verify.runner import predicted

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "qlora-verify.json"
DOC: dict[str, Any] = json.loads(RESULTS.read_text())
EXACT = ("parameters", "gradients", "optimizer_states", "buffers", "activations")
HEAD_UNDER_AUTOCAST = "amp-bf16, the head quantized too"
"""The 4-bit LM head's backward (memplan.step.transients.qlora_head_backward): before it was
modelled memplan's peak was 66,628 B (5.0%) below this measurement."""
WIDE = ("amp-bf16, wide layers, small vocabulary", "bf16, wide layers, small vocabulary")
"""Where a layer's backward peaks (wide layers, a 96-token vocabulary): memplan sums the
backward working set (memplan.step.transients.working_sets, an estimate) with the largest
dequantized weight, which the real step does not hold at once: the prediction is 5% above
the measurement under bf16 and amp-bf16 alike, the dequantized weight itself being fp32 +
bf16 under amp (memplan.model.finetune.qlora.backward_dequantized; it was counted bf16 only,
7% below)."""
FSDP2 = tuple(c["name"] for c in DOC["cases"] if c["name"].startswith("FSDP2"))


def _cases() -> list[Any]:
    return [pytest.param(c, id=c["name"]) for c in DOC["cases"]]


def test_the_stored_run_is_the_benchmark_s() -> None:
    """46 settings, run by the versions the rules cite."""
    assert len(DOC["cases"]) == 46
    assert len(FSDP2) == 9
    assert DOC["versions"]["bitsandbytes"].startswith("0.50")
    assert DOC["versions"]["peft"] == "0.21.2"


@pytest.mark.parametrize("case", _cases())
def test_prediction_equals_the_measured_run(case: dict[str, Any]) -> None:
    """Model states and saved activations to the byte, on every rank; the peak within 0.2%
    (16 B apart without recomputation, 1-2 KB with full recomputation's replay of one layer),
    under FSDP2 too (4 B apart under bf16: its buffers sized in each parameter's own dtype,
    memplan.states.engines.fsdp2.buffers.OWN_DTYPE; at the recipe's width the fp32 adapters
    made it 1.4% low with quant_storage bf16, the uint8 codes 0.28% high), and above by the
    known 5% where a layer's backward peaks (WIDE)."""
    # estimate's report for the spec, as verify's job plan makes it (without verify's
    # check that bitsandbytes is installed: the oracle is the stored run)
    loaded = validate(case["spec"])
    report = estimate(loaded.spec, load_inventory(loaded))
    ranks = case["verify"].get("ranks") or [case["verify"]["categories"]]
    for rank, categories in enumerate(ranks):
        pred, _ = predicted(report, rank)
        measured = {k: v["measured"] for k, v in categories.items()}
        for category in EXACT:
            assert pred[category] == measured[category], (rank, category)
        peak = (pred["peak"] or 0) / measured["peak"] - 1
        if case["name"] in WIDE:
            assert 0.04 < peak < 0.06, f"peak {peak:+.2%}"
        else:
            assert abs(peak) < 0.002, f"peak {peak:+.2%}"


def test_the_4bit_head_under_autocast_is_modelled() -> None:
    """The case memplan missed by 5% (its logits' gradient cast and the head's weight
    dequantized in fp32 then bf16) is now the measurement less 4 B, as every other case; the
    term is what the head's backward holds beyond the loss's."""
    case = next(c for c in DOC["cases"] if c["name"] == HEAD_UNDER_AUTOCAST)
    loaded = validate(case["spec"])
    report = estimate(loaded.spec, load_inventory(loaded))
    measured = case["verify"]["categories"]["peak"]["measured"]
    assert measured - report.timeline.peak_bytes == 4
    term = next(t for t in report.timeline.transients if t.name == "qlora_head_backward")
    assert term.phases == ("backward_start",)
    assert report.timeline.peak.phase == "backward_start"


def test_every_case_but_the_wide_ones_verified() -> None:
    missed = [c["name"] for c in DOC["cases"] if not c["verify"]["ok"]]
    assert missed == list(WIDE)


@pytest.mark.slow
def test_live_qlora_verify_on_the_cpu() -> None:
    """The QLoRA paper's recipe (nf4, double quantization, all linear layers) under
    autocast, run now."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.qlora_verify import CASES, run_case

    doc = dict(CASES)["amp-bf16 (autocast)"]
    out = run_case(doc, {})
    assert out["ok"]
    for category in EXACT:
        row = out["categories"][category]
        assert row["predicted"] == row["measured"], category


@pytest.mark.slow
def test_live_qlora_under_fsdp2_on_two_gloo_ranks() -> None:
    """HF's FSDP-QLoRA recipe (quant_storage bf16, no prepare_model_for_kbit_training) under
    FSDP2, run now on two ranks."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.qlora_verify import CASES, run_case

    doc = dict(CASES)["FSDP2, 2 gloo ranks, bf16, quant_storage bf16"]
    out = run_case(doc, {"nproc": 2})
    assert out["ok"]
    for categories in out["ranks"]:
        for category in EXACT:
            row = categories[category]
            assert row["predicted"] == row["measured"], category
