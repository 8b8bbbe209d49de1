"""Measure what one MoE decoder layer saves on a real tensor + sequence parallel rank (CPU, gloo).

Used by tests/test_profile_tp.py and benchmarks/moe_sp_ranks.py (traced MoE profiles under
DTensor SP). Each spawned rank shards a tiny transformers MoE model (Qwen2-MoE with its shared
expert, Mixtral without, DeepSeek-V3 with MLA and a dense first layer) the way torchtitan lays
out MoE and MLA layers under TP + SP (torchtitan 05a6cb3 torchtitan/models/llama4/infra/
parallelize.py::apply_moe_ep_tp; 3e3a19f torchtitan/models/deepseek_v3/infra/parallelize.py::
apply_non_moe_tp; the installed torchtitan 0.3.0's models/common/moe_sharding.py::
_moe_sharding_config keeps the same layouts with EP off):

- attention and norms as tests/tp_sp_probe.py (torchtitan's Llama plan): `SequenceParallel`
  norms, `PrepareModuleInput(Shard(1) -> Replicate)` on self_attn, ColwiseParallel q/k/v,
  `RowwiseParallel(output_layouts=Shard(1))` o_proj;
- the MoE block (`mlp`): `PrepareModuleInputOutput(input_layouts=Shard(1), desired_input_layouts=
  Replicate, use_local_input=True, output_layouts=Partial, desired_output_layouts=Shard(1))`:
  ONE all-gather at the block's boundary, the block runs on that plain whole-sequence tensor,
  and its partial output is reduce-scattered back to the sequence shards;
- the router (`mlp.gate`) replicated (torchtitan's `NoParallel`: its input wrapped as a
  Replicate DTensor of the same local storage), the shared expert's gate/up ColwiseParallel and
  down `RowwiseParallel(output_layouts=Partial())` (Qwen2-MoE; its `shared_expert_gate`
  replicated), and the routed experts' weights sliced on their intermediate dimension
  (torchtitan's `TensorParallel` on GroupedExperts: w1/w3 Shard(1), w2 Shard(2), run on local
  tensors), gate and up halves of transformers' fused gate_up_proj sliced alike;
- MLA attention (DeepSeek-V3): its input gathered once (`PrepareModuleInput`, plain output),
  q_a_proj / kv_a_proj_with_mqa and their norms replicated (NoParallel), q_b_proj and kv_b_proj
  ColwiseParallel over the heads, o_proj as above; a dense layer's MLP as torchtitan's Llama
  (`PrepareModuleInput` on mlp, ColwiseParallel gate/up, `RowwiseParallel(Shard(1))` down).

Every saved storage is attributed as in tp_sp_probe (layers.<i>, by the innermost module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tests.activation_probe import DTYPES, build_model
from tests.tp_probe import PRECISIONS, Case, cpu_mesh, spawn_ranks
from tests.tp_sp_probe import NORMS, Run, _measure, _saved_by

BATCH, SEQ = 2, 32


def sequence_parallel(model: Any, mesh: Any) -> None:
    """torchtitan's TP + SP plan for a MoE decoder layer on transformers' modules (above)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp, rank = mesh.size(), mesh.get_local_rank()
    for layer in model.model.layers:
        plan: dict[str, Any] = {name: SequenceParallel() for name in NORMS}
        attn = layer.self_attn
        plan["self_attn.o_proj"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        if hasattr(attn, "kv_a_proj_with_mqa"):
            # MLA (torchtitan deepseek_v3 apply_non_moe_tp): the attention's input gathered
            # once, the low-rank projections and their norms replicated (NoParallel: plain
            # tensors here), the up-projections column-parallel over the heads
            plan["self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=True,
            )
            up = ("q_b_proj" if attn.q_lora_rank is not None else "q_proj", "kv_b_proj")
            plan.update({f"self_attn.{n}": ColwiseParallel() for n in up})
        else:
            plan["self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            )
            plan.update({f"self_attn.{n}_proj": ColwiseParallel() for n in ("q", "k", "v")})
        if not hasattr(layer.mlp, "experts"):  # a dense layer: torchtitan's Llama MLP plan
            plan["mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
            plan["mlp.gate_proj"] = ColwiseParallel()
            plan["mlp.up_proj"] = ColwiseParallel()
            plan["mlp.down_proj"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
            parallelize_module(layer, mesh, plan)
            continue
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Partial(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=False,
        )
        for shared in ("shared_expert", "shared_experts"):
            if hasattr(layer.mlp, shared):
                plan[f"mlp.{shared}.gate_proj"] = ColwiseParallel()
                plan[f"mlp.{shared}.up_proj"] = ColwiseParallel()
                plan[f"mlp.{shared}.down_proj"] = RowwiseParallel(output_layouts=Partial())
        parallelize_module(layer, mesh, plan)
        experts = layer.mlp.experts
        inter = experts.gate_up_proj.shape[1] // 2
        part = inter // tp
        rows = slice(rank * part, (rank + 1) * part)
        gate_up = experts.gate_up_proj.detach()
        local = torch.cat((gate_up[:, :inter][:, rows], gate_up[:, inter:][:, rows]), dim=1)
        experts.gate_up_proj = torch.nn.Parameter(local.contiguous())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach()[:, :, rows].contiguous())
    parallelize_module(
        model,
        mesh,
        {
            "model.embed_tokens": PrepareModuleOutput(
                output_layouts=Replicate(),
                desired_output_layouts=Shard(1),
                use_local_output=False,
            ),
            "model.norm": SequenceParallel(),
            "lm_head": PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            ),
        },
    )


def forward(config: dict[str, Any], case: Case, mesh: Any | None) -> tuple[Run, torch.Tensor]:
    """Build the model (sharded with TP + SP given a mesh), run forward + loss; the run and
    the (whole, plain) logits."""
    config = {**config, "attention_dropout": 0.0}
    dtype, autocast = PRECISIONS[case.precision]
    model = build_model(config, attention=case.attention, dtype=dtype)
    if mesh is not None:
        sequence_parallel(model, mesh)
    torch.manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ))
    cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else nullcontext()
    with _measure(model) as (regions, by_ptr, counts), cast:
        out = model(input_ids=ids, labels=ids.clone(), use_cache=False)
    for ptr, nodes in _saved_by(out.loss.grad_fn).items():
        if ptr in by_ptr:
            by_ptr[ptr].saved_by = sorted(set(nodes))
    run = Run(regions, float(out.loss.detach()), dtensor_saves=counts[0], parameter_saves=counts[1])
    return run, out.logits.detach()


def _rank(
    rank: int, world: int, port: int, configs: dict[str, Any], cases: Sequence[Case], out: str
) -> None:
    with cpu_mesh(rank, world, port) as mesh:
        result: dict[str, Any] = {}
        for name, config in configs.items():
            for case in cases:
                sp, sp_logits = forward(config, case, mesh)
                _, logits = forward(config, case, None)
                result[f"{name}/{case.name}"] = {
                    "sp": asdict(sp),
                    "max_logit_diff": float((sp_logits.float() - logits.float()).abs().max()),
                }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(
    configs: dict[str, dict[str, Any]], cases: Sequence[Case], out: Path, world: int = 2
) -> list[dict[str, Any]]:
    """Every rank's results (index = rank) for each named config and case ("name/case"), from
    `world` processes on gloo (one spawn for all of them)."""
    return spawn_ranks(_rank, configs, cases, out, world)
