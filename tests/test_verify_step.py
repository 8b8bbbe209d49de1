"""memplan verify builds the step the spec describes (issue 15 item 5, issue 16 item 1).

Each case runs the real model through `memplan verify`'s machinery (CPU, tiny configs): the
attention implementation, full or selective activation checkpointing and forced dropout are
applied to the model verify builds, transformers' key/value cache is off, and each setting is
recorded in `setup`. Oracles: the activations verify measures on the real step (checked
against the prediction within the verify tolerance), and, independently of verify's harness,
what tests/activation_probe.py measures on a model it builds itself with the same settings.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.verify.result import VerifyResult
from memplan.verify.runner import state_name
from tests.test_verify_support import model_state_rows_exact, run

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.activation_probe import build_model, measure  # noqa: E402

BATCH, SEQ = 2, 24
# The tiny shapes of tests/test_activations_families.py (a Qwen2 as in the audit).
_TINY: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {**_TINY, "model_type": "qwen2"},
    "phi3": {**_TINY, "model_type": "phi3"},
    "gpt_neox": {**_TINY, "model_type": "gpt_neox"},
    "gemma": {**_TINY, "model_type": "gemma", "head_dim": 16},
    "mixtral": {**_TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_TINY,
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 40,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 56,
    },
    # DeepSeek-V2-Lite's layout: multi-head latent attention (no q LoRA), one dense layer
    # first, then routed + shared experts.
    "deepseek_v2": {
        **_TINY,
        "model_type": "deepseek_v2",
        "num_key_value_heads": 6,
        "moe_intermediate_size": 40,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_group": 1,
        "topk_group": 1,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 6,
        "vocab_size": 777,
        "n_positions": 128,
    },
    "bloom": {
        "model_type": "bloom",
        "hidden_size": 48,
        "n_layer": 2,
        "n_head": 6,
        "vocab_size": 777,
    },
}


def spec(family: str, parallelism: dict[str, Any] | None = None, **training: Any) -> Any:
    return validate(
        {
            "model": {"architecture": CONFIGS[family]},
            "precision": "fp32",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": BATCH, "sequence_length": SEQ, **training},
            "parallelism": parallelism or {"engine": "ddp", "data": 1},
            "hardware": {"device": "cpu"},
        }
    )


def activations_match(result: VerifyResult) -> int:
    """Model states to the byte and activations checked within tolerance on every rank; the
    headline rank's measured activations."""
    model_state_rows_exact(result)
    for rank in result.ranks:
        row = rank.row("activations")
        assert row.checked and row.ok, (rank.rank, row)
    measured = result.headline.row("activations").measured
    assert measured is not None
    return measured


# The audit's cases (qwen2: checkpointing, eager, dropout, selective; phi3 and gpt_neox with
# the cache off) and settings it did not try (gemma and gpt2 eager + full checkpointing +
# dropout, gpt2 and gpt_neox selective with eager attention).
CASES: list[tuple[str, dict[str, Any]]] = [
    ("qwen2", {}),
    ("qwen2", {"activation_checkpointing": "full"}),
    ("qwen2", {"attention": "eager"}),
    ("qwen2", {"dropout": True}),
    ("qwen2", {"activation_checkpointing": "selective"}),
    ("phi3", {}),
    ("gpt_neox", {}),
    ("gemma", {"attention": "eager", "activation_checkpointing": "full", "dropout": True}),
    ("gpt2", {"attention": "eager", "activation_checkpointing": "full", "dropout": True}),
    ("gpt2", {"attention": "eager", "activation_checkpointing": "selective", "dropout": False}),
    ("gpt_neox", {"attention": "eager", "activation_checkpointing": "selective", "dropout": True}),
]


