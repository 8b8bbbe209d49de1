"""Model parallelism and offload: hand derivations and Megatron-LM's own formula."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model.load import PRESET_DIR, read_json
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.json import estimate_json
from memplan.states.layout import Layout
from memplan.states.parallel import padded_vocab, stage_inventory, stage_layers
from tests.conftest import TINY_LLAMA, make_spec


def preset(name: str):  # type: ignore[no-untyped-def]
    return from_config(read_json(Path(PRESET_DIR, f"{name}.json"), what="preset"))


LLAMA2_7B = {"h": 4096, "ffn": 11008, "layers": 32, "vocab": 32000, "kv": 32, "heads": 32}


def test_tensor_parallel_llama2_7b_by_hand():
    inv = preset("llama-2-7b")
    local = stage_inventory(inv, Layout(tensor_impl="megatron", tensor=8), 0)
    h, ffn, vocab = 4096, 11008, 32000
    attention = 4 * h * h // 8  # q, k, v, o: column (q, k, v) and row (o) parallel, each / 8
    mlp = 3 * ffn * h // 8  # gate, up (column) and down (row), each / 8
    norms = 2 * h  # RMSNorms are replicated on every TP rank
    vocab_rows = padded_vocab(vocab, 8) // 8  # 32000 -> 32768 (multiple of 128 x 8) -> 4096
    assert padded_vocab(vocab, 8) == 32768
    expected = 32 * (attention + mlp + norms) + 2 * vocab_rows * h + h  # + final norm
    assert local.num_parameters == expected == 843_321_344


def test_pipeline_stages_hold_embedding_first_and_head_last():
    inv = preset("llama-2-7b")
    mp = Layout(tensor_impl="megatron", pipeline=4)
    stages = [stage_inventory(inv, mp, s) for s in range(4)]
    layer = sum(t.numel for t in inv.parameters if t.layer == 0)
    embed = 32000 * 4096
    assert stages[0].num_parameters == 8 * layer + embed
    assert stages[1].num_parameters == stages[2].num_parameters == 8 * layer
    assert stages[3].num_parameters == 8 * layer + embed + 4096  # lm_head + final norm
    assert sum(s.num_parameters for s in stages) == inv.num_parameters


def test_tied_embeddings_are_held_twice_under_pipeline():
    tied = dict(TINY_LLAMA, tie_word_embeddings=True)
    inv = from_config(tied)
    mp = Layout(tensor_impl="megatron", pipeline=2)
    first, last = (stage_inventory(inv, mp, s) for s in range(2))
    embed = 1041 * 64
    # Megatron's last stage keeps its own copy of the shared word embedding for the output layer.
    assert first.num_parameters + last.num_parameters == inv.num_parameters + embed
    assert any(t.name == "lm_head.weight" for t in last.parameters)


def test_interleaved_stages_take_every_pth_chunk():
    held = stage_layers(32, Layout(tensor_impl="megatron", pipeline=4, virtual_stages=2))
    assert held[0] == [0, 1, 2, 3, 16, 17, 18, 19]
    assert held[3] == [12, 13, 14, 15, 28, 29, 30, 31]


def test_uneven_stages_report_the_most_loaded_one():
    spec = make_spec(
        precision="bf16-mixed",
        parallelism={"engine": "megatron", "pipeline": 2, "layers_per_stage": [1, 1]},
    )
    report = estimate(spec, from_config(TINY_LLAMA))
    doc = estimate_json(report)
    assert len(doc["per_stage"]) == 2
    states = [s["model_states"] for s in doc["per_stage"]]
    assert doc["per_gpu"]["parameters"] == doc["per_stage"][report.stage]["parameters"]
    assert states[report.stage] == max(states)


def test_expert_parallel_splits_experts():
    inv = preset("mixtral-8x7b")
    local = stage_inventory(inv, Layout(tensor_impl="megatron", expert=8), 0)
    experts = [t for t in local.parameters if t.role == "experts"]
    assert experts and all(t.shape[0] == 1 for t in experts)  # 8 experts / 8 ranks
    full = [t for t in inv.parameters if t.role == "experts"]
    assert sum(t.numel for t in experts) * 8 == sum(t.numel for t in full)


def test_expert_states_shard_over_the_expert_data_group():
    arch = {**TINY_LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    spec = make_spec(
        model={"architecture": arch},
        precision="fp32",
        parallelism={"engine": "megatron", "data": 8, "expert": 4, "zero_stage": 1},
    )
    report = estimate(spec, from_config(arch))
    expert_rows = [t for t in report.per_gpu.terms if t.name.endswith("(experts)")]
    assert expert_rows  # experts are accounted apart, over 8 / 4 = 2 expert-data ranks


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tensor", 3, r"3 does not divide num_attention_heads=4; valid tensor degrees: 1, 2\."),
        ("pipeline", 3, r"2 layers do not split evenly over pipeline 3"),
        ("expert", 2, r"expert parallelism needs a mixture-of-experts model"),
    ],
)
def test_impossible_layouts_name_the_valid_degrees(field, value, message):  # type: ignore[no-untyped-def]
    spec = make_spec(parallelism={"engine": "megatron", field: value, "data": 2})
    with pytest.raises(MemplanError, match=message):
        estimate(spec, from_config(TINY_LLAMA))


def megatron_most_loaded_shard_params(
    *, h, ffn, layers, vocab, heads, kv, tp, pp, experts=1, untied=True
):  # type: ignore[no-untyped-def]
    """Transcribed from Megatron-LM megatron/training/theoretical_memory_usage.py::
    compute_weight_and_optimizer_memory (core_r0.8, before its MoE rewrite)."""
    gated_linear_multiplier = 3 / 2  # swiglu
    transformer = (
        2
        * layers
        * h
        * h
        * (
            (1 + kv / heads)  # attention (query_projection_to_hidden_size_ratio = 1)
            + (ffn / h) * experts * gated_linear_multiplier  # MLP
            + (2 / h)  # transformer layernorms
            + (1 / (layers * h))  # final layernorm
        )
    )
    embedding = h * padded_vocab(vocab, tp)
    shard = (transformer / pp + embedding) / tp
    if untied and pp == 1:
        shard += embedding / tp
    return shard


@pytest.mark.parametrize(
    ("name", "dims", "tp", "pp", "dp"),
    [
        (
            "llama-2-7b",
            {"h": 4096, "ffn": 11008, "layers": 32, "vocab": 32000, "heads": 32, "kv": 32},
            1,
            1,
            8,
        ),
        (
            "llama-2-7b",
            {"h": 4096, "ffn": 11008, "layers": 32, "vocab": 32000, "heads": 32, "kv": 32},
            8,
            1,
            4,
        ),
        (
            "llama-2-70b",
            {"h": 8192, "ffn": 28672, "layers": 80, "vocab": 32000, "heads": 64, "kv": 8},
            8,
            4,
            4,
        ),
        (
            "mixtral-8x7b",
            {
                "h": 4096,
                "ffn": 14336,
                "layers": 32,
                "vocab": 32000,
                "heads": 32,
                "kv": 8,
                "experts": 8,
            },
            8,
            4,
            2,
        ),
    ],
)
def test_megatron_theoretical_memory_explained(name, dims, tp, pp, dp):  # type: ignore[no-untyped-def]
    spec = make_spec(
        model={"preset": name},
        precision="bf16-mixed",
        parallelism={
            "engine": "megatron",
            "zero_stage": 1,
            "data": dp,
            "tensor": tp,
            "pipeline": pp,
        },
    )
    inv = preset(name)
    report = estimate(spec, inv)
    first = report.stages[0]
    megatron = megatron_most_loaded_shard_params(tp=tp, pp=pp, **dims)
    h, layers = dims["h"], dims["layers"]
    # The differences, term by term:
    # 1. Megatron counts LayerNorm (weight + bias, 2h) and divides it by TP; Llama's RMSNorms
    #    have no bias (h each) and are replicated on every TP rank.
    megatron_norms = (2 * layers * 2 * h + 2 * h) / pp / tp
    our_norms = 2 * h * (layers // pp) + (h if pp == 1 else 0)
    # 2. Megatron's formula has no MoE router (num_experts x h per layer, replicated).
    router = dims.get("experts", 0) * h * (layers // pp)
    assert first.num_parameters == pytest.approx(
        megatron - megatron_norms + our_norms + router, abs=1
    )
    # 3. Bytes: both use 2 (bf16 params) + 4 (fp32 main_grad) + 12 / DP (distributed
    #    optimizer), i.e. Megatron's "6 + 12 / dp"; memplan adds the buffer padding and counts
    #    the optimizer's real elements on the most-loaded DP rank.
    megatron_bytes = megatron * (6 + 12 / dp)
    ours = first.per_gpu.total_bytes
    assert abs(ours - megatron_bytes) / megatron_bytes < 0.003


def test_zero3_optimizer_offload_moves_states_to_the_host():
    spec = make_spec(
        precision="bf16-mixed",
        hardware={"gpus_per_node": 4},
        parallelism={
            "engine": "deepspeed",
            "data": 4,
            "zero_stage": 3,
            "deepspeed": {"stage3_param_persistence_threshold": 0},
            "offload": {"optimizer": "cpu"},
        },
    )
    report = estimate(spec, from_config(TINY_LLAMA))
    on_gpu = {t.name for t in report.per_gpu.terms}
    on_host = {t.name for t in report.per_gpu.host_terms}
    assert on_gpu == {"parameters"}
    assert {"master_weights", "exp_avg", "exp_avg_sq", "gradients"} <= on_host
    assert estimate_json(report)["per_host"]["total"] == 4 * report.host_bytes


def test_stage2_offload_keeps_only_a_staging_buffer_on_the_gpu():
    spec = make_spec(
        parallelism={
            "engine": "deepspeed",
            "data": 2,
            "zero_stage": 2,
            "offload": {"optimizer": "cpu"},
        }
    )
    inv = from_config(TINY_LLAMA)
    report = estimate(spec, inv)
    grads = [t for t in report.per_gpu.terms if t.category == "gradients"]
    largest = max(p.numel for p in inv.parameters)
    assert [(t.name, t.elements) for t in grads] == [("gpu staging buffer", largest)]


def test_parameter_offload_needs_stage3():
    with pytest.raises(Exception, match="parameter offload needs sharded parameters"):
        make_spec(parallelism={"zero_stage": 2, "offload": {"parameters": "cpu"}})


def test_a_spec_with_only_tensor_parallelism_works():
    spec = make_spec(parallelism={"tensor": 2})
    report = estimate(spec, from_config(TINY_LLAMA))
    assert report.per_gpu.bytes_of("parameters") > 0


def test_torch_tensor_parallel_splits_the_vocabulary_without_padding():
    """Megatron pads the vocabulary to 128 x TP; torch's DTensor (engine fsdp2/ddp) shards it
    like torch.chunk: ceil(V / TP) rows on the most-loaded rank (Shard._split_tensor)."""
    from memplan.report.estimate import model_states

    inv = from_config(TINY_LLAMA)  # vocabulary 1041, untied embedding and head
    held = {}
    for engine in ("megatron", "fsdp2"):
        spec = make_spec(parallelism={"engine": engine, "tensor": 2, "data": 1})
        held[engine] = model_states(spec, inv)[0].num_parameters
    megatron_rows = padded_vocab(1041, 2) // 2  # 1041 -> 1280 -> 640
    torch_rows = -(-1041 // 2)  # 521
    assert (megatron_rows, torch_rows) == (640, 521)
    h = TINY_LLAMA["hidden_size"]
    assert held["megatron"] - held["fsdp2"] == 2 * (megatron_rows - torch_rows) * h


@pytest.mark.parametrize(("vocab", "tp"), [(1041, 2), (1041, 4), (2003, 2), (5, 4), (7, 8)])
def test_torch_tensor_parallel_rows_are_dtensor_shards(vocab: int, tp: int) -> None:
    """Each TP rank's vocabulary rows under torch's DTensor (engine fsdp2/ddp) are the sizes
    torch's own Shard(0)._split_tensor gives (torch.chunk, an empty shard for a rank past the
    last chunk); Megatron's padded split (engine megatron) gives every rank the same rows."""
    torch = pytest.importorskip("torch")
    from torch.distributed.tensor.placement_types import Shard

    from memplan.states.parallel import vocab_rows

    shards, _ = Shard(0)._split_tensor(
        torch.empty(vocab, 1), tp, with_padding=False, contiguous=False
    )
    assert vocab_rows(vocab, tp, 1, "chunk") == tuple(s.shape[0] for s in shards)
    assert len(set(vocab_rows(vocab, tp, 128, "padded"))) == 1


