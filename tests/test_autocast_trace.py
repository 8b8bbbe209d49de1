"""CUDA autocast emulated on a CPU build (memplan.verify.trace.autocast): issues 17/20, H3.

Oracles:
- The op lists' names are what the installed torch registers at AutocastCPU and AutocastCUDA
  (torch's own dispatcher, `_dispatch_get_registrations_for_dispatch_key`).
- The mechanism: configured with CPU's lists, the emulation reproduces torch's real CPU
  autocast saved set to the byte (every storage, block, module and dtype).
- CUDA: each policy's effect on single ops as autocast_mode.h defines it, and the saved set
  of one BERT layer and one Llama layer derived by hand from transformers 5.25's model code,
  torch's derivatives.yaml and the CUDA lists (each line's reason beside it).
The full matrix (every ruled family, CPU lists vs real CPU autocast; the rules' CUDA autocast
branch vs the emulated trace) is benchmarks/cuda_autocast.py, results/cuda-autocast.json.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.verify.trace import autocast as autocast_  # noqa: E402
from memplan.verify.trace import fit as fit_  # noqa: E402
from memplan.verify.trace.forward import build_fake, trace_once  # noqa: E402
from tests.test_activations_families import with_dropout  # noqa: E402
from tests.test_profile import RULED  # noqa: E402
from tests.test_profile_cuda import cuda_config  # noqa: E402

F = torch.nn.functional


def test_lists_are_the_installed_torchs_registrations() -> None:
    """Every op torch 2.13 registers an autocast kernel for, and no other, is in the table of
    its device (names; the policies are cited from autocast_mode.h/.cpp in the module)."""
    assert set(autocast_.CPU_POLICY) == autocast_.registered("AutocastCPU")
    assert set(autocast_.CUDA_POLICY) == autocast_.registered("AutocastCUDA")
    for name in (*autocast_.CPU_POLICY, *autocast_.CUDA_POLICY):
        autocast_._overload(name)  # each resolves to an aten overload


def _records(config: dict[str, Any], attention: str, **kw: Any) -> list[tuple[Any, ...]]:
    model, mode = build_fake(config, stream="fp32", attention=attention, checkpointing="none")
    n = int(model.config.num_hidden_layers)
    recs = trace_once(model, mode, layer_count=n, **kw)
    return sorted((r.block, r.module, r.dtype, r.numel) for r in recs)


@pytest.mark.parametrize(
    ("family", "attention", "dtype"),
    [("llama", "sdpa", "bf16"), ("bert", "eager", "fp16"), ("gpt2", "sdpa", "bf16")],
)
def test_cpu_lists_reproduce_real_cpu_autocast(family: str, attention: str, dtype: str) -> None:
    """Independent oracle: torch's own CPU autocast (its C++ kernels) against the emulation
    run with CPU's lists, the same model traced twice."""
    config = with_dropout(RULED[family], False)
    model, mode = build_fake(config, stream="fp32", attention=attention, checkpointing="none")
    n = int(model.config.num_hidden_layers)
    kw: dict[str, Any] = {"batch": 2, "sequence": 24, "autocast": dtype, "layer_count": n}
    real = Counter((r.block, r.module, r.dtype, r.numel) for r in trace_once(model, mode, **kw))
    emulated = trace_once(model, mode, autocast_lists="cpu", **kw)
    # the cache's own copies (autocast_.HELD) are known to the emulation only
    saved = [r for r in emulated if not r.block.startswith(autocast_.HELD)]
    assert Counter((r.block, r.module, r.dtype, r.numel) for r in saved) == real
    assert any(r.dtype == dtype for r in emulated)  # autocast did cast


