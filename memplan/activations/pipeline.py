"""Pipeline ranks' activations: which micro-batches each rank keeps in flight at its peak under
Megatron's schedules and torch.distributed.pipelining's (`in_flight`), and what that rank then
saves (`stage`): its model chunks' layers, the embeddings on the first rank, the head and loss
on the last. The single micro-batch comes from memplan.activations.micro_batch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache

from memplan.memory import FORWARD_BACKWARD, PHASES, Phase, Transient
from memplan.model.forward.tensors import Activations, Block

SRC_SCHEDULE = (
    "megatron/core/pipeline_parallel/schedules.py::get_pp_rank_microbatches, get_schedule_table"
)


@lru_cache(maxsize=4096)
def in_flight(
    schedule: str,
    pipeline: int,
    virtual: int,
    rank: int,
    microbatches: int,
    *,
    runtime: str = "megatron",
) -> tuple[int, ...]:
    """Micro-batches whose activations pipeline `rank` holds at its peak, per model chunk.

    `runtime` "torch": torch.distributed.pipelining's schedules (engines ddp and fsdp2, as
    torchtitan runs them: `torch_in_flight`); else Megatron's (megatron, deepspeed):
    the peak is when the first backward starts: the warmup forwards and one more are alive.
    1F1B: min(P - rank, m) (warmup P - rank - 1); GPipe: all m; interleaved: the first
    min(warmup + 1, m x v) entries of Megatron's schedule table, warmup = 2 (P - rank - 1) +
    (v - 1) x P, micro-batches grouped by P (SRC_SCHEDULE). On the first stage that is
    L x (1 + (P - 1) / (P v)) layer-micro-batches, the penalty in Megatron's
    theoretical_memory_usage.py.
    """
    p, v, m = pipeline, virtual, microbatches
    if p == 1:
        return (1,)
    if runtime == "torch":
        return torch_in_flight(schedule, p, v, rank, m)
    if schedule == "gpipe":
        return (m,) * v
    if schedule == "1f1b" or v == 1:
        return (min(p - rank, m),)
    total = m * v
    alive = min((p - rank - 1) * 2 + (v - 1) * p + 1, total)
    counts = [0] * v
    for _, chunk in itertools.islice(_schedule_table(m, v, p), alive):
        counts[chunk] += 1
    return tuple(counts)


SRC_TORCH_SCHEDULE = (
    "torch 2.13 torch/distributed/pipelining/schedules.py: Schedule1F1B._get_pipeline_order, "
    "ScheduleGPipe._get_pipeline_order, ScheduleInterleaved1F1B._calculate_single_rank_"
    "operations (_get_warmup_ops, _get_1f1b_rank_ops), ScheduleZBVZeroBubble._calculate_"
    "single_rank_operations; _backward.py::stage_backward_input (retain_graph=True until W)"
)


def torch_in_flight(schedule: str, p: int, v: int, rank: int, m: int) -> tuple[int, ...]:
    """torch.distributed.pipelining's micro-batches in flight per local stage at rank
    `rank`'s peak (the most forwards not yet backwarded; SRC_TORCH_SCHEDULE):

    - ScheduleGPipe: all m forwards, then the backwards;
    - Schedule1F1B: P - 1 - rank warmup forwards, then one forward and one backward: min(P -
      rank, m);
    - ScheduleInterleaved1F1B: warmup = min((v - 1) x mpr + 2 (P - 1 - rank), m v)
      (_get_warmup_ops), then one forward and one backward, so warmup + 1 (at most m v) are
      alive; forward k runs local stage (k // mpr) % v, mpr = m / max(1, m // P) micro-batches
      per round (not Megatron's P: they differ when P does not divide m);
    - ScheduleZBVZeroBubble (two stages per rank in a V: stages rank and 2P - 1 - rank): its
      op list, walked; a micro-batch's saved tensors stay until its weight backward W (the
      input backward I keeps the graph: retain_graph=True).
    Counts are per local stage in model order."""
    if schedule == "gpipe":
        return (m,) * v
    if schedule == "1f1b" or v == 1:
        return (min(p - rank, m),)
    if schedule == "zbv":
        return _zbv_in_flight(p, rank, m)
    # torch refuses m not a multiple of the rounds (ScheduleInterleaved1F1B.__init__), and
    # Schedule1F1B m < P (Schedule1F1B.__init__); memplan counts them as the formulas give
    # (plan's search reaches such layouts; refusing them there is not done yet).
    rounds = max(1, m // p)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
    counts = [0] * v
    for step in range(min(warmup + 1, m * v)):
        counts[(step // per_round) % v] += 1
    return tuple(counts)


def _zbv_in_flight(p: int, rank: int, m: int) -> tuple[int, int]:
    """ScheduleZBVZeroBubble._calculate_single_rank_operations (torch 2.13) replayed for
    its forwards (F) and weight backwards (W) per chunk, micro-batches >= m dropped (the
    schedule pads to max(2P - 1, m) and blanks them); the counts at the first moment with
    the most forwards not yet W'd.

    Only min(m, 2P) micro-batches are walked: past 2P - 1 the list differs only by more
    rounds of the stable phase (F, I, W of each chunk: the count in flight back where the
    round began) and a longer cool-down (no forwards), so the moment is the same
    (tests/test_torch_schedules.py holds it to torch's lists up to m = 12P). Plan meets m in
    the thousands, for every rank of every ZBV layout."""
    m = min(m, 2 * p)
    alive = [0, 0]
    best: tuple[int, int] = (0, 0)
    for c, kind, _ in _zbv_ops(p, rank, m):
        alive[c] += 1 if kind == "F" else -1
        if kind == "F" and sum(alive) > sum(best):
            best = (alive[0], alive[1])
    return best


def _zbv_ops(p: int, rank: int, m: int) -> list[tuple[int, str, int]]:
    """Rank `rank`'s forwards (F) and weight backwards (W) per local chunk in
    ScheduleZBVZeroBubble's order (zbv_order; the input backwards I left out: a micro-batch's
    saved tensors stay until its W)."""
    return [op for op in zbv_order(p, rank, m) if op is not None and op[1] != "I"]


ZbvOp = tuple[int, str, int]
"""(local chunk: 0 for stage rank, 1 for stage 2P - 1 - rank; "F", "I" or "W"; micro-batch)."""


def zbv_order(p: int, rank: int, m: int) -> list[ZbvOp | None]:
    """Rank `rank`'s actions in ScheduleZBVZeroBubble's order, as torch 2.13 lists them
    (schedules.py::ScheduleZBVZeroBubble._calculate_single_rank_operations): `rank` empty
    slots first, then warm-up, stable and cool-down phases over max(2P - 1, m) micro-batches,
    those >= m blanked to None (tests/test_torch_schedules.py checks it against torch's own
    pipeline_order)."""
    n = max(2 * p - 1, m)
    ops: list[ZbvOp | None] = [None] * rank
    f, b = [0, 0], [0, 0]

    def fwd(c: int) -> None:
        ops.append((c, "F", f[c]))
        f[c] += 1

    def back(c: int) -> None:  # input backward, then weight backward of the same micro-batch
        ops.extend(((c, "I", b[c]), (c, "W", b[c])))
        b[c] += 1

    for _ in range(2 * (p - rank) - 1):
        fwd(0)
    for _ in range(rank):
        fwd(1)
        fwd(0)
    for _ in range(p - rank):
        fwd(1)
        back(1)
    while f[1] < f[0] or f[0] < n:
        if f[0] < n:
            fwd(0)
        back(0)
        fwd(1)
        back(1)
    w = list(b)
    for _ in range(rank):  # cool-down: input backwards first, weight backwards after
        for c in (0, 1):
            ops.append((c, "I", b[c]))
            b[c] += 1
    for _ in range(p - rank):
        ops.extend(((0, "I", b[0]), (0, "W", w[0])))
        b[0] += 1
        w[0] += 1
    for c in (1, 0):
        while w[c] < b[c]:
            ops.append((c, "W", w[c]))
            w[c] += 1
    return [op if op is not None and op[2] < m else None for op in ops]


def torch_outputs_held(schedule: str, p: int, m: int) -> int:
    """The last stage's outputs of earlier micro-batches that torch.distributed.pipelining
    holds in `stage.output_chunks` when the rank holding that stage peaks (memplan.step.
    transients.SRC_OUTPUT_CHUNKS:
    every micro-batch's output is kept until the next step; backward only detaches it).

    The peak taken is the latest forward that brings the rank to its most micro-batches in
    flight (torch_in_flight's count): the held outputs only grow. The outputs held are the
    last stage's forwards done before that one (a forward of the last stage there is the
    current micro-batch's, whose output the step's own `logits` term holds). Schedule1F1B,
    ScheduleGPipe and ScheduleInterleaved1F1B reach it at the last stage's last forward, with
    m - 1 held; ScheduleZBVZeroBubble (the last stage on rank 0) earlier, its op list walked.
    tests/test_torch_schedules.py checks both against torch's own action lists."""
    if schedule != "zbv":
        return m - 1
    ops = _zbv_ops(p, 0, m)
    peak = sum(_zbv_in_flight(p, 0, m))
    alive = [0, 0]
    done = held = 0
    for c, kind, _ in ops:
        alive[c] += 1 if kind == "F" else -1
        if kind != "F":
            continue
        if c == 1:
            if sum(alive) == peak:
                held = done
            done += 1
        elif sum(alive) == peak:
            held = done
    return held


SRC_STAGE_BUFFERS = (
    "torch 2.13 torch/distributed/pipelining/stage.py: PipelineStage._setup_forward_recv_info "
    "(an input receive buffer per micro-batch on every non-first stage, made at the first "
    "step and kept), _setup_backward_recv_info / _create_grad_recv_info (a gradient receive "
    "buffer per micro-batch on every non-last stage), _retrieve_recv_activations (the input "
    "buffer is the stage's input tensor), forward_one_chunk (fwd_cache keeps the output of "
    "each micro-batch until its backward)"
)


def torch_stage_buffers(
    hidden: int, *, stages: Sequence[tuple[bool, bool]], alive: Sequence[int], m: int
) -> tuple[Transient, ...]:
    """What torch.distributed.pipelining's stages on one rank hold beside the layers' saved
    tensors (SRC_STAGE_BUFFERS), each a stage-boundary hidden state of `hidden` bytes (the
    rank's slice under SP and CP): per local stage (`stages`: (first, last) of each, `alive`:
    its micro-batches in flight at the peak), m input receive buffers unless it is the first
    stage, of which the `alive` in-flight ones are its first layer's saved input (counted
    there until the end of backward), m gradient receive buffers and the in-flight
    micro-batches' outputs unless it is the last stage."""
    if hidden <= 0:
        return ()
    inputs = sum(m - k for (first, _), k in zip(stages, alive, strict=True) if not first)
    after = sum(k for (first, _), k in zip(stages, alive, strict=True) if not first)
    grads = sum(m for _, last in stages if not last)
    outputs = sum(k for (_, last), k in zip(stages, alive, strict=True) if not last)
    terms: tuple[tuple[str, int, tuple[Phase, ...], str], ...] = (
        (
            "pipeline_recv_buffers",
            inputs + grads,
            PHASES[1:],
            f"({inputs} input + {grads} gradient) receive buffers x {hidden:,} B, kept from "
            "the first step on",
        ),
        (
            "pipeline_recv_buffers_in_flight",
            after,
            ("backward_end", "optimizer_step"),
            f"{after} input receive buffers x {hidden:,} B that hold the in-flight "
            "micro-batches' inputs (their first layer's saved input until then)",
        ),
        (
            "pipeline_stage_outputs",
            outputs,
            FORWARD_BACKWARD,
            f"{outputs} in-flight micro-batches' stage outputs x {hidden:,} B (fwd_cache, "
            "until their backward)",
        ),
    )
    return tuple(
        Transient(
            name=name, bytes=n * hidden, phases=phases, formula=formula, source=SRC_STAGE_BUFFERS
        )
        for name, n, phases, formula in terms
        if n > 0
    )


def _schedule_table(microbatches: int, chunks: int, group: int) -> Iterator[tuple[int, int]]:
    """(micro-batch, model chunk) in forward order (schedules.py::get_schedule_table)."""
    for first in range(0, microbatches, group):
        last = min(first + group, microbatches)
        for c in range(chunks):
            for mb in range(first, last):
                yield mb, c


def stage(
    micro: Activations,
    *,
    chunk_layers: Sequence[int],
    alive: Sequence[int],
    first: bool,
    last: bool,
    source: str = SRC_SCHEDULE,
    kinds: Sequence[Mapping[str, int]] | None = None,
    buffers: Sequence[Transient] = (),
) -> Activations:
    """One pipeline rank's activations at its peak from one micro-batch's (`micro`, every
    layer): the layers of its chunks (`chunk_layers`, one count per model chunk), the
    embeddings on the first rank, the head and loss on the last, each times the micro-batches
    in flight (`alive`, per chunk). The micro-batch whose backward starts the peak keeps the
    ordinary blocks; the others are `in_flight.*` blocks. With several decoder-layer blocks
    (a traced profile's `layers.<kind>` beside `layers`), `kinds` gives each chunk's layers
    by block name (Activations.layer_order); a kind the rank does not hold is left out, and
    `layers` is kept (one layer's bytes are what the engines' terms read) even at count 0.
    `buffers` join micro's (torch's stage buffers: torch_stage_buffers)."""
    if not micro.modelled:
        return micro
    by = {b.name: b for b in micro.blocks}
    names = [b.name for b in micro.blocks if b.name == "layers" or b.name.startswith("layers.")]
    per_chunk = kinds if kinds is not None else [{"layers": n} for n in chunk_layers]
    # The first backward is the last chunk's (the deepest layers of the first micro-batch).
    current = per_chunk[-1]
    held = {
        n: sum(c.get(n, 0) * k for c, k in zip(per_chunk, alive, strict=True)) - current.get(n, 0)
        for n in names
    }
    blocks: list[Block] = []
    if first:
        blocks.append(by["embeddings"])
    blocks += [
        by[n].repeated(current.get(n, 0)) for n in names if n == "layers" or current.get(n, 0)
    ]
    if last:
        blocks += [by["head"], by["loss"]]

    def more(b: Block, count: int) -> None:
        if count > 0:
            blocks.append(b.repeated(count, held_as=f"in_flight.{b.name}"))

    if first:
        more(by["embeddings"], alive[0] - 1)
    for n in names:
        more(by[n], held[n])
    if last:
        more(by["head"], alive[-1] - 1)
        more(by["loss"], alive[-1] - 1)
    notes = micro.notes
    if len(alive) > 1 or alive[0] > 1:
        notes = (
            *notes,
            f"pipeline: {sum(n * k for n, k in zip(chunk_layers, alive, strict=True))} "
            f"layer-micro-batches in flight at the peak ({', '.join(map(str, alive))} "
            f"micro-batches per model chunk; {source}).",
        )
    return replace(
        micro,
        blocks=tuple(blocks),
        logits_bytes=micro.logits_bytes if last else 0,
        upcast_bytes=micro.upcast_bytes if last else 0,
        notes=notes,
        buffers=(*micro.buffers, *buffers) if buffers else micro.buffers,
    )
