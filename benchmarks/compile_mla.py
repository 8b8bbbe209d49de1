"""What a torch.compile'd torchtitan DeepSeek-V3 block keeps for backward, traced against
memplan's rule (memplan.model.forward.compiled_mla), and `memplan estimate` of a tiny
DeepSeek-V3 with training.compile true and false.

Part 1, `cases`: torchtitan 0.3.0's DeepSeek-V3 blocks (tests/torchtitan_probe.py::
deepseek_v3_config: models/deepseek_v3/__init__.py::_build_dsv3_layers, MLA with yarn
ComplexRoPE, SDPA as the inner attention, a dense first layer and a MoE layer with a sigmoid
router, node-limited groups, route_norm, route_scale 2.5, shared experts, the `standard` token
dispatcher local at expert parallelism 1; parameters from torchtitan's init_states under seed
0), the dense block (layer 0) and the MoE block (layer 1), each compiled the way torchtitan
0.3.0's distributed/compile.py::apply_compile compiles it (the whole block, fullgraph,
`capture_scalar_outputs = True`, after AC wrapping), run on CPU through torch.compile's
Inductor path up to code generation (memplan.verify.trace.compiled.compiled_saved: torch 2.13
compile_fx, AOTAutograd's min_cut_rematerialization_partition) at three (batch, sequence)
sizes, (1, 16), (2, 16) and (1, 32): the softmax is [b, heads, s, s], so the kept bytes are not
linear in the tokens, and the rule is compared size by size. At each size: the multiset of
(dtype, storage bytes) of the tensors the forward graph passes to its backward (a view
counts its whole storage: what it keeps alive), less the block's parameters and buffers (graph
inputs whose bytes do not change with the size); the rule's tensors at that size must be the
same multiset: "exact".

Grid: the base shape (dim 64, 4 heads, kv_lora 32, nope 16, rope 8, v 16, dense hidden 192,
8 experts top 2, expert hidden 48, one shared expert, 4 groups of which 2 limited,
route_norm); q_lora_rank 24; no node-limited groups; no route_norm; no shared experts; top 6 of
16 experts (route_norm's sum kept past top 4) with and without route_norm; a wider one (dim
128, 8 heads, q_lora 48, kv_lora 64, nope 32, rope 16, v 24, 64 experts top 8 in 8 groups of
which 4 limited, 2 shared: DeepSeek-V3's proportions). Each with the dense and MoE blocks, bf16
parameters (FSDP2's param_dtype) and fp32, checkpointing none, torchtitan's per-op SelectiveAC
and FullAC (wrapped before compile, as parallelize_deepseekv3 does), the MoE block under the
three routings (seeded; `_debug_force_load_balance` round-robin; "collapsed": every token on
experts 0 .. top_k - 1).

Part 2, `estimates`: `memplan estimate` of the tiny DeepSeek-V3 (tests/test_compile_mla.py::
deepseek_v3, the base shape), torchtitan's code, CPU, micro batch 2 x 32, for training.compile
false and true under none / full / selective-op.

    PYTHONPATH=$PWD python benchmarks/compile_mla.py   # 1,046 s on 2 shared cores
    PYTHONPATH=$PWD python benchmarks/compile_mla.py --rescore   # the rule against the
        # stored traces again, no tracing (rule_bytes, exact, summary rewritten)
    # writes benchmarks/results/compile-mla.json; tests/test_compile_mla.py checks the rule
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
from memplan.model.forward import compiled_mla as rule  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compile-mla.json"
SIZES = [(1, 16), (2, 16), (1, 32)]
BASE: dict[str, Any] = {
    "hidden": 64,
    "heads": 4,
    "q_lora": 0,
    "kv_lora": 32,
    "nope": 16,
    "rope": 8,
    "v_dim": 16,
    "dense_inter": 192,
    "experts": 8,
    "top_k": 2,
    "moe_inter": 48,
    "shared": 1,
    "groups": 4,
    "limited": 2,
    "route_norm": True,
}
SHAPES: dict[str, dict[str, Any]] = {
    "base": BASE,
    "qlora": {**BASE, "q_lora": 24},
    "nogroups": {**BASE, "groups": 0, "limited": 0},
    "nonorm": {**BASE, "route_norm": False},
    "noshared": {**BASE, "shared": 0},
    "k6": {**BASE, "experts": 16, "top_k": 6},
    "k6-nonorm": {**BASE, "experts": 16, "top_k": 6, "route_norm": False},
    "wide": {
        **BASE,
        "hidden": 128,
        "heads": 8,
        "q_lora": 48,
        "kv_lora": 64,
        "nope": 32,
        "rope": 16,
        "v_dim": 24,
        "dense_inter": 256,
        "experts": 64,
        "top_k": 8,
        "moe_inter": 32,
        "shared": 2,
        "groups": 8,
        "limited": 4,
    },
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WRAPS = {"none": None, "selective-op": _sac, "full": _full}
LAYERS = {"dense": 0, "moe": 1}


def block(shape: dict[str, Any], layer: str, dtype: str, mode: str, routing: str) -> Any:
    """torchtitan's DeepSeek-V3 block `layer` at `shape`, wrapped for `mode`, in `dtype`."""
    from tests import torchtitan_probe as probe

    mla = probe.Mla(
        q_lora=shape["q_lora"],
        kv_lora=shape["kv_lora"],
        nope=shape["nope"],
        rope=shape["rope"],
        v_dim=shape["v_dim"],
        dense_layers=1,
        shared=shape["shared"],
        groups=shape["groups"],
        limited=shape["limited"],
        route_norm=shape["route_norm"],
    )
    probe_shape = probe.Shape(
        model="deepseek_v3",
        layers=2,
        dim=shape["hidden"],
        heads=shape["heads"],
        ffn=shape["dense_inter"],
        experts=shape["experts"],
        top_k=shape["top_k"],
        moe_ffn=shape["moe_inter"],
        mla=mla,
        routing=routing,
    )
    model: Any = probe.build(dtype, probe_shape)  # parameters in dtype, buffers as they are
    module: torch.nn.Module = model.layers[str(LAYERS[layer])]
    wrap = WRAPS[mode]
    return module if wrap is None else wrap(module)


