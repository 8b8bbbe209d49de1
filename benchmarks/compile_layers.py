"""What a torch.compile'd decoder layer keeps for backward beyond Llama's: Qwen3's per-head q/k
norms, Qwen2's (and a biased Llama's) projection biases and OLMo 2's layer, traced against
memplan's compiled rule (memplan.model.forward.compiled) over a grid of shapes.

Each case runs the real layer on real CPU tensors at two (batch, sequence) sizes through
torch.compile's Inductor path up to code generation (memplan.verify.trace.compiled:
torch/_inductor/compile_fx.py::compile_fx, AOTAutograd's min_cut_rematerialization_partition)
and reads, per tensor the forward graph passes to the backward, its dtype and bytes per token
(the tensors that do not grow with the tokens are weights and RoPE's cache). The rule's tensors
at the same shape, per token, must be the same multiset of (dtype, bytes per token): "exact".
RoPE's cos and sin, [b, s, head_dim] each, are transformers' model-level inputs of the layer
(memplan's embeddings block), taken out of the transformers traces before comparing.

Layers (torch 2.13, SDPA: the CPU flash op, which saves what CUDA's flash kernel saves less its
philox state):
  torchtitan Qwen3     torchtitan 0.3.0 Qwen3TransformerBlock (fused wqkv, q_norm / k_norm,
                       CosSinRoPE), parameters as FSDP2's MixedPrecisionPolicy presents them:
                       compiled; per-op SelectiveAC then compiled (the CPU flash op added to its
                       save list as cuDNN's / flash's is on CUDA); FullAC then compiled; torchao
                       0.18 Float8Linear (tensorwise, rowwise) then compiled; SAC + Float8
  transformers Qwen3   transformers 5.25 Qwen3DecoderLayer, with and without attention_bias
  transformers Qwen2   Qwen2DecoderLayer (q/k/v biases; head_dim = hidden / heads)
  transformers Llama   LlamaDecoderLayer with attention_bias and mlp_bias (biases on all seven)
  transformers OLMo 2  Olmo2DecoderLayer (full-width q/k norms, post-norms), with and without
                       attention_bias; its cos / sin are fp32

Shapes: GQA ratios 1 (MHA), 2, 5, 8 (MQA at 8 heads), head_dim equal to and different from
hidden / heads (Qwen3 and Llama take an explicit head_dim; Qwen2 and OLMo 2 do not), bf16 and
fp32; and
Qwen3-8B's widths (hidden 4096, 32 / 8 heads, head_dim 128, ffn 12288) compiled in bf16.

    PYTHONPATH=$PWD python benchmarks/compile_layers.py   # ~6 min on 2 quiet cores
    # writes benchmarks/results/compile-layers.json; tests/test_compile_layers.py checks the
    # rule against every stored trace and re-traces a few cases
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.forward import compiled as rule  # noqa: E402
from memplan.verify.trace import compiled as trace  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-layers.json"
SIZES = [(1, 32), (2, 32)]
SHAPES: dict[str, dict[str, int]] = {
    # hidden, heads, kv_heads, head_dim, inter
    "gqa2-d32": {"hidden": 96, "heads": 4, "kv_heads": 2, "head_dim": 32, "inter": 176},
    "mqa8-d16": {"hidden": 128, "heads": 8, "kv_heads": 1, "head_dim": 16, "inter": 256},
    "mha-d24": {"hidden": 64, "heads": 4, "kv_heads": 4, "head_dim": 24, "inter": 160},
    "gqa5-d16": {"hidden": 160, "heads": 10, "kv_heads": 2, "head_dim": 16, "inter": 320},
}
QWEN3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "inter": 12288}
"""huggingface.co/Qwen/Qwen3-8B config.json: hidden_size 4096, num_attention_heads 32,
num_key_value_heads 8, head_dim 128, intermediate_size 12288."""
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sac(block: torch.nn.Module) -> torch.nn.Module:
    from torchtitan.distributed.activation_checkpoint import (  # type: ignore[import-untyped]
        SelectiveAC,
    )

    class CudaSAC(SelectiveAC):  # type: ignore[misc]
        def get_save_ops(self) -> set[Any]:
            cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return super().get_save_ops() | {cpu_flash}

    wrapped: torch.nn.Module = CudaSAC(SelectiveAC.Config())._wrap_block(block)
    return wrapped


def _full(block: torch.nn.Module) -> torch.nn.Module:
    from torchtitan.distributed.activation_checkpoint import FullAC  # type: ignore[import-untyped]

    wrapped: torch.nn.Module = FullAC(FullAC.Config())._wrap_block(block)
    return wrapped


def _float8(block: torch.nn.Module, recipe: str) -> torch.nn.Module:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(block, config=Float8LinearConfig.from_recipe_name(recipe))
    return block


def qwen3_block(shape: dict[str, int], dtype: str, wrap: Callable[..., Any] | None = None) -> Any:
    torch.manual_seed(0)
    block = trace.torchtitan_qwen3_block(
        dim=shape["hidden"],
        n_heads=shape["heads"],
        n_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        hidden_dim=shape["inter"],
        max_seq_len=128,
    )
    if wrap is not None:
        block = wrap(block)
    if dtype == "bf16":
        block = trace.bf16_parameters(block)
    width = shape["hidden"]

    def inputs(b: int, s: int) -> tuple[Any, ...]:
        return torch.randn(b, s, width, dtype=DTYPES[dtype], requires_grad=True), None, None

    return block, inputs, None


def hf_layer(model_type: str, shape: dict[str, int], dtype: str, **extra: Any) -> Any:
    config: dict[str, Any] = {
        "hidden_size": shape["hidden"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "intermediate_size": shape["inter"],
        **extra,
    }
    if model_type != "qwen2":
        config["head_dim"] = shape["head_dim"]
    torch.manual_seed(0)
    layer = trace.TransformersLayer(model_type, DTYPES[dtype], **config)
    return layer, layer.inputs, layer.rope_bytes_per_token


def traced(module: Any, inputs: Any, rope: tuple[str, int] | None) -> Counter[tuple[str, int]]:
    """(dtype, bytes per token) of each tensor the compiled forward passes to its backward."""
    small, large = (trace.compiled_saved(module, *inputs(b, s)) for b, s in SIZES)
    tokens = (SIZES[0][0] * SIZES[0][1], SIZES[1][0] * SIZES[1][1])
    kept = Counter((dtype, n) for _, dtype, n in trace.per_token_tensors(small, large, tokens))
    if rope is not None:
        # cos and sin: the model's, inputs of the layer.
        assert kept[rope] >= 2, (kept, rope)
        kept -= Counter({rope: 2})
    return kept


def rule_per_token(
    shape: dict[str, int], dtype: str, *, kind: str, qk_norm: bool, float8: bool
) -> Counter[tuple[str, int]]:
    b, s = SIZES[0]
    dims = {"batch": b, "seq": s, "dtype": dtype, **shape}
    if kind == "sac":
        layer = rule.op_sac_layer(**dims)
    elif kind == "full":
        # Full checkpointing keeps the layer's input alone (memplan.model.stacks.torchtitan).
        return Counter({(dtype, shape["hidden"] * (2 if dtype == "bf16" else 4)): 1})
    elif kind == "olmo2":
        layer = rule.olmo2_layer(**dims)
    else:
        layer = rule.llama_layer(qk_norm=qk_norm, float8=float8, **dims)
    return Counter((t.dtype, t.bytes // (b * s)) for t in layer)


def cases() -> list[dict[str, Any]]:
    """Every case: layer, variant, shape name, dtype, the rule's arguments, and a builder."""
    out: list[dict[str, Any]] = []

    def add(layer: str, variant: str, shape: str, dtype: str, build: Any, **kw: Any) -> None:
        args = {"kind": "none", "qk_norm": False, "float8": False, **kw}
        out.append(
            {"layer": layer, "variant": variant, "shape": shape, "dtype": dtype, "rule": args}
            | {"build": build}
        )

    shapes = {**SHAPES}
    for name, shape in shapes.items():
        for dtype in ("bf16", "fp32"):
            add(
                "torchtitan Qwen3TransformerBlock",
                "compile",
                name,
                dtype,
                lambda sh=shape, dt=dtype: qwen3_block(sh, dt),
                qk_norm=True,
            )
        add(
            "torchtitan Qwen3TransformerBlock",
            "per-op SAC + compile",
            name,
            "bf16",
            lambda sh=shape: qwen3_block(sh, "bf16", _sac),
            kind="sac",
        )
        add(
            "torchtitan Qwen3TransformerBlock",
            "full AC + compile",
            name,
            "bf16",
            lambda sh=shape: qwen3_block(sh, "bf16", _full),
            kind="full",
        )
        for recipe in ("tensorwise", "rowwise"):
            add(
                "torchtitan Qwen3TransformerBlock",
                f"float8 {recipe} + compile",
                name,
                "bf16",
                lambda sh=shape, r=recipe: qwen3_block(sh, "bf16", lambda b: _float8(b, r)),
                qk_norm=True,
                float8=True,
            )
        add(
            "torchtitan Qwen3TransformerBlock",
            "per-op SAC + float8 tensorwise + compile",
            name,
            "bf16",
            lambda sh=shape: qwen3_block(sh, "bf16", lambda b: _sac(_float8(b, "tensorwise"))),
            kind="sac",
        )
        # Qwen2 and OLMo 2 take head_dim = hidden / heads (their configs have no head_dim).
        own = {**shape, "head_dim": shape["hidden"] // shape["heads"]}
        own_name = f"{name.split('-')[0]}-d{own['head_dim']}"
        for dtype in ("bf16", "fp32"):
            add(
                "transformers Qwen3DecoderLayer",
                "compile",
                name,
                dtype,
                lambda sh=shape, dt=dtype: hf_layer("qwen3", sh, dt),
                qk_norm=True,
            )
            add(
                "transformers Qwen2DecoderLayer",
                "compile",
                own_name,
                dtype,
                lambda sh=own, dt=dtype: hf_layer("qwen2", sh, dt),
            )
            add(
                "transformers Olmo2DecoderLayer",
                "compile",
                own_name,
                dtype,
                lambda sh=own, dt=dtype: hf_layer("olmo2", sh, dt),
                kind="olmo2",
            )
        add(
            "transformers Qwen3DecoderLayer",
            "attention_bias + compile",
            name,
            "bf16",
            lambda sh=shape: hf_layer("qwen3", sh, "bf16", attention_bias=True),
            qk_norm=True,
        )
        add(
            "transformers Olmo2DecoderLayer",
            "attention_bias + compile",
            own_name,
            "bf16",
            lambda sh=own: hf_layer("olmo2", sh, "bf16", attention_bias=True),
            kind="olmo2",
        )
        add(
            "transformers LlamaDecoderLayer",
            "attention_bias + mlp_bias + compile",
            name,
            "bf16",
            lambda sh=shape: hf_layer("llama", sh, "bf16", attention_bias=True, mlp_bias=True),
        )
    add(
        "torchtitan Qwen3TransformerBlock",
        "compile",
        "qwen3-8b",
        "bf16",
        lambda: qwen3_block(QWEN3_8B, "bf16"),
        qk_norm=True,
    )
    add(
        "transformers Qwen3DecoderLayer",
        "compile",
        "qwen3-8b",
        "bf16",
        lambda: hf_layer("qwen3", QWEN3_8B, "bf16"),
        qk_norm=True,
    )
    return out


def shape_of(name: str) -> dict[str, int]:
    if name == "qwen3-8b":
        return QWEN3_8B
    base, d = name.split("-")
    (full,) = (v for k, v in SHAPES.items() if k.split("-")[0] == base)
    return {**full, "head_dim": int(d.removeprefix("d"))}


def main() -> None:
    start = time.time()
    rows = []
    for case in cases():
        t0 = time.time()
        module, inputs, rope = case.pop("build")()
        kept = traced(module, inputs, rope)
        expected = rule_per_token(shape_of(case["shape"]), case["dtype"], **case["rule"])
        row = {
            **case,
            "dims": shape_of(case["shape"]),
            "traced_per_token_bytes": sum(n for _, n in kept.elements()),
            "rule_per_token_bytes": sum(n for _, n in expected.elements()),
            "exact": kept == expected,
            "traced": sorted([dtype, n, count] for (dtype, n), count in kept.items()),
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(
            f"{row['layer']:34s} {row['variant']:40s} {row['shape']:9s} {row['dtype']:4s} "
            f"traced {row['traced_per_token_bytes']:>9,} rule {row['rule_per_token_bytes']:>9,} "
            f"{'exact' if row['exact'] else 'DIFFERENT'}",
            flush=True,
        )
    exact = sum(r["exact"] for r in rows)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_layers.py",
        "traced_sizes": SIZES,
        "versions": {
            name: _version(name) for name in ("torch", "torchtitan", "torchao", "transformers")
        },
        "summary": f"{exact} of {len(rows)} cases exact",
        "cases": rows,
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
