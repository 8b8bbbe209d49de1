"""LitGPT's QLoRA (`model.implementation: litgpt`, `finetune.method: qlora`: litgpt 0.5.9
finetune/lora.py `--quantize bnb.nf4[-dq]`), memplan.model.stacks.litgpt_lora's `Quant`.

Lightning's own path cannot run here: its 4-bit layer quantizes on CUDA only (lightning 2.6
fabric/plugins/precision/bitsandbytes.py::_Linear4bit.quantize raises "Unexpected device
type: cpu"; `test_lightning_quantizes_on_cuda_only` records the error). The oracles are:
- Lightning's own `BitsandbytesPrecision.convert_module` on litgpt's LoRA GPT (built on the
  meta device: no quantization) for which Linears become 4-bit;
- bitsandbytes' own `quantize_4bit` and `Linear4bit` on CPU (`pip install bitsandbytes`,
  0.50.2 here; skipped without it) for the packed weights, the quantization state and what
  MatMul4Bit keeps;
- litgpt's LoRA GPT run on CPU with every Linear made a bitsandbytes Linear4bit as
  Lightning's convert_module picks them (quantized by bitsandbytes on CPU, from fp16 as
  Lightning does) and the embedding swapped for StableEmbedding as finetune/lora.py::main
  does: its saved tensors to the byte;
- LitGPT's published rows (benchmarks/published_others.py: Llama 2 7B, bnb.nf4 and
  bnb.nf4-dq, micro-batch 1, max allocated 14.14 and 13.84 GB), run with bitsandbytes 0.41.1,
  whose MatMul4Bit keeps its input (`finetune.bnb_version`; read, not run: the rule is a
  pinning test).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.finetune import FinetuneSpec, bnb_keeps_input
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.finetune import qlora
from memplan.model.inventory import TensorSpec
from memplan.model.sources import from_config
from memplan.model.stacks import litgpt_qlora
from memplan.precision import dtype_bytes
from memplan.report.estimate import estimate
from tests.conftest import make_spec, micro_batch_of
from tests.test_litgpt_activations import tiny

GB = 10**9


def qlora_spec(
    *,
    precision: str = "bf16",
    batch: int = 2,
    seq: int = 16,
    layers: int = 2,
    double: bool = False,
    device: str = "cpu",
    **finetune_keys: Any,
) -> Any:
    return make_spec(
        model={"architecture": tiny(layers), "implementation": "litgpt"},
        precision=precision,
        training={"micro_batch_size": batch, "sequence_length": seq},
        finetune={
            "method": "qlora",
            "rank": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "quant_type": "nf4",
            "double_quant": double,
            **finetune_keys,
        },
        optimizer={"name": "paged_adamw"},
        hardware={"device": device},
    )


def test_lightning_quantizes_on_cuda_only() -> None:
    """Why the rule is proved from source and bitsandbytes' own CPU code, not Lightning's run."""
    pytest.importorskip("bitsandbytes")
    torch = pytest.importorskip("torch")
    from lightning.fabric.plugins import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("nf4", torch.bfloat16)
    layer = plugin._linear_cls(64, 32, bias=False, device="meta")
    with pytest.raises(RuntimeError, match="Unexpected device type: cpu"):
        layer.quantize(layer.weight, torch.ones(32, 64), torch.device("cpu"))


@pytest.mark.parametrize("double", [False, True])
def test_quantized_base_matches_lightning_and_bitsandbytes(double: bool) -> None:
    """Independent oracle: the Linears Lightning's own convert_module replaces in litgpt's LoRA
    GPT (every one, lm_head included), each quantized by bitsandbytes' own quantize_4bit on CPU
    from fp16 (as _Linear4bit.quantize does): the packed weights' and the absmax (and nested
    absmax) bytes equal memplan's inventory's. memplan names the fused qkv as q, k and v
    (transformers' names): it lists two more weights per layer, each with its own 16-entry
    code and, with double quantization, a 256-entry nested code and an offset (counted here)."""
    pytest.importorskip("bitsandbytes")
    torch = pytest.importorskip("torch")
    pytest.importorskip("litgpt.lora")
    import bitsandbytes.functional as F

    from tests.litgpt_probe import Lora, Shape, lightning_4bit_modules

    shape = Shape(layers=2)
    modules = lightning_4bit_modules(Lora(), shape)
    assert "lm_head.linear" in modules and "transformer.h.0.attn.qkv.linear" in modules
    real: dict[str, int] = {"packed": 0, "absmax": 0, "nested_absmax": 0, "code": 0}
    for out_f, in_f in modules.values():
        packed, state = F.quantize_4bit(
            torch.ones(out_f, in_f, dtype=torch.half),
            blocksize=64,
            compress_statistics=double,
            quant_type="nf4",
        )
        real["packed"] += packed.nbytes
        each = {k: t for k, t in state.as_dict(packed=False).items() if torch.is_tensor(t)}
        if double:  # as_dict writes the 0-dim tensor QuantState holds as a float
            each["nested_offset"] = state.offset
        for key, t in each.items():
            group = key if key in ("absmax", "nested_absmax") else "code"
            real[group] += t.nbytes
        # Each weight's state, tensor by tensor, as memplan.model.finetune.qlora sizes it.
        weight = TensorSpec("w", (out_f, in_f))
        mine = {t.name[2:]: (t.shape, t.dtype) for t in qlora.quant_state(weight, double=double)}
        dtypes = {torch.float32: "fp32", torch.uint8: "uint8"}
        assert mine == {k: (tuple(t.shape), dtypes[t.dtype]) for k, t in each.items()}
    spec = qlora_spec(double=double)
    inv = finetune.apply(spec, from_config(tiny()))
    packed = [t for t in inv.parameters if t.dtype == "uint8"]
    states = [t for t in inv.buffers if t.role == "quant_state"]

    def nbytes(ts: Any) -> int:
        return sum(t.numel * dtype_bytes(t.dtype) for t in ts)

    leaf = lambda t: t.name.rsplit(".", 1)[-1]  # noqa: E731
    assert nbytes(packed) == real["packed"]
    assert sum(t.numel for t in packed) * 2 == sum(o * i for o, i in modules.values())
    assert nbytes(t for t in states if leaf(t) == "absmax") == real["absmax"]
    # Two more weights per layer in memplan's names (q, k, v for LitGPT's fused qkv), each
    # with its own codes and a nested absmax rounded up on its own (equal totals where every
    # weight's blocks are a multiple of 256, as at Llama 2 7B's shapes).
    assert len(packed) == len(modules) + 2 * shape.layers
    per_weight = real["code"] // len(modules)
    code = nbytes(t for t in states if leaf(t) not in ("absmax", "nested_absmax"))
    assert code == per_weight * len(packed)
    # No peft prepare_model_for_kbit_training: the norms stay in the plugin's dtype.
    assert all(t.dtype is None for t in inv.parameters if t.role == "norm")


def test_stable_embedding_matches_bitsandbytes() -> None:
    """Independent oracle: bitsandbytes' StableEmbedding, built after mark_only_lora_as_trainable
    as finetune/lora.py::main builds it, has the embedding's weight and a LayerNorm's weight and
    bias, all requiring grad; memplan's inventory makes the embedding trainable and adds
    those two."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import StableEmbedding

    cfg = tiny()
    emb = StableEmbedding(cfg["vocab_size"], cfg["hidden_size"])
    real = {n: (tuple(p.shape), p.requires_grad) for n, p in emb.named_parameters()}
    inv = finetune.apply(qlora_spec(), from_config(cfg))
    table = next(t for t in inv.parameters if t.role == "embedding")
    mine = {
        t.name.removeprefix(table.name.removesuffix("weight")): (t.shape, t.trainable)
        for t in inv.parameters
        if t.name.startswith(table.name.removesuffix("weight"))
    }
    assert mine == real


def test_optimizer_state_matches_litgpt_paged_adamw_on_cpu() -> None:
    """Independent oracle: finetune/lora.py::main's order run on CPU (tests/litgpt_probe.py::
    qlora_optimizer_held: setup_module, litgpt's own instantiate_bnb_optimizer -> bitsandbytes'
    PagedAdamW over model.parameters(), the StableEmbedding swap, two real steps with
    zero_grad). Only the LoRA tensors get state; the StableEmbedding's weight and LayerNorm
    require grad but have none, and their gradients outlive zero_grad; the replaced embedding
    weight stays in the optimizer's param_groups. memplan's state bytes, kept gradients (the
    step's start: alive before any backward) and held replaced weight equal them."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, qlora_optimizer_held

    real = qlora_optimizer_held("bf16", Shape(layers=2), Lora(), double=False)
    stable = {"transformer.wte.weight", "transformer.wte.norm.weight", "transformer.wte.norm.bias"}
    assert all("lora_" in n for n in real.with_state)
    assert set(real.trainable) - set(real.with_state) == stable == set(real.kept_grads)

    spec = qlora_spec()
    report = estimate(spec, from_config(tiny()))
    inv = finetune.apply(spec, from_config(tiny()))
    assert report.per_gpu.bytes_of("optimizer_states") == real.state_bytes
    assert not report.per_gpu.host_terms
    start = dict(report.timeline.points[0].by_category)
    assert report.timeline.points[0].phase == "start"
    assert start["gradients"] == sum(real.kept_grads.values())
    unstepped = [t for t in inv.parameters if t.trainable and not t.stepped]
    assert len(unstepped) == len(stable)
    replaced = [t for t in inv.parameters if t.name.startswith(litgpt_qlora.REPLACED_PREFIX)]
    assert len(replaced) == 1 and not replaced[0].trainable
    assert replaced[0].numel * dtype_bytes("bf16") == real.outside_model


def test_pin_published_rows_have_no_paged_state() -> None:
    """Pinning (bitsandbytes 0.50 optim/optimizer.py::Optimizer8bit.get_state_buffer pages a
    state of >= 1e5 elements; memplan.optimizers.is_paged_state): at Llama 2 7B's shapes the
    only stepped tensors are LoRA's ([8, 4096] and [4096, 8]: 32,768 elements), so PagedAdamW
    pages nothing and the host table is empty; the StableEmbedding (131,072,000 elements,
    1,048,576,000 B of paged state before this rule) has no state at all."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import published_others

    from memplan.config.load import validate
    from memplan.model.load import load_inventory

    doc = published_others.litgpt(1, "bnb.nf4")
    doc["finetune"]["stable_embedding"] = True  # litgpt 0.5.9's swap (the rows set false)
    loaded = validate(doc)
    report = estimate(loaded.spec, load_inventory(loaded))
    assert report.host_bytes == 0
    assert report.per_gpu.bytes_of("optimizer_states") == 4_194_304 * 2 * 4  # LoRA's r x (in + out)


def test_litgpt_qlora_refuses_deepspeed() -> None:
    """litgpt 0.5.9 finetune/lora.py::setup: one device runs Fabric's strategy "auto"."""
    spec = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        parallelism={"engine": "deepspeed", "zero_stage": 0},
        finetune={"method": "qlora"},
        optimizer={"name": "paged_adamw"},
    )
    with pytest.raises(MemplanError, match="Fabric's default strategy") as err:
        finetune.apply(spec, from_config(tiny()))
    assert err.value.field == "parallelism.engine"


