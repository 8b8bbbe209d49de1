"""Traced activation profiles under tensor parallelism (issues 19/21): the profile of one TP
rank's slice (memplan.verify.trace.tp.local_config), read by memplan.activations._micro_batch
as the hand rules read their TP-local prediction.

Oracle: a family WITH a hand rule (the tiny Llama) whose TP prediction equals real 2-rank
DTensor runs to the byte (tests/test_tp_activations_real.py, tests/test_tp_sp_activations_real.
py): the same inventory with its rule hidden (a model_type no family knows) takes the traced
path, and its per-rank activations must equal the rule's, block by block, with and without
sequence parallelism, under DTensor (fsdp2: torch.chunk's vocabulary rows, loss_parallel on
and off) and Megatron (padded rows). The trace itself is transformers' model code under
FakeTensorMode, not memplan's rule: an independent oracle for the profile path.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.activations import layout as act_layout  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.report.estimate import layout_of, setting_of  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import tp  # noqa: E402
from tests.conftest import TINY_LLAMA, make_spec, micro_batch_of  # noqa: E402

CONFIG = {**TINY_LLAMA, "attention_dropout": 0.0, "max_position_embeddings": 1024}


def _spec(**parallelism: Any) -> Any:
    return make_spec(
        model={"architecture": CONFIG},
        precision="bf16",
        training={"micro_batch_size": 2, "sequence_length": 32, "attention": "sdpa"},
        parallelism={"data": 1, **parallelism},
    )


def _by_block(acts: Any) -> dict[str, int]:
    return {b.name: b.bytes for b in acts.blocks}


_CACHE: dict[tuple[int, int], profile.Profile] = {}


def _profile(spec: Any, tensor: int, rows: int) -> profile.Profile:
    if (tensor, rows) not in _CACHE:
        doc = tracer.for_setting(CONFIG, spec, tensor=tensor, vocab_rows=rows)
        _CACHE[tensor, rows] = profile.from_document(json.loads(json.dumps(doc)), origin="t")
    return _CACHE[tensor, rows]


LAYOUTS = [
    pytest.param({"tensor": 2, "engine": "fsdp2"}, id="dtensor-loss-parallel"),
    pytest.param({"tensor": 2, "engine": "fsdp2", "loss_parallel": False}, id="dtensor-whole"),
    pytest.param({"tensor": 2, "engine": "fsdp2", "sequence_parallel": True}, id="dtensor-sp"),
    pytest.param({"tensor": 2, "engine": "megatron"}, id="megatron"),
    pytest.param({"tensor": 2, "engine": "megatron", "sequence_parallel": True}, id="megatron-sp"),
]


@pytest.mark.parametrize("parallelism", LAYOUTS)
def test_traced_tp_slice_equals_the_hand_rule(parallelism: dict[str, Any]) -> None:
    """The profile path's TP rank (the TP-local trace, with SP split from the TP-1 trace)
    saves what the hand rule's TP rank saves, block by block, with the same buffers."""
    spec = _spec(**parallelism)
    inv = from_config(CONFIG)
    assert inv.architecture is not None
    rule = micro_batch_of(spec, inv)
    assert rule.modelled and rule.source != "profile"
    lay = layout_of(spec)
    rows = act_layout.local_architecture(inv.architecture, lay).vocab_size
    hidden = dataclasses.replace(inv.architecture, model_type="llama_without_rule")
    unruled = dataclasses.replace(
        inv, architecture=hidden, profiles=(_profile(spec, 1, 0), _profile(spec, 2, rows))
    )
    traced = micro_batch_of(spec, unruled)
    assert traced.modelled and traced.source == "profile", traced.notes
    assert _by_block(traced) == _by_block(rule)
    assert (traced.logits_bytes, traced.upcast_bytes, traced.hidden_bytes) == (
        rule.logits_bytes,
        rule.upcast_bytes,
        rule.hidden_bytes,
    )
    assert traced.buffers == rule.buffers


