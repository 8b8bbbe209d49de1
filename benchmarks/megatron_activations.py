"""Megatron-Core's GPTModel (`model.implementation: megatron-core`): memplan's rule against the
real model, the whole matrix, and Llama 3.1 8B's bytes per token per layer in every stack.

Part 1, `matrix`: Megatron-Core 0.12.0's GPTModel with its local layer spec built tiny on CPU
(memplan/verify/megatron_core.py: dim 64, 4 heads, ffn 192, vocab 256, TP = PP = 1, fused
kernels off), forward + its vocab-parallel cross entropy, what it holds for backward measured
by the storages still alive, against memplan.model.stacks.megatron, for fp32 and bf16
(Float16Module) x recompute none / full (uniform, one layer per checkpoint) / selective
(core_attn) x batch 1 and 2 x GQA (2 of 4 heads), MQA (1 of 4, 3 layers, sequence 32) and
multi-head (4 of 4) x dropout 0 and 0.1; then the same over TP = 2 and 4 gloo ranks (the shapes
whose heads TP divides; no sequence parallelism, which the local spec refuses), every rank
against memplan's estimate of that spec.

Part 1b, `moe_matrix` / `moe_expert_parallel`: the same GPTModel with Mixtral's MoE layers
(memplan.model.stacks.megatron_moe: TopKRouter with the aux loss at 1e-2, the allgather
dispatcher, SequentialMLP; 4 or 8 experts, top-2 or top-1; and Qwen3-MoE's shape: per-head q/k
RMSNorm (qk_layernorm), head_dim 32 beside hidden 64 / 4 heads) under balanced routing
(memplan/verify/megatron_core.py::balanced_routing), fp32 and bf16 x none / full / selective x
batch 1 and 2 x 1 and 3 layers, on one rank and on EP = 2 and 4 gloo ranks (expert parallelism
over the data-parallel ranks): held bytes, persistent buffers (global memory buffer, causal
mask, MoE tracker) and each rank's expert parameters, against memplan's estimate; every case
twice, with the allgather dispatcher and with the alltoall one (MoEAlltoAllTokenDispatcher,
`parallelism.moe_dispatcher: alltoall`; gloo runs its all_to_all_single). TP with MoE
does not train under the local spec: `moe_tensor_parallel_raised` runs TP 2 (with and without
sequence parallelism) and TP 2 x EP 2 and records what every rank raises.

Part 2, `llama31_8b`: one decoder layer of Llama 3.1 8B (dim 4096, 32 heads, 8 k/v heads, ffn
14336), bf16 everywhere (the model cast to bf16, no autocast), no dropout, no recompute, batch
1 x sequence 8192 (and 4096), in bytes per token: transformers 5.25's LlamaDecoderLayer (SDPA)
and torchtitan 0.3.0's block (memplan's rules, proved on CPU by tests/test_activations.py and
tests/test_torchtitan_activations.py), Megatron-Core's local spec (proved here) and its TE spec
(read from the source: Transformer Engine needs CUDA), on CUDA kernels (and CPU where the rule
is proved there), beside Korthikanti et al. 2022 Table 2 (`34 h + 5 a s` with the attention
scores, `34 h` without: 16-bit activations, dropout masks kept, a 4h GeLU MLP) and Megatron-LM's
theoretical_memory_usage.py::compute_activation_memory (`h (18 + 4 ffn / h)`, benchmarks/peers/
megatron.py).

    pip install --no-deps megatron-core==0.12.0
    PYTHONPATH=$PWD python benchmarks/megatron_activations.py
    # 1091 s on 2 cores at load average 12 (results' `seconds`)
    # writes benchmarks/results/megatron-activations.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import megatron.core  # noqa: E402
import torch  # noqa: E402

from benchmarks.peers import megatron as theoretical  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from memplan import activations  # noqa: E402
from memplan.config.load import validate  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from memplan.model.stacks import megatron as rule  # noqa: E402
from memplan.report.estimate import estimate  # noqa: E402
from memplan.verify.megatron_core import (  # noqa: E402
    Shape,
    held,
    held_parallel,
    held_tensor_parallel,
    refusals_parallel,
)

OUT = ROOT / "benchmarks" / "results" / "megatron-activations.json"

SHAPES = [
    ("gqa", Shape()),
    ("gqa batch 1", Shape(batch=1)),
    ("multi-head", Shape(kv_heads=4)),
    ("mqa 3 layers seq 32", Shape(layers=3, seq=32, kv_heads=1)),
]


def tiny(shape: Shape) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 128,
    }


def setting(
    dtype: str, mode: str, batch: int, seq: int, *, device: str = "cpu", **kw: Any
) -> Setting:
    return Setting(
        batch=batch,
        sequence=seq,
        stream=dtype,
        matmul=dtype,
        autocast=False,
        device=device,  # type: ignore[arg-type]
        attention="sdpa",
        dropout=kw.pop("dropout", False),
        checkpointing=mode,  # type: ignore[arg-type]
        **kw,
    )


def matrix() -> list[dict[str, Any]]:
    rows = []
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "full", "selective"):
            for name, shape in SHAPES:
                for dropout in (0.0, 0.1):
                    st = setting(
                        dtype,
                        mode,
                        shape.batch,
                        shape.seq,
                        dropout=dropout > 0,
                        implementation="megatron-core",
                    )
                    arch = from_config(tiny(shape)).architecture
                    assert arch is not None
                    predicted = rule.saved(arch, st, "local").bytes
                    measured = held(dtype, shape, mode, dropout=dropout).bytes
                    rows.append(
                        {
                            "dtype": dtype,
                            "recompute": mode,
                            "shape": name,
                            "batch": shape.batch,
                            "sequence": shape.seq,
                            "layers": shape.layers,
                            "kv_heads": shape.kv_heads,
                            "dropout": dropout,
                            "measured": measured,
                            "predicted": predicted,
                            "equal": measured == predicted,
                        }
                    )
    return rows


def per_token(acts: activations.Activations, tokens: int) -> float:
    """One decoder layer's saved bytes over the tokens (to 3 decimals: the few token-free
    bytes, such as the flash kernel's rng state, spread over them)."""
    layer = acts.block("layers")
    assert acts.modelled and layer is not None, acts.notes
    return round(layer.bytes_each / tokens, 3)


