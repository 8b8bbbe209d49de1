"""PYTORCH_CUDA_ALLOC_CONF as torch 2.13 parses it (c10/core/AllocatorConfig.cpp,
c10/cuda/CUDAAllocatorConfig.cpp): `AllocConf.parse` accepts and refuses what torch does, with
one error naming the key, and the size rounding the keys ask for (roundup_power2_divisions).
memplan.step.allocator replays allocations under it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memplan.errors import MemplanError
from memplan.memory import (
    ALLOCATOR_BLOCK,
    LARGE_SEGMENT,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_SEGMENT,
    SMALL_SIZE,
)

MIB = 1 << 20
# c10/core/AllocatorConfig.cpp: kRoundUpPowerOfTwoIntervals = 16 intervals of
# roundup_power2_divisions, one per power of two from kRoundUpPowerOfTwoStart = 1 MiB on.
POWER2_INTERVALS = 16
POWER2_START_LOG2 = 20
# c10/cuda/CUDAAllocatorConfig.h: pinned_max_register_threads() = 128.
PINNED_MAX_REGISTER_THREADS = 128
# ExpandableSegment's constructor reserves address space for 1 1/8 of the device's memory; with
# no capacity given, the model reserves this much (a page count that never runs out).
UNBOUNDED_ADDRESS_SPACE = 1 << 50
_SEGMENT_STRIDE = 1 << 52  # distance between segment base addresses in the model

_BOOL_KEYS = frozenset(
    {
        # c10/core/AllocatorConfig.cpp and c10/cuda/CUDAAllocatorConfig.cpp: host-side or
        # locking options, accepted and without effect on device memory.
        "release_lock_on_cudamalloc",
        "release_lock_on_hipmalloc",
        "pinned_use_cuda_host_register",
        "pinned_use_hip_host_register",
        "pinned_use_background_threads",
        "graph_capture_record_stream_reuse",
    }
)
_HOST_SIZE_KEYS = frozenset(
    {"pinned_reserve_segment_size_mb", "pinned_max_round_threshold_mb", "pinned_max_cached_size_mb"}
)
KEYS = (
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "large_segment_size_mb",
    "garbage_collection_threshold",
    "roundup_power2_divisions",
    "expandable_segments",
    "backend",
    "pinned_num_register_threads",
    *sorted(_BOOL_KEYS),
    *sorted(_HOST_SIZE_KEYS),
)


def _conf_error(key: str, message: str, text: str) -> MemplanError:
    return MemplanError(
        f"PYTORCH_CUDA_ALLOC_CONF {key!r}: {message} (in {text!r}; the syntax is "
        "key:value pairs separated by commas, e.g. 'expandable_segments:True,"
        "max_split_size_mb:128').",
        field="hardware.alloc_conf",
    )


@dataclass(frozen=True, slots=True)
class AllocConf:
    """The PYTORCH_CUDA_ALLOC_CONF settings that change device memory (defaults: torch's)."""

    max_split_size: int | None = None
    """Blocks this large or larger are never split (None: no limit, the default)."""
    max_non_split_rounding: int = LARGE_SEGMENT
    """A request >= max_split_size takes a cached block only if it is less than this much
    larger (default kLargeBuffer, 20 MiB)."""
    large_segment_size: int = LARGE_SEGMENT
    """The segment medium requests (1 to 10 MiB) carve, and the large pool's expandable page."""
    garbage_collection_threshold: float = 0.0
    roundup_power2_divisions: tuple[int, ...] = (0,) * POWER2_INTERVALS
    expandable_segments: bool = False

    @classmethod
    def parse(cls, text: str) -> AllocConf:
        """`text` in PYTORCH_CUDA_ALLOC_CONF syntax, validated as torch 2.13 does
        (c10/core/AllocatorConfig.cpp AcceleratorAllocatorConfig::parseArgs; the CUDA-only keys
        in c10/cuda/CUDAAllocatorConfig.cpp CUDAAllocatorConfig::parseArgs)."""
        # ConfigTokenizer: ',', ':', '[' and ']' are tokens of their own, spaces are dropped.
        tokens = [t for t in re.split(r"([,:\[\]])", text.replace(" ", "")) if t]
        values: dict[str, Any] = {}
        i = 0
        while i < len(tokens):
            key = tokens[i]
            if key not in KEYS:
                # CUDAAllocatorConfig::parseArgs: "Unrecognized key '...' in CUDA allocator config."
                raise _conf_error(key, f"unknown key; the keys are {', '.join(KEYS)}", text)
            if i + 2 >= len(tokens) or tokens[i + 1] != ":":
                raise _conf_error(key, "expected ':' and a value after the key", text)
            if key == "roundup_power2_divisions" and tokens[i + 2] == "[":
                end = tokens.index("]", i + 2) if "]" in tokens[i + 2 :] else -1
                if end < 0:
                    raise _conf_error(key, "the list has no closing ']'", text)
                values[key] = _power2_list(tokens[i + 3 : end], text)
                i = end + 1
            else:
                values[key] = _value(key, tokens[i + 2], text)
                i += 3
            if i < len(tokens):
                if tokens[i] != ",":
                    raise _conf_error(key, f"expected ',' after the value, got {tokens[i]!r}", text)
                i += 1
        return cls._from_values(values, text)

    @classmethod
    def _from_values(cls, values: dict[str, Any], text: str) -> AllocConf:
        if values.get("backend", "native") != "native":
            message = (
                "cudaMallocAsync hands memory to the CUDA driver's pool, which this model of "
                "the native caching allocator does not describe"
            )
            raise _conf_error("backend", message, text)
        large = values.get("large_segment_size_mb", LARGE_SEGMENT // MIB)
        # torch 2.13's AllocatorConfig.cpp: "CachingAllocator option large_segment_size_mb must
        # be > 10 MB" (kMinLargeAlloc), and max_split_size_mb / max_non_split_rounding_mb "too
        # small, must be >= " the large segment size, whatever the order of the keys (what the
        # wheel's parser answers; tests/test_allocator.py asks it).
        if large <= MIN_LARGE_ALLOC // MIB:
            raise _conf_error("large_segment_size_mb", f"must be > {MIN_LARGE_ALLOC // MIB}", text)
        for key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            if key in values and values[key] < large:
                raise _conf_error(key, f"too small, must be >= {large}", text)
        divisions = values.get("roundup_power2_divisions", (0,) * POWER2_INTERVALS)
        split = values.get("max_split_size_mb")
        return cls(
            max_split_size=None if split is None else split * MIB,
            max_non_split_rounding=values.get("max_non_split_rounding_mb", LARGE_SEGMENT // MIB)
            * MIB,
            large_segment_size=large * MIB,
            garbage_collection_threshold=values.get("garbage_collection_threshold", 0.0),
            roundup_power2_divisions=tuple(divisions),
            expandable_segments=values.get("expandable_segments", False),
        )

    def divisions(self, size: int) -> int:
        """AllocatorConfig::roundup_power2_divisions(size): the setting of size's interval."""
        index = size.bit_length() - 1 - POWER2_START_LOG2
        return self.roundup_power2_divisions[min(max(index, 0), POWER2_INTERVALS - 1)]

    def round_size(self, size: int) -> int:
        """DeviceCachingAllocator::round_size: 512-byte blocks, or the next of `divisions`
        equal steps between two powers of two (roundup_power2_next_division)."""
        if size < ALLOCATOR_BLOCK:
            return ALLOCATOR_BLOCK
        divisions = self.divisions(size)
        if divisions > 1 and size > ALLOCATOR_BLOCK * divisions:
            return roundup_power2_next_division(size, divisions)
        return -(-size // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK

    def allocation_size(self, size: int) -> int:
        """DeviceCachingAllocator::get_allocation_size: the segment cudaMalloc'ed for a block of
        `size` no cached block can hold."""
        if size <= SMALL_SIZE:
            return SMALL_SEGMENT
        if size < MIN_LARGE_ALLOC:
            return self.large_segment_size
        return -(-size // ROUND_LARGE) * ROUND_LARGE


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """DeviceCachingAllocator::roundup_power2_next_division: `size` rounded up to the next of
    `divisions` equal steps between the powers of two around it."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def _int(key: str, token: str, text: str) -> int:
    # std::stoi / stoull read the leading digits ("20.5" is 20); a negative size is refused
    # here (torch wraps it to a huge size_t).
    match = re.match(r"\+?(\d+)", token)
    if match is None:
        raise _conf_error(key, f"expected a whole number, got {token!r}", text)
    return int(match.group(1))


def _value(key: str, token: str, text: str) -> Any:
    if key == "expandable_segments" or key in _BOOL_KEYS:
        # ConfigTokenizer::toBool: "Expected 'True' or 'False'". (CUDA's own boolean keys are
        # as strict in CUDAAllocatorConfig.cpp.)
        if token not in ("True", "False"):
            raise _conf_error(key, f"expected True or False, got {token!r}", text)
        return token == "True"
    if key == "backend":
        if token not in ("native", "cudaMallocAsync"):
            raise _conf_error(key, f"expected native or cudaMallocAsync, got {token!r}", text)
        return token
    if key == "garbage_collection_threshold":
        try:
            threshold = float(token)
        except ValueError:
            raise _conf_error(key, f"expected a number, got {token!r}", text) from None
        if not 0.0 < threshold < 1.0:
            raise _conf_error(key, "must lie in (0.0, 1.0)", text)
        return threshold
    if key == "roundup_power2_divisions":
        # The single-value form sets every interval; it must be a power of two.
        n = _int(key, token, text)
        if not _power_of_two(n):
            raise _conf_error(key, f"the divisions must be a power of 2, got {n}", text)
        return (n,) * POWER2_INTERVALS
    n = _int(key, token, text)
    if key == "pinned_num_register_threads" and (
        not _power_of_two(n) or n > PINNED_MAX_REGISTER_THREADS
    ):
        raise _conf_error(key, f"must be a power of 2 <= {PINNED_MAX_REGISTER_THREADS}", text)
    return n


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _power2_list(tokens: Sequence[str], text: str) -> tuple[int, ...]:
    """AllocatorConfig::parseRoundUpPower2Divisions, list form `[64:8,256:4,>:1]`: an entry
    sets the interval starting at that many MiB (the first one also every interval below it),
    `>` every interval after the last one named; intervals in between stay 0 (no rounding)."""
    key = "roundup_power2_divisions"
    divisions = [0] * POWER2_INTERVALS
    last: int | None = None
    entries = [e for e in "".join(tokens).split(",") if e]
    for entry in entries:
        interval, colon, value = entry.partition(":")
        if not colon or not value:
            raise _conf_error(key, f"expected interval:divisions, got {entry!r}", text)
        n = _int(key, value, text)
        if n != 0 and not _power_of_two(n):
            raise _conf_error(key, f"the divisions must be a power of 2 or 0, got {n}", text)
        if interval == ">":
            start = 0 if last is None else last + 1
            divisions[start:] = [n] * (POWER2_INTERVALS - start)
            continue
        mib = _int(key, interval, text)
        if not _power_of_two(mib):
            raise _conf_error(key, f"the intervals must be powers of 2 (MiB), got {mib}", text)
        index = min(mib.bit_length() - 1, POWER2_INTERVALS - 1)
        if last is None:
            divisions[:index] = [n] * index
        divisions[index] = n
        last = index
    return tuple(divisions)
