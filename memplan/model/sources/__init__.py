"""From a model description to its tensor inventory: a config.json (through its family,
memplan.model.families), a checkpoint's tensor table, or a bare parameter count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families import family_of, supported_model_types
from memplan.model.inventory import Architecture, Inventory, TensorSpec


def from_config(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    """The inventory of the model that `config` (a config.json mapping) describes."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise MemplanError(
            f"{origin} has no model_type; memplan needs it to pick the architecture family "
            f"(one of: {', '.join(supported_model_types())}).",
            field="model_type",
        )
    family = family_of(model_type)
    if family is None:
        raise MemplanError(
            f"model_type {model_type!r} is not supported. Supported: "
            f"{', '.join(supported_model_types())}. Otherwise describe the model with "
            "`model: {architecture: {...}}` using one of those families' keys, or give "
            "`model: {num_parameters: N}` for model states only.",
            field="model_type",
        )
    inventory = family.tensors(config, origin=origin)
    ignored = [key for key in ("quantization_config", "auto_map") if key in config]
    if ignored:
        note = (
            f"{' and '.join(ignored)} in the config ignored: tensors are counted at the "
            "precision recipe's dtypes, and no remote code is run."
        )
        inventory = _with_note(inventory, note)
    return inventory


def from_parameter_count(num_parameters: int) -> Inventory:
    """A model known only by its size: one flat parameter tensor, no architecture.

    Model states (parameters, gradients, optimizer states) are exact up to per-tensor terms
    (optimizer `step` tensors, per-tensor padding), which need the real tensor list.
    """
    return Inventory(
        name=f"{num_parameters:,} parameters",
        architecture=None,
        parameters=(TensorSpec("parameters", (num_parameters,), role="flat"),),
        notes=(
            "model given as a parameter count: one flat tensor stands for all parameters, so "
            "per-tensor terms (optimizer step scalars, per-tensor shard padding) and "
            "activations are not modelled. Give hf_config for the exact figure.",
        ),
    )


def from_tensors(
    tensors: Sequence[TensorSpec],
    *,
    name: str,
    config: Mapping[str, Any] | None = None,
    origin: str = "config.json",
) -> Inventory:
    """The inventory of a checkpoint from its tensor table (each `dtype`: the stored one).

    With the model's `config` (its config.json), the config's inventory lends its
    architecture, roles, layers, tied pairs and non-persistent buffers, and the two are
    cross-checked in a note; a config whose model_type memplan does not model is set aside
    with a note (the tensors alone still give the model states). See
    `memplan.model.sources.checkpoint`.
    """
    from memplan.model.sources import checkpoint  # its name patterns compile on import

    notes: list[str] = []
    reference = None
    if config is not None:
        model_type = config.get("model_type")
        if isinstance(model_type, str) and family_of(model_type) is not None:
            reference = from_config(config, origin=origin)
        else:
            notes.append(
                f"{origin} not used: model_type {model_type!r} is not one memplan models "
                f"({', '.join(supported_model_types())})."
            )
    return checkpoint.build(tensors, name=name, reference=reference, notes=notes)


def _with_note(inventory: Inventory, note: str) -> Inventory:
    return Inventory(
        name=inventory.name,
        architecture=inventory.architecture,
        parameters=inventory.parameters,
        buffers=inventory.buffers,
        tied=inventory.tied,
        notes=(*inventory.notes, note),
    )


__all__ = [
    "Architecture",
    "Inventory",
    "TensorSpec",
    "from_config",
    "from_parameter_count",
    "from_tensors",
]