@pytest.mark.parametrize(
    ("batch", "seq", "dropout", "double"), [(2, 16, 0.0, False), (1, 200, 0.05, True)]
)
def test_rule_matches_litgpt_qlora_on_cpu_to_the_byte(
    batch: int, seq: int, dropout: float, double: bool
) -> None:
    """Independent oracle: litgpt's real LoRA GPT with bitsandbytes' own 4-bit linears and
    StableEmbedding (tests/litgpt_probe.py::held_bytes_qlora) holds exactly what memplan's
    rule says (the installed bitsandbytes, >= 0.43.2, keeps no matmul input)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_qlora

    spec = qlora_spec(batch=batch, seq=seq, double=double, dropout=dropout)
    saved = micro_batch_of(spec, from_config(tiny()))
    assert saved.modelled, saved.notes
    shape = Shape(layers=2, batch=batch, seq=seq)
    assert saved.bytes == held_bytes_qlora("bf16", shape, Lora(dropout=dropout), double=double)


def test_installed_bitsandbytes_keeps_no_matmul_input() -> None:
    """Independent oracle for `bnb_keeps_input` False (memplan's default release): the
    installed bitsandbytes' MatMul4Bit keeps `(None, B)` and packs nothing for backward."""
    bnb = pytest.importorskip("bitsandbytes")
    torch = pytest.importorskip("torch")
    from memplan.config.finetune import BNB_KEEPS_INPUT_BEFORE, bnb_release

    installed = bnb_release(bnb.__version__.split("+")[0])
    assert installed is not None and installed >= BNB_KEEPS_INPUT_BEFORE
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, device="meta")
    lin.weight = bnb.nn.Params4bit(torch.ones(32, 64, dtype=torch.half), requires_grad=False)
    lin = lin.to("cpu")
    x = torch.ones(3, 64, dtype=torch.bfloat16, requires_grad=True)
    packed: list[Any] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = lin(x)
    assert packed == [] and y.grad_fn.tensors[0] is None
    ft = FinetuneSpec(method="qlora", bnb_version=bnb.__version__.split("+")[0])
    assert not bnb_keeps_input(ft)


