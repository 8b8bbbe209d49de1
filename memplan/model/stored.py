"""Stored inventories: the tensors transformers builds for a config, kept as a JSON document so
that `estimate` reads them without torch.

A model_type with no hand-written family (memplan.model.families) gets its inventory from
transformers on the meta device (memplan.verify.trace.meta), which imports torch and
transformers (seconds). `memplan profile` writes that inventory beside the activation profile it
traces, keyed the same way (model_type and memplan.model.profile.config_hash of the config), and
memplan ships both for its flagship presets (memplan/model/profiles/, built by
benchmarks/flagships.py). memplan.model.load finds the file and turns it back into the same
Inventory here: every parameter and buffer with its name, shape, dtype, layer and role, the tied
aliases and the Architecture, as transformers built them (the version is in the notes).

Pure: no torch, no I/O (memplan.model.load reads the files; memplan.verify.trace writes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memplan.errors import MemplanError
from memplan.model.inventory import Architecture, Inventory, TensorSpec

SCHEMA = 1
"""Version of the stored-inventory document; a reader refuses other versions."""

_ARCH_INTS = (
    "hidden_size",
    "num_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "num_experts_per_token",
    "max_position_embeddings",
)


def file_name(model_type: str, config_hash: str) -> str:
    """`<model_type>-<first 12 hex of the config hash>.inventory.json`, beside the profiles (a
    name the profiles' `<model_type>-<hash>-*.json` pattern does not match)."""
    return f"{model_type}-{config_hash[:12]}.inventory.json"


def to_document(
    inventory: Inventory, *, config_hash: str, versions: Mapping[str, str]
) -> dict[str, Any]:
    """The JSON document of an inventory built for the config whose hash is `config_hash`."""
    arch = inventory.architecture
    if arch is None:
        raise ValueError("a bare parameter count has no inventory to store")
    return {
        "schema": SCHEMA,
        "config_hash": config_hash,
        "versions": dict(versions),
        "name": inventory.name,
        "architecture": {
            "model_type": arch.model_type,
            **{k: getattr(arch, k) for k in _ARCH_INTS},
            "extra": dict(arch.extra),
        },
        "tied": [list(pair) for pair in inventory.tied],
        "notes": list(inventory.notes),
        # One row per tensor: [name, shape, dtype, layer, role, persistent, trainable], and
        # `gradient` (TensorSpec.gradient) as an eighth entry where it is False.
        "parameters": [_row(t) for t in inventory.parameters],
        "buffers": [_row(t) for t in inventory.buffers],
    }


def _row(t: TensorSpec) -> list[Any]:
    row = [t.name, list(t.shape), t.dtype, t.layer, t.role, t.persistent, t.trainable]
    # Added beside the seven entries (schema 1 kept): documents written before it, and rows of
    # tensors that get a gradient, have seven and read as `gradient` True.
    return row if t.gradient else [*row, False]


def from_document(doc: Any, *, origin: str) -> Inventory:
    """The inventory of a stored document; a MemplanError naming `origin` if it is not one."""
    try:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, this memplan reads {SCHEMA}")
        a = doc["architecture"]
        arch = Architecture(
            model_type=str(a["model_type"]),
            **{k: int(a[k]) for k in _ARCH_INTS},
            extra=dict(a.get("extra", {})),
        )
        versions = doc.get("versions", {})
        notes = tuple(str(x) for x in doc.get("notes", ()))
        return Inventory(
            name=str(doc["name"]),
            architecture=arch,
            parameters=tuple(_tensor(r, "parameter") for r in doc["parameters"]),
            buffers=tuple(_tensor(r, "buffer") for r in doc["buffers"]),
            tied=tuple((str(x), str(y)) for x, y in doc.get("tied", ())),
            notes=(
                *notes,
                f"inventory read from {origin} (stored, built by transformers "
                f"{versions.get('transformers', '?')}): torch is not imported.",
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MemplanError(
            f"{origin} is not a memplan stored inventory ({type(err).__name__}: {err}); "
            "rebuild it with `memplan profile SPEC`."
        ) from None


def _tensor(row: Any, kind: str) -> TensorSpec:
    name, shape, dtype, layer, role, persistent, trainable, *more = row
    if len(more) > 1:
        raise ValueError(f"a tensor row of {len(row)} entries, at most 8: {row[0]!r}")
    return TensorSpec(
        name=str(name),
        shape=tuple(int(d) for d in shape),
        kind="parameter" if kind == "parameter" else "buffer",
        dtype=None if dtype is None else str(dtype),
        persistent=bool(persistent),
        layer=None if layer is None else int(layer),
        role=str(role),
        trainable=bool(trainable),
        gradient=bool(more[0]) if more else True,
    )