def _ops(lists: str, dtype: Any) -> dict[str, Any]:
    """Single ops under the emulation with `lists`, real tensors."""
    x16 = torch.randn(4, 8, dtype=dtype)
    x32 = torch.randn(4, 8).requires_grad_()
    w = torch.randn(8, 8, requires_grad=True)
    with autocast_.kernels(lists, dtype) as region, region.autocast():
        out = {
            "mm": torch.mm(x32, w).dtype,
            "layer_norm": F.layer_norm(x16, (8,)).dtype,
            "softmax": torch.softmax(x16, -1).dtype,
            "log_softmax": torch.log_softmax(x16, -1).dtype,
            "pow": x16.pow(2).dtype,
            "rsqrt": x16.abs().rsqrt().dtype,
            "sum": x16.sum().dtype,
            "norm": torch.norm(x16).dtype,
            "addcmul": torch.addcmul(x32, x16, x16).dtype,
            "gelu": F.gelu(x16).dtype,
        }
        first = torch.mm(x32, w)
        second = torch.mm(x32, w)
        a, b = first.grad_fn._saved_mat2, second.grad_fn._saved_mat2  # type: ignore[union-attr]
        out["one_cached_copy"] = a.untyped_storage()._cdata == b.untyped_storage()._cdata
        out["cached"] = len(region.cache)
        out["saved_mat2"] = a.dtype
    out["cleared"] = len(region.cache) == 0
    return out


def test_cuda_policies_on_single_ops() -> None:
    """autocast_mode.h's lists and policies (torch 2.13): AT_FORALL_LOWER_PRECISION_FP (mm),
    AT_FORALL_FP32 (layer_norm, pow, rsqrt), AT_FORALL_FP32_SET_OPT_DTYPE (softmax,
    log_softmax, sum: dtype=float), AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE (norm.Scalar ->
    norm.ScalarOpt_dtype, float), AT_FORALL_PROMOTE (addcmul: widest input); gelu on no list;
    cached_cast: one copy of a leaf fp32 weight per region, the matmul saves it, cleared when
    the region exits. CPU's lists (autocast_mode.cpp AutocastCPU) cast none of the fp32 ones."""
    cuda = _ops("cuda", torch.float16)
    assert cuda == {
        "mm": torch.float16,
        "layer_norm": torch.float32,
        "softmax": torch.float32,
        "log_softmax": torch.float32,
        "pow": torch.float32,
        "rsqrt": torch.float32,
        "sum": torch.float32,
        "norm": torch.float32,
        "addcmul": torch.float32,
        "gelu": torch.float16,
        "one_cached_copy": True,
        "cached": 2,  # w and x32: both fp32 leaves requiring grad
        "saved_mat2": torch.float16,
        "cleared": True,
    }
    cpu = _ops("cpu", torch.bfloat16)
    for op in ("layer_norm", "softmax", "log_softmax", "pow", "rsqrt", "sum", "norm", "gelu"):
        assert cpu[op] == torch.bfloat16, op
    assert cpu["mm"] == torch.bfloat16 and cpu["one_cached_copy"]


def _layer(family: str, attention: str, dtype: str) -> Counter[tuple[str, str, int]]:
    """One traced layer's saved storages under the emulated CUDA autocast, batch 2 x 64."""
    config = cuda_config(family, False)
    model, mode = build_fake(config, stream="fp32", attention=attention, checkpointing="none")
    recs = trace_once(
        model, mode, batch=2, sequence=64, autocast=dtype, layer_count=2, device="cuda"
    )
    return Counter((r.module, r.dtype, r.numel) for r in fit_.split(recs)["layer.0"])


