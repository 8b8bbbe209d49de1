"""FSDP2 under torch.distributed.pipelining: the stage's unsharded gradients, accumulated in
reduce_dtype over the micro-batches (memplan.states.engines.fsdp2.pipeline).

Oracle: a real run (tests/pp_fsdp2_probe.py): 4 gloo ranks, pipeline 2 x FSDP2 data 2,
torch's Schedule1F1B over 4 micro-batches, each stage holding parameters of the shapes
memplan's inventory gives that stage, wrapped as torchtitan wraps under PP (a group per
layer and the stage root; param_dtype bf16, reduce_dtype fp32, reshard_after_forward=False).
Right before the schedule's REDUCE_GRAD every rank holds `unsharded_accumulated_grad` for
every parameter of its stage: measured bytes vs memplan's `fsdp2_pipeline_accumulated_grads`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.states.engines.base import StepActivations, StepStates
from memplan.states.engines.fsdp2 import pipeline
from memplan.states.parallel import stage_inventories
from tests.conftest import TINY_LLAMA

ARCH: dict[str, Any] = {**TINY_LLAMA, "num_hidden_layers": 4}


def _spec(microbatches: int = 4, **parallelism: Any) -> Any:
    return validate(
        {
            "model": {"architecture": ARCH},
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": 2,
                "sequence_length": 16,
                "gradient_accumulation_steps": microbatches,
            },
            "parallelism": {
                "engine": "fsdp2",
                "data": 2,
                "pipeline": 2,
                "zero_stage": 2,
                "reduce_dtype": "fp32",
                **parallelism,
            },
            "hardware": {"device": "cpu"},
        }
    ).spec


def _memplan_terms(spec: Any) -> tuple[list[list[list[list[int]]]], list[int]]:
    """Each stage's parameter shapes (grouped by layer, the stage's root parameters as one
    more group) and memplan's accumulated-gradient bytes for it."""
    inventory = from_config(ARCH)
    report = estimate(spec, inventory)
    shapes, terms = [], []
    for s, inv in enumerate(stage_inventories(inventory, report.layout)):
        groups: dict[Any, list[list[int]]] = {}
        for t in inv.parameters:
            groups.setdefault(t.layer, []).append(list(t.shape))
        shapes.append(list(groups.values()))
        states = StepStates(
            inventory=inv,
            per_gpu=report.stages[s].per_gpu,
            layout=report.layout,
            recipe=report.recipe,
            optimizer=spec.optimizer,
            device="cpu",
        )
        acts = StepActivations(loss_fp32=0, embedding_backward=None, layer=None)
        (term,) = pipeline.accumulated_gradients(states, acts)
        terms.append(term.bytes)
    return shapes, terms


def test_pp_fsdp2_accumulated_gradients_measured(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.pipelining")
    from tests.pp_fsdp2_probe import run

    shapes, terms = _memplan_terms(_spec())
    ranks = run(shapes, tmp_path)
    for r in ranks:
        assert r["dtypes"] == ["torch.float32"]
        assert r["states"] == ["ShardedState.UNSHARDED"]  # no reshard after backward
        assert r["left"] == 0
        assert r["accumulated"] == terms[r["stage"]], r


def test_pp_fsdp2_gradients_only_after_the_last_micro_batch() -> None:
    """The timeline: the accumulated term from the forward to the end of backward, the
    sharded gradients (GradientLife.pipelined) only at the optimizer step; without
    reduce_dtype the accumulation is in the unsharded gradients' own dtype (pinning)."""
    report = estimate(_spec(), from_config(ARCH))
    points = {p.phase: p for p in report.timeline.points}
    for phase in ("forward", "loss", "backward_start", "backward", "backward_end"):
        assert "fsdp2_pipeline_accumulated_grads" in points[phase].transients
        assert points[phase].of("gradients") == 0
    assert points["optimizer_step"].of("gradients") == report.per_gpu.bytes_of("gradients")


def test_pin_pp_fsdp2_no_steady_state() -> None:
    """A rank whose micro-batches are all in flight before its first backward (1F1B rank 0
    with m = P = 2, 2 layers: 4 layer-micro-batches in flight = m x layers) holds the
    accumulated gradients only once backward runs: at the end of backward, and at the
    backward point less one micro-batch's layers; one more micro-batch (m = 3) gives it a
    steady state (pinning: memplan's own rule)."""
    inventory = from_config(ARCH)
    spec = _spec(microbatches=2)
    report = estimate(spec, inventory)
    inv = stage_inventories(inventory, report.layout)[0]
    states = StepStates(
        inventory=inv,
        per_gpu=report.stages[0].per_gpu,
        layout=report.layout,
        recipe=report.recipe,
        optimizer=spec.optimizer,
        device="cpu",
    )
    layer = 1000
    full = sum(t.numel for t in inv.parameters) * 4
    drained = StepActivations(
        loss_fp32=0, embedding_backward=None, layer=layer, microbatches=2, layers_in_flight=4
    )
    terms = {t.name: t for t in pipeline.accumulated_gradients(states, drained)}
    assert terms["fsdp2_pipeline_accumulated_grads"].phases == ("backward_end",)
    assert terms["fsdp2_pipeline_accumulated_grads"].bytes == full
    assert terms["fsdp2_pipeline_accumulated_grads_drain"].phases == ("backward",)
    assert terms["fsdp2_pipeline_accumulated_grads_drain"].bytes == full - 2 * layer
    steady = StepActivations(
        loss_fp32=0, embedding_backward=None, layer=layer, microbatches=3, layers_in_flight=4
    )
    (term,) = pipeline.accumulated_gradients(states, steady)
    assert term.phases[0] == "forward"


def test_torchtitan_pp_does_not_reshard_after_forward() -> None:
    """torchtitan's default reshard policy under PP: reshard_after_forward=False (ZeRO-2),
    torchtitan/distributed/fsdp.py::get_fsdp_reshard_after_forward_policy (0.3.0), read by
    running it."""
    fsdp = pytest.importorskip("torchtitan.distributed.fsdp")
    assert fsdp.get_fsdp_reshard_after_forward_policy("default", True) is False
    assert fsdp.get_fsdp_reshard_after_forward_policy("default", False) is True
    spec = validate(
        {
            "model": {"architecture": ARCH, "implementation": "torchtitan"},
            "parallelism": {"engine": "fsdp2", "data": 2, "pipeline": 2},
        }
    ).spec
    report = estimate(spec, from_config(ARCH))
    assert report.layout.stage == 2
    flat = validate(
        {
            "model": {"architecture": ARCH, "implementation": "torchtitan"},
            "parallelism": {"engine": "fsdp2", "data": 2},
        }
    ).spec
    assert estimate(flat, from_config(ARCH)).layout.stage == 3