def llama31_8b(seq: int) -> dict[str, Any]:
    cfg = json.loads((ROOT / "memplan" / "model" / "presets" / "llama-3.1-8b.json").read_text())
    inv = from_config(cfg)
    arch = inv.architecture
    assert arch is not None
    h, a, ffn = arch.hidden_size, arch.num_attention_heads, arch.intermediate_size
    t = seq

    def of(device: str, **kw: Any) -> float:
        return per_token(
            activations.predict(inv, setting("bf16", "none", 1, seq, device=device, **kw)), t
        )

    out: dict[str, Any] = {
        "sequence": seq,
        "batch": 1,
        "transformers_sdpa_cuda": of("cuda"),
        "transformers_sdpa_cpu": of("cpu"),
        "torchtitan_cuda": of("cuda", implementation="torchtitan"),
        "torchtitan_cpu": of("cpu", implementation="torchtitan"),
        "megatron_local_cuda": of("cuda", implementation="megatron-core"),
        "megatron_local_cpu": of("cpu", implementation="megatron-core"),
        "megatron_te_cuda": of("cuda", implementation="megatron-core", megatron_spec="te"),
        "korthikanti_with_scores": 34 * h + 5 * a * seq,
        "korthikanti_without_scores": 34 * h,
    }
    args = theoretical.Args(
        hidden_size=h,
        ffn_hidden_size=ffn,
        num_layers=arch.num_layers,
        num_attention_heads=a,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        padded_vocab_size=arch.vocab_size,
        swiglu=True,
        normalization="RMSNorm",
        untie_embeddings_and_output_weights=True,
        seq_length=seq,
        micro_batch_size=1,
    )
    out["megatron_lm_theoretical"] = theoretical.compute_activation_memory_per_layer(args) / t
    local = activations.predict(
        inv, setting("bf16", "none", 1, seq, device="cuda", implementation="megatron-core")
    )
    out["megatron_local_persistent_buffers"] = {b.name: b.bytes for b in local.buffers}
    return out