def test_cuda_bert_layer_hand_derived() -> None:
    """transformers 5.25 BertLayer, sdpa, amp-fp16 on CUDA: tokens T = 128, hidden 48,
    6 heads of 8, intermediate 100, hidden dropout 0.1 (attention dropout 0)."""
    t, h, i = 128, 48, 100
    expected = Counter(
        [
            # query/key/value: linear is lower_precision_fp; the fp32 layer input is cast once
            # per call (not a leaf: no cache), addmm saves that copy and the cached fp16 weight
            *[(f"attention.self.{p}", "fp16", t * h) for p in ("query", "key", "value")],
            *[(f"attention.self.{p}", "fp16", h * h) for p in ("query", "key", "value")],
            # SDPA on fp16 q, k, v, no mask, head_dim 8: flash; its node saves q, k, v (the
            # projections' outputs), the output, the fp32 logsumexp [b, heads, s] and the
            # rng_state [2] / unused [] uint64 (derivatives.yaml)
            *[("attention.self", "fp16", t * h)] * 4,
            ("attention.self", "fp32", 2 * 6 * 64),
            ("attention.self", "uint64", 2),
            ("attention.self", "uint64", 1),
            # output dense: input is the flash output (counted above), its cached weight
            ("attention.output.dense", "fp16", h * h),
            # hidden dropout on the fp16 dense output: native_dropout's bool mask
            ("attention.output.dropout", "bool", t * h),
            # LayerNorm(fp16 + fp32 residual = fp32): layer_norm on the fp32 list, no cast;
            # native_layer_norm saves its input, mean and rstd (fp32 on CUDA)
            ("attention.output.LayerNorm", "fp32", t * h),
            *[("attention.output.LayerNorm", "fp32", t)] * 2,
            # intermediate dense: fp16 copy of the fp32 LayerNorm output, cached weight
            ("intermediate.dense", "fp16", t * h),
            ("intermediate.dense", "fp16", i * h),
            # GELU is on no list: runs in fp16, saves its input
            ("intermediate.intermediate_act_fn", "fp16", t * i),
            # output dense: the fp16 GELU output, cached weight
            ("output.dense", "fp16", t * i),
            ("output.dense", "fp16", h * i),
            ("output.dropout", "bool", t * h),
            ("output.LayerNorm", "fp32", t * h),
            *[("output.LayerNorm", "fp32", t)] * 2,
        ]
    )
    assert _layer("bert", "sdpa", "fp16") == expected


def test_cuda_llama_layer_hand_derived() -> None:
    """transformers 5.25 LlamaDecoderLayer, sdpa, amp-bf16 on CUDA: T = 128, hidden 64, 4 heads
    and 2 key/value heads of 16, intermediate 160, no dropout."""
    t, h, kv, i = 128, 64, 32, 160
    norm = [
        # LlamaRMSNorm in fp32: pow (fp32 list) saves its input, rsqrt (fp32 list) its
        # result [T, 1], the weight multiply its normalized input
        ("fp32", t * h),
        ("fp32", t),
        ("fp32", t * h),
    ]
    expected = Counter(
        [
            *[("input_layernorm", *x) for x in norm],
            # q/k/v_proj: one bf16 copy of the fp32 normed input per linear, cached weights
            *[(f"self_attn.{p}", "bf16", t * h) for p in ("q_proj", "k_proj", "v_proj")],
            ("self_attn.q_proj", "bf16", h * h),
            ("self_attn.k_proj", "bf16", kv * h),
            ("self_attn.v_proj", "bf16", kv * h),
            # RoPE: bf16 q/k times the fp32 cos/sin promote to fp32 (cos/sin are saved by every
            # layer: the embeddings'); SDPA (lower_precision_fp) casts q and k back to bf16;
            # flash (GQA) saves the q and k copies, v (v_proj's output), the output, the fp32
            # logsumexp [b, heads, s] and rng_state / unused
            ("self_attn", "bf16", t * h),
            ("self_attn", "bf16", t * kv),
            ("self_attn", "bf16", t * kv),
            ("self_attn", "bf16", t * h),
            ("self_attn", "fp32", 2 * 4 * 64),
            ("self_attn", "uint64", 2),
            ("self_attn", "uint64", 1),
            # o_proj: input is the flash output, cached weight
            ("self_attn.o_proj", "bf16", h * h),
            # residual fp32 + bf16 = fp32 into the second norm
            *[("post_attention_layernorm", *x) for x in norm],
            # gate/up: a bf16 copy of the normed input each, cached weights
            ("mlp.gate_proj", "bf16", t * h),
            ("mlp.gate_proj", "bf16", i * h),
            ("mlp.up_proj", "bf16", t * h),
            ("mlp.up_proj", "bf16", i * h),
            # SiLU (no list) saves its bf16 input; act * up saves both bf16 operands
            ("mlp.act_fn", "bf16", t * i),
            ("mlp", "bf16", t * i),
            ("mlp", "bf16", t * i),
            # down_proj: saves its input (the bf16 product) and its cached weight
            ("mlp.down_proj", "bf16", t * i),
            ("mlp.down_proj", "bf16", h * i),
        ]
    )
    got = _layer("llama", "sdpa", "bf16")
    assert got == expected


