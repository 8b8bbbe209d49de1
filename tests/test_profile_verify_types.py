"""The profile matrix's last unverified transformers types (benchmarks/profile_verify.py):
qwen3_5_text and qwen3_next (gated-delta-net linear attention: a config and a sequence the
trace's chunked sizes take), deepseek_v32 (MLA + the DSA indexer: a tiny config that builds),
and persimmon under CPU autocast (the q/k LayerNorms' statistics: memplan.verify.trace.cpu).

Oracles, outside the code under test:
- real CPU torch: the tensors autograd saves for layer_norm / group_norm on real bf16 inputs
  with fp32 weights, against the fake kernels the trace runs;
- `memplan verify` on CPU (run_case): the real model's saved storages
  (memplan/verify/measure.py) against the profile traced now under FakeTensorMode; for
  deepseek_v32's gradients, the real model's `.grad`s after its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.profile_verify import BATCH, TYPES, batch_of, run_case, spec  # noqa: E402
from memplan.verify.trace import cpu  # noqa: E402

F = torch.nn.functional

NORMS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "layer_norm": lambda x, w, b: F.layer_norm(x, (8,), w, b),
    "layer_norm_weight_only": lambda x, w, b: F.layer_norm(x, (8,), w, None),
    "layer_norm_no_affine": lambda x, w, b: F.layer_norm(x, (8,)),
    "group_norm": lambda x, w, b: F.group_norm(x.view(4, 8, 1), 2, w, b),
}


def _saved(
    norm: Callable[[Any, Any, Any], Any], x_dtype: Any, w_dtype: Any, fake: bool
) -> list[tuple[Any, tuple[int, ...]]]:
    """(dtype, shape) of each tensor autograd saves for `norm` on CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    out: list[tuple[Any, tuple[int, ...]]] = []

    def pack(t: Any) -> Any:
        out.append((t.dtype, tuple(t.shape)))
        return t

    mode: Any = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        x = torch.randn(4, 8, dtype=x_dtype, requires_grad=True)
        w = torch.randn(8, dtype=w_dtype, requires_grad=True)
        b = torch.randn(8, dtype=w_dtype, requires_grad=True)
        with (
            cpu.CpuKernels() if fake else contextlib.nullcontext(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            norm(x, w, b)
    return out


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "bfloat16"), ("float32",) * 2],
)
def test_cpu_norm_statistics_are_the_real_kernels(name: str, x_dtype: str, w_dtype: str) -> None:
    """The fake kernels under memplan.verify.trace.cpu save what real CPU tensors save (mixed
    dtypes: fp32 mean and rstd; one dtype: the input's), and the fake kernels alone do not where
    the dtypes are mixed (what the module corrects)."""
    xd, wd = getattr(torch, x_dtype), getattr(torch, w_dtype)
    real = _saved(NORMS[name], xd, wd, fake=False)
    assert _saved(NORMS[name], xd, wd, fake=True) == real
    affine = name != "layer_norm_no_affine"
    if affine and xd != wd:
        assert real[-2:] == [(torch.float32, real[-1][1])] * 2  # the statistics
        from torch._subclasses.fake_tensor import FakeTensorMode

        plain: list[Any] = []
        with FakeTensorMode():
            x = torch.randn(4, 8, dtype=xd, requires_grad=True)
            w = torch.randn(8, dtype=wd, requires_grad=True)
            b = torch.randn(8, dtype=wd, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: plain.append(t.dtype) or t, lambda t: t
            ):
                NORMS[name](x, w, b)
        assert plain[-1] == xd  # torch/_refs::native_layer_norm's CPU branch (torch 2.13)


def test_each_type_runs_at_its_batch() -> None:
    """Pins behaviour: the chunked-loop types run at 2 x 128 tokens (whole chunks, a multiple
    of the trace's 128-token unit), every other type at BATCH; the spec carries it."""
    assert batch_of("qwen3_5_text") == batch_of("qwen3_next") == (2, 128)
    assert batch_of("persimmon") == batch_of("deepseek_v32") == BATCH == (2, 32)
    setting = {"precision": "bf16", "attention": "sdpa", "checkpointing": "none"}
    training = spec(TYPES["qwen3_next"], setting)["training"]
    assert (training["micro_batch_size"], training["sequence_length"]) == (2, 128)
    assert spec(TYPES["qwen3_next"], setting, (3, 256))["training"]["sequence_length"] == 256


def _exact(model_type: str, precision: str, attention: str, checkpointing: str) -> dict[str, Any]:
    setting = {"precision": precision, "attention": attention, "checkpointing": checkpointing}
    row = run_case(TYPES[model_type], setting)
    assert row.get("error") is None, row
    assert row["activations_source"] == "profile", row["notes"]
    assert row["activations_predicted"] == row["activations_measured"], row
    return row


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "checkpointing"), [("sdpa", "none"), ("eager", "selective")])
def test_persimmon_autocast_is_exact(attention: str, checkpointing: str) -> None:
    """amp-bf16 (CPU autocast): the q/k LayerNorms' fp32 statistics are in the profile (before:
    4,096 B short of verify's 646,660 B with sdpa, ratio 0.9937)."""
    row = _exact("persimmon", "amp-bf16", attention, checkpointing)
    assert row["ok"], row["failures"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "precision", "checkpointing"),
    [("qwen3_5_text", "amp-bf16", "selective"), ("qwen3_next", "bf16", "none")],
)
def test_gated_delta_net_types_are_compared(
    model_type: str, precision: str, checkpointing: str
) -> None:
    """At 2 x 128 tokens with positions for the trace's 640-token check, the matrix compares
    the profile with the real tensors (before: no profile, "max_position_embeddings 256 is
    below the traced sizes"); selective recomputation has the full-attention layer's core."""
    row = _exact(model_type, precision, "sdpa", checkpointing)
    assert not any("extrapolated" in n for n in row["notes"]), row["notes"]
    assert row["ok"], row["failures"]


@pytest.mark.slow
def test_deepseek_v32_activations_exact_and_the_indexer_gets_no_gradient() -> None:
    """The tiny DeepSeek-V3.2 builds and runs (before: `view(-1, 8, 0)`, its default 8 expert
    groups of 4 experts); its profile, the DSA indexer's top-16 mask included, equals the real
    saved storages. transformers 5.25 runs DeepseekV32Indexer.forward under @torch.no_grad, so
    wq_b, wk, k_norm and weights_proj get no `.grad` from the loss and no AdamW state: the
    inventory marks them (TensorSpec.gradient, memplan.verify.trace.gradients) and the
    gradients and AdamW states equal the real run's (before: over by the indexer's 7,808 B
    in each of gradients, exp_avg and exp_avg_sq, and 40 B of `step`)."""
    import transformers

    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify

    setting = {"precision": "bf16", "attention": "sdpa", "checkpointing": "none"}
    doc = to_json(verify(validate(spec(TYPES["deepseek_v32"], setting)), Options(), _quiet))
    cats = doc["categories"]
    assert doc["setup"]["activations_source"] == "profile", doc["notes"]
    assert cats["activations"]["predicted"] == cats["activations"]["measured"], cats
    kwargs = {k: v for k, v in TYPES["deepseek_v32"].items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model("deepseek_v32", **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    assert len(indexer) == 5 * cfg.num_hidden_layers
    for name in ("parameters", "gradients", "exp_avg", "exp_avg_sq", "step"):
        assert cats[name]["predicted"] == cats[name]["measured"], (name, cats[name])
    assert doc["ok"], doc["failures"]


def _quiet(_r: Any, _w: Any) -> None:
    return None
