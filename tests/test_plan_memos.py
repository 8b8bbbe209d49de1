"""What plan's search remembers or skips to save work changes no answer. Pinning tests: the
oracle is the same calculator asked without the memo or the shortcut (tests/test_plan.py and
the published rows check the figures themselves).

- memplan.report.worked.peak_within's `likely_fits` (the search skips the floors of an
  evaluation it expects to fit): the same None, Peak or error as with the floors, asked of
  every evaluation of the searches below, with the shortcut forced on (every guess tried,
  the wrong ones included).
- memplan.activations.saved.predict_parts (remembered by value): what `_predicted` works out.
- memplan.states.stages' memos (the relabelled stages, the layers each stage holds): every
  layout's model states as worked out with every memo emptied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.activations import saved as activations
from memplan.config.load import load_spec
from memplan.errors import MemplanError
from memplan.model.load import load_inventory
from memplan.plan import search
from memplan.report import estimate, worked
from memplan.report.settings import setting_of
from memplan.states import stages

ROOT = Path(__file__).resolve().parent.parent


def _searched(config: str, gpus: int | None = None) -> Any:
    loaded = load_spec(ROOT / "configs" / config)
    spec = loaded.spec
    if gpus is not None:
        assert spec.plan is not None
        spec = spec.model_copy(update={"plan": spec.plan.model_copy(update={"gpus": gpus})})
    return spec, load_inventory(loaded)


def _answer(f: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return f(*args, **kwargs)
    except MemplanError as err:
        return ("raised", str(err), err.field)


@pytest.mark.parametrize(
    ("config", "gpus"), [("plan-llama-3-8b.yaml", None), ("plan-llama-3.1-8b-torchtitan.yaml", 64)]
)
def test_pin_likely_fits_gives_what_the_floors_give(
    config: str, gpus: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every evaluation of the search, asked with likely_fits on and off: the same answer
    (None, the same Peak's values, or the same error)."""
    real = worked.peak_within
    asked = {"fits": 0, "over": 0}

    def both(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("likely_fits", None)
        floors = _answer(real, *args, likely_fits=False, **kwargs)
        guessed = _answer(real, *args, likely_fits=True, **kwargs)
        if isinstance(floors, worked.Peak):
            assert isinstance(guessed, worked.Peak)
            for name in ("layout", "stages", "activations", "peak_bytes", "usable_bytes"):
                assert getattr(guessed, name) == getattr(floors, name), name
            asked["fits"] += 1
        else:
            assert guessed == floors
            asked["over"] += floors is None
        if isinstance(floors, tuple):
            raise MemplanError(floors[1], field=floors[2])
        return floors

    monkeypatch.setattr(search, "peak_within", both)
    spec, inventory = _searched(config, gpus)
    result = search.plan(spec, inventory, workers=1)
    assert result.layouts and asked["fits"] > 100 and asked["over"] > 10, asked


def test_pin_remembered_predictions_are_the_ones_worked_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every activation prediction the 8B search asks (whole model and TP slices) equals
    what `_predicted` works out of the same arguments; some are remembered."""
    real = activations.predict_parts
    calls: list[int] = []

    def checked(arch: Any, setting: Any, tied: Any, profiles: Any) -> Any:
        out = real(arch, setting, tied, profiles)
        assert out == activations._predicted(arch, setting, tied, profiles)
        calls.append(1)
        return out

    monkeypatch.setattr(activations, "predict_parts", checked)
    activations._PREDICTED.cache_clear()
    spec, inventory = _searched("plan-llama-3-8b.yaml")
    assert search.plan(spec, inventory, workers=1).layouts
    assert len(calls) > 50


def test_pin_predict_with_an_unhashable_extra() -> None:
    """An architecture whose extras do not hash (a list) is predicted without the memo."""
    from dataclasses import replace

    spec, inventory = _searched("plan-llama-3-8b.yaml")
    arch = inventory.architecture
    assert arch is not None
    listed = replace(inventory, architecture=replace(arch, extra={**arch.extra, "x": [1]}))
    setting = setting_of(spec)
    activations._PREDICTED.cache_clear()
    whole = activations.predict(inventory, setting)
    assert len(activations._PREDICTED._entries) == 1  # remembered
    assert activations.predict(listed, setting) == whole
    assert len(activations._PREDICTED._entries) == 1  # worked out, not remembered


def test_pin_remembered_model_states_are_the_ones_worked_out() -> None:
    """Every layout of the 8B search (pipelined ones included) and of the torchtitan one on
    64 GPUs: its model states with the memos warm equal those worked out with every memo of
    memplan.states.stages emptied first."""
    from memplan.model.finetune import lora as finetune

    def emptied() -> None:
        stages._stage_states.cache_clear()
        stages._RELABELLED.cache_clear()
        stages._HELD.cache_clear()

    checked = relabelled = 0
    for config, gpus in (("plan-llama-3-8b.yaml", None), ("plan-llama-3.1-8b-torchtitan.yaml", 64)):
        spec, inventory = _searched(config, gpus)
        result = search.plan(spec, inventory, workers=1)
        for c in result.layouts:
            row = spec.model_copy(update={"parallelism": c.parallelism})
            trained = finetune.apply(row, inventory)
            warm = estimate.model_states(row, trained)
            emptied()
            assert estimate.model_states(row, trained) == warm
            checked += 1
            relabelled += c.virtual_stages > 1
    assert checked > 100 and relabelled > 0, (checked, relabelled)
