"""Activations, tensor by tensor: what autograd saves for backward in one forward pass.

`predict(inventory, setting)` returns the saved tensors of the transformers 5.25 model the
inventory describes (the rules were read from 5.24, which differs only in Falcon's attention:
`Setting.transformers` picks), grouped in blocks (embeddings, decoder layers, head, loss), for
eager or SDPA attention, dropout on or off, any precision recipe (autocast included), activation
checkpointing none/full/selective, on CUDA or CPU kernels. Families without rules say so
(`Activations.modelled` is False) instead of guessing.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any

from memplan.activations import layout, lora
from memplan.config.spec import FinetuneSpec, Spec
from memplan.model.families import family_of, modelled_model_types
from memplan.model.forward.assemble import finish
from memplan.model.forward.tensors import (
    Activations,
    AttentionKind,
    Block,
    Checkpointing,
    Device,
    Saved,
    Setting,
    not_modelled,
)
from memplan.model.inventory import Architecture, Inventory
from memplan.states.parallel import chunk_layers
from memplan.states.stages import model_parallel
from memplan.versions import rules_release


def predict(inventory: Inventory, setting: Setting) -> Activations:
    """The activations of one forward pass (and its loss) on one GPU."""
    arch = inventory.architecture
    if arch is None:
        return not_modelled(
            "activations not modelled: the model is a bare parameter count (give hf_config, "
            "a preset or an architecture)."
        )
    family = family_of(arch.model_type)
    if family is None or isinstance(family.saved, str):
        return not_modelled(
            f"activations of model_type {arch.model_type!r} are not modelled yet "
            f"(modelled: {', '.join(modelled_model_types())}): per_gpu.activations is 0 and "
            "the peak leaves them out."
        )
    why = _unsupported(arch)
    if why:
        return not_modelled(why)
    model = family.saved(arch, setting, tied=bool(inventory.tied))
    if isinstance(model, str):
        return not_modelled(f"activations not modelled: {model}.")
    return finish(model, setting)


def setting_of(spec: Spec) -> Setting:
    """The activation setting a spec describes.

    Under autocast (amp-* recipes) the model's parameters, embeddings and residual stream stay
    in the parameter dtype and matmuls run in the compute dtype; otherwise the model is cast to
    the compute dtype and everything runs in it.
    """
    recipe = spec.recipe()
    t = spec.training
    return Setting(
        batch=t.micro_batch_size,
        sequence=t.sequence_length,
        stream=recipe.parameters if recipe.autocast else recipe.compute,
        matmul=recipe.compute,
        autocast=recipe.autocast,
        device=spec.hardware.device,
        attention=t.attention,
        dropout=t.dropout,
        checkpointing=t.activation_checkpointing,
        offload=t.activation_offload,
        transformers=rules_release(spec.model.transformers_version),
    )


def layout_of(spec: Spec, tensor_rank: int = 0) -> layout.Layout:
    """The layout of TP rank `tensor_rank` (0: the most vocabulary rows)."""
    par = spec.parallelism
    return layout.Layout(
        tensor=par.tensor,
        sequence_parallel=par.sequence_parallel,
        context=par.context,
        expert=par.expert,
        capacity_factor=par.expert_capacity_factor,
        vocab_divisible_by=par.vocab_multiple,
        vocab_split=par.vocab_split,
        tensor_rank=tensor_rank,
        # torch's own tensor parallelism (DTensor, as torchtitan composes it with FSDP2);
        # Megatron-LM's layers otherwise (megatron, and DeepSpeed via Megatron-DeepSpeed).
        gathered_inputs=par.engine in ("fsdp2", "ddp"),
    )


def for_spec(spec: Spec, inventory: Inventory) -> Activations:
    """The activations of the GPU that saves the most (pipeline rank 0 holds the most
    micro-batches in flight, but uneven stages can move the maximum)."""
    return max(for_stages(spec, inventory), key=lambda a: a.bytes)


def for_stages(spec: Spec, inventory: Inventory) -> tuple[Activations, ...]:
    """The activations of one GPU of each pipeline rank for `spec`'s layout, at that rank's
    peak (memplan.activations.layout)."""
    micro = micro_batch(spec, inventory)
    return tuple(on_rank(spec, inventory, micro, r) for r in range(spec.parallelism.pipeline))


def on_rank(spec: Spec, inventory: Inventory, micro: Activations, rank: int) -> Activations:
    """Pipeline rank `rank`'s activations from one micro-batch's (`micro_batch`)."""
    par = spec.parallelism
    arch = inventory.architecture
    if par.pipeline == 1 or arch is None or not micro.modelled:
        return micro
    p, v = par.pipeline, par.virtual_stages
    chunks = tuple(chunk_layers(arch.num_layers, model_parallel(par))[rank::p])
    alive = layout.in_flight(par.schedule, p, v, rank, spec.training.gradient_accumulation_steps)
    key = (id(micro), chunks, alive, rank == 0, rank == p - 1)
    hit = _ON_RANK.get(key)
    if hit is not None and hit[0] is micro:
        return hit[1]
    out = layout.stage(micro, chunk_layers=chunks, alive=alive, first=key[3], last=key[4])
    if len(_ON_RANK) >= 4096:
        _ON_RANK.clear()
    _ON_RANK[key] = (micro, out)
    return out


# on_rank's results per (micro-batch object, chunks, micro-batches in flight, first, last):
# plan asks for the same pipeline rank of many layouts that share a micro-batch.
_ON_RANK: dict[tuple[object, ...], tuple[Activations, Activations]] = {}


def micro_batch(spec: Spec, inventory: Inventory, tensor_rank: int = 0) -> Activations:
    """One micro-batch's activations on one GPU of the layout, every layer (the TP slice at
    sequence / CP, sequence parallelism applied), with the layout's communication buffers;
    on TP rank `tensor_rank` (its vocabulary rows)."""
    return _micro_batch(inventory, setting_of(spec), layout_of(spec, tensor_rank), spec.finetune)


@lru_cache(maxsize=256)
def _micro_batch(
    inventory: Inventory, st: Setting, lay: layout.Layout, ft: FinetuneSpec
) -> Activations:
    """`micro_batch`, cached: plan's layouts share few (setting, layout) pairs."""
    arch = inventory.architecture
    if lay.trivial or arch is None:
        return lora.apply(ft, inventory, predict(inventory, st), st)
    why = layout.check(arch, st, lay)
    if why:
        return layout.refused(why)
    if ft.method != "full" or ft.freeze:
        return layout.refused(
            "activations not modelled for fine-tuning under tensor, context or expert parallelism"
        )
    local_st = layout.local_setting(st, lay)
    if arch.num_experts:
        local_st = replace(
            local_st,
            expert_pairs=layout.expert_pairs(arch, local_st.tokens, lay),
            local_experts=arch.num_experts // lay.expert,
        )
    local_arch = layout.local_architecture(arch, lay)
    local = predict(replace(inventory, architecture=local_arch), local_st)
    if not local.modelled:
        return local
    if lay.sequence_parallel:
        local = layout.split(predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=layout.buffers(arch, local_st, lay))


