"""The benchmark scripts import and run (CI has no peer tools installed).

benchmarks/accuracy.py runs its smallest case on memplan alone and prints the JSON document
whose shape the README and issue 9 promise; the peers' refusals (what each tool cannot
express) and the Megatron transcription are checked without their packages. The real grid
and the speed run are not part of the suite: they need the benchmark environment
(benchmarks/requirements.txt) and minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from memplan.states.parallel import padded_vocab
from tests.conftest import ROOT, TINY_LLAMA
from tests.test_parallel import megatron_most_loaded_shard_params

BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
from peers import (  # noqa: E402
    NotExpressible,
    Setting,
    accelerate_sizes,
    deepspeed_zero,
    llm_analysis_train,
    megatron,
)


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "accuracy.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def test_accuracy_smallest_case_json_shape() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    smallest = accuracy.CASES[0]
    assert smallest.ranks == 1 and smallest.model.startswith("tiny")
    proc = _run("--only", smallest.name, "--no-peers", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["tools"]) == {"memplan"}
    ours = doc["tools"]["memplan"]
    assert set(ours) >= {"median_abs_error", "max_abs_error", "cases"}
    assert ours["cases"] == 1
    assert isinstance(ours["median_abs_error"], float)
    assert ours["model_states"] == {"median_abs_error": 0.0, "max_abs_error": 0.0, "cases": 1}
    assert ours["activations"]["cases"] == 1
    [row] = doc["cases"]
    assert row["case"] == smallest.name
    assert row["model_states_exact"] is True
    assert row["measured"]["model_states"] == row["tools"]["memplan"]["model_states"]
    assert row["measured"]["peak"] > row["measured"]["model_states"]
    assert doc["environment"]["grid"] == "only"


def test_accuracy_lists_unique_cases_and_a_small_quick_grid() -> None:
    proc = _run("--list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert len(names) == len(set(names)) == len(accuracy.CASES)
    quick = [c for c in accuracy.CASES if c.quick]
    assert len(quick) == 6 and all(c.model.startswith("tiny") for c in quick)
    assert {c.engine for c in quick} == {"ddp", "fsdp2"} and {c.ranks for c in quick} >= {1, 2, 4}


def test_unknown_case_is_a_usage_error() -> None:
    proc = _run("--only", "no-such-case", timeout=60)
    assert proc.returncode == 2
    assert "--list shows the names" in proc.stderr


def _setting(**overrides: Any) -> Setting:
    base: dict[str, Any] = {
        "name": "t",
        "config": dict(TINY_LLAMA),
        "precision": "bf16-mixed",
        "optimizer": "adamw",
        "engine": "ddp",
        "stage": 0,
        "ranks": 1,
        "micro_batch_size": 1,
        "sequence_length": 16,
    }
    return Setting(**{**base, **overrides})


@pytest.mark.parametrize(
    ("peer", "overrides", "reason"),
    [
        (deepspeed_zero, {"precision": "fp32"}, "assumes 16-bit mixed precision"),
        (deepspeed_zero, {"optimizer": "sgd"}, "assumes Adam"),
        (deepspeed_zero, {"stage": 1, "ranks": 2}, "no ZeRO-1 estimator"),
        (accelerate_sizes, {"precision": "bf16"}, "no pure 16-bit row"),
        (accelerate_sizes, {"engine": "fsdp2", "stage": 3, "ranks": 2}, "no sharding"),
        (accelerate_sizes, {"optimizer": "sgd"}, "Adam only"),
        (llm_analysis_train, {"precision": "fp32"}, "fp32 master copy"),
        (megatron, {"engine": "fsdp2", "stage": 3, "ranks": 2}, "no FSDP"),
        (megatron, {"precision": "bf16"}, "16-bit mixed precision"),
        # The step settings and MoE (issues 15/16): what each formula has no input for.
        (megatron, {"config": dict(accuracy.TINY_MIXTRAL)}, "MoE branch not transcribed"),
        (megatron, {"checkpointing": "full"}, "no full-recomputation term"),
        (megatron, {"attention": "eager"}, "leaves out the attention scores"),
        (llm_analysis_train, {"config": dict(accuracy.TINY_QWEN2_MOE)}, "no shared expert"),
    ],
)
def test_peers_say_what_they_cannot_express(
    peer: Any, overrides: dict[str, Any], reason: str
) -> None:
    answer = peer.predict(_setting(**overrides))
    assert isinstance(answer, NotExpressible)
    assert reason in answer.reason


@pytest.mark.parametrize(("tp", "dp", "distributed"), [(1, 1, False), (1, 8, True), (8, 4, True)])
def test_megatron_transcription_agrees_with_the_test_suites(
    tp: int, dp: int, distributed: bool
) -> None:
    """The current formula with LayerNorm (norm size 2) and SwiGLU is the core_r0.8 one that
    tests/test_parallel.py transcribes."""
    dims = {"h": 4096, "ffn": 11008, "layers": 32, "vocab": 32000, "heads": 32, "kv": 8}
    args = megatron.Args(
        hidden_size=dims["h"],
        ffn_hidden_size=dims["ffn"],
        num_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_query_groups=dims["kv"],
        kv_channels=dims["h"] // dims["heads"],
        padded_vocab_size=megatron.vocab_size_with_padding(dims["vocab"], divisible_by=128, tp=tp),
        swiglu=True,
        normalization="LayerNorm",
        untie_embeddings_and_output_weights=True,
        use_distributed_optimizer=distributed,
        data_parallel_size=dp,
        tensor_model_parallel_size=tp,
    )
    assert args.padded_vocab_size == padded_vocab(dims["vocab"], tp)
    shard = megatron_most_loaded_shard_params(tp=tp, pp=1, **dims)
    per_param = 6 + 12 / dp if distributed else 18
    assert megatron.compute_weight_and_optimizer_memory(args) == pytest.approx(shard * per_param)


def test_markdown_marks_missing_and_inexpressible_cells() -> None:
    row = {
        "case": "c",
        "measured": {"model_states": 2**20, "peak": 2**21, "activations": 0},
        "tools": {
            "memplan": {
                "model_states": 2**20,
                "total": 2**21,
                "error_model_states": 0.0,
                "error_total": 0.0,
            },
            "deepspeed": {"na": "no ZeRO-1 estimator"},
        },
    }
    doc = {
        "tools": accuracy.summarize([row], ["memplan", "deepspeed", "accelerate"]),
        "cases": [row],
    }
    text = accuracy.markdown(doc)
    assert "n/a: no ZeRO-1 estimator" in text
    assert "not installed" in text
    assert "0 (exact)" in text
    assert doc["tools"]["deepspeed"]["cases"] == 0


def test_speed_script_imports() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "speed.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accelerate estimate-memory" in proc.stdout


def test_grid_covers_moe_and_the_step_settings() -> None:
    """Issue 16's proof: the accuracy grid has MoE models, full and selective recomputation,
    eager attention and dropout, and each setting reaches the spec verify measures."""
    cases = accuracy.CASES
    assert {"tiny-mixtral", "tiny-qwen2-moe"} <= {c.model for c in cases}
    assert {"none", "full", "selective"} == {c.checkpointing for c in cases}
    assert {"sdpa", "eager"} == {c.attention for c in cases}
    assert any(c.dropout for c in cases)
    [case] = [
        c for c in cases if c.name == "tiny-llama-bf16-mixed-adamw-fsdp2-z3-x2-b2s32-full-dropout"
    ]
    training = accuracy.spec_dict(case)["training"]
    assert training["activation_checkpointing"] == "full" and training["dropout"] is True
    assert accuracy.setting(case).checkpointing == "full"


def test_verify_table_covers_moe_the_step_settings_and_tp_peaks() -> None:
    import verify_table

    specs = [doc for _name, doc, _options, _ranks in verify_table.CASES]
    training = [doc["training"] for doc in specs]
    assert any(t.get("activation_checkpointing") == "full" for t in training)
    assert any(t.get("activation_checkpointing") == "selective" for t in training)
    assert any(t.get("attention") == "eager" and t.get("dropout") for t in training)
    assert any(doc["model"].get("architecture", {}).get("model_type") == "mixtral" for doc in specs)
    tp = {doc["parallelism"]["engine"] for doc in specs if doc["parallelism"].get("tensor", 1) > 1}
    assert tp == {"ddp", "fsdp2"}
