"""torchtitan's own MoE under its expert parallelism and its FSDP2 expert sharding (issue 19):
memplan's rules (memplan.model.stacks.torchtitan_moe under `Setting.local_experts`,
memplan.activations.torchtitan_parallel; memplan.states.engines.fsdp2.sharding.dim1_experts)
against torchtitan 0.3.0 itself, alone and with TP (EP x TP; DeepSeek-V3 under TP).

Independent oracles, a subset of benchmarks/torchtitan_moe_ep.py's matrix
(benchmarks/results/torchtitan-moe-ep.json):
- torchtitan's Qwen3-MoE and DeepSeek-V3 laid out by its own ParallelDims, sharding configs,
  Module.parallelize (EP, TP, or both) and apply_fsdp_to_decoder on 2 gloo ranks, what
  each rank holds for backward and its model states after one AdamW step measured
  (tests/torchtitan_ep_probe.py), under torchtitan's balanced round-robin routing (the routing
  the EP rule states; under EP x TP the same round-robin on each rank's token shard; TP alone
  runs the seeded router, the rule at EP 1 holding for any routing);
- FSDP2's own padded shard sizes of two blocks of Qwen3-30B-A3B over a fake process group of
  64 and 256 ranks, EP 1 and 8 (tests/torchtitan_ep_probe.py::fake_sharded): at data 256 the
  experts are sharded on dim 1 (efsdp x EP = 256 > 128 experts), the case memplan overstated
  2x before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from tests.conftest import make_spec, micro_batch_of
from tests.test_torchtitan_moe import deepseek_v3, qwen3_moe

MOMENTS = ("exp_avg", "exp_avg_sq")


def _spec(
    cfg: dict[str, Any], dtype: str, mode: str, world: int, ep: int, batch: int = 2, **par: Any
) -> Any:
    return make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": world, "expert": ep, **par},
        precision="fp32" if dtype == "fp32" else "bf16-mixed",
        optimizer={"name": "adamw"},
        training={
            "micro_batch_size": batch,
            "sequence_length": 16,
            "activation_checkpointing": mode,
        },
        hardware={"device": "cpu"},
    )


def config_of(case: Any) -> dict[str, Any]:
    """tests/torchtitan_ep_probe.py's Case as a Hugging Face config."""
    if case.model == "deepseek_v3":
        cfg = deepseek_v3(case.layers, q_lora=case.q_lora, dense_layers=1)
        return {**cfg, "n_routed_experts": case.experts, "moe_intermediate_size": case.moe_ffn}
    cfg = qwen3_moe(case.layers, experts=case.experts, top_k=case.top_k)
    return {**cfg, "moe_intermediate_size": case.moe_ffn, "num_key_value_heads": case.kv_heads}


