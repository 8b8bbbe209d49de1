"""FSDP2 under expert parallelism: each MoE layer's routed experts are sharded over the
expert-data ranks (data / EP), the rest of the layer over all data ranks, as torchtitan's
apply_fsdp_to_decoder does with ep_degree > 1 (torchtitan/distributed/fsdp.py, 0.3.0;
memplan.states.engines.fsdp2.groups.EDP). Before, memplan gathered the rank's experts over all
data ranks: each expert tensor padded to `data` rows (ceil(local experts / data) x data), 32x
the experts' all-gather on the DeepSeek-V3.2 flagship row (8 local experts, data 256).

Oracle: torchtitan's own apply_fsdp_to_decoder on its Qwen3 MoE debug model (64 experts, on
the meta device) over a fake 8-rank process group (torch's fake backend) with ep_degree 4 and
a 2-rank expert-data mesh; the FSDP2 parameter groups torch makes (one per mesh) and their
padded sizes are read back from torch's FSDP state. torchtitan's EP split itself (the experts
divided over the EP mesh before FSDP) is not applied, so the experts are the 64 global ones on
both sides; memplan's inventory is a transformers Qwen3-MoE config of the same sizes.
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.states.engines.fsdp2.groups import fsdp2_groups

pytest.importorskip("torch")

# torchtitan 0.3.0 models/qwen3/__init__.py::_debugmodel_moe as a transformers config (dim
# 256, 16 heads / 8 key-value heads of 128, 64 experts of FFN 768, vocabulary 2048, untied).
QWEN3_MOE = {
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "moe_intermediate_size": 768,
    "intermediate_size": 768,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 2,
    "vocab_size": 2048,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
WORLD, EP = 8, 4


def _torchtitan_block_groups() -> list[tuple[int, int]]:
    """(mesh size, world x padded shard elements) of each FSDP2 parameter group of
    torchtitan's first MoE block."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    qwen3 = pytest.importorskip("torchtitan.models.qwen3")
    fsdp = pytest.importorskip("torchtitan.distributed.fsdp")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=WORLD)
    try:
        with torch.device("meta"):
            model = qwen3.qwen3_configs["debugmodel_moe"](attn_backend="flex").build()
        dp = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
        edp = init_device_mesh("cpu", (WORLD // EP, EP), mesh_dim_names=("efsdp", "ep"))["efsdp"]
        fsdp.apply_fsdp_to_decoder(
            model, dp, torch.bfloat16, torch.float32, pp_enabled=False, ep_degree=EP, edp_mesh=edp
        )
        block = model.layers["0"]
        assert isinstance(block, FSDPModule)
        out = []
        for group in block._get_fsdp_state()._fsdp_param_groups:
            size = group.mesh_info.shard_mesh_size
            padded = sum(p.padded_sharded_param_size.numel() for p in group.fsdp_params)
            out.append((size, size * padded))
        return sorted(out)
    finally:
        dist.destroy_process_group()


def test_expert_groups_as_torchtitan_shards_them() -> None:
    groups = _torchtitan_block_groups()
    block = fsdp2_groups(from_config(QWEN3_MOE), WORLD, "torchtitan", WORLD // EP).block
    ours = sorted(
        [
            (WORLD, WORLD * block.padded),
            (block.expert_world, block.expert_world * block.expert_padded),
        ]
    )
    assert groups == ours


def _spec(expert: int) -> Any:
    return validate(
        {
            "model": {"architecture": QWEN3_MOE},
            "precision": "bf16-mixed",
            "optimizer": {"name": "adamw"},
            "training": {"micro_batch_size": 1, "sequence_length": 64},
            "parallelism": {"engine": "fsdp2", "zero_stage": 3, "data": 32, "expert": expert},
            "hardware": {"gpu": "H100-80GB"},
        }
    ).spec


def test_pin_experts_gathered_over_expert_data_ranks() -> None:
    """Pinning (memplan's own output): with EP 4 over 32 data ranks a layer's 16 local experts
    are gathered from 8 expert-data ranks (2 rows each, no padding), not from 32 (1 row each,
    half of them padding): (1,590,016 dense + 16 x (1536 x 256 + 256 x 768) = 9,437,184
    expert elements) x 2 B, where it was (1,590,016 + 2 x 9,437,184) x 2 B = 40,928,768 B."""
    report = estimate(_spec(4), from_config(QWEN3_MOE))
    block = {t.name: t.bytes for t in report.timeline.transients}["fsdp2_unsharded_block"]
    assert block == (1_590_016 + 9_437_184) * 2
