"""A memo keyed partly by the identity of objects that do not hash by value (a traced profile
holds dicts; a micro-batch's activations are large to hash): each entry holds those objects,
so their ids stay theirs while it lives. Plan's search reads the same few of them thousands
of times. `cache_clear`, as functools' caches have (benchmarks/plan_speed.py empties every
memo before a timed run)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    """Values by (the identities of `held`, `key`); emptied when `size` entries are held."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[tuple[tuple[int, ...], Hashable], tuple[tuple[object, ...], V]] = {}

    def get(self, held: tuple[object, ...], key: Hashable) -> V | None:
        hit = self._entries.get((tuple(map(id, held)), key))
        if hit is None or any(a is not b for a, b in zip(hit[0], held, strict=True)):
            return None
        return hit[1]

    def put(self, held: tuple[object, ...], key: Hashable, value: V) -> V:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[tuple(map(id, held)), key] = (held, value)
        return value

    def cache_clear(self) -> None:
        self._entries.clear()
