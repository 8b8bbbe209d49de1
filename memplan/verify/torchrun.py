"""`memplan verify` launched by torchrun: every process is one rank of the spec's layout.

torchrun (torch/distributed/run.py) starts the processes and sets the env:// rendezvous
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on any number of
nodes. verify then spawns nothing: each process joins the world group (gloo on CPU, nccl on
CUDA), plans the same job, checks that its host can hold its own ranks, builds and measures
itself (memplan.verify.rank.measure_rank, as a self-spawned rank does), and rank 0 gathers
every rank's measurement with `gather_object` and compares them with the prediction exactly as
the self-spawned path does (memplan.verify.runner.compare).

Failures before the run (a spec error, a world size that is not the spec's layout, a host
too small) are agreed by every rank with one `all_gather_object`: rank 0 prints the first
one and every rank exits non-zero. A rank that fails while running prints its own error (no
other rank can see it) and exits non-zero; torchrun then stops the others.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.verify.job import Event, Options

# The variables torchrun sets for every worker (torch/distributed/run.py, "Environment
# Variables"); verify joins the world through them (init_method="env://").
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, slots=True)
class World:
    """This process's place in the torchrun world."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    """Ranks on this host (LOCAL_WORLD_SIZE)."""

    @property
    def host_ranks(self) -> range:
        """The global ranks on this host: torchrun numbers a node's workers consecutively
        (torch/distributed/elastic/agent/server/api.py::_assign_worker_ranks: global rank =
        the node's base rank + local rank)."""
        base = self.rank - self.local_rank
        return range(base, base + self.local_size)


def launched(env: dict[str, str] | None = None) -> World | None:
    """The world when this process was started by torchrun (all of ENV set), else None."""
    env = dict(os.environ) if env is None else env
    if not all(key in env for key in ENV):
        return None
    try:
        rank, size, local = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        got = ", ".join(f"{k}={env.get(k)!r}" for k in (*ENV, "LOCAL_WORLD_SIZE") if k in env)
        raise MemplanError(
            f"torchrun's rank variables are not integers ({got}); start verify with torchrun "
            "(torchrun --nnodes N --nproc-per-node P -m memplan verify SPEC)."
        ) from None
    return World(rank=rank, size=size, local_rank=local, local_size=local_size)


def check_world(spec_world: int, options: Options, world: World) -> None:
    """The torchrun world must be the layout verify proves: the spec's data x tensor ranks
    (or --nproc when given). --fake runs every rank in one process, so it has no place here."""
    if options.fake:
        raise MemplanError(
            "--fake runs every rank in one process under FakeTensorMode; under torchrun each "
            "process is one real rank. Run `memplan verify SPEC --fake` without torchrun."
        )
    if options.nproc is not None and options.nproc != world.size:
        raise MemplanError(
            f"--nproc {options.nproc} differs from torchrun's world size {world.size} "
            "(--nnodes x --nproc-per-node); under torchrun leave --nproc out or make them equal."
        )
    if options.nproc is None and spec_world != world.size:
        raise MemplanError(
            f"torchrun started {world.size} rank(s) (WORLD_SIZE), but the spec's layout has "
            f"{spec_world} (parallelism.data x parallelism.tensor). Start "
            f"{spec_world} ranks (torchrun --nnodes N --nproc-per-node P with N x P = "
            f"{spec_world}), or set parallelism.data to WORLD_SIZE / parallelism.tensor.",
            field="parallelism.data",
        )


class RankFailed(MemplanError):
    """This rank failed while running: only it knows why, so it prints the message (other
    failures are agreed by every rank and printed by rank 0)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What verify under torchrun ends with on this rank: rank 0's result (None elsewhere)
    and whether every category was within its tolerance (the same on every rank)."""

    result: Any
    ok: bool


def _first_error(errors: list[str | None]) -> str | None:
    """The lowest failing rank's message, naming the rank when the ranks disagree."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    rank, message = failed[0]
    if len(failed) == len(errors) and len(set(errors)) == 1:
        return message
    return f"rank {rank} of {len(errors)}: {message}"


def verify(spec_path: Path, options: Options, world: World, on_event: Event) -> Outcome:
    """Join the world, plan, agree, measure, gather. Raises MemplanError on every rank when
    any rank failed before the run (the caller prints it on rank 0 only), RankFailed on the
    rank that failed while running (printed there)."""
    import torch
    import torch.distributed as dist

    from memplan.config import load
    from memplan.verify import job as jobs
    from memplan.verify import runner
    from memplan.verify.launch import _quiet_transformers

    _quiet_transformers()
    cuda = options.device == "cuda" and not options.fake
    if cuda:
        if not torch.cuda.is_available():
            raise MemplanError(
                f"--device cuda: torch sees no CUDA device here (torch {torch.__version__})."
            )
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    try:
        error: str | None = None
        planned: Any = None
        try:
            loaded = load.load_spec(spec_path)
            with load.locating(loaded):
                par = loaded.spec.parallelism
                check_world(par.data * par.tensor, options, world)
                planned = jobs.plan(loaded, replace(options, nproc=world.size))
                job, report, _full = planned
                if cuda:
                    free, _total = torch.cuda.mem_get_info()
                    jobs.refuse_if_too_big(
                        job, report, int(free), "this rank's GPU", range(world.rank, world.rank + 1)
                    )
                else:
                    jobs.refuse_if_too_big(
                        job, report, jobs.available_host_bytes(), "this host", world.host_ranks
                    )
        except MemplanError as err:
            error = str(err)
        errors: list[str | None] = [None] * world.size
        dist.all_gather_object(errors, error)
        first = _first_error(errors)
        if first is not None:
            raise MemplanError(first)
        job, report, full = planned
        try:
            mine = _measure(job, world, on_event)
        except MemplanError as err:
            raise RankFailed(
                f"rank {world.rank} of {world.size} failed while verifying: {err}"
            ) from None
        except Exception:
            raise RankFailed(
                f"rank {world.rank} of {world.size} failed while verifying:\n"
                + traceback.format_exc().rstrip()
            ) from None
        gathered: list[Any] | None = [None] * world.size if world.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        verdict: list[Any] = [None]
        result = None
        if world.rank == 0:
            assert gathered is not None
            try:
                result = replace(
                    runner.compare(job, report, full, gathered),
                    warnings=tuple(runner.version_warnings(loaded)),
                )
                verdict = [result.ok]
            except MemplanError as err:
                verdict = [str(err)]
        dist.broadcast_object_list(verdict, src=0)
        dist.barrier()  # no rank leaves while another still reads the verdict
        if isinstance(verdict[0], str):
            raise MemplanError(verdict[0])
        return Outcome(result=result, ok=bool(verdict[0]))
    finally:
        dist.destroy_process_group()


def _measure(job: Any, world: World, on_event: Event) -> Any:
    from memplan.verify.rank import measure_rank

    def progress(what: str) -> None:
        on_event(world.rank, what)

    out = measure_rank(job, world.rank, progress, local_rank=world.local_rank)
    on_event(world.rank, "done")
    return out
