"""Activations, tensor by tensor: what autograd saves for backward in one forward pass.

`predict(inventory, setting)` returns the saved tensors of the transformers 5.25 model the
inventory describes (the rules were read from 5.24, which differs only in Falcon's attention:
`Setting.transformers` picks), grouped in blocks (embeddings, decoder layers, head, loss), for
eager or SDPA attention, dropout on or off, any precision recipe (autocast included), activation
checkpointing none/full/selective, on CUDA or CPU kernels. Families without rules say so
(`Activations.modelled` is False) instead of guessing. With `model.implementation: torchtitan`
the saved tensors are those of torchtitan's own Llama 3/Qwen3 (memplan.model.stacks.torchtitan:
none, full, its per-op `selective-op` and every-Nth-layer `checkpoint_every`), never a profile
traced from transformers; with `model.implementation: litgpt` those of LitGPT's own GPT
(memplan.model.stacks.litgpt: none and full, one device or data parallelism; its LoRA and
QLoRA: memplan.model.stacks.litgpt_lora, litgpt_qlora); with
`megatron-core`, those of Megatron-Core's GPTModel (memplan.model.stacks.megatron: local or TE
layer spec, none / full / selective).
"""

from __future__ import annotations

from memplan.activations.per_gpu import SAVED_FIELDS, for_stages, micro_batch, on_rank
from memplan.activations.saved import FINETUNE_PARALLEL, predict, rule_refuses, source
from memplan.model.forward.tensors import (
    Activations,
    AttentionKind,
    Block,
    Checkpointing,
    Device,
    Saved,
    Setting,
)

__all__ = [
    "FINETUNE_PARALLEL",
    "SAVED_FIELDS",
    "Activations",
    "AttentionKind",
    "Block",
    "Checkpointing",
    "Device",
    "Saved",
    "Setting",
    "for_stages",
    "micro_batch",
    "on_rank",
    "predict",
    "rule_refuses",
    "source",
]
