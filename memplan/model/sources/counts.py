"""Parameter counts of an inventory: totals by kind, active parameters per token, largest parts.

Pure functions of an `Inventory`; `inventory_view.inventory_summary` and `inventory --json` show
them.
Roles (`TensorSpec.role`) decide what is what: "embedding", "position" and "head" are the
embedding-side parameters; "experts" are the routed experts (fused `[E, ...]` tensors in the
transformers >= 5 layout, or one tensor per expert in a checkpoint's own layout).
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.model.inventory import Inventory, TensorSpec, numel_of

EMBEDDING_ROLES = frozenset({"embedding", "position", "head"})
"""Parameters on the vocabulary/position side: token and position embeddings, the LM head."""
EXPERT_ROLE = "experts"
"""Routed experts; shared experts ("shared_expert") run for every token."""

ACTIVE_DEFINITION = (
    "active = every parameter a token passes through: non-expert parameters (attention, "
    "dense MLPs, shared experts, routers, norms) + top_k/num_experts of the routed expert "
    "parameters; counted with embeddings and head, and without them"
)
"""What `active_parameters` counts, in words for the reports."""


def embedding_parameters(inventory: Inventory) -> int:
    """Elements of the embedding-side parameters (a tied head counted once, as a tensor)."""
    return numel_of(t for t in inventory.parameters if t.role in EMBEDDING_ROLES)


def non_embedding_parameters(inventory: Inventory) -> int:
    """All parameters but token/position embeddings and the LM head (Kaplan et al. 2020,
    arXiv 2001.08361 section 2.1, count N without embeddings)."""
    return inventory.num_parameters - embedding_parameters(inventory)


def routed_expert_parameters(inventory: Inventory) -> int:
    """Elements of the routed-expert parameters, all experts."""
    return numel_of(t for t in inventory.parameters if t.role == EXPERT_ROLE)


def active_parameters(inventory: Inventory, *, embeddings: bool = True) -> int | None:
    """Parameters one token uses in the forward pass; None when the inventory cannot say.

    active = total - routed + routed x top_k / num_experts. The routed parameters of a layer
    are num_experts equal experts, so routed x top_k / num_experts is an integer. With
    `embeddings=False` the embedding-side parameters are left out as well.
    Published figures this reproduces: Mixtral-8x7B 12.9B of 46.7B (Jiang et al. 2024, arXiv
    2401.04088 section 2.1: "13B active parameters"), Qwen3-30B-A3B 3.3B of 30.5B (Qwen3
    model card), DeepSeek-V3 37B of 671B (arXiv 2412.19437, abstract).

    None for a bare parameter count (role "flat": no tensors to tell experts from the rest)
    and for expert tensors without a known top_k/num_experts (a checkpoint without its config).
    """
    if any(t.role == "flat" for t in inventory.parameters):
        return None
    routed = routed_expert_parameters(inventory)
    total = inventory.num_parameters
    if not embeddings:
        total -= embedding_parameters(inventory)
    if routed == 0:
        return total
    arch = inventory.architecture
    if arch is None or arch.num_experts <= 0 or arch.num_experts_per_token <= 0:
        return None
    return total - routed + routed * arch.num_experts_per_token // arch.num_experts


def largest_tensor(inventory: Inventory) -> TensorSpec | None:
    """The parameter with the most elements (the first of equals), None when there are none."""
    if not inventory.parameters:
        return None
    return max(inventory.parameters, key=lambda t: t.numel)


def layer_parameters(tensors: Iterable[TensorSpec]) -> dict[int, int]:
    """Parameter elements per layer index (tensors outside the layers skipped)."""
    sizes: dict[int, int] = {}
    for t in tensors:
        if t.layer is not None and t.kind == "parameter":
            sizes[t.layer] = sizes.get(t.layer, 0) + t.numel
    return sizes


def largest_layer(inventory: Inventory) -> tuple[int, int] | None:
    """(layer index, parameters) of the largest layer (the lowest index of equals)."""
    sizes = layer_parameters(inventory.parameters)
    if not sizes:
        return None
    return max(sizes.items(), key=lambda kv: (kv[1], -kv[0]))
