"""transformers' own Adafactor (`optimizer: adafactor-hf`) against its real step on CPU.

Independent oracle throughout: transformers 5.25's `transformers.optimization.Adafactor`, built
with the HF Trainer's `optim="adafactor"` arguments (memplan.verify.build.HF_TRAINER_ADAFACTOR),
stepped twice (the first step makes the state); the state is read from `optimizer.state` and the
second step's temporaries are measured by torch's MemTracker (every storage the ops create).
The predictions are memplan.optimizers.state_tensors and
memplan.states.optimizer_step.hf_adafactor_peak (the rules cite the source lines).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.optimizers import OptimizerConfig, state_tensors
from memplan.precision import DTYPE_BYTES, PRESETS, TORCH_NAMES
from memplan.report.estimate import estimate
from memplan.states.optimizer_step import hf_adafactor_peak, updated_tensors
from tests.conftest import TINY_LLAMA, make_spec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HF = OptimizerConfig(name="adafactor-hf")
# Orders where each of the rule's moments is the peak: a factored tensor's product beside its
# factors, and the previous tensor's `update` beside the next one's `grad**2 + eps`
# ((1000,) then (64, 32)); a 3-D tensor; a vector last.
SHAPES = [
    ((64, 32), (32,), (128, 16)),
    ((1000,), (64, 32)),
    ((3, 5, 7), (11,)),
    ((40, 50), (64, 32), (8,)),
]
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "hidden_size": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "type_vocab_size": 2,
    "vocab_size": 1000,
}


def _dtype(name: str) -> Any:
    return getattr(torch, TORCH_NAMES[name])


def real_step(params: list[Any]) -> tuple[Any, int]:
    """transformers' Adafactor over `params` with random gradients: two steps, the second
    measured. Returns (the optimizer, the second step's peak bytes above its start)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.optimization import Adafactor

    from memplan.verify.build import HF_TRAINER_ADAFACTOR

    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adafactor(params, **HF_TRAINER_ADAFACTOR)
    opt.step()
    tracker = MemTracker()
    tracker.track_external(opt, *params)
    with tracker:
        opt.step()
    cpu = torch.device("cpu")
    peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
    return opt, int(peak - tracker.get_tracker_snapshot("current")[cpu]["Total"])


def held_state(opt: Any, params: list[Any]) -> list[dict[str, tuple[tuple[int, ...], Any]]]:
    return [
        {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items() if torch.is_tensor(v)}
        for p in params
    ]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_states_match_transformers(dtype: str) -> None:
    """Names, shapes and dtypes of every state tensor (fp32 for 16-bit parameters; `step` a
    Python int, `RMS` a 0-dim tensor)."""
    shapes = [s for group in SHAPES for s in group]
    params = [torch.nn.Parameter(torch.randn(s, dtype=_dtype(dtype))) for s in shapes]
    opt, _ = real_step(params)
    for p, held in zip(params, held_state(opt, params), strict=True):
        rule = state_tensors(HF, tuple(p.shape), dtype)
        assert held == {s.name: (s.shape, _dtype(s.dtype)) for s in rule}, tuple(p.shape)
        assert isinstance(opt.state[p]["step"], int)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_step_temporaries_match_transformers(shapes: tuple, dtype: str) -> None:
    params = [torch.nn.Parameter(torch.randn(s, dtype=_dtype(dtype))) for s in shapes]
    _, measured = real_step(params)
    assert sum(hf_adafactor_peak([(s, dtype) for s in shapes])) == measured


def _model(config: dict[str, Any], dtype: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(**config)
    auto = (
        AutoModelForSequenceClassification
        if config["model_type"] == "bert"
        else AutoModelForCausalLM
    )
    return auto.from_config(cfg).to(_dtype(dtype))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLAMA], ids=["bert", "llama"])
def test_whole_models_match_transformers(config: dict[str, Any], dtype: str) -> None:
    """A BERT-tiny-like classifier and a Llama-like decoder built by transformers: the state
    bytes after the step and the step's peak temporaries, over the inventory memplan builds from
    the same config (its tensors, in `model.parameters()` order)."""
    model = _model(config, dtype)
    params = list(model.parameters())
    opt, measured = real_step(params)
    held = sum(
        v.numel() * v.element_size()
        for p in params
        for v in opt.state[p].values()
        if torch.is_tensor(v)
    )
    inventory = from_config(config)
    tensors = updated_tensors(inventory, PRESETS[dtype])
    predicted = sum(
        s.numel * DTYPE_BYTES[s.dtype] for shape, d in tensors for s in state_tensors(HF, shape, d)
    )
    assert [tuple(p.shape) for p in params] == [shape for shape, _ in tensors]
    assert predicted == held
    assert sum(hf_adafactor_peak(tensors)) == measured


def test_estimate_carries_the_step_and_states() -> None:
    """The Llama estimate's step transient and optimizer-state rows are the rule's, through
    the ddp engine (the real bytes: test_whole_models_match_transformers)."""
    report = estimate(
        make_spec(precision="bf16", optimizer={"name": "adafactor-hf"}),
        from_config(TINY_LLAMA),
    )
    step = [t for t in report.timeline.transients if t.name == "optimizer_step_temporaries"]
    tensors = updated_tensors(from_config(TINY_LLAMA), PRESETS["bf16"])
    assert [t.bytes for t in step] == [sum(hf_adafactor_peak(tensors))]
    assert step[0].parts == hf_adafactor_peak(tensors)
    states = {t.name: t for t in report.per_gpu.terms if t.category == "optimizer_states"}
    assert set(states) == {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "RMS"}
    assert {t.dtype for t in states.values()} == {"fp32"}
    n = sum(math.prod(s) for s, _ in tensors)
    assert states["RMS"].bytes == 4 * len(tensors) and n > 0


def test_spec_refuses_a_fused_kernel() -> None:
    with pytest.raises(MemplanError, match="adafactor-hf .* has no fused kernel") as err:
        make_spec(optimizer={"name": "adafactor-hf", "implementation": "fused"})
    assert "optimizer" in str(err.value)


def test_fsdp2_is_refused_with_the_reason() -> None:
    spec = make_spec(optimizer={"name": "adafactor-hf"}, parallelism={"engine": "fsdp2"})
    with pytest.raises(MemplanError, match="adafactor-hf does not run on FSDP2.*mixed") as err:
        estimate(spec, from_config(TINY_LLAMA))
    assert err.value.field == "optimizer.name"


def test_transformers_adafactor_fails_on_fsdp2() -> None:
    """The refusal's oracle: transformers' Adafactor over FSDP2's DTensor parameters (one gloo
    rank is enough: its states are plain tensors, its gradients DTensors)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers.optimization import Adafactor

    from memplan.verify.build import HF_TRAINER_ADAFACTOR

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
        fully_shard(model)
        opt = Adafactor(model.parameters(), **HF_TRAINER_ADAFACTOR)
        model(torch.randn(3, 8)).sum().backward()
        with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
            opt.step()
    finally:
        dist.destroy_process_group()