def test_tp_profile_is_keyed_apart_and_required() -> None:
    """A TP profile never serves a TP-1 setting (and the reverse), keeps the TP-1 stem apart,
    and without it a TP layout over a rule-less model is refused, naming what is missing."""
    spec = _spec(tensor=2, engine="fsdp2")
    st = setting_of(spec)
    one, two = _profile(spec, 1, 0), _profile(spec, 2, 521)
    assert profile.serving((two,), st) is None
    assert profile.serving((one,), st, tensor=2, vocab_rows=521) is None
    assert profile.serving((two,), st, tensor=2, vocab_rows=521) is two
    assert two.key.file_stem() == one.key.file_stem() + "-tp2-vocab521"
    inv = from_config(CONFIG)
    assert inv.architecture is not None
    hidden = dataclasses.replace(inv.architecture, model_type="llama_without_rule")
    refused = micro_batch_of(spec, dataclasses.replace(inv, architecture=hidden, profiles=(one,)))
    assert not refused.modelled and "one TP rank's slice (tensor 2, 521" in refused.notes[0]


def test_a_model_deriving_head_dim_from_the_heads_is_refused() -> None:
    """Slicing the heads of a model whose head width is hidden // heads would trace wider
    heads: refused, naming why (GPT-2's config has no head_dim)."""
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 512}
    with pytest.raises(MemplanError, match="num_attention_heads"):
        tp.local_config(gpt2, 2, 256)
    with pytest.raises(MemplanError, match="not divisible by tensor 3"):
        tp.local_config(CONFIG, 3, 347)


MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 48,
    "intermediate_size": 128,  # / TP: a 16-byte row stride, as grouped_mm's meta kernel asks
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 1024,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": None,
    "attention_dropout": 0.0,
}
QWEN2_MOE = {
    **{k: v for k, v in MIXTRAL.items() if k not in ("num_local_experts", "sliding_window")},
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 56,
    "num_experts": 4,
}
MOE_CASES = [
    pytest.param(MIXTRAL, {"engine": "megatron", "sequence_parallel": True}, id="mixtral-mg-sp"),
    pytest.param(QWEN2_MOE, {"engine": "fsdp2"}, id="qwen2_moe-dtensor"),
    pytest.param(QWEN2_MOE, {"engine": "megatron", "sequence_parallel": True}, id="qwen2_moe-sp"),
]


@pytest.mark.parametrize(("config", "parallelism"), MOE_CASES)
def test_traced_moe_tp_slice_equals_the_hand_rule(
    config: dict[str, Any], parallelism: dict[str, Any]
) -> None:
    """MoE layers (grouped_mm experts at moe/intermediate / TP, a shared expert) on one TP rank:
    the profile path equals the Mixtral and Qwen2-MoE rules, and their dispatch buffers."""
    spec = make_spec(
        model={"architecture": config},
        precision="bf16",
        training={"micro_batch_size": 2, "sequence_length": 32, "attention": "sdpa"},
        parallelism={"data": 1, "tensor": 2, **parallelism},
    )
    inv = from_config(config)
    assert inv.architecture is not None
    rule = micro_batch_of(spec, inv)
    rows = act_layout.local_architecture(inv.architecture, layout_of(spec)).vocab_size
    docs = [
        tracer.for_setting(config, spec, tensor=t, vocab_rows=r) for t, r in ((1, 0), (2, rows))
    ]
    hidden = dataclasses.replace(inv.architecture, model_type="moe_without_rule")
    unruled = dataclasses.replace(
        inv,
        architecture=hidden,
        profiles=tuple(profile.from_document(d, origin="t") for d in docs),
    )
    traced = micro_batch_of(spec, unruled)
    assert rule.modelled and traced.modelled and traced.source == "profile", traced.notes
    assert _by_block(traced) == _by_block(rule)
    assert traced.buffers == rule.buffers and traced.hidden_bytes == rule.hidden_bytes
    if parallelism["engine"] == "fsdp2":
        sp = layout_of(
            spec.model_copy(
                update={
                    "parallelism": spec.parallelism.model_copy(update={"sequence_parallel": True})
                }
            )
        )
        from memplan.activations import micro_batch

        refused = micro_batch(unruled, setting_of(spec), sp, spec.finetune)
        assert not refused.modelled and "DTensor sequence parallelism" in refused.notes[0]