@pytest.mark.parametrize(
    ("family", "training"),
    CASES,
    ids=["-".join([f, *(f"{k}={v}" for k, v in t.items())]) for f, t in CASES],
)
def test_the_step_the_spec_describes_is_built_and_measured(
    family: str, training: dict[str, Any]
) -> None:
    result = run(spec(family, **training))
    activations_match(result)
    setup = result.setup
    assert setup["attention"] == training.get("attention", "sdpa")
    assert setup["activation_checkpointing"] == training.get("activation_checkpointing", "none")
    assert setup["dropout"] == training.get("dropout")
    assert setup["activation_offload"] is False
    assert setup["use_cache"] is False


@pytest.mark.parametrize(
    ("attention", "checkpointing"), [("sdpa", "none"), ("sdpa", "full"), ("eager", "none")]
)
def test_verify_measures_what_the_activation_probe_measures(
    attention: str, checkpointing: str
) -> None:
    """Independent oracle: the saved bytes of a model tests/activation_probe.py builds with
    the same attention and checkpointing (its own forward with `use_cache=False`) equal what
    verify measures on the step it built. Before verify applied the settings, its full
    checkpointing and eager runs measured the default run's bytes (the audit's finding)."""
    config = CONFIGS["qwen2"]
    model = build_model(config, attention=attention, checkpointing=checkpointing)
    probe, _ = measure(model, batch=BATCH, sequence=SEQ)
    result = run(spec("qwen2", attention=attention, activation_checkpointing=checkpointing))
    assert result.headline.row("activations").measured == probe.bytes


def test_settings_change_what_is_measured() -> None:
    """The audit's symptom, directly: full checkpointing saves less than the default step,
    eager attention (its softmax per head) more, dropout's masks more."""
    default = activations_match(run(spec("qwen2")))
    assert activations_match(run(spec("qwen2", activation_checkpointing="full"))) < default / 2
    assert activations_match(run(spec("qwen2", attention="eager"))) > default
    assert activations_match(run(spec("qwen2", dropout=True))) > default


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_fsdp2_two_ranks_with_checkpointing(checkpointing: str) -> None:
    result = run(
        spec(
            "qwen2",
            parallelism={"engine": "fsdp2", "zero_stage": 3},
            activation_checkpointing=checkpointing,
            dropout=True,
        ),
        nproc=2,
    )
    activations_match(result)
    assert len(result.ranks) == 2


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_moe_model_states_match(family: str) -> None:
    """MoE optimizer states compare per torch state name (memplan's `exp_avg (experts)` rows
    are summed into `exp_avg`): tiny MoE models on DDP, one process, to the byte."""
    result = run(spec(family))
    model_state_rows_exact(result)
    names = {row.name for row in result.headline.rows if row.state}
    assert names == {"step", "exp_avg", "exp_avg_sq"}


def test_expert_rows_are_named_as_torch_names_them() -> None:
    assert state_name("exp_avg (experts)") == "exp_avg"
    assert state_name("exp_avg") == "exp_avg"
    assert state_name("step (experts)") == "step"


def test_selective_is_refused_where_the_attention_core_is_inline() -> None:
    with pytest.raises(MemplanError, match="eager_attention_forward") as err:
        run(spec("bloom", activation_checkpointing="selective"))
    assert err.value.field == "training.activation_checkpointing"


def test_activation_offload_is_refused_on_the_cpu() -> None:
    loaded = spec("qwen2", activation_checkpointing="full", activation_offload=True)
    with pytest.raises(MemplanError, match="pinned") as err:
        run(loaded)
    assert err.value.field == "training.activation_offload"


@pytest.mark.parametrize("training", [{}, {"activation_checkpointing": "full", "dropout": True}])
def test_fake_tensors_build_the_same_step(training: dict[str, Any]) -> None:
    """--fake measures what the real run measures with the cache off: transformers cannot read
    fake position ids, and verify tells it the batch is unpacked (build.unpacked)."""
    loaded = spec("phi3", **training)
    fake, real = run(loaded, fake=True), run(loaded)
    assert fake.headline.row("activations").measured == activations_match(real)
