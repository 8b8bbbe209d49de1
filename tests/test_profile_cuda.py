"""device=cuda profiles traced on a CPU build (memplan.verify.trace.cuda): issue 18, H4.

- The emulated ops against torch's own definitions (independent oracle): under the emulation,
  the autograd node each op makes is the one torch generates from derivatives.yaml for the CUDA
  op (`ScaledDotProductFlashAttentionBackward0`, ...), and what it saves (its `_saved_*`
  fields) has the shapes the meta registrations (torch/_meta_registrations.py) and the CUDA
  kernels give; outside the emulation the CPU ops are back.
- Rule vs trace on CUDA (`test_pin_cuda_rule_equals_emulated_trace`): for a representative
  subset of the ruled families, the emulated trace's bytes per block equal the hand rule's
  CUDA branch (Setting device=cuda), non-autocast recipes, dropout off and on. Both sides are
  read from the same CUDA kernels and neither is measured on a GPU here (no GPU in CI): this
  proves the trace and the rule agree, not that CUDA does. The full matrix (every ruled family,
  eager/sdpa x fp32/bf16 x dropout off/on) is benchmarks/cuda_profiles.py, its result
  benchmarks/results/cuda-profiles.json.
- The CLI builds and uses a CUDA profile, autocast recipes included.
- `test_gpu_profile_equals_real_cuda_run` (marked gpu, skipped without CUDA) compares a CUDA
  profile with the storages a real CUDA forward saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memplan.activations import predict  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Activations, Setting  # noqa: E402
from memplan.verify.trace import cuda, forward  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.test_activations import inventory  # noqa: E402
from tests.test_activations_families import CARRIED, NO_SDPA, with_dropout  # noqa: E402
from tests.test_profile import MOE, PRECISIONS, ROBERTA, RULED  # noqa: E402

F = torch.nn.functional
BATCH, SEQ = 2, 64
"""A multiple of 32, as CUDA profiles are traced (memplan.verify.trace.cuda.SEQUENCE_MULTIPLE)."""


def _fake(b: int, a: int, s: int, d: int, dtype: Any = torch.bfloat16) -> Any:
    """A [b, a, s, d] tensor laid out [b, s, a, d] (a transposed projection, as transformers
    passes q, k, v), requiring grad."""
    return torch.empty(b, s, a, d, dtype=dtype).transpose(1, 2).requires_grad_()


def _emulated() -> tuple[FakeTensorMode, cuda.Emulation]:
    return FakeTensorMode(), cuda.Emulation(stream="bf16")


def test_flash_attention_saves_what_its_cuda_node_saves() -> None:
    """bf16, head_dim 16, grouped heads, no mask: flash (memplan's rule), run as
    `_scaled_dot_product_flash_attention`; its node keeps q, k, v unrepeated, the output,
    logsumexp [b, a, s] fp32 and the philox state: rng_state [2] and an unused [] uint64
    (derivatives.yaml; flash_api.cpp::mha_fwd, meta__scaled_dot_product_flash_attention)."""
    mode, em = _emulated()
    with mode, cuda.cuda_kernels(em):
        q, k, v = _fake(2, 4, 40, 16), _fake(2, 2, 40, 16), _fake(2, 2, 40, 16)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    node = out.grad_fn
    assert em.kernels == ["flash"]
    assert node.name() == "ScaledDotProductFlashAttentionBackward0"
    assert tuple(node._saved_key.shape) == (2, 2, 40, 16)
    assert node._saved_logsumexp.dtype == torch.float32
    assert tuple(node._saved_logsumexp.shape) == (2, 4, 40)
    assert (node._saved_rng_state.dtype, tuple(node._saved_rng_state.shape)) == (
        torch.uint64,
        (2,),
    )
    assert (node._saved_unused.dtype, tuple(node._saved_unused.shape)) == (torch.uint64, ())
    # The output is laid out like q ([b, s, a, d]): transformers' transpose(1, 2).contiguous()
    # is a view, o_proj keeps this storage.
    assert out.transpose(1, 2).is_contiguous()


def test_efficient_attention_saves_what_its_cuda_node_saves() -> None:
    """fp32, one k/v head per query head, dropout on: the memory-efficient kernel; logsumexp
    padded to a multiple of 32, the additive mask kept, seed and offset host tensors
    (_efficient_attention_forward), so the tracer drops them."""
    mode, em = _emulated()
    with mode, cuda.cuda_kernels(em):
        q, k, v = (_fake(2, 4, 36, 16, dtype=torch.float32) for _ in range(3))
        mask = torch.ones(2, 1, 36, 36, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)
    node = out.grad_fn
    assert em.kernels == ["efficient"]
    assert node.name() == "ScaledDotProductEfficientAttentionBackward0"
    assert tuple(node._saved_log_sumexp.shape) == (2, 4, math.ceil(36 / 32) * 32)
    bias = node._saved_attn_bias
    assert bias.dtype == torch.float32  # convert_boolean_attn_mask: where(mask, 0, -inf)
    assert tuple(bias.shape) == (2, 4, 36, 36)  # preprocess_mask's expand
    assert bias.untyped_storage().nbytes() == 2 * 36 * 40 * 4  # pad_bias: rows of 36 -> 40
    seeds = {node._saved_philox_seed.untyped_storage()._cdata}
    seeds.add(node._saved_philox_offset.untyped_storage()._cdata)
    assert seeds == em.host_storages()


def test_dropout_and_layer_norm_run_as_on_cuda_and_come_back() -> None:
    """dropout -> native_dropout's bool mask; layer_norm's mean/rstd in fp32 for a bf16 input;
    the math SDPA's own dropout (C++ at::dropout) takes the fused path too. Outside the
    emulation, the CPU ops are back (noise tensor, bf16 stats)."""
    mode, em = _emulated()
    with mode:
        x = torch.empty(6, 48, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(48, dtype=torch.bfloat16, requires_grad=True)
        with cuda.cuda_kernels(em):
            dropped = F.dropout(x, 0.1, True)
            normed = F.layer_norm(x, (48,), w, w)
            q = _fake(2, 4, 40, 16, dtype=torch.float32)
            k = _fake(2, 2, 40, 16, dtype=torch.float32)
            math_out = F.scaled_dot_product_attention(q, k, k, dropout_p=0.1, enable_gqa=True)
        cpu_dropped = F.dropout(x, 0.1, True)
        cpu_normed = F.layer_norm(x, (48,), w, w)
    assert dropped.grad_fn.name() == "NativeDropoutBackward0"
    assert dropped.grad_fn._saved_result1.dtype == torch.bool
    assert normed.grad_fn._saved_result1.dtype == torch.float32
    assert normed.grad_fn._saved_result2.dtype == torch.float32
    assert em.kernels == ["math"]  # fp32 with grouped heads: neither fused kernel
    nodes: dict[int, Any] = {}
    stack = [math_out.grad_fn]
    while stack:
        n = stack.pop()
        if n is not None and id(n) not in nodes:
            nodes[id(n)] = n
            stack.extend(f for f, _ in n.next_functions)
    assert "NativeDropoutBackward0" in {n.name() for n in nodes.values()}
    assert cpu_dropped.grad_fn.name() == "MulBackward0"
    assert cpu_normed.grad_fn._saved_result1.dtype == torch.bfloat16


def _rule(config: dict[str, Any], st: Setting) -> Activations:
    inv = inventory(config)
    assert inv.architecture is not None
    extra = {**inv.architecture.extra, **{k: config[k] for k in CARRIED if k in config}}
    arch = dataclasses.replace(inv.architecture, extra=extra)
    return predict(dataclasses.replace(inv, architecture=arch), st)


def _blocks(saved: Activations) -> dict[str, int]:
    out = {"embeddings": 0, "layers": 0, "head+loss": 0}
    for block in saved.blocks:
        name = "head+loss" if block.name in ("head", "loss") else block.name
        out["layers" if name.startswith("layers") else name] += block.bytes
    return out


def cuda_config(family: str, dropout: bool) -> dict[str, Any]:
    """RULED's tiny config with dropout off or on and room for the traced sequences
    (5 x 32 tokens; the rules do not read max_position_embeddings)."""
    config = with_dropout(RULED[family], dropout)
    for key in ("max_position_embeddings", "n_positions"):
        if key in config:
            config[key] = max(int(config[key]), 256)
    return config


def compare(family: str, attention: str, precision: str, dropout: bool) -> dict[str, Any]:
    """The rule's CUDA bytes per block and the emulated trace's, at BATCH x SEQ (the benchmark
    and the tests share it)."""
    config = cuda_config(family, dropout)
    stream, matmul, cast = PRECISIONS[precision]
    st = Setting(
        batch=BATCH,
        sequence=SEQ,
        stream=stream,
        matmul=matmul,
        autocast=cast,
        device="cuda",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="none",
        transformers=transformers.__version__.rsplit(".", 1)[0],
    )
    rule = _rule(config, st)
    kernel = "eager" if family in NO_SDPA else attention
    doc = tracer.build(
        config, stream=stream, matmul=matmul, autocast=cast, attention=kernel, device="cuda"
    )
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    got = traced.activations(st, num_layers=2)
    return {
        "rule": _blocks(rule) if rule.modelled else None,
        "trace": _blocks(got),
        "key": traced.key,
    }


SUBSET = [
    # flash (bf16, grouped heads: enable_gqa), dropout: the flash kernel's own
    ("llama", "sdpa", "bf16", True),
    # math (fp32 with grouped heads), its dropout through C++ at::dropout
    ("llama", "sdpa", "fp32", True),
    # memory-efficient (fp32, one k/v head per head), logsumexp padded to 32
    ("gpt2", "sdpa", "fp32", False),
    # eager with dropout: native_dropout's bool masks in attention and residuals; LayerNorm's
    # fp32 statistics in a bf16 model
    ("gpt2", "eager", "bf16", True),
    # flash with a contiguous q (GPT-NeoX's cat): the output laid out like q, copied
    ("gpt_neox", "sdpa", "bf16", False),
    # a MoE family (bf16 only: the grouped_mm meta kernel)
    ("qwen3_moe", "sdpa", "bf16", False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "attention", "precision", "dropout"),
    SUBSET,
    ids=["-".join([f, a, p, "dropout" if d else "nodropout"]) for f, a, p, d in SUBSET],
)
def test_pin_cuda_rule_equals_emulated_trace(
    family: str, attention: str, precision: str, dropout: bool
) -> None:
    """The CUDA branch of the family's rule = the emulated CUDA trace, block by block.
    A pinning test: both read the same CUDA kernels (cited in memplan/model/forward/ and
    memplan/verify/trace/cuda.py) and no GPU measured either here."""
    assert family in MOE or precision in ("fp32", "bf16")
    got = compare(family, attention, precision, dropout)
    assert got["key"].device == "cuda"
    assert got["rule"] == got["trace"]


def test_cuda_profile_key() -> None:
    doc = tracer.build(
        cuda_config("gpt2", False),
        stream="bf16",
        matmul="bf16",
        autocast=False,
        attention="sdpa",
        device="cuda",
    )
    traced = profile.from_document(doc, origin="test")
    assert traced.key.file_stem().endswith("-sdpa-cuda-none")
    assert doc["fit"]["min_sequence"] == cuda.SEQUENCE_MULTIPLE
    assert any("CUDA kernels emulated" in a for a in doc["assumptions"])
    st = Setting(
        batch=2,
        sequence=64,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cuda",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
    )
    assert traced.key.serves(st) and not traced.key.serves(dataclasses.replace(st, device="cpu"))
    # autocast recipes are traced too (memplan.verify.trace.autocast, tests/test_autocast_trace.py)


def test_cli_builds_and_uses_a_cuda_profile(tmp_path: Path, monkeypatch: Any) -> None:
    """A spec on the default device (cuda) without a rule: `memplan profile` traces the CUDA
    profile, estimate reports activations.source profile; amp-bf16 gets its own (CUDA autocast
    emulated)."""
    from typer.testing import CliRunner

    from memplan.cli.app import app

    config = {**ROBERTA, "max_position_embeddings": 256}
    (tmp_path / "roberta.json").write_text(json.dumps(config))
    spec = tmp_path / "spec.yaml"
    body = (
        "model:\n  hf_config: roberta.json\nprecision: {p}\noptimizer:\n  name: adamw\n"
        "training:\n  micro_batch_size: 2\n  sequence_length: 64\n  attention: sdpa\n"
        "parallelism:\n  engine: ddp\n  data: 1\nhardware:\n  gpu: H100-80GB\n"
    )
    spec.write_text(body.format(p="bf16"))
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(spec)])
    assert result.exit_code == 0, result.output
    stored = list((tmp_path / "cache" / "profiles").glob("*-cuda-none.json"))
    assert len(stored) == 1
    after = json.loads(runner.invoke(app, ["estimate", str(spec), "--json"]).stdout)
    assert after["activations"]["source"] == "profile"
    assert after["activations"]["bytes"] > 0
    # amp-bf16: CUDA autocast emulated (memplan.verify.trace.autocast), its own profile
    spec.write_text(body.format(p="amp-bf16"))
    result = runner.invoke(app, ["profile", str(spec)])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache" / "profiles").glob("*-cuda-none.json"))) == 2
    amp = json.loads(runner.invoke(app, ["estimate", str(spec), "--json"]).stdout)
    assert amp["activations"]["source"] == "profile"
    assert 0 < amp["activations"]["bytes"] != after["activations"]["bytes"]


def _measure_cuda(model: Any, batch: int, sequence: int) -> int:
    """Bytes of the CUDA storages a real forward + loss saves (host tensors, the efficient
    kernel's seed and offset, left out), each storage once, parameters excluded."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if t.device.type == "cuda" and storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, sequence), device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids.clone(), use_cache=False)
    return sum(seen.values())


GPU_CASES = [
    ("llama", "sdpa", "bf16", True),
    ("llama", "sdpa", "fp32", False),
    ("gpt2", "sdpa", "fp32", True),
    ("gpt_neox", "sdpa", "bf16", False),
    ("bert", "eager", "bf16", True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("family", "attention", "precision", "dropout"),
    GPU_CASES,
    ids=["-".join([f, a, p, "dropout" if d else "nodropout"]) for f, a, p, d in GPU_CASES],
)
def test_gpu_profile_equals_real_cuda_run(
    family: str, attention: str, precision: str, dropout: bool
) -> None:
    """The emulated CUDA profile = the CUDA storages a real forward saves (independent oracle:
    the CUDA kernels themselves), at a size the fit never saw."""
    config = cuda_config(family, dropout)
    stream, matmul, cast = PRECISIONS[precision]
    doc = tracer.build(
        config, stream=stream, matmul=matmul, autocast=cast, attention=attention, device="cuda"
    )
    st = Setting(
        batch=3,
        sequence=96,
        stream=stream,
        matmul=matmul,
        autocast=cast,
        device="cuda",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="none",
    )
    predicted = profile.from_document(doc, origin="test").activations(st, num_layers=2).bytes
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    model = forward.head_constructor(config)(
        cfg, dtype=forward.DTYPES[stream], attn_implementation=attention
    )
    model.to("cuda").train()
    assert _measure_cuda(model, 3, 96) == predicted


def test_mla_value_head_smaller_than_the_query_takes_the_efficient_kernel() -> None:
    """DeepSeek's MLA has value heads smaller than its query heads: flash needs q, k and v of one
    head size (torch cuda/sdp_utils.cpp::check_head_dim_size_flash, `same_head_dim_size`), so
    sdpa picks the memory-efficient kernel, whose output has the value's head size; the emulated
    CUDA trace ran flash's op on it before and failed in o_proj (the full-size DeepSeek-V3)."""
    from memplan.model.forward.attention import Heads, sdpa_kernel
    from tests.test_trace_structure import CONFIGS

    st = Setting(
        batch=2,
        sequence=64,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cuda",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
    )
    h = Heads(batch=2, seq=64, heads=4, kv_heads=4, head_dim=64)
    assert sdpa_kernel(st, h, gqa=False, mask=False, dropout_on=False) == "flash"
    other = sdpa_kernel(st, h, gqa=False, mask=False, dropout_on=False, same_head_dims=False)
    assert other == "efficient"
    config = {**CONFIGS["deepseek_v3"], "v_head_dim": 8, "max_position_embeddings": 512}
    doc = tracer.build(
        config, stream="bf16", matmul="bf16", autocast=False, attention="sdpa", device="cuda"
    )
    assert doc["key"]["device"] == "cuda"
