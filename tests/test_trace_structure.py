"""Layer kinds read from the model (memplan.verify.trace.structure): issue 18, mixed layers.

- The groups found on the full-depth model equal the layers each config's own rule names
  (independent oracle: the config keys as transformers documents them, written out here):
  DeepSeek-V3 / GLM-4.5 `first_k_dense_replace`, Qwen3-MoE `mlp_only_layers` and
  `decoder_sparse_step`, Llama 4 `moe_layers` (from `interleave_moe_layer_step`),
  `no_rope_layers` and chunked attention.
- A profile of a model with several layer structures against real CPU tensors at sizes the fit
  never saw: the bytes of the storages autograd still holds at the end of the forward
  (`_alive_bytes`, below: the real model, not the trace). The full matrix (7 configs, eager and
  sdpa, two sizes) is benchmarks/trace_structures.py -> benchmarks/results/trace_structures.json.
- `structure.check` refuses a grouping the full forward contradicts.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.errors import MemplanError  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import structure  # noqa: E402

BASE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
}
MLA = {"kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 12}
MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 2}
CONFIGS: dict[str, dict[str, Any]] = {
    # layer i >= first_k_dense_replace is MoE (modeling_deepseek_v3.py::DeepseekV3DecoderLayer)
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **BASE,
        # MLA expands keys and values to every head (DeepSeek-V3's config.json: 128 and 128);
        # eager attention's repeat_kv reads num_key_value_groups, which 2 of 4 would break
        "num_key_value_heads": 4,
        "num_hidden_layers": 4,
        "n_routed_experts": 4,
        "q_lora_rank": 6,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        **MLA,
        **MOE,
    },
    "glm4_moe": {
        "model_type": "glm4_moe",
        **BASE,
        "num_hidden_layers": 4,
        "n_routed_experts": 4,
        "first_k_dense_replace": 2,
        "n_group": 1,
        "topk_group": 1,
        "head_dim": 8,
        **MOE,
    },
    # MoE where i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    # (modeling_qwen3_moe.py::Qwen3MoeDecoderLayer)
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        **BASE,
        "num_hidden_layers": 6,
        "num_experts": 4,
        "mlp_only_layers": [0],
        "decoder_sparse_step": 2,
        "head_dim": 8,
        **MOE,
    },
    # moe_layers = [1, 3, 5] (interleave 2); no_rope_layers = [1, 1, 1, 0, 1, 1] (a NoPE layer
    # every 4th), chunked attention where RoPE is used (configuration_llama4.py)
    "llama4_text": {
        "model_type": "llama4_text",
        **BASE,
        "num_hidden_layers": 6,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 40,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 16,
        "no_rope_layer_interval": 4,
        "head_dim": 8,
    },
    # no chunking: every layer `full_attention`, RoPE and NoPE layers apart only by `use_rope`
    "llama4_text-nope": {
        "model_type": "llama4_text",
        **BASE,
        "num_hidden_layers": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 40,
        "no_rope_layer_interval": 2,
        "attention_chunk_size": None,
        "head_dim": 8,
    },
}
GROUPS: dict[str, dict[str, list[int]]] = {
    "deepseek_v3": {
        "decoder[mlp=DeepseekV3MLP]": [0],
        "decoder[mlp=DeepseekV3MoE]": [1, 2, 3],
    },
    "glm4_moe": {"decoder[mlp=Glm4MoeMLP]": [0, 1], "decoder[mlp=Glm4MoeMoE]": [2, 3]},
    "qwen3_moe": {
        "decoder[mlp=Qwen3MoeMLP]": [0, 2, 4],
        "decoder[mlp=Qwen3MoeSparseMoeBlock]": [1, 3, 5],
    },
    "llama4_text": {
        "chunked_attention[feed_forward=Llama4TextMLP]": [0, 2, 4],
        "chunked_attention[feed_forward=Llama4TextMoe]": [1, 5],
        "full_attention": [3],
    },
    "llama4_text-nope": {
        "full_attention[self_attn.use_rope=1]": [0, 2],
        "full_attention[self_attn.use_rope=0]": [1, 3],
    },
}


def _hf_config(config: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **kwargs)


@pytest.mark.parametrize("name", list(GROUPS))
def test_groups_are_the_layers_the_config_names(name: str) -> None:
    """The grouping of the full-depth model (meta device) = the config's documented rule."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    cfg = _hf_config(CONFIGS[name])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    layers = model.model.layers
    plan = structure.plan(layers, getattr(cfg, "layer_types", None))
    assert {g.kind: list(g.layers) for g in plan.groups} == GROUPS[name]
    assert sum(plan.counts.values()) == cfg.num_hidden_layers


def _setting(batch: int, seq: int, attention: str) -> Setting:
    return Setting(
        batch=batch,
        sequence=seq,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cpu",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="none",
        transformers=transformers.__version__.rsplit(".", 1)[0],
    )


