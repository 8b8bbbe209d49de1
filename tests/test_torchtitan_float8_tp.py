"""torchtitan's decoder layers under torchao Float8 tensor parallelism (memplan.activations.
torchtitan_float8) against real runs: benchmarks/torchtitan_float8_tp_activations.py measured
what each of 2 gloo ranks holds for backward, torchtitan 0.3.0's Llama 3 with 018740b's Float8 TP
plan (torchao 0.18 PrepareFloat8ModuleInput / Float8ColwiseParallel / Float8RowwiseParallel) and
the bf16 plan beside it. Today's memplan must give every stored figure (the rule is recomputed
here, not read from the file); the slow test reruns three cases live.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memplan.model.sources import from_config
from tests.conftest import make_spec, micro_batch_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "torchtitan-float8-tp-activations.json"
sys.path.insert(0, str(ROOT))
from benchmarks import torchtitan_float8_tp_activations as bench  # noqa: E402


def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def _predicted(row: dict[str, Any]) -> int:
    return bench.predicted_activations(
        float8=row["float8"],
        mode=row["mode"],
        sequence_parallel=row["sequence_parallel"],
        fused_qkv=row["fused_qkv"],
        rank=row["rank"],
    ).bytes


def test_every_measured_rank_case_is_memplans_to_the_byte() -> None:
    """48 rank-cases: bf16 and Float8 x none / full / selective-op x SP on / off x wqkv or
    wq / wk / wv, on both ranks. The stored file is from a clean tree."""
    doc = recorded()
    assert doc["stamp"]["dirty"] is False
    rows = doc["rows"]
    assert len(rows) == 48
    wrong = [(r["case"], r["rank"], r["measured_bytes"], _predicted(r)) for r in rows]
    wrong = [w for w in wrong if w[2] != w[3]]
    assert not wrong


def _measured(case: str, rank: int = 0) -> int:
    rows = recorded()["rows"]
    return int(next(r["measured_bytes"] for r in rows if (r["case"], r["rank"]) == (case, rank)))


def test_float8_tp_saves_less_than_bf16_where_measured() -> None:
    """The key figures: without checkpointing torchtitan's Float8 TP plan keeps 12,256 B less
    on each rank than the bf16 plan (two layers; the gathered attention and FFN inputs and w2's
    input in fp8, wo's fp8 input added), with SP or without; memplan follows. Under 16-bit
    accounting (before this rule) memplan gave the bf16 figure for both."""
    for sp in ("sp", "nosp"):
        bf16, f8 = _measured(f"bf16-none-{sp}-wqkv"), _measured(f"float8-none-{sp}-wqkv")
        assert bf16 - f8 == 12_256
        row = {"float8": True, "mode": "none", "sequence_parallel": sp == "sp"}
        assert _predicted({**row, "fused_qkv": True, "rank": 0}) == f8


def test_spec_path_dispatches_to_the_float8_rule() -> None:
    """The estimate's own path (memplan.activations.micro_batch from a spec: 0.3.0's fused
    wqkv) gives the measured Float8 figure."""
    spec = make_spec(
        model={"architecture": bench.config(), "implementation": "torchtitan"},
        precision={"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
        training={
            "micro_batch_size": bench.BATCH,
            "sequence_length": bench.SEQ,
            "activation_checkpointing": "selective-op",
        },
        parallelism={"engine": "fsdp2", "data": 2, "tensor": 2, "sequence_parallel": True},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(bench.config()))
    assert saved.modelled, saved.notes
    assert saved.bytes == _measured("float8-selective-op-sp-wqkv")
    assert any("torchtitan_float8" in n for n in saved.notes)


def test_rowwise_keeps_the_16_bit_tp_rule() -> None:
    """torchtitan gives rowwise recipes torch's plain TP styles (018740b parallelize_llama:
    enable_float8_tensorwise_tp only without a rowwise recipe): the bf16 plan's figure."""
    spec = make_spec(
        model={"architecture": bench.config(), "implementation": "torchtitan"},
        precision={"preset": "bf16-mixed", "fp8": "torchao-rowwise"},
        training={"micro_batch_size": bench.BATCH, "sequence_length": bench.SEQ},
        parallelism={"engine": "fsdp2", "data": 2, "tensor": 2, "sequence_parallel": True},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(bench.config()))
    assert saved.bytes == _measured("bf16-none-sp-wqkv")


def test_unconverted_linear_is_refused_as_torchao_fails() -> None:
    """An FFN width of 200 (not a multiple of 16) leaves w1 / w2 / w3 nn.Linear; torchao's
    PrepareFloat8ModuleInput fails on it (recorded on both ranks) and memplan refuses with
    the width and the reason."""
    refused = recorded()["refused"]
    assert len(refused) == 2
    for row in refused:
        assert "assert self.linear_mm_config is not None" in row["torchao"]
    saved = bench.predicted_activations(
        float8=True,
        mode="none",
        sequence_parallel=True,
        fused_qkv=True,
        rank=0,
        ffn=bench.REFUSED_FFN,
    )
    assert not saved.modelled
    assert "intermediate_size=200 is not a multiple of 16" in saved.notes[0]
    assert "torchao-rowwise" in saved.notes[0]


def _layer_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = recorded()["layer_forward"]["rows"]
    assert len(rows) == 8
    return rows


def test_float8_cast_term_is_the_measured_cast() -> None:
    """At the first layer's forward peak under Float8 the storages freed by the layer's end
    include one fp8 cast (w2's weight, 6,144 elements): two fp32 tensors and the fp8 result;
    memplan's float8_cast_forward is those three, on every rank, SP on or off."""
    for row in _layer_rows():
        terms = bench.forward_terms(
            float8=row["case"].startswith("float8"),
            sequence_parallel="-nosp-" not in row["case"],
            rank=row["rank"],
        )
        cast = [n for n, dtype in row["momentary"] if dtype.endswith(("float32", "e4m3fn"))]
        cast = [n for n in cast if n > 4]  # the 4 B scale goes on with the result
        assert terms["memplan_float8_cast_forward"] == sum(cast), row["case"]


def test_forward_terms_cover_the_measured_layer_transient() -> None:
    """What the layer holds for a moment beyond what it keeps (peak - end) is within memplan's
    forward working set plus the Float8 cast term; without the cast term (16-bit accounting)
    the Float8 rows' 63,492 B and 65,540 B exceed the 14,336 B and 16,384 B working sets."""
    for row in _layer_rows():
        terms = bench.forward_terms(
            float8=row["case"].startswith("float8"),
            sequence_parallel="-nosp-" not in row["case"],
            rank=row["rank"],
        )
        assert row["transient_bytes"] <= sum(terms.values()), row["case"]


@pytest.mark.slow
def test_live_float8_tp_on_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("torchao.float8")
    pytest.importorskip("torchtitan.models.llama3")
    from tests import torchtitan_probe as probe
    from tests.torchtitan_float8_tp_probe import Case, run

    assert (probe.DIM, probe.FFN, probe.BATCH, probe.SEQ) == (
        bench.DIM,
        bench.FFN,
        bench.BATCH,
        bench.SEQ,
    )
    cases = [
        Case(True, "none", True, True),
        Case(True, "selective-op", False, False),
        Case(True, "full", True, True),
    ]
    ranks = run(cases, tmp_path)
    for case in cases:
        for r, measured in enumerate(ranks):
            row = {
                "float8": case.float8,
                "mode": case.mode,
                "sequence_parallel": case.sequence_parallel,
                "fused_qkv": case.fused_qkv,
                "rank": r,
            }
            assert measured[case.name] == _predicted(row), (case.name, r)