# Measured by `memplan verify` on 2 gloo ranks, TP 2 FSDP2, the 1,041-token tiny Llama, torch
# 2.13 (benchmarks/results/verify.json, case "FSDP2 + TP 2 (DTensor, sequence parallel)", rank
# 1; fp32 at rest): TP rank 1's own model states.
MEASURED_TP_RANK_1 = {"parameters": 439_552, "gradients": 439_552, "optimizer_states": 879_188}
MEASURED_TP_RANK_0 = {"parameters": 440_064, "gradients": 440_064, "optimizer_states": 880_212}


def _tp_spec(engine: str, vocab: int = 1041, data: int = 1) -> Any:
    return make_spec(
        model={"architecture": {**TINY_LLAMA, "vocab_size": vocab}},
        precision="fp32",
        training={"micro_batch_size": 2, "sequence_length": 16},
        hardware={"device": "cpu"},  # verify's runs: torch's `step` scalars on the device
        parallelism={
            "engine": engine,
            "zero_stage": 3 if engine == "fsdp2" else 0,
            "tensor": 2,
            "data": data,
        },
    )


def test_each_dtensor_tp_rank_has_its_own_model_states() -> None:
    """engine fsdp2, TP 2, a vocabulary TP does not divide: TP rank 1's rank class holds what
    verify measured on it, TP rank 0 (the headline rank) what it measured there."""
    report = estimate(_tp_spec("fsdp2"), from_config({**TINY_LLAMA, "vocab_size": 1041}))
    assert [r.tensor_ranks for r in report.ranks] == [(0,), (1,)]
    assert report.per_gpu.tensor_ranks == (0,)
    for tensor_rank, measured in enumerate((MEASURED_TP_RANK_0, MEASURED_TP_RANK_1)):
        states = report.states_of(0, tensor_rank)
        assert {c: states.bytes_of(c) for c in measured} == measured  # type: ignore[arg-type]
    # One log-softmax column of the 32 tokens fewer on TP rank 1 (verify measures 128 B).
    assert report.tensor_view(0).activations_bytes - report.tensor_view(1).activations_bytes == (
        32 * 4
    )
    doc = estimate_json(report)
    assert [(r["ranks"], r["tensor_ranks"]) for r in doc["ranks"]] == [([0], [0]), ([0], [1])]
    assert doc["ranks"][1]["parameters"] == MEASURED_TP_RANK_1["parameters"]