def predicted(case: Any, world: int) -> Any:
    """memplan's figure for a probe case on every rank: held bytes, or the model states."""
    cfg = config_of(case)
    tp = {"tensor": case.tp, "sequence_parallel": case.sp} if case.tp > 1 else {}
    spec = _spec(cfg, case.dtype, case.mode, world // case.tp, case.ep, case.batch, **tp)
    if case.what == "held":
        saved = micro_batch_of(spec, from_config(cfg))
        assert saved.modelled, saved.notes
        return [saved.bytes] * world
    report = estimate(spec, from_config(cfg))
    out: dict[int, dict[str, int]] = {}
    for r in report.ranks:
        moments = sum(t.bytes for t in r.terms if t.name.split(" ")[0] in MOMENTS)
        for k in r.ranks:
            out[k] = {
                "parameters": r.bytes_of("parameters"),
                "gradients": r.bytes_of("gradients"),
                "optimizer": moments,
            }
    return [out[k // case.tp] for k in range(world)]  # TP innermost; TP ranks hold alike


def test_ep_rule_matches_torchtitan_ranks(tmp_path: Path) -> None:
    """Independent oracle: 2 gloo ranks of torchtitan's own EP 2 (module docstring): Qwen3-MoE
    with no checkpointing (the permutation's indices, E / EP offsets) and SelectiveAC (the
    all-to-alls' outputs kept), DeepSeek-V3 with none; FSDP2's model states at EP 2; and
    Qwen3-MoE under torchtitan's own TP 2 + SP with SelectiveAC (EP 1); and EP 2 x TP 2 + SP
    with SelectiveAC and its model states (the experts not split over TP: the old rule refused
    it, expert 2 not dividing data 1), and DeepSeek-V3 under EP 2 x TP 2 (the routed half on the
    token shard, the shared experts on their own all-gathered input)."""
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.torchtitan_ep_probe import Case, run

    cases = [
        Case("bf16", "none", 2),
        Case("bf16", "selective-op", 2),
        Case("bf16", "none", 2, layers=3, moe_ffn=24, model="deepseek_v3"),
        Case("bf16", "none", 2, what="states"),
        Case("bf16", "selective-op", 1, tp=2),
        # EP x TP (EP 2 over the TP 2 ranks: efsdp 1): the MoE on each rank's token shard,
        # experts whole over TP, FSDP2's expert shards over efsdp.
        Case("bf16", "selective-op", 2, tp=2),
        Case("bf16", "none", 2, tp=2, what="states"),
        # DeepSeek-V3 under EP 2 x TP 2: the shared experts gather their own input.
        Case("bf16", "none", 2, tp=2, layers=3, moe_ffn=32, model="deepseek_v3"),
    ]
    ranks = run(cases, tmp_path, world=2)
    for case in cases:
        assert [r[case.name] for r in ranks] == predicted(case, 2), case.name


@pytest.mark.parametrize(("world", "ep"), [(256, 1), (256, 8), (64, 8)])
def test_fsdp2_expert_shards_match_torchtitan_at_scale(world: int, ep: int) -> None:
    """Independent oracle: FSDP2's own padded shards of torchtitan's Qwen3-30B-A3B (two
    blocks, 128 experts) as apply_fsdp_to_decoder places them over a fake process group.
    At 256 ranks the experts go on dim 1 (an even share, no padding); at 64 x EP 8 (efsdp 8 x
    EP 8 = 64 <= 128) on dim 0 over the 8 expert-data ranks."""
    pytest.importorskip("torchtitan.models.qwen3")
    from tests.torchtitan_ep_probe import QWEN3_30B_A3B, fake_sharded

    s = QWEN3_30B_A3B
    cfg = {
        **qwen3_moe(s.layers, experts=s.experts, top_k=s.top_k),
        "hidden_size": s.dim,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "moe_intermediate_size": s.moe_ffn,
    }
    spec = make_spec(
        model={"architecture": cfg, "implementation": "torchtitan"},
        parallelism={"engine": "fsdp2", "data": world, "expert": ep},
        precision="bf16-mixed",
        training={"micro_batch_size": 1, "sequence_length": 64},
    )
    report = estimate(spec, from_config(cfg))
    measured = fake_sharded(world, ep)
    assert report.ranks[0].bytes_of("parameters") == 4 * sum(measured.values())  # fp32 shards


def test_ep_refusals_name_what_is_not_covered() -> None:
    """EP x TP without sequence parallelism is refused with the error torchtitan 0.3.0 itself
    raises on 4 gloo ranks (benchmarks/results/torchtitan-moe-ep.json, `refused`); with it,
    modelled (EP x TP's notes say so); EP x CP stays refused."""
    cfg = qwen3_moe()
    tp = micro_batch_of(_spec(cfg, "bf16", "none", 4, 2, tensor=2), from_config(cfg))
    assert not tp.modelled and "Can not redistribute from S(1) to P(sum)" in tp.notes[0]
    sp = _spec(cfg, "bf16", "none", 4, 2, tensor=2, sequence_parallel=True)
    both = micro_batch_of(sp, from_config(cfg))
    assert both.modelled and any("with tensor parallelism 2" in n for n in both.notes)
    cp = micro_batch_of(_spec(cfg, "bf16", "none", 4, 2, context=2), from_config(cfg))
    assert not cp.modelled and "context" in cp.notes[0]
    ep = micro_batch_of(_spec(cfg, "bf16", "none", 4, 2), from_config(cfg))
    assert ep.modelled and any("balanced routing" in n for n in ep.notes)


def test_titan_expert_degree_borrows_tensor_ranks() -> None:
    """torchtitan's EP borrows ranks from data x context x tensor (its ParallelDims: efsdp =
    dp_shard * cp * tp / ep): EP 4 over data 2 x TP 2 runs (measured on 4 gloo ranks in
    benchmarks/torchtitan_moe_ep.py), EP 8 there cannot."""
    cfg = qwen3_moe()
    ok = _spec(cfg, "bf16", "none", 2, 4, tensor=2, sequence_parallel=True)
    assert estimate(ok, from_config(cfg)).ranks
    bad = _spec(cfg, "bf16", "none", 2, 8, tensor=2, sequence_parallel=True)
    with pytest.raises(MemplanError, match="data x context x tensor") as err:
        estimate(bad, from_config(cfg))
    assert err.value.field == "parallelism.expert"


def test_uneven_dim1_expert_shards_are_refused_as_fsdp2_refuses_them() -> None:
    """torch FSDP2 raises NotImplementedError on an uneven dim-1 shard (_fsdp_param.py::
    FSDPParam._init_sharded_param): 8 experts of hidden 48 over 32 ranks cannot run."""
    cfg = qwen3_moe(experts=8)
    with pytest.raises(MemplanError, match="uneven dim-1") as err:
        estimate(_spec(cfg, "bf16", "none", 32, 1), from_config(cfg))
    assert err.value.field == "parallelism.data"
