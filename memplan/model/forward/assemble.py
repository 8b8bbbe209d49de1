"""From one family's per-layer tensors to the whole forward pass: blocks, checkpointing,
offload, logits and the loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memplan.model.forward import kernels
from memplan.model.forward.attention import Core, recomputed
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.precision import dtype_bytes

SRC_CHECKPOINT = (
    "torch/utils/checkpoint.py::_checkpoint_without_reentrant_generator (_NoopSaveInputs saves "
    "the positional tensor inputs); transformers modeling_layers.py::GradientCheckpointingLayer"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    """One family's saved tensors, before checkpointing is applied."""

    embeddings: tuple[Saved, ...]
    """Saved once by the embeddings (indices, embedding dropout)."""
    per_forward: tuple[Saved, ...] = ()
    """One storage made per forward and saved by every layer (RoPE cos/sin). Under full
    checkpointing the layers get it through the recompute closure: not saved."""
    checkpoint_args: tuple[Saved, ...] = ()
    """Extra positional tensors every checkpointed layer receives (one shared storage)."""
    layer_head: tuple[Saved, ...]
    """A decoder layer up to its attention core."""
    core: Core
    layer_tail: tuple[Saved, ...]
    """A decoder layer after its attention core."""
    head: tuple[Saved, ...]
    """The final norm and the LM head's input (and its weight cast under autocast)."""
    vocab: int
    hidden: int
    num_layers: int
    loss_dtype: str = kernels.FP32
    """Dtype of the log-softmax the loss saves (transformers' LM losses upcast to fp32)."""
    upcast: bool = True
    """The loss makes an fp32 copy of the logits first (`logits.float()`)."""
    shifted: bool = True
    """The loss shifts the labels by one (causal LMs; BERT's masked-LM loss takes them as given)."""
    notes: tuple[str, ...] = ()
    backward_temporaries: tuple[Saved, ...] = ()
    """What one layer's backward holds at its most beyond the two tensors the backward working
    set's estimate counts (memplan.step.transients.working_sets; Block.backward_temporaries)."""


def dropout_on(st: Setting, extra: Mapping[str, Any], key: str, *, default: float) -> bool:
    """Is the dropout whose probability is config key `key` active?

    `training.dropout` True/False forces it; None follows the config (transformers' class
    default when the inventory does not carry the key). `F.dropout` with p = 0 returns its input
    and saves nothing (Dropout.cpp::dropout -> _dropout_impl: `if (p == 0 ...) return input`).
    """
    if st.dropout is not None:
        return st.dropout
    return float(extra.get(key, default)) > 0


def dropout_note(st: Setting, extra: Mapping[str, Any], keys: tuple[str, ...], family: str) -> str:
    """A note when dropout is on only because of transformers' defaults (GPT-2's 0.1): the
    inventory did not carry the config's probabilities. Defaults of 0 need no note."""
    missing = [k for k in keys if k not in extra]
    if st.dropout is not None or not missing:
        return ""
    return (
        f"dropout: {', '.join(missing)} not in the model description; {family}'s defaults "
        "assumed (set training.dropout to force it on or off)."
    )


def finish(model: Model, st: Setting) -> Activations:
    """Apply checkpointing and offload, add the logits and the loss."""
    t, b, s = st.tokens, st.batch, st.sequence
    core = model.core
    full = (*model.layer_head, *core.core, *core.output, *model.layer_tail)
    embeddings = model.embeddings
    notes = list(model.notes)
    if st.checkpointing == "full":
        layer_input = kernels.saved(
            "checkpoint.hidden_states", (b, s, model.hidden), st.stream, "Noop", SRC_CHECKPOINT
        )
        layers = Block(
            name="layers",
            count=model.num_layers,
            tensors=(layer_input,),
            recompute=full,
            layered=True,
            backward_temporaries=model.backward_temporaries,
            on_host=st.offload,
            # autocast's cached weight copies: the checkpointed forward saves none of them,
            # the cache holds each until the autocast region exits (kernels.weight_casts)
            held=tuple(x for x in full if x.name.endswith(".weight_cast")),
        )
        embeddings = (*embeddings, *model.checkpoint_args)
    elif st.checkpointing == "selective":
        # Megatron-style: the attention core (QK^T, softmax, dropout, .V) is recomputed; the
        # layer keeps the core's inputs q, k, v instead (Korthikanti et al. 2022, sec. 5).
        kept = (*model.layer_head, *core.inputs, *core.output, *model.layer_tail)
        layers = Block(
            name="layers",
            count=model.num_layers,
            tensors=kept,
            recompute=recomputed(core),
            layered=True,
            backward_temporaries=model.backward_temporaries,
        )
        embeddings = (*embeddings, *model.per_forward)
    else:
        layers = Block(
            name="layers",
            count=model.num_layers,
            tensors=full,
            layered=True,
            backward_temporaries=model.backward_temporaries,
        )
        embeddings = (*embeddings, *model.per_forward)
    if st.offload and st.checkpointing != "full":
        notes.append("activation offload applies to checkpointed layer inputs only: ignored.")
    logits_bytes = t * model.vocab * dtype_bytes(st.matmul)
    upcast = 0
    if model.upcast and st.matmul != kernels.FP32:
        upcast = t * model.vocab * dtype_bytes(kernels.FP32)
    return Activations(
        modelled=True,
        blocks=(
            Block(name="embeddings", count=1, tensors=embeddings),
            layers,
            Block(name="head", count=1, tensors=model.head),
            Block(
                name="loss",
                count=1,
                tensors=tuple(
                    kernels.causal_lm_loss(
                        t, model.vocab, model.loss_dtype, batch=st.batch, shifted=model.shifted
                    )
                ),
            ),
        ),
        logits_bytes=logits_bytes,
        upcast_bytes=upcast,
        hidden_bytes=t * model.hidden * dtype_bytes(st.stream),
        notes=tuple(n for n in notes if n),
    )