def tensor_parallel_matrix() -> list[dict[str, Any]]:
    """Part 1 over TP = 2 and 4 gloo ranks (one process each), every rank measured, against
    memplan's `estimate` of the same spec (engine megatron, no sequence parallelism: the
    local spec's torch norms refuse it); the shapes whose heads and kv heads TP divides."""
    rows = []
    for tp in (2, 4):
        cases, specs = [], []
        for dtype in ("fp32", "bf16"):
            for mode in ("none", "full", "selective"):
                for name, shape in SHAPES:
                    if shape.heads % tp or shape.kv_heads % tp:
                        continue
                    for dropout in (0.0, 0.1):
                        cases.append((dtype, shape, mode, dropout))
                        specs.append((dtype, mode, name, shape, dropout))
        measured = held_tensor_parallel(cases, tp)
        for (dtype, mode, name, shape, dropout), ranks in zip(specs, measured, strict=True):
            doc = {
                "model": {"architecture": tiny(shape), "implementation": "megatron-core"},
                "precision": "fp32" if dtype == "fp32" else "bf16-mixed",
                "training": {
                    "micro_batch_size": shape.batch,
                    "sequence_length": shape.seq,
                    "activation_checkpointing": mode,
                    "dropout": dropout > 0,
                },
                "parallelism": {"engine": "megatron", "tensor": tp, "sequence_parallel": False},
                "hardware": {"device": "cpu"},
            }
            loaded = validate(doc)
            predicted = estimate(loaded.spec, from_config(tiny(shape))).activations.bytes
            rows.append(
                {
                    "tensor": tp,
                    "dtype": dtype,
                    "recompute": mode,
                    "shape": name,
                    "dropout": dropout,
                    "measured_per_rank": [r.bytes for r in ranks],
                    "predicted": predicted,
                    "equal": all(r.bytes == predicted for r in ranks),
                }
            )
    return rows


MOE_SHAPES = [
    ("mixtral-like 4 experts top-2", Shape(experts=4)),
    ("batch 1", Shape(experts=4, batch=1)),
    ("top-1", Shape(experts=4, top_k=1)),
    ("8 experts 3 layers seq 32 mqa", Shape(layers=3, seq=32, kv_heads=1, experts=8)),
    ("qwen3-like: q/k norm, head_dim 32", Shape(experts=4, qk_norm=True, head_dim=32)),
    (
        "qwen3-like multi-head",
        Shape(layers=1, kv_heads=4, experts=4, qk_norm=True, head_dim=32),
    ),
]


def moe_config(shape: Shape) -> dict[str, Any]:
    """The tiny GPTModel with MoE layers as a config memplan reads: Mixtral's, or Qwen3-MoE's
    where the shape has q/k norms (norm_topk_prob true, every layer sparse)."""
    if shape.qk_norm:
        return {
            **tiny(shape),
            "model_type": "qwen3_moe",
            "head_dim": shape.head_dim,
            "moe_intermediate_size": shape.ffn,
            "num_experts": shape.experts,
            "num_experts_per_tok": shape.top_k,
            "norm_topk_prob": True,
        }
    return {
        **tiny(shape),
        "model_type": "mixtral",
        "num_local_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
    }


def moe_doc(dtype: str, mode: str, shape: Shape, dropout: float, expert: int) -> dict[str, Any]:
    par: dict[str, Any] = {"engine": "megatron", "data": expert, "expert": expert}
    if shape.dispatcher != "allgather":
        par["moe_dispatcher"] = shape.dispatcher
    if shape.capacity_factor is not None:
        par["expert_capacity_factor"] = shape.capacity_factor
    return {
        "model": {"architecture": moe_config(shape), "implementation": "megatron-core"},
        "precision": "fp32" if dtype == "fp32" else "bf16-mixed",
        "training": {
            "micro_batch_size": shape.batch,
            "sequence_length": shape.seq,
            "activation_checkpointing": mode,
            "dropout": dropout > 0,
        },
        "parallelism": {**par, "zero_stage": 1},
        "hardware": {"device": "cpu"},
    }


def moe_cases(
    dispatcher: str = "allgather", capacity_factor: float | None = None
) -> list[tuple[str, str, str, Shape, float]]:
    out = []
    routed: dict[str, Any] = {"dispatcher": dispatcher, "capacity_factor": capacity_factor}
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "full", "selective"):
            for name, shape in MOE_SHAPES:
                out.append((dtype, mode, name, replace(shape, **routed), 0.0))
    mixtral = Shape(experts=4, **routed)
    out.append(("bf16", "none", "mixtral-like, dropout 0.1", mixtral, 0.1))
    return out