def test_pin_old_bitsandbytes_keeps_every_4bit_matmul_input() -> None:
    """Pinning (read from bitsandbytes 0.41.1 autograd/_functions.py::MatMul4Bit.forward:
    `ctx.tensors = (A, B)`, fixed by commit 9e75374 / PR #1270, first in 0.43.2): each layer
    keeps norm_1's output (qkv), the attention output (proj), norm_2's output (fc_1 and fc_2,
    one tensor) and the MLP product (proj); the head keeps ln_f's output. With LoRA dropout off
    lora_A already keeps norm_1's output (the same tensor): nothing more for qkv."""
    tokens, h, inter = 2 * 16, 64, 192
    new = micro_batch_of(qlora_spec(), from_config(tiny()))
    old = micro_batch_of(qlora_spec(bnb_version="0.43.1"), from_config(tiny()))
    per_layer = tokens * (h + h + inter) * 2  # bf16
    assert old.bytes - new.bytes == 2 * per_layer + tokens * h * 2
    new = micro_batch_of(qlora_spec(dropout=0.05), from_config(tiny()))
    old = micro_batch_of(qlora_spec(bnb_version="0.43.1", dropout=0.05), from_config(tiny()))
    per_layer = tokens * (h + h + h + inter) * 2  # with dropout, norm_1's output too
    assert old.bytes - new.bytes == 2 * per_layer + tokens * h * 2
    assert bnb_keeps_input(FinetuneSpec(method="qlora", bnb_version="0.41.1"))
    assert not bnb_keeps_input(FinetuneSpec(method="qlora", bnb_version="0.43.2"))


