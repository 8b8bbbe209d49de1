"""precision.fp8_all_gather under DTensor tensor parallelism against real runs:
benchmarks/fsdp2_float8_tp.py measured torch 2.13 FSDP2 + torchao 0.18 Float8 TP styles on 4 gloo
CPU ranks (dp 2 x tp 2, tiny Llama); today's memplan must give each measured byte count on each
rank (the rule is recomputed here, not read from the file). The slow test reruns one case.
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
RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-float8-tp.json"
sys.path.insert(0, str(ROOT))
from benchmarks import fsdp2_float8_tp as probe  # noqa: E402


def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


def _spec(case: str, **parallelism: Any) -> dict[str, Any]:
    on = case.startswith("fp8_all_gather")
    return {
        "model": {"architecture": {**TINY_LLAMA, **probe.MODELS.get(case, {})}},
        "precision": {
            "preset": "bf16-mixed",
            "fp8": "torchao-tensorwise",
            "fp8_all_gather": on,
            "fp8_precompute_scale": case.endswith("precompute"),
        },
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 1, "sequence_length": probe.SEQUENCE},
        "parallelism": {
            "engine": "fsdp2",
            "data": probe.DATA,
            "tensor": probe.TENSOR,
            "sequence_parallel": not case.endswith("sp_off"),
            **parallelism,
        },
        "hardware": {"device": "cpu"},
    }


def test_measured_tp_buffers_are_memplans_to_the_byte_on_every_rank() -> None:
    """Each of the 4 ranks' measured layer and root all-gather output and unsharded storage,
    the layer's pre-all-gather peak (the fp8 casts of its TP-local shards) and the precomputed
    scales equal memplan's figures for that rank's TP shard: fp8 all-gather halves the layer's
    gather under TP as without it (21,760 B where bf16 gathers 43,264 B), with or without
    sequence parallelism, and the root (the vocabulary-parallel embedding and head, 521 and
    520 rows on the two TP ranks) is unchanged."""
    doc = recorded()
    assert (doc["data"], doc["tensor"]) == (probe.DATA, probe.TENSOR)
    now = probe.predicted()
    for case in probe.CASES:
        ranks = doc["measured"][case]
        assert len(ranks) == probe.DATA * probe.TENSOR, case
        for rank in ranks:
            ours = now[case][rank["tp_rank"]]
            layer, root = rank["groups"]["layer"], rank["groups"]["root"]
            assert layer["all_gather_output"] == ours["layer_unsharded"], (case, rank["rank"])
            assert layer["unsharded"] == ours["layer_unsharded"], (case, rank["rank"])
            assert root["all_gather_output"] == ours["root_unsharded"], (case, rank["rank"])
            assert root["unsharded"] == ours["root_unsharded"], (case, rank["rank"])
            if case.startswith("fp8_all_gather"):
                assert layer["all_gather_output_dtype"] == "uint8"
                assert layer["pre_all_gather_peak"] == ours["layer_cast_peak"], case
                assert rank["precomputed_storage"] == ours["precomputed_storage"], case
            else:
                assert layer["all_gather_output_dtype"] == "bfloat16"
    assert now["fp8_all_gather"][0]["layer_unsharded"] < now["bf16"][0]["layer_unsharded"]


def test_fp8_weights_are_chosen_on_the_whole_linear_not_the_tp_shard() -> None:
    """With an MLP width of 176 each TP rank holds 88 columns of gate/up and 88 rows of
    down_proj, no multiple of 16, yet torchao converted all 7 Linears (torchtitan filters the
    whole Linears before TP) and FSDP2 gathered them in fp8: 23,296 B, which memplan gives
    only by checking the whole Linear's dims (on the shards it would count the MLP in bf16,
    40,192 B)."""
    doc = recorded()["measured"]["fp8_all_gather_i176"]
    for rank in doc:
        assert len(rank["float8_linears"]) == 7
    gathered = {rank["groups"]["layer"]["all_gather_output"] for rank in doc}
    loaded = validate(_spec("fp8_all_gather_i176"))
    terms = {t.name: t for t in estimate(loaded.spec, load_inventory(loaded)).timeline.transients}
    assert gathered == {terms["fsdp2_all_gather_output"].bytes}


def test_estimate_under_tp_gathers_the_layers_in_fp8() -> None:
    """On the estimate's timeline under dp 2 x tp 2 the decoder layer's all-gather output and
    the named cast term are the measured ones (tp rank 0), with precomputed scales too."""
    doc = recorded()["measured"]
    for case in ("fp8_all_gather", "fp8_all_gather_precompute", "fp8_all_gather_sp_off"):
        loaded = validate(_spec(case))
        report = estimate(loaded.spec, load_inventory(loaded))
        terms = {t.name: t for t in report.timeline.transients}
        rank0 = doc[case][0]["groups"]["layer"]
        assert terms["fsdp2_all_gather_output"].bytes == rank0["all_gather_output"], case
        assert terms["fsdp2_fp8_weight_cast"].bytes == rank0["pre_all_gather_peak"], case
    stored = doc["fp8_all_gather_precompute"][0]["precomputed_storage"]
    loaded = validate(_spec("fp8_all_gather_precompute"))
    notes = estimate(loaded.spec, load_inventory(loaded)).notes
    assert any("fp8_precompute_scale: " in n and f" {stored:,} B here" in n for n in notes)


def test_gloo_cannot_all_gather_fp8_activations() -> None:
    """Without the benchmark's uint8 shim, torchao's fp8 all-gather of the sequence-parallel
    activations (PrepareFloat8ModuleInput, Float8ColwiseParallel) fails in gloo: CPU runs of
    torchtitan's Float8 TP need it (NCCL has float8 types); FSDP2's weight all-gather does not."""
    run = recorded()["without_shim"]
    assert run["case"] == probe.GLOO_FP8_CASE and not run["completed"]
    assert run["error"] == "RuntimeError: Invalid scalar type"


def test_uneven_tp_shards_are_refused_naming_their_local_rows() -> None:
    """torchao's pre-all-gather hook sends each rank's unpadded shard of its TP-local weight
    (the FSDP2-only measurement, benchmarks/fsdp2_float8_all_gather.py `uneven`): over 3 data
    ranks under TP 2, q_proj's 32 TP-local rows do not split."""
    loaded = validate(_spec("fp8_all_gather", data=3))
    with pytest.raises(MemplanError, match=r"q_proj\.weight \(32 rows\) over 3 ranks"):
        estimate(loaded.spec, load_inventory(loaded))


