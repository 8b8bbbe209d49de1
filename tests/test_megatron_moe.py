"""`model.implementation: megatron-core` with Mixtral's MoE layers: the rule
(memplan.model.stacks.megatron_moe) against Megatron-Core 0.12.0's real GPTModel (local spec:
TopKRouter with the aux loss, the allgather or alltoall dispatcher, SequentialMLP) on CPU, to
the byte, under the balanced routing the rule assumes (memplan.verify.megatron_core.
balanced_routing), on one rank and on two expert-parallel gloo ranks.

The oracle is Megatron-Core's own code (`pip install --no-deps megatron-core==0.12.0`); the
full matrix (fp32 / bf16 x none / full / selective x batch x layers x top-1 / top-2, EP 1, 2
and 4) is benchmarks/megatron_activations.py (benchmarks/results/megatron-activations.json).
The refusals need no torch.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.model.forward.tensors import Setting
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.conftest import make_spec


def mixtral(layers: int = 2, experts: int = 4, top_k: int = 2) -> dict[str, Any]:
    """memplan.verify.megatron_core.Shape(experts=..., top_k=...) as a Mixtral config."""
    return {
        "model_type": "mixtral",
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
    }


def spec(
    arch: dict[str, Any], dtype: str = "bf16", mode: str = "none", batch: int = 2, **par: Any
) -> Any:
    return make_spec(
        model={"architecture": arch, "implementation": "megatron-core"},
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
        },
        parallelism={"engine": "megatron", "zero_stage": 1, **par},
        hardware={"device": "cpu"},
    )


def qwen3(layers: int = 1) -> dict[str, Any]:
    """Shape(experts=4, qk_norm=True, head_dim=32) as a Qwen3-MoE config."""
    return {
        **mixtral(layers),
        "model_type": "qwen3_moe",
        "head_dim": 32,
        "moe_intermediate_size": 192,
        "num_experts": 4,
        "norm_topk_prob": True,
    }


ONE_RANK = [
    # dtype, recompute, batch, layers, top_k, qwen3
    ("bf16", "none", 2, 2, 2, False),
    ("fp32", "full", 1, 1, 1, False),  # top-1: moe_router_pre_softmax
    ("fp32", "none", 1, 1, 2, True),  # q/k norm keeps linear_qkv's output (fp32 on CPU)
]


@pytest.mark.parametrize(("dtype", "mode", "batch", "layers", "top_k", "qwen"), ONE_RANK)
def test_moe_rule_matches_megatron_core_to_the_byte(
    dtype: str, mode: str, batch: int, layers: int, top_k: int, qwen: bool
) -> None:
    """Held bytes and the persistent buffers (global memory buffer, causal mask, the MoE
    aux-loss tracker) of the real GPTModel with MoE layers, one rank: Mixtral's shape, and
    Qwen3-MoE's (per-head q/k RMSNorm, head_dim 32 beside hidden 64 / 4 heads)."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held

    shape = Shape(
        layers=layers, batch=batch, experts=4, top_k=top_k, qk_norm=qwen,
        head_dim=32 if qwen else None,
    )  # fmt: skip
    measured = held(dtype, shape, mode)
    arch = qwen3(layers) if qwen else mixtral(layers, top_k=top_k)
    acts = estimate(spec(arch, dtype, mode, batch), from_config(arch)).activations
    assert acts.modelled, acts.notes
    assert acts.bytes == measured.bytes
    assert sum(b.bytes for b in acts.buffers) == measured.persistent


