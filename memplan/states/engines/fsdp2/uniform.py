"""torch FSDP2's refusal of a parameter group whose trainable parameters are held in different
dtypes (issue 19).

torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::
FSDPParamGroup._init_mp_dtypes, run by the first forward's lazy init (FSDPParamGroup.lazy_init
from _fsdp_state.py::FSDPState._lazy_init): over the group's parameters that require a
gradient, `orig_dtypes = {p.orig_dtype ...}` (the sharded parameter's dtype,
_fsdp_param.py::FSDPParam.init_dtype_attrs) must hold one dtype, else
`AssertionError("FSDP expects uniform original parameter dtype but got {...}")`. Frozen
parameters may differ (QLoRA's packed weights, prepare_model_for_kbit_training's fp32 root);
the reduce dtype, one MixedPrecisionPolicy per group, is uniform whatever the parameters.
Measured on a two-rank fake process group (benchmarks/fsdp2_own_dtype.py, REFUSALS: a bf16
trainable bias beside peft's fp32 adapters raises; the same bias frozen runs).

A group is one `fully_shard` call's parameters as memplan.states.engines.fsdp2.groups makes
them (Layout.fsdp_groups; under expert parallelism the routed experts are a group of their
own, torch making one FSDPParamGroup per mesh).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec, by_layer

SRC_UNIFORM = (
    "torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py::"
    "FSDPParamGroup._init_mp_dtypes"
)


def mixed_trainable(tensors: Sequence[TensorSpec], held: str) -> tuple[TensorSpec, ...]:
    """The first trainable parameter of each held dtype among one group's `tensors` (the
    recipe's `held` where a tensor has no fixed dtype): more than one, and torch refuses the
    group."""
    first: dict[str, TensorSpec] = {}
    for t in tensors:
        if t.trainable:
            first.setdefault(t.dtype or held, t)
    return tuple(first.values()) if len(first) > 1 else ()


def _groups(inventory: Inventory, wrap: str, experts: bool) -> list[tuple[str, list[TensorSpec]]]:
    """(what, parameters) of each group FSDP2 makes of `inventory` (as fsdp2_groups)."""
    roots = [t for t in inventory.parameters if t.layer is None]
    layers = by_layer(inventory.parameters)
    out: list[tuple[str, list[TensorSpec]]] = []
    first = [t for t in roots if t.role in ("embedding", "position")]
    rest = [t for t in roots if t.role not in ("embedding", "position")]
    if wrap == "torchtitan" and not inventory.tied and first and rest:
        out += [("torchtitan's embedding group", first), ("torchtitan's head group", rest)]
    else:
        out.append(("the root group (every parameter outside the decoder layers)", roots))
    for layer, ts in layers.items():
        if experts:
            dense = [t for t in ts if t.role != "experts"]
            routed = [t for t in ts if t.role == "experts"]
            out.append((f"decoder layer {layer}'s routed experts", routed))
            out.append((f"decoder layer {layer}", dense))
        else:
            out.append((f"decoder layer {layer}", ts))
    return out


@lru_cache(maxsize=256)
def check_uniform_dtype(inventory: Inventory, *, held: str, wrap: str, experts: bool) -> None:
    """Refuse an FSDP2 job any of whose groups trains parameters held in different dtypes
    (SRC_UNIFORM). `held`: the dtype the module holds its other parameters in (the master
    weights' under a *-mixed recipe); `wrap`: Layout.fsdp_groups; `experts`: expert
    parallelism (routed experts in groups of their own). Cached per inventory (plan asks for
    every layout)."""
    for what, tensors in _groups(inventory, wrap, experts):
        mixed = mixed_trainable(tensors, held)
        if not mixed:
            continue
        shown = " and ".join(f"{t.name} in {t.dtype or held}" for t in mixed)
        raise MemplanError(
            f"fsdp2 puts trainable parameters held in different dtypes into one fully_shard "
            f"group, {what}: {shown}. torch refuses that group at the first forward "
            f'("FSDP expects uniform original parameter dtype", {SRC_UNIFORM}). Train '
            "parameters of one dtype per group: use a *-mixed precision (FSDP2 then holds "
            "every parameter in the fp32 master dtype), set finetune.autocast_adapter_dtype: "
            "false (peft's adapters in the recipe's dtype), or freeze the others (e.g. "
            "finetune.bias: none, no finetune.modules_to_save); or use engine: ddp.",
            field="parallelism.engine",
        )
