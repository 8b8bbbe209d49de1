"""The vocabulary of device memory every stage reports in: the phases of a training step, a
transient buffer alive in some of them, and how the CUDA caching allocator rounds requests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Phase = Literal[
    "start", "forward", "loss", "backward_start", "backward", "backward_end", "optimizer_step"
]
PHASES: tuple[Phase, ...] = (
    "start",
    "forward",
    "loss",
    "backward_start",
    "backward",
    "backward_end",
    "optimizer_step",
)
ALWAYS: tuple[Phase, ...] = PHASES
FORWARD_BACKWARD: tuple[Phase, ...] = ("forward", "loss", "backward_start", "backward")
BACKWARD: tuple[Phase, ...] = ("backward_start", "backward", "backward_end")

# c10/cuda/CUDACachingAllocator.cpp: every block is rounded up to kMinBlockSize = 512 bytes;
# requests <= kSmallSize (1 MiB) come from 2 MiB segments (kSmallBuffer), requests below
# kMinLargeAlloc (10 MiB) from 20 MiB segments (kLargeBuffer), larger ones get a segment of
# their own rounded up to kRoundLarge (2 MiB).
ALLOCATOR_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20
# The CUDA context (driver state, kernel images, cuBLAS/cuDNN handles) outside the caching
# allocator: not in torch.cuda.memory_reserved() but not usable either. An assumption, not a
# measurement: a few hundred MiB with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default
# since CUDA 11.7 / torch 2.x). Override with hardware.cuda_context (nvidia-smi's used memory
# minus torch.cuda.memory_reserved() on an idle process).
CUDA_CONTEXT_BYTES = 512 << 20


COMPUTE_STREAM = "compute"
"""The default CUDA stream, where autograd and the optimizer allocate. Engines that run
collectives on side streams (FSDP2) allocate some buffers there instead; the CUDA caching
allocator keeps each stream's blocks for that stream (memplan.step.allocator)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Transient:
    """One transient buffer or overhead."""

    name: str
    bytes: int
    phases: tuple[Phase, ...]
    """The phases of the step in which it is alive."""
    formula: str
    source: str
    pieces: int = 1
    """How many equal tensors it is, made one after another (the allocator replay allocates
    each)."""
    parts: tuple[int, ...] = ()
    """The sizes of the tensors it is, in the order the step makes them (`bytes` is their sum;
    the allocator replay allocates each, in place of `pieces`); empty: `pieces` equal ones."""
    stream: str = COMPUTE_STREAM
    """The CUDA stream it is allocated on (the allocator replay keeps it in that stream's
    pool)."""
    momentary: Phase | None = None
    """A buffer alive only for a moment as this phase begins, below the phase's peak, so no
    phase point holds it (`phases` is empty): the allocator replay makes it as the phase
    begins, before the phase's own transients, and frees it after them (the loss phase's once
    the head's saved tensors are made, before the logits: memplan.step.replay)."""
    beside: str | None = None
    """The saved block (memplan.model.forward.tensors.Block.name) the step makes it beside: a
    GPU whose activations hold no such block (a pipeline rank without the embeddings or the
    head) makes none."""


def round_block(n_bytes: int) -> int:
    """`n_bytes` as the CUDA caching allocator hands it out (a multiple of 512 bytes)."""
    return -(-max(n_bytes, 1) // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


def rounding(sizes: Iterable[int]) -> int:
    """Bytes the 512-byte rounding adds over `sizes` (one allocation each)."""
    return sum(round_block(n) - n for n in sizes if n > 0)


def segment_bytes(sizes: Iterable[int]) -> int:
    """What `torch.cuda.memory_reserved()` needs at least to hold blocks of `sizes` at once:
    large blocks in their own segments rounded to 2 MiB, medium ones packed into 20 MiB
    segments, small ones into 2 MiB segments (allocator constants above; perfect packing, so
    a lower bound: fragmentation and blocks cached from earlier phases come on top)."""
    return pack(segment_parts(sizes))


Parts = tuple[int, int, int]


def segment_parts(sizes: Iterable[int], times: int = 1) -> Parts:
    """(large, medium, small) bytes of `sizes`, each allocated `times` times, before packing
    into segments: parts of several groups add up, `pack` turns the sum into bytes."""
    large = small = medium = 0
    for n in sizes:
        block = round_block(n)
        if block <= SMALL_SIZE:
            small += block
        elif block < MIN_LARGE_ALLOC:
            medium += block
        else:
            large += -(-block // ROUND_LARGE) * ROUND_LARGE
    return large * times, medium * times, small * times


def pack(parts: Parts) -> int:
    """`segment_bytes` of blocks whose `segment_parts` add up to `parts`."""
    large, medium, small = parts
    return large + _segments(medium, LARGE_SEGMENT) + _segments(small, SMALL_SEGMENT)


def _segments(n_bytes: int, segment: int) -> int:
    return -(-n_bytes // segment) * segment
