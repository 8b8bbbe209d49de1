"""Fitting what a trace saved: each saved storage's element count as exact integer
coefficients over memplan.model.profile.BASIS, solved over rationals from traces at several
(batch, sequence) sizes (memplan.verify.trace.profile runs them); a pooled record's (pool) as
integers over a divisor. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from math import lcm
from typing import Any

from memplan.errors import MemplanError
from memplan.model.profile import BASIS, Tensor, terms


@dataclass
class Record:
    block: str
    module: str
    dtype: str
    numel: int
    savers: set[str] = field(default_factory=set)
    pooled: bool = False
    """The sum of every storage of its module and dtype (pool)."""
    modules: dict[str, str] = field(default_factory=dict)
    """Each later saver's module, relative to its block (where it saved the storage first)."""


def split(records: list[Record]) -> dict[str, list[Record]]:
    """Records by block; a storage several layers save is the embeddings' (made per forward).

    A storage the embeddings and one layer save, and nothing else, is that layer's: the first
    layer's input, which the embeddings read again after making it (Gemma 4's per-layer-input
    projection: transformers 5.25 modeling_gemma4.py::Gemma4TextModel.project_per_layer_inputs
    runs `per_layer_model_projection` on the scaled embeddings, and layer 0's input_layernorm
    saves them as every later layer saves its own input). Listed with the embeddings it would
    leave layer 0 one storage short of the layers of its kind, which two traced layers could not
    describe; either way the forward holds it once."""
    out: dict[str, list[Record]] = {}
    for r in records:
        block = r.block
        layers = [s for s in r.savers if s.startswith("layer.")]
        if len(layers) > 1:
            block = "embeddings"
        elif layers and r.savers == {"embeddings", layers[0]}:
            block = layers[0]
            r = replace(r, block=block, module=r.modules.get(block, r.module))
        out.setdefault(block, []).append(r)
    return out


def collapse(records: list[Record]) -> list[Record]:
    """Each run of consecutive storages of one module, dtype and size as one record of their
    summed size: a per-token Python loop (recurrent_gemma's RG-LRU scan, transformers
    modeling_recurrent_gemma.py::RecurrentGemmaRglru._rnn_scan, saves two (batch, lru_width)
    fp32 storages per token in bf16) saves a number of storages that grows with the sequence,
    which no per-storage fit over BASIS describes; their sum does, marked `pooled` (a sum, not
    one storage: memplan.step.transients.working_sets takes a layer's largest single storage
    for its estimate, and rwkv's per-token scan summed, 349,184 B at 2 x 32 tokens, counted
    twice as one tensor put the backward 10.5% over the real step's peak). Used only on blocks
    whose storage count differs between traced sizes (memplan.verify.trace.profile)."""
    out: list[Record] = []
    size = 0
    for r in records:
        last = out[-1] if out else None
        if last is not None and (last.module, last.dtype, size) == (r.module, r.dtype, r.numel):
            last.numel += r.numel
            last.savers |= r.savers
            last.pooled = True  # a sum of storages, not one (working_sets' largest skips it)
            continue
        out.append(Record(r.block, r.module, r.dtype, r.numel, set(r.savers)))
        size = r.numel
    return out


def varying(lists: list[list[Record]]) -> set[tuple[str, str]]:
    """The (module, dtype) groups whose number of storages differs between the traces of one
    block (`lists`, one per traced size)."""
    counts: list[dict[tuple[str, str], int]] = [{} for _ in lists]
    for records, count in zip(lists, counts, strict=True):
        for r in records:
            count[(r.module, r.dtype)] = count.get((r.module, r.dtype), 0) + 1
    groups = {g for count in counts for g in count}
    return {g for g in groups if len({count.get(g, 0) for count in counts}) > 1}


