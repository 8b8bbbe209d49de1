"""Traced activation profiles under tensor parallelism (issues 19/21): the profile of one TP
rank's slice (memplan.verify.trace.tp.local_config), read by memplan.activations.per_gpu.micro_batch
as the hand rules read their TP-local prediction (and at sequence / CP under context
parallelism, as the rules do).

Oracle: a family WITH a hand rule (the tiny Llama) whose TP prediction equals real 2-rank
DTensor runs to the byte (tests/test_tp_activations_real.py, tests/test_tp_sp_activations_real.
py): the same inventory with its rule hidden (a model_type no family knows) takes the traced
path, and its per-rank activations must equal the rule's, block by block, with and without
sequence parallelism, under DTensor (fsdp2: torch.chunk's vocabulary rows, loss_parallel on
and off) and Megatron (padded rows). The trace itself is transformers' model code under
FakeTensorMode, not memplan's rule: an independent oracle for the profile path. The MoE cases
(Mixtral, Qwen2-MoE) and the CP cases hold the profile path to those families' rules at the
same layouts (the rules' own evidence for MoE and CP is theirs, not re-proven here). Under
DTensor SP the MoE cases (and DeepSeek-V3's MLA, which has no rule) are held to real 2-rank
DTensor TP + SP runs laid out as torchtitan lays out MoE layers (tests/tp_sp_moe_probe.py;
benchmarks/moe_sp_ranks.py runs eager attention too).
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
from memplan.report.settings import layout_of, setting_of  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import tp  # noqa: E402
from tests.conftest import TINY_LLAMA, make_spec, micro_batch_of  # noqa: E402

CONFIG = {**TINY_LLAMA, "attention_dropout": 0.0, "max_position_embeddings": 1024}


def _spec(checkpointing: str = "none", **parallelism: Any) -> Any:
    training = {"micro_batch_size": 2, "sequence_length": 64, "attention": "sdpa"}
    return make_spec(
        model={"architecture": CONFIG},
        precision="bf16",
        training={**training, "activation_checkpointing": checkpointing},
        parallelism={"data": 1, **parallelism},
    )


def _by_block(acts: Any) -> dict[str, int]:
    return {b.name: b.bytes for b in acts.blocks}


_CACHE: dict[tuple[Any, ...], profile.Profile] = {}


def _profile(spec: Any, tensor: int, rows: int, config: dict[str, Any] = CONFIG) -> profile.Profile:
    """The profile of `config` (of one TP rank's slice for `tensor` > 1) at `spec`'s setting,
    traced once per module and setting."""
    st = setting_of(spec)
    at = (st.checkpointing, st.device, st.stream, st.matmul, str(st.autocast), st.attention)
    key = (json.dumps(config, sort_keys=True), *at, tensor, rows)
    if key not in _CACHE:
        doc = tracer.for_setting(config, spec, tensor=tensor, vocab_rows=rows)
        _CACHE[key] = profile.from_document(json.loads(json.dumps(doc)), origin="t")
    return _CACHE[key]


LAYOUTS = [
    pytest.param({"tensor": 2, "engine": "fsdp2"}, id="dtensor-loss-parallel"),
    pytest.param({"tensor": 2, "engine": "fsdp2", "loss_parallel": False}, id="dtensor-whole"),
    pytest.param({"tensor": 2, "engine": "fsdp2", "sequence_parallel": True}, id="dtensor-sp"),
    pytest.param({"tensor": 2, "engine": "megatron"}, id="megatron"),
    pytest.param({"tensor": 2, "engine": "megatron", "sequence_parallel": True}, id="megatron-sp"),
    pytest.param(
        {"tensor": 2, "engine": "fsdp2", "sequence_parallel": True, "checkpointing": "selective"},
        id="dtensor-sp-selective",
    ),
    # context parallelism: the profile at sequence / CP, as the rules (ring attention's SDPA)
    pytest.param({"context": 2, "engine": "fsdp2"}, id="dtensor-cp2"),
    pytest.param(
        {"tensor": 2, "context": 2, "engine": "megatron", "sequence_parallel": True},
        id="megatron-sp-cp2",
    ),
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
    tp = (_profile(spec, 2, rows),) if lay.tensor > 1 else ()
    unruled = dataclasses.replace(inv, architecture=hidden, profiles=(_profile(spec, 1, 0), *tp))
    traced = micro_batch_of(spec, unruled)
    assert traced.modelled and traced.source == "profile", traced.notes
    assert _by_block(traced) == _by_block(rule)
    assert (traced.logits_bytes, traced.upcast_bytes, traced.hidden_bytes) == (
        rule.logits_bytes,
        rule.upcast_bytes,
        rule.hidden_bytes,
    )
    assert traced.buffers == rule.buffers
    recomputed = [sorted(t.bytes for t in b.recompute) for b in traced.blocks]
    assert recomputed == [sorted(t.bytes for t in b.recompute) for b in rule.blocks]


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
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",  # MLA with a q LoRA, a dense first layer, a shared expert
    "hidden_size": 48,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "vocab_size": 777,
    "max_position_embeddings": 1024,
    "attention_dropout": 0.0,
}
MOE_CASES = [
    pytest.param(MIXTRAL, {"engine": "megatron", "sequence_parallel": True}, id="mixtral-mg-sp"),
    pytest.param(
        MIXTRAL,
        {"engine": "megatron", "sequence_parallel": True, "data": 2, "expert": 2},
        id="mixtral-mg-sp-ep2",
    ),
    pytest.param(QWEN2_MOE, {"engine": "fsdp2"}, id="qwen2_moe-dtensor"),
    pytest.param(QWEN2_MOE, {"engine": "megatron", "sequence_parallel": True}, id="qwen2_moe-sp"),
    # DTensor SP: the MoE block whole on the gathered sequence (layout.gathered_blocks), both
    # paths proved against real ranks below
    pytest.param(
        QWEN2_MOE, {"engine": "fsdp2", "sequence_parallel": True}, id="qwen2_moe-dtensor-sp"
    ),
    pytest.param(
        MIXTRAL,
        {"engine": "fsdp2", "sequence_parallel": True, "data": 2, "expert": 2},
        id="mixtral-dtensor-sp-ep2",
    ),
]


def _moe_spec(
    config: dict[str, Any],
    device: str = "cuda",
    precision: str = "bf16",
    attention: str = "sdpa",
    **parallelism: Any,
) -> Any:
    return make_spec(
        model={"architecture": config},
        precision=precision,
        hardware={"device": device},
        training={"micro_batch_size": 2, "sequence_length": 32, "attention": attention},
        parallelism={"data": 1, "tensor": 2, **parallelism},
    )


def _rule_and_traced(config: dict[str, Any], spec: Any) -> tuple[Any, Any]:
    """The hand rule's TP rank and the profile path's, the family hidden."""
    inv = from_config(config)
    assert inv.architecture is not None
    rule = micro_batch_of(spec, inv)
    rows = act_layout.local_architecture(inv.architecture, layout_of(spec)).vocab_size
    hidden = dataclasses.replace(inv.architecture, model_type="moe_without_rule")
    unruled = dataclasses.replace(
        inv,
        architecture=hidden,
        profiles=(_profile(spec, 1, 0, config), _profile(spec, 2, rows, config)),
    )
    return rule, micro_batch_of(spec, unruled)


@pytest.mark.parametrize(("config", "parallelism"), MOE_CASES)
def test_traced_moe_tp_slice_equals_the_hand_rule(
    config: dict[str, Any], parallelism: dict[str, Any]
) -> None:
    """MoE layers (grouped_mm experts at moe/intermediate / TP, a shared expert) on one TP rank:
    the profile path equals the Mixtral and Qwen2-MoE rules, and their dispatch buffers."""
    rule, traced = _rule_and_traced(config, _moe_spec(config, **parallelism))
    assert rule.modelled and traced.modelled and traced.source == "profile", traced.notes
    got, want = _by_block(traced), _by_block(rule)
    if parallelism.get("expert", 1) > 1:
        # EP_OVER_PROFILE: the grouped GEMM's [E] int32 offsets counted whole, [E / EP] in the
        # rule: (4 - 2) x 4 B in each of the 2 layers; nothing else differs
        assert got["layers"] - want["layers"] == 2 * (4 - 2) * 4
        got["layers"] = want["layers"]
    assert got == want
    assert traced.buffers == rule.buffers and traced.hidden_bytes == rule.hidden_bytes


MOE_RANKS = {"qwen2_moe": QWEN2_MOE, "mixtral": MIXTRAL, "deepseek_v3": DEEPSEEK_V3}


@pytest.fixture(scope="module")
def moe_sp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two real gloo ranks of each tiny MoE model under torch DTensor TP 2 + SP, laid out as
    torchtitan lays out MoE and MLA layers (tests/tp_sp_moe_probe.py), bf16, 2 x 32 tokens."""
    from tests.tp_probe import Case
    from tests.tp_sp_moe_probe import run_ranks

    return run_ranks(MOE_RANKS, [Case("bf16", "sdpa")], tmp_path_factory.mktemp("moe-sp"))


@pytest.mark.parametrize("name", sorted(MOE_RANKS))
def test_traced_moe_under_dtensor_sp_equals_real_ranks(
    moe_sp_ranks: list[dict[str, Any]], name: str
) -> None:
    """Independent oracle: each decoder layer of a real DTensor TP + SP rank (the MoE block's
    input all-gathered once and read by the router, the shared expert and the experts; MLA's
    latent projections on the gathered sequence) holds for backward, to the byte, what the
    profile path predicts for that layer, and what the hand rule does where there is one.
    Before layout.gathered_blocks the profile path was refused here, and the hand rule split
    the router's tensors, the shared expert gate's and its output: 7,232 B per layer under on
    Qwen2-MoE, 4,480 B on Mixtral. DeepSeek-V3's layers: dense first (first_k_dense_replace)."""
    traced, rule = dtensor_sp_layers(MOE_RANKS[name], "bf16", "sdpa")
    assert rule is None or rule == traced
    for res in moe_sp_ranks:
        run = res[f"{name}/bf16-sdpa"]
        assert run["max_logit_diff"] < 5e-2  # the plan computes the whole model's logits
        assert held_per_layer(run) == traced


def dtensor_sp_layers(
    config: dict[str, Any], precision: str, attention: str
) -> tuple[list[int], list[int] | None]:
    """Bytes each of the 2 decoder layers saves on one DTensor TP 2 + SP rank (CPU kernels):
    the profile path's (the family hidden) and the hand rule's (None without one). DeepSeek-V3's
    layer 0 is dense and layer 1 MoE (first_k_dense_replace)."""
    spec = _moe_spec(config, "cpu", precision, attention, engine="fsdp2", sequence_parallel=True)
    rule, traced = _rule_and_traced(config, spec)
    assert traced.modelled and traced.source == "profile", traced.notes
    kinds = {b.name: b.bytes_each for b in traced.blocks if b.name.startswith("layers")}
    if len(kinds) == 1:
        ruled = {b.name: b.bytes_each for b in rule.blocks}["layers"] if rule.modelled else None
        return [kinds["layers"]] * 2, None if ruled is None else [ruled] * 2
    moe = next(k for k in kinds if "MoE" in k)
    return [kinds["layers"], kinds[moe]], None


def held_per_layer(run: dict[str, Any]) -> list[int]:
    """Bytes of each decoder layer's saved storages that a node of the loss's graph holds
    (tests/tp_sp_moe_probe.py; DeepSeek's group routing saves three int/bool tensors, 1,792 B,
    in nodes the graph drops before backward)."""
    regions = run["sp"]["regions"]
    return [sum(s["bytes"] for s in regions[f"layers.{i}"] if s["saved_by"]) for i in range(2)]


GRANITE = {
    "model_type": "granite",  # no memplan family, no head_dim key: the slice pins hidden // heads
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "attention_dropout": 0.0,
}


def test_estimate_traces_the_slice_of_its_own_layout(tmp_path: Any, monkeypatch: Any) -> None:
    """`estimate`'s tracing (memplan.verify.trace.traced_profiles) traces the whole model and
    the spec's TP slice of a model without a rule, caches both, and the TP rank's activations
    come from them; a second call finds them in the cache."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.verify.trace import fallback_inventory, traced_profiles

    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path))
    loaded = validate(
        {
            "model": {"architecture": GRANITE},
            "precision": "bf16",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 2, "sequence_length": 64},
            "parallelism": {
                "engine": "megatron",
                "data": 1,
                "tensor": 2,
                "sequence_parallel": True,
            },
        }
    )
    inv = load_inventory(loaded, unsupported=fallback_inventory)
    assert not micro_batch_of(loaded.spec, inv).modelled
    inv, lines = traced_profiles(loaded, inv)
    assert len(lines) == 2 and "one rank of tensor 2 with 256 vocabulary rows" in lines[1], lines
    acts = micro_batch_of(loaded.spec, inv)
    assert acts.modelled and "-tp2-vocab256" in acts.notes[0], acts.notes
    again, more = traced_profiles(loaded, load_inventory(loaded, unsupported=fallback_inventory))
    assert more == [] and len(again.profiles) == 2
    # the slice's profile apart (memplan.model.load.TENSOR_PARALLEL_DIR): a memplan without
    # Key.tensor globbing the folder never takes it for the whole model's
    assert [p.name.endswith("-tp2-vocab256.json") for p in tmp_path.rglob("*.json")].count(
        True
    ) == 1
    assert not list((tmp_path / "profiles").glob("*-tp2-*.json"))


def test_pin_plan_traces_the_slices_it_searches() -> None:
    """plan's slices (memplan.plan.search.tensor_slices) are those of the TP degrees its layouts
    try at CP = EP = 1: DTensor's torch.chunk rows and Megatron's padded rows (pinning:
    memplan.states.parallel.vocab_rows is their formula)."""
    from memplan.plan.search import tensor_slices

    spec = make_spec(
        model={"architecture": GRANITE},
        hardware={"gpu": "H100-80GB", "gpus_per_node": 4},
        plan={"gpus": 4},
    )
    # any inventory with these widths: 4 key/value heads (TP 4 divides them), 1,000 rows
    inv = from_config(dict(GRANITE, model_type="llama", num_key_value_heads=4, vocab_size=1000))
    # TP 2: torch.chunk's 500 rows, Megatron's 1,024 padded / 2; TP 4: 250, 1,024 / 4
    assert tensor_slices(spec, inv) == ((2, 500), (2, 512), (4, 250), (4, 256))
