"""Per-layer saved bytes of Llama 3.1 8B's decoder layer: eager vs torch.compile vs torchao
Float8, traced at full width, scaled to 2 x 8192 tokens (the published torchtitan rows).

Each variant runs the real layer on real CPU tensors at three small (batch, sequence) sizes
and counts what its forward passes to its backward (memplan.verify.trace.compiled): for
compiled variants the forward graph Inductor gets after AOTAutograd's min-cut partition
(torch/_inductor/compile_fx.py::compile_fx, code generation skipped); for eager ones the
storages autograd saves (saved_tensors_hooks) plus, under per-op SAC, the outputs
torch/utils/checkpoint.py::_CachingTorchDispatchMode caches. Saved bytes are fitted as
constant + per_token x tokens (the constant: weights and RoPE's cache, not activations) and the
per-token figure is checked on the third size. Layers:

  torchtitan  Llama3TransformerBlock (torchtitan 0.3.0, fused wqkv, SDPA inner attention as
              the Dec 2024 runs used; CPU flash op, saving what CUDA's flash/cuDNN save)
  transformers LlamaDecoderLayer (5.25, sdpa), compiled; RoPE's cos/sin (the model's, one pair
              per forward) excluded

Variants: eager; compile; compile + Float8 tensorwise / rowwise (torchao 0.18
convert_to_float8_training on every Linear of the block); full AC + compile; per-op SAC
(torchtitan SelectiveAC, the CPU flash op added to its save list as cuDNN's is on H100) eager
and compiled; per-op SAC + Float8 + compile. memplan's figures beside them: the compiled rule
(memplan.model.forward.compiled) and the eager transformers rule (memplan.activations.predict).

The eager torchtitan figures run CPU kernels (F.rms_norm decomposes on CPU where CUDA runs
_fused_rms_norm): indicative, not the CUDA eager layer.

    PYTHONPATH=$PWD python benchmarks/compile_float8.py   # ~4 min on 2 quiet cores
    # writes benchmarks/results/compile-float8.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.activations import predict  # noqa: E402
from memplan.model.forward import compiled as rule  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.model.load import PRESET_DIR, read_json  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.verify.trace import compiled as trace  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-float8.json"
DIM, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 4096, 32, 8, 128, 14336, 32
SIZES = [(1, 64), (2, 64), (1, 128)]
TOKENS = 2 * 8192
GIB = 2**30


def block(float8: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    b = trace.torchtitan_llama3_block(
        dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, hidden_dim=INTER, max_seq_len=256
    )
    if float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(b, config=Float8LinearConfig.from_recipe_name(float8))
    return trace.bf16_parameters(b)


def sac(module: torch.nn.Module, holder: dict[str, Any] | None = None) -> torch.nn.Module:
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    class CudaSAC(SelectiveAC):
        def get_save_ops(self) -> set:
            cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return super().get_save_ops() | {cpu_flash}

    wrapped = CudaSAC(SelectiveAC.Config())._wrap_block(module)
    if holder is not None:
        context_fn = wrapped.checkpoint_fn.keywords["context_fn"]

        def capturing() -> Any:
            fwd, rec = context_fn()
            holder["fwd"] = fwd
            return fwd, rec

        wrapped.checkpoint_fn.keywords["context_fn"] = capturing
    return wrapped


def full_ac(module: torch.nn.Module) -> torch.nn.Module:
    from torchtitan.distributed.activation_checkpoint import FullAC

    return FullAC(FullAC.Config())._wrap_block(module)


def block_inputs(b: int, s: int) -> tuple[Any, ...]:
    return torch.randn(b, s, DIM, dtype=torch.bfloat16, requires_grad=True), None, None


def eager_sac_saved(module: torch.nn.Module, holder: dict[str, Any], *inputs: Any) -> int:
    """Eager per-op SAC: what autograd saves (the checkpoint's inputs) plus every output the
    SAC cache holds until the layer's backward; each storage once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    # _CachingTorchDispatchMode.storage[op key][call index] = the op's outputs, each wrapped
    # in a _VersionWrapper (torch/utils/checkpoint.py, 2.13).
    for calls in holder["fwd"].storage.values():
        for out in calls.values() if isinstance(calls, dict) else calls:
            for w in torch.utils._pytree.tree_leaves(out, is_leaf=lambda x: hasattr(x, "val")):
                t = getattr(w, "val", w)
                if isinstance(t, torch.Tensor):
                    seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def fit(measure: Any) -> dict[str, Any]:
    totals = [int(measure(b, s)) for b, s in SIZES]
    f = trace.per_token(SIZES, totals)
    return {
        "per_token_bytes": f.per_token,
        "constant_bytes": f.constant,
        "layer_gib_at_2x8192": round(f.per_token * TOKENS / GIB, 4),
        "model_gib_at_2x8192": round(f.per_token * TOKENS * LAYERS / GIB, 3),
    }


def transformers_layer() -> Any:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTER,
        num_hidden_layers=1,
        attn_implementation="sdpa",
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    layer = trace.bf16_parameters(LlamaDecoderLayer(config, 0))
    rope = LlamaRotaryEmbedding(config)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: Any, cos: Any, sin: Any) -> Any:
            return self.layer(x, attention_mask=None, position_embeddings=(cos, sin))

    def measure(b: int, s: int) -> int:
        x = torch.randn(b, s, DIM, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rope(x, torch.arange(s)[None].expand(b, s))
        saved = trace.compiled_saved(Layer(), x, cos, sin)
        # cos and sin: the model's per-forward tables, inputs of the layer.
        return sum(t.nbytes for t in saved) - 2 * cos.numel() * cos.element_size()

    return measure


def main() -> None:
    start = time.time()
    rows: dict[str, Any] = {}

    def run(name: str, measure: Any) -> None:
        t0 = time.time()
        rows[name] = fit(measure)
        rows[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name:42s} {rows[name]['per_token_bytes']:>8,} B/token/layer", flush=True)

    plain = block()
    run("torchtitan eager (CPU kernels)", lambda b, s: _total(trace.eager_saved, plain, b, s))
    run("torchtitan compile", lambda b, s: _total(trace.compiled_saved, plain, b, s))
    for recipe in ("tensorwise", "rowwise"):
        m = block(recipe)
        run(f"torchtitan compile + float8 {recipe}", _bind(trace.compiled_saved, m))
    run("torchtitan full AC + compile", _bind(trace.compiled_saved, full_ac(block())))
    holder: dict[str, Any] = {}
    eager_sac = sac(block(), holder)
    run(
        "torchtitan per-op SAC eager",
        lambda b, s: eager_sac_saved(eager_sac, holder, *block_inputs(b, s)),
    )
    run("torchtitan per-op SAC + compile", _bind(trace.compiled_saved, sac(block())))
    run(
        "torchtitan per-op SAC + float8 tensorwise + compile",
        _bind(trace.compiled_saved, sac(block("tensorwise"))),
    )
    run("transformers LlamaDecoderLayer compile", transformers_layer())

    dims: dict[str, Any] = {
        "batch": 1,
        "seq": 1,
        "hidden": DIM,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "inter": INTER,
        "dtype": "bf16",
    }
    config = read_json(PRESET_DIR / "llama-3-8b.json", what="preset")
    st = Setting(
        batch=2,
        sequence=8192,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cuda",
        attention="sdpa",
        dropout=False,
        checkpointing="none",
    )
    eager_rule = predict(from_config(config), st).block("layers")
    assert eager_rule is not None
    memplan = {
        "compiled rule": sum(t.bytes for t in rule.llama_layer(**dims)),
        "compiled float8 rule": sum(t.bytes for t in rule.llama_layer(float8=True, **dims)),
        "per-op SAC compiled rule": sum(t.bytes for t in rule.op_sac_layer(**dims)),
        "eager transformers rule (CUDA)": eager_rule.bytes_each // TOKENS,
    }
    for name, per_token in memplan.items():
        print(f"memplan {name:34s} {per_token:>8,} B/token/layer")
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_float8.py",
        "model": "Llama 3.1 8B layer (dim 4096, 32 heads, 8 kv heads, ffn 14336), bf16",
        "traced_sizes": SIZES,
        "scaled_to_tokens": TOKENS,
        "layers": LAYERS,
        "versions": {
            "torch": torch.__version__,
            "torchtitan": _version("torchtitan"),
            "torchao": _version("torchao"),
            "transformers": _version("transformers"),
        },
        "traced": rows,
        "memplan_per_token_bytes": memplan,
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


def _total(fn: Any, module: torch.nn.Module, b: int, s: int) -> int:
    return sum(t.nbytes for t in fn(module, *block_inputs(b, s)))


def _bind(fn: Any, module: torch.nn.Module) -> Any:
    return lambda b, s: _total(fn, module, b, s)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
