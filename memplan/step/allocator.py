"""A replayable model of PyTorch's CUDA caching allocator (torch 2.13): what
`torch.cuda.max_memory_reserved()` shows for a sequence of allocations and frees.

Every rule is the source's, named where it is defined: c10/cuda/CUDACachingAllocator.cpp
(`DeviceCachingAllocator`: malloc, get_free_block, should_split, alloc_found_block, free_block,
try_merge_blocks, alloc_block, try_allocate_expandable_block, map_block, release_cached_blocks,
release_available_cached_blocks, round_size) and c10/core/AllocatorConfig.cpp (the
PYTORCH_CUDA_ALLOC_CONF keys). The block-size constants are memplan.memory's.

Modelled: one device, any number of streams, the default pools (no CUDA-graph private pools, no
`record_stream` deferral, no free-memory callbacks). Every block belongs to the stream it was
allocated on: a freed block is cached for that stream only (BlockComparatorSize orders by
stream first and get_free_block takes no other stream's block), and each stream grows its own
expandable segments (find_expandable_block looks only at segments of the request's stream), so
a buffer another stream frees is never reused by the compute stream's next tensor. Segment
addresses only break ties between free blocks of equal size (BlockComparatorSize orders by
size, then address); the model hands segments out at increasing addresses.
`garbage_collection_threshold` acts only under `torch.cuda.set_per_process_memory_fraction` and
is parsed, not replayed: a replay's reserved bytes are what the allocator holds without it (an
upper bound on what it holds with it).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from memplan.errors import MemplanError
from memplan.memory import (
    ALLOCATOR_BLOCK,
    COMPUTE_STREAM,
    SMALL_SEGMENT,
    SMALL_SIZE,
)
from memplan.step.alloc_conf import _SEGMENT_STRIDE, UNBOUNDED_ADDRESS_SPACE, AllocConf

# --- the replay -------------------------------------------------------------------------------

Event = tuple[Any, ...]
"""("alloc", id, nbytes), ("alloc", id, nbytes, stream), ("free", id), ("phase", name) or
("empty_cache",). A stream is any hashable name; an allocation without one is on COMPUTE."""

COMPUTE = COMPUTE_STREAM
"""The stream an allocation is on when its event names none: the default (compute) stream."""


@dataclass(frozen=True, slots=True)
class PhaseMark:
    """A ("phase", name) marker: the bytes at the marker, and the highest bytes from it to the
    next marker (or the end of the replay)."""

    name: str
    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int


@dataclass(frozen=True, slots=True)
class OutOfMemory:
    """The allocation that found no memory within `capacity`, even after the allocator freed
    its cached blocks (DeviceCachingAllocator::malloc raising OutOfMemoryError)."""

    event: int
    """Its index in the events."""
    id: Hashable
    nbytes: int
    allocated: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Replay:
    """What the allocator's statistics (torch.cuda.memory_stats) show after a replay."""

    peak_allocated: int
    """max_memory_allocated(): blocks handed out, each a rounded request (or a whole block the
    allocator did not split)."""
    peak_reserved: int
    """max_memory_reserved(): cudaMalloc'ed segments plus mapped expandable pages."""
    fragmentation: int
    """peak_reserved minus the most bytes allocated while reserved stood at its peak: the
    cached memory no tensor used at the tightest moment."""
    allocated: int
    reserved: int
    segments: int
    """Segments held at the end (an expandable segment counts once)."""
    peak_segments: int
    device_allocs: int
    """cudaMalloc calls and expandable-page mappings (stats num_device_alloc)."""
    alloc_retries: int
    """Allocations that freed every cached block and tried again (num_alloc_retries)."""
    phases: tuple[PhaseMark, ...] = ()
    oom: OutOfMemory | None = None
    peak_reserved_by_stream: tuple[tuple[Hashable, int], ...] = ()
    """Each stream's own highest reserved bytes (its segments), in the order the streams first
    allocated; they peak at different moments, so they add up to at least peak_reserved."""

    def reserved_at(self, phase: str) -> int:
        """Reserved bytes at the first marker named `phase`."""
        for mark in self.phases:
            if mark.name == phase:
                return mark.reserved
        raise KeyError(phase)


class _Segment:
    """An expandable segment (ExpandableSegment): address space mapped page by page."""

    __slots__ = ("base", "page")

    def __init__(self, base: int, page: int) -> None:
        self.base = base
        self.page = page


