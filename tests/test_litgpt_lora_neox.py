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
    parameter, two real steps). memplan gives GPT-NeoX's fused query_key_value LitGPT's
    LoRAQKVLinear on q and v, [2r, h] + [2h, r] (litgpt_lora_adapters.fused_adapters);
    with as many k/v heads as heads peft's [r, h] + [3h, r] has as many elements, so this
    test passed before that too: test_falcon_7b_default_spec_matches_litgpt_step is the one
    where the shapes tell."""
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


FALCON_40B: dict[str, Any] = {
    "model_type": "falcon",
    "hidden_size": 8192,
    "num_attention_heads": 128,
    "num_kv_heads": 8,
    "num_hidden_layers": 60,
    "vocab_size": 65024,
    "new_decoder_architecture": True,
    "parallel_attn": True,
    "bias": False,
}
"""tiiuae/falcon-40b config.json's sizes (n_head 128, n_head_kv 8, n_layer 60, in
transformers' FalconConfig names); litgpt 0.5.9 config.py's "falcon-40b" entry has the same
(n_embd 8192, n_head 128, n_query_groups 8, n_layer 60)."""


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_falcon_40b_default_targets_train_the_published_count(method: str) -> None:
    """finetune/lora.py's default (lora_query, lora_value) on Falcon 40B trains 12,042,240
    parameters: LitGPT's resource table (tutorials/resource-tables.md, "Finetuning with LoRA
    on 1 GPU", Falcon 40B rows). LitGPT's LoRAQKVLinear: [2r, h] + [(128 + 8) x 64, r] per
    layer; peft's adapter on the fused query_key_value ([r, h] + [(128 + 2 x 8) x 64, r])
    would give 8,355,840."""
    from memplan.model.finetune.lora import apply, num_trainable

    spec = make_spec(
        model={"architecture": FALCON_40B, "implementation": "litgpt"},
        precision="bf16",
        optimizer={"name": "paged_adamw" if method == "qlora" else "adamw"},
        finetune={"method": method, "rank": 8, "alpha": 16, "dropout": 0.05},
    )
    params = apply(spec, from_config(FALCON_40B)).parameters
    assert num_trainable(t for t in params if "lora_" in t.name) == 12_042_240


def test_litgpt_lora_on_fused_qkv_refuses_a_regex() -> None:
    """Under litgpt the model states read LitGPT's flags, as the activations do."""
    from memplan.errors import MemplanError
    from memplan.model.finetune.lora import apply

    spec = make_spec(
        model={"architecture": FALCON_40B, "implementation": "litgpt"},
        finetune={"method": "lora", "rank": 8, "alpha": 16, "target_modules": ".*qkv"},
    )
    with pytest.raises(MemplanError, match="LitGPT's LoRA is set by flags"):
        apply(spec, from_config(FALCON_40B))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "kv"),
    [
        ("falcon-7b", 1),
        ("falcon-40b", 2),
        ("pythia", 4),
        ("phi-1.5", 4),  # dense, fc1, fc2: peft's o_proj / MLP names match nothing
        ("phi-3", 4),  # qkv_proj, gate_up_proj fused
        ("phi-4-mini", 2),  # qkv_proj with grouped queries
        ("llama", 2),
    ],
)
def test_lora_trainable_tensors_match_litgpt(arch: str, kv: int) -> None:
    """memplan's trainable LoRA tensors against litgpt 0.5.9's own `litgpt.lora.GPT` after
    mark_only_lora_as_trainable, built on the meta device, for the default targets (none
    given) and every target set of TARGETS: the same elements and the same shapes, also
    where the checkpoint has separate q/k/v (peft's one adapter per module, LitGPT's one
    LoRAQKVLinear) or Phi-3's gate_up_proj (litgpt_lora_adapters.fused_adapters; every
    model type: tests/test_litgpt_lora_inventory.py)."""
    pytest.importorskip("litgpt.lora")
    import torch
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    from memplan.model.finetune.lora import apply
    from tests.litgpt_probe import Lora, Shape, hf_config, lora_config

    shape = Shape(arch=arch, layers=2, kv_heads=kv)
    cfg = hf_config(shape)
    for name, targets in [("default", None), *TARGETS.items()]:
        extra = {} if targets is None else {"target_modules": list(targets)}
        spec = make_spec(
            model={"architecture": cfg, "implementation": "litgpt"},
            finetune={"method": "lora", "rank": 8, "alpha": 16, **extra},
        )
        mine = [t for t in apply(spec, from_config(cfg)).parameters if t.trainable]
        lora = Lora() if targets is None else _lora(targets, 0.0)
        with torch.device("meta"):
            model = GPT(lora_config(shape, lora))
        mark_only_lora_as_trainable(model)
        real = [p for p in model.parameters() if p.requires_grad]
        assert sum(t.numel for t in mine) == sum(p.numel() for p in real), name
        assert sorted(t.shape for t in mine) == sorted(tuple(p.shape) for p in real), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "kv", "targets"),
    [
        ("phi-1.5", 4, "q+v+mlp"),
        ("phi-1.5", 4, "o"),
        ("phi-4-mini", 2, None),
        ("phi-3", 4, "q+v+mlp"),
    ],
)
def test_lora_optimizer_states_match_litgpt_adamw(arch: str, kv: int, targets: str | None) -> None:
    """AdamW's exp_avg / exp_avg_sq after two real steps of litgpt's LoRA GPT on CPU
    (tests/litgpt_probe.py::lora_optimizer_held) against memplan's estimate: Phi's MLP and
    projection adapters (fc1, fc2, dense), Phi-4-mini's grouped-query LoRAQKVLinear, Phi-3's
    fc_1 / fc_2 adapters."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from memplan.report.estimate import estimate
    from tests.litgpt_probe import Lora, Shape, hf_config, lora_optimizer_held

    shape = Shape(arch=arch, layers=2, kv_heads=kv)
    cfg = hf_config(shape)
    extra = {} if targets is None else {"target_modules": list(TARGETS[targets])}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": shape.batch, "sequence_length": shape.seq},
        finetune={"method": "lora", "rank": 8, "alpha": 16, **extra},
        hardware={"device": "cpu"},
    )
    lora = Lora() if targets is None else _lora(TARGETS[targets], 0.0)
    real = lora_optimizer_held("bf16", shape, lora)
    mine = {t.name: t.bytes for t in estimate(spec, from_config(cfg)).per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key] == real.by_key[key][1], key


@pytest.mark.slow
def test_falcon_7b_default_spec_matches_litgpt_step() -> None:
    """Falcon-7B's default LoRA spec (no target_modules: finetune/lora.py's lora_query +
    lora_value, dropout 0.05) against litgpt's own run on CPU: what the forward saves
    (tests/litgpt_probe.py::held_bytes_lora) and AdamW's states after two real steps
    (lora_optimizer_held): multi-query, so peft's fused-adapter shape would differ."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from memplan.report.estimate import estimate
    from tests.litgpt_probe import Lora, Shape, held_bytes_lora, hf_config, lora_optimizer_held

    shape = Shape(arch="falcon-7b", layers=2, batch=2, seq=16, kv_heads=1)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 2, "sequence_length": 16},
        finetune={"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.05},
        hardware={"device": "cpu"},
    )
    lora = Lora(dropout=0.05)
    saved = micro_batch_of(spec, from_config(cfg))
    assert saved.modelled, saved.notes
    assert saved.bytes == held_bytes_lora("bf16", "none", shape, lora)
    real = lora_optimizer_held("bf16", shape, lora)
    mine = {t.name: t.bytes for t in estimate(spec, from_config(cfg)).per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key] == real.by_key[key][1]
