"""Activations under tensor, sequence, context, pipeline and expert parallelism.

Expected values come from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", sec. 4.2: which tensors TP splits and which it leaves replicated), from
Megatron-LM's pipeline schedules (schedules.py) and its theoretical memory report
(theoretical_memory_usage.py), each derived in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan import activations as acts
from memplan.activations import pipeline
from memplan.errors import MemplanError
from memplan.model.sources import Inventory, from_config
from memplan.report.estimate import estimate
from memplan.report.json import estimate_json
from memplan.states.parallel import padded_vocab
from tests.conftest import DATA, TINY_LLAMA, make_spec, micro_batch_of, on_rank_of

GPT2 = json.loads((DATA / "hf-configs" / "gpt2.json").read_text())
MIXTRAL = json.loads((DATA / "hf-configs" / "Mixtral-8x7B-v0.1.json").read_text())


def micro(model: dict[str, Any], **over: Any) -> acts.Activations:
    spec = make_spec(model={"architecture": model}, **over)
    return micro_batch_of(spec, from_config(model))


def layer_bytes(a: acts.Activations) -> int:
    block = a.block("layers")
    assert block is not None
    return block.bytes_each


def gpt2_setting(**parallelism: Any) -> dict[str, Any]:
    return {
        "precision": "bf16",
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 64,
            "attention": "eager",
            "dropout": True,
        },
        "hardware": {"device": "cuda"},
        "parallelism": {"engine": "megatron", **parallelism},
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_splits_all_but_korthikantis_10_sbh(tp: int) -> None:
    """Korthikanti sec. 4.2.1: per layer, TP leaves 10 sbh bytes replicated (two LayerNorm
    inputs 4 sbh, the inputs of the QKV and first MLP linears 4 sbh, two dropout masks 2 sbh)
    and splits the rest over t. memplan's GPT-2 layer also replicates the two LayerNorms'
    fp32 mean and rstd (4 x 4 sb), which the paper leaves out."""
    s, b, h = 64, 2, GPT2["n_embd"]
    replicated = 10 * s * b * h + 16 * s * b
    one = layer_bytes(micro(GPT2, **gpt2_setting()))
    split = layer_bytes(micro(GPT2, **gpt2_setting(tensor=tp)))
    assert split == replicated + (one - replicated) // tp
    assert (one - replicated) % tp == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_splits_every_layer_tensor(tp: int) -> None:
    """Korthikanti sec. 4.2.2 (eq. 4): with sequence parallelism a layer's activations are the
    single-GPU ones / t."""
    one = layer_bytes(micro(GPT2, **gpt2_setting()))
    sp = micro(GPT2, **gpt2_setting(tensor=tp, sequence_parallel=True))
    assert layer_bytes(sp) * tp == one
    assert [t.name for t in sp.buffers] == ["sequence_parallel_all_gather"]


def test_vocab_parallel_loss_and_replicated_indices() -> None:
    tp, s, b = 4, 64, 2
    a = micro(GPT2, **gpt2_setting(tensor=tp, sequence_parallel=True))
    loss = a.block("loss")
    assert loss is not None
    vocab = padded_vocab(GPT2["vocab_size"], tp) // tp  # 50257 -> 50688 -> 12672
    assert vocab == 12672
    log_softmax = next(t for t in loss.tensors if t.name == "log_softmax")
    assert log_softmax.shape == (s * b, vocab)
    assert a.logits_bytes == s * b * vocab * 2
    embeddings = a.block("embeddings")
    assert embeddings is not None
    indices = next(t for t in embeddings.tensors if t.name == "wte.indices")
    assert indices.shape == (b, s)  # the embedding runs on the whole sequence
    mask = next(t for t in embeddings.tensors if t.name == "drop.mask")
    assert mask.shape == (b, s // tp, GPT2["n_embd"])  # scattered before dropout


def test_sequence_parallel_needs_the_sequence_to_divide() -> None:
    spec = make_spec(
        training={"sequence_length": 31},
        parallelism={"engine": "megatron", "tensor": 2, "sequence_parallel": True},
    )
    with pytest.raises(MemplanError) as err:
        estimate(spec, from_config(TINY_LLAMA))
    assert err.value.field == "parallelism.sequence_parallel"


def test_context_parallel_is_the_sequence_split() -> None:
    """Each CP rank runs sequence / CP tokens (ring attention saves the local q, one k/v chunk,
    the output and the softmax statistics: the SDPA rule at sequence / CP)."""
    over = {"training": {"sequence_length": 64, "attention": "sdpa"}}
    cp = micro(TINY_LLAMA, parallelism={"context": 4}, **over)
    short = micro(TINY_LLAMA, training={"sequence_length": 16, "attention": "sdpa"})
    assert cp.bytes == short.bytes and cp.modelled
    names = [t.name for t in cp.buffers]
    assert names == ["context_parallel_kv_forward", "context_parallel_kv_backward"]
    chunk = 2 * 16 * TINY_LLAMA["num_key_value_heads"] * 16 * 2  # k and v, 16 tokens, bf16
    assert cp.buffers[0].bytes == 3 * chunk
    eager = micro(TINY_LLAMA, parallelism={"context": 4}, training={"attention": "eager"})
    assert not eager.modelled


def test_context_parallel_needs_the_sequence_to_divide() -> None:
    spec = make_spec(training={"sequence_length": 30}, parallelism={"context": 4})
    with pytest.raises(MemplanError) as err:
        estimate(spec, from_config(TINY_LLAMA))
    assert err.value.field == "parallelism.context"


def test_megatron_schedule_table() -> None:
    """model_parallel_config.py's docstring: PP=2 VP=2, group 2, 4 micro-batches:
    rank 0 runs 0 1 0 1 2 3 2 3."""
    table = list(pipeline._schedule_table(4, 2, 2))
    assert [mb for mb, _ in table] == [0, 1, 0, 1, 2, 3, 2, 3]
    assert [c for _, c in table] == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("p", [2, 4, 8])
def test_in_flight_micro_batches(p: int) -> None:
    m = 64
    got = [pipeline.in_flight("1f1b", p, 1, r, m) for r in range(p)]
    assert got == [(p - r,) for r in range(p)]
    assert pipeline.in_flight("1f1b", p, 1, 0, 2) == (min(p, 2),)
    assert pipeline.in_flight("gpipe", p, 1, p - 1, m) == (m,)
    for v in (2, 4):
        alive = pipeline.in_flight("interleaved", p, v, 0, m)
        # Megatron's interleaved penalty on the first stage: L (1 + (P - 1) / (P v))
        # layer-micro-batches for L / (P v) layers per chunk.
        layers = p * v  # one layer per chunk
        assert sum(alive) * p * v == layers * (p * v + p - 1)
        assert alive[-1] >= 1


def pipeline_spec(**over: Any) -> dict[str, Any]:
    model = dict(TINY_LLAMA, num_hidden_layers=8)
    par = {"engine": "megatron", "pipeline": 4, **over.pop("parallelism", {})}
    training = {"gradient_accumulation_steps": 16, **over.pop("training", {})}
    return {"model": {"architecture": model}, "parallelism": par, "training": training, **over}


def pipeline_report(**over: Any) -> Any:
    spec = make_spec(**pipeline_spec(**over))
    return estimate(spec, from_config(spec.model.architecture or {}))


def test_pipeline_stages_hold_their_layers_and_micro_batches() -> None:
    r = pipeline_report()
    per_layer = layer_bytes(micro(dict(TINY_LLAMA, num_hidden_layers=8)))
    for rank, (activations, _) in enumerate(r.stage_peaks):  # type: ignore[misc]
        saved = on_rank_of(
            make_spec(**pipeline_spec()),
            from_config(dict(TINY_LLAMA, num_hidden_layers=8)),
            micro(dict(TINY_LLAMA, num_hidden_layers=8)),
            rank,
        )
        assert saved.bytes == activations
        blocks = {b.name: b for b in saved.blocks}
        in_flight = blocks.get("in_flight.layers")
        layers = blocks["layers"].count + (in_flight.count if in_flight else 0)
        assert layers == 2 * (4 - rank)  # 1F1B: P - rank micro-batches of 2 layers
        assert ("embeddings" in blocks) == (rank == 0)
        assert ("loss" in blocks) == (rank == 3) and ("head" in blocks) == (rank == 3)
        assert saved.bytes >= layers * per_layer
    assert r.stage == 0  # the most micro-batches in flight and the embedding
    doc = estimate_json(r)
    assert [s["peak"] for s in doc["per_stage"]] == [p for _, p in r.stage_peaks]  # type: ignore[misc]
    assert doc["per_gpu"]["peak"] == max(s["peak"] for s in doc["per_stage"])


def test_megatron_first_stage_holds_num_layers_layer_micro_batches() -> None:
    """theoretical_memory_usage.py::compute_activation_memory: the first stage holds
    `num_layers` layers' activations (L / P layers x P micro-batches), x the interleaved
    penalty 1 + (P - 1) / (P v), and only m / P of it when m < P."""
    model = dict(TINY_LLAMA, num_hidden_layers=16)
    inv = from_config(model)
    for par, m, expected in (
        ({"pipeline": 4}, 16, 16),
        ({"pipeline": 4}, 2, 16 * 2 // 4),
        ({"pipeline": 4, "schedule": "interleaved", "virtual_stages": 2}, 16, 16 * (1 + 3 / 8)),
        ({"pipeline": 2, "schedule": "interleaved", "virtual_stages": 4}, 16, 16 * (1 + 1 / 8)),
    ):
        spec = make_spec(
            model={"architecture": model},
            parallelism={"engine": "megatron", **par},
            training={"gradient_accumulation_steps": m},
        )
        saved = on_rank_of(spec, inv, micro_batch_of(spec, inv), 0)
        count = sum(b.count for b in saved.blocks if b.name.endswith("layers"))
        assert count == expected


def test_uneven_stages_move_the_most_loaded_one() -> None:
    """A last stage with most of the layers, one micro-batch in flight, out-weighs the first."""
    r = pipeline_report(
        parallelism={"pipeline": 2, "layers_per_stage": [1, 7]},
        training={"gradient_accumulation_steps": 2, "sequence_length": 128},
    )
    peaks = [p for _, p in r.stage_peaks]  # type: ignore[misc]
    assert r.stage == peaks.index(max(peaks)) == 1
    assert r.peak_bytes == max(peaks)


def test_plan_skips_only_dominated_interior_stages() -> None:
    from memplan.report.estimate import assemble, model_states

    spec = make_spec(**pipeline_spec(parallelism={"pipeline": 8}))
    inv = from_config(spec.model.architecture or {})
    states = model_states(spec, inv)
    full = assemble(spec, inv, inv, states)
    fast = assemble(spec, inv, inv, states, every_stage=False)
    assert fast.peak_bytes == full.peak_bytes and fast.stage == full.stage
    assert sum(p is None for p in fast.stage_peaks) > 0


def mixtral_micro(**parallelism: Any) -> acts.Activations:
    small = dict(MIXTRAL, num_hidden_layers=2, hidden_size=256, intermediate_size=512)
    small.update(num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)
    return micro(
        small,
        training={"sequence_length": 64, "attention": "sdpa"},
        parallelism={"engine": "megatron", **parallelism},
    )


def expert_tensor(a: acts.Activations, name: str) -> Any:
    block = a.block("layers")
    assert block is not None
    return next(t for t in block.tensors if t.name == name)


def test_experts_see_gathered_tokens_and_capacity() -> None:
    tokens, k = 64, MIXTRAL["num_experts_per_tok"]
    one = mixtral_micro()
    assert expert_tensor(one, "mlp.experts.input").shape[0] == tokens * k
    # TP + SP: the router runs on the sequence-parallel tokens, the experts on all of them
    # (token_dispatcher.py gathers over TP), each expert's intermediate split over TP.
    tp = mixtral_micro(tensor=2, sequence_parallel=True, expert=2, data=2)
    assert expert_tensor(tp, "mlp.router.softmax").shape == (tokens // 2, 8)
    assert expert_tensor(tp, "mlp.experts.input").shape == (tokens * k, 256)
    assert expert_tensor(tp, "mlp.experts.act_output").shape == (tokens * k, 512 // 2)
    assert expert_tensor(tp, "mlp.experts.offsets").shape == (4,)
    assert "moe_token_dispatch" in [t.name for t in tp.buffers]
    # capacity factor 1.5: ceil(32 tokens x 2 / 8 experts x 1.5) = 12 per expert, from each of
    # the TP x EP = 4 ranks, for the 4 local experts.
    capped = mixtral_micro(
        tensor=2, sequence_parallel=True, expert=2, data=2, expert_capacity_factor=1.5
    )
    assert expert_tensor(capped, "mlp.experts.input").shape[0] == 4 * 12 * 4


def test_every_shipped_large_layout_is_modelled() -> None:
    """The layouts a 70B run uses (TP8 SP PP4 and CP2) have activations and a stage table."""
    path = Path(__file__).parent.parent / "configs" / "llama-2-70b.yaml"
    from memplan.config.load import load_spec
    from memplan.model.load import load_inventory

    loaded = load_spec(path)
    inv: Inventory = load_inventory(loaded)
    par = loaded.spec.parallelism.model_copy(
        update={
            "engine": "megatron",
            "zero_stage": 1,
            "tensor": 8,
            "sequence_parallel": True,
            "pipeline": 4,
            "context": 2,
            "data": 1,
        }
    )
    training = loaded.spec.training.model_copy(
        update={"attention": "sdpa", "gradient_accumulation_steps": 8}
    )
    spec = loaded.spec.model_copy(update={"parallelism": par, "training": training})
    r = estimate(spec, inv)
    assert r.activations.modelled and r.activations_bytes > 0
    assert len(r.stage_peaks) == 4 and r.stage == 0
