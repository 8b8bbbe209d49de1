"""Tensor parallelism for `memplan verify`: torch's own DTensor TP (`parallelize_module`) laid out
the way torchtitan lays out Llama (torchtitan/models/llama3/infra/parallelize.py::apply_tp), on
the split memplan's rules assume (memplan/states/parallel.py::tp_split):

- column-parallel (`ColwiseParallel`, weight and bias split on dim 0): q/k/v, gate/up;
- row-parallel (`RowwiseParallel`, weight split on dim 1, bias whole): o_proj, down_proj;
- vocab-parallel embedding (`RowwiseParallel` on nn.Embedding: weight split on dim 0, the
  lookup masked per rank and all-reduced, or reduce-scattered to Shard(1) with sequence
  parallelism);
- the LM head column-parallel over the vocabulary (`ColwiseParallel`, output Shard(-1)) with
  `loss_parallel()`: the cross entropy runs on each rank's vocabulary slice (torch/distributed/
  tensor/parallel/loss.py), never gathering the logits;
- norms replicated; with sequence parallelism they run on the sequence shard
  (`SequenceParallel`), and `PrepareModuleInput` all-gathers the sequence before attention and
  the MLP (torch's DTensor rule, memplan's `gathered_inputs`).

DTensor splits a dimension like torch.chunk (torch/distributed/tensor/placement_types.py::
Shard._split_tensor): with a vocabulary TP does not divide, the first ranks hold ceil(V / TP)
rows and the last fewer (`vocab_rows`).

The residual stream keeps its global shape under sequence parallelism (a Shard(1) DTensor, not
a local tensor as in torchtitan's own model), because transformers derives position ids and
the causal mask from the hidden states' sequence length.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memplan.errors import MemplanError
from memplan.model.families import FAMILIES

# Model types whose transformers modules have the names and the forward this plan needs
# (separate q/k/v and gate/up/down linears; attention views q/k/v as (..., -1, head_dim), so
# each rank runs its local heads without a config change): their family's `dtensor_tp`.
MODEL_TYPES = tuple(t for f in FAMILIES if f.dtensor_tp for t in f.model_types)

_COLUMN = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)$")
_ROW = re.compile(r"(^|\.)(o_proj|down_proj)$")
_NORM = re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm)$")


def check_model(config: dict[str, Any], tensor: int) -> None:
    """Refuse models this plan cannot shard (MemplanError, saying what can be verified)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise MemplanError(
            f"parallelism.tensor: {tensor} cannot be verified for model_type {model_type!r}: "
            "verify shards transformers' Llama-style modules (separate q/k/v and gate/up/down "
            f"projections: {', '.join(MODEL_TYPES)}) with torch's DTensor tensor parallelism. "
            "Verify a Llama-style model under the same layout, or this model with tensor: 1.",
            field="parallelism.tensor",
        )
    if config.get("tie_word_embeddings", False):
        raise MemplanError(
            "parallelism.tensor > 1 with tied word embeddings cannot be verified: "
            "parallelize_module gives the embedding and the LM head separate DTensor "
            "parameters. Verify with tie_word_embeddings: false.",
            field="parallelism.tensor",
        )


def vocab_rows(vocab: int, tensor: int) -> list[int]:
    """Rows of a vocabulary-parallel tensor on each TP rank (torch.chunk's split)."""
    each = -(-vocab // tensor)
    return [max(0, min(each, vocab - r * each)) for r in range(tensor)]


def meshes(device: str, data: int, tensor: int) -> tuple[Any, Any]:
    """(data-parallel mesh, tensor-parallel mesh): the dimensions of one 2-D mesh ("dp",
    "tp"), TP ranks consecutive (global rank = dp rank x tensor + tp rank), as torchtitan
    builds it."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (data, tensor), mesh_dim_names=("dp", "tp"))
    return mesh["dp"], mesh["tp"]


def apply(model: nn.Module, mesh: Any, sequence_parallel: bool, loss_parallel: bool = True) -> None:
    """Shard `model` (a transformers causal LM) over the TP `mesh` in place. Without
    `loss_parallel` the LM head's output is all-gathered to whole logits (torchtitan's
    disable_loss_parallel: llama3/parallelize.py::apply_tp, output_layouts=Replicate())."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    base: Any = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    embed = getattr(base, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(layers, nn.ModuleList) or embed is None or head is None:
        raise MemplanError(
            f"{type(model).__name__} has no model.layers / model.embed_tokens / lm_head: "
            "verify cannot apply its tensor-parallel plan to it.",
            field="parallelism.tensor",
        )
    sp = sequence_parallel
    for layer in layers:
        plan: dict[str, Any] = {}
        for name, module in layer.named_modules():
            if _COLUMN.search(name) and isinstance(module, nn.Linear):
                plan[name] = ColwiseParallel()
            elif _ROW.search(name) and isinstance(module, nn.Linear):
                plan[name] = (
                    RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
                    if sp
                    else RowwiseParallel()
                )
            elif sp and _NORM.search(name):
                plan[name] = SequenceParallel()
        if sp:
            # transformers passes the decoder layer's hidden states to self_attn by keyword.
            plan["self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            )
            plan["mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
        parallelize_module(layer, mesh, plan)
        _check_heads(layer, mesh.size())
    top: dict[str, Any] = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(),
            output_layouts=Shard(1) if sp else Replicate(),
            use_local_output=not sp,
        ),
        "lm_head": ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sp:
        top["model.norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)


def _check_heads(layer: nn.Module, tensor: int) -> None:
    """Each rank runs heads / TP query and key/value heads; the module's GQA ratio (a config
    constant) must stay right for the local heads."""
    attn: Any = getattr(layer, "self_attn", None)
    if attn is None:
        return
    head_dim = int(attn.head_dim)
    local_q = attn.q_proj.weight.to_local().shape[0] // head_dim
    local_kv = attn.k_proj.weight.to_local().shape[0] // head_dim
    if local_kv == 0 or attn.num_key_value_groups != local_q // local_kv:
        raise MemplanError(
            f"tensor parallelism {tensor} leaves {local_q} query and {local_kv} key/value "
            "heads per rank: the heads must divide evenly.",
            field="parallelism.tensor",
        )


def param_groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """The optimizer's parameters in two groups, DTensors and plain tensors: without FSDP2 (which
    makes every parameter a DTensor) the norms TP leaves alone stay plain, and a foreach or
    fused step cannot mix the two in one call ("got mixed torch.Tensor and DTensor"). Each
    parameter's state is the same either way."""
    from torch.distributed.tensor import DTensor

    groups = [
        [p for p in params if isinstance(p, DTensor)],
        [p for p in params if not isinstance(p, DTensor)],
    ]
    return [{"params": g} for g in groups if g]


@contextlib.contextmanager
def loss_parallel(tensor: int) -> Iterator[None]:
    """torch's loss_parallel() when TP is on (the vocabulary-parallel cross entropy, forward
    and backward), nothing otherwise."""
    if tensor == 1:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel as parallel

    with parallel():
        yield