class _Block:
    """A Block: a piece of a segment, free or allocated; prev/next are its neighbours in the
    same segment (both None: the whole segment, "not split")."""

    __slots__ = ("ptr", "size", "allocated", "mapped", "prev", "next", "segment", "pool")

    def __init__(
        self, ptr: int, size: int, segment: _Segment | None, pool: _Pool, mapped: bool = True
    ) -> None:
        self.ptr = ptr
        self.size = size
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.segment = segment
        self.pool = pool
        """The BlockPool it came from, and returns to (Block::pool): its stream's."""


class _Pool:
    """One stream's share of a BlockPool: its free blocks ordered as BlockComparatorSize orders
    them (stream, then size, then address), and its unmapped expandable ranges by address
    (BlockComparatorAddress, stream first too)."""

    __slots__ = ("small", "page", "stream", "free", "by_ptr", "unmapped", "unmapped_by_ptr")

    def __init__(self, small: bool, page: int, stream: Hashable = COMPUTE) -> None:
        self.small = small
        self.page = page
        self.stream = stream
        self.free: list[tuple[int, int]] = []
        self.by_ptr: dict[int, _Block] = {}
        self.unmapped: list[int] = []
        self.unmapped_by_ptr: dict[int, _Block] = {}

    def insert(self, block: _Block) -> None:
        insort(self.free, (block.size, block.ptr))
        self.by_ptr[block.ptr] = block

    def remove(self, block: _Block) -> None:
        del self.free[bisect_left(self.free, (block.size, block.ptr))]
        del self.by_ptr[block.ptr]

    def insert_unmapped(self, block: _Block) -> None:
        insort(self.unmapped, block.ptr)
        self.unmapped_by_ptr[block.ptr] = block

    def remove_unmapped(self, block: _Block) -> None:
        del self.unmapped[bisect_left(self.unmapped, block.ptr)]
        del self.unmapped_by_ptr[block.ptr]


def _splice(block: _Block, before: _Block | None, after: _Block | None) -> None:
    """Block::splice: put `block` between `before` and `after`."""
    if before is not None:
        before.next = block
    block.prev = before
    if after is not None:
        after.prev = block
    block.next = after


def _expandable_size(block: _Block) -> int:
    """get_free_block's expandable_size: a free block followed by unmapped address space
    can grow into it, so best fit counts that space too."""
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


