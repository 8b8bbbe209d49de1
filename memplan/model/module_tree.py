"""The module tree an inventory reveals: which parameters belong to which module, and what kind
of module it is (Linear, GPT-2 Conv1D, Embedding, other). peft (memplan.model.finetune.lora) and
bitsandbytes (memplan.model.finetune.qlora) choose the modules they wrap from it. Pure: no torch,
no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from memplan.model.families import family_of
from memplan.model.inventory import Inventory, TensorSpec

ModuleKind = Literal["linear", "conv1d", "embedding", "other"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Module:
    """A module of the model as the inventory shows it: the owner of some parameters."""

    name: str
    kind: ModuleKind
    """linear (nn.Linear), conv1d (transformers Conv1D), embedding, or other (norms,
    routers, experts, containers: not something LoRA can adapt)."""
    tensors: tuple[TensorSpec, ...]
    """Its own parameters (`weight`, `bias`), a tied alias named as the alias."""
    in_features: int = 0
    out_features: int = 0
    alias: bool = False
    """Its weight is a tied alias of another module's (GPT-2's lm_head)."""
    output: bool = False
    """The output embedding (the LM head), which `all-linear` and 4-bit quantization skip."""


def modules(inventory: Inventory) -> dict[str, Module]:
    """Every module the inventory reveals, by name, in parameter order: the owners of
    parameters (with tied aliases), and every container above them (kind "other")."""
    arch = inventory.architecture
    family = family_of(arch.model_type) if arch else None
    conv1d = family.conv1d if family else frozenset()
    vocab = arch.vocab_size if arch else 0
    owned: dict[str, list[TensorSpec]] = {}
    aliases: set[str] = set()
    by_name = {t.name: t for t in inventory.parameters}
    for t in inventory.parameters:
        owned.setdefault(owner(t.name), []).append(t)
    for alias, target in inventory.tied:
        if target in by_name:
            owned.setdefault(owner(alias), []).append(replace(by_name[target], name=alias))
            aliases.add(owner(alias))
    out: dict[str, Module] = {}
    for name, tensors in owned.items():
        for parent in _parents(name):
            if parent not in out:  # not setdefault: it would build a Module for every call
                out[parent] = Module(name=parent, kind="other", tensors=())
        out[name] = _classify(name, tensors, conv1d, vocab, alias=name in aliases)
    return out


def owner(name: str) -> str:
    """The module a parameter belongs to: `a.b.weight` -> `a.b`."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def leaf(name: str) -> str:
    """The parameter's own name in its module: `a.b.weight` -> `weight`."""
    return name.rsplit(".", 1)[-1]


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _classify(
    name: str, tensors: list[TensorSpec], conv1d: frozenset[str], vocab: int, *, alias: bool
) -> Module:
    leaves = {leaf(t.name): t for t in tensors}
    weight = leaves.get("weight")
    plain = weight is not None and len(weight.shape) == 2 and set(leaves) <= {"weight", "bias"}
    if not plain or weight is None:
        return Module(name=name, kind="other", tensors=tuple(tensors))
    rows, cols = weight.shape
    if weight.role in ("norm", "router", "experts", "flat"):
        return Module(name=name, kind="other", tensors=tuple(tensors))
    if weight.role in ("embedding", "position") and not alias:
        # nn.Embedding(num_embeddings, embedding_dim): weight [num, dim].
        return Module(
            name=name, kind="embedding", tensors=tuple(tensors), in_features=rows, out_features=cols
        )
    if leaf(name) in conv1d:
        # transformers pytorch_utils.py::Conv1D keeps its weight as [in, out] (nx, nf).
        return Module(
            name=name, kind="conv1d", tensors=tuple(tensors), in_features=rows, out_features=cols
        )
    output = alias or (weight.role == "head" and rows == vocab)
    return Module(
        name=name,
        kind="linear",
        tensors=tuple(tensors),
        in_features=cols,
        out_features=rows,
        alias=alias,
        output=output,
    )


def frozen(t: TensorSpec) -> TensorSpec:
    """`t` without a gradient or optimizer state."""
    return replace(t, trainable=False)


FINETUNE_NOTE = "finetune:"
"""Every transformed inventory carries one note starting so (apply() is then a no-op)."""