def every_moe_case() -> list[tuple[str, str, str, Shape, float]]:
    """Both dispatchers dropless; alltoall with drop and pad at capacity factor 1.5 (every
    expert's buffer padded past its balanced share), and at 1.0 and 0.5 (tokens dropped) on
    Mixtral's shape."""
    out = moe_cases() + moe_cases("alltoall") + moe_cases("alltoall", 1.5)
    for factor in (1.0, 0.5):
        for mode in ("none", "full"):
            shape = Shape(experts=4, dispatcher="alltoall", capacity_factor=factor)
            out.append(("bf16", mode, f"mixtral-like, capacity {factor}", shape, 0.0))
    return out


def moe_matrix() -> list[dict[str, Any]]:
    """Megatron-Core's GPTModel with MoE layers (memplan.model.stacks.megatron_moe) on one
    rank, under balanced routing: what it holds for backward, its persistent buffers, against
    memplan's estimate."""
    rows = []
    for dtype, mode, name, shape, dropout in every_moe_case():
        measured = held(dtype, shape, mode, dropout=dropout)
        loaded = validate(moe_doc(dtype, mode, shape, dropout, 1))
        acts = estimate(loaded.spec, from_config(moe_config(shape))).activations
        assert acts.modelled, acts.notes
        buffers = sum(b.bytes for b in acts.buffers)
        rows.append(
            {
                "dtype": dtype,
                "recompute": mode,
                "shape": name,
                "batch": shape.batch,
                "sequence": shape.seq,
                "layers": shape.layers,
                "experts": shape.experts,
                "top_k": shape.top_k,
                "dispatcher": shape.dispatcher,
                "capacity_factor": shape.capacity_factor,
                "dropout": dropout,
                "measured": measured.bytes,
                "predicted": acts.bytes,
                "persistent_measured": measured.persistent,
                "persistent_predicted": buffers,
                "equal": measured.bytes == acts.bytes and measured.persistent == buffers,
            }
        )
    return rows


def moe_expert_parallel() -> list[dict[str, Any]]:
    """The MoE matrix over EP = 2 and 4 gloo ranks (data-parallel ranks holding E / EP
    experts each, TP = 1): every rank's held bytes and persistent buffers against memplan's
    estimate of engine megatron, data = expert = EP; each rank's expert parameter elements
    (Megatron's `allreduce = False` parameters) against memplan's `parameters (experts)`."""
    rows = []
    for ep in (2, 4):
        chosen = [c for c in every_moe_case() if c[3].experts % ep == 0]
        cases = [(dtype, shape, mode, dropout) for dtype, mode, _, shape, dropout in chosen]
        measured = held_parallel(cases, expert=ep)
        for (dtype, mode, name, shape, dropout), ranks in zip(chosen, measured, strict=True):
            loaded = validate(moe_doc(dtype, mode, shape, dropout, ep))
            est = estimate(loaded.spec, from_config(moe_config(shape)))
            acts = est.activations
            buffers = sum(b.bytes for b in acts.buffers)
            width = 4 if dtype == "fp32" else 2
            experts = (
                sum(t.bytes for t in est.per_gpu.terms if t.name == "parameters (experts)") // width
            )
            rows.append(
                {
                    "expert": ep,
                    "dispatcher": shape.dispatcher,
                    "capacity_factor": shape.capacity_factor,
                    "dtype": dtype,
                    "recompute": mode,
                    "shape": name,
                    "dropout": dropout,
                    "measured_per_rank": [r.bytes for r in ranks],
                    "predicted": acts.bytes,
                    "persistent_per_rank": [r.persistent for r in ranks],
                    "persistent_predicted": buffers,
                    "expert_parameters_per_rank": [r.parameters[1] for r in ranks],
                    "expert_parameters_predicted": experts,
                    "equal": all(
                        r.bytes == acts.bytes
                        and r.persistent == buffers
                        and r.parameters[1] == experts
                        for r in ranks
                    ),
                }
            )
    return rows


MOE_NOT_RUN = {
    "tensor_parallel": (
        "megatron-core 0.12.0 transformer/moe/moe_layer.py::MoELayer.forward raises "
        "ValueError('During training, performance may degrade if MoE and tensor parallelism"
        "are enabled without also enabling sequence parallelism.') for TP > 1 without SP, "
        "and the local spec's torch norms refuse SP (transformer/torch_norm.py::"
        "WrappedTorchNorm.__new__: 'sequence parallel not supported by torch LayerNorm'): no "
        "local-spec MoE layout with TP > 1 trains"
    ),
    "grouped_gemm": (
        "moe_grouped_gemm: GroupedMLP needs the grouped_gemm CUDA extension "
        "(transformer/moe/grouped_gemm_util.py: 'Grouped GEMM is not available'), "
        "TEGroupedMLP Transformer Engine (CUDA only)"
    ),
}


