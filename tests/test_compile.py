"""`training.compile`: what a torch.compile'd decoder layer saves (memplan.model.forward.compiled)
against the real thing: Inductor's own partition of the layer's joint graph
(memplan.verify.trace.compiled runs torch/_inductor/compile_fx.py::compile_fx up to code
generation) for transformers' LlamaDecoderLayer and torchtitan's Llama3TransformerBlock.
Small widths, two token counts: each traced tensor's bytes per token against the rule's."""

from __future__ import annotations

from collections import Counter

import pytest

from memplan.config.spec import Spec, TrainingSpec
from memplan.model.forward import compiled
from memplan.model.load import PRESET_DIR, read_json
from memplan.model.sources import from_config
from memplan.report.estimate import estimate

DIMS = {"hidden": 96, "heads": 4, "kv_heads": 2, "head_dim": 24, "inter": 176}
SIZES = ((1, 32), (2, 32))


def rule_per_token(layer: tuple) -> Counter:
    tokens = SIZES[0][0] * SIZES[0][1]
    return Counter((t.dtype, t.bytes // tokens) for t in layer)


def traced_per_token(module, make_inputs) -> Counter:
    from memplan.verify.trace.compiled import compiled_saved, per_token_tensors

    small, large = (compiled_saved(module, *make_inputs(b, s)) for b, s in SIZES)
    tokens = (SIZES[0][0] * SIZES[0][1], SIZES[1][0] * SIZES[1][1])
    return Counter((dtype, n) for _, dtype, n in per_token_tensors(small, large, tokens))


def rule(fn=compiled.llama_layer) -> tuple:
    b, s = SIZES[0]
    return fn(batch=b, seq=s, dtype="bf16", **DIMS)


def test_transformers_llama_layer_saves_what_inductor_partition_keeps() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from memplan.verify.trace.compiled import bf16_parameters

    config = LlamaConfig(
        hidden_size=DIMS["hidden"],
        num_attention_heads=DIMS["heads"],
        num_key_value_heads=DIMS["kv_heads"],
        intermediate_size=DIMS["inter"],
        num_hidden_layers=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    layer = bf16_parameters(LlamaDecoderLayer(config, 0))
    rope = LlamaRotaryEmbedding(config)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x, cos, sin):
            return self.layer(x, attention_mask=None, position_embeddings=(cos, sin))

    def inputs(b: int, s: int):
        x = torch.randn(b, s, DIMS["hidden"], dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rope(x, torch.arange(s)[None].expand(b, s))
        return x, cos, sin

    traced = traced_per_token(Layer(), inputs)
    # RoPE's cos and sin [b, s, head_dim] are the model's (made once per forward, memplan's
    # embeddings block), inputs of the compiled layer: not the layer's own.
    cos_sin = Counter({("bf16", DIMS["head_dim"] * 2): 2})
    assert traced - cos_sin == rule_per_token(rule())
    assert traced[("bf16", DIMS["head_dim"] * 2)] == 2


def _torchtitan_block():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from memplan.verify.trace.compiled import bf16_parameters, torchtitan_llama3_block

    torch.manual_seed(0)
    return bf16_parameters(
        torchtitan_llama3_block(
            dim=DIMS["hidden"],
            n_heads=DIMS["heads"],
            n_kv_heads=DIMS["kv_heads"],
            hidden_dim=DIMS["inter"],
            max_seq_len=64,
        )
    )


def _block_inputs(b: int, s: int):
    import torch

    x = torch.randn(b, s, DIMS["hidden"], dtype=torch.bfloat16, requires_grad=True)
    return x, None, None


def test_torchtitan_block_saves_what_inductor_partition_keeps() -> None:
    block = _torchtitan_block()
    assert traced_per_token(block, _block_inputs) == rule_per_token(rule())


def test_torchtitan_op_sac_and_full_ac_compiled() -> None:
    """torchtitan's per-op SAC and full AC wrappers, then compile (parallelize_llama's order).
    On a CPU build SDPA runs the CPU flash op, which torchtitan's save list does not name (it
    names cuDNN's, which H100 runs): added to it, as the CUDA op would be saved."""
    torch = pytest.importorskip("torch")
    block = _torchtitan_block()
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    class CudaSAC(SelectiveAC):
        def get_save_ops(self) -> set:
            cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return super().get_save_ops() | {cpu_flash}

    sac = CudaSAC(SelectiveAC.Config())._wrap_block(block)
    assert traced_per_token(sac, _block_inputs) == rule_per_token(rule(compiled.op_sac_layer))
    full = FullAC(FullAC.Config())._wrap_block(_torchtitan_block())
    assert traced_per_token(full, _block_inputs) == Counter({("bf16", DIMS["hidden"] * 2): 1})


def _estimate(training: dict, fp8: str = "none"):
    config = read_json(PRESET_DIR / "llama-3-8b.json", what="preset")
    spec = Spec.model_validate(
        {
            "model": {"architecture": config},
            "precision": {"preset": "bf16", "fp8": fp8},
            "training": {"micro_batch_size": 2, "sequence_length": 8192, **training},
        }
    )
    return estimate(spec, from_config(config))


def test_compile_defaults_off() -> None:
    assert TrainingSpec().compile is False


def test_pin_estimate_uses_compiled_layer_for_llama_3_8b() -> None:
    """139,400 bytes per token and layer: the rule at Llama 3.1 8B's widths (the same figure
    benchmarks/compile_float8.py traces at full width: benchmarks/results/compile-float8.json)."""
    report = _estimate({"compile": True})
    acts = report.activations
    layers = acts.block("layers")
    assert layers is not None
    assert layers.bytes_each == 139_400 * 2 * 8192
    eager = _estimate({}).activations
    assert eager.bytes - acts.bytes == 32 * (eager.block("layers").bytes_each - layers.bytes_each)


def _torchtitan(training: dict, fp8: str = "none"):
    config = read_json(PRESET_DIR / "llama-3-8b.json", what="preset")
    spec = Spec.model_validate(
        {
            "model": {"architecture": config, "implementation": "torchtitan"},
            "precision": {"preset": "bf16-mixed", "fp8": fp8},
            "training": {"micro_batch_size": 2, "sequence_length": 8192, **training},
            "parallelism": {"engine": "fsdp2", "data": 8},
        }
    )
    return estimate(spec, from_config(config)).activations


@pytest.mark.parametrize(
    ("training", "fp8", "per_token"),
    [
        # benchmarks/results/compile-float8.json, traced by Inductor's partition on torchtitan
        # 0.3.0's block at Llama 3 8B's widths: "torchtitan compile", "... + float8", "per-op
        # SAC + compile".
        ({"compile": True}, "none", 139_400),
        ({"compile": True}, "torchao-tensorwise", 94_344),
        ({"compile": True, "activation_checkpointing": "selective-op"}, "none", 57_472),
        ({"compile": True, "activation_checkpointing": "full"}, "none", 8_192),
    ],
)
def test_torchtitan_estimate_keeps_the_traced_compiled_block(
    training: dict, fp8: str, per_token: int
) -> None:
    """model.implementation: torchtitan with compile: each block keeps the set the partitioner
    kept on torchtitan's own block (the per-token figures the trace measured)."""
    layers = _torchtitan(training, fp8).block("layers")
    assert layers is not None
    assert layers.bytes_each == per_token * 2 * 8192


def test_compile_where_not_traced_keeps_eager_and_says_so() -> None:
    eager = _estimate({"activation_checkpointing": "selective"}).activations
    acts = _estimate({"compile": True, "activation_checkpointing": "selective"}).activations
    assert acts.bytes == eager.bytes
    assert any("training.compile" in n and "selective" in n for n in acts.notes)
    full = _estimate({"compile": True, "activation_checkpointing": "full"}).activations
    assert full.bytes == _estimate({"activation_checkpointing": "full"}).activations.bytes


# --- torchao Float8 (precision.fp8: torchao-tensorwise / torchao-rowwise) -------------------


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linear_saves_what_nn_linear_saves(recipe: str) -> None:
    """Eager: torchao's Float8Linear saves its 16-bit input and weight, exactly the storages
    nn.Linear saves (run on CPU: torchao's casts and torch._scaled_mm run there): so the eager
    rules' activations stand unchanged under torchao fp8."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from memplan.verify.trace.compiled import eager_saved

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False)).to(torch.bfloat16)
    converted = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False)).to(torch.bfloat16)
    convert_to_float8_training(converted, config=Float8LinearConfig.from_recipe_name(recipe))
    assert type(converted[0]).__name__ == "Float8Linear"
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    fp8 = eager_saved(converted, x)
    bf16 = eager_saved(plain, x)
    # The same storages (nn.Linear's node sees the input folded to 2-D: a view of it).
    assert sorted((s.dtype, s.nbytes) for s in fp8) == sorted((s.dtype, s.nbytes) for s in bf16)
    assert len(fp8) == 2  # the input and the weight (its transposed view)


def test_compiled_float8_block_saves_what_inductor_partition_keeps() -> None:
    """torchtitan's block with every Linear converted (Float8LinearConverter converts the
    blocks' Linears), tensorwise, then compiled: the rule's float8 set (rowwise traces the same:
    benchmarks/results/compile-float8.json)."""
    pytest.importorskip("torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    block = _torchtitan_block()
    convert_to_float8_training(block, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    b, s = SIZES[0]
    expected = compiled.llama_layer(batch=b, seq=s, dtype="bf16", float8=True, **DIMS)
    assert traced_per_token(block, _block_inputs) == rule_per_token(expected)


def test_torchao_fp8_adds_no_transformer_engine_state() -> None:
    plain = _estimate({}, fp8="none")
    torchao = _estimate({}, fp8="torchao-tensorwise")
    assert torchao.activations.bytes == plain.activations.bytes
    te = _estimate({}, fp8="delayed")
    for name in ("fp8_scaling_state", "fp8_weights"):
        assert name in _term_names(te)
        assert name not in _term_names(torchao)
    assert any("torchao Float8Linear" in n for n in torchao.notes)
    compiled_fp8 = _estimate({"compile": True}, fp8="torchao-rowwise").activations.block("layers")
    assert compiled_fp8 is not None
    b, s = 2, 8192
    # Llama 3.1 8B's widths (pinning: the rule itself, at the preset's config).
    layer = compiled.llama_layer(
        batch=b,
        seq=s,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        inter=14336,
        dtype="bf16",
        float8=True,
    )
    assert compiled_fp8.bytes_each == sum(t.bytes for t in layer)


def _term_names(report) -> set[str]:
    names = {t.name for t in report.timeline.transients}
    return names | {t.name for t in report.buffers}


# --- training.compile_loss: torchtitan 0.3.0 compiles its cross entropy with the model ---------


def test_compiled_loss_saves_what_inductor_partition_keeps() -> None:
    """torchtitan 0.3.0's cross_entropy_loss (components/loss.py: `cross_entropy(pred.flatten(0,
    1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=-100)`) compiled, traced
    through Inductor's partition at two token counts: per token, the rule's loss block (the
    bf16 logits, the int64 labels, two fp32 statistics)."""
    torch = pytest.importorskip("torch")
    from memplan.verify.trace.compiled import compiled_saved, per_token_tensors

    vocab = 1000

    class Loss(torch.nn.Module):
        def forward(self, pred, labels):  # type: ignore[no-untyped-def]
            return torch.nn.functional.cross_entropy(
                pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
                ignore_index=-100,
            )  # fmt: skip

    def inputs(b: int, s: int) -> tuple:
        pred = torch.randn(b, s, vocab, dtype=torch.bfloat16, requires_grad=True)
        return pred, torch.randint(0, vocab, (b, s))

    small, large = (compiled_saved(Loss(), *inputs(b, s)) for b, s in SIZES)
    tokens = (SIZES[0][0] * SIZES[0][1], SIZES[1][0] * SIZES[1][1])
    traced = Counter((dtype, n) for _, dtype, n in per_token_tensors(small, large, tokens))
    arch = from_config({**_TINY, "vocab_size": vocab}).architecture
    assert arch is not None
    loss = _loss_block(arch, compile_loss=True)
    b, s = SIZES[0]
    assert traced == Counter((t.dtype, t.bytes // (b * s)) for t in loss.tensors)


_TINY = {
    "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
}  # fmt: skip


def _loss_block(arch, *, compile_loss: bool):  # type: ignore[no-untyped-def]
    from memplan.model.forward.tensors import Setting
    from memplan.model.stacks import torchtitan

    b, s = SIZES[0]
    st = Setting(
        batch=b, sequence=s, stream="bf16", matmul="bf16", autocast=False, device="cuda",
        attention="sdpa", dropout=0.0, checkpointing="none", implementation="torchtitan",
        compile=True, compile_loss=compile_loss,
    )  # fmt: skip
    block = torchtitan.saved(arch, st).block("loss")
    assert block is not None
    return block


def test_compile_loss_default_follows_torchtitan_0_3_0() -> None:
    """With compile on, torchtitan 0.3.0 compiles the loss (CompileConfig.components defaults to
    ["model", "loss"]): its fp32 log-softmax [tokens, vocab] is gone, the bf16 logits are
    kept instead, and the loss gradient is one bf16 [tokens, vocab] tensor; compile_loss: false
    (torchtitan 9dec370, the published 2024 runs) keeps the eager loss."""
    compiled_loss = _torchtitan({"compile": True})
    eager_loss = _torchtitan({"compile": True, "compile_loss": False})
    tokens, vocab = 2 * 8192, 128_256
    loss = compiled_loss.block("loss")
    assert loss is not None and loss.bytes == tokens * (vocab * 2 + 8 + 4 + 4)
    assert eager_loss.block("loss").bytes > tokens * vocab * 4
    assert compiled_loss.loss_gradient_bytes == tokens * vocab * 2
    assert (compiled_loss.logits_bytes, compiled_loss.upcast_bytes) == (0, 0)
    assert eager_loss.loss_gradient_bytes is None


def test_compile_loss_needs_compile() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compile_loss"):
        TrainingSpec(compile_loss=True)
