"""FSDP2 under torch.distributed.pipelining: the stage's unsharded gradients, accumulated in
reduce_dtype over the micro-batches (memplan.states.engines.fsdp2.pipeline).

Oracle: a real run (tests/pp_fsdp2_probe.py): 4 gloo ranks, pipeline 2 x FSDP2 data 2,
torch's Schedule1F1B over 4 micro-batches, each stage holding parameters of the shapes
memplan's inventory gives that stage, wrapped as torchtitan wraps under PP (a group per
layer and the stage root; param_dtype bf16, reduce_dtype fp32, reshard_after_forward=False).
Right before the schedule's REDUCE_GRAD every rank holds `unsharded_accumulated_grad` for
every parameter of its stage: measured bytes vs memplan's `fsdp2_pipeline_accumulated_grads`.
The same run measures what the last stage's `stage.output_chunks` holds (torch's
schedules keep every micro-batch's output until the next step): memplan's
`pipeline_output_chunks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.activations import for_stages
from memplan.config.load import validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.settings import setting_of
from memplan.states.engines.base import StepActivations, StepStates
from memplan.states.engines.fsdp2 import pipeline
from memplan.states.parallel import stage_inventories
from tests.conftest import TINY_LLAMA

ARCH: dict[str, Any] = {**TINY_LLAMA, "num_hidden_layers": 4}


def _spec(microbatches: int = 4, arch: dict[str, Any] = ARCH, **parallelism: Any) -> Any:
    return validate(
        {
            "model": {"architecture": arch},
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


def _memplan_terms(
    spec: Any, arch: dict[str, Any] = ARCH
) -> tuple[list[list[list[list[int]]]], list[int]]:
    """Each stage's parameter shapes (grouped by layer, the stage's root parameters as one
    more group) and memplan's accumulated-gradient bytes for it."""
    inventory = from_config(arch)
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


# A vocabulary large enough that the last stage's logits matter: [2, 16, 8192] bf16 = 512 KiB
# per micro-batch beside 2 x 8192 x 64 head and embedding parameters.
VOCAB_ARCH: dict[str, Any] = {**ARCH, "vocab_size": 8192}


def test_pp_fsdp2_measured(tmp_path: Path) -> None:
    """One real run (tests/pp_fsdp2_probe.py, the LM head applied on the last stage):

    - right before REDUCE_GRAD every rank holds `unsharded_accumulated_grad` in fp32 for
      every parameter of its stage, nothing left in `.grad`, the groups unsharded: memplan's
      `fsdp2_pipeline_accumulated_grads`;
    - torch.distributed.pipelining's last stage keeps every micro-batch's output (the
      logits) in `stage.output_chunks` until the next step (memplan.step.transients.
      pipeline_output_chunks): the bytes it holds before the last micro-batch's forward are
      memplan's `pipeline_output_chunks` (forward to optimizer step), at REDUCE_GRAD that
      plus `pipeline_output_chunks_current`; with `return_outputs=False` it holds nothing,
      and memplan's `pipeline_return_outputs: false` drops both terms;
    - every stage's receive buffers (an input one per micro-batch unless first, a gradient
      one unless last) at REDUCE_GRAD, and the most outputs its fwd_cache held: memplan's
      `pipeline_recv_buffers` (+ `_in_flight`) and `pipeline_stage_outputs`."""
    pytest.importorskip("torch.distributed.pipelining")
    from tests.pp_fsdp2_probe import run

    spec = _spec(arch=VOCAB_ARCH)
    shapes, grads = _memplan_terms(spec, VOCAB_ARCH)
    report = estimate(spec, from_config(VOCAB_ARCH))
    assert report.stage == 1  # the last stage is the most loaded: its terms are the report's
    terms = {t.name: t for t in report.timeline.transients}
    held, current = terms["pipeline_output_chunks"], terms["pipeline_output_chunks_current"]
    assert held.phases[0] == "forward" and held.phases[-1] == "optimizer_step"
    assert current.phases[0] == "backward_start"
    hidden = VOCAB_ARCH["hidden_size"]
    lay = report.layout
    buffers = [
        a.buffers
        for a in for_stages(from_config(VOCAB_ARCH), setting_of(spec), lay, spec.finetune, 4)
    ]
    ranks = run(shapes, tmp_path, head=[VOCAB_ARCH["vocab_size"], hidden])
    for r in ranks:
        assert r["dtypes"] == ["torch.float32"]
        assert r["states"] == ["ShardedState.UNSHARDED"]  # no reshard after backward
        assert r["left"] == 0
        assert r["accumulated"] == grads[r["stage"]], r
        if r["stage"] == 0:
            assert r["output_chunks"] == 0  # torch 2.13 keeps the last stage's only
            continue
        assert r["output_shapes"] == [[2, 16, VOCAB_ARCH["vocab_size"]]] * 4
        assert r["output_dtypes"] == ["torch.bfloat16"]
        assert r["output_chunks_before_forward"][-1] == held.bytes, r
        assert r["output_chunks"] == held.bytes + current.bytes, r
        assert r["output_chunks_step2"] == 0
    # The stages' receive buffers and in-flight outputs (memplan.activations.pipeline.
    # torch_stage_buffers), on every rank.
    for r in ranks:
        saved = buffers[r["stage"]]
        end = sum(t.bytes for t in saved if "backward_end" in t.phases)
        assert end == r["input_recv_buffers"] + r["grad_recv_buffers"], r
        outputs = sum(t.bytes for t in saved if t.name == "pipeline_stage_outputs")
        if r["stage"] == 1:  # the last stage's fwd_cache holds its in-flight logits
            outputs = current.bytes
        assert outputs == r["most_cached_outputs"], r
    off = estimate(_spec(arch=VOCAB_ARCH, pipeline_return_outputs=False), from_config(VOCAB_ARCH))
    assert not {"pipeline_output_chunks", "pipeline_output_chunks_current"} & {
        t.name for t in off.timeline.transients
    }


def test_pp_output_chunks_defaults() -> None:
    """Who keeps the outputs: torch's default step(return_outputs=True) with transformers'
    model code; torchtitan 0.3.0's trainer passes return_outputs=False (read from its
    source: trainer.py::forward_backward_step); Megatron's schedules (engine megatron) keep
    none; the key is refused where no torch schedule runs."""
    titan = validate(
        {
            "model": {"architecture": VOCAB_ARCH, "implementation": "torchtitan"},
            "parallelism": {"engine": "fsdp2", "data": 2, "pipeline": 2},
        }
    ).spec
    assert not estimate(titan, from_config(VOCAB_ARCH)).layout.pipeline_outputs_held
    assert estimate(_spec(arch=VOCAB_ARCH), from_config(VOCAB_ARCH)).layout.pipeline_outputs_held
    with pytest.raises(Exception, match="pipeline_return_outputs"):
        validate(
            {
                "model": {"architecture": VOCAB_ARCH},
                "parallelism": {
                    "engine": "megatron",
                    "pipeline": 2,
                    "pipeline_return_outputs": True,
                },
            }
        )


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
