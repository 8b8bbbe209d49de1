"""memplan's step timeline against a real step: one CPU process, the tiny Llama, measured with
torch's own MemTracker (torch/distributed/_tools/mem_tracker.py), which follows every storage
the ops create and drop.

The step runs as memplan's timeline describes it (step >= 2, `zero_grad(set_to_none=True)`,
the loss inside the model's forward, `.loss` kept and the output dropped, as transformers'
Trainer.compute_loss does), in windows, each one `with tracker:` (entering resets its peak):

  start           the tracker's current bytes before the step
  forward         the peak inside the last decoder layer's forward (its PEAK_FW snapshot)
  forward + loss  the peak of the whole forward window: memplan's max(forward, loss)
  backward        the peaks inside the last and the first decoder layer's backward (their
                  PEAK_BW snapshots): the larger is memplan's backward point (the last
                  layer's, or the first layer's with the later layers' gradients alive:
                  memplan.step.transients.first_layer_backward)
  backward window the peak of `loss.backward()`: memplan's max(backward_start, backward,
                  backward_end)
  after backward  the current bytes: parameters, gradients, optimizer states
  optimizer step  the peak of `optimizer.step()` (for *-mixed: the fp32 master gradients cast
                  in, the step, the copy back, as memplan verify's MasterWeights does)

Model states (parameters, buffers, gradients, optimizer states with any master weights) are
read off the tensors themselves (storage bytes) and must equal memplan's categories exactly:
they are whole tensors of known shape and dtype. The tracker also sees the step's input ids
([batch, sequence] int64), which memplan leaves out; they are taken off every measured total.

Tolerances. A window's peak decides the step's peak: its non-state part (activations,
transients, gradients) within verify's ACTIVATIONS_TOLERANCE (1%). The two moments inside a
layer are memplan's estimate of a working set: within verify's PEAK_TOLERANCE (3%) of the
non-state bytes. The optimizer step is whole tensors (the foreach temporaries are one
tensor per parameter; the master gradients their fp32 copies): exact, except AdamW's
for_loop: torch/optim/adamw.py::_single_tensor_adam keeps the previous parameter's `denom`
alive while it builds the next one (the name is rebound only after `sqrt() / ...` returns), so
beside memplan's 2 x the largest parameter the measured step also holds the final norm's
denom (64 x 4 B = 256 B): within ACTIVATIONS_TOLERANCE of the bytes above the states.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest

from memplan.model.sources import from_config
from memplan.report import estimate
from memplan.step.timeline import Category, Point
from memplan.verify.result import ACTIVATIONS_TOLERANCE, PEAK_TOLERANCE
from tests.conftest import TINY_LLAMA, make_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# MemTracker's module tracker warns when checkpointing re-enters a layer in backward.
pytestmark = pytest.mark.filterwarnings("ignore:The module hierarchy tracking")

BATCH, SEQUENCE = 2, 32

# precision, optimizer, implementation, activation checkpointing
CASES = {
    "fp32-adamw-foreach": ("fp32", "adamw", "foreach", "none"),
    "bf16-mixed-adamw-foreach": ("bf16-mixed", "adamw", "foreach", "none"),
    "fp32-adamw-for_loop": ("fp32", "adamw", "for_loop", "none"),
    "fp32-adamw-fused": ("fp32", "adamw", "fused", "none"),
    "fp32-sgd-momentum": ("fp32", "sgd", "for_loop", "none"),
    "fp32-adamw-full-checkpointing": ("fp32", "adamw", "foreach", "full"),
}


@dataclass(frozen=True)
class Measured:
    """Bytes measured on the real step (input ids taken off the totals)."""

    start: int
    last_layer_forward: int
    forward_window: int
    last_layer_backward: int
    first_layer_backward: int
    backward_window: int
    after_backward: int
    optimizer_window: int
    states: dict[Category, int]
    """At the start of the step: parameters, buffers, optimizer_states (masters included)."""
    gradients: int
    """After backward: the gradients the optimizer step sees (the module's `.grad`)."""


def _spec(case: str) -> Any:
    precision, optimizer, implementation, checkpointing = CASES[case]
    opt: dict[str, Any] = {"name": optimizer, "implementation": implementation}
    if optimizer == "sgd":
        opt["momentum"] = 0.9
    return make_spec(
        precision=precision,
        optimizer=opt,
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQUENCE,
            "activation_checkpointing": checkpointing,
        },
        parallelism={"engine": "ddp", "data": 1},
        hardware={"device": "cpu"},
    )