def _alive_bytes(model: Any, *, batch: int, sequence: int) -> int:
    """Bytes of the storages that tensors saved for backward still hold when the forward + loss
    has returned (parameters and buffers excluded), on real CPU tensors. Unlike
    tests/activation_probe.py's count of every storage ever saved, a saved tensor whose graph
    node the forward dropped (DeepSeek's group-limited routing saves some on a branch the loss
    does not reach) is freed and not counted."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, sequence))
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids.clone(), use_cache=False)
    assert out.loss.isfinite()
    storages: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(storages.values())


@pytest.mark.parametrize(("name", "attention"), [("deepseek_v3", "sdpa"), ("llama4_text", "eager")])
def test_profile_of_mixed_layers_equals_real_tensors(name: str, attention: str) -> None:
    """The profile (two layers per structure, fitted on batch 2-3 x 8-48 tokens and batch 1
    apart) = the storages real bf16 CPU tensors hold, at sizes the fit never saw."""
    config = CONFIGS[name]
    doc = tracer.build(config, stream="bf16", matmul="bf16", autocast=False, attention=attention)
    assert doc["model"]["layer_groups"] == GROUPS[name]
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    assert {b.kind: b.count for b in traced.blocks if b.kind} == {
        k: len(v) for k, v in GROUPS[name].items()
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _hf_config(config), dtype=torch.bfloat16, attn_implementation=attention
    )
    model.train()
    for batch, seq in ((3, 37), (1, 50)):
        predicted = traced.activations(
            _setting(batch, seq, attention), num_layers=config["num_hidden_layers"]
        ).bytes
        assert predicted == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)


# Pipeline splits over the mixed layers: (layers_per_stage, microbatches).
SPLITS = {"deepseek_v3": ((2, 2), 4), "llama4_text": ((3, 3), 3)}


@pytest.mark.parametrize("name", list(SPLITS))
def test_pipeline_stages_hold_the_kinds_the_config_puts_there(name: str) -> None:
    """A profile with several layer structures splits over pipeline stages (activations.
    on_rank): each stage's layer blocks count the kinds the config's own rule (GROUPS, the
    independent oracle) puts in its layers, the micro-batches in flight (1F1B, 2 stages)
    hold them again, and the stages' layers add up to the whole model's."""
    from memplan.activations import on_rank
    from memplan.model.inventory import Architecture, Inventory
    from memplan.states.layout import Layout

    config = CONFIGS[name]
    depth = config["num_hidden_layers"]
    doc = tracer.build(config, stream="bf16", matmul="bf16", autocast=False, attention="sdpa")
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    micro = traced.activations(_setting(2, 16, "sdpa"), num_layers=depth)
    kind_of = {i: kind for kind, idx in GROUPS[name].items() for i in idx}
    name_of = {b.kind: b.name for b in traced.blocks if b.kind}
    each = {b.name: b.bytes_each for b in micro.blocks if b.name.startswith("layers")}
    arch = Architecture(model_type=config["model_type"], hidden_size=32, num_layers=depth,
                        vocab_size=300)  # fmt: skip
    inventory = Inventory(name=name, architecture=arch, parameters=())
    split, microbatches = SPLITS[name]
    layout = Layout(engine="megatron", pipeline=2, layers_per_stage=split)
    first_layer, total = 0, 0
    for rank, n in enumerate(split):
        mine = [name_of[kind_of[i]] for i in range(first_layer, first_layer + n)]
        first_layer += n
        saved = on_rank(inventory, micro, layout, rank, microbatches)
        assert saved.modelled, saved.notes
        now = {b.name: b.count for b in saved.blocks if b.name.startswith("layers")}
        held = {
            b.name.removeprefix("in_flight."): b.count
            for b in saved.blocks
            if b.name.startswith("in_flight.layers")
        }
        alive = min(microbatches, 2 - rank)  # 1F1B: P - rank micro-batches in flight
        for block in each:
            assert now.get(block, 0) == mine.count(block), (rank, block)
            assert held.get(block, 0) == (alive - 1) * mine.count(block), (rank, block)
        total += sum(each[b] * mine.count(b) for b in each)
    assert total == sum(b.bytes for b in micro.blocks if b.name.startswith("layers"))


def test_check_refuses_layers_the_structure_does_not_tell_apart() -> None:
    """Unit test of `structure.check`: a layer whose full-model storages differ from its
    group's fit is named (a forward reading a per-layer config list by layer_idx would)."""
    plan = structure.Plan(depth=3, groups=(structure.Group("decoder", (0, 1, 2)),))
    predicted = {"layer:decoder": [("bf16", 64)], "embeddings": [], "head": [], "loss": []}
    measured = {"layer.0": [("bf16", 64)], "layer.1": [("bf16", 64)], "layer.2": [("fp32", 64)]}
    with pytest.raises(MemplanError, match=r"layer 2 \(decoder\) saves"):
        structure.check(plan, predicted, measured, (2, 8))
    measured["layer.2"] = [("bf16", 64)]
    structure.check(plan, predicted, measured, (2, 8))