def traced(
    shape: dict[str, Any], layer: str, dtype: str, mode: str, routing: str
) -> list[Counter[tuple[str, int]]]:
    """At each of SIZES: (dtype, storage bytes) of each tensor the compiled block's forward
    graph passes to its backward, less its parameters and buffers."""
    from torch._inductor.compile_fx import compile_fx

    from memplan.verify.trace.compiled import _dtype

    torch._dynamo.config.capture_scalar_outputs = True  # as apply_compile sets it
    runs: list[dict[str, tuple[str, int]]] = []
    graphs: list[torch.fx.GraphModule] = []

    def inner(gm: torch.fx.GraphModule, example: Any, **kwargs: Any) -> Any:
        graphs.append(gm)
        return gm  # run the graph as it is: no code generation

    def backend(gm: torch.fx.GraphModule, example: Any) -> Any:
        return compile_fx(gm, example, inner_compile=inner)

    for b, s in SIZES:
        module = block(shape, layer, dtype, mode, routing)
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(module, backend=backend, fullgraph=True)
        x = torch.randn(b, s, shape["hidden"], dtype=DTYPES[dtype], requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(x, None, None)
        torch._dynamo.reset()
        (result,) = (n for n in graphs[0].graph.nodes if n.op == "output")
        kept: dict[str, tuple[str, int]] = {}
        for node in result.args[0][1:]:
            value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor):
                continue  # a SymInt the backward reads
            if not all(isinstance(n, int) for n in value.shape):
                continue  # the CPU RNG state checkpoint keeps (data-dependent size)
            base = storage_of(node)
            whole = base.meta["val"]
            kept[base.name] = (_dtype(whole.dtype), whole.numel() * whole.element_size())
        runs.append(kept)
    # Graph inputs that do not change with the size are the parameters and buffers.
    params = {
        name
        for name, v in runs[0].items()
        if name.startswith("primals_") and all(r.get(name) == v for r in runs)
    }
    return [Counter(v for name, v in r.items() if name not in params) for r in runs]


VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.alias.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.split.Tensor,
}
"""The aten ops whose output is a view of their first input (getitem of a split is one too)."""


def storage_of(node: torch.fx.Node) -> torch.fx.Node:
    """The graph node that made the storage `node` views: what keeping `node` keeps alive. (A
    fake tensor's storage size is no guide: a view replayed from a storage offset reports the
    extent past the offset.)"""
    import operator

    while True:
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node):
            return node
        if node.target in VIEWS or (node.target is operator.getitem and source.target in VIEWS):
            node = source
            continue
        return node


def rule_tensors(
    shape: dict[str, Any], layer: str, dtype: str, mode: str, routing: str = "seeded"
) -> list[Counter[tuple[str, int]]]:
    """The rule's (dtype, bytes) at each of SIZES. `routing` "balanced" under SelectiveAC: the
    rule less topk's indices, which torchtitan's `_debug_force_load_balance` replaces by a
    round-robin arange (models/common/moe.py::TokenChoiceTopKRouter._debug_force_load_balance
    _routing): topk's MUST_SAVE output is then read by nothing. A debugging switch, not a
    setting memplan models; real routing (seeded, collapsed) keeps them."""
    mla = rule.Mla(
        hidden=shape["hidden"],
        heads=shape["heads"],
        q_lora=shape["q_lora"],
        kv_lora=shape["kv_lora"],
        nope=shape["nope"],
        rope=shape["rope"],
        v_dim=shape["v_dim"],
    )
    shared = shape["moe_inter"] * shape["shared"]
    moe = rule.Moe(
        experts=shape["experts"],
        top_k=shape["top_k"],
        inter=shape["moe_inter"],
        shared_inter=shared,
        route_norm=shape["route_norm"],
    )
    out = []
    for b, s in SIZES:
        if mode == "full":
            # Full checkpointing keeps the block's input alone (memplan.model.stacks.torchtitan).
            width = 2 if dtype == "bf16" else 4
            out.append(Counter({(dtype, b * s * shape["hidden"] * width): 1}))
            continue
        if mode == "selective-op":
            dense = layer == "dense"
            tail = rule.feed_forward(
                "feed_forward" if dense else "moe.shared_experts",
                mla.hidden,
                shape["dense_inter"] if dense else shared,
            )
            kept = rule.op_sac_layer(
                batch=b,
                seq=s,
                mla=mla,
                tail=tail,
                experts=0 if dense else moe.experts,
                top_k=0 if dense else moe.top_k,
                dtype=dtype,
            )
        elif layer == "dense":
            kept = rule.dense_layer(
                batch=b, seq=s, mla=mla, inter=shape["dense_inter"], dtype=dtype
            )
        else:
            kept = rule.moe_layer(batch=b, seq=s, mla=mla, moe=moe, dtype=dtype)
        if routing == "balanced" and mode == "selective-op":
            kept = tuple(t for t in kept if t.name != "moe.router.topk_indices")
        out.append(Counter((t.dtype, t.bytes) for t in kept))
    return out


