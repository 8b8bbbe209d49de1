"""SigLIP's vision tower as transformers builds it (models/siglip/modeling_siglip.py), the image
side of Gemma 3's image-text model (memplan.model.families.gemma)."""

from __future__ import annotations

from typing import Any

from memplan.errors import MemplanError
from memplan.model.families._decoder import (
    Part,
    buffer,
    linear,
    norm,
    param,
    stamp_layers,
)
from memplan.model.inventory import Config, TensorSpec


def siglip_vision(cfg: Config, prefix: str) -> tuple[dict[str, Any], list[TensorSpec]]:
    """SiglipVisionModel (models/siglip/modeling_siglip.py, transformers 5.24).

    embeddings: patch_embedding Conv2d(C, H, P, P) with bias, position_embedding
    [(image // patch)^2, H], buffer position_ids [1, positions] int64 non-persistent;
    encoder.layers.i: layer_norm1, self_attn (k, v, q, out_proj, all with bias, in that
    order), layer_norm2, mlp (fc1 [I, H], fc2 [H, I], with bias); post_layernorm; and, when
    `vision_use_head`, head (probe [1, 1, H], nn.MultiheadAttention in_proj [3H, H] + bias,
    out_proj, layernorm, mlp). Role "vision", layer None: these are not decoder layers.
    """
    hidden = cfg.int("hidden_size")
    inter = cfg.int("intermediate_size")
    layers = cfg.int("num_hidden_layers")
    channels = cfg.int("num_channels")
    image = cfg.int("image_size")
    patch = cfg.int("patch_size")
    if patch == 0:
        raise MemplanError(f"{cfg.origin}: patch_size must be positive.", field="patch_size")
    positions = (image // patch) ** 2

    def vlinear(name: str, out_f: int, in_f: int) -> Part:
        return linear(name, out_f, in_f, "vision", bias=True)

    def layer_norm(name: str) -> Part:
        return norm(name, hidden, bias=True, role="vision")

    def mlp(name: str) -> Part:
        return vlinear(f"{name}.fc1", inter, hidden) + vlinear(f"{name}.fc2", hidden, inter)

    block: Part = (
        *layer_norm("layer_norm1"),
        *(
            t
            for p in ("k_proj", "v_proj", "q_proj", "out_proj")
            for t in vlinear(f"self_attn.{p}", hidden, hidden)
        ),
        *layer_norm("layer_norm2"),
        *mlp("mlp"),
    )
    tensors: list[TensorSpec] = [
        param(
            f"{prefix}.embeddings.patch_embedding.weight",
            (hidden, channels, patch, patch),
            "vision",
        ),
        param(f"{prefix}.embeddings.patch_embedding.bias", (hidden,), "vision"),
        param(f"{prefix}.embeddings.position_embedding.weight", (positions, hidden), "vision"),
        buffer(
            f"{prefix}.embeddings.position_ids",
            (1, positions),
            "vision",
            dtype="int64",
            persistent=False,
        ),
    ]
    tensors += stamp_layers([block] * layers, f"{prefix}.encoder.layers", decoder=False)
    tensors += layer_norm(f"{prefix}.post_layernorm")
    use_head = cfg.bool("vision_use_head", True)
    if use_head:
        tensors += [
            param(f"{prefix}.head.probe", (1, 1, hidden), "vision"),
            param(f"{prefix}.head.attention.in_proj_weight", (3 * hidden, hidden), "vision"),
            param(f"{prefix}.head.attention.in_proj_bias", (3 * hidden,), "vision"),
            *vlinear(f"{prefix}.head.attention.out_proj", hidden, hidden),
            *layer_norm(f"{prefix}.head.layernorm"),
            *mlp(f"{prefix}.head.mlp"),
        ]
    facts = {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": cfg.int("num_attention_heads"),
        "image_size": image,
        "patch_size": patch,
        "num_positions": positions,
        "vision_use_head": use_head,
    }
    return facts, tensors
