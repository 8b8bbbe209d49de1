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
"""Made before the first layer's forward; freed once the first layer's backward (the last
the backward runs) has freed its checkpoint frame."""

SAVED_MASK = "checkpoint.causal_mask"
"""A family rule's saved tensor for the mask (GPT-2 passes it to each block positionally, and
its checkpointed block saves it: memplan.model.families.gpt2): then the saved tensors hold it
already."""


def with_held_mask(acts: Activations, st: Setting) -> Activations:
    """`acts` with the eager mask the checkpoint holds (`held_mask`) among its transients."""
    term = held_mask(acts, st)
    if term is None:
        return acts
    return replace(acts, checkpoint_held=(*acts.checkpoint_held, term))


def held_mask(acts: Activations, st: Setting) -> Transient | None:
    """The eager attention mask torch.utils.checkpoint holds from the forward to the first
    decoder layer's backward: [batch, 1, sequence, sequence] in the stream dtype (the
    embeddings' output: under autocast the fp32 one), for transformers' model code with eager
    attention and full or selective recomputation. One mask: a model that builds one per
    attention kind (sliding and full layers) holds one of each, counted once here."""
    if (
        not acts.modelled
        or st.implementation != "transformers"
        or st.attention != "eager"
        or st.checkpointing not in ("full", "selective")
    ):
        return None
    if any(t.name == SAVED_MASK for b in acts.blocks for t in b.tensors):
        return None
    b, s = st.batch, st.sequence
    width = dtype_bytes(st.stream)
    return Transient(
        name="checkpoint_held_mask",
        bytes=b * s * s * width,
        phases=MASK_PHASES,
        formula=f"eager attention mask [{b}, 1, {s}, {s}] x {width} B ({st.stream}), held by "
        f"torch.utils.checkpoint's recomputation ({st.checkpointing}) until the first layer's "
        "backward; saved by no node",
        source=SRC_MASK,
    )
