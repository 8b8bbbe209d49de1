"""Fitting what a trace saved: each saved storage's element count as exact integer
coefficients over memplan.model.profile.BASIS, solved over rationals from traces at several
(batch, sequence) sizes (memplan.verify.trace.profile runs them). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from memplan.errors import MemplanError
from memplan.model.profile import BASIS, terms


@dataclass
class Record:
    block: str
    module: str
    dtype: str
    numel: int
    savers: set[str] = field(default_factory=set)


def split(records: list[Record]) -> dict[str, list[Record]]:
    """Records by block; a storage several layers save is the embeddings' (made per forward)."""
    out: dict[str, list[Record]] = {}
    for r in records:
        block = r.block
        if sum(1 for s in r.savers if s.startswith("layer.")) > 1:
            block = "embeddings"
        out.setdefault(block, []).append(r)
    return out


def collapse(records: list[Record]) -> list[Record]:
    """Each run of consecutive storages of one module, dtype and size as one record of their
    summed size: a per-token Python loop (recurrent_gemma's RG-LRU scan, transformers
    modeling_recurrent_gemma.py::RecurrentGemmaRglru._rnn_scan, saves two (batch, lru_width)
    fp32 storages per token in bf16) saves a number of storages that grows with the sequence,
    which no per-storage fit over BASIS describes; their sum does. Used only on blocks whose
    storage count differs between traced sizes (memplan.verify.trace.profile)."""
    out: list[Record] = []
    size = 0
    for r in records:
        last = out[-1] if out else None
        if last is not None and (last.module, last.dtype, size) == (r.module, r.dtype, r.numel):
            last.numel += r.numel
            last.savers |= r.savers
            continue
        out.append(Record(r.block, r.module, r.dtype, r.numel, set(r.savers)))
        size = r.numel
    return out


def solve(rows: list[tuple[int, ...]], values: list[int]) -> list[Fraction]:
    """Exact solution of the square system rows @ c = values (Gauss-Jordan over rationals)."""
    n = len(rows)
    m = [[Fraction(x) for x in row] + [Fraction(v)] for row, v in zip(rows, values, strict=True)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[pivot] = m[pivot], m[col]
        m[col] = [x / m[col][col] for x in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                m[r] = [a - m[r][col] * b for a, b in zip(m[r], m[col], strict=True)]
    return [m[r][n] for r in range(n)]


def fit(
    traces: list[dict[str, list[Record]]], sizes: list[tuple[int, int]], block: str
) -> list[dict[str, Any]]:
    """Each storage's coefficients over BASIS (over 1, s, s*s when every size has batch 1)."""
    columns = [0, 2, 4] if all(b == 1 for b, _ in sizes) else list(range(len(BASIS)))
    lists = [t.get(block, []) for t in traces]
    if len({len(x) for x in lists}) != 1:
        raise MemplanError(
            "the forward saves different tensors at different sizes (block "
            f"{block}: {[len(x) for x in lists]} saved storages at batch x sequence {sizes}, "
            "each run of equal storages of one module counted once, as a per-token loop's), "
            "another code path at some lengths, such as a chunked linear-attention loop; the "
            "fit needs the same code path."
        )
    out = []
    rows = [tuple(terms(b, s)[c] for c in columns) for b, s in sizes]
    for i, first in enumerate(lists[0]):
        column = [x[i] for x in lists]
        if {(r.dtype, r.module) for r in column} != {(first.dtype, first.module)}:
            raise MemplanError(f"block {block}: tensor {i} differs between sizes ({first.module}).")
        coef = solve(rows, [r.numel for r in column])
        if any(c.denominator != 1 for c in coef):
            raise MemplanError(
                f"block {block}: {first.module}'s size is not a polynomial over {BASIS} "
                f"(fit {coef})."
            )
        numel = [0] * len(BASIS)
        for c, value in zip(columns, coef, strict=True):
            numel[c] = int(value)
        out.append({"module": first.module, "dtype": first.dtype, "numel": numel})
    return out


def named(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    out = []
    for t in tensors:
        k = seen.get(t["module"], 0)
        seen[t["module"]] = k + 1
        out.append({"name": f"{t['module']}#{k}", "dtype": t["dtype"], "numel": t["numel"]})
    return out
