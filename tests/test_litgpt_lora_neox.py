"""LitGPT's LoRA and QLoRA on its parallel-residual Block (GPT-NeoX: Pythia, StableLM Alpha;
Falcon): memplan.model.stacks.litgpt_lora_neox.neox_layer against litgpt 0.5.9's real
`litgpt.lora.GPT` on CPU, to the byte; Phi (phi-1.5 / phi-2: Falcon-7B's shared norm with
biases, GELU tanh and an lm_head bias) too.

Oracles: the stored matrix (benchmarks/litgpt_lora_neox.py -> benchmarks/results/
litgpt-lora-neox.json, measured by tests/litgpt_probe.py::held_bytes_lora / held_bytes_qlora /
held_bytes_lora_fake), replayed here without torch; a few cases measured live; litgpt's own
config entries for the probe's fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.model.sources import from_config
from memplan.model.stacks.litgpt_lora_adapters import Flags, flags_of
from tests.conftest import make_spec, micro_batch_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "litgpt-lora-neox.json"

TARGETS: dict[str, tuple[str, ...]] = {
    "q+v": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "q+v+mlp": ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
    "o": ("o_proj",),
    "all+head": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head"),
}  # fmt: skip
"""benchmarks/litgpt_lora.py's target sets (peft's names, mapped to LitGPT's flags)."""


def spec_of(row: dict[str, Any], *, method: str) -> Any:
    """The memplan spec of a stored row (benchmarks/litgpt_lora_neox.py::spec_doc)."""
    finetune: dict[str, Any] = {
        "method": method,
        "rank": 8,
        "alpha": 16,
        "dropout": row["dropout"],
        "target_modules": list(TARGETS[row["targets"]]),
    }
    if method == "qlora":
        finetune |= {"quant_type": "nf4", "double_quant": row["double_quant"]}
    return make_spec(
        model={"architecture": row["config"], "implementation": "litgpt"},
        precision=row["precision"],
        optimizer={"name": "paged_adamw" if method == "qlora" else "adamw"},
        training={
            "micro_batch_size": row["batch"],
            "sequence_length": row["sequence"],
            "activation_checkpointing": row.get("checkpointing", "none"),
        },
        finetune=finetune,
        hardware={"device": "cpu"},
    )


def _stored() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RESULTS.read_text())
    return doc


@pytest.mark.parametrize(
    ("part", "method"),
    [
        ("lora", "lora"),
        ("qlora", "qlora"),
        ("stablelm_3b_fake", "lora"),
        ("phi_1_5_fake", "lora"),
    ],
)
def test_rule_matches_the_stored_litgpt_measures(part: str, method: str) -> None:
    """Every stored case: the rule as it is now against what litgpt's model held when
    measured (not the stored `memplan` column: a rule changed since would pass that)."""
    rows = _stored()[part]
    assert rows
    wrong = []
    for row in rows:
        saved = micro_batch_of(spec_of(row, method=method), from_config(row["config"]))
        assert saved.modelled, saved.notes
        if saved.bytes != row["measured"]:
            wrong.append((row["architecture"], row["precision"], row["targets"], saved.bytes))
    assert not wrong, wrong


def test_stored_matrix_covers_every_architecture_and_setting() -> None:
    doc = _stored()
    lora = doc["lora"]
    archs = {"pythia", "falcon-7b", "falcon-40b", "phi-1.5", "phi-2"}
    assert {r["architecture"] for r in lora} == archs
    pythia = [r for r in lora if r["architecture"] == "pythia"]
    assert {r["targets"] for r in pythia} == set(TARGETS)
    assert {(r["precision"], r["checkpointing"], r["dropout"]) for r in pythia} == {
        (p, m, d) for p in ("fp32", "bf16", "amp-bf16") for m in ("none", "full") for d in (0, 0.05)
    }
    assert {r["architecture"] for r in doc["qlora"]} == archs
    assert [r["batch"] for r in doc["stablelm_3b_fake"]] == [1, 2, 4]
    assert [(r["batch"], r["sequence"]) for r in doc["phi_1_5_fake"]] == [
        (1, 1044),
        (2, 1044),
        (4, 1044),
    ]
    assert doc["summary"]["exact"] == doc["summary"]["cases"]


def test_probe_configs_are_litgpts_own_entries() -> None:
    """The probe's "pythia" fields are litgpt/config.py's "stablelm-base-alpha-3b" and
    "pythia-1b" entries but for the sizes (checked when the benchmark ran: only the entry's
    name, hf_config link, unpadded vocab_size and padding_multiple differ)."""
    same = _stored()["summary"]["configs_differ_from_litgpt_entries_in"]
    assert set(same["stablelm-base-alpha-3b"]) <= {"name", "hf_config", "vocab_size"}
    assert set(same["pythia-1b"]) <= {"name", "hf_config", "vocab_size", "padding_multiple"}
    assert set(same["phi-1_5"]) <= {"name", "hf_config", "vocab_size"}
    assert set(same["phi-2"]) <= {"name", "hf_config", "vocab_size"}


def _lora(targets: tuple[str, ...], dropout: float) -> Any:
    from tests.litgpt_probe import Lora

    fl = flags_of(targets, rank=8, dropout=dropout)
    assert isinstance(fl, Flags)
    return Lora(
        dropout=dropout,
        query=fl.query,
        key=fl.key,
        value=fl.value,
        projection=fl.projection,
        mlp=fl.mlp,
        head=fl.head,
    )