def _unsupported(arch: Architecture) -> str:
    """Why this architecture's forward is outside the rules, or ''."""
    cls = arch.extra.get("model_class")
    lm = ("LMHead", "CausalLM", "MaskedLM")
    if cls is not None and not any(k in str(cls) for k in lm):
        return (
            f"activations not modelled for {cls}: memplan models causal-LM heads and their "
            "loss (or BERT's masked-LM head) only."
        )
    if arch.extra.get("add_cross_attention"):
        return "activations not modelled: cross-attention layers."
    return ""


__all__ = [
    "Activations",
    "AttentionKind",
    "Block",
    "Checkpointing",
    "Device",
    "Saved",
    "Setting",
    "for_spec",
    "for_stages",
    "predict",
    "setting_of",
    "to_json",
]


def to_json(saved: Activations) -> dict[str, Any]:
    """The `activations` section of `memplan estimate --json`."""
    return {
        "modelled": saved.modelled,
        "bytes": saved.bytes,
        "host_bytes": saved.host_bytes,
        "logits_bytes": saved.logits_bytes,
        "loss_upcast_bytes": saved.upcast_bytes,
        "blocks": [
            {
                "name": b.name,
                "count": b.count,
                "bytes_each": b.bytes_each,
                "bytes": b.bytes,
                "recompute_bytes": b.recompute_bytes,
                "on_host": b.on_host,
                "tensors": [
                    {
                        "name": t.name,
                        "shape": list(t.shape),
                        "dtype": t.dtype,
                        "bytes": t.bytes,
                        "saved_by": t.saved_by,
                        "source": t.source,
                    }
                    for t in b.tensors
                ],
            }
            for b in saved.blocks
        ],
        "notes": list(saved.notes),
    }
