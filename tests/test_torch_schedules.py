"""torch.distributed.pipelining's schedules (engines ddp and fsdp2): the micro-batches each
pipeline rank keeps in flight at its peak, per local stage.

Oracle: torch's own schedule objects (torch 2.13 torch/distributed/pipelining/schedules.py),
built over stub stages (the action lists need no process group: Schedule1F1B and
ScheduleGPipe `_get_pipeline_order()`, ScheduleInterleaved1F1B and ScheduleZBVZeroBubble
`pipeline_order`), each rank's actions walked: a forward (F) adds a micro-batch to its local
stage, a full backward (B) or, for ZBV, the weight backward (W: the input backward keeps the
graph, _backward.py::stage_backward_input retain_graph=True) removes it; the counts at the
first moment with the most alive are memplan's expected value.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from memplan.activations import pipeline
from memplan.config.load import validate
from tests.conftest import TINY_LLAMA

schedules = pytest.importorskip("torch.distributed.pipelining.schedules")


def _stub(rank: int, p: int, stage: int, stages: int) -> Any:
    return types.SimpleNamespace(
        group_size=p,
        group_rank=rank,
        num_stages=stages,
        stage_index=stage,
        is_first=stage == 0,
        is_last=stage == stages - 1,
        stage_index_to_group_rank={},
        submod=None,
        has_backward=True,
    )


def _torch_order(schedule: str, p: int, v: int, m: int) -> dict[int, list[Any]]:
    """Every rank's action list, from torch's schedule object."""
    if schedule in ("1f1b", "gpipe"):
        cls = schedules.Schedule1F1B if schedule == "1f1b" else schedules.ScheduleGPipe
        return cls(_stub(0, p, 0, p), m)._get_pipeline_order()  # type: ignore[no-any-return]
    if schedule == "interleaved":
        stages = [_stub(0, p, c * p, p * v) for c in range(v)]
        return schedules.ScheduleInterleaved1F1B(stages, m).pipeline_order  # type: ignore[no-any-return]
    stages = [_stub(0, p, 0, 2 * p), _stub(0, p, 2 * p - 1, 2 * p)]
    return schedules.ScheduleZBVZeroBubble(stages, m).pipeline_order  # type: ignore[no-any-return]


def _torch_peak(schedule: str, p: int, v: int, rank: int, m: int) -> tuple[int, ...]:
    order = _torch_order(schedule, p, v, m)[rank]
    if schedule == "zbv":
        local = {rank: 0, 2 * p - 1 - rank: 1}
        frees = {"W"}
    else:
        local = {rank + c * p: c for c in range(v)}
        frees = {"B"}
    alive = [0] * v
    best = tuple(alive)
    for action in order:
        if action is None:
            continue
        kind = str(action.computation_type.value)
        if kind == "F":
            alive[local[action.stage_index]] += 1
            if sum(alive) > sum(best):
                best = tuple(alive)
        elif kind in frees:
            alive[local[action.stage_index]] -= 1
    return best


CASES = [
    (schedule, p, v, m)
    for p in (2, 3, 4, 8)
    for m in (1, 2, 3, 4, 6, 8, 12, 16, 24)
    for schedule, v in (
        ("1f1b", 1),
        ("gpipe", 1),
        ("interleaved", 2),
        ("interleaved", 3),
        ("zbv", 2),
    )
    # the configurations torch's constructors refuse
    if not (schedule == "interleaved" and m % max(1, m // p)) and not (schedule == "1f1b" and m < p)
]


@pytest.mark.parametrize(("schedule", "p", "v", "m"), CASES)
def test_torch_in_flight_matches_torch_schedules(schedule: str, p: int, v: int, m: int) -> None:
    """memplan's in_flight for the torch engines against torch's own action lists, every
    rank."""
    for rank in range(p):
        expected = _torch_peak(schedule, p, v, rank, m)
        got = pipeline.in_flight(schedule, p, v, rank, m, runtime="torch")
        assert got == expected, (schedule, p, v, m, rank)


@pytest.mark.parametrize(("p", "m"), [(2, 24), (3, 40), (4, 48), (5, 61), (8, 96)])
def test_zbv_in_flight_many_micro_batches(p: int, m: int) -> None:
    """ScheduleZBVZeroBubble with far more micro-batches than 2P (plan's layouts reach
    thousands): memplan walks only 2P of them (pipeline._zbv_in_flight); torch's whole list
    agrees, every rank."""
    for rank in range(p):
        expected = _torch_peak("zbv", p, 2, rank, m)
        assert pipeline.in_flight("zbv", p, 2, rank, m, runtime="torch") == expected, (p, m, rank)


def _torch_outputs_held(schedule: str, p: int, v: int, m: int) -> int:
    """The last stage's outputs done before the latest forward at which its rank holds its
    most micro-batches in flight (a forward of the last stage there is the current one)."""
    last, rank = (2 * p - 1, 0) if schedule == "zbv" else (p * v - 1, p - 1)
    order = _torch_order(schedule, p, v, m)[rank]
    if schedule == "zbv":
        local, frees = {rank: 0, 2 * p - 1 - rank: 1}, {"W"}
    else:
        local, frees = {rank + c * p: c for c in range(v)}, {"B"}
    peak = sum(_torch_peak(schedule, p, v, rank, m))
    alive = [0] * v
    done = held = 0
    for action in order:
        if action is None:
            continue
        kind = str(action.computation_type.value)
        if kind == "F":
            alive[local[action.stage_index]] += 1
            if sum(alive) == peak:
                held = done
            done += action.stage_index == last
        elif kind in frees:
            alive[local[action.stage_index]] -= 1
    return held


@pytest.mark.parametrize(("schedule", "p", "v", "m"), CASES)
def test_torch_outputs_held_matches_torch_schedules(schedule: str, p: int, v: int, m: int) -> None:
    """memplan's count of the last stage's outputs held in stage.output_chunks at its rank's
    peak (pipeline.torch_outputs_held) against torch's own action lists."""
    assert pipeline.torch_outputs_held(schedule, p, m) == _torch_outputs_held(schedule, p, v, m)


