"""precision.fp8_all_gather (torchao's Float8 all-gather of FSDP2 weights) against real runs:
benchmarks/fsdp2_float8_all_gather.py measured torch 2.13 FSDP2 + torchao 0.18 on 2 gloo CPU
ranks (tiny Llama, Float8Linear decoder weights, bf16 param_dtype over fp32 shards); today's
memplan must give each measured byte count (the rule is recomputed here, not read from the file).
The slow test reruns the measurement itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.load import load_inventory
from memplan.report.estimate import estimate
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-float8-all-gather.json"
sys.path.insert(0, str(ROOT))
from benchmarks import fsdp2_float8_all_gather as probe  # noqa: E402


def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def _spec(**precision: Any) -> dict[str, Any]:
    return {
        "model": {"architecture": TINY_LLAMA},
        "precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise", **precision},
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 1, "sequence_length": 16},
        "parallelism": {"engine": "fsdp2", "data": 2},
        "hardware": {"device": "cpu"},
    }


def test_measured_fsdp2_buffers_are_memplans_to_the_byte() -> None:
    """Every rank's measured layer and root all-gather output and unsharded storage, the
    layer's pre-all-gather peak (the fp8 casts) and the precomputed scales equal memplan's
    figures for the same model: with fp8 all-gather the layer's Float8Linear weights are
    1 B per element (43,264 B where bf16 gathers 86,272 B), the root (embedding, head, norm)
    is unchanged, and Float8Linear without fp8 all-gather gathers bf16 as before."""
    doc = recorded()
    assert doc["world"] == probe.WORLD
    now = probe.predicted(doc["world"])
    for case in probe.CASES:
        for rank in doc["measured"][case]:
            layer, root = rank["groups"]["layer"], rank["groups"]["root"]
            assert layer["all_gather_output"] == now[case]["layer_unsharded"], case
            assert layer["unsharded"] == now[case]["layer_unsharded"], case
            assert root["all_gather_output"] == now[case]["root_unsharded"], case
            assert root["unsharded"] == now[case]["root_unsharded"], case
            if case.startswith("fp8_all_gather"):
                assert layer["all_gather_output_dtype"] == "uint8"
                assert layer["pre_all_gather_peak"] == now[case]["layer_cast_peak"], case
                assert rank["precomputed_storage"] == now[case]["precomputed_storage"], case
            else:
                assert layer["all_gather_output_dtype"] == "bfloat16"
    assert now["fp8_all_gather"]["layer_unsharded"] < now["bf16"]["layer_unsharded"]


def test_uneven_shards_fail_in_torch_and_memplan_refuses_them() -> None:
    """Over 3 ranks the Float8Linear weights' rows (64, 32, 160) split unevenly: the recorded
    run aborted in gloo (differently sized all-gather inputs), and memplan refuses the layout,
    naming the field and the first such weight."""
    run = recorded()["uneven"]
    assert run["world"] == probe.UNEVEN_WORLD and not run["completed"]
    assert "doesn't match" in (run["error"] or "")
    spec = _spec(fp8_all_gather=True)
    spec["parallelism"]["data"] = probe.UNEVEN_WORLD
    loaded = validate(spec)
    with pytest.raises(MemplanError, match=r"q_proj\.weight \(64 rows\) over 3 ranks"):
        estimate(loaded.spec, load_inventory(loaded))


def test_estimate_gathers_the_layers_in_fp8() -> None:
    """On the estimate's timeline the decoder layer's all-gather output is the fp8 size and a
    named cast term appears; the peak does not rise."""
    reports = {}
    for on in (False, True):
        loaded = validate(_spec(fp8_all_gather=on))
        reports[on] = estimate(loaded.spec, load_inventory(loaded))
    now = probe.predicted(2)
    terms = {on: {t.name: t for t in r.timeline.transients} for on, r in reports.items()}
    assert terms[False]["fsdp2_all_gather_output"].bytes == now["bf16"]["layer_unsharded"]
    assert terms[True]["fsdp2_all_gather_output"].bytes == now["fp8_all_gather"]["layer_unsharded"]
    cast = terms[True]["fsdp2_fp8_weight_cast"]
    assert cast.bytes == now["fp8_all_gather"]["layer_cast_peak"]
    assert "fsdp2_fp8_weight_cast" not in terms[False]
    assert reports[True].timeline.peak_bytes <= reports[False].timeline.peak_bytes


@pytest.mark.parametrize(
    ("precision", "parallelism", "match"),
    [
        ({"fp8": "torchao-rowwise", "fp8_all_gather": True}, {}, "tensorwise"),
        ({"fp8": "none", "fp8_all_gather": True}, {}, "tensorwise"),
        ({"fp8_precompute_scale": True}, {}, "fp8_all_gather: true"),
        ({"fp8_all_gather": True}, {"engine": "ddp"}, "engine: fsdp2"),
    ],
)
def test_bad_combinations_are_refused_naming_the_field(
    precision: dict[str, Any], parallelism: dict[str, Any], match: str
) -> None:
    spec = _spec(**precision)
    spec["parallelism"].update(parallelism)
    with pytest.raises(MemplanError, match=match) as err:
        loaded = validate(spec)
        estimate(loaded.spec, load_inventory(loaded))
    assert "fp8_all_gather" in str(err.value) or "fp8_precompute_scale" in str(err.value)


def test_precision_preset_name_survives_the_new_keys() -> None:
    loaded = validate(_spec(fp8_all_gather=True, fp8_precompute_scale=True))
    assert loaded.spec.recipe().name == "bf16-mixed"


@pytest.mark.slow
def test_rerun_fp8_all_gather_on_two_gloo_ranks() -> None:
    """The measurement itself (about 50 s): the fp8 all-gather case on 2 ranks."""
    ranks = probe.measure(probe.WORLD, ("fp8_all_gather",))
    now = probe.predicted(probe.WORLD)["fp8_all_gather"]
    for rank in ranks:
        layer = rank["fp8_all_gather"]["groups"]["layer"]
        assert layer["unsharded"] == layer["all_gather_output"] == now["layer_unsharded"]
        assert layer["pre_all_gather_peak"] == now["layer_cast_peak"]


def test_notes_give_the_measured_precomputed_scale_bytes() -> None:
    """With fp8_precompute_scale the estimate's note gives the bytes of the scales tensor the
    recorded run held (14 Float8Linear weights x 4 B = 56 B on tiny Llama)."""
    measured = recorded()["measured"]["fp8_all_gather_precompute"][0]["precomputed_storage"]
    loaded = validate(_spec(fp8_all_gather=True, fp8_precompute_scale=True))
    notes = estimate(loaded.spec, load_inventory(loaded)).notes
    assert any("fp8_precompute_scale: " in n and f" {measured:,} B here" in n for n in notes)
    off = estimate(validate(_spec()).spec, load_inventory(validate(_spec()))).notes
    assert any("precision.fp8_all_gather: off here" in n for n in off)
