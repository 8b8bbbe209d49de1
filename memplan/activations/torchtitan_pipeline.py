"""torchtitan's layer SAC (`training.checkpoint_every` N > 1: every N-th block checkpointed)
on one pipeline rank: torchtitan counts the blocks it wraps per process, across the rank's
model chunks, so which of a rank's blocks are checkpointed depends on its chunks
(checkpointed_per_chunk); the rank's two layer kinds, checkpointed and plain, are each staged
as memplan.activations.pipeline.stage stages one kind (stage_every, called by
memplan.activations.on_rank).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.activations import pipeline
from memplan.model.forward.tensors import Activations

SRC_LAYER_SAC = (
    "torchtitan 9dec370 parallelisms/parallelize_llama.py::_apply_ac_to_transformer_block "
    "(`ptd_checkpoint_wrapper._count`, one counter per process over the blocks it wraps, in "
    "the order of its model chunks: pipeline_llama builds a rank's stages in order and "
    "parallelize_llama wraps each)"
)


def checkpointed_per_chunk(chunk_layers: tuple[int, ...], every: int) -> tuple[int, ...]:
    """Blocks layer SAC checkpoints in each of one pipeline rank's model chunks (SRC_LAYER_SAC):
    the rank counts its own blocks from 1 across its chunks and checkpoints block
    `count % every == 0`."""
    out, done = [], 0
    for n in chunk_layers:
        out.append((done + n) // every - done // every)
        done += n
    return tuple(out)


def stage_every(
    micro: Activations,
    *,
    chunk_layers: tuple[int, ...],
    alive: tuple[int, ...],
    every: int,
    first: bool,
    last: bool,
    source: str = pipeline.SRC_SCHEDULE,
) -> Activations:
    """One pipeline rank's activations at its peak (memplan.activations.pipeline.stage) when
    torchtitan checkpoints every `every`-th block: `micro`'s two layer kinds (checkpointed, the
    block with a recompute, and plain) split over the rank's chunks as SRC_LAYER_SAC counts
    them, each staged like memplan.activations.pipeline.stage stages one kind."""
    kinds = [b for b in micro.blocks if b.name == "layers"]
    ckpt = next(b for b in kinds if b.recompute)
    plain = next((b for b in kinds if not b.recompute), None)
    others = tuple(b for b in micro.blocks if b.name != "layers")
    ck = checkpointed_per_chunk(chunk_layers, every)
    staged = pipeline.stage(
        replace(micro, blocks=(*others, ckpt)),
        chunk_layers=ck,
        alive=alive,
        first=first,
        last=last,
        source=source,
    )
    if plain is None:
        return staged
    rest = tuple(n - c for n, c in zip(chunk_layers, ck, strict=True))
    more = pipeline.stage(
        replace(micro, blocks=(*others, plain)),
        chunk_layers=rest,
        alive=alive,
        first=False,
        last=False,
        source=source,
    )
    layers = tuple(b for b in more.blocks if b.name in ("layers", "in_flight.layers"))
    note = (
        f"torchtitan's layer SAC on this pipeline rank: {sum(ck)} of {sum(chunk_layers)} "
        f"blocks checkpointed ({SRC_LAYER_SAC})."
    )
    return replace(
        staged,
        blocks=(*staged.blocks, *(b for b in layers if b.count)),
        notes=(*staged.notes, note),
    )
