"""What torch.utils.checkpoint holds for a recomputation that no autograd node saves: the
attention mask transformers' eager attention adds to the scores.

Under full recomputation (every decoder layer checkpointed: transformers'
GradientCheckpointingLayer) and selective recomputation (every attention core checkpointed:
memplan.verify.selective), torch's non-reentrant checkpoint keeps the region's arguments in
the closure it recomputes the region with (`recompute_fn`, held by the region's
_CheckpointFrame), and that frame lives until the region's backward has run. The eager mask
is one of those arguments, made once per forward by the model and passed to every layer: it
stays alive from the forward to the first decoder layer's backward (the last to run), through
the loss. No node saves it (the scores' `+ mask` saves neither input), so the saved tensors
(`Activations.blocks`, what verify measures as activations) do not hold it: it is a transient
of those phases. SDPA passes no mask where the batch has no padding (masking_utils.sdpa_mask:
`allow_is_causal_skip`, the kernel's is_causal), so only eager attention holds one.

Measured (benchmarks/profile_verify.py, CPU, torch MemTracker): qwen3_5_text eager selective
0.95-1.64% below the measured peak without it, the [2, 1, 128, 128] mask alive through the
loss's backward (131,072 B in fp32, 65,536 in bf16); smollm3's eager full recomputation
holds its [2, 1, 32, 32] mask at the same moment (4,096 B in bf16; SDPA's row 4,096 B closer).
Where the first decoder layer takes no mask (Qwen3.5's linear-attention layer 0), the masks
are freed once the last layer taking one has run its backward: qwen3_5_text's eager full
recomputation measures the same peak as SDPA's, in layer 0's backward.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.memory import Phase, Transient
from memplan.model.forward.tensors import Activations, Setting
from memplan.precision import dtype_bytes

SRC_MASK = (
    "transformers 5.25 masking_utils.py::create_causal_mask (`dtype = inputs_embeds.dtype`), "
    "eager_mask (the [batch, 1, q, kv] additive mask in that dtype); torch 2.13 "
    "torch/utils/checkpoint.py::_checkpoint_without_reentrant_generator (`recompute_fn` closes "
    "over the region's args and kwargs; its _CheckpointFrame lives until the region's "
    "backward)"
)

MASK_PHASES: tuple[Phase, ...] = ("forward", "loss", "backward_start", "backward")
"""Made before the first layer's forward; freed once the first layer taking it has run its
backward (the decoder layers' backward runs last to first) and its checkpoint frame is gone:
alive where the layers' backward starts, and at its end unless the first layer takes no mask
(Activations.checkpoint_released_bytes)."""

RECURRENT_KINDS = frozenset({"linear_attention", "conv", "mamba", "linear"})
"""Decoder-layer kinds (config `layer_types`) that take no eager mask: transformers 5.25 passes
them create_recurrent_attention_mask's (a [batch, sequence] padding mask, or None) from
`causal_mask_mapping` (models/qwen3_5/modeling_qwen3_5.py::Qwen3_5TextModel.forward,
models/lfm2/modeling_lfm2.py::Lfm2Model.forward), so their checkpoint frames hold no
[b, 1, s, s] tensor."""

SAVED_MASK = "checkpoint.causal_mask"
"""A family rule's saved tensor for the mask (GPT-2 passes it to each block positionally, and
its checkpointed block saves it: memplan.model.families.gpt2): then the saved tensors hold it
already."""


def with_held_mask(acts: Activations, st: Setting, kinds: tuple[str, ...] = ()) -> Activations:
    """`acts` with the eager masks the checkpoint holds (`held_mask`) among its transients.
    `kinds`: the decoder layers' kinds in model order (a traced profile's layer groups); ()
    where not known (a family rule: one kind, every layer takes the causal mask)."""
    term = held_mask(acts, st, kinds)
    if term is None:
        return acts
    # The first decoder layer's backward runs last: where that layer takes no mask, every
    # frame holding one is gone by then (memplan.step.transients.first_layer_backward).
    released = term.bytes if kinds and kinds[0] in RECURRENT_KINDS else 0
    return replace(
        acts,
        checkpoint_held=(*acts.checkpoint_held, term),
        checkpoint_released_bytes=acts.checkpoint_released_bytes + released,
    )


def held_mask(acts: Activations, st: Setting, kinds: tuple[str, ...] = ()) -> Transient | None:
    """The eager attention masks torch.utils.checkpoint holds from the forward to the backward
    of the first decoder layer that takes one: [batch, 1, sequence, sequence] in the stream
    dtype (the embeddings' output: under autocast the fp32 one), one per kind of the layers
    that take one (`causal_mask_mapping`: full, sliding and chunked attention each their own;
    one where `kinds` is not known), for transformers' model code with eager attention and
    full or selective recomputation."""
    if (
        not acts.modelled
        or st.implementation != "transformers"
        or st.attention != "eager"
        or st.checkpointing not in ("full", "selective")
    ):
        return None
    if any(t.name == SAVED_MASK for b in acts.blocks for t in b.tensors):
        return None
    masked = sorted({k for k in kinds if k not in RECURRENT_KINDS})
    if kinds and not masked:
        return None  # no layer takes an eager mask
    count = max(len(masked), 1)
    b, s = st.batch, st.sequence
    width = dtype_bytes(st.stream)
    which = f" ({', '.join(masked)})" if len(masked) > 1 else ""
    return Transient(
        name="checkpoint_held_mask",
        bytes=count * b * s * s * width,
        phases=MASK_PHASES,
        formula=f"{count} x eager attention mask{which} [{b}, 1, {s}, {s}] x {width} B "
        f"({st.stream}), held by torch.utils.checkpoint's recomputation ({st.checkpointing}) "
        "until the backward of the first layer taking it; saved by no node",
        source=SRC_MASK,
        pieces=count,
    )
