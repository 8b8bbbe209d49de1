"""FSDP2 wrapped as torchtitan wraps it (`parallelism.fsdp_wrap: torchtitan`, the default with
`model.implementation: torchtitan`): the input embedding, each decoder layer, then the final
norm and the output projection as one group not resharded after forward
(torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder, torchtitan 0.3.0).

Oracles:
- the groups: torchtitan's own apply_fsdp_to_decoder run on its own Llama 3 debug model (on
  the meta device, over a one-rank gloo mesh), whose FSDP2 parameter groups and
  reshard_after_forward flags are read back from torch's FSDP state;
- the peak: each gloo rank's measured peak (FSDPMemTracker) when memplan verify wraps a tiny
  transformers Llama the same way (memplan/verify/rank.py::_torchtitan_groups), bf16-mixed
  with torchtitan's reduce_dtype fp32; tolerance and gloo's race envelope as in
  tests/test_fsdp2_peak.py. Measured: the per-layer wrapping's peak on the first case was
  2,082,972 B, torchtitan's 1,547,932 B (memplan 1,547,796 B); on the second 2,959,132 B and
  2,635,436 B (memplan 2,634,904 B).
"""

from __future__ import annotations

from typing import Any

import pytest

from memplan.config.load import LoadedSpec, validate
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.report.settings import layout_of
from memplan.states.engines.fsdp2.groups import fsdp2_groups
from tests.fsdp2_oracle import padded_groups
from tests.test_fsdp2_peak import MODELS, _check_peak
from tests.test_verify_support import spec_dict

pytest.importorskip("torch")
pytest.importorskip("transformers")

# torchtitan 0.3.0 models/llama3/__init__.py::_debugmodel (dim 256, 6 layers, 16 heads and
# key/value heads, FFN hidden 768, vocabulary 2048, untied) as a transformers config.
TITAN_DEBUG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def _spec(stage: int, ranks: int, mb: int, seq: int, **par: Any) -> LoadedSpec:
    data = spec_dict(
        "llama",
        precision="bf16-mixed",
        training={"micro_batch_size": mb, "sequence_length": seq},
        parallelism={"engine": "fsdp2", "data": ranks, "zero_stage": stage, **par},
    )
    data["model"] = {"architecture": MODELS["llama"]}
    return validate(data)


def _torchtitan_groups() -> list[tuple[str, int, bool]]:
    """(module, parameters, reshard_after_forward) of every FSDP2 group torchtitan's
    apply_fsdp_to_decoder makes on its Llama 3 debug model."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    llama3 = pytest.importorskip("torchtitan.models.llama3")
    fsdp = pytest.importorskip("torchtitan.distributed.fsdp")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = llama3.llama3_configs["debugmodel"](attn_backend="flex").build()
        mesh = init_device_mesh("cpu", (1,))
        fsdp.apply_fsdp_to_decoder(model, mesh, torch.bfloat16, torch.float32, pp_enabled=False)
        out = []
        for name, module in model.named_modules():
            if not isinstance(module, FSDPModule):
                continue
            group = module._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            n = sum(p.sharded_size.numel() for p in group.fsdp_params)
            out.append((name, n, group.post_forward_mesh_info is not None))
        return out
    finally:
        dist.destroy_process_group()


def test_groups_as_torchtitan_apply_fsdp_to_decoder_makes_them() -> None:
    groups = _torchtitan_groups()
    by_name = {name: (n, reshard) for name, n, reshard in groups}
    ours = fsdp2_groups(from_config(TITAN_DEBUG), 1, "torchtitan")
    assert ours.head is not None
    assert by_name["tok_embeddings"] == (ours.root.padded, True)
    assert by_name["layers.0"] == (ours.block.padded, True)
    assert sum(1 for name in by_name if name.startswith("layers.")) == ours.layers
    assert by_name["lm_head"] == (ours.head.padded, False)  # [norm, lm_head]: one group
    assert by_name["norm"] == by_name["lm_head"]


def test_fsdp_wrap_defaults_to_torchtitan_with_its_implementation() -> None:
    spec = _spec(3, 4, 1, 16)
    assert layout_of(spec.spec).fsdp_groups == "layers"
    data = spec.spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["model"]["implementation"] = "torchtitan"
    titan = layout_of(validate(data).spec)
    assert (titan.fsdp_groups, titan.reduce_dtype) == ("torchtitan", "fp32")


@pytest.mark.parametrize(("stage", "ranks", "mb", "seq"), [(3, 4, 1, 16), (3, 2, 2, 32)])
def test_fsdp2_torchtitan_wrap_peak_on_every_rank(
    stage: int, ranks: int, mb: int, seq: int
) -> None:
    groups = padded_groups(MODELS["llama"], ranks)
    copy = max(groups.root, groups.block) * 4  # fp32 reduce-scatter input
    spec = _spec(stage, ranks, mb, seq, reduce_dtype="fp32", fsdp_wrap="torchtitan")
    _check_peak(spec, ranks, 0.001, copy)


def test_pin_torchtitan_wrap_terms() -> None:
    """Pinning (memplan's own output): under torchtitan's wrapping the head group's buffers
    replace the root's in forward, and the embedding group ends the backward."""
    spec = _spec(3, 4, 1, 16, reduce_dtype="fp32", fsdp_wrap="torchtitan")
    report = estimate(spec.spec, from_config(MODELS["llama"]))
    names = {t.name for t in report.timeline.transients}
    assert {"fsdp2_unsharded_head", "fsdp2_sharded_head_grads"} <= names
    assert "fsdp2_unsharded_root" not in names
    assert report.timeline.peak.phase == "backward_end"


def test_fsdp_wrap_needs_fsdp2() -> None:
    from memplan.errors import MemplanError

    data = spec_dict("llama", parallelism={"engine": "ddp", "data": 2, "fsdp_wrap": "torchtitan"})
    with pytest.raises(MemplanError, match="fsdp_wrap groups FSDP2's fully_shard calls"):
        validate(data)
