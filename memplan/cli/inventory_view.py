"""`memplan inventory`: the model's tensors with layers folded, and its parameter counts."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from memplan.cli.render import human
from memplan.model.inventory import Inventory, fold_name
from memplan.model.sources import counts
from memplan.precision import dtype_bytes


def inventory_table(inventory: Inventory, param_dtype: str) -> RenderableType:
    """Tensors by name with layers folded: `model.layers.*.mlp.up_proj.weight  x32`."""
    folded: dict[tuple[str, tuple[int, ...], str, str], int] = {}
    for t in (*inventory.parameters, *inventory.buffers):
        key = (fold_name(t.name), t.shape, t.kind, t.dtype or param_dtype)
        folded[key] = folded.get(key, 0) + 1
    table = Table(title=f"Tensors of {inventory.name}", box=box.SIMPLE, title_justify="left")
    for col in ("name", "kind", "shape", "dtype", "count", "numel", "bytes"):
        table.add_column(col, justify="right" if col in ("count", "numel", "bytes") else "left")
    for (name, shape, kind, dtype), count in folded.items():
        numel = 1
        for d in shape:
            numel *= d
        table.add_row(
            name,
            kind,
            str(list(shape)),
            dtype,
            f"x{count}",
            f"{numel * count:,}",
            human(numel * count * dtype_bytes(dtype)),
        )
    return Group(table, inventory_summary(inventory))


def inventory_summary(inventory: Inventory) -> Text:
    """Totals, non-embedding and active counts, the largest tensor and layer, and the notes."""
    params = inventory.parameters
    total = inventory.num_parameters
    lines = [
        f"parameters: {total:,} in {len(params):,} tensors"
        + (f" (tied: {', '.join(a for a, _ in inventory.tied)})" if inventory.tied else ""),
        f"non-embedding parameters: {counts.non_embedding_parameters(inventory):,} "
        "(without token/position embeddings and the LM head)",
        *_active(inventory),
    ]
    big = counts.largest_tensor(inventory)
    if big is not None:
        lines.append(f"largest tensor: {big.name} {list(big.shape)} ({big.numel:,})")
    layer = counts.largest_layer(inventory)
    if layer is not None:
        lines.append(f"largest layer: {layer[0]} ({layer[1]:,} parameters)")
    if inventory.buffers:
        lines.append(
            f"buffers: {len(inventory.buffers)} tensors, "
            f"{sum(b.numel for b in inventory.buffers):,} elements"
        )
    lines.extend(f"note: {n}" for n in inventory.notes)
    return Text("\n".join(lines))


def _active(inventory: Inventory) -> list[str]:
    """The active parameters per token (memplan.model.sources.counts.active_parameters)."""
    active = counts.active_parameters(inventory)
    arch = inventory.architecture
    if counts.routed_expert_parameters(inventory) and active is not None and arch is not None:
        bare = counts.active_parameters(inventory, embeddings=False) or 0
        return [
            f"active parameters per token: {active:,} with embeddings and head, {bare:,} "
            f"without (top_k={arch.num_experts_per_token} of {arch.num_experts} experts)",
            f"  {counts.ACTIVE_DEFINITION}",
        ]
    if active is not None:
        return ["active parameters per token: all of them (no routed experts)"]
    return [
        "active parameters per token: unknown (needs the tensors and, for experts, "
        "top_k and num_experts from config.json)"
    ]
