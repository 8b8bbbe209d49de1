"""What a torch.compile'd torchtitan Qwen3-MoE block keeps for backward, traced against memplan's
rule (memplan.model.forward.compiled.qwen3_moe_layer, op_sac_moe_layer), and `memplan
estimate` of Qwen3-30B-A3B with training.compile true and false.

Part 1, `cases`: torchtitan 0.3.0's Qwen3-MoE TransformerBlock (memplan.verify.trace.compiled.
torchtitan_qwen3_moe_block: models/qwen3/__init__.py::_build_qwen3_moe_layers, SDPA, the
`standard` token dispatcher local at expert parallelism 1, parameters from torchtitan's
init_states under seed 0) compiled the way torchtitan 0.3.0's distributed/compile.py::
apply_compile compiles it (the whole block, fullgraph, `capture_scalar_outputs = True`), run
on real CPU tensors at two (batch, sequence) sizes through torch.compile's Inductor path up to
code generation (memplan.verify.trace.compiled.compiled_saved: torch 2.13 torch/_inductor/
compile_fx.py::compile_fx, AOTAutograd's min_cut_rematerialization_partition). Per tensor the
forward graph passes to the backward: its dtype and bytes per token; the ones that do not grow
with the tokens and are not graph inputs (parameters) are the graph's own constants (the
grouped mms' offsets, weight casts). The rule's tensors at the same shapes must be the same
multisets of (dtype, bytes per token) and (dtype, bytes): "exact".

Grid: eight shapes (dim 64, 4 x 32 heads, 2 k/v heads, expert hidden 48, with 8, 9, 10, 46
and 47 experts top 2 (either side of where the partition keeps the router's softmax as the
gate's output and two row statistics instead: compiled.SOFTMAX_STATS_FROM), 16 experts top 5
(route_norm's sum kept from top_k 5: compiled.BAN_REDUCTION_RATIO) and Qwen3-30B-A3B's 128
experts top 8; dim 128, 8 x 16 heads, 2 k/v heads, 16 experts, top 4, expert hidden 24),
each with: bf16 parameters (FSDP2's param_dtype) under the three routings (seeded;
torchtitan's `_debug_force_load_balance` round-robin; "collapsed": every token on experts
0 .. top_k - 1); the router as CUDA autocast runs it (the gate's input and weight cast to fp32:
`cuda_router`; otherwise as on CPU, where autocast is off for fp32 and the gate runs in the
parameters' dtype); fp32 parameters; torchtitan's per-op SelectiveAC (the CPU flash op added to
its save list, as benchmarks/compile_layers.py does, as cuDNN's / flash's is on CUDA) and
FullAC, each wrapped before compile as parallelize_qwen3 does; and a few crossings of these.
And one Qwen3-30B-A3B block at its full widths (QWEN3_30B_A3B), bf16, both routers.

Part 2, `estimates`: `memplan estimate` of Qwen3-30B-A3B (memplan's preset), torchtitan's
model code, FSDP2 over 64 ranks, local batch 2 x 4096 (config_registry.py::qwen3_30b_a3b's),
bf16-mixed AdamW, H100-80GB, expandable_segments: activations and peak allocated for
training.compile false and true under none / full / selective-op.

    PYTHONPATH=$PWD python benchmarks/compile_moe.py   # ~6 min on 2 quiet cores, 4.5 GB
    # writes benchmarks/results/compile-moe.json; tests/test_compile_moe.py checks the rule
    # against every stored trace and re-traces one case
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.compile_layers import _full, _sac  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan.model.forward import compiled as rule  # noqa: E402
from memplan.verify.trace import compiled as trace  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-moe.json"
SIZES = [(1, 32), (2, 32)]
SHAPES: dict[str, dict[str, int]] = {
    "e8k2": {
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "experts": 8,
        "top_k": 2,
        "moe_inter": 48,
    },
    "e16k4": {
        "hidden": 128,
        "heads": 8,
        "kv_heads": 2,
        "head_dim": 16,
        "experts": 16,
        "top_k": 4,
        "moe_inter": 24,
    },
}
SHAPES |= {
    f"e{e}k{k}": {**SHAPES["e8k2"], "experts": e, "top_k": k}
    for e, k in ((9, 2), (10, 2), (46, 2), (47, 2), (16, 5), (128, 8))
}
QWEN3_30B_A3B = {
    "hidden": 2048,
    "heads": 32,
    "kv_heads": 4,
    "head_dim": 128,
    "experts": 128,
    "top_k": 8,
    "moe_inter": 768,
}
"""huggingface.co/Qwen/Qwen3-30B-A3B config.json (torchtitan 0.3.0 models/qwen3/__init__.py::
_30b_a3b): hidden_size 2048, 32 / 4 heads, head_dim 128, 128 experts, top 8, expert hidden
768: one block at its full widths, traced with both routers (about 20 s each, 4.5 GB)."""
WIDE = {"qwen3-30b-a3b": QWEN3_30B_A3B}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WRAPS = {"none": None, "selective-op": _sac, "full": _full}


def block(
    shape: dict[str, int], dtype: str, mode: str, routing: str, cuda_router: bool
) -> torch.nn.Module:
    module = trace.torchtitan_qwen3_moe_block(
        dim=shape["hidden"],
        n_heads=shape["heads"],
        n_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        moe_hidden_dim=shape["moe_inter"],
        num_experts=shape["experts"],
        top_k=shape["top_k"],
        routing=routing,
        cuda_router=cuda_router,
        max_seq_len=128,
    )
    wrap = WRAPS[mode]
    if wrap is not None:
        module = wrap(module)
    if dtype == "bf16":
        module = trace.bf16_parameters(module)
    return module


def traced(
    shape: dict[str, int], dtype: str, mode: str, routing: str, cuda_router: bool
) -> tuple[Counter[tuple[str, int]], Counter[tuple[str, int]]]:
    """(dtype, bytes per token) of each tensor the compiled forward passes to its backward that
    grows with the tokens, and (dtype, bytes) of the graph's own constants among the rest."""
    torch._dynamo.config.capture_scalar_outputs = True  # as apply_compile sets it
    runs = []
    for b, s in SIZES:
        module = block(shape, dtype, mode, routing, cuda_router)
        x = torch.randn(b, s, shape["hidden"], dtype=DTYPES[dtype], requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU autocast's "Disabling autocast" for fp32
            runs.append(trace.compiled_saved(module, x, None, None))
    small, large = runs
    tokens = (SIZES[0][0] * SIZES[0][1], SIZES[1][0] * SIZES[1][1])
    grown = trace.per_token_tensors(small, large, tokens)
    per_token = Counter((dt, n) for _, dt, n in grown)
    names = {name for name, _, _ in grown}
    constants = Counter(
        (t.dtype, t.nbytes)
        for t in small
        if t.name not in names and not t.name.startswith("primals_")
    )
    return per_token, constants


def rule_tensors(
    shape: dict[str, int], dtype: str, mode: str, cuda_router: bool
) -> tuple[Counter[tuple[str, int]], Counter[tuple[str, int]]]:
    """The rule's (dtype, bytes per token) of the tensors that grow with the tokens and (dtype,
    bytes) of the others, from the rule at the two traced sizes."""

    def at(b: int, s: int) -> list[Any]:
        dims = {k: v for k, v in shape.items() if k not in ("experts", "moe_inter")}
        if mode == "full":
            # Full checkpointing keeps the block's input alone (memplan.model.stacks.torchtitan).
            return [(dtype, b * s * shape["hidden"] * (2 if dtype == "bf16" else 4))]
        if mode == "selective-op":
            layer = rule.op_sac_moe_layer(batch=b, seq=s, dtype=dtype, **dims)
        else:
            router = "fp32" if cuda_router else dtype
            layer = rule.qwen3_moe_layer(batch=b, seq=s, dtype=dtype, router=router, **shape)
        return [(t.dtype, t.bytes) for t in layer]

    (b0, s0), (b1, s1) = SIZES
    small, large = at(b0, s0), at(b1, s1)
    dt = b1 * s1 - b0 * s0
    per_token: Counter[tuple[str, int]] = Counter()
    constants: Counter[tuple[str, int]] = Counter()
    for (dtype_a, n0), (_, n1) in zip(small, large, strict=True):
        if n1 == n0:
            constants[(dtype_a, n0)] += 1
        else:
            per_token[(dtype_a, (n1 - n0) // dt)] += 1
    return per_token, constants


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(shape: str, dtype: str, mode: str, routing: str, cuda_router: bool) -> None:
        case = {
            "shape": shape,
            "dtype": dtype,
            "mode": mode,
            "routing": routing,
            "cuda_router": cuda_router,
        }
        if case not in out:
            out.append(case)

    for shape in SHAPES:
        for routing in ("seeded", "balanced", "collapsed"):
            add(shape, "bf16", "none", routing, False)
        add(shape, "bf16", "none", "seeded", True)
        add(shape, "fp32", "none", "seeded", False)
        add(shape, "bf16", "selective-op", "seeded", False)
        add(shape, "bf16", "full", "seeded", False)
    add("e8k2", "bf16", "none", "collapsed", True)
    add("e128k8", "bf16", "none", "balanced", True)
    add("e8k2", "fp32", "none", "seeded", True)
    add("e10k2", "fp32", "none", "seeded", True)
    add("e8k2", "bf16", "selective-op", "collapsed", False)
    add("e8k2", "bf16", "selective-op", "seeded", True)
    add("e8k2", "fp32", "selective-op", "seeded", False)
    add("qwen3-30b-a3b", "bf16", "none", "seeded", False)
    add("qwen3-30b-a3b", "bf16", "none", "seeded", True)
    return out


def shape_of(name: str) -> dict[str, int]:
    return {**SHAPES, **WIDE}[name]


def spec_of(mode: str, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"preset": "qwen3-30b-a3b", "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 4096,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": 64},
        "hardware": {"gpu": "H100-80GB", "alloc_conf": "expandable_segments:True"},
    }


def estimates() -> list[dict[str, Any]]:
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    rows = []
    for mode in ("none", "full", "selective-op"):
        for compile_ in (False, True):
            loaded = validate(spec_of(mode, compile_))
            report = estimate(loaded.spec, load_inventory(loaded))
            rows.append(
                {
                    "checkpointing": mode,
                    "compile": compile_,
                    "modelled": report.activations.modelled,
                    "activations_bytes": report.activations.bytes,
                    "peak_allocated_bytes": report.peak_bytes,
                    "notes": [n for n in report.activations.notes if "compile" in n],
                }
            )
            print(
                f"Qwen3-30B-A3B {mode:12s} compile {compile_!s:5s} activations "
                f"{report.activations.bytes / 2**30:7.2f} GiB peak allocated "
                f"{report.peak_bytes / 2**30:7.2f} GiB",
                flush=True,
            )
    return rows


def main() -> None:
    start = time.time()
    rows = []
    for case in cases():
        t0 = time.time()
        shape = shape_of(case["shape"])
        kept, constants = traced(
            shape, case["dtype"], case["mode"], case["routing"], case["cuda_router"]
        )
        want, want_constants = rule_tensors(shape, case["dtype"], case["mode"], case["cuda_router"])
        row = {
            **case,
            "dims": shape,
            "traced_per_token_bytes": sum(n for _, n in kept.elements()),
            "rule_per_token_bytes": sum(n for _, n in want.elements()),
            "exact": kept == want and constants == want_constants,
            "traced": sorted([dt, n, count] for (dt, n), count in kept.items()),
            "traced_constants": sorted([dt, n, count] for (dt, n), count in constants.items()),
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(
            f"{case['shape']:6s} {case['dtype']:4s} {case['mode']:12s} {case['routing']:9s} "
            f"{'cuda-router' if case['cuda_router'] else 'cpu-router ':11s} traced "
            f"{row['traced_per_token_bytes']:>6,} rule {row['rule_per_token_bytes']:>6,} B/token "
            f"{'exact' if row['exact'] else 'DIFFERENT'} ({row['seconds']} s)",
            flush=True,
        )
    exact = sum(r["exact"] for r in rows)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_moe.py",
        "traced_sizes": SIZES,
        "versions": {name: _version(name) for name in ("torch", "torchtitan")},
        "summary": f"{exact} of {len(rows)} cases exact",
        "cases": rows,
        "estimates": estimates(),
        "seconds": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['summary']}; wrote {OUT.relative_to(ROOT)} in {doc['seconds']} s")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