def test_pin_lightning_dequantizes_through_fp16() -> None:
    """Pinning (lightning 2.6 _Linear4bit.quantize quantizes `weight.to(torch.half)`, so
    QuantState.dtype is fp16 and MatMul4Bit's `dequantize_4bit(B, state).to(bf16)` holds both
    copies): the largest 4-bit weight, LitGPT's lm_head, at 2 + 2 B per element."""
    spec = qlora_spec(device="cuda")
    report = estimate(spec, from_config(tiny()))
    term = next(t for t in report.timeline.transients if t.name == "qlora_dequantized_weight")
    assert term.bytes == 256 * 64 * (2 + 2)
    assert qlora.dequantized_weight_bytes(10, compute="bf16", double=True) == 10 * 2 + 4


@pytest.mark.parametrize(
    ("finetune_keys", "precision", "why"),
    [
        ({"skip_modules": ["lm_head"]}, "bf16", "no ignore_modules"),
        ({}, "amp-bf16", "Quantization and mixed precision is not supported"),
    ],
)
def test_litgpt_qlora_refuses_what_litgpt_does_not_run(
    finetune_keys: dict[str, Any], precision: str, why: str
) -> None:
    spec = qlora_spec(precision=precision, **finetune_keys)
    saved = micro_batch_of(spec, from_config(tiny()))
    assert not saved.modelled and why in saved.notes[0]