@pytest.mark.slow
def test_rerun_fp8_all_gather_on_four_gloo_ranks() -> None:
    """The measurement itself (about a minute): the MLP-176 case on dp 2 x tp 2."""
    case = "fp8_all_gather_i176"
    ranks = probe.measure((case,))
    now = probe.predicted()[case]
    for rank in ranks:
        got = rank[case]
        layer = got["groups"]["layer"]
        ours = now[got["tp_rank"]]
        assert layer["unsharded"] == layer["all_gather_output"] == ours["layer_unsharded"]
        assert got["groups"]["root"]["unsharded"] == ours["root_unsharded"]
        assert layer["pre_all_gather_peak"] == ours["layer_cast_peak"]


def test_gpt2_conv1d_blocks_gather_as_without_fp8() -> None:
    """Independent oracle: torchao's convert_to_float8_training on transformers' GPT-2 swaps
    no module of its blocks (Conv1D is not nn.Linear), so fp8_all_gather gathers nothing in fp8
    there: the estimate equals the one without it."""
    pytest.importorskip("torchao")
    transformers = pytest.importorskip("transformers")
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    cfg = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    convert_to_float8_training(model)
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert not [n for n in converted if ".h." in f".{n}"], converted

    def peak(on: bool) -> int:
        spec = {
            "model": {"architecture": {**cfg, "n_positions": 128}},
            "precision": {
                "preset": "bf16-mixed",
                "fp8": "torchao-tensorwise",
                "fp8_all_gather": on,
            },
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 1, "sequence_length": 64},
            "parallelism": {"engine": "fsdp2", "data": 2},
            "hardware": {"device": "cpu"},
        }
        loaded = validate(spec)
        return estimate(loaded.spec, load_inventory(loaded)).peak_bytes

    assert peak(True) == peak(False)


def test_torchtitan_tensorwise_is_said_to_predate_0_3_0() -> None:
    """torchtitan 0.3.0's own Float8LinearConverter takes the rowwise recipes only (its Config's
    recipe_name Literal), so an estimate of torchtitan's code with tensorwise says so."""
    import typing

    pytest.importorskip("torchao")
    float8 = pytest.importorskip("torchtitan.components.quantization.float8")
    hints = typing.get_type_hints(float8.Float8LinearConverter.Config)
    assert "tensorwise" not in typing.get_args(hints["recipe_name"])
    spec = {
        "model": {"architecture": TINY_LLAMA, "implementation": "torchtitan"},
        "precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 1, "sequence_length": 64},
        "parallelism": {"engine": "fsdp2", "data": 2},
        "hardware": {"device": "cpu"},
    }
    loaded = validate(spec)
    notes = estimate(loaded.spec, load_inventory(loaded)).notes
    assert any("rowwise recipes only" in n for n in notes), notes