LIVE = [
    # arch, k/v heads, precision, mode, batch, sequence, targets, dropout
    ("pythia", 4, "bf16", "none", 1, 200, "q+v", 0.05),  # finetune/lora.py's defaults
    ("pythia", 4, "amp-bf16", "full", 2, 300, "all+head", 0.0),  # casts, recomputation
    ("pythia", 4, "fp32", "none", 2, 16, "o", 0.0),  # the first layer's MLP records nothing
    ("falcon-7b", 1, "fp32", "none", 2, 16, "q+v+mlp", 0.0),  # one norm: one storage
    ("falcon-40b", 2, "bf16", "none", 2, 16, "attention", 0.05),  # two norms, grouped queries
    ("phi-1.5", 4, "amp-bf16", "none", 2, 16, "q+v+mlp", 0.05),  # shared norm, GELU tanh, biases
]


@pytest.mark.parametrize(
    ("arch", "kv", "precision", "mode", "batch", "seq", "targets", "dropout"), LIVE
)
def test_rule_matches_litgpt_lora_live(
    arch: str,
    kv: int,
    precision: str,
    mode: str,
    batch: int,
    seq: int,
    targets: str,
    dropout: float,
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Shape, held_bytes_lora, hf_config

    shape = Shape(arch=arch, layers=2, batch=batch, seq=seq, kv_heads=kv)
    row: dict[str, Any] = {
        "config": hf_config(shape),
        "precision": precision,
        "checkpointing": mode,
        "batch": batch,
        "sequence": seq,
        "targets": targets,
        "dropout": dropout,
    }
    saved = micro_batch_of(spec_of(row, method="lora"), from_config(row["config"]))
    assert saved.modelled, saved.notes
    lora = _lora(TARGETS[targets], dropout)
    assert saved.bytes == held_bytes_lora(precision, mode, shape, lora)


def test_rule_matches_litgpt_qlora_on_pythia_live() -> None:
    """bitsandbytes' own Linear4bit (with Pythia's frozen biases) and StableEmbedding."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Shape, held_bytes_qlora, hf_config

    shape = Shape(arch="pythia", layers=2, batch=2, seq=16, kv_heads=4)
    row: dict[str, Any] = {
        "config": hf_config(shape),
        "precision": "bf16",
        "batch": 2,
        "sequence": 16,
        "targets": "all+head",
        "dropout": 0.05,
        "double_quant": True,
    }
    saved = micro_batch_of(spec_of(row, method="qlora"), from_config(row["config"]))
    assert saved.modelled, saved.notes
    lora = _lora(TARGETS["all+head"], 0.05)
    assert saved.bytes == held_bytes_qlora("bf16", shape, lora, double=True)


def test_pin_old_bitsandbytes_keeps_every_4bit_matmul_input_on_pythia() -> None:
    """Pinning (read from bitsandbytes 0.41.1 MatMul4Bit.forward, `ctx.tensors = (A, B)`: the
    published StableLM rows' release): each parallel-residual layer keeps norm_1's output
    (qkv), the attention output (proj), norm_2's output (fc) and GELU's output (proj); the
    head keeps ln_f's output. With LoRA dropout off lora_A already keeps norm_1's output."""
    cfg = {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
    }

    def saved(bnb: str, dropout: float) -> int:
        spec = make_spec(
            model={"architecture": cfg, "implementation": "litgpt"},
            precision="bf16",
            optimizer={"name": "paged_adamw"},
            training={"micro_batch_size": 2, "sequence_length": 16},
            finetune={"method": "qlora", "dropout": dropout, "bnb_version": bnb},
            hardware={"device": "cpu"},
        )
        out = micro_batch_of(spec, from_config(cfg))
        assert out.modelled, out.notes
        return out.bytes

    tokens, h, inter, bf16 = 2 * 16, 64, 256, 2
    head = tokens * h * bf16
    per_layer = tokens * (h + h + inter) * bf16  # attention output, norm_2, GELU
    assert saved("0.41.1", 0.0) - saved("0.43.2", 0.0) == 2 * per_layer + head
    per_layer += tokens * h * bf16  # with dropout, norm_1's output too
    assert saved("0.41.1", 0.05) - saved("0.43.2", 0.05) == 2 * per_layer + head


def test_litgpt_lora_refuses_what_litgpt_does_not_run_on_gpt_neox() -> None:
    cfg = {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 256,
        "use_parallel_residual": False,
    }
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        finetune={"method": "lora", "rank": 8, "alpha": 16},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert not saved.modelled and "parallel_residual" in saved.notes[0], saved.notes


def test_default_adapters_match_litgpt_adamw_on_pythia() -> None:
    """Independent oracle for the model states of the default spec (no target_modules, as
    the published StableLM rows run it): finetune/lora.py::main on CPU (tests/litgpt_probe.py::
    lora_optimizer_held: litgpt's LoRA GPT with lora_query + lora_value, AdamW over every
    parameter, two real steps). memplan counts peft's adapter on GPT-NeoX's fused
    query_key_value ([r, h] + [3h, r]); LitGPT's LoRAQKVLinear on q and v is [2r, h] +
    [2h, r]: the same elements with as many k/v heads as heads, so exp_avg and exp_avg_sq
    are the same bytes."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from memplan.report.estimate import estimate
    from tests.litgpt_probe import Lora, Shape, hf_config, lora_optimizer_held

    shape = Shape(arch="pythia", layers=2, kv_heads=4)
    real = lora_optimizer_held("bf16", shape, Lora())
    assert all("lora_" in n for n in real.trainable)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 2, "sequence_length": 16},
        finetune={"method": "lora", "rank": 8, "alpha": 16},
        hardware={"device": "cpu"},
    )
    mine = {t.name: t.bytes for t in estimate(spec, from_config(cfg)).per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key] == real.by_key[key][1]