def test_litgpt_qlora_refuses_recomputation_and_more_than_one_device() -> None:
    """litgpt 0.5.9 finetune/lora.py::setup (read): --quantize raises NotImplementedError on
    more than one device, and LitGPT recomputes only under the FSDPStrategy it builds for
    more than one."""
    spec = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        training={"activation_checkpointing": "full"},
        finetune={"method": "qlora"},
    )
    saved = micro_batch_of(spec, from_config(tiny()))
    assert not saved.modelled and "activation_checkpointing none" in saved.notes[0]
    two = make_spec(
        model={"architecture": tiny(), "implementation": "litgpt"},
        parallelism={"data": 2},
        finetune={"method": "qlora"},
    )
    with pytest.raises(MemplanError, match="not supported for multi-GPU") as err:
        finetune.apply(two, from_config(tiny()))
    assert err.value.field == "parallelism"


def test_old_bitsandbytes_is_refused_under_transformers() -> None:
    spec = make_spec(
        model={"architecture": tiny()},
        finetune={"method": "qlora", "bnb_version": "0.41.1"},
    )
    saved = micro_batch_of(spec, from_config(tiny()))
    assert not saved.modelled and "litgpt only" in saved.notes[0]


def test_bnb_version_is_a_quoted_version() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="as a string"):
        FinetuneSpec(method="qlora", bnb_version=0.41)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not a version"):
        FinetuneSpec(method="qlora", bnb_version="latest")
    with pytest.raises(ValidationError, match="qlora only"):
        FinetuneSpec(method="lora", bnb_version="0.41.1")


