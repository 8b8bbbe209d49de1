"""LitGPT's adapter and adapter_v2 (`model.implementation: litgpt`, `finetune.method: adapter`
or `adapter_v2`): the inventory (memplan.model.stacks.litgpt_adapter) against litgpt 0.5.9's
own `litgpt.adapter.GPT` / `litgpt.adapter_v2.GPT`, built on the meta device in Fabric's
precision dtype and marked by its own mark_only_adapter(_v2)_as_trainable (tests/litgpt_probe.py
::adapter_parameters): every name, shape and dtype; the trainable flag against which of
those parameters get a gradient when finetune/adapter(_v2).py::fit runs them (its no-grad
validation first, then training: tests/litgpt_probe.py::adapter_fit_grads): adapter_wte
requires grad but never gets one (litgpt 0.5.9's adapter_kv_cache); the optimizer states,
gradients and the cache itself against litgpt's AdamW run on CPU in fit's order. The
activations (memplan.model.stacks.litgpt_adapter_saved.activations) against what litgpt's own
adapter GPT, run by Fabric in fit's order, holds for backward on CPU, to the byte
(tests/litgpt_probe.py::held_bytes_adapter, with LitGPT's recomputation too; the whole matrix is
benchmarks/litgpt_adapter.py); on CUDA the prefix attention's kernel as torch's source
chooses it, its tensors against the aten op under memplan.verify.trace.cuda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.load import load_inventory
from memplan.model.sources import from_config
from memplan.precision import dtype_bytes
from memplan.report.estimate import estimate
from tests.conftest import make_spec, micro_batch_of
from tests.test_litgpt_activations import tiny

PRESETS = [
    ("llama-3-8b", "Llama-3-8B"),
    ("qwen2.5-0.5b", "Qwen2.5-0.5B"),  # qkv bias, tied embedding untied by LitGPT
    ("mistral-7b", "Mistral-7B-v0.1"),
    ("llama-2-7b", "Llama-2-7b-hf"),
]
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}


def memplan_parameters(spec_data: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """{name: (shape, dtype, trainable)} of the inventory memplan trains for a spec."""
    loaded = validate(spec_data)
    inv = finetune.apply(loaded.spec, load_inventory(loaded))
    held = loaded.spec.recipe().parameters
    return {t.name: (t.shape, t.dtype or held, t.trainable) for t in inv.parameters}


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
@pytest.mark.parametrize(("preset", "name"), PRESETS)
def test_inventory_matches_litgpts_adapter_gpt(preset: str, name: str, method: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    import importlib

    from tests.litgpt_probe import adapter_fit_grads, adapter_parameters

    real = adapter_parameters(name, method, "bf16-true")
    config = importlib.import_module(f"litgpt.{method}").Config.from_name(name)
    trained = adapter_fit_grads(config, method)
    # What mark_only_* marks but fit never trains: the prefix embedding, and only it.
    marked = {n for n, (_, _, g) in real.items() if g}
    assert {n for n in marked if not trained[n]} == {n for n in marked if "adapter_wte" in n}
    assert any("adapter_wte" in n for n in marked)
    real = {n: (s, d, trained[n]) for n, (s, d, _) in real.items()}
    mine = memplan_parameters(
        {
            "model": {"preset": preset, "implementation": "litgpt"},
            "precision": "bf16",
            "finetune": {"method": method},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    assert mine == {n: (s, DTYPE_NAMES[d], g) for n, (s, d, g) in real.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_inventory_matches_litgpts_stablelm_alpha_adapter_gpt(method: str) -> None:
    """GPT-NeoX (StableLM Alpha 3B, litgpt's "stablelm-base-alpha-3b"): HF's gpt_neox names
    mapped to LitGPT's, every name, shape, dtype and trained flag as litgpt's own GPT."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    import importlib

    from benchmarks.published_others import STABLELM_ALPHA_3B
    from tests.litgpt_probe import adapter_fit_grads, adapter_parameters

    name = "stablelm-base-alpha-3b"
    real = adapter_parameters(name, method, "bf16-true")
    config = importlib.import_module(f"litgpt.{method}").Config.from_name(name)
    trained = adapter_fit_grads(config, method)
    mine = memplan_parameters(
        {
            "model": {"architecture": STABLELM_ALPHA_3B, "implementation": "litgpt"},
            "precision": "bf16",
            "finetune": {"method": method},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    assert mine == {n: (s, DTYPE_NAMES[d], trained[n]) for n, (s, d, _) in real.items()}


@pytest.mark.parametrize(
    ("method", "precision", "start", "length"),
    [
        ("adapter", "bf16-mixed", 0, 4),  # every layer, fp32 parameters under autocast
        ("adapter_v2", "32-true", 1, 7),
        ("adapter", "bf16-true", 5, 10),  # start past the last layer: nothing would train
        ("adapter_v2", "bf16-true", 5, 10),  # the norms and adapter_bias/scale still train
    ],
)
def test_inventory_follows_start_layer_prompt_length_and_precision(
    method: str, precision: str, start: int, length: int
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    import importlib

    from tests.litgpt_probe import adapter_fit_grads, adapter_parameters

    memplan_precision = {"bf16-mixed": "amp-bf16", "32-true": "fp32", "bf16-true": "bf16"}
    spec = {
        "model": {"preset": "llama-2-7b", "implementation": "litgpt"},
        "precision": memplan_precision[precision],
        "finetune": {
            "method": method,
            "adapter_start_layer": start,
            "adapter_prompt_length": length,
        },
        "training": {"micro_batch_size": 1, "sequence_length": 128},
    }
    # Two layers of Llama 2 7B (start 5 lies past them).
    fields = {"n_layer": 2, "adapter_start_layer": start, "adapter_prompt_length": length}
    real = adapter_parameters("Llama-2-7b-hf", method, precision, **fields)
    config = importlib.import_module(f"litgpt.{method}").Config.from_name("Llama-2-7b-hf", **fields)
    trained = adapter_fit_grads(config, method)
    real = {n: (s, d, trained[n]) for n, (s, d, _) in real.items()}
    if not any(g for _, _, g in real.values()):
        with pytest.raises(MemplanError, match="every parameter is frozen"):
            memplan_parameters(_two_layers(spec))
        return
    mine = memplan_parameters(_two_layers(spec))
    assert mine == {n: (s, DTYPE_NAMES[d], g) for n, (s, d, g) in real.items()}


def _two_layers(spec: dict[str, Any]) -> dict[str, Any]:
    import json

    import memplan.model

    preset = Path(memplan.model.__file__).parent / "presets" / "llama-2-7b.json"
    config = {**json.loads(preset.read_text()), "num_hidden_layers": 2}
    return {**spec, "model": {"architecture": config, "implementation": "litgpt"}}


def test_inventory_matches_litgpt_on_phi3_fused_projections() -> None:
    """Phi-3's HF tensors are fused already (qkv_proj; gate_up_proj, which LitGPT splits into
    fc_1 and fc_2): litgpt's GPT with Phi-3-mini-4k's fields (tests/litgpt_probe.py::ARCHS)."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import (
        Shape,
        adapter_fit_grads,
        adapter_parameters_of,
        config,
        hf_config,
    )

    shape = Shape(arch="phi-3", layers=3, kv_heads=4)
    real = adapter_parameters_of(config(shape), "adapter_v2", "bf16-true")
    trained = adapter_fit_grads(config(shape), "adapter_v2")
    real = {n: (s, d, trained[n]) for n, (s, d, _) in real.items()}
    mine = memplan_parameters(
        {
            "model": {"architecture": hf_config(shape), "implementation": "litgpt"},
            "precision": "bf16",
            "finetune": {"method": "adapter_v2"},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    assert mine == {n: (s, DTYPE_NAMES[d], g) for n, (s, d, g) in real.items()}


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_optimizer_states_and_gradients_match_litgpt_adamw_on_cpu(method: str) -> None:
    """Independent oracle: finetune/adapter(_v2).py::main on CPU (tests/litgpt_probe.py::
    adapter_optimizer_held: litgpt's own instantiate_torch_optimizer("AdamW",
    model.parameters()) after mark_only_*, two real steps of the tiny model's forward and
    chunked loss, zero_grad between): the tensors with state are memplan's trainable ones,
    and exp_avg, exp_avg_sq and step are the same tensors and bytes; no gradient outlives
    zero_grad (set_to_none)."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import Shape, adapter_optimizer_held

    layers = 3  # adapter_start_layer 2: one adapted layer
    real = adapter_optimizer_held("bf16", Shape(layers=layers), method)
    spec = adapter_spec(method, layers=layers)
    inv = finetune.apply(spec, from_config(tiny(layers, 2)))
    assert set(real.with_state) == {t.name for t in inv.parameters if t.trainable}
    assert real.kept_grads == {} and real.outside_model == 0
    report = estimate(spec, from_config(tiny(layers, 2)))
    mine = {t.name: (t.tensors, t.bytes) for t in report.per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key] == real.by_key[key]
    host = {t.name: (t.tensors, t.bytes) for t in report.per_gpu.host_terms}
    assert mine.get("step", host.get("step")) == real.by_key["step"]
    grads = sum(t.bytes for t in report.per_gpu.terms if t.category == "gradients")
    assert grads == real.grad_bytes


@pytest.mark.parametrize(
    ("method", "precision", "kv"),
    [
        ("adapter", "amp-bf16", 2),  # the matmul dtype: bf16
        ("adapter_v2", "amp-bf16", 4),  # adapter_scale promotes qkv's output: fp32
        ("adapter", "fp32", 1),  # multi-query: k and v views of one qkv output
        ("adapter_v2", "bf16", 1),
        ("adapter_v2", "bf16", 4),  # repeat_interleave(1) still copies
    ],
)
def test_adapter_kv_cache_matches_what_litgpt_holds(method: str, precision: str, kv: int) -> None:
    """The prefix keys and values every adapted layer keeps after fit's validation (tests/
    litgpt_probe.py::adapter_optimizer_held: the storages of each `adapter_kv_cache`, after
    two training steps) against memplan's buffers of that name, bytes and dtype."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import Shape, adapter_optimizer_held

    real = adapter_optimizer_held(precision, Shape(layers=4, kv_heads=kv), method)
    spec = adapter_spec(method, layers=4, kv=kv, precision=precision)
    inv = finetune.apply(spec, from_config(tiny(4, kv)))
    cache = [b for b in inv.buffers if "adapter_kv_cache" in b.name]
    held = spec.recipe().parameters
    assert real.cache_bytes > 0
    assert sum(b.numel * dtype_bytes(b.dtype or held) for b in cache) == real.cache_bytes
    assert {DTYPE_NAMES[d] for d in real.cache_dtypes} == {b.dtype for b in cache}


ACTIVATION_CASES = [
    # method, precision, start layer, arch, k/v heads, batch, sequence, prompt length
    ("adapter", "fp32", 0, "llama", 2, 2, 16, 10),  # prefix on CPU's math path (batch 2)
    ("adapter", "bf16", 2, "llama", 2, 1, 200, 10),  # first adapted layer keeps only `ay`
    ("adapter", "amp-bf16", 0, "qwen2.5", 2, 1, 200, 7),  # CPU flash kernel at batch 1
    ("adapter", "bf16", 0, "llama", 1, 2, 300, 7),  # multi-query: expand is a view
    ("adapter", "amp-bf16", 0, "mistral", 2, 2, 300, 10),  # sliding-window mask, 3 chunks
    ("adapter_v2", "fp32", 2, "phi-3", 4, 2, 16, 10),  # v as a view of the qkv sum
    ("adapter_v2", "bf16", 0, "llama", 2, 1, 200, 10),
    ("adapter_v2", "amp-bf16", 2, "llama", 2, 1, 200, 10),  # autocast's q/k/v casts kept
    ("adapter_v2", "amp-bf16", 0, "phi-3", 4, 2, 16, 7),  # v a bf16 cast, not a view
    ("adapter_v2", "fp32", 0, "llama", 1, 1, 200, 10),  # multi-query: v is the fp32 cache
]


@pytest.mark.parametrize(
    ("method", "precision", "start", "arch", "kv", "batch", "seq", "length"), ACTIVATION_CASES
)
def test_activations_match_litgpts_adapter_gpt_to_the_byte(
    method: str,
    precision: str,
    start: int,
    arch: str,
    kv: int,
    batch: int,
    seq: int,
    length: int,
) -> None:
    """The rule against litgpt 0.5.9's adapter GPT on CPU: fit's no-grad validation fills the
    prefix caches, then its training forward and chunked loss; every storage made and still
    held for backward counted (tests/litgpt_probe.py::held_bytes_adapter)."""
    memplan, litgpt = _rule_and_litgpt(
        method, precision, start, arch, kv, batch, seq, length=length
    )
    assert memplan == litgpt


def _rule_and_litgpt(
    method: str,
    precision: str,
    start: int,
    arch: str,
    kv: int,
    batch: int,
    seq: int,
    *,
    length: int = 10,
    recompute: str = "none",
) -> tuple[int, int]:
    """memplan's saved bytes for the tiny `arch` adapter GPT on CPU, and what litgpt 0.5.9
    holds (tests/litgpt_probe.py::held_bytes_adapter; `recompute` full: every Block
    checkpointed)."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import Shape, held_bytes_adapter, hf_config

    shape = Shape(arch=arch, layers=3, kv_heads=kv, batch=batch, seq=seq)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision=precision,
        training={
            "micro_batch_size": batch,
            "sequence_length": seq,
            "activation_checkpointing": recompute,
        },
        finetune={
            "method": method,
            "adapter_start_layer": start,
            "adapter_prompt_length": length,
        },
        hardware={"device": "cpu"},
    )
    saved = micro_batch_of(spec, from_config(cfg))
    assert saved.modelled, saved.notes
    held = held_bytes_adapter(
        precision, shape, method, start=start, length=length, checkpointed=recompute == "full"
    )
    return saved.bytes, held


CHECKPOINT_CASES = [
    ("adapter", "fp32", 2, "llama", 2, 2, 16),  # layers before the prefix keep no frame
    ("adapter", "amp-bf16", 0, "mistral", 2, 1, 200),
    ("adapter_v2", "bf16", 0, "llama", 1, 2, 300),
    ("adapter_v2", "amp-bf16", 2, "phi-3", 4, 2, 16),
]


@pytest.mark.parametrize(
    ("method", "precision", "start", "arch", "kv", "batch", "seq"), CHECKPOINT_CASES
)
def test_checkpointed_activations_match_litgpt_to_the_byte(
    method: str, precision: str, start: int, arch: str, kv: int, batch: int, seq: int
) -> None:
    """activation_checkpointing full: what LitGPT's checkpointed Blocks keep after forward
    (each recording block's input; a block before the prefix records nothing, so keeps no
    frame), the head and the loss."""
    memplan, litgpt = _rule_and_litgpt(
        method, precision, start, arch, kv, batch, seq, recompute="full"
    )
    assert memplan == litgpt


def _emulated_prefix_bytes(batch: int, seq: int, aT: int, dtype: str, heads: int, d: int) -> int:
    """Bytes of the new storages `scaled_dot_product_attention(q, ak, av, amask)` keeps for
    backward as a CUDA build runs it (memplan.verify.trace.cuda: the aten op the chosen
    backend calls, under FakeTensorMode, autograd's own node saving; host tensors dropped);
    q (the main attention keeps it too) and the cache (buffers) are not new."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.verify.trace import cuda

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    em = cuda.Emulation(stream=dtype)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with FakeTensorMode(), cuda.cuda_kernels(em):
        q = torch.empty(batch, heads, seq, d, dtype=torch_dtype, requires_grad=True)
        ak = torch.empty(1, heads, aT, d, dtype=torch_dtype)
        av = torch.empty(1, heads, aT, d, dtype=torch_dtype)
        amask = torch.ones(seq, aT, dtype=torch.bool)  # litgpt/adapter.py's amask
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ay = F.scaled_dot_product_attention(q, ak, av, amask)
        inputs = {t.untyped_storage()._cdata for t in (q, ak, av)}
        host = em.host_storages()
        storages = {
            t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in (*kept, ay)  # ay: the gate's multiply keeps it too
            if t.untyped_storage()._cdata not in inputs | host
        }
    assert em.kernels == ["efficient"]
    return sum(storages.values())


@pytest.mark.parametrize(
    ("precision", "seq", "aT"),
    [("bf16", 1304, 10), ("bf16", 200, 16), ("fp32", 37, 7), ("bf16", 64, 3)],
)
def test_cuda_prefix_attention_matches_the_efficient_kernel(
    precision: str, seq: int, aT: int
) -> None:
    """On CUDA at micro-batch 1 the prefix attention runs the memory-efficient kernel; its
    padded mask, logsumexp (padded to 32 positions) and output against the aten op's own
    node under the CUDA emulation."""
    pytest.importorskip("torch")
    from memplan.model.stacks import litgpt_adapter_saved as saved_rule
    from memplan.report.settings import setting_of

    spec = make_spec(
        model={"architecture": tiny(3, 2), "implementation": "litgpt"},
        precision=precision,
        training={"micro_batch_size": 1, "sequence_length": seq},
        finetune={"method": "adapter", "adapter_prompt_length": aT},
        hardware={"gpu": "A100-40GB"},
    )
    st = setting_of(spec)
    arch = from_config(tiny(3, 2)).architecture
    assert arch is not None and st.device == "cuda"
    rule = saved_rule.prefix_attention(arch, st, aT, q_grad=True)
    assert sum(x.bytes for x in rule) == _emulated_prefix_bytes(1, seq, aT, precision, 4, 16)


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_activations_are_modelled_on_cuda_at_micro_batch_1(method: str) -> None:
    """CUDA at micro-batch 1: the memory-efficient kernel's tensors replace the CPU flash
    kernel's (the mask padded to 8 columns, the logsumexp to 32 positions); elsewhere the
    layer is the CPU rule's."""
    config = tiny(3, 2)

    def of(hardware: dict[str, Any]) -> Any:
        spec = make_spec(
            model={"architecture": config, "implementation": "litgpt"},
            precision="bf16",
            training={"micro_batch_size": 1, "sequence_length": 200},
            finetune={"method": method, "adapter_prompt_length": 10},
            hardware=hardware,
        )
        return micro_batch_of(spec, from_config(config))

    gpu, cpu = of({"gpu": "A100-40GB"}), of({"device": "cpu"})
    assert gpu.modelled and cpu.modelled

    def prefix(saved: Any) -> list[tuple[str, tuple[int, ...], str]]:
        return [
            (t.name, t.shape, t.dtype)
            for b in saved.blocks
            for t in b.tensors
            if t.name.startswith("attn.prefix.")
        ]

    # adapter_start_layer 2 of 3 layers: under adapter the one adapted layer's q needs no
    # gradient (only `ay` is kept); adapter_v2's does.
    tail = [("attn.prefix.output", (1, 200, 4, 16), "bf16")]
    if method == "adapter":
        assert prefix(gpu) == prefix(cpu) == tail
    else:
        assert prefix(cpu) == [
            ("attn.prefix.mask", (200, 10), "bf16"),
            ("attn.prefix.logsumexp", (1, 4, 200), "fp32"),
            *tail,
        ]
        assert prefix(gpu) == [
            ("attn.prefix.mask", (200, 16), "bf16"),
            ("attn.prefix.logsumexp", (1, 4, 224), "fp32"),
            *tail,
        ]


def test_cuda_refuses_a_head_size_the_efficient_kernel_refuses() -> None:
    """head_size 12 in bf16 is no multiple of 8: SDPA would fall to math at batch 1, which
    no proof covers."""
    config = {**tiny(3, 2), "hidden_size": 48}
    spec = make_spec(
        model={"architecture": config, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": 1, "sequence_length": 64},
        finetune={"method": "adapter"},
        hardware={"gpu": "A100-40GB"},
    )
    saved = micro_batch_of(spec, from_config(config))
    assert not saved.modelled
    assert "head_size a multiple of 8" in saved.notes[0]


def adapter_spec(
    method: str,
    *,
    layers: int = 3,
    kv: int = 2,
    precision: str = "bf16",
    batch: int = 2,
    activation_checkpointing: str = "none",
    **finetune: Any,
) -> Any:
    return make_spec(
        model={"architecture": tiny(layers, kv), "implementation": "litgpt"},
        precision=precision,
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": activation_checkpointing,
        },
        finetune={"method": method, **finetune},
        hardware={"device": "cpu"},
    )


def test_verdict_does_not_say_fits_on_model_states_alone_on_a_gpu(tmp_path: Path) -> None:
    """Where the CUDA activations are refused (head_size 12 in bf16: the efficient kernel
    refuses it) the verdict says they are unknown instead of "fits"."""
    from typer.testing import CliRunner

    from memplan.cli.app import app

    spec = tmp_path / "a.yaml"
    spec.write_text(
        "model:\n  implementation: litgpt\n  architecture: {model_type: llama, hidden_size: 48,"
        " intermediate_size: 192, num_hidden_layers: 3, num_attention_heads: 4,"
        " num_key_value_heads: 2, vocab_size: 256, max_position_embeddings: 128}\n"
        "precision: bf16\n"
        "finetune: {method: adapter}\ntraining: {micro_batch_size: 1, sequence_length: 64}\n"
        "hardware: {gpu: A100-40GB}\n"
    )
    result = CliRunner().invoke(app, ["estimate", str(spec), "--width", "140"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "model states fit; activations unknown" in text
    assert "the prefix attention's memory-efficient kernel needs head_size" in text


def test_verdict_counts_the_activations_on_an_a100(tmp_path: Path) -> None:
    """Llama 3 8B adapter at micro-batch 1 on an A100: modelled, so the verdict is a verdict."""
    from typer.testing import CliRunner

    from memplan.cli.app import app

    spec = tmp_path / "a.yaml"
    spec.write_text(
        "model: {preset: llama-3-8b, implementation: litgpt}\nprecision: bf16\n"
        "finetune: {method: adapter}\ntraining: {micro_batch_size: 1, sequence_length: 512}\n"
        "hardware: {gpu: A100-80GB}\n"
    )
    result = CliRunner().invoke(app, ["estimate", str(spec), "--width", "140", "--json"])
    assert result.exit_code == 0, result.output
    assert "activations not modelled" not in result.stdout


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_estimate_on_cpu_counts_the_activations(method: str, tmp_path: Path) -> None:
    """`memplan estimate --json` on a CPU spec: the activations are modelled and counted."""
    import json

    from typer.testing import CliRunner

    from memplan.cli.app import app

    spec = tmp_path / "a.yaml"
    spec.write_text(
        "model: {preset: qwen2.5-0.5b, implementation: litgpt}\nprecision: bf16\n"
        f"finetune: {{method: {method}}}\n"
        "training: {micro_batch_size: 1, sequence_length: 512}\nhardware: {device: cpu}\n"
    )
    result = CliRunner().invoke(app, ["estimate", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    per_gpu = json.loads(result.stdout)["per_gpu"]
    assert per_gpu["activations_modelled"] is True
    assert per_gpu["activations"] > 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"model": {"preset": "llama-3-8b"}, "finetune": {"method": "adapter"}},
            "finetune.method adapter is LitGPT's .* set model.implementation: litgpt",
        ),
        (
            {
                "model": {"preset": "llama-3-8b", "implementation": "torchtitan"},
                "finetune": {"method": "adapter_v2"},
            },
            "set model.implementation: litgpt \\(it is 'torchtitan'\\)",
        ),
        (
            {
                "model": {"preset": "llama-3-8b", "implementation": "litgpt"},
                "finetune": {"method": "adapter", "rank": 8},
            },
            "rank set but method is adapter",
        ),
        (
            {
                "model": {"preset": "llama-3-8b", "implementation": "litgpt"},
                "finetune": {"method": "lora", "adapter_prompt_length": 4},
            },
            "adapter_prompt_length set but method is lora",
        ),
        (
            {
                "model": {"preset": "llama-3-8b", "implementation": "litgpt"},
                "finetune": {"method": "adapter", "adapter_prompt_length": 0},
            },
            "adapter_prompt_length",
        ),
    ],
)
def test_spec_keys_refused_where_litgpt_has_no_such_recipe(
    data: dict[str, Any], match: str
) -> None:
    with pytest.raises(MemplanError, match=match):
        validate(data)


def test_adapter_refuses_model_types_it_does_not_cover() -> None:
    cfg = {**tiny(), "model_type": "gemma"}
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"}, finetune={"method": "adapter"}
    )
    with pytest.raises(MemplanError, match="modelled on its Llama-shaped configs"):
        finetune.apply(spec, from_config(cfg))


STORED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "litgpt-adapter.json"


def test_stored_activation_matrix_matches_the_rule() -> None:
    """Every stored part-4 row of benchmarks/litgpt_adapter.py (litgpt's adapter GPTs run by
    Fabric on CPU, Phi's parallel-residual Block included) against the rule as it is now:
    the row's measured bytes, not its stored memplan column. No torch: each row keeps its
    config.json."""
    import json

    rows = json.loads(STORED.read_text())["activations"]
    assert {"phi-1.5", "phi-2"} <= {r["architecture"] for r in rows}
    wrong = []
    for row in rows:
        spec = make_spec(
            model={"architecture": row["config"], "implementation": "litgpt"},
            precision=row["precision"],
            training={
                "micro_batch_size": row["batch"],
                "sequence_length": row["sequence"],
                "activation_checkpointing": row["checkpointing"],
            },
            finetune={
                "method": row["method"],
                "adapter_start_layer": row["adapter_start_layer"],
                "adapter_prompt_length": row["adapter_prompt_length"],
            },
            hardware={"device": "cpu"},
        )
        saved = micro_batch_of(spec, from_config(row["config"]))
        if not saved.modelled or saved.bytes != row["measured"]:
            wrong.append((row["architecture"], row["method"], row["precision"], saved.bytes))
    assert not wrong, wrong


def test_phi_adapter_trains_the_prefix_and_gates_only() -> None:
    """phi-1.5 (24 layers, 32 heads, n_embd 2048) under adapter's defaults (prompt length 10
    from layer 2): adapter.py::adapter_filter marks 22 x (10 x 2048 + 32) = 451,264 elements;
    fit's cache leaves the gates (22 x 32) to train. Refused before Phi was covered."""
    from benchmarks.published_others import PHI_1_5

    spec = make_spec(
        model={"architecture": PHI_1_5, "implementation": "litgpt"},
        precision="bf16",
        finetune={"method": "adapter"},
    )
    params = finetune.apply(spec, from_config(PHI_1_5)).parameters
    prefix = [t for t in params if "adapter_wte" in t.name or "gating_factor" in t.name]
    assert sum(t.numel for t in prefix) == 22 * (10 * 2048 + 32)
    assert sum(t.numel for t in params if t.trainable) == 22 * 32


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["phi-1.5", "phi-2"])
@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_inventory_matches_litgpt_on_phi(arch: str, method: str) -> None:
    """Phi's HF tensors (q/k/v_proj, dense, fc1, fc2, input_layernorm, final_layernorm, biases,
    lm_head's bias) against litgpt's adapter GPT with the probe's phi fields."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import (
        Shape,
        adapter_fit_grads,
        adapter_parameters_of,
        config,
        hf_config,
    )

    shape = Shape(arch=arch, layers=3, kv_heads=4)
    real = adapter_parameters_of(config(shape), method, "bf16-true")
    trained = adapter_fit_grads(config(shape), method)
    mine = memplan_parameters(
        {
            "model": {"architecture": hf_config(shape), "implementation": "litgpt"},
            "precision": "bf16",
            "finetune": {"method": method},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    assert mine == {n: (s, DTYPE_NAMES[d], trained[n]) for n, (s, d, _) in real.items()}


PHI_CASES = [
    ("adapter", "amp-bf16", 2, "phi-1.5", 4, 1, 200, "none"),  # first adapted: `ay` and proj
    ("adapter_v2", "amp-bf16", 0, "phi-1.5", 4, 2, 300, "none"),  # trainable shared LayerNorm
    ("adapter_v2", "bf16", 2, "phi-2", 4, 2, 300, "full"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "precision", "start", "arch", "kv", "batch", "seq", "mode"), PHI_CASES
)
def test_phi_activations_match_litgpt_to_the_byte(
    method: str, precision: str, start: int, arch: str, kv: int, batch: int, seq: int, mode: str
) -> None:
    memplan, litgpt = _rule_and_litgpt(
        method, precision, start, arch, kv, batch, seq, recompute=mode
    )
    assert memplan == litgpt


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_phi_optimizer_states_and_gradients_match_litgpt_adamw(method: str) -> None:
    """test_optimizer_states_and_gradients_match_litgpt_adamw_on_cpu on the Phi Block."""
    pytest.importorskip("lightning.fabric")
    pytest.importorskip("litgpt.adapter_v2")
    from tests.litgpt_probe import Shape, adapter_optimizer_held, hf_config

    shape = Shape(arch="phi-1.5", layers=3, kv_heads=4)
    real = adapter_optimizer_held("bf16", shape, method)
    cfg = hf_config(shape)
    spec = make_spec(
        model={"architecture": cfg, "implementation": "litgpt"},
        precision="bf16",
        training={"micro_batch_size": shape.batch, "sequence_length": shape.seq},
        finetune={"method": method},
        hardware={"device": "cpu"},
    )
    inv = finetune.apply(spec, from_config(cfg))
    assert set(real.with_state) == {t.name for t in inv.parameters if t.trainable}
    report = estimate(spec, from_config(cfg))
    mine = {t.name: (t.tensors, t.bytes) for t in report.per_gpu.terms}
    for key in ("exp_avg", "exp_avg_sq"):
        assert mine[key] == real.by_key[key]
    assert sum(t.bytes for t in report.per_gpu.terms if t.category == "gradients") == (
        real.grad_bytes
    )
    cache = sum(
        b.numel * dtype_bytes(b.dtype or spec.recipe().parameters)
        for b in inv.buffers
        if "adapter_kv_cache" in b.name
    )
    assert cache == real.cache_bytes