def held(kept: Counter[tuple[str, int]]) -> Counter[tuple[str, int]]:
    """`kept` less its zero-byte tensors (the [t, 0] outputs of the empty shared-experts
    FeedForward torchtitan builds for num_shared_experts 0): they hold no memory."""
    return Counter({k: c for k, c in kept.items() if k[1]})


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(shape: str, layer: str, dtype: str, mode: str, routing: str = "seeded") -> None:
        case = {"shape": shape, "layer": layer, "dtype": dtype, "mode": mode, "routing": routing}
        if case not in out:
            out.append(case)

    for shape in ("base", "qlora", "wide"):
        for layer in LAYERS:
            for dtype in DTYPES:
                for mode in WRAPS:
                    add(shape, layer, dtype, mode)
    for routing in ("balanced", "collapsed"):
        add("base", "moe", "bf16", "none", routing)
        add("wide", "moe", "bf16", "none", routing)
        add("base", "moe", "bf16", "selective-op", routing)
    for shape in ("nogroups", "nonorm", "noshared", "k6", "k6-nonorm"):
        add(shape, "moe", "bf16", "none")
        add(shape, "moe", "fp32", "none")
        add(shape, "moe", "bf16", "selective-op")
    return out


def deepseek_v3(layers: int = 2) -> dict[str, Any]:
    """SHAPES["base"] as a Hugging Face deepseek_v3 config: one dense layer, then MoE."""
    return {
        "model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 192,
        "moe_intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "vocab_size": 256, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }  # fmt: skip


def spec_of(mode: str, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"architecture": deepseek_v3(), "implementation": "torchtitan"},
        "precision": "bf16-mixed",
        "optimizer": {"name": "adamw"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 32,
            "activation_checkpointing": mode,
            "compile": compile_,
        },
        "parallelism": {"engine": "fsdp2", "data": 8},
        "hardware": {"device": "cpu"},
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
                f"tiny DeepSeek-V3 {mode:12s} compile {compile_!s:5s} activations "
                f"{report.activations.bytes:>9,} B peak allocated {report.peak_bytes:>11,} B",
                flush=True,
            )
    return rows


def rescore() -> None:
    """The rule against the stored traces again, without tracing (`--rescore`): each row's
    rule_bytes and exact, and the summary, recomputed."""
    doc = json.loads(OUT.read_text())
    for row in doc["cases"]:
        kept = [Counter({(dt, n): c for dt, n, c in size}) for size in row["traced"]]
        want = rule_tensors(row["dims"], row["layer"], row["dtype"], row["mode"], row["routing"])
        row["rule_bytes"] = [sum(n * c for (_, n), c in w.items()) for w in want]
        row["exact"] = [held(k) for k in kept] == want
    exact = sum(r["exact"] for r in doc["cases"])
    doc["summary"] = f"{exact} of {len(doc['cases'])} cases exact"
    doc["rescored"] = stamp()["date"]
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(doc["summary"])


def main() -> None:
    if "--rescore" in sys.argv:
        rescore()
        return
    start = time.time()
    rows = []
    for case in cases():
        t0 = time.time()
        shape = SHAPES[case["shape"]]
        kept = traced(shape, case["layer"], case["dtype"], case["mode"], case["routing"])
        want = rule_tensors(shape, case["layer"], case["dtype"], case["mode"], case["routing"])
        row = {
            **case,
            "dims": shape,
            "sizes": SIZES,
            "traced_bytes": [sum(dt_n[1] * c for dt_n, c in k.items()) for k in kept],
            "rule_bytes": [sum(dt_n[1] * c for dt_n, c in w.items()) for w in want],
            "exact": [held(k) for k in kept] == want,
            "traced": [sorted([dt, n, c] for (dt, n), c in k.items()) for k in kept],
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(
            f"{case['shape']:9s} {case['layer']:5s} {case['dtype']:4s} {case['mode']:12s} "
            f"{case['routing']:9s} traced {row['traced_bytes']} rule {row['rule_bytes']} "
            f"{'exact' if row['exact'] else 'DIFFERENT'} ({row['seconds']} s)",
            flush=True,
        )
        if not row["exact"]:
            for k, w in zip(kept, want, strict=True):
                print(
                    "   traced only", sorted((k - w).items()), "rule only", sorted((w - k).items())
                )
    exact = sum(r["exact"] for r in rows)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/compile_mla.py",
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
