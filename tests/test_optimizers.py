"""Optimizer state layouts against the real torch optimizers (names, shapes, dtypes)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from memplan.optimizers import (
    BNB_BLOCKSIZE,
    BNB_MIN_8BIT_SIZE,
    OptimizerConfig,
    shared_state_tensors,
    state_tensors,
)
from memplan.precision import DTYPE_BYTES, TORCH_NAMES

SHAPES = [(7,), (5, 3), (2, 3, 4), (1, 9)]

# (memplan name, torch factory, settings) — every optimizer torch ships that memplan models.
TORCH_CASES = [
    ("adamw", lambda p: torch.optim.AdamW(p), {}),
    ("adam", lambda p: torch.optim.Adam(p, amsgrad=True), {"amsgrad": True}),
    ("adam", lambda p: torch.optim.Adam(p, fused=True), {"fused": True}),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), {}),
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), {"momentum": 0.9}),
    ("adagrad", lambda p: torch.optim.Adagrad(p), {}),
    ("rmsprop", lambda p: torch.optim.RMSprop(p), {}),
    (
        "rmsprop",
        lambda p: torch.optim.RMSprop(p, momentum=0.9, centered=True),
        {"momentum": 0.9, "centered": True},
    ),
    ("adafactor", lambda p: torch.optim.Adafactor(p), {}),
    ("nadam", lambda p: torch.optim.NAdam(p), {}),
    ("radam", lambda p: torch.optim.RAdam(p), {}),
    ("adamax", lambda p: torch.optim.Adamax(p), {}),
]


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[name])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("name", "factory", "settings"), TORCH_CASES)
def test_state_layout_matches_torch(name, factory, settings, dtype):  # type: ignore[no-untyped-def]
    params = [torch.nn.Parameter(torch.randn(s, dtype=_torch_dtype(dtype))) for s in SHAPES]
    opt = factory(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    config = OptimizerConfig(name=name, **settings)
    for p in params:
        measured = {
            k: (tuple(v.shape), v.dtype, v.numel() * v.element_size())
            for k, v in opt.state[p].items()
            if torch.is_tensor(v)
        }
        predicted = {
            s.name: (s.shape, _torch_dtype(s.dtype), s.numel * DTYPE_BYTES[s.dtype])
            for s in state_tensors(config, tuple(p.shape), dtype)
        }
        assert predicted == measured, (name, tuple(p.shape))


def test_torch_step_scalar_has_its_own_storage():
    """A 0-dim `step` tensor costs 4 bytes of its own (field notes; proved here)."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    pointers = {opt.state[p]["step"].untyped_storage().data_ptr() for p in params}
    assert len(pointers) == 3
    assert all(opt.state[p]["step"].untyped_storage().nbytes() == 4 for p in params)


