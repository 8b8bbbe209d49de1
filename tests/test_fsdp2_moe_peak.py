"""The peak of an FSDP2 step of a mixture-of-experts model (issue 16): memplan verify's
distributed path on 2 gloo CPU ranks, torch's FSDPMemTracker on every rank, against memplan's
timeline. The models are benchmarks/accuracy.py's tiny Mixtral (4 experts, top-2) and tiny
Qwen2-MoE (4 experts, top-2, shared expert), ZeRO-3, batch 2 x 32.

What they catch. In fp32 the tiny Mixtral's step peaks inside its last layer's backward; memplan
put that layer's reduce-scatter above it (6,039,588 B against 5,757,244 B measured, +4.9%)
because it still counted the layer's backward working set (360,448 B) after the layer's
backward, where FSDPMemTracker shows only the layer's input gradient (16,384 B) left of it
(memplan.states.engines.fsdp2.step::_fsdp2_layer_backward). bf16-mixed Mixtral and fp32 Qwen2-MoE
peak at the loss gradient and were already right; they hold that the fix moves nothing else.

Tolerances. Qwen2-MoE and bf16-mixed Mixtral: 0.1%, as the dense Llama in
tests/test_fsdp2_peak.py (what memplan leaves out is the input ids and the loss's scalars).
fp32 Mixtral: 0.5%. Its peak is inside the experts' backward (the gate_up grouped matmul's
backward), where memplan has no op-by-op model but the timeline's backward working set
(2 x the largest saved tensor + 2 hidden-state gradients, memplan/step/transients.py): measured
+0.30% over (5,774,644 predicted against 5,757,244 measured on rank 0).

gloo's race and the oracle are tests/test_fsdp2_peak.py's: each rank's measured peak is the
expected value; a rank may measure up to one extra FSDP2 buffer (from the real model and
torch's padding rule, tests/fsdp2_oracle.py), and at least one rank must be within tolerance.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import LoadedSpec, validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.conftest import TINY_LLAMA
from tests.test_fsdp2_peak import _check_peak, _gloo_copy
from tests.test_verify_support import spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")

# benchmarks/accuracy.py's TINY_MIXTRAL and TINY_QWEN2_MOE (kept in step by hand: the
# benchmarks are not a package the tests import).
MODELS: dict[str, dict[str, Any]] = {
    "mixtral": {
        **TINY_LLAMA,
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen2_moe": {
        **TINY_LLAMA,
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 96,
    },
}

CASES = [
    # model, precision, tolerance, the predicted peak's phase
    ("mixtral", "fp32", 0.005, "backward"),  # inside the last layer's experts' backward
    ("mixtral", "bf16-mixed", 0.001, "backward_start"),
    ("qwen2_moe", "fp32", 0.001, "backward_start"),
]


def _spec(family: str, precision: str) -> LoadedSpec:
    data = spec_dict(
        precision=precision,
        training={"micro_batch_size": 2, "sequence_length": 32},
        parallelism={"engine": "fsdp2", "data": 2, "zero_stage": 3},
    )
    data["model"] = {"architecture": MODELS[family]}
    return validate(data)


@pytest.mark.parametrize(("family", "precision", "tol", "phase"), CASES)
def test_fsdp2_moe_peak_on_every_rank(family: str, precision: str, tol: float, phase: str) -> None:
    _check_peak(_spec(family, precision), 2, tol, _gloo_copy(MODELS[family], precision, 2))


@pytest.mark.parametrize(("family", "precision", "tol", "phase"), CASES)
def test_pin_fsdp2_moe_peak_phase(family: str, precision: str, tol: float, phase: str) -> None:
    """Pins which moment memplan's timeline calls the peak (memplan's own output, no oracle)."""
    spec = _spec(family, precision)
    report = estimate(spec.spec, from_config(MODELS[family]))
    assert report.timeline.peak.phase == phase


def test_pin_fsdp2_moe_layer_reduce_scatter_below_backward_point() -> None:
    """Pins the fix of issue 16 (memplan's own output): in fp32 tiny Mixtral the last layer's
    reduce-scatter no longer adds a term above the backward point (measured 5,695,532 B there
    on rank 0, below the 5,757,244 B peak inside the experts' backward)."""
    report = estimate(_spec("mixtral", "fp32").spec, from_config(MODELS["mixtral"]))
    names = {t.name for t in report.timeline.transient_at("backward")}
    assert "backward_working_set" in names
    assert "fsdp2_layer_backward" not in names


@pytest.mark.parametrize(
    ("family", "tol"),
    # llama: the one known miss of the backward working-set estimate under recomputation,
    # memplan 1.5% low (benchmarks/results/accuracy.json, ...-full-dropout); not subtracting
    # the working set would fix it and leave mixtral 6.4% high, so the estimate stays.
    [("llama", 0.02), ("mixtral", 0.003)],
)
def test_fsdp2_peak_with_full_recomputation(family: str, tol: float) -> None:
    """FSDP2 x2, bf16-mixed, full checkpointing and dropout, on real gloo ranks: the layer's
    post-backward comes after its own (recomputing) backward, as without checkpointing."""
    arch = TINY_LLAMA if family == "llama" else MODELS[family]
    data = spec_dict(
        precision="bf16-mixed",
        training={
            "micro_batch_size": 2,
            "sequence_length": 32,
            "activation_checkpointing": "full",
            "dropout": True,
        },
        parallelism={"engine": "fsdp2", "data": 2, "zero_stage": 3},
    )
    data["model"] = {"architecture": arch}
    _check_peak(validate(data), 2, tol, _gloo_copy(arch, "bf16-mixed", 2))
