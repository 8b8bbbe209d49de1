"""Where a model's layers are and what sets them apart (memplan.verify.trace.structure:
`layer_lists`, `Plan.refine`; memplan.verify.trace.realrun), against real CPU tensors.

The expected values come from outside the trace: the bytes of the storages autograd still
holds when a real CPU forward + loss has returned (`_alive_bytes`, as tests/
test_trace_structure.py measures them), at sizes the profile's fit never saw, and the layer
groups the model's own code implies, written out here from transformers 5.25's modeling files
(DoryModel.forward: the recurrent section runs `n_recurrent_loops` times, `self.norm` after the
input section and between loops; HrmTextModel.forward: the L_module's layers run with grad
`sum(L_bp_cycles padded)` times, the H_module's `H_cycles` times, each stack's `final_norm`
after its last layer).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.errors import MemplanError  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace import realrun, sizes, structure  # noqa: E402
from memplan.verify.trace.meta import architecture  # noqa: E402
from tests.test_trace_structure import _alive_bytes  # noqa: E402

SMALL: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
}
CONFIGS: dict[str, dict[str, Any]] = {
    # one activation module shared by every layer's MLP (modeling_openai.py::MLP.__init__)
    "openai-gpt": {
        "model_type": "openai-gpt",
        "vocab_size": 300,
        "n_positions": 256,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": 4,
    },
    # 3 input layers, 3 recurrent ones run twice, 3 output layers
    "dory": {
        "model_type": "dory",
        **SMALL,
        "sliding_window": 16,
        "num_hidden_layers": 9,
        "layer_types": ["sliding_attention"] * 9,
        "n_input_layers": 3,
        "n_recurrent_layers": 3,
        "n_output_layers": 3,
        "n_recurrent_loops": 2,
    },
    # two stacks of 3 layers; num_hidden_layers becomes 3 x H_cycles x (L_cycles + 1) = 24
    "hrm_text": {"model_type": "hrm_text", **SMALL, "num_hidden_layers": 3},
}
GROUPS: dict[str, dict[str, list[int]]] = {
    "openai-gpt": {"decoder": [0, 1, 2, 3]},
    # calls: 1 in the input and output sections, 2 in the recurrent one; layer 2 (the input
    # section's last) and layer 5 (the recurrent section's last) save `self.norm`'s tensors too
    "dory": {
        "sliding_attention[calls=1,from=0]": [0, 1, 6, 7, 8],
        "sliding_attention[calls=1,+model.norm]": [2],
        "sliding_attention[calls=2,from=3]": [3, 4],
        "sliding_attention[calls=2,+model.norm]": [5],
    },
    # L_bp_cycles [2] padded to H_cycles 2: [1, 2], so 3 calls with grad in the L stack, 2 in H;
    # the L stack's final_norm after its last layer (the H stack's is the head's)
    "hrm_text": {
        "decoder[calls=3,from=0]": [0, 1],
        "decoder[calls=3,+model.L_module.final_norm]": [2],
        "decoder[calls=2]": [3, 4, 5],
    },
}


def _hf_config(config: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **kwargs)


def _setting(batch: int, seq: int, stream: str) -> Setting:
    return Setting(
        batch=batch,
        sequence=seq,
        stream=stream,  # type: ignore[arg-type]
        matmul=stream,  # type: ignore[arg-type]
        autocast=False,
        device="cpu",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
        transformers=transformers.__version__.rsplit(".", 1)[0],
    )


def _against_real(config: dict[str, Any], stream: str, layers: int) -> dict[str, Any]:
    """The profile's activations = the real model's saved bytes at two sizes the fit never saw
    (batch 3 x 37 tokens, batch 1 x 50); the profile document."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    doc = tracer.build(config, stream=stream, matmul=stream, autocast=False, attention="sdpa")
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[stream]
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(config), dtype=dtype)
    model.train()
    for batch, seq in ((3, 37), (1, 50)):
        predicted = traced.activations(_setting(batch, seq, stream), num_layers=layers).bytes
        assert predicted == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)
    return doc


def test_a_shared_module_is_named_in_each_layer() -> None:
    """openai-gpt's one activation module serves every layer: each layer's records name it as
    its own, so the four layers are one kind (two traced, two stood in for) and the profile
    equals the real saved bytes."""
    doc = _against_real(CONFIGS["openai-gpt"], "fp32", 4)
    assert doc["model"]["layer_groups"] == GROUPS["openai-gpt"]


@pytest.mark.slow
def test_a_recurrent_section_is_its_own_kind() -> None:
    """Dory: the recurrent layers (run twice) and the sections' last layers (which the model's
    norms between sections follow) are kinds of their own; the output section's layers are
    stood in for by the input section's (the full-depth check holds them to it)."""
    doc = _against_real(CONFIGS["dory"], "fp32", 9)
    assert doc["model"]["layer_groups"] == GROUPS["dory"]


@pytest.mark.slow
def test_two_stacks_run_in_cycles() -> None:
    """HRM: the layers are the L_module's and the H_module's lists (num_hidden_layers counts
    cache slots); the stacks' layers run different numbers of times."""
    doc = _against_real(CONFIGS["hrm_text"], "fp32", 6)
    assert doc["model"]["layer_groups"] == GROUPS["hrm_text"]


