"""The fake-tensor model build and run (memplan.verify.trace.forward / gradients) on the model
types whose trace used to fail: initializers that read data, `.to(dtype)` on fake parameters,
image-text configs, a value read from the input ids, fp32 grouped GEMMs.

Oracles: transformers' own build on the meta device (names, shapes, dtypes), the same model
built on CPU with real tensors and stepped once (which parameters get a `.grad`), and torch's
CPU kernels on real tensors (values, grouped GEMM outputs). The configs are the verify sweep's
tiny ones (benchmarks/sweep_configs.py::shrink).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.sweep_configs import shrink  # noqa: E402
from memplan.verify.trace import forward, meta, moe  # noqa: E402
from memplan.verify.trace.values import Values  # noqa: E402


def _fake_layout(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], Any]]:
    model, _ = forward.build_fake(
        copy.deepcopy(config), stream="bf16", attention="sdpa", checkpointing="none"
    )
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]


@pytest.mark.parametrize(
    ("model_type", "what"),
    [
        pytest.param(
            "deepseek_v4",
            "DeepseekV4RMSNorm(...).to(dtype=torch.float32) in __init__",
            marks=pytest.mark.slow,  # about 20 s on 2 cores
        ),
        ("inkling_text", "a Conv1d(...).to(dtype=torch.float32) in __init__"),
        ("modernbert-decoder", "trunc_normal_ initialization"),
    ],
)
def test_the_fake_build_is_the_meta_build(model_type: str, what: str) -> None:
    """The fake build (`forward.building`: no initialization, swappable fake parameters) has
    the parameters, shapes and dtypes transformers' meta-device build has (`what` failed it)."""
    config = shrink(model_type)
    real = meta.build_model(copy.deepcopy(config))
    # the meta build is in fp16 (meta.BUILD_DTYPE): a tensor left in it follows the recipe,
    # bf16 in the fake build here (build_fake traces MoE experts in bf16 only)
    follows = {torch.float16: torch.bfloat16}
    expected = [
        (n, tuple(p.shape), follows.get(p.dtype, p.dtype)) for n, p in real.named_parameters()
    ]
    assert _fake_layout(config) == expected, what
    if model_type == "deepseek_v4":
        assert any(d == torch.float32 for _, _, d in expected)  # the fp32 norms kept


def _real_no_grad(config: dict[str, Any]) -> tuple[set[str], list[str]]:
    """(the parameters whose `.grad` is None after one forward + loss + backward on real CPU
    tensors, every parameter name), for the class the inventory builds."""
    cls, cfg = meta._model_class(copy.deepcopy(config), origin="t")
    torch.manual_seed(0)
    model = cls._from_config(cfg, dtype=torch.float32)
    model.train()
    vocab = int(forward.text_config(model.config).vocab_size)
    ids = torch.randint(3, vocab, (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    return no_grad, [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize(
    "model_type",
    [
        "gemma3",  # Gemma3ForConditionalGeneration: its SigLIP tower, fed no image
        "got_ocr2",  # GotOcr2ForConditionalGeneration: its vision tower
        "xlm",  # reads `lengths.max().item()` of its input ids
        "xlnet",  # fp32 weights in a bf16 build: derived in fp32; mask_emb, seg_embed unused
        # fp32 norms built with .to(); its compressor's indexer (about 25 s on 2 cores)
        pytest.param("deepseek_v4", marks=pytest.mark.slow),
    ],
)
def test_the_inventory_marks_what_a_real_backward_leaves_without_grad(model_type: str) -> None:
    config = shrink(model_type)
    no_grad, names = _real_no_grad(config)
    inventory = meta.inventory_from_config(copy.deepcopy(config))
    assert [t.name for t in inventory.parameters] == names
    assert {t.name for t in inventory.parameters if not t.gradient} == no_grad
    assert not any("was not derived" in note for note in inventory.notes)


def test_values_read_from_the_ids_are_the_real_ones() -> None:
    """XLM's check (modeling_xlm.py::XLMModel.forward) on the trace's ids, against the same ops
    on the real ids; a value made from anything else stays unknown."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    real = torch.tensor([[5, 2, 2, 7], [1, 1, 2, 9]])
    expected = (real != 2).sum(dim=1).long().tolist()
    values = Values()
    with FakeTensorMode(), values:
        ids = values.seed(torch.tensor([[5, 2, 2, 7], [1, 1, 2, 9]]), real)
        lengths = (ids != 2).sum(dim=1).long()
        assert lengths.max().item() == max(expected)
        assert lengths.tolist() == expected
        weights = torch.randn(4)
        with pytest.raises(DataDependentOutputException):
            weights.sum().item()
        mixed = ids.clone()
        view = mixed[0]
        mixed.add_(weights.long())  # written by an op with an unknown input: unknown, views too
        with pytest.raises(DataDependentOutputException):
            view.sum().item()


def test_fp32_grouped_mm_under_fake_tensors_is_the_cpu_kernels() -> None:
    """HunYuan-MoE's experts in fp32: the fake output (moe.CpuGroupedMm) against torch's CPU
    kernel on real fp32 tensors, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run() -> tuple[Any, ...]:
        a = torch.ones(12, 16, requires_grad=True)
        b = torch.ones(3, 16, 8, requires_grad=True)
        offs = torch.tensor([4, 8, 12], dtype=torch.int32)
        out = torch.nn.functional.grouped_mm(a, b, offs=offs)
        out.backward(torch.ones(12, 8))  # a dense gradient: the CPU kernel refuses stride 0
        assert a.grad is not None and b.grad is not None
        return tuple((t.shape, t.dtype) for t in (out, a.grad, b.grad))

    expected = run()
    assert expected[0] == (torch.Size([12, 8]), torch.float32)
    with FakeTensorMode(), moe.CpuGroupedMm():
        assert run() == expected


def test_position_limit_reads_no_limit_as_zero() -> None:
    """Pins behaviour: XLNet's -1 (its config's property: no sequence limit) and a config with
    no key are no limit; a text config's own limit is read through an image-text config."""
    assert forward.position_limit(transformers.XLNetConfig()) == 0
    assert forward.position_limit(transformers.MambaConfig()) == 0
    assert forward.position_limit(transformers.LlamaConfig(max_position_embeddings=64)) == 64
    fuyu = transformers.FuyuConfig()
    assert forward.text_config(fuyu) is fuyu.text_config
    gpt2 = transformers.GPT2Config()
    assert forward.text_config(gpt2) is gpt2
