"""QLoRA under FSDP (issue 19), and the 4-bit heads transformers cannot train.

benchmarks/qlora_fsdp_probe.py ran the tiny Llama as HF's FSDP-QLoRA recipe builds it on two
CPU gloo ranks (results/qlora-fsdp-probe.json): FSDP2 trains with the packed weights stored
in bf16 or uint8, with or without prepare_model_for_kbit_training; FSDP1 refuses to flatten
them with peft's fp32 adapters. benchmarks/qlora_verify.py then measured FSDP2 with and
without prepare_model_for_kbit_training tensor by tensor (tests/test_qlora_verify.py):
memplan models both, and refuses FSDP1 with what the probe found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.finetune import lora, qlora
from memplan.model.inventory import TensorSpec
from memplan.model.load import load_inventory
from memplan.report.estimate import estimate
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parent.parent
PROBE: dict[str, Any] = json.loads(
    (ROOT / "benchmarks" / "results" / "qlora-fsdp-probe.json").read_text()
)


def doc(engine: str = "fsdp2", **ft: Any) -> dict[str, Any]:
    return {
        "model": {"architecture": TINY_LLAMA},
        "precision": "bf16",
        "optimizer": {"name": "adamw"},
        "training": {"micro_batch_size": 2, "sequence_length": 16},
        "parallelism": {"engine": engine, "data": 2},
        "hardware": {"device": "cpu"},
        "finetune": {"method": "qlora", "target_modules": "all-linear", **ft},
    }


def run(d: dict[str, Any]) -> Any:
    loaded = validate(d)
    return estimate(loaded.spec, load_inventory(loaded))


def probed(name: str) -> list[dict[str, Any]]:
    ranks: list[dict[str, Any]] = next(s["ranks"] for s in PROBE["settings"] if s["name"] == name)
    return ranks


def test_the_probe_ran_the_versions_the_rules_cite() -> None:
    assert PROBE["versions"]["torch"].startswith("2.13")
    assert PROBE["versions"]["bitsandbytes"].startswith("0.50")
    assert not PROBE["dirty"]


@pytest.mark.parametrize(
    "name",
    [
        "FSDP2, quant_storage bf16",
        "FSDP2, quant_storage uint8",
        "FSDP2, quant_storage bf16, prepare_model_for_kbit_training",
    ],
)
def test_fsdp2_trains_qlora_on_cpu(name: str) -> None:
    """Both ranks ran two steps, each holding half the rows of the packed weight."""
    for rank in probed(name):
        assert rank["runs"], rank
        assert rank["packed_weight"].endswith(", local (512, 1)" if "bf16" in name else "")


def test_fsdp2_without_prepare_kbit_is_modelled() -> None:
    """HF's recipe: the packed weights in bf16, each rank holding its dim-0 shard of them."""
    loaded = validate(doc(prepare_kbit=False, quant_storage="bf16"))
    inventory = lora.apply(loaded.spec, load_inventory(loaded))
    packed = [t for t in inventory.parameters if qlora.is_packed(t)]
    assert {t.dtype for t in packed} == {"bf16"}
    # q_proj: 64 x 64 values, 4 per bf16 element -> 1,024 rows (the probe's DTensor shape)
    q = next(t for t in packed if t.name.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    assert q.shape == (1024, 1)
    probe = probed("FSDP2, quant_storage bf16")[0]["packed_weight"]
    assert probe.startswith("DTensor (1024, 1) torch.bfloat16")


def test_fsdp2_with_prepare_kbit_is_modelled() -> None:
    """prepare_model_for_kbit_training's fp32 root (embedding, final norm, head) is gathered
    in fp32 under a bf16 recipe (memplan.states.engines.fsdp2.buffers.OWN_DTYPE): the peak
    measured by memplan verify (tests/test_qlora_verify.py) was refused as 35% above
    memplan's while every FSDP2 buffer was sized at the recipe's width."""
    report = run(doc(quant_storage="bf16"))
    assert report.timeline.peak_bytes > 0


def test_fsdp1_is_refused_with_the_error_torch_raised() -> None:
    """The refusal quotes FSDP1's own error, as the probe recorded it."""
    (rank, *_) = probed("FSDP1 (use_orig_params), quant_storage bf16")
    assert not rank["runs"]
    with pytest.raises(MemplanError) as e:
        run(doc("fsdp1", prepare_kbit=False, quant_storage="bf16"))
    assert rank["error"].removeprefix("ValueError: ") in str(e.value)


@pytest.mark.parametrize("storage", ["uint8", "bf16", "fp16", "fp32"])
def test_packed_weight_is_bitsandbytes_own(storage: str) -> None:
    """bnb_4bit_quant_storage: the shape and dtype bitsandbytes' quantize_4bit gives a weight
    of an odd number of values (the oracle is bitsandbytes, run on the CPU)."""
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    names = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = names.get(storage, torch.float32)
    weight = torch.randn(67, 64, dtype=torch.bfloat16)
    packed, _ = functional.quantize_4bit(weight, quant_type="nf4", quant_storage=dtype)
    ours = qlora.packed_weight(TensorSpec("w", (67, 64)), storage)
    assert ours.shape == tuple(packed.shape)
    assert ours.dtype == storage
    assert qlora.is_packed(ours)


def test_a_tied_head_left_to_quantize_is_refused() -> None:
    tied = {**TINY_LLAMA, "tie_word_embeddings": True}
    d = {**doc("ddp", skip_modules=[]), "model": {"architecture": tied}}
    d["parallelism"] = {"engine": "ddp", "data": 1}
    with pytest.raises(MemplanError, match="fix_4bit_weight_quant_state_from_module") as e:
        run(d)
    assert e.value.field == "finetune.skip_modules"
    d["finetune"]["skip_modules"] = ["lm_head"]
    assert run(d).timeline.peak_bytes > 0


@pytest.mark.slow
def test_transformers_cannot_train_a_tied_4bit_head() -> None:
    """The oracle of the refusal above: transformers + bitsandbytes fail at the first forward."""
    pytest.importorskip("bitsandbytes")
    import tempfile

    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    config.tie_word_embeddings = True
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=[],
        )
        model = LlamaForCausalLM.from_pretrained(
            folder, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu"
        )
    ids = torch.randint(0, 1041, (1, 8))
    with pytest.raises(AssertionError):
        model(input_ids=ids, labels=ids)