@pytest.mark.parametrize(("engine", "vocab"), [("megatron", 1041), ("fsdp2", 1040)])
def test_tp_ranks_that_hold_the_same_bytes_share_one_class(engine: str, vocab: int) -> None:
    """Megatron pads the vocabulary (every TP rank the same rows); DTensor with a vocabulary
    TP divides: one rank class for every TP rank, listed with all of them in the JSON."""
    report = estimate(_tp_spec(engine, vocab), from_config({**TINY_LLAMA, "vocab_size": vocab}))
    assert [r.tensor_ranks for r in report.ranks] == [()]
    assert report.tensor_views == ()
    assert [r["tensor_ranks"] for r in estimate_json(report)["ranks"]] == [[0, 1]]


def test_ddp_tp_rank_keeps_the_scattered_parameter_storage() -> None:
    """engine ddp, TP 2: DTensor scatters TP rank 1's 520 vocabulary rows into a 521-row buffer
    (Shard._shard_tensor), so its parameters take TP rank 0's bytes while its optimizer states
    hold its own rows; its embedding gradient is whole. Measured by
    tests/test_verify_tp.py::test_ddp_embedding_gradient_is_whole_on_every_tp_rank (every
    category to the byte): 440,064 B parameters, 572,928 B gradients (1,041 embedding rows,
    520 LM-head rows), 879,188 B optimizer states."""
    report = estimate(_tp_spec("ddp"), from_config({**TINY_LLAMA, "vocab_size": 1041}))
    states = report.states_of(0, 1)
    assert states.bytes_of("parameters") == 440_064
    assert states.bytes_of("gradients") == 572_928
    assert states.bytes_of("optimizer_states") == 879_188
    assert [t.name for t in states.terms if "scatter padding" in t.name] == [
        "model.embed_tokens.weight (scatter padding)",
        "lm_head.weight (scatter padding)",
    ]