def test_layer_lists_where_the_config_counts_otherwise() -> None:
    """LongcatFlash's num_hidden_layers is 2 x num_layers, HRM's the cache slots: the layers
    are the lists of GradientCheckpointingLayer the model builds (meta device), and the
    inventory's architecture counts LongcatFlash's built layers."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    longcat_json = {
        "model_type": "longcat_flash",
        **SMALL,
        "num_layers": 3,
        "n_routed_experts": 4,
        "moe_topk": 2,
        "ffn_hidden_size": 48,
        "expert_ffn_hidden_size": 16,
        "q_lora_rank": 16,
        "kv_lora_rank": 8,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
    }
    longcat = _hf_config(longcat_json)
    assert longcat.num_hidden_layers == 6
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(longcat)
    found = structure.layer_lists(model, longcat.num_hidden_layers)
    assert [(p, len(m)) for p, m in found.lists] == [("model.layers", 3)]
    from memplan.verify.trace.meta import inventory_from_config

    inv = inventory_from_config(longcat_json)
    assert inv.num_layers == 3
    assert architecture(longcat, list(inv.parameters)).num_layers == 3
    hrm = _hf_config(CONFIGS["hrm_text"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hrm)
    found = structure.layer_lists(model, hrm.num_hidden_layers)
    assert [(p, len(m)) for p, m in found.lists] == [
        ("model.L_module.layers", 3),
        ("model.H_module.layers", 3),
    ]


def test_far_check_below_max_positions() -> None:
    """ProphetNet's decoder takes max_position_embeddings - 2 tokens and no more (the real
    model raises past them): the far check stays there."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    cfg = _hf_config(
        {
            "model_type": "prophetnet",
            "vocab_size": 300,
            "hidden_size": 32,
            "encoder_ffn_dim": 48,
            "decoder_ffn_dim": 48,
            "num_encoder_attention_heads": 4,
            "num_decoder_attention_heads": 4,
            "num_encoder_layers": 1,
            "num_decoder_layers": 1,
            "max_position_embeddings": 64,
        }
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model(input_ids=torch.ones((1, 62), dtype=torch.int64), use_cache=False)
        with pytest.raises(IndexError):
            model(input_ids=torch.ones((1, 63), dtype=torch.int64), use_cache=False)
    assert sizes.far_sequence(8, 64) == 56
    assert sizes.far_sequence(2, 64) == 62  # the longest multiple of the unit it takes


def test_window_of_a_multimodal_config() -> None:
    """Gemma 4's sliding window is its text config's: the regimes split there."""
    cfg = transformers.AutoConfig.for_model(
        "gemma4", text_config={"sliding_window": 16, "max_position_embeddings": 256}
    )
    assert sizes.window_of(cfg) == 16 == cfg.get_text_config(decoder=True).sliding_window


class _Picker(torch.nn.Module):
    """Weightless, under no_grad, a data-dependent op: its output has its input's shape."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for v in x.flatten().unique().tolist():
            out = out + v
        return out


class _Grows(torch.nn.Module):
    """Weightless: its output's shape is the data's (nonzero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.nonzero()


class _Weighted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.nonzero() * self.w.sum()


for _cls in (_Picker, _Grows, _Weighted):
    _cls.__module__ = "transformers.models.test_only"  # real_runs wraps the model code's


def test_real_runs_serve_a_weightless_module_and_refuse_the_rest() -> None:
    """A weightless module under no_grad whose output shape does not depend on data runs on
    real tensors (fake tensors alone stop: DynamicOutputShapeException); one whose output
    shape does (zeros and ones give other shapes), or that has weights, is refused."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    for cls, error in ((_Picker, None), (_Grows, "depend on the data"), (_Weighted, "weights")):
        mode = FakeTensorMode()
        with mode:
            model = torch.nn.Sequential(cls())
            x = torch.zeros((2, 3))
            with pytest.raises(DynamicOutputShapeException):
                model(x)
            with realrun.real_runs(model, mode) as ran:
                if error is None:
                    out = model(x)
                    assert tuple(out.shape) == (2, 3) and ran == ["0"]
                else:
                    with pytest.raises(MemplanError, match=error):
                        model(x)
        assert "forward" not in vars(model[0])  # restored


@pytest.mark.slow
def test_an_indexer_fake_tensors_cannot_run() -> None:
    """Kolibri 1.1: its sparse layers' indexer (weightless, under no_grad, `unique()` and
    `nonzero()` on the scores) runs on real tensors in the trace; `memplan verify` (CPU, bf16,
    the MoE precision the trace serves, batch 2 x 32, sdpa): the profile's activations = the
    real model's saved storages as memplan/verify/measure.py counts them. (This file's
    `_alive_bytes` finds 80 more fp32 storages on the real model at 2 x 32, 24 of 512 B and
    56 of 8,192 B, that neither verify's measure nor the trace counts: open.)"""
    from benchmarks.profile_verify import run_case
    from benchmarks.sweep_configs import shrink

    row = run_case(
        shrink("kolibri1_1"), {"precision": "bf16", "attention": "sdpa", "checkpointing": "none"}
    )
    assert row.get("error") is None, row
    assert row["activations_source"] == "profile"
    assert row["activations_predicted"] == row["activations_measured"], row