def _held(checkpointing: str) -> Counter[tuple[str, str, int]]:
    """What autocast's cast cache alone holds at the end of one BERT forward (layer 0)."""
    config = cuda_config("bert", False)
    model, mode = build_fake(config, stream="fp32", attention="sdpa", checkpointing=checkpointing)
    recs = trace_once(
        model, mode, batch=2, sequence=64, autocast="fp16", layer_count=2, device="cuda"
    )
    held = fit_.split(recs)[f"{autocast_.HELD}layer.0"]
    return Counter((r.module, r.dtype, r.numel) for r in held)


def test_cast_cache_holds_biases_and_under_checkpointing_every_weight() -> None:
    """autocast_mode.cpp::cached_cast caches the fp16 copy of every fp32 leaf that requires
    grad (BERT's Linear weights and biases) until the region exits. Without checkpointing
    addmm saves the weight copies (mat2) but not the bias copies (derivatives.yaml addmm:
    self is not saved), so the cache alone holds the biases'; under full checkpointing the
    layer saves none of them in the forward, so it holds every one."""
    h, i = 48, 100
    linears = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (i, h),
        "output.dense": (h, i),
    }
    biases = Counter((m, "fp16", out) for m, (out, _) in linears.items())
    assert _held("none") == biases
    weights = Counter((m, "fp16", out * width) for m, (out, width) in linears.items())
    assert _held("full") == biases + weights


def test_pin_rule_and_trace_hold_the_same_weight_copies_under_full_checkpointing() -> None:
    """Llama (no biases), amp-bf16 on CUDA, full checkpointing: the rule's Block.held (its
    weight_cast tensors, memplan.model.forward.assemble.finish) equals what the emulated trace
    finds only the cache holding, and the step's autocast_cast_cache term counts it once per
    layer, alive at the forward and the loss only. Pinning: both read autocast_mode.cpp."""
    from memplan.activations import predict
    from memplan.model.forward.tensors import Setting
    from memplan.step import transients
    from tests.test_activations import inventory

    config = cuda_config("llama", False)
    st = Setting(
        batch=2,
        sequence=64,
        stream="fp32",
        matmul="bf16",
        autocast=True,
        device="cuda",
        attention="sdpa",
        dropout=None,
        checkpointing="full",
    )
    rule = predict(inventory(config), st)
    layers = rule.block("layers")
    assert layers is not None and layers.held
    model, mode = build_fake(config, stream="fp32", attention="sdpa", checkpointing="full")
    recs = trace_once(
        model, mode, batch=2, sequence=64, autocast="bf16", layer_count=2, device="cuda"
    )
    traced = fit_.split(recs)[f"{autocast_.HELD}layer.0"]
    assert sorted(2 * r.numel for r in traced) == sorted(t.bytes for t in layers.held)
    term = transients.autocast_cache(rule)
    assert term is not None and term.phases == ("forward", "loss")
    assert term.bytes == layers.count * sum(t.bytes for t in layers.held)
    plain = predict(inventory(config), dataclasses.replace(st, checkpointing="none"))
    assert transients.autocast_cache(plain) is None  # the layers save every weight copy


GPU_CASES = [("llama", "sdpa", "bf16"), ("bert", "eager", "fp16"), ("gpt2", "sdpa", "fp16")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("family", "attention", "dtype"), GPU_CASES)
def test_gpu_autocast_profile_equals_real_cuda_autocast_run(
    family: str, attention: str, dtype: str
) -> None:
    """The emulated CUDA autocast profile = the CUDA storages a real forward saves under
    torch.autocast("cuda") (independent oracle: CUDA autocast itself), at a size the fit never
    saw. Not run here (no GPU lent to this task)."""
    import transformers

    from memplan.model import profile
    from memplan.model.forward.tensors import Setting
    from memplan.verify.trace import forward
    from memplan.verify.trace import profile as tracer
    from tests.test_profile_cuda import _measure_cuda

    config = cuda_config(family, True)
    doc = tracer.build(
        config, stream="fp32", matmul=dtype, autocast=True, attention=attention, device="cuda"
    )
    st = Setting(
        batch=3,
        sequence=96,
        stream="fp32",
        matmul=dtype,
        autocast=True,
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
        cfg, dtype=torch.float32, attn_implementation=attention
    )
    model.to("cuda").train()
    with torch.autocast("cuda", dtype=forward.DTYPES[dtype]):
        assert _measure_cuda(model, 3, 96) == predicted
