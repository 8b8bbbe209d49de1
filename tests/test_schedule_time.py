"""Pipeline schedules' idle share (memplan.plan.schedules), found by running action lists.

Oracles: torch 2.13's own ScheduleZBVZeroBubble action lists (its `pipeline_order`, built over
stub stages: no process group needed) for the ZBV order memplan runs; the 1F1B bubble
(P - 1) / m (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2) for the simulator on 1F1B
lists; and the zero-bubble paper's comparison (Qi et al. 2024, arXiv 2401.10241, sec. 4 and
its authors' table: ZB-V's bubble below ZB-H1's, a third of 1F1B's, with T_F = T_B = T_W).
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from memplan.activations.pipeline import zbv_order
from memplan.plan.schedules import idle_share, zbv_idle_share

schedules = pytest.importorskip("torch.distributed.pipelining.schedules")


def _stub(p: int, stage: int, stages: int) -> Any:
    return types.SimpleNamespace(
        group_size=p,
        group_rank=0,
        num_stages=stages,
        stage_index=stage,
        is_first=stage == 0,
        is_last=stage == stages - 1,
        stage_index_to_group_rank={},
        submod=None,
        has_backward=True,
    )


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 16, 17])
def test_zbv_order_is_torchs(p: int, m: int) -> None:
    stages = [_stub(p, 0, 2 * p), _stub(p, 2 * p - 1, 2 * p)]
    order = schedules.ScheduleZBVZeroBubble(stages, m).pipeline_order
    for rank in range(p):
        torch_ops = [
            None
            if a is None
            else (
                0 if a.stage_index == rank else 1,
                str(a.computation_type.value),
                a.microbatch_index,
            )
            for a in order[rank]
        ]
        assert zbv_order(p, rank, m) == torch_ops, (p, m, rank)


def _one_f_one_b(p: int, m: int) -> dict[int, list[tuple[int, str, int] | None]]:
    """PipeDream-Flush 1F1B (Narayanan et al. 2021, fig. 4): P - 1 - rank warm-up forwards,
    then one forward and one full backward, then the remaining backwards."""
    out: dict[int, list[tuple[int, str, int] | None]] = {}
    for r in range(p):
        warm = min(p - 1 - r, m)
        acts: list[tuple[int, str, int] | None] = [(r, "F", i) for i in range(warm)]
        for i in range(warm, m):
            acts += [(r, "F", i), (r, "B", i - warm)]
        acts += [(r, "B", i) for i in range(m - warm, m)]
        out[r] = acts
    return out


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 8, 32])
def test_one_f_one_b_lists_give_the_published_bubble(p: int, m: int) -> None:
    assert idle_share(_one_f_one_b(p, m), p) == pytest.approx((p - 1) / m)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_zbv_idles_less_than_zb_h1_once_micro_batches_fill_the_v(p: int) -> None:
    for m in (2 * p, 4 * p, 8 * p):
        assert 0 <= zbv_idle_share(p, m) < (p - 1) / (3 * m)


def test_a_deadlocked_order_is_refused() -> None:
    with pytest.raises(ValueError, match="deadlock"):
        idle_share({0: [(0, "B", 0)], 1: [(1, "B", 0)]}, 2)


def _zbv_full(p: int, m: int) -> float:
    """ScheduleZBVZeroBubble's idle share with every micro-batch's actions run."""
    orders = {
        r: [
            None if a is None else (r if a[0] == 0 else 2 * p - 1 - r, a[1], a[2])
            for a in zbv_order(p, r, m)
        ]
        for r in range(p)
    }
    return idle_share(orders, 2 * p)


@pytest.mark.parametrize("p", range(1, 13))
def test_zbv_shortcut_is_the_full_run(p: int) -> None:
    """zbv_idle_share runs only min(m, 2P) micro-batches (past them the stable phase only
    repeats): equal to the bit to running all m, for every m up to 8P."""
    for m in range(1, 8 * p + 1):
        assert zbv_idle_share.__wrapped__(p, m) == _zbv_full(p, m), m


@pytest.mark.slow
@pytest.mark.parametrize(("p", "m"), [(16, 1024), (32, 2048), (13, 301)])
def test_zbv_shortcut_is_the_full_run_at_plan_scale(p: int, m: int) -> None:
    """The sizes plan meets on 1,024-2,048 GPUs (the full run takes seconds)."""
    assert zbv_idle_share.__wrapped__(p, m) == _zbv_full(p, m)
