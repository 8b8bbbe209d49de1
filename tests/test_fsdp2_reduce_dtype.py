"""FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (torchtitan's default):
the reduce-scatter input and output are fp32 while the unsharded gradients stay bf16
(torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py::foreach_reduce, torch 2.13).

Oracle: each gloo rank's peak as torch's FSDPMemTracker measures it in memplan verify's
FSDP2 path, which now passes `parallelism.reduce_dtype` to torch's MixedPrecisionPolicy
(memplan/verify/rank.py::_wrap). Tolerance and gloo's race envelope as in
tests/test_fsdp2_peak.py (its module docstring); the envelope's largest buffer is the reduce
dtype's reduce-scatter input (fp32 here), measured on the real model's groups
(tests/fsdp2_oracle.py). Measured with memplan before this term (reduce-scatter in bf16), on
tiny Llama ZeRO-3, 4 ranks, b1 s16: 1,481,204 B against 2,082,972 B, 29% under (now
2,082,836 B); the ZeRO-2 case here: 2,082,836 B against 2,083,100 B.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import LoadedSpec, validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.fsdp2_oracle import padded_groups
from tests.test_fsdp2_peak import MODELS, _check_peak
from tests.test_verify_support import spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _spec(stage: int, ranks: int, mb: int, seq: int, reduce_dtype: str | None) -> LoadedSpec:
    par: dict[str, Any] = {"engine": "fsdp2", "data": ranks, "zero_stage": stage}
    if reduce_dtype is not None:
        par["reduce_dtype"] = reduce_dtype
    data = spec_dict(
        "llama",
        precision="bf16-mixed",
        training={"micro_batch_size": mb, "sequence_length": seq},
        parallelism=par,
    )
    data["model"] = {"architecture": MODELS["llama"]}
    return validate(data)


@pytest.mark.parametrize(
    ("stage", "ranks", "mb", "seq"),
    [(2, 4, 2, 16)],  # ZeRO-3 with fp32 reduce: tests/test_fsdp2_torchtitan_wrap.py
)
def test_fsdp2_reduce_dtype_fp32_peak_on_every_rank(
    stage: int, ranks: int, mb: int, seq: int
) -> None:
    groups = padded_groups(MODELS["llama"], ranks)
    copy = max(groups.root, groups.block) * 4  # fp32 reduce-scatter input
    _check_peak(_spec(stage, ranks, mb, seq, "fp32"), ranks, 0.001, copy)


def test_pin_reduce_dtype_doubles_the_reduce_scatter_buffers() -> None:
    """Pinning (memplan's own output): with bf16 gradients, reduce_dtype fp32 makes the root's
    reduce-scatter input and output twice their bf16 size; the unsharded gradients keep
    theirs."""

    def terms(reduce_dtype: str | None) -> dict[str, int]:
        spec = _spec(3, 4, 1, 16, reduce_dtype)
        report = estimate(spec.spec, from_config(MODELS["llama"]))
        return {t.name: t.bytes for t in report.timeline.transients}

    bf16, fp32 = terms(None), terms("fp32")
    for name in ("fsdp2_reduce_scatter_input_root", "fsdp2_reduce_scatter_output_root"):
        assert fp32[name] == 2 * bf16[name], name
    assert fp32["fsdp2_last_unsharded_grad"] == bf16["fsdp2_last_unsharded_grad"]
    assert terms("bf16") == bf16  # equal to param_dtype: FSDP2 clamps it to None