def test_moe_rule_matches_megatron_core_on_two_expert_parallel_ranks() -> None:
    """EP = 2 over the two data-parallel gloo ranks (memplan.verify.megatron_core.
    held_parallel): each rank's held bytes, persistent buffers (the dispatcher's all-gather
    grows the global memory buffer) and expert parameter elements (Megatron's
    `allreduce = False` parameters, which its distributed optimizer shards over the
    expert-data-parallel group) against memplan's estimate of that rank: four experts, two a
    rank, top-2, selective recompute. One case (the spawned ranks' imports dominate); one
    expert a rank, top-1 and EP = 4 are in the benchmark's matrix."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held_parallel

    cases = [
        ("bf16", Shape(layers=1, experts=4), "selective", 0.0),
        # The alltoall dispatcher (parallelism.moe_dispatcher): all_to_all_single over gloo,
        # its split sizes copied to the host as on CUDA; no all-gather into the global buffer.
        ("bf16", Shape(layers=1, experts=4, dispatcher="alltoall"), "full", 0.0),
    ]
    measured = held_parallel(cases, expert=2)
    for (dtype, shape, mode, _), ranks in zip(cases, measured, strict=True):
        arch = mixtral(1, experts=shape.experts, top_k=shape.top_k)
        chosen: dict[str, Any] = (
            {} if shape.dispatcher == "allgather" else {"moe_dispatcher": shape.dispatcher}
        )
        est = estimate(spec(arch, dtype, mode, data=2, expert=2, **chosen), from_config(arch))
        acts = est.activations
        assert acts.modelled, acts.notes
        experts = sum(t.bytes for t in est.per_gpu.terms if t.name == "parameters (experts)")
        for rank in ranks:
            assert rank.bytes == acts.bytes, (shape, mode)
            assert rank.persistent == sum(b.bytes for b in acts.buffers)
            assert rank.parameters[1] * 2 == experts  # bf16


def test_alltoall_rule_matches_megatron_core_on_one_rank() -> None:
    """MoEAlltoAllTokenDispatcher (parallelism.moe_dispatcher: alltoall) on one rank: the
    real GPTModel's held bytes and persistent buffers against memplan's estimate (at EP 1 the
    all-to-all returns its input; the experts' tokens are sorted by expert with split + cat).
    EP 2 and 4 and the whole matrix: the benchmark."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held

    measured = held("fp32", Shape(layers=1, batch=2, experts=4, dispatcher="alltoall"), "none")
    arch = mixtral(1)
    acts = estimate(
        spec(arch, "fp32", "none", 2, moe_dispatcher="alltoall"), from_config(arch)
    ).activations
    assert acts.modelled, acts.notes
    assert "alltoall token dispatcher" in " ".join(acts.notes)
    assert acts.bytes == measured.bytes
    assert sum(b.bytes for b in acts.buffers) == measured.persistent


def test_alltoall_drop_and_pad_matches_megatron_core_on_one_rank() -> None:
    """parallelism.expert_capacity_factor 0.5 with the alltoall dispatcher (Megatron's
    moe_expert_capacity_factor + moe_pad_expert_input_to_capacity): half the tokens dropped,
    every expert's buffer padded to capacity 8; the real model's held bytes against memplan's
    estimate. Factors 1.0 and 1.5, EP 2 and 4: the benchmark."""
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from memplan.verify.megatron_core import Shape, held

    shape = Shape(layers=1, experts=4, dispatcher="alltoall", capacity_factor=0.5)
    measured = held("bf16", shape, "none")
    arch = mixtral(1)
    chosen: dict[str, Any] = {"moe_dispatcher": "alltoall", "expert_capacity_factor": 0.5}
    acts = estimate(spec(arch, "bf16", "none", 2, **chosen), from_config(arch)).activations
    assert acts.modelled, acts.notes
    assert "capacity" in acts.notes[-1]
    assert acts.bytes == measured.bytes
    assert sum(b.bytes for b in acts.buffers) == measured.persistent


def test_capacity_over_the_ranks_tokens_is_refused() -> None:
    """Megatron-Core's router picks each expert's tokens with topk(k=capacity) over the
    rank's tokens: a factor above E / top_k (here 3.0: capacity ceil(32 x 2 / 4 x 3) = 48 of
    the 32 tokens) raises there, so memplan refuses it (source: moe_utils.py::
    topk_softmax_with_capacity)."""
    arch = mixtral(1)
    why = _refusal(arch, parallelism={"moe_dispatcher": "alltoall", "expert_capacity_factor": 3.0})
    assert "capacity of 48 tokens" in why and "up to E / top_k = 2" in why


def test_moe_dispatcher_is_megatron_cores_and_named_when_wrong() -> None:
    """parallelism.moe_dispatcher picks Megatron-Core's dispatcher: with other model code,
    or a value Megatron-Core 0.12.0 runs but memplan does not model (flex: DeepEP, CUDA),
    one MemplanError naming the field."""
    from memplan.config.load import validate
    from memplan.errors import MemplanError

    arch = mixtral(1)
    wrong = make_spec(
        model={"architecture": arch},
        parallelism={"data": 2, "expert": 2, "moe_dispatcher": "alltoall"},
    )
    with pytest.raises(MemplanError) as err:
        estimate(wrong, from_config(arch))
    assert err.value.field == "parallelism.moe_dispatcher"
    assert "megatron-core" in err.value.message
    doc = {
        "model": {"architecture": arch, "implementation": "megatron-core"},
        "parallelism": {"engine": "megatron", "moe_dispatcher": "flex"},
    }
    with pytest.raises(MemplanError, match="moe_dispatcher"):
        validate(doc)


def _refusal(arch: dict[str, Any], **kw: Any) -> str:
    acts = estimate(
        make_spec(
            model={"architecture": arch, "implementation": "megatron-core",
                   **kw.pop("model", {})},
            parallelism={"engine": "megatron", **kw.pop("parallelism", {})},
            hardware={"device": kw.pop("device", "cpu")},
        ),
        from_config(arch),
    ).activations  # fmt: skip
    assert not acts.modelled
    return acts.notes[0]


def test_what_the_rule_cannot_prove_is_refused_with_its_source() -> None:
    arch = mixtral()
    te = _refusal(arch, model={"megatron_spec": "te"}, device="cuda")
    assert "local spec (SequentialMLP)" in te and "grouped_gemm" in te
    tp = _refusal(arch, parallelism={"tensor": 2, "sequence_parallel": False})
    assert "no tensor parallelism" in tp and "MoELayer.forward" in tp
    capacity = _refusal(arch, parallelism={"data": 2, "expert": 2, "expert_capacity_factor": 1.0})
    assert "dropless" in capacity
    window = _refusal({**arch, "sliding_window": 4096})
    assert "sliding window" in window


def test_qwen2_moe_and_what_qwen3_moe_routes_otherwise_are_refused() -> None:
    qwen = {
        **mixtral(),
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "moe_intermediate_size": 96,
        "shared_expert_intermediate_size": 192,
    }
    assert "without its gate" in _refusal(qwen)
    assert "norm_topk_prob false" in _refusal({**qwen3(), "norm_topk_prob": False})
    assert "every layer an MoE layer" in _refusal({**qwen3(2), "mlp_only_layers": [0]})


def test_pin_mixtral_8x7b_layer_on_eight_expert_ranks() -> None:
    """Pinning (the rule's own arithmetic): one Mixtral-8x7B MoE layer's router, dispatcher
    and experts at EP = 8 (one expert a rank: no transposed probs / map copies), bf16, batch 1
    x 4096, in bytes: the router (int64 top-2 indices, fp32 top-2 softmax, fp32 aux scores
    [t, 8], tokens_per_expert, the scalar loss), the dispatcher's rows over the 8 x 4096
    gathered tokens (probs bf16, map bool, int64 sorted indices [2t]) and the experts over 2t
    pairs: input, fc1 output [2t, 2F], silu output, fc2 input, output, permuted probs."""
    from memplan.model.stacks import megatron_moe

    arch = from_config(
        {**mixtral(), "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32}
    ).architecture  # fmt: skip
    assert arch is not None

    t, h, f, pairs, rows = 4096, 4096, 14336, 2 * 4096, 8 * 4096
    setting = Setting(
        batch=1, sequence=t, stream="bf16", matmul="bf16", autocast=False, device="cuda",
        attention="sdpa", dropout=False, checkpointing="none",
        implementation="megatron-core", expert_pairs=pairs, local_experts=1,
    )  # fmt: skip
    got = sum(x.bytes for x in megatron_moe.moe_mlp(arch, setting))
    router = t * 2 * 8 + t * 2 * 4 + t * 8 * 4 + 8 * 8 + 4
    dispatcher = rows * 2 + rows + pairs * 8
    experts = pairs * h * 2 + pairs * 2 * f * 2 + 2 * pairs * f * 2 + pairs * h * 2 + pairs * 2
    assert got == router + dispatcher + experts


def test_pin_mixtral_8x7b_layer_alltoall_on_eight_expert_ranks() -> None:
    """Pinning (the rule's own arithmetic): the same layer with the alltoall dispatcher. The
    router as above; the dispatcher keeps the router's own probs and map [t, 8] (bf16, bool)
    and the int64 sorted indices [2t]; the experts as above over 2t pairs, then the rank's
    own 2t returned tokens, the transposed probs and map [8, t] and the permuted probs [2t]:
    no [8 x 4096]-row gathered attributes."""
    from memplan.model.stacks import megatron_moe

    arch = from_config(
        {**mixtral(), "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32}
    ).architecture  # fmt: skip
    assert arch is not None

    t, h, f, pairs = 4096, 4096, 14336, 2 * 4096
    setting = Setting(
        batch=1, sequence=t, stream="bf16", matmul="bf16", autocast=False, device="cuda",
        attention="sdpa", dropout=False, checkpointing="none", implementation="megatron-core",
        expert_pairs=pairs, local_experts=1, moe_dispatcher="alltoall",
    )  # fmt: skip
    got = sum(x.bytes for x in megatron_moe.moe_mlp(arch, setting))
    router = t * 2 * 8 + t * 2 * 4 + t * 8 * 4 + 8 * 8 + 4
    dispatcher = t * 8 * 2 + t * 8 + pairs * 8
    experts = pairs * h * 2 + pairs * 2 * f * 2 + 2 * pairs * f * 2
    combine = pairs * h * 2 + 8 * t * 2 + 8 * t + pairs * 2
    assert got == router + dispatcher + experts + combine
