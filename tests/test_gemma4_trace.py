"""Gemma 4's decoder layers traced (memplan.verify.trace): per-layer inputs and KV sharing.

transformers 5.25 models/gemma4/modeling_gemma4.py:
- Per-layer embeddings: `Gemma4TextModel.project_per_layer_inputs` runs
  `per_layer_model_projection` on the scaled embeddings, which are layer 0's input too: one
  storage the embeddings and layer 0 save (fit.split lists it with layer 0, so layer 0 saves
  what every later layer saves; before, the trace refused the model: "layers of kind ... save
  different tensors").
- KV sharing (`num_kv_shared_layers`): the last layers reuse ("reuse") the keys and values the
  last earlier layer of their type stores ("store"), and have no k/v projections; with
  `use_double_wide_mlp` their MLP is twice as wide. The grouping tells them apart by their
  attributes and parameters (structure.features); the stored K/V, saved by the storing layer
  and every reusing layer, is listed with the embeddings (once per forward).

Oracles, outside the code under test:
- the groups = the layers the config's own `kv_sharing_modes` and `layer_types` name
  (transformers' configuration_gemma4.py::Gemma4TextConfig.kv_sharing_modes);
- `memplan verify` on CPU: the real model's saved storages (memplan/verify/measure.py) against
  the profile's prediction, to the byte (fp32 and bf16, sdpa, none and full checkpointing);
- the storages real CPU tensors still hold after the forward, at sizes the fit never saw.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.profile_verify import run_case  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.verify.trace import fit as fit_  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import structure  # noqa: E402
from tests.test_trace_structure import _alive_bytes, _setting  # noqa: E402


def tiny(layers: int, shared: int) -> dict[str, Any]:
    """A tiny Gemma 4 text config: sliding, sliding, full, repeated; the last `shared` layers
    reuse keys and values (with a double-wide MLP where any do)."""
    return {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "hidden_size_per_layer_input": 16,
        "vocab_size": 256,
        "vocab_size_per_layer_input": 256,
        "num_hidden_layers": layers,
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": shared > 0,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3),
        "sliding_window": 64,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
    }


PLE = tiny(6, 0)  # the default config's structure: per-layer inputs, no layer reuses K/V
SHARED = tiny(9, 3)  # layers 6-8 reuse the K/V of layers 4 (sliding) and 5 (full)


def _hf_config(config: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **kwargs)


@pytest.mark.parametrize("config", [PLE, SHARED], ids=["ple", "shared"])
def test_groups_are_the_config_kv_sharing_modes(config: dict[str, Any]) -> None:
    """Layers are grouped as (layer type, KV sharing mode) = the config's own lists."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    cfg = _hf_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    plan = structure.plan(model.model.layers, cfg.layer_types)
    want: dict[tuple[str, Any], list[int]] = {}
    for i, (kind, mode) in enumerate(zip(cfg.layer_types, cfg.kv_sharing_modes, strict=True)):
        want.setdefault((kind, mode), []).append(i)
    assert sorted(sorted(g.layers) for g in plan.groups) == sorted(want.values())


def test_a_storage_the_embeddings_and_one_layer_save_is_the_layers() -> None:
    """fit.split's attribution (pins behaviour: records written out here): the embeddings'
    output that layer 0 saves again is layer 0's, under the module layer 0 saved it with; one
    several layers save stays the embeddings'; one the embeddings alone save stays theirs."""
    both = fit_.Record("embeddings", "model.proj", "fp32", 64, {"embeddings", "layer.0"})
    both.modules["layer.0"] = "input_layernorm"
    many = fit_.Record("embeddings", "model.rotary_emb", "fp32", 8, {"layer.0", "layer.1"})
    alone = fit_.Record("embeddings", "model.embed", "int64", 4, {"embeddings"})
    out = fit_.split([both, many, alone])
    assert [(r.module, r.numel) for r in out["layer.0"]] == [("input_layernorm", 64)]
    assert [(r.module, r.numel) for r in out["embeddings"]] == [
        ("model.rotary_emb", 8),
        ("model.embed", 4),
    ]


CASES = [
    (PLE, "fp32", "none"),
    (SHARED, "fp32", "none"),
    (SHARED, "bf16", "full"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "precision", "checkpointing"),
    CASES,
    ids=["ple-fp32-none", "shared-fp32-none", "shared-bf16-full"],
)
def test_verify_on_cpu_is_exact(config: dict[str, Any], precision: str, checkpointing: str) -> None:
    """`memplan verify` (ddp, CPU, batch 2 x 32 tokens, sdpa): the profile's activations =
    the real model's saved storages (~20 s each)."""
    row = run_case(
        config, {"precision": precision, "attention": "sdpa", "checkpointing": checkpointing}
    )
    assert row.get("error") is None, row
    assert row["activations_source"] == "profile"
    assert row["activations_predicted"] == row["activations_measured"], row


@pytest.mark.slow
def test_profile_equals_real_tensors_at_unseen_sizes() -> None:
    """The KV-sharing profile (bf16, sdpa) = the storages real bf16 CPU tensors hold after the
    forward + loss, at sizes the fit never saw (below the 64-token window)."""
    doc = tracer.build(
        SHARED, stream="bf16", matmul="bf16", autocast=False, attention="sdpa", sequence=50
    )
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _hf_config(SHARED), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.train()
    for batch, seq in ((3, 37), (1, 50)):
        predicted = traced.activations(
            _setting(batch, seq, "sdpa"), num_layers=SHARED["num_hidden_layers"]
        ).bytes
        assert predicted == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)
