"""Model parallelism and offload: hand derivations and Megatron-LM's own formula."""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.errors import MemplanError
from memplan.estimate import estimate, to_json
from memplan.load import PRESET_DIR, read_json
from memplan.models import from_config
from memplan.parallel import ModelParallel, padded_vocab, stage_inventory, stage_layers
from tests.conftest import TINY_LLAMA, make_spec


def preset(name: str):  # type: ignore[no-untyped-def]
    return from_config(read_json(Path(PRESET_DIR, f"{name}.json"), what="preset"))


LLAMA2_7B = {"h": 4096, "ffn": 11008, "layers": 32, "vocab": 32000, "kv": 32, "heads": 32}


def test_tensor_parallel_llama2_7b_by_hand():
    inv = preset("llama-2-7b")
    local = stage_inventory(inv, ModelParallel(tensor=8), 0)
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
    mp = ModelParallel(pipeline=4)
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
    mp = ModelParallel(pipeline=2)
    first, last = (stage_inventory(inv, mp, s) for s in range(2))
    embed = 1041 * 64
    # Megatron's last stage keeps its own copy of the shared word embedding for the output layer.
    assert first.num_parameters + last.num_parameters == inv.num_parameters + embed
    assert any(t.name == "lm_head.weight" for t in last.parameters)


def test_interleaved_stages_take_every_pth_chunk():
    held = stage_layers(32, ModelParallel(pipeline=4, virtual_stages=2))
    assert held[0] == [0, 1, 2, 3, 16, 17, 18, 19]
    assert held[3] == [12, 13, 14, 15, 28, 29, 30, 31]


def test_uneven_stages_report_the_most_loaded_one():
    spec = make_spec(
        precision="bf16-mixed",
        parallelism={"engine": "megatron", "pipeline": 2, "layers_per_stage": [1, 1]},
    )
    report = estimate(spec, from_config(TINY_LLAMA))
    doc = to_json(report)
    assert len(doc["per_stage"]) == 2
    states = [s["model_states"] for s in doc["per_stage"]]
    assert doc["per_gpu"]["parameters"] == doc["per_stage"][report.stage]["parameters"]
    assert states[report.stage] == max(states)


def test_expert_parallel_splits_experts():
    inv = preset("mixtral-8x7b")
    local = stage_inventory(inv, ModelParallel(expert=8), 0)
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
    assert to_json(report)["per_host"]["total"] == 4 * report.host_bytes


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
    from memplan.estimate import model_states

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