class _Allocator:
    """DeviceCachingAllocator for one device, its blocks pooled by stream."""

    def __init__(self, conf: AllocConf, capacity: int | None) -> None:
        self.conf = conf
        self.capacity = capacity
        self.max_split = conf.max_split_size if conf.max_split_size is not None else 1 << 62
        # Note [Expandable Segments]: 2 MiB pages for the small pool, large_segment_size
        # (20 MiB by default) for the large one.
        self.pools: dict[Hashable, tuple[_Pool, _Pool]] = {}
        """Per stream: (small, large)."""
        self.stream_reserved: dict[Hashable, int] = {}
        self.stream_peak: dict[Hashable, int] = {}
        self.allocated = self.reserved = self.segments = 0
        self.device_allocs = self.retries = 0
        self.peak_allocated = self.peak_reserved = self.peak_segments = 0
        self.allocated_at_peak = 0
        self.marks: list[list[Any]] = []  # [name, allocated, reserved, peak alloc., peak res.]
        self._bases = 0
        self._rounded: dict[int, int] = {}
        """conf.round_size of each request size met (replays repeat a few sizes)."""

    def _base(self) -> int:
        self._bases += 1
        return self._bases * _SEGMENT_STRIDE

    # malloc -----------------------------------------------------------------------------------

    def _pools(self, stream: Hashable) -> tuple[_Pool, _Pool]:
        pools = self.pools.get(stream)
        if pools is None:
            # Note [Expandable Segments]: 2 MiB pages for the small pool, large_segment_size
            # (20 MiB by default) for the large one.
            pools = self.pools[stream] = (
                _Pool(True, SMALL_SEGMENT, stream),
                _Pool(False, self.conf.large_segment_size, stream),
            )
            self.stream_reserved[stream] = self.stream_peak[stream] = 0
        return pools

    def _reserve(self, pool: _Pool, nbytes: int) -> None:
        """Reserved bytes change (a segment made or freed, pages mapped or unmapped)."""
        self.reserved += nbytes
        reserved = self.stream_reserved[pool.stream] = self.stream_reserved[pool.stream] + nbytes
        if reserved > self.stream_peak[pool.stream]:
            self.stream_peak[pool.stream] = reserved

    def malloc(self, nbytes: int, stream: Hashable = COMPUTE) -> _Block | None:
        """DeviceCachingAllocator::malloc: a cached block (get_free_block), else a new segment
        (alloc_block), else free oversize cached blocks and retry, else free every cached
        block and retry; then alloc_found_block. None: out of memory."""
        size = self._rounded.get(nbytes)
        if size is None:
            size = self._rounded[nbytes] = self.conf.round_size(nbytes)
        small, large = self._pools(stream)
        pool = small if size <= SMALL_SIZE else large
        block = self._free_block_for(pool, size)
        if block is None:
            alloc_size = self.conf.allocation_size(size)
            block = self._alloc_block(pool, size, alloc_size)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self.retries += 1
                self.empty_cache()
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                return None
        if self._should_split(pool, block, size):
            rest = _Block(block.ptr + size, block.size - size, block.segment, pool)
            _splice(rest, block, block.next)
            block.size = size
            pool.insert(rest)
        block.allocated = True
        self.allocated += block.size
        self._count_peaks()
        return block

    def _count_peaks(self) -> None:
        """increase_stat keeps each statistic's peak; reserved and segments only grow inside
        malloc, so counting after each allocation sees every peak."""
        allocated, reserved = self.allocated, self.reserved
        self.peak_allocated = max(self.peak_allocated, allocated)
        if reserved > self.peak_reserved:
            self.peak_reserved, self.allocated_at_peak = reserved, allocated
        elif reserved == self.peak_reserved:
            self.allocated_at_peak = max(self.allocated_at_peak, allocated)
        self.peak_segments = max(self.peak_segments, self.segments)
        if self.marks:
            mark = self.marks[-1]
            mark[3] = max(mark[3], allocated)
            mark[4] = max(mark[4], reserved)

    def mark(self, name: str) -> None:
        """A phase marker: the bytes now, and the highest bytes from here to the next one."""
        a, r = self.allocated, self.reserved
        self.marks.append([name, a, r, a, r])

    def result(self, oom: OutOfMemory | None) -> Replay:
        return Replay(
            peak_allocated=self.peak_allocated,
            peak_reserved=self.peak_reserved,
            fragmentation=self.peak_reserved - self.allocated_at_peak,
            allocated=self.allocated,
            reserved=self.reserved,
            segments=self.segments,
            peak_segments=self.peak_segments,
            device_allocs=self.device_allocs,
            alloc_retries=self.retries,
            phases=tuple(PhaseMark(*mark) for mark in self.marks),
            oom=oom,
            peak_reserved_by_stream=tuple(self.stream_peak.items()),
        )

    def _free_block_for(self, pool: _Pool, size: int) -> _Block | None:
        """get_free_block: the smallest free block of at least `size` (lowest address among
        equals), unless the max_split_size_mb rules refuse it."""
        free = pool.free
        i = bisect_left(free, (size, -1))
        if i == len(free):
            return None
        block = pool.by_ptr[free[i][1]]
        if block.segment is not None:
            # Expandable: walk on while the next block could grow to less than this one.
            while i + 1 < len(free):
                nxt = pool.by_ptr[free[i + 1][1]]
                if _expandable_size(nxt) >= _expandable_size(block):
                    break
                i, block = i + 1, nxt
        # "Do not return an oversized block for a large request"
        if size < self.max_split and block.size >= self.max_split:
            return None
        # "Allow oversized block size to be rounded up but within a limit"
        if size >= self.max_split and block.size >= size + self.conf.max_non_split_rounding:
            return None
        pool.remove(block)
        return block

    def _should_split(self, pool: _Pool, block: _Block, size: int) -> bool:
        """should_split: small pool and expandable segments split off any remainder of
        kMinBlockSize or more; large cudaMalloc'ed blocks only a remainder above kSmallSize,
        and never a block taken by a request of max_split_size or more."""
        remaining = block.size - size
        if pool.small or self.conf.expandable_segments:
            return remaining >= ALLOCATOR_BLOCK
        return size < self.max_split and remaining > SMALL_SIZE

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> _Block | None:
        """alloc_block: a new segment of get_allocation_size bytes (cudaMalloc), or pages
        mapped into the pool's expandable segment."""
        if self.conf.expandable_segments:
            return self._allocate_expandable_block(pool, size)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None
        self._reserve(pool, alloc_size)
        self.segments += 1
        self.device_allocs += 1
        return _Block(self._base(), alloc_size, None, pool)

    # expandable segments ----------------------------------------------------------------------

    def _allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        """try_allocate_expandable_block: map pages from the lowest address with room,
        merging them with the free block before them."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None
            if not self._map_block(pool, nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt
        pool.remove(candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """find_expandable_block: the lowest unmapped range (with the free block before it)
        whose free and unmapped address space reaches `size`; else a new segment."""
        for ptr in pool.unmapped:
            block = pool.unmapped_by_ptr[ptr]
            if block.prev is not None and not block.prev.allocated:
                block = block.prev
            room = 0
            probe: _Block | None = block
            while room < size and probe is not None and not probe.allocated:
                room += probe.size
                probe = probe.next
            if room >= size:
                return block
        segment = _Segment(self._base(), pool.page)
        space = UNBOUNDED_ADDRESS_SPACE if self.capacity is None else self.capacity * 9 // 8
        block = _Block(
            segment.base, -(-space // pool.page) * pool.page, segment, pool, mapped=False
        )
        pool.insert_unmapped(block)
        self.segments += 1
        return block

    def _map_block(self, pool: _Pool, block: _Block, size: int) -> bool:
        """map_block: back the first `size` bytes of an unmapped range with whole pages
        (ExpandableSegment::map), and merge them with free neighbours."""
        mapped = -(-size // pool.page) * pool.page
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False
        pool.remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(
                block.ptr + mapped, block.size - mapped, block.segment, pool, mapped=False
            )
            _splice(rest, block, block.next)
            pool.insert_unmapped(rest)
            block.size = mapped
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert(block)
        self._reserve(pool, mapped)
        self.device_allocs += 1
        return True

    def _unmap_block(self, pool: _Pool, block: _Block) -> None:
        """unmap_block: give back the whole pages inside a free block (ExpandableSegment::unmap
        rounds its start up and its end down to pages)."""
        segment = block.segment
        assert segment is not None
        page, end_ptr = segment.page, block.ptr + block.size
        begin = block.ptr + (-(block.ptr - segment.base)) % page
        end = end_ptr - (end_ptr - segment.base) % page
        if begin >= end:
            return
        pool.remove(block)
        if begin > block.ptr:
            before = _Block(block.ptr, begin - block.ptr, segment, pool)
            _splice(before, block.prev, block)
            pool.insert(before)
        if end < end_ptr:
            after = _Block(end, end_ptr - end, segment, pool)
            _splice(after, block, block.next)
            pool.insert(after)
        block.ptr, block.size, block.mapped = begin, end - begin, False
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert_unmapped(block)
        self._reserve(pool, -(end - begin))

    # free and release -------------------------------------------------------------------------

    def free(self, block: _Block) -> None:
        """free_block: merge with free neighbours in the segment, back into the pool it came
        from (`*block->pool`: its stream's)."""
        pool = block.pool
        block.allocated = False
        self.allocated -= block.size
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.insert(block)

    def _merge(self, pool: _Pool, dst: _Block, src: _Block | None) -> None:
        """try_merge_blocks: `dst` absorbs a free neighbour `src` of the same mapped state."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.remove(src)
        else:
            pool.remove_unmapped(src)
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    def empty_cache(self) -> None:
        """release_cached_blocks (torch.cuda.empty_cache, or malloc's last retry): cudaFree
        every free whole segment; unmap the free pages of expandable segments and drop a
        segment left with nothing mapped."""
        for pool in [p for pools in self.pools.values() for p in reversed(pools)]:
            to_unmap = []
            for _, ptr in list(pool.free):
                block = pool.by_ptr[ptr]
                if block.segment is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self._release_block(pool, block)
            for block in to_unmap:
                self._unmap_block(pool, block)
                if not block.mapped and block.prev is None and block.next is None:
                    pool.remove_unmapped(block)
                    self.segments -= 1

    def _release_block(self, pool: _Pool, block: _Block) -> None:
        """release_block: cudaFree a whole free segment."""
        pool.remove(block)
        self._reserve(pool, -block.size)
        self.segments -= 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: with max_split_size_mb set, cudaFree the smallest
        oversize cached block that covers the request, else the largest ones until they do."""
        if self.conf.max_split_size is None:
            return False
        key = max(size, self.max_split)
        free = pool.free
        i = bisect_left(free, (key, -1))
        if i < len(free) and pool.by_ptr[free[i][1]].segment is None:
            self._release_block(pool, pool.by_ptr[free[i][1]])
            return True
        released = 0
        i -= 1
        while released < key and i >= 0:
            block = pool.by_ptr[free[i][1]]
            if block.size < self.max_split:
                break
            if block.segment is None:
                self._release_block(pool, block)
                released += block.size
            i -= 1
        return released >= key


def replay(events: Iterable[Event], conf: AllocConf | None = None, *,
           capacity: int | None = None) -> Replay:  # fmt: skip
    """Replay `events` through the caching allocator configured by `conf` (torch's defaults
    when None). With `capacity` (bytes the device can give the allocator), a request that does
    not fit frees cached blocks as the allocator does and retries; one that still does not fit
    ends the replay with `oom` set. Without it, memory never runs out."""
    state = _Allocator(conf or AllocConf(), capacity)
    live: dict[Hashable, _Block | None] = {}
    for index, event in enumerate(events):
        kind = event[0]
        if kind == "alloc":
            stream: Hashable
            if len(event) == 3 and type(event[2]) is int and event[2] >= 0:
                key, nbytes, stream = event[1], event[2], COMPUTE  # the common, valid case
            else:
                key, nbytes, stream = _alloc_event(index, event)
            if key in live:
                raise _event_error(index, event, f"id {key!r} is already allocated")
            # CUDACachingAllocator's allocate(): a 0-byte request does not reach malloc.
            block = state.malloc(nbytes, stream) if nbytes else None
            if nbytes and block is None:
                oom = OutOfMemory(index, key, nbytes, state.allocated, state.reserved)
                return state.result(oom)
            live[key] = block
        elif kind == "free":
            if len(event) != 2:
                raise _event_error(index, event, "a free is ('free', id)")
            try:
                freed = live.pop(event[1])
            except (KeyError, TypeError):
                raise _event_error(index, event, f"id {event[1]!r} is not allocated") from None
            if freed is not None:
                state.free(freed)
        elif kind == "phase" and len(event) == 2:
            state.mark(str(event[1]))
        elif kind == "empty_cache" and len(event) == 1:
            state.empty_cache()
        else:
            raise _event_error(index, event, "events are ('alloc', id, nbytes[, stream]), "
                               "('free', id), ('phase', name) or ('empty_cache',)")  # fmt: skip
    return state.result(None)


def _alloc_event(index: int, event: Event) -> tuple[Hashable, int, Hashable]:
    if len(event) not in (3, 4) or not isinstance(event[2], int) or event[2] < 0:
        raise _event_error(index, event, "an allocation is ('alloc', id, nbytes >= 0[, stream])")
    stream = event[3] if len(event) == 4 else COMPUTE
    try:
        hash(stream)
    except TypeError:
        raise _event_error(index, event, "a stream is a hashable name") from None
    return event[1], event[2], stream


def _event_error(index: int, event: Event, message: str) -> MemplanError:
    return MemplanError(f"allocator event {index} {event!r}: {message}.", field="events")


def events_from_trace(trace: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Events from a recorded allocator trace: the entries of
    `torch.cuda.memory._snapshot()["device_traces"][device]` (after
    `torch.cuda.memory._record_memory_history()`; torch/cuda/_memory_viz.py reads the same
    entries). An "alloc" entry carries the block's address and the requested bytes (record_trace
    in alloc_found_block gets orig_size); "free_completed" is the moment the block returns to
    the pool (free_block). The allocator's own entries (segment_alloc/free/map/unmap, snapshot,
    oom) are what a replay reproduces, and "free_requested" precedes "free_completed", so they
    are left out; so are annotations: insert ("phase", name) events where they belong.
    The trace is a ring buffer (`max_entries`) and tensors may predate it, so a free of an
    address the trace never allocated is dropped."""
    events: list[Event] = []
    live: set[Any] = set()
    for entry in trace:
        action = entry.get("action")
        if action == "alloc":
            # The entry's stream (0: the default stream) keeps the block in that stream's pool.
            stream = entry.get("stream") or COMPUTE
            events.append(("alloc", entry["addr"], int(entry["size"]), stream))
            live.add(entry["addr"])
        elif action == "free_completed" and entry["addr"] in live:
            events.append(("free", entry["addr"]))
            live.remove(entry["addr"])
    return events
