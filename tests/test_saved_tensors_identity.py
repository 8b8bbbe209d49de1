"""verify's saved-tensor harness (memplan.verify.measure.SavedTensors) against a parameter whose
data a module moves inside a layer.

bitsandbytes 0.50.2 nn/modules.py::Linear4bit.forward casts a bias of another dtype than its
input's for good (`bias.data = bias.data.to(x.dtype)`: the q/k/v biases that
prepare_model_for_kbit_training made fp32, under bf16). The harness took the model's storages
at the layer's entry, so until the layer's exit the bias's old address still counted as a
parameter: a storage saved there later in the layer was left out of the activations. The
real allocator reuses the freed block only by chance (one first forward of the tiny
Qwen2-MoE under bf16 QLoRA: a 128 B rstd, 485,300 B measured by a harness that took the
storages before the forward, 485,428 B saved); here the old storage is held and saved, which
sits at that address every time. The oracle is benchmarks/lora_moe.py::_saved_storages, the
benchmark's per-save measurement (the model's storages taken again at every save).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memplan.verify import build, measure

bnb = pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parent.parent
IN_FEATURES = OUT_FEATURES = 32
BIAS_BYTES = OUT_FEATURES * 4
"""The fp32 bias's storage (32 elements of 4 bytes): what the old harness left out."""


class Block(nn.Module):
    """A 4-bit Linear (real bitsandbytes, nf4) whose output is scaled by a tensor sharing the
    bias's storage as it was built: after Linear4bit has cast its bias, the product saves the
    old fp32 storage, no parameter's any more."""

    def __init__(self, bias_dtype: torch.dtype) -> None:
        super().__init__()
        lin = bnb.nn.Linear4bit(
            IN_FEATURES, OUT_FEATURES, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"
        )
        self.lin = lin.to("cpu")  # Params4bit quantizes on the move
        self.lin.bias = nn.Parameter(self.lin.bias.data.to(bias_dtype), requires_grad=False)
        self.scale = self.lin.bias.data  # a plain attribute: not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale  # type: ignore[no-any-return]


def _model(bias_dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleList([Block(bias_dtype), Block(bias_dtype)]))


def _forward(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 4, IN_FEATURES, dtype=torch.bfloat16, requires_grad=True)
    for block in model[0]:
        x = block(x).to(torch.bfloat16)
    return x.float().sum()


def _verify_harness(model: nn.Module) -> measure.SavedTensors:
    record = measure.SavedTensors()
    with measure.saved_tensors(record, model, model[0]):
        loss = _forward(model)  # held: the record counts what the graph holds at its end
    del loss
    return record


def _benchmark_harness(model: nn.Module) -> Any:
    from benchmarks.lora_moe import _saved_storages

    with _saved_storages(model) as got:
        _forward(model)
    return got


def test_a_cast_bias_s_old_storage_is_an_activation() -> None:
    """Each block's Linear4bit casts its fp32 bias to bf16 in the recorded forward; the old
    storage the product saves is counted, in its layer, as the benchmark counts it (before:
    2 x 128 B low, left out as a parameter)."""
    recorded = _verify_harness(_model(torch.float32))
    oracle = _benchmark_harness(_model(torch.float32))
    assert recorded.bytes == oracle.bytes
    old_biases = [s for s in oracle.storages.values() if s.shape == (OUT_FEATURES,)]
    assert [(s.nbytes, s.dtype) for s in old_biases] == [(BIAS_BYTES, "fp32")] * 2
    assert recorded.layer_bytes == recorded.bytes  # every save is inside a block


def test_a_bias_still_held_is_a_parameter() -> None:
    """The same blocks with bf16 biases (nothing cast): the product saves the live bias's
    storage, a model state, left out by both harnesses."""
    recorded = _verify_harness(_model(torch.bfloat16))
    oracle = _benchmark_harness(_model(torch.bfloat16))
    assert recorded.bytes == oracle.bytes
    assert oracle.parameter_saves == 2
    assert not [s for s in oracle.storages.values() if s.shape == (OUT_FEATURES,)]


@pytest.mark.slow
def test_qwen2_moe_qlora_first_forward_equals_the_per_save_measurement() -> None:
    """The real case: the tiny Qwen2-MoE under bf16 QLoRA (q/k/v biases fp32 after
    prepare_model_for_kbit_training), its first forward recorded, so every Linear4bit casts
    its bias inside the recorded layers: verify's harness saves the benchmark's stored
    per-save measurement (benchmarks/results/lora-param-wrapper.json qwen2_moe_qlora, which
    memplan predicts to the byte: tests/test_lora_param_wrapper.py)."""
    from benchmarks.lora_moe import _forward as benchmark_forward
    from benchmarks.lora_moe import _model as benchmark_model
    from benchmarks.lora_param_wrapper import qwen2_moe_qlora_doc

    stored = json.loads((ROOT / "benchmarks/results/lora-param-wrapper.json").read_text())
    doc = qwen2_moe_qlora_doc("bf16")
    model, spec = benchmark_model(doc)
    layers = build.decoder_layers(model, doc["model"]["architecture"]["num_hidden_layers"])
    assert layers is not None
    record = measure.SavedTensors()
    benchmark_forward(model, spec, measure.saved_tensors(record, model, layers))
    assert record.bytes == stored["qwen2_moe_qlora"]["bf16"] == 485428
