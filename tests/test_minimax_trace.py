"""MiniMax (transformers 5.25 models/minimax) traced (memplan.verify.trace): lightning
(linear) attention and full softmax attention layers, MoE in every layer.

How the model picks a layer's attention: `config.layer_types` (configuration_minimax.py::
MiniMaxConfig.__post_init__ fills it, full and linear alternating, where config.json has none;
MiniMax-Text-01's own list is 7 linear then 1 full), read by MiniMaxDecoderLayer.__init__
(`self.block_type = config.layer_types[layer_idx]`: MiniMaxLightningAttention for
"linear_attention", else MiniMaxAttention). The trace groups by that list and by each layer's
structure (memplan.verify.trace.structure.features: the attention's class), so it splits the
layers with or without the list.

What the grouping did not take: MiniMaxLightningAttention.forward loops over blocks of
`config.block_size` tokens (256 by default) and saves per block; the last block is as long as
what remains. memplan.verify.trace.sizes.block_loops finds the loop (a `for` in the module's
forward stepping by its `block_size`) and the trace runs on multiples of 2 x block with the
loop's storages pooled (memplan.verify.trace.fit.pool), as Qwen3.5's chunked delta rule.

Oracles, outside the code under test:
- the groups = the layers the config's `layer_types` names (the model's own rule), and the
  attention class each built layer holds;
- `memplan verify` on CPU: the real model's saved storages (memplan/verify/measure.py) against
  the profile's prediction, to the byte;
- the storages real bf16 CPU tensors still hold after the forward, at sizes the fit never saw.

MoE models are traced in bf16 only (torch's meta kernel of _grouped_mm takes bf16:
memplan/verify/trace/moe.py::check), so there is no fp32 case; amp (bf16-mixed) is the other
precision.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.profile_verify import run_case  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import structure  # noqa: E402
from memplan.verify.trace.forward import build_fake  # noqa: E402
from memplan.verify.trace.sizes import block_loops, loop_chunk  # noqa: E402
from tests.test_trace_structure import _alive_bytes, _setting  # noqa: E402

BLOCK = 16
MINIMAX: dict[str, Any] = {
    "model_type": "minimax",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "block_size": BLOCK,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2,
}
"""MiniMax-Text-01's pattern (3 linear layers, then a full one; its own has 7) over 8 layers:
6 linear layers of which 4 are stood in for in the trace, 2 full; a 16-token lightning block
(the model's 256 would need sequences of 512 tokens and up)."""


def _hf_config(config: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **kwargs)


def _meta_model(config: dict[str, Any]) -> Any:
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(_hf_config(config))


def test_groups_are_the_config_layer_types_with_or_without_the_list() -> None:
    """The layers are grouped as the config's `layer_types` says, and as the attention class
    each built layer holds; given no list (types=None) the structure alone splits them the
    same way, named by the class."""
    model = _meta_model(MINIMAX)
    layers = model.model.layers
    want: dict[str, list[int]] = {}
    for i, kind in enumerate(model.config.layer_types):
        want.setdefault(kind, []).append(i)
    classes: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        classes.setdefault(type(layer.self_attn).__name__, []).append(i)
    assert classes == {
        "MiniMaxLightningAttention": want["linear_attention"],
        "MiniMaxAttention": want["full_attention"],
    }
    plan = structure.plan(layers, model.config.layer_types)
    assert {g.kind: list(g.layers) for g in plan.groups} == want
    bare = structure.plan(layers, None)
    assert {g.kind: list(g.layers) for g in bare.groups} == {
        "decoder[self_attn=MiniMaxLightningAttention]": want["linear_attention"],
        "decoder[self_attn=MiniMaxAttention]": want["full_attention"],
    }


def test_the_lightning_block_loop_is_found() -> None:
    """The loop is the modeling code's own (its source loops over `num_blocks` and slices
    `i * self.block_size` tokens; `self.block_size = config.block_size`, 256 by default) and is
    the model's block_size; models without such a loop have none."""
    import transformers.models.minimax.modeling_minimax as modeling

    source = inspect.getsource(modeling.MiniMaxLightningAttention)
    assert "for i in range(num_blocks):" in source
    assert "start_idx = i * self.block_size" in source
    assert "self.block_size = config.block_size" in source
    assert transformers.MiniMaxConfig().block_size == 256
    model, _ = build_fake(MINIMAX, stream="bf16", attention="sdpa", checkpointing="none")
    where = "modeling_minimax.py::MiniMaxLightningAttention.forward"
    assert block_loops(model) == {
        BLOCK: f"{where}: the module's own loop over self.block_size tokens"
    }
    assert loop_chunk(model)[0] == BLOCK
    own = ("block_size", "layer_types", "num_local_experts", "num_experts_per_tok")
    llama = {**{k: v for k, v in MINIMAX.items() if k not in own}, "model_type": "llama"}
    model, _ = build_fake(llama, stream="bf16", attention="sdpa", checkpointing="none")
    assert block_loops(model) == {} and loop_chunk(model) == (0, "")


CASES = [
    ("bf16", "sdpa", "none", 32),
    ("bf16", "sdpa", "none", 48),
    ("bf16", "eager", "full", 32),
    ("bf16-mixed", "sdpa", "selective", 32),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "attention", "checkpointing", "sequence"),
    CASES,
    ids=[f"{p}-{a}-{c}-{s}" for p, a, c, s in CASES],
)
def test_verify_on_cpu_is_exact(
    precision: str, attention: str, checkpointing: str, sequence: int, monkeypatch: Any
) -> None:
    """`memplan verify` (ddp, CPU, batch 2): the profile's activations = the real model's saved
    storages (~40 s each). 32 tokens are 2 blocks, 48 are 3 (a multiple of the block, not of
    the traced 32-token unit)."""
    import benchmarks.profile_verify as pv

    monkeypatch.setattr(pv, "BATCH", (pv.BATCH[0], sequence))
    setting = {"precision": precision, "attention": attention, "checkpointing": checkpointing}
    row = run_case(MINIMAX, setting)
    assert row.get("error") is None, row
    assert row["activations_source"] == "profile"
    assert row["activations_predicted"] == row["activations_measured"], row
    assert not any(n.startswith("sequence ") for n in row["notes"]), row["notes"]


@pytest.mark.slow
def test_profile_equals_real_tensors_at_unseen_sizes() -> None:
    """The profile (bf16, sdpa) = the storages real bf16 CPU tensors hold after the forward +
    loss, at sizes the fit never saw (3 x 48: 3 blocks; 1 x 80: 5 blocks); off the block's
    multiples (2 x 40: a last block of 8 tokens) the estimate says it extrapolates."""
    doc = tracer.build(MINIMAX, stream="bf16", matmul="bf16", autocast=False, attention="sdpa")
    assert doc["fit"]["sequence_multiple"] == BLOCK and doc["fit"]["min_sequence"] == 2 * BLOCK
    assert any("the module's own loop" in a for a in doc["assumptions"])
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _hf_config(MINIMAX), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.train()
    layers = MINIMAX["num_hidden_layers"]
    for batch, seq in ((3, 48), (1, 80)):
        acts = traced.activations(_setting(batch, seq, "sdpa"), num_layers=layers)
        assert not any(n.startswith("sequence ") for n in acts.notes), acts.notes
        assert acts.bytes == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)
    off = traced.activations(_setting(2, 40, "sdpa"), num_layers=layers)
    assert any(n.startswith("sequence 40 is not a multiple of 16") for n in off.notes)