def _bytes(tensors: Any) -> int:
    """Storage bytes of the tensors, each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _total(snapshot: dict[Any, dict[Any, int]]) -> int:
    return sum(int(d["Total"]) for d in snapshot.values())


@functools.cache
def measure(case: str) -> Measured:
    from torch import nn
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    spec = _spec(case)
    recipe = spec.recipe()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[recipe.parameters]
    config = transformers.LlamaConfig(
        **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, use_cache=False
    )
    config._attn_implementation = spec.training.attention
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    if spec.training.activation_checkpointing == "full":
        model.activation_checkpointing_enable()
    params = list(model.parameters())
    masters = (
        [nn.Parameter(p.detach().float().clone()) for p in params] if recipe.master_weights else []
    )
    implementation = spec.optimizer.implementation
    kwargs: dict[str, Any] = (
        {"fused": True} if implementation == "fused" else {"foreach": implementation == "foreach"}
    )
    if spec.optimizer.name == "sgd":
        kwargs.update(lr=1e-3, momentum=spec.optimizer.momentum)
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.optimizer.name]
    optimizer = cls(masters or params, **kwargs)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (BATCH, SEQUENCE))
    tracker = MemTracker()

    def window(fn: Any) -> tuple[Any, int]:
        with tracker:  # entering resets the tracker's peak to its current bytes
            out = fn()
        return out, _total(tracker.get_tracker_snapshot("peak")) - ids.nbytes

    def step_optimizer() -> None:
        if not masters:
            optimizer.step()
            return
        for master, p in zip(masters, params, strict=True):
            master.grad = p.grad.float()
        optimizer.step()
        with torch.no_grad():
            for master, p in zip(masters, params, strict=True):
                master.grad = None
                p.copy_(master)

    def steps(count: int) -> dict[str, int]:
        got: dict[str, int] = {}
        for _ in range(count):
            tracker.reset_mod_stats()
            got["start"] = _total(tracker.get_tracker_snapshot("current")) - ids.nbytes
            loss, got["forward_window"] = window(lambda: model(input_ids=ids, labels=ids).loss)
            _, got["backward_window"] = window(loss.backward)
            del loss
            got["after_backward"] = _total(tracker.get_tracker_snapshot("current")) - ids.nbytes
            got["gradients"] = _bytes(p.grad for p in params)
            _, got["optimizer_window"] = window(step_optimizer)
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
        return got

    steps(1)  # the first step creates the optimizer states
    states: dict[Category, int] = {
        "parameters": _bytes(params),
        "buffers": _bytes(model.buffers()),
        "optimizer_states": _bytes(
            [*masters, *(v for s in optimizer.state.values() for v in s.values())]
        ),
    }
    tracker.track_external(model, optimizer, ids, *masters)
    got = steps(1)
    snaps = tracker.memory_tracking[model.model.layers[-1]].snapshots
    first = tracker.memory_tracking[model.model.layers[0]].snapshots
    return Measured(
        last_layer_forward=_total(snaps[_ModState.PEAK_FW][-1]) - ids.nbytes,
        last_layer_backward=_total(snaps[_ModState.PEAK_BW][-1]) - ids.nbytes,
        first_layer_backward=_total(first[_ModState.PEAK_BW][-1]) - ids.nbytes,
        states=states,
        **got,
    )


def timeline(case: str) -> dict[str, Point]:
    spec = _spec(case)
    report = estimate.estimate(spec, from_config(TINY_LLAMA))
    return {p.phase: p for p in report.timeline.points}


def _at_rest(point: Point) -> int:
    return sum(point.of(c) for c in ("parameters", "buffers", "optimizer_states"))


def _close(measured: int, predicted: int, rest: int, tol: float) -> None:
    """|measured - predicted| within tol of the predicted bytes above the states at rest."""
    assert abs(measured - predicted) <= tol * (predicted - rest), (measured, predicted)


@pytest.mark.parametrize("case", CASES)
def test_model_states_equal_the_measured_tensors(case: str) -> None:
    m, points = measure(case), timeline(case)
    for phase in ("start", "optimizer_step"):
        for category, measured in m.states.items():
            assert points[phase].of(category) == measured, (phase, category)
    assert points["start"].of("gradients") == 0
    assert points["backward_end"].of("gradients") == m.gradients
    assert points["optimizer_step"].of("gradients") == m.gradients
    # Nothing else is alive at the start and after the backward (the ids aside).
    assert m.start == points["start"].total_bytes == _at_rest(points["start"])
    assert m.after_backward == _at_rest(points["start"]) + m.gradients


@pytest.mark.parametrize("case", CASES)
def test_window_peaks_match_the_timeline(case: str) -> None:
    """The step's peak is one of these three windows' peaks."""
    m, points = measure(case), timeline(case)
    rest = _at_rest(points["start"])
    forward = max(points[p].total_bytes for p in ("forward", "loss"))
    backward = max(points[p].total_bytes for p in ("backward_start", "backward", "backward_end"))
    _close(m.forward_window, forward, rest, ACTIVATIONS_TOLERANCE)
    _close(m.backward_window, backward, rest, ACTIVATIONS_TOLERANCE)
    step = points["optimizer_step"].total_bytes
    if CASES[case][1:3] == ("adamw", "for_loop"):
        _close(m.optimizer_window, step, rest, ACTIVATIONS_TOLERANCE)
    else:
        assert m.optimizer_window == step


@pytest.mark.parametrize("case", CASES)
def test_layers_backward_matches_the_backward_phase(case: str) -> None:
    """The backward point is the larger of the last and the first layer's backward: the
    first's under full checkpointing (measured fp32: the last layer's 3,374,748 B, the
    first's 3,530,908 B, the point 3,518,868 B; it counted the last's only before)."""
    m, points = measure(case), timeline(case)
    rest = _at_rest(points["start"])
    layers = max(m.last_layer_backward, m.first_layer_backward)
    _close(layers, points["backward"].total_bytes, rest, PEAK_TOLERANCE)
    full = CASES[case][3] == "full"
    assert (m.first_layer_backward > m.last_layer_backward) == full
    assert ("first_layer_backward" in points["backward"].transients) == full


OVER = (
    "memplan's forward_working_set (2 x a layer's largest saved tensor) counts a saved tensor "
    "that `activations` already holds: at the last layer's forward peak fp32 b2 s32 measures "
    "662,784 B above the states, memplan says 712,192 (+49,408 B, +6.9%)"
)
UNDER = (
    "under full checkpointing the last layer's forward runs without saving but its "
    "intermediates are alive while it runs: measured 192,768 B above the states, memplan's "
    "kept inputs + forward_working_set say 115,200 (-77,568 B, -67%)"
)
FORWARD_CASES = [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=why)) if why else c
    for c, why in [
        ("fp32-adamw-foreach", OVER),
        ("bf16-mixed-adamw-foreach", ""),
        ("fp32-adamw-for_loop", OVER),
        ("fp32-adamw-fused", OVER),
        ("fp32-sgd-momentum", OVER),
        ("fp32-adamw-full-checkpointing", UNDER),
    ]
]


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_last_layer_forward_matches_the_forward_phase(case: str) -> None:
    """memplan's forward point is never the step's peak in these cases (the loss is larger,
    see test_window_peaks_match_the_timeline), so its misses change no reported peak."""
    m, points = measure(case), timeline(case)
    rest = _at_rest(points["start"])
    assert points["forward"].total_bytes < points["loss"].total_bytes
    _close(m.last_layer_forward, points["forward"].total_bytes, rest, PEAK_TOLERANCE)


@pytest.mark.slow
def test_ddp_buckets_measured_on_gloo_ranks() -> None:
    """DDP's reducer buckets on real gloo ranks (memplan verify's distributed path, torch's
    MemTracker on each rank): the measured peak of two ranks less that of one rank, where
    no DDP wrapper is built, is the bucket term memplan adds (a second copy of the fp32
    gradients, bucket_cap_mb far above this model), and both peaks are memplan's within
    ACTIVATIONS_TOLERANCE (measured: 256 B over each, the input ids memplan leaves out).
    About 20 s on 2 cores: two spawned runs."""
    from tests.test_verify_support import loaded, run

    peaks: list[int] = []
    reports = []
    for ranks in (1, 2):
        spec = loaded(parallelism={"engine": "ddp", "data": ranks})
        rows = [r.row("peak") for r in run(spec, nproc=ranks).ranks]
        measured = {row.measured for row in rows}
        assert len(measured) == 1, rows  # every rank holds the same
        peak = measured.pop()
        assert peak is not None
        peaks.append(peak)
        reports.append(estimate.estimate(spec.spec, from_config(TINY_LLAMA)))
        predicted = reports[-1].peak_bytes
        assert abs(peaks[-1] - predicted) <= ACTIVATIONS_TOLERANCE * predicted
    buckets = [t for t in reports[1].timeline.transients if t.name == "ddp_gradient_buckets"]
    assert peaks[1] - peaks[0] == buckets[0].bytes