def test_lion_keeps_one_momentum():
    # lion-pytorch's Lion.step: `state["exp_avg"] = torch.zeros_like(p)`, no step counter.
    states = state_tensors(OptimizerConfig(name="lion"), (4, 4), "fp32")
    assert [(s.name, s.shape) for s in states] == [("exp_avg", (4, 4))]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # below min_8bit_size (4096): two fp32 states, 4 + 4 bytes per element
        ((64, 63), 64 * 63 * 8),
        # 4096 elements: two uint8 states + two fp32 absmax of ceil(4096 / 256) = 16 blocks
        ((64, 64), 4096 * 2 + 16 * 4 * 2),
        # 4097 elements: 17 blocks (the last block is partial)
        ((4097,), 4097 * 2 + 17 * 4 * 2),
    ],
)
def test_bnb_8bit_states(shape, expected):  # type: ignore[no-untyped-def]
    assert BNB_MIN_8BIT_SIZE == 4096 and BNB_BLOCKSIZE == 256
    states = state_tensors(OptimizerConfig(name="adamw8bit"), shape, "bf16")
    assert sum(s.numel * DTYPE_BYTES[s.dtype] for s in states) == expected
    assert "step" not in {s.name for s in states}  # a Python int in bitsandbytes


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adam"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_pin_bnb_paged_32bit_adam_states(name: str, dtype: str) -> None:
    """Pinning (bitsandbytes is not installed here; read from its source, 0.41-0.50):
    optim/adamw.py::PagedAdamW and optim/adam.py::PagedAdam are Optimizer2State("adam", ...,
    optim_bits=32, is_paged=True); Optimizer2State.init_state with 32 bits keeps `step` as a
    Python int and state1 / state2 = get_state_buffer(p, dtype=torch.float32): 8 B per
    element whatever the parameter's dtype, no block absmax, no qmaps (fill_qmap is for
    uint8 states)."""
    opt = OptimizerConfig(name=name)
    for shape in ((64, 63), (1000, 1000)):
        states = state_tensors(opt, shape, dtype)
        assert [(s.name, s.shape, s.dtype) for s in states] == [
            ("state1", shape, "fp32"),
            ("state2", shape, "fp32"),
        ]
    assert shared_state_tensors(opt) == []
    assert opt.is_paged and not opt.is_8bit


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adam"])
def test_paged_32bit_adam_states_match_bitsandbytes(name: str) -> None:
    """The rule against bitsandbytes' own PagedAdamW / PagedAdam, one step on CPU (where
    get_state_buffer gives ordinary memory: paging is CUDA's), bf16 and fp32 parameters.
    Skipped where bitsandbytes is not installed (checked with bitsandbytes 0.50.2)."""
    bnb = pytest.importorskip("bitsandbytes")
    cls = {"paged_adamw": bnb.optim.PagedAdamW, "paged_adam": bnb.optim.PagedAdam}[name]
    memplan_name = {v: k for k, v in TORCH_NAMES.items()}
    for dtype in ("bf16", "fp32"):
        shapes = ((64, 63), (300, 400))
        params = [torch.nn.Parameter(torch.zeros(s, dtype=_torch_dtype(dtype))) for s in shapes]
        opt = cls(params)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in params:
            held = sorted(
                (k, tuple(v.shape), memplan_name[str(v.dtype).removeprefix("torch.")])
                for k, v in opt.state[p].items()
                if isinstance(v, torch.Tensor)
            )
            rule = state_tensors(OptimizerConfig(name=name), tuple(p.shape), dtype)
            assert held == sorted((s.name, s.shape, s.dtype) for s in rule)


def test_paged_32bit_states_of_large_tensors_leave_the_gpu() -> None:
    """get_state_buffer pages CUDA states of >= 1e5 elements (memplan.optimizers.
    is_paged_state, the rule the paged 8-bit optimizers follow): counted on the host."""
    from memplan.model.sources import from_config
    from memplan.report.estimate import estimate
    from tests.conftest import make_spec

    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 256,
        "num_hidden_layers": 1,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 256,
        "max_position_embeddings": 128,
    }
    spec = make_spec(
        model={"architecture": config},
        precision="bf16",
        optimizer={"name": "paged_adamw"},
        finetune={"method": "lora", "rank": 32, "target_modules": ["q_proj", "v_proj"]},
        parallelism={"engine": "ddp"},
    )
    gpu = estimate(spec, from_config(config)).per_gpu
    host = {t.name: t for t in gpu.host_terms}
    device = {t.name: t for t in gpu.terms}
    # lora_A [32, 4096] (q, v) and q's lora_B [4096, 32]: 131,072 elements each, paged;
    # v's lora_B [1024, 32] (32,768) stays on the GPU. fp32 adapters (peft's autocast).
    assert host["state1 (paged)"].elements == 3 * 131_072
    assert host["state2 (paged)"].dtype == "fp32"
    assert device["state1"].elements == 32_768
    assert "qmap1" not in device


def test_bnb_qmaps_are_shared_once():
    maps = shared_state_tensors(OptimizerConfig(name="paged_adamw8bit"))
    assert sum(m.numel * DTYPE_BYTES[m.dtype] for m in maps) == 2 * 256 * 4
    assert shared_state_tensors(OptimizerConfig(name="adamw")) == []


# --- step temporaries: memplan's rule against a real CPU step measured by torch's MemTracker ---

STEP_CASES = [
    ("adam", {}),
    ("adam", {"amsgrad": True}),
    ("adamw", {}),
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("adagrad", {}),
    ("rmsprop", {}),
    ("rmsprop", {"centered": True}),
    ("rmsprop", {"momentum": 0.9}),
    ("rmsprop", {"momentum": 0.9, "centered": True}),
    ("nadam", {}),
    ("radam", {}),
    ("adamax", {}),
    ("adafactor", {}),
]
TORCH_CLASSES = {
    "adam": "Adam",
    "adamw": "AdamW",
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adamax": "Adamax",
    "adafactor": "Adafactor",
}
# Orders that tell "k x largest" from "k x this + previous" and from "k x all".
STEP_SHAPES = [
    ((64, 32), (32,), (128, 16)),
    ((1000,), (64, 32)),
    ((64, 32), (40, 50)),
    ((40, 50), (64, 32), (8,)),
]