def moe_tensor_parallel_raised() -> list[dict[str, Any]]:
    """TP with MoE under the local spec, run: TP 2 with and without sequence parallelism and
    TP 2 x EP 2 with it, both dispatchers, what every rank raises (memplan.verify.
    megatron_core.refusals_parallel). memplan refuses the layout with this source."""
    rows = []
    for tp, ep, sp in ((2, 1, True), (2, 1, False), (2, 2, True)):
        dispatchers = ("allgather", "alltoall")
        cases = [
            ("bf16", Shape(layers=1, experts=4, dispatcher=d), "none", 0.0) for d in dispatchers
        ]
        raised = refusals_parallel(cases, tensor=tp, expert=ep, sequence_parallel=sp)
        for d, ranks in zip(dispatchers, raised, strict=True):
            rows.append(
                {
                    "tensor": tp,
                    "expert": ep,
                    "sequence_parallel": sp,
                    "dispatcher": d,
                    "raised_per_rank": ranks,
                    "every_rank_raised": all(ranks),
                }
            )
    return rows


def main() -> None:
    started = time.time()
    rows = matrix()
    tp_rows = tensor_parallel_matrix()
    moe_rows = moe_matrix()
    ep_rows = moe_expert_parallel()
    tp_moe = moe_tensor_parallel_raised()
    doc = {
        "stamp": stamp(
            torch=torch.__version__,
            megatron_core=megatron.core.__version__,
        ),
        "command": "PYTHONPATH=$PWD python benchmarks/megatron_activations.py",
        "matrix": rows,
        "matrix_equal": sum(r["equal"] for r in rows),
        "matrix_cases": len(rows),
        "tensor_parallel": tp_rows,
        "tensor_parallel_equal": sum(r["equal"] for r in tp_rows),
        "tensor_parallel_cases": len(tp_rows),
        "moe_matrix": moe_rows,
        "moe_matrix_equal": sum(r["equal"] for r in moe_rows),
        "moe_matrix_cases": len(moe_rows),
        "moe_expert_parallel": ep_rows,
        "moe_expert_parallel_equal": sum(r["equal"] for r in ep_rows),
        "moe_expert_parallel_cases": len(ep_rows),
        "moe_routing": (
            "balanced: token i routed to experts (i k + j) mod E, j < k "
            "(memplan.verify.megatron_cpu.balanced_routing); moe_aux_loss_coeff 1e-2, "
            "allgather dispatcher (and alltoall: rows with dispatcher alltoall), SequentialMLP"
        ),
        "moe_not_run": MOE_NOT_RUN,
        "moe_tensor_parallel_raised": tp_moe,
        "llama31_8b_bytes_per_token_per_layer": [llama31_8b(8192), llama31_8b(4096)],
        "te_spec_on_cpu": (
            "import transformer_engine: ModuleNotFoundError (Transformer Engine's PyTorch "
            "extension builds only against CUDA); megatron-core's "
            "get_gpt_layer_with_transformer_engine_spec() then raises NameError: name "
            "'TELayerNormColumnParallelLinear' is not defined"
        ),
        "seconds": round(time.time() - started, 1),
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['matrix_equal']}/{doc['matrix_cases']} equal to the byte")
    print(
        f"tensor parallel: {doc['tensor_parallel_equal']}/{doc['tensor_parallel_cases']} "
        "equal to the byte on every rank"
    )
    print(f"moe one rank: {doc['moe_matrix_equal']}/{doc['moe_matrix_cases']} equal")
    print(
        f"moe expert parallel: {doc['moe_expert_parallel_equal']}/"
        f"{doc['moe_expert_parallel_cases']} equal on every rank"
    )
    raised = sum(r["every_rank_raised"] for r in tp_moe)
    print(f"moe under TP (local spec): {raised}/{len(tp_moe)} layouts raised on every rank")
    print(json.dumps(doc["llama31_8b_bytes_per_token_per_layer"], indent=2))


if __name__ == "__main__":
    main()
