"""Falcon's rule per transformers release (issue 15): 5.25 by default, 5.24 when asked.

The 5.25 rule is proven against live models in tests/test_activations_families.py (the pinned
environment runs 5.25). The 5.24 rule is checked here against bytes measured once under
transformers 5.24 (tests/data/falcon_transformers_5_24.json, recorded by
tests/record_falcon_transformers_524.py): an independent oracle that needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from memplan.activations import predict
from memplan.model.forward.tensors import Activations, Setting
from memplan.model.sources import Inventory, from_config
from memplan.versions import RULES_TRANSFORMERS

FIXTURE = json.loads((Path(__file__).parent / "data" / "falcon_transformers_5_24.json").read_text())
CASES = FIXTURE["cases"]
BLOCKS = ("embeddings", "layers", "head", "loss")


def _inventory(case: dict[str, Any]) -> Inventory:
    inv = from_config(case["config"])
    assert inv.architecture is not None
    extra = {**inv.architecture.extra, **case["carried"]}
    return dataclasses.replace(inv, architecture=dataclasses.replace(inv.architecture, extra=extra))


def _setting(case: dict[str, Any], transformers: str) -> Setting:
    _, cast, stream, matmul = FIXTURE["precisions"][case["precision"]]
    return Setting(
        batch=FIXTURE["batch"],
        sequence=FIXTURE["sequence"],
        stream=stream,
        matmul=matmul,
        autocast=cast is not None,
        device="cpu",
        attention=case["attention"],
        dropout=None,
        checkpointing="none",
        transformers=transformers,
    )


def _blocks(saved: Activations) -> dict[str, int]:
    """Per block, RoPE's cos/sin moved to the layers (first saved by layer 0), as the
    measurement attributes them (tests/test_activations_families.py::predicted_blocks)."""
    out = dict.fromkeys(BLOCKS, 0)
    for block in saved.blocks:
        for t in block.tensors:
            moved = block.name == "embeddings" and t.name.startswith("rotary_emb.")
            out["layers" if moved else block.name] += t.bytes * block.count
    return out


def test_fixture_was_measured_under_524() -> None:
    assert FIXTURE["transformers"].startswith("5.24.")
    assert len(CASES) == 48


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_falcon_524_rule_matches_524_measurement(case: dict[str, Any]) -> None:
    saved = predict(_inventory(case), _setting(case, "5.24"))
    assert saved.modelled, saved.notes
    assert _blocks(saved) == case["measured"]


@pytest.mark.parametrize("old", ["5.24", "5.24.0", "5.23", "5.0.1"])
def test_524_and_older_take_the_524_rule(old: str) -> None:
    case = CASES[0]
    assert _blocks(predict(_inventory(case), _setting(case, old))) == case["measured"]


def test_eager_fp32_multi_query_differs_by_the_index_saves() -> None:
    """The issue's case (falcon-eager-fp32, no dropout): layers measured 245,024 B under
    5.24 and 244,992 B under 5.25 (issue 15; tests/test_activations_families.py measures the
    latter live). The difference is 5.24's two int64 index lists per layer
    (`qkv[..., [-2], :]` / `[..., [-1], :]`: 2 layers x 2 x 8 B)."""
    case = next(c for c in CASES if c["id"] == "falcon-eager-fp32-dropout0")
    assert case["measured"]["layers"] == 245_024
    new = _blocks(predict(_inventory(case), _setting(case, "5.25")))
    assert new["layers"] == 244_992
    assert {k: v for k, v in new.items() if k != "layers"} == {
        k: v for k, v in case["measured"].items() if k != "layers"
    }


def test_pin_setting_defaults_to_the_rules_transformers() -> None:
    st = _setting(CASES[0], "5.25")
    fields = {
        f.name: getattr(st, f.name) for f in dataclasses.fields(st) if f.name != "transformers"
    }
    assert Setting(**fields).transformers == RULES_TRANSFORMERS == "5.25"
