"""HSDP (`parallelism.data_replicate`): FSDP2 on a 2-D (replicate, shard) DeviceMesh, model
states sharded over data / data_replicate ranks, gradients reduce-scattered over the shard
dimension and all-reduced over the replicate one (torch/distributed/fsdp/_fully_shard/
_fsdp_collectives.py::foreach_reduce, torch 2.13; torchtitan's data_parallel_replicate_degree).

Oracle: memplan verify's FSDP2 path on 4 gloo ranks as a 2 x 2 mesh (torch's own fully_shard,
FSDPMemTracker on every rank): model states to the byte and the peak within 0.1% (gloo's race
envelope as in tests/test_fsdp2_peak.py). bf16-mixed with the default reduce dtype (bf16) keeps
every layer's all-reduced bf16 output until the end of backward besides its fp32 sharded
gradients (memplan.states.engines.fsdp2.buffers.HSDP_HOLD). Measured with this spec: 2,377,820 B
on ranks 0 and 2 (memplan 2,377,684 B); with reduce_dtype fp32 2,958,748 B (memplan
2,958,612 B), with torchtitan's wrapping and fp32 2,424,732 B (memplan 2,424,596 B)
(benchmarks/fsdp2_torchtitan.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import LoadedSpec, validate
from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.fsdp2_oracle import padded_groups
from tests.test_fsdp2_peak import MODELS, _errors
from tests.test_verify_support import model_state_rows_exact, run, spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _spec(**par: Any) -> LoadedSpec:
    data = spec_dict(
        "llama",
        precision="bf16-mixed",
        training={"micro_batch_size": 1, "sequence_length": 16},
        parallelism={"engine": "fsdp2", "data": 4, "zero_stage": 3, **par},
    )
    data["model"] = {"architecture": MODELS["llama"]}
    return validate(data)


def test_hsdp_two_by_two_on_gloo() -> None:
    spec = _spec(data_replicate=2)
    groups = padded_groups(MODELS["llama"], 2)
    copy = max(groups.root, groups.block) * 2  # bf16 reduce-scatter input over 2 ranks
    result = run(spec, nproc=4)
    model_state_rows_exact(result)
    errors = _errors(result, 0.001, copy)
    if min(errors) > 0.001:  # every rank raced (tests/test_fsdp2_peak.py): once more
        errors = _errors(run(spec, nproc=4), 0.001, copy)
    assert min(errors) <= 0.001, errors


def test_pin_hsdp_shards_over_the_shard_dimension() -> None:
    """Pinning (memplan's own output): 2 x 2 holds the model states of FSDP2 over 2 ranks,
    and the bf16 all-reduced outputs held to the end of backward."""
    hsdp = estimate(_spec(data_replicate=2).spec, from_config(MODELS["llama"]))
    two = estimate(_spec(data=2).spec, from_config(MODELS["llama"]))
    for category in ("parameters", "gradients", "optimizer_states"):
        assert hsdp.per_gpu.bytes_of(category) == two.per_gpu.bytes_of(category), category
    assert "hsdp_all_reduce_outputs" in {t.name for t in hsdp.timeline.transients}


@pytest.mark.parametrize(
    ("par", "message"),
    [
        ({"data_replicate": 3}, "data_replicate 3 must divide data 4"),
        ({"engine": "ddp", "zero_stage": 0, "data_replicate": 2}, "set engine: fsdp2"),
        ({"data_replicate": 2, "expert": 2}, "not modelled"),
    ],
)
def test_hsdp_refusals_name_the_field(par: dict[str, Any], message: str) -> None:
    with pytest.raises(MemplanError, match=message) as err:
        _spec(**par)
    assert "parallelism" in str(err.value)
