"""DeepSpeed's BF16_Optimizer against DeepSpeed itself (issue 15 item 4).

Oracle: tests/data/deepspeed_bf16_optimizer.json, the tensors DeepSpeed 0.19.8 allocated for a
tiny model on 1 and 2 gloo ranks (recorded by tests/record_deepspeed_bf16_optimizer.py, whose
docstring has the command); `test_live_*` measures again when deepspeed is importable (run the
file with /tmp/dsvenv/bin/python and DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.sources import from_config
from memplan.precision import Recipe
from memplan.report import estimate
from memplan.report.result import Report
from memplan.states import engines as sharding
from memplan.states.engines import DeepSpeedKnobs, RankStates
from memplan.states.engines.deepspeed import step as ds_step
from memplan.states.engines.deepspeed.sharding import (
    FLAT_GRADIENT_BUFFER,
    selects_bf16_optimizer,
)
from memplan.states.layout import Layout
from tests.conftest import TINY_LLAMA, make_spec

DATA = json.loads((Path(__file__).parent / "data" / "deepspeed_bf16_optimizer.json").read_text())
CASES = DATA["cases"]
TORCH_DTYPE = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}

# Each recorded case as memplan spells it: (zero_stage, precision, pipeline, offload.optimizer).
SETTINGS: dict[str, tuple[int, dict[str, Any], bool, str]] = {
    "stage1_fp32_accum": (
        1,
        {"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        False,
        "none",
    ),
    "stage1_fp32_accum_cpu_offload": (
        1,
        {"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        False,
        "cpu",
    ),
    "stage1_bf16_accum": (1, {"preset": "bf16-mixed"}, False, "none"),
    "stage2_fp32_accum": (
        2,
        {"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        False,
        "none",
    ),
    "stage0_no_pipeline": (0, {"preset": "bf16-mixed"}, False, "none"),
    "stage0_pipeline": (0, {"preset": "bf16-mixed"}, True, "none"),
}
BF16_CASES = [k for k, v in CASES.items() if v[0]["optimizer"] == "BF16_Optimizer"]


def _inventory() -> Inventory:
    params = [TensorSpec(name=n, shape=tuple(s)) for n, s in DATA["trainable"].items()]
    params += [
        TensorSpec(name=n, shape=tuple(s), trainable=False) for n, s in DATA["frozen"].items()
    ]
    return Inventory(name="tiny", architecture=None, parameters=tuple(params))


def _recipe(case: str) -> Recipe:
    return make_spec(precision=SETTINGS[case][1]).recipe()


def _states(key: str) -> RankStates:
    case, world = key.split("/world")
    stage, _, pipeline, offload = SETTINGS[case]
    knobs = DeepSpeedKnobs(pipeline=pipeline, offload_optimizer=offload)
    rule = sharding.engine_rule("deepspeed", stage, knobs)
    opt = make_spec(optimizer={"name": "adamw"}).optimizer.config()
    layout = Layout(engine="deepspeed", data=int(world), stage=stage, tensor_impl="megatron")
    (ranks,) = rule(_inventory(), _recipe(case), opt, layout, int(world))
    return ranks


def _row(states: RankStates, name: str) -> tuple[int, str]:
    (t,) = [t for t in states.terms if t.name == name]
    return t.elements, t.dtype


def _measured(entry: dict[str, Any]) -> tuple[int, str]:
    return entry["numel"], TORCH_DTYPE[entry["dtype"]]


def test_fixture_was_recorded_with_the_cited_deepspeed() -> None:
    assert DATA["deepspeed_version"] == "0.19.8"
    assert set(SETTINGS) == {k.split("/")[0] for k in CASES}


@pytest.mark.parametrize("key", sorted(CASES))
def test_selected_exactly_when_deepspeed_selects_it(key: str) -> None:
    # The wrapper class DeepSpeed's engine picked (engine.py::_do_optimizer_sanity_check).
    case = key.split("/")[0]
    stage, _, pipeline, offload = SETTINGS[case]
    picked = CASES[key][0]["optimizer"]
    assert selects_bf16_optimizer(
        stage, _recipe(case), pipeline=pipeline, offload_optimizer=offload
    ) == (picked == "BF16_Optimizer")


@pytest.mark.parametrize("key", BF16_CASES)
def test_flat_buffers_match_deepspeed(key: str) -> None:
    states = _states(key)
    for rank in CASES[key]:
        # bf16_groups_flat: trainable elements padded to 2 x world (frozen ones left out).
        assert _row(states, "parameters") == _measured(rank["bf16_groups_flat"])
        assert _row(states, FLAT_GRADIENT_BUFFER) == _measured(rank["fp32_groups_gradients_flat"])
        assert _row(states, "master_weights") == _measured(rank["fp32_groups_flat_partition"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert _row(states, name) == _measured(rank["optimizer_state"][name])
        if rank.get("boundary_grads"):
            # autograd's own bf16 .grad of every trainable parameter, alive until the step
            grads = rank["boundary_grads"]
            assert _row(states, "gradients") == (grads["numel"], "bf16")
            assert grads["dtypes"] == ["torch.bfloat16"]
        # ...and set to None by BF16_Optimizer.zero_grad after it; the flat buffer stays.
        assert rank["after_step_grads"]["tensors"] == 0
    frozen = sum(t.elements for t in states.terms if t.name == "frozen parameters")
    assert frozen == sum(n for (n,) in DATA["frozen"].values())


@pytest.mark.parametrize("key", BF16_CASES)
def test_reduce_and_step_copies_match_deepspeed(key: str) -> None:
    states = _states(key)
    padded, acc = _row(states, FLAT_GRADIENT_BUFFER)
    master, _ = _row(states, "master_weights")
    for rank in CASES[key]:
        # The bucket the engine all-reduced: a copy of the flat buffer when its dtype is not
        # the communication dtype, the buffer itself otherwise (scalars are the grad norm).
        copies = [
            e["numel"] * (2 if e["dtype"] == "torch.bfloat16" else 4)
            for e in rank["boundary_all_reduce"]
            if e["numel"] > 1 and not e["is_flat_gradient_buffer"]
        ]
        assert [e["numel"] for e in rank["boundary_all_reduce"] if e["numel"] > 1] == [padded]
        reduce = ds_step.bf16_grad_reduce(padded=padded, largest=0, accumulate=acc)
        assert reduce.bytes == sum(copies)
        # The optimizer's fp32 gradient: a view of the buffer (kept after the step) when the
        # buffer is fp32; otherwise a cast dropped after the step.
        step = ds_step.step_grads(
            stage=1, partition=master, sub_group=0, grad=acc, bf16_optimizer=True
        )
        if rank["partition_grad_is_view_of_buffer"]:
            assert step.bytes == 0 and rank["partition_grad_after_step"] == "torch.float32"
        else:
            assert rank["partition_grad_after_step"] is None
            assert step.bytes == master * 4


def _report(**parallelism: Any) -> Report:
    spec = make_spec(
        model={"architecture": TINY_LLAMA},
        precision={"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        parallelism={"engine": "deepspeed", "data": 2, **parallelism},
    )
    return estimate.estimate(spec, from_config(TINY_LLAMA))


def test_estimate_uses_bf16_optimizer_at_zero1_and_keeps_its_buffer_alive() -> None:
    r = _report(zero_stage=1)
    names = [t.name for t in r.per_gpu.terms]
    assert FLAT_GRADIENT_BUFFER in names
    flat = next(t for t in r.per_gpu.terms if t.name == FLAT_GRADIENT_BUFFER)
    transients = {t.name for t in r.timeline.transients}
    assert "deepspeed_reduce_bucket" not in transients  # no ZeRO IPG bucket
    assert "deepspeed_bf16_grad_reduce" in transients
    # zeros_like at init, zero_() after each step, never freed: alive before the first forward
    start = next(p for p in r.timeline.points if p.phase == "start")
    assert dict(start.by_category)["gradients"] == flat.bytes


def test_zero2_and_cpu_offload_keep_the_zero_rule() -> None:
    for r in (_report(zero_stage=2), _report(zero_stage=1, offload={"optimizer": "cpu"})):
        assert FLAT_GRADIENT_BUFFER not in [t.name for t in r.per_gpu.terms]


def test_zero1_nvme_offload_is_refused_under_bf16_optimizer() -> None:
    with pytest.raises(MemplanError) as err:
        _report(zero_stage=1, offload={"optimizer": "nvme"})
    assert "BF16_Optimizer" in str(err.value) and "offload" in str(err.value)


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not importable"
)
@pytest.mark.slow
def test_live_zero1_world2_matches_memplan() -> None:
    from tests.record_deepspeed_bf16_optimizer import measure

    got = measure("stage1_fp32_accum", 2, 29_711)
    assert [r["optimizer"] for r in got] == ["BF16_Optimizer"] * 2
    states = _states("stage1_fp32_accum/world2")
    for rank in got:
        assert _row(states, "parameters") == _measured(rank["bf16_groups_flat"])
        assert _row(states, FLAT_GRADIENT_BUFFER) == _measured(rank["fp32_groups_gradients_flat"])
        assert _row(states, "master_weights") == _measured(rank["fp32_groups_flat_partition"])


def test_pin_expert_group_flat_buffer_is_held_too() -> None:
    # With expert parallelism DeepSpeed gives the experts a param group, hence a flat buffer,
    # of their own (bf16_optimizer.py::_configure_moe_settings); both live in every phase.
    mixtral = {**TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 4}
    spec = make_spec(
        model={"architecture": {**mixtral, "num_experts_per_tok": 2}},
        precision={"preset": "bf16-mixed", "gradient_accumulation": "fp32"},
        parallelism={"engine": "deepspeed", "data": 4, "expert": 2, "zero_stage": 1},
    )
    arch = spec.model.architecture
    assert arch is not None
    r = estimate.estimate(spec, from_config(arch))
    flats = [t for t in r.per_gpu.terms if t.name.startswith(FLAT_GRADIENT_BUFFER)]
    assert [t.name for t in flats] == [FLAT_GRADIENT_BUFFER, f"{FLAT_GRADIENT_BUFFER} (experts)"]
    start = next(p for p in r.timeline.points if p.phase == "start")
    assert dict(start.by_category)["gradients"] == sum(t.bytes for t in flats)
