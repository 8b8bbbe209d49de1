"""The one layout value (memplan.states.layout.Layout): what it says equals what the spec says,
its groups are the ones Megatron-LM forms, and the calculator unpacks the spec once."""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.parallelism import ParallelismSpec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.sources import from_config
from memplan.report import estimate as calculator
from memplan.report.estimate import estimate, model_states
from memplan.report.json import estimate_json as to_json
from memplan.states.layout import Layout
from memplan.states.parallel import stage_inventories
from tests.conftest import TINY_LLAMA, make_spec

LAYOUTS: list[dict[str, Any]] = [
    {},
    {"engine": "fsdp2", "data": 4},
    {"engine": "deepspeed", "zero_stage": 2, "data": 2, "offload": {"optimizer": "cpu"}},
    {"engine": "megatron", "data": 2, "tensor": 2, "sequence_parallel": True, "context": 2},
    {"engine": "megatron", "pipeline": 2, "schedule": "interleaved", "virtual_stages": 2},
    {"engine": "ddp", "gradient_as_bucket_view": True, "expert": 1},
]


@pytest.mark.parametrize("par", LAYOUTS)
def test_layout_attributes_mean_what_parallelism_spec_says(par: dict[str, Any]) -> None:
    """Every Layout attribute ParallelismSpec also has (a field or a resolved property such
    as `stage`) holds the spec's value: code written against `spec.parallelism` reads a
    Layout the same way."""
    spec = ParallelismSpec(**par)
    layout = Layout.of(spec, device="cpu")
    shared = [n for n in Layout.__dataclass_fields__ if hasattr(spec, n)]
    assert {"engine", "data", "stage", "tensor", "pipeline", "offload", "deepspeed"} <= set(shared)
    for name in shared:
        assert getattr(layout, name) == getattr(spec, name), name
    assert layout.world_size == spec.world_size
    assert layout.device == "cpu"


def test_data_shards_and_expert_data_are_megatrons_groups() -> None:
    """megatron/core/parallel_state.py::initialize_model_parallel (core_r0.12): the
    data-parallel group `with_context_parallel` has data x context ranks; the expert-data
    group world / (TP x EP x PP) = data x context / EP with expert TP = TP. 16 GPUs at
    TP 2, PP 1, CP 2: DP 4, the DP x CP group 8; with EP 4, expert-data 2."""
    layout = Layout(data=4, tensor=2, context=2, expert=4)
    assert layout.world_size == 16
    assert layout.data_shards == 8
    assert layout.expert_data == 16 // (2 * 4 * 1) == 2
    with pytest.raises(MemplanError, match="expert degree 3 must divide"):
        _ = Layout(data=4, context=1, expert=3).expert_data


def test_context_ranks_shard_model_states_like_data_ranks() -> None:
    """Context-parallel ranks hold the same weights and reduce gradients together, so FSDP2
    over data 2 x context 2 shards like data 4 (both report the same per-GPU states)."""
    inv = from_config(TINY_LLAMA)
    cp = make_spec(parallelism={"engine": "fsdp2", "data": 2, "context": 2})
    dp = make_spec(parallelism={"engine": "fsdp2", "data": 4})
    assert model_states(cp, inv)[0].per_gpu == model_states(dp, inv)[0].per_gpu


def test_stage_splits_are_shared_by_layouts_that_differ_only_in_data() -> None:
    """stage_inventories is keyed by the fields that split the tensors (SPLIT_FIELDS): plan's
    layouts of other data degrees or engines of the same split get the same objects back."""
    inv = from_config(TINY_LLAMA)
    a = stage_inventories(inv, Layout(engine="megatron", tensor_impl="megatron", data=2))
    b = stage_inventories(inv, Layout(engine="deepspeed", tensor_impl="megatron", data=8))
    assert a is b
    c = stage_inventories(inv, Layout(tensor_impl="megatron", tensor=2))
    assert c is not a


def test_finetune_is_applied_once_per_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """estimate() turns the model into the trained inventory once and hands that to the
    model states and the activations alike."""
    calls = []
    real = finetune.apply

    def counting(spec: Any, inventory: Any) -> Any:
        calls.append(inventory)
        return real(spec, inventory)

    monkeypatch.setattr(calculator.finetune, "apply", counting)
    spec = make_spec(finetune={"method": "lora", "target_modules": ["q_proj", "v_proj"]})
    base = from_config(TINY_LLAMA)
    report = estimate(spec, base)
    assert calls == [base]
    assert report.model.num_trainable_parameters < report.model.num_parameters
    assert to_json(report)["model"]["num_parameters"] == base.num_parameters
