"""FSDP2 group sizes measured on the real model, for tests that check memplan's FSDP2 terms:
the transformers model built on the meta device, grouped as memplan verify's `fully_shard`
calls group it (one group per decoder layer, the root's group of the rest), each parameter
padded by torch's own rule (torch/distributed/fsdp/_fully_shard/_fsdp_common.py::
_get_dim0_padded_size: dim 0 up to a multiple of the world, `padded_sharded_param_size` x
world). No memplan calculator code is involved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaddedGroups:
    """Elements of world x padded shard (an all-gather output / reduce-scatter input)."""

    root: int
    block: int
    """The largest decoder layer's group."""
    root_last: int
    """Unpadded elements of the root's last parameter (the last one to get its gradient)."""


def padded_groups(config: dict[str, Any], world: int) -> PaddedGroups:
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_common import _get_dim0_padded_size

    from memplan.verify.build import build_model, decoder_layers

    model = build_model(config, torch.float32, "meta")
    layers = decoder_layers(model, int(config.get("num_hidden_layers") or config["n_layer"]))
    assert layers is not None
    in_layers = {id(p) for p in layers.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]

    def padded(params: Any) -> int:
        return sum(_get_dim0_padded_size(p.size(), world).numel() for p in params)

    return PaddedGroups(
        root=padded(root),
        block=max(padded(layer.parameters()) for layer in layers),
        root_last=root[-1].numel(),
    )
