"""QLoRA and paged optimizers against bitsandbytes itself. Marked `gpu`: bitsandbytes'
4-bit weights and paged state need CUDA, so these skip cleanly without a CUDA device (or
without bitsandbytes and peft installed).

Tolerances: tensor shapes, dtypes and bytes exactly; the dequantization transient as a lower
bound of the allocator's peak increase (the matmul's own output comes on top).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan import optimizers
from memplan.config.load import validate
from memplan.model.finetune import lora as finetune
from memplan.model.finetune import qlora
from memplan.model.sources import from_config
from memplan.optimizers import OptimizerConfig
from tests.conftest import TINY_LLAMA

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Wide enough that every projection has >= 1e5 elements, and 64 | numel everywhere.
CONFIG: dict[str, Any] = {**TINY_LLAMA, "hidden_size": 512, "intermediate_size": 1024}


def bnb() -> Any:
    return pytest.importorskip("bitsandbytes")


def quantized_model(tmp_path: Path, *, double: bool) -> Any:
    """A random tiny Llama saved and reloaded in 4-bit NF4, as a QLoRA run loads it."""
    bnb()
    kwargs = {k: v for k, v in CONFIG.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model("llama", **kwargs)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(
        tmp_path
    )
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )


@pytest.mark.parametrize("double", [True, False], ids=["double-quant", "single"])
def test_4bit_weights_and_quant_state_match_bitsandbytes(tmp_path: Path, double: bool) -> None:
    model = quantized_model(tmp_path, double=double)
    spec = validate(
        {
            "model": {"architecture": CONFIG},
            "precision": "bf16",
            "finetune": {"method": "qlora", "double_quant": double, "prepare_kbit": False},
            "parallelism": {"engine": "ddp"},
        }
    ).spec
    inv = qlora.quantize_4bit(from_config(CONFIG), spec.finetune, compute="bf16")
    predicted = {t.name: (t.shape, t.dtype) for t in inv.parameters if t.dtype == "uint8"}
    real = {
        n: (tuple(p.shape), "uint8") for n, p in model.named_parameters() if p.dtype == torch.uint8
    }
    assert predicted == real
    states = {b.name: (b.shape, b.dtype) for b in inv.buffers if b.role == "quant_state"}
    dtypes = {torch.float32: "fp32", torch.uint8: "uint8"}
    for name, p in model.named_parameters():
        if p.dtype != torch.uint8:
            continue
        qs = p.quant_state
        got = {
            "absmax": qs.absmax,
            "quant_map": qs.code,
        }
        if double:
            got |= {
                "nested_absmax": qs.state2.absmax,
                "nested_quant_map": qs.state2.code,
                "nested_offset": qs.offset,
            }
        for leaf, tensor in got.items():
            assert states[f"{name}.{leaf}"] == (tuple(tensor.shape), dtypes[tensor.dtype])
        assert len([k for k in states if k.startswith(name + ".")]) == len(got)


def test_qlora_parameter_list_matches_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = quantized_model(tmp_path, double=True)
    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    spec = validate(
        {
            "model": {"architecture": CONFIG},
            "precision": "bf16",
            "finetune": {"method": "qlora", "rank": 8, "alpha": 16, "target_modules": "all-linear"},
            "parallelism": {"engine": "ddp"},
        }
    ).spec
    inv = finetune.apply(spec, from_config(CONFIG))
    real = {
        n: (tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad)
        for n, p in model.named_parameters()
    }
    names = {"fp32": "float32", "bf16": "bfloat16", "uint8": "uint8"}
    mine = {t.name: (t.shape, names[t.dtype or "bf16"], t.trainable) for t in inv.parameters}
    assert mine == real


def test_dequantized_weight_is_a_transient_of_the_backward(tmp_path: Path) -> None:
    b = bnb()
    layer = b.nn.Linear4bit(
        4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
    ).cuda()
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y.sum().backward()
    torch.cuda.synchronize()
    bump = torch.cuda.max_memory_allocated() - before
    assert bump >= qlora.dequantized_weight_bytes(4096 * 4096, compute="bf16", double=True)


def test_paged_state_lives_in_unified_memory() -> None:
    b = bnb()
    big = torch.nn.Parameter(torch.randn(400, 500, device="cuda"))  # 2e5 >= 1e5
    small = torch.nn.Parameter(torch.randn(100, 500, device="cuda"))  # 5e4 < 1e5
    opt = b.optim.PagedAdamW8bit([big, small])
    (big.sum() + small.sum()).backward()
    opt.step()
    config = OptimizerConfig(name="paged_adamw8bit")
    for p in (big, small):
        for name in ("state1", "state2"):
            paged = getattr(opt.state[p][name], "is_paged", False)
            assert paged == optimizers.is_paged_state(config, name, p.numel(), device="cuda")