def second_step_temporaries(
    params: list[torch.nn.Parameter], name: str, implementation: str, **settings: Any
) -> int:
    """Bytes a second `opt.step()` allocates above what it started with (its temporaries),
    measured by torch's MemTracker; the first step makes the state."""
    from torch.distributed._tools.mem_tracker import MemTracker

    kernel = {"foreach": {"foreach": True}, "for_loop": {"foreach": False}}.get(
        implementation, {"fused": True}
    )
    opt = getattr(torch.optim, TORCH_CLASSES[name])(params, lr=1e-3, **settings, **kernel)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the state exists from here on
    tracker = MemTracker()
    tracker.track_external(opt, *params)
    with tracker:
        opt.step()
    cpu = torch.device("cpu")
    peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
    return int(peak - tracker.get_tracker_snapshot("current")[cpu]["Total"])


def _measured_step_temporaries(
    name: str, settings: dict, implementation: str, shapes: tuple, dtype: torch.dtype
) -> int:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]
    return second_step_temporaries(params, name, implementation, **settings)


@pytest.mark.parametrize("shapes", STEP_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("implementation", ["foreach", "for_loop", "fused"])
@pytest.mark.parametrize(("name", "settings"), STEP_CASES)
def test_step_temporaries_match_torch(
    name: str, settings: dict, implementation: str, shapes: tuple
) -> None:
    """Oracle: torch's own step (torch/optim/<opt>.py, 2.13) measured by MemTracker."""
    from memplan.optimizers import FUSED_OPTIMIZERS, NOT_FUSED_OPTIMIZERS
    from memplan.states.optimizer_step import torch_optimizer_step

    if implementation == "fused" and name not in FUSED_OPTIMIZERS:
        assert name in NOT_FUSED_OPTIMIZERS  # the spec refuses it (test_cli / spec tests)
        with pytest.raises(TypeError):  # torch has no fused kernel
            _measured_step_temporaries(name, settings, implementation, shapes, torch.float32)
        return
    measured = _measured_step_temporaries(name, settings, implementation, shapes, torch.float32)
    sizes = [math.prod(s) for s in shapes]
    t = torch_optimizer_step(
        name=name, implementation=implementation, updated=sum(sizes), sizes=sizes, dtype="fp32"
    )
    predicted = t.bytes if t else 0
    # adafactor's `update.norm(2)` per tensor: one 0-dim fp32 at a time (_adafactor.py)
    slack = 4 * len(shapes) if name == "adafactor" else 0
    if name == "adafactor" and implementation == "for_loop":
        # left out by the rule (memplan.states.optimizer_step.FOR_LOOP_TEMPORARIES): the
        # row/column means of >= 2-D tensors, the `grad_squared` of 1-D ones, and 0-dim norms.
        factors = sum(s[0] + s[1] for s in shapes if len(s) == 2)
        vectors = sum(s[0] for s in shapes if len(s) == 1)
        slack += 4 * (factors + vectors)
    assert predicted <= measured <= predicted + slack, (measured, predicted)


@pytest.mark.parametrize("name", ["adam", "adagrad", "rmsprop"])
def test_step_temporaries_follow_the_state_dtype(name: str) -> None:
    """bf16 parameters without masters: the temporaries are bf16 too (real step)."""
    from memplan.states.optimizer_step import torch_optimizer_step

    shapes = STEP_SHAPES[0]
    sizes = [math.prod(s) for s in shapes]
    measured = _measured_step_temporaries(name, {}, "foreach", shapes, torch.bfloat16)
    t = torch_optimizer_step(
        name=name, implementation="foreach", updated=sum(sizes), sizes=sizes, dtype="bf16"
    )
    assert t is not None and measured == t.bytes


@pytest.mark.parametrize("name", ["rmsprop", "nadam", "radam", "adamax", "adafactor"])
def test_spec_refuses_a_fused_kernel_torch_lacks(name: str) -> None:
    from memplan.errors import MemplanError
    from tests.conftest import make_spec

    with pytest.raises(MemplanError, match=f"optimizer: torch.optim has no fused {name}"):
        make_spec(optimizer={"name": name, "implementation": "fused"})