@pytest.mark.parametrize(
    ("size", "quantize", "published_gb"),
    [
        ("7b", "bnb.nf4", 14.14),
        ("7b", "bnb.nf4-dq", 13.84),
        ("13b", "bnb.nf4", 23.14),
        ("stablelm-3b", "bnb.nf4", 6.35),
        ("stablelm-3b", "bnb.nf4-dq", 6.19),
        ("phi-1.5", "bnb.nf4", 3.78),
        ("phi-1.5", "bnb.nf4-dq", 3.72),
    ],
)
def test_published_litgpt_qlora_rows(size: str, quantize: str, published_gb: float) -> None:
    """Independent oracle: LitGPT's published max allocated (tutorials/resource-tables.md,
    Oct 2023; benchmarks/reference/litgpt-lora-a100.md): within the target, +10% / -5%. The
    rows ran lit-gpt 8641822, before the StableEmbedding swap (finetune.stable_embedding
    false); with litgpt 0.5.9's swap StableLM and phi-1.5 were +14.2% / +14.6% and +10.5% /
    +10.6%."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import published_others

    from memplan.config.load import validate
    from memplan.model.load import load_inventory

    loaded = validate(published_others.litgpt(1, quantize, size=size))
    assert loaded.spec.finetune.stable_embedding is False
    report = estimate(loaded.spec, load_inventory(loaded))
    assert report.activations.modelled
    error = report.peak_bytes / (published_gb * GB) - 1
    assert -0.05 <= error <= 0.10, error
    assert litgpt_qlora.SRC_KEEPS_A in {
        s.source for b in report.activations.blocks for s in b.tensors
    }


# finetune.stable_embedding false: litgpt <= 0.4.13 (and lit-gpt 2023) ran no StableEmbedding
# swap (litgpt PR #1770, commit ae798aba, first tagged v0.5.0). The oracle is the same real
# run without the swap statements (tests/litgpt_probe.py, stable_embedding=False).


@pytest.mark.parametrize(
    ("batch", "seq", "dropout", "double"), [(2, 16, 0.0, False), (1, 200, 0.05, True)]
)
def test_no_swap_matches_litgpt_qlora_on_cpu_to_the_byte(
    batch: int, seq: int, dropout: float, double: bool
) -> None:
    """Independent oracle: litgpt's real LoRA GPT with bitsandbytes' own 4-bit linears and the
    frozen embedding (no StableEmbedding swap, as litgpt v0.4.13's main) holds exactly what
    memplan's rule says with finetune.stable_embedding false, and less than with the swap."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_qlora

    spec = qlora_spec(batch=batch, seq=seq, double=double, dropout=dropout, stable_embedding=False)
    saved = micro_batch_of(spec, from_config(tiny()))
    assert saved.modelled, saved.notes
    shape = Shape(layers=2, batch=batch, seq=seq)
    real = held_bytes_qlora(
        "bf16", shape, Lora(dropout=dropout), double=double, stable_embedding=False
    )
    assert saved.bytes == real
    swapped = micro_batch_of(
        qlora_spec(batch=batch, seq=seq, double=double, dropout=dropout), from_config(tiny())
    )
    assert saved.bytes < swapped.bytes


def test_no_swap_matches_litgpt_qlora_on_pythia() -> None:
    """Independent oracle, the parallel-residual Block (the published StableLM, phi-1.5 and
    Falcon rows' shape): Pythia with its frozen biases, no swap, to the byte."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, held_bytes_qlora, hf_config

    shape = Shape(arch="pythia", layers=2, batch=2, seq=16, kv_heads=4)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 2, "sequence_length": 16},
        finetune={
            "method": "qlora",
            "rank": 8,
            "alpha": 16,
            "dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"],
            "quant_type": "nf4",
            "double_quant": True,
            "stable_embedding": False,
        },
        optimizer={"name": "paged_adamw"},
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert saved.modelled, saved.notes
    real = held_bytes_qlora("bf16", shape, Lora(dropout=0.05), double=True, stable_embedding=False)
    assert saved.bytes == real


def test_no_swap_optimizer_matches_litgpt_paged_adamw_on_cpu() -> None:
    """Independent oracle: main's order without the swap (litgpt v0.4.13), two real steps of
    bitsandbytes' PagedAdamW: only the LoRA tensors train and get state, no gradient outlives
    zero_grad, the optimizer holds nothing outside the model; memplan with
    stable_embedding false has the same state bytes, no kept gradient, no unstepped or
    replaced tensor, and 2 x 131,072 B (the embedding table and a LayerNorm pair's worth) less
    in parameters than with the swap."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.lora")
    from tests.litgpt_probe import Lora, Shape, qlora_optimizer_held

    real = qlora_optimizer_held(
        "bf16", Shape(layers=2), Lora(), double=False, stable_embedding=False
    )
    assert set(real.trainable) == set(real.with_state)
    assert all("lora_" in n for n in real.trainable)
    assert not real.kept_grads and real.outside_model == 0

    spec = qlora_spec(stable_embedding=False)
    report = estimate(spec, from_config(tiny()))
    inv = finetune.apply(spec, from_config(tiny()))
    assert report.per_gpu.bytes_of("optimizer_states") == real.state_bytes
    start = dict(report.timeline.points[0].by_category)
    assert start["gradients"] == sum(real.kept_grads.values()) == 0
    assert sum(t.trainable for t in inv.parameters) == len(real.trainable)
    assert not [t for t in inv.parameters if t.trainable and not t.stepped]
    assert not [t for t in inv.parameters if t.name.startswith(litgpt_qlora.REPLACED_PREFIX)]
    embedding = next(t for t in inv.parameters if t.role == "embedding")
    assert not embedding.trainable


def test_stable_embedding_default_is_litgpt_059s_swap() -> None:
    """Pinning: unset is the swap (litgpt 0.5.9), the same inventory and saves as true."""
    inv = from_config(tiny())
    default = finetune.apply(qlora_spec(), inv)
    swapped = finetune.apply(qlora_spec(stable_embedding=True), inv)
    assert (default.parameters, default.notes) == (swapped.parameters, swapped.notes)
    assert any(t.name.startswith(litgpt_qlora.REPLACED_PREFIX) for t in default.parameters)
    saved = micro_batch_of(qlora_spec(), inv)
    assert saved == micro_batch_of(qlora_spec(stable_embedding=True), inv)


def test_stable_embedding_is_refused_where_it_means_nothing() -> None:
    """Not qlora, or not model.implementation litgpt: one message naming the field."""
    from pydantic import ValidationError

    from memplan.config.load import validate

    with pytest.raises(ValidationError, match="stable_embedding apply to method: qlora only"):
        FinetuneSpec(method="lora", stable_embedding=False)
    with pytest.raises(ValidationError, match="stable_embedding"):
        FinetuneSpec(method="full", stable_embedding=True)
    with pytest.raises(MemplanError, match="finetune.stable_embedding is LitGPT's"):
        validate(
            {
                "model": {"preset": "llama-2-7b"},
                "finetune": {"method": "qlora", "stable_embedding": False},
            }
        )