def pool(records: list[Record], groups: set[tuple[str, str]]) -> list[Record]:
    """Every storage of each (module, dtype) group in `groups` as one record of their summed
    size, where the group's first storage was (marked `pooled`); the other records as they are.
    A chunked loop (transformers 5.25 modeling_qwen3_5.py::torch_chunk_gated_delta_rule, per
    chunk a recurrent state, then a chunk of values, sizes that coincide at some dimensions)
    saves a number of storages that grows with the sequence but no runs of equal storages
    (collapse); their sum per group is linear in the sequence on the chunk's multiples. Used
    only on blocks that collapse does not make the same at every traced size
    (memplan.verify.trace.profile)."""
    out: list[Record] = []
    first: dict[tuple[str, str], Record] = {}
    for r in records:
        group = (r.module, r.dtype)
        if group not in groups:
            out.append(Record(r.block, r.module, r.dtype, r.numel, set(r.savers), r.pooled))
        elif group in first:
            first[group].numel += r.numel
            first[group].savers |= r.savers
        else:
            first[group] = Record(r.block, r.module, r.dtype, r.numel, set(r.savers), True)
            out.append(first[group])
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
    traces: list[dict[str, list[Record]]],
    sizes: list[tuple[int, int]],
    block: str,
    *,
    chunk: int = 0,
) -> list[dict[str, Any]]:
    """Each storage's coefficients over BASIS (over 1, s, s*s when every size has batch 1).

    `chunk`: the traced sequences are multiples of it (memplan.verify.trace.sizes.Span.chunk),
    so a storage may be a function of the number of chunks s / chunk: rational coefficients
    whose denominators divide chunk^2, kept exact as integers over a divisor (transformers 5.25
    modeling_mamba2.py::mamba2_chunk_scan's segment_sum over the chunks' decays,
    [b, h, c + 1, c + 1] with c = s / chunk; modeling_xlstm.py::mlstm_chunkwise_native_autograd
    saves a [b, heads, s / chunk] tensor)."""
    columns = [0, 2, 4] if all(b == 1 for b, _ in sizes) else list(range(len(BASIS)))
    lists = [t.get(block, []) for t in traces]
    if len({len(x) for x in lists}) != 1:
        raise MemplanError(
            "the forward saves different tensors at different sizes (block "
            f"{block}: {[len(x) for x in lists]} saved storages at batch x sequence {sizes}, "
            "each run of equal storages of one module counted once, as a per-token loop's, or "
            "each varying module and dtype summed, as a chunked loop's), another code path at "
            "some lengths, such as a chunked loop whose chunk memplan did not find "
            "(memplan.verify.trace.sizes.loop_chunk); the fit needs the same code path."
        )
    out = []
    rows = [tuple(terms(b, s)[c] for c in columns) for b, s in sizes]
    for i, first in enumerate(lists[0]):
        column = [x[i] for x in lists]
        if {(r.dtype, r.module) for r in column} != {(first.dtype, first.module)}:
            raise MemplanError(f"block {block}: tensor {i} differs between sizes ({first.module}).")
        coef = solve(rows, [r.numel for r in column])
        pooled = {r.pooled for r in column}
        if len(pooled) != 1:
            raise MemplanError(f"block {block}: tensor {i} differs between sizes ({first.module}).")
        # A pooled record may hold a storage per chunk of the sequence: a rational coefficient
        # (chunk_decay, [b, heads, s / chunk]); kept exact as integers over a divisor. So may
        # one storage over the chunks (`chunk`): a divisor of chunk^2.
        divisor = lcm(*(c.denominator for c in coef))
        if not first.pooled and (not chunk or (chunk * chunk) % divisor):
            divisor = 1
        if any((c * divisor).denominator != 1 for c in coef):
            raise MemplanError(
                f"block {block}: {first.module}'s size is not a polynomial over {BASIS} "
                f"(fit {coef})."
            )
        numel = [0] * len(BASIS)
        for c, value in zip(columns, coef, strict=True):
            numel[c] = int(value * divisor)
        out.append(
            {
                "module": first.module,
                "dtype": first.dtype,
                "numel": numel,
                **({"divisor": divisor} if divisor > 1 else {}),
                **({"pooled": True} if first.pooled else {}),
            }
        )
    return out


def value(tensor: dict[str, Any], batch: int, sequence: int) -> int:
    """A fitted tensor's element count at one size: memplan.model.profile.Tensor.at, which the
    estimate evaluates the document's tensors with."""
    fitted = Tensor(
        name="",
        dtype=str(tensor["dtype"]),
        numel=tuple(int(c) for c in tensor["numel"]),
        divisor=int(tensor.get("divisor", 1)),
    )
    return fitted.at(batch, sequence)


def named(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    out = []
    for t in tensors:
        k = seen.get(t["module"], 0)
        seen[t["module"]] = k + 1
        extra: dict[str, Any] = {key: t[key] for key in ("divisor", "pooled") if key in t}
        out.append(
            {"name": f"{t['module']}#{k}", "dtype": t["dtype"], "numel": t["numel"], **extra}
        )
    return out