def test_torch_interleaved_differs_from_megatron() -> None:
    """Where torch's rounds differ from Megatron's groups of P (P does not divide m), the
    counts per local stage differ: P 4, m 6, v 2, rank 0: torch groups forwards by
    mpr = 6 (one round), Megatron by 4."""
    torch_counts = pipeline.in_flight("interleaved", 4, 2, 0, 6, runtime="torch")
    assert torch_counts == _torch_peak("interleaved", 4, 2, 0, 6)
    assert torch_counts != pipeline.in_flight("interleaved", 4, 2, 0, 6)


def test_zbv_places_first_and_last_stage_on_rank_zero() -> None:
    """zbv (torch's V placement, generate_stage_to_rank_mapping style "v"): rank 0 holds the
    embeddings and the head; the estimate's pipeline stages put the LM head's parameters on
    rank 0 and the rank's activations include both the embeddings and the loss."""
    from memplan.model.sources import from_config
    from memplan.report.estimate import estimate

    arch = {**TINY_LLAMA, "num_hidden_layers": 8}
    spec = validate(
        {
            "model": {"architecture": arch},
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {
                "micro_batch_size": 1,
                "sequence_length": 32,
                "gradient_accumulation_steps": 4,
            },
            "parallelism": {
                "engine": "fsdp2",
                "pipeline": 2,
                "schedule": "zbv",
                "virtual_stages": 2,
            },
        }
    ).spec
    report = estimate(spec, from_config(arch))
    first, second = report.stages
    assert first.layers == (0, 1, 6, 7) and second.layers == (2, 3, 4, 5)
    # rank 0: 4 layers + embedding + head + final norm; rank 1: 4 layers
    vocab, hidden = arch["vocab_size"], arch["hidden_size"]
    assert first.num_parameters - second.num_parameters == 2 * vocab * hidden + hidden
    assert report.stage == 0
    blocks = {b.name for b in report.activations.blocks}
    assert {"embeddings", "head", "loss"} <= blocks


def test_zbv_refused_for_megatron() -> None:
    with pytest.raises(Exception, match="ScheduleZBVZeroBubble"):
        validate(
            {
                "model": {"architecture": TINY_LLAMA},
                "parallelism": {
                    "engine": "megatron",
                    "pipeline": 2,
                    "schedule": "zbv",
                    "virtual_stages": 2,
                },
            }
        )
