"""Expert parallelism over a traced profile (memplan.activations.traced: EP_OVER_PROFILE).

The claim the layout rests on, proved on real tensors: transformers' grouped_mm experts save the
same bytes whatever the routing (all tokens sent to the same top_k experts, or spread by a random
router), so on balanced dropless routing an EP rank, whose experts receive top_k x tokens
(token, expert) pairs, saves what the traced single-rank forward saved. Then the estimate: an
EP-only layout keeps the profile's bytes and adds the token dispatch buffer; a capacity factor,
or tensor parallelism, is refused with the reason."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.activations import micro_batch  # noqa: E402
from memplan.config.finetune import FinetuneSpec  # noqa: E402
from memplan.config.parallelism import ParallelismSpec  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.states.layout import Layout  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace.meta import inventory_from_config  # noqa: E402
from tests.activation_probe import build_model, measure  # noqa: E402

OLMOE: dict[str, Any] = {
    "model_type": "olmoe",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}


def _skewed(model: Any) -> None:
    """Every token routed to the same two experts: the router's weight zero, so its logits tie
    and top-k takes the same two for every token (checked on the router's output)."""
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            with torch.no_grad():
                module.weight.zero_()
                _, _, chosen = module(torch.randn(5, OLMOE["hidden_size"], dtype=torch.bfloat16))
            assert len(set(chosen.flatten().tolist())) == 2


def test_grouped_mm_experts_save_the_same_bytes_whatever_the_routing() -> None:
    spread = build_model(OLMOE, dtype="bf16")
    skewed = build_model(OLMOE, dtype="bf16")
    _skewed(skewed)
    assert spread.config._experts_implementation == "grouped_mm"
    a, _ = measure(spread, batch=3, sequence=40)
    b, _ = measure(skewed, batch=3, sequence=40)
    assert a.bytes == b.bytes


def _setting(batch: int = 2, seq: int = 64) -> Setting:
    return Setting(
        batch=batch,
        sequence=seq,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cpu",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
        offload=False,
        transformers="5.25",
    )


def test_expert_parallel_layout_keeps_the_profile_and_adds_the_dispatch() -> None:
    doc = tracer.build(OLMOE, stream="bf16", matmul="bf16", autocast=False, attention="sdpa")
    traced = profile.from_document(doc, origin="test")
    assert traced.experts == "grouped_mm"
    inv = dataclasses.replace(inventory_from_config(OLMOE, origin="test"), profiles=(traced,))
    st, ft = _setting(), FinetuneSpec()
    one = micro_batch(inv, st, Layout.of(ParallelismSpec(data=2)), ft)
    ep = micro_batch(inv, st, Layout.of(ParallelismSpec(data=2, expert=2)), ft)
    assert ep.modelled and one.modelled
    assert ep.bytes == one.bytes  # the saved tensors, per rank, as traced
    dispatch = [b for b in ep.buffers if b.name == "moe_token_dispatch"]
    assert dispatch and dispatch[0].bytes == 2 * (2 * 2 * 64) * 64 * 2  # 2 x [pairs, H] bf16
    capped = Layout.of(ParallelismSpec(data=2, expert=2, expert_capacity_factor=1.25))
    assert not micro_batch(inv, st, capped, ft).modelled
    assert not micro_batch(inv, st, Layout.of(ParallelismSpec(tensor=2)), ft).modelled
