"""plan's search shares work between evaluations of one layout (report.worked.prepare) and between a
stage's floor and its timeline (timeline.parts). These are pinning tests: the oracle is the same
calculator asked without the shared pieces, so they prove the sharing changes nothing, not that
the figures are right (tests/test_plan.py and the published rows do that)."""

from __future__ import annotations

import pytest

from memplan.config.load import validate
from memplan.model.finetune import lora as finetune
from memplan.model.load import load_inventory
from memplan.report.estimate import assemble_within, model_states
from memplan.report.settings import step_settings
from memplan.report.worked import prepare
from memplan.states.engines.base import StepCache
from memplan.step import timeline as tl

CASES = {
    "fsdp2-pp4-tp2": {"engine": "fsdp2", "data": 2, "tensor": 2, "pipeline": 4},
    "megatron-pp2-interleaved": {
        "engine": "megatron",
        "data": 2,
        "pipeline": 2,
        "virtual_stages": 2,
        "schedule": "interleaved",
    },
}


def _spec(parallelism: dict[str, object], mbs: int, recompute: str):  # type: ignore[no-untyped-def]
    return validate(
        {
            "model": {"preset": "llama-3.1-8b"},
            "precision": "bf16-mixed",
            "training": {
                "sequence_length": 2048,
                "micro_batch_size": mbs,
                "gradient_accumulation_steps": 8,
                "activation_checkpointing": recompute,
            },
            "hardware": {"gpu": "H100-80GB", "gpus_per_node": 8},
            "parallelism": parallelism,
        }
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_pin_prepared_layout_gives_the_same_report(name: str) -> None:
    """assemble_within with one `prepare`d layout reused across micro-batches and
    recomputation policies gives every evaluation the report it gets on its own."""
    first = _spec(CASES[name], 1, "none")
    inventory = load_inventory(first)
    trained = finetune.apply(first.spec, inventory)
    states = model_states(first.spec, trained)
    prepared = prepare(first.spec, trained, states)
    cache = StepCache()
    for mbs, recompute in ((1, "none"), (2, "full"), (1, "full")):
        spec = _spec(CASES[name], mbs, recompute).spec
        alone = assemble_within(spec, inventory, trained, states)
        shared = assemble_within(spec, inventory, trained, states, prepared=prepared, cache=cache)
        assert alone is not None and shared is not None
        assert shared.peak_bytes == alone.peak_bytes
        assert shared.stage == alone.stage
        assert shared.stage_peaks == alone.stage_peaks
        assert shared.timeline.points == alone.timeline.points
        assert shared.timeline.transients == alone.timeline.transients
        assert shared.usable_bytes == alone.usable_bytes
        assert shared.notes == alone.notes


def test_pin_floor_and_timeline_share_their_parts() -> None:
    """floor_bytes and build given timeline.parts equal what they work out themselves."""
    loaded = _spec(CASES["fsdp2-pp4-tp2"], 2, "none")
    spec = loaded.spec
    inventory = load_inventory(loaded)
    trained = finetune.apply(spec, inventory)
    states = model_states(spec, trained)
    prepared = prepare(spec, trained, states)
    report = assemble_within(spec, inventory, trained, states, prepared=prepared)
    assert report is not None
    step = step_settings(spec, prepared.layout)
    top = prepared.stages[report.stage]
    local = prepared.local[top.stage]
    buffers = sum(t.bytes for t in top.buffers)
    per_gpu, saved = top.per_gpu, report.activations
    cache = StepCache()
    parts = tl.parts(step, local, per_gpu=per_gpu, saved=saved, cache=cache)

    def floor(cache: StepCache, shared: tl.StepParts | None = None) -> int:
        return tl.floor_bytes(
            step,
            local,
            per_gpu=per_gpu,
            buffer_bytes=buffers,
            saved=saved,
            cache=cache,
            shared=shared,
        )

    def build(cache: StepCache, shared: tl.StepParts | None = None) -> tl.Timeline:
        return tl.build(
            step,
            local,
            per_gpu=per_gpu,
            buffer_bytes=buffers,
            saved=saved,
            capacity_bytes=None,
            cache=cache,
            shared=shared,
        )

    assert floor(cache, parts) == floor(StepCache())
    alone, shared = build(StepCache()), build(cache, parts)
    assert shared.points == alone.points
    assert shared.transients == alone.transients
    assert alone.peak_bytes == report.peak_bytes
    assert floor(cache, parts) <= alone.peak_bytes


@pytest.mark.parametrize("name", sorted(CASES))
def test_pin_budget_settles_on_the_report_peak(name: str) -> None:
    """With a budget, assemble_within gives None exactly when the report it gives without one
    peaks above the budget (plan stops building stages at the first timeline over it)."""
    loaded = _spec(CASES[name], 2, "none")
    spec = loaded.spec
    inventory = load_inventory(loaded)
    trained = finetune.apply(spec, inventory)
    states = model_states(spec, trained)
    report = assemble_within(spec, inventory, trained, states)
    assert report is not None and len(report.stage_peaks) > 1
    peak = report.peak_bytes
    assert assemble_within(spec, inventory, trained, states, budget=peak - 1) is None
    within = assemble_within(spec, inventory, trained, states, budget=peak)
    assert within is not None and within.peak_bytes == peak
    assert within.stage_peaks == report.stage_peaks
    # Below every stage's peak but the highest's too: still None.
    lowest = min(p[1] for p in report.stage_peaks if p is not None)
    assert assemble_within(spec, inventory, trained, states, budget=lowest - 1) is None


def test_pin_floor_over_budget_works_out_one_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A floor above the budget ends the evaluation before the later stages' saved tensors
    are worked out (assemble_within asks each stage's when first read); without a budget
    every viewed stage's are, once each, and the report is unchanged."""
    from memplan.report import worked

    loaded = _spec(CASES["fsdp2-pp4-tp2"], 2, "none")
    spec = loaded.spec
    inventory = load_inventory(loaded)
    trained = finetune.apply(spec, inventory)
    states = model_states(spec, trained)
    before = assemble_within(spec, inventory, trained, states)
    assert before is not None
    asked: list[int] = []
    saved_on = worked.saved_on_stage

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(args[3].stage)
        return saved_on(*args, **kwargs)

    monkeypatch.setattr(worked, "saved_on_stage", counted)
    assert assemble_within(spec, inventory, trained, states, budget=0) is None
    assert asked == [0]
    asked.clear()
    report = assemble_within(spec, inventory, trained, states)
    assert report is not None
    viewed = prepare(spec, trained, states).viewed
    assert sorted(asked) == sorted(viewed) and len(viewed) > 1
    assert report.stage_peaks == before.stage_peaks
    assert report.timeline.points == before.timeline.points


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_pin_peak_within_reads_what_the_report_says(name: str, device: str) -> None:
    """peak_within (what plan's search reads of an evaluation, without the timeline's points)
    gives the peak, usable bytes, layout, stages and saved tensors of assemble_within's report
    of the same arguments, and None at the same budgets."""
    from memplan.report.worked import peak_within

    for mbs, recompute in ((1, "none"), (2, "full")):
        loaded = _spec(CASES[name], mbs, recompute)
        spec = loaded.spec.model_copy(
            update={"hardware": loaded.spec.hardware.model_copy(update={"device": device})}
        )
        inventory = load_inventory(loaded)
        trained = finetune.apply(spec, inventory)
        states = model_states(spec, trained)
        report = assemble_within(spec, inventory, trained, states)
        assert report is not None
        for budget in (None, report.peak_bytes, report.peak_bytes - 1):
            want = assemble_within(spec, inventory, trained, states, budget=budget)
            got = peak_within(spec, trained, states, budget=budget)
            assert (got is None) == (want is None)
            if got is None or want is None:
                continue
            assert got.peak_bytes == want.peak_bytes == report.peak_bytes
            assert got.usable_bytes == want.usable_bytes
            # the packing bound of reserved on CUDA, the peak itself on the CPU
            assert (want.timeline.reserved_bytes is None) == (device == "cpu")
            assert got.layout == want.layout
            assert got.stages == want.stages
            assert got.activations == want.activations