def test_two_dimensional_mesh_lists_every_tp_and_data_rank() -> None:
    """data 2 x tensor 2: FSDP2 pads each TP rank's rows to a multiple of 2 (261 on TP rank 0,
    260 on TP rank 1), so TP rank 1's data ranks hold less than TP rank 0's."""
    report = estimate(_tp_spec("fsdp2", data=2), from_config({**TINY_LLAMA, "vocab_size": 1041}))
    first = report.states_of(0, 0).bytes_of("parameters")
    assert {r.tensor_ranks for r in report.ranks} == {(0,), (1,)}
    for dp in range(2):
        assert first - report.states_of(dp, 1).bytes_of("parameters") == 2 * 64 * 4


def test_ranks_table_names_the_tp_ranks_that_differ() -> None:
    """`estimate --ranks`: a TP ranks column only when TP ranks differ."""
    from rich.console import Console

    from memplan.cli.estimate_view import ranks_table

    def table(vocab: int) -> str:
        report = estimate(
            _tp_spec("fsdp2", vocab), from_config({**TINY_LLAMA, "vocab_size": vocab})
        )
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(ranks_table(report))
        return console.export_text()

    uneven = table(1041)
    assert "TP ranks" in uneven and "429.75 KiB" in uneven and "429.25 KiB" in uneven
    assert "TP ranks" not in table(1040)


def test_a_tp_rank_without_vocabulary_rows_is_refused() -> None:
    """torch.chunk of 10 rows into 8 makes 5 chunks of 2 (test_torch_tensor_parallel_rows_are_
    dtensor_shards: DTensor gives ranks 5-7 empty shards): refused naming the field."""
    arch = {**TINY_LLAMA, "vocab_size": 10, "num_attention_heads": 8, "num_key_value_heads": 8}
    spec = make_spec(model={"architecture": arch}, parallelism={"engine": "fsdp2", "tensor": 8})
    with pytest.raises(MemplanError, match=r"2, 2, 2, 2, 2, 0, 0, 0 rows") as err:
        estimate(spec, from_config(arch))
    assert err.value.field == "parallelism.tensor"
