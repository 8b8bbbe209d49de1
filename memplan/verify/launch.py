"""Where the ranks run: in this process, under FakeTensorMode with a fake process group, or as
N processes on torch.distributed (gloo on CPU, nccl on CUDA) started with
torch.multiprocessing (spawn) on a free localhost port.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memplan.errors import MemplanError
from memplan.verify.job import Event, Job
from memplan.verify.rank import RankMeasurement, measure_rank


def _quiet_transformers() -> None:
    from transformers.utils import logging

    hf_logging: Any = logging  # untyped
    hf_logging.set_verbosity_error()


def run(job: Job, on_event: Event) -> list[RankMeasurement]:
    """Every rank's measurement, index = rank."""
    if job.fake:
        return _run_fake(job, on_event)
    if job.distributed:
        return _run_spawned(job, on_event)
    _quiet_transformers()
    result = measure_rank(job, 0, lambda what: on_event(0, what))
    on_event(0, "done")
    return [result]


@contextlib.contextmanager
def _fake_group(job: Job, rank: int) -> Iterator[Any]:
    """A fake process group of `job.world` ranks in which this process is `rank`; yields
    the FSDP2 mesh (built outside FakeTensorMode, as init_device_mesh needs)."""
    if not job.distributed:
        yield None
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=job.world)
    try:
        mesh = None
        if job.engine == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (job.world,))
        yield mesh
    finally:
        dist.destroy_process_group()


def _run_fake(job: Job, on_event: Event) -> list[RankMeasurement]:
    """Each rank in turn, in this process: FakeTensorMode allocates nothing, so any size fits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _quiet_transformers()
    out = []
    for rank in range(job.world):

        def progress(what: str, rank: int = rank) -> None:
            on_event(rank, what)

        with _fake_group(job, rank) as mesh, FakeTensorMode():
            out.append(measure_rank(job, rank, progress, mesh))
        on_event(rank, "done")
    return out


_PRELOAD = ("torch", "memplan.verify.rank", "transformers.modeling_utils")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_group(rank: int, world: int, port: int, backend: str = "gloo") -> Iterator[None]:
    """Rank `rank` of a `world`-rank default process group over a TCP store on this host's
    `port`, destroyed on exit."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, job: Job, port: int, events: Any) -> None:
    """One spawned rank: join the group, measure, send the result (or the traceback) back."""
    try:
        _quiet_transformers()
        backend = "nccl" if job.device == "cuda" else "gloo"
        # Share the host's cores between the ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world))
        if job.device == "cuda":
            torch.cuda.set_device(rank)
        with local_group(rank, job.world, port, backend):
            result = measure_rank(job, rank, lambda what: events.put((rank, what, None)))
        events.put((rank, "done", result))
    except MemplanError as err:  # a refusal made while building: its message, no traceback
        events.put((rank, "error", str(err)))
    except BaseException:
        events.put((rank, "error", traceback.format_exc()))


def _run_spawned(job: Job, on_event: Event) -> list[RankMeasurement]:
    if job.device == "cuda" and torch.cuda.device_count() < job.world:
        raise MemplanError(
            f"--nproc {job.world} on cuda needs {job.world} GPUs; this machine has "
            f"{torch.cuda.device_count()}. Use fewer ranks, --device cpu, or --fake."
        )
    # forkserver: torch and transformers are imported once, in the server, and each rank is
    # forked from it (spawn would import them once per rank: seconds each).
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))
    events = context.Queue()
    multiprocessing: Any = mp  # start_processes is untyped
    procs = multiprocessing.start_processes(
        _worker,
        args=(job, free_port(), events),
        nprocs=job.world,
        join=False,
        start_method="forkserver",
    )
    results: dict[int, RankMeasurement] = {}
    errors: dict[int, str] = {}

    def drain(timeout: float) -> None:
        try:
            rank, what, payload = events.get(timeout=timeout)
        except queue.Empty:
            return
        if what == "done":
            results[rank] = payload
        elif what == "error":
            errors[rank] = payload
        on_event(rank, what)

    try:
        while len(results) + len(errors) < job.world:
            drain(0.1)
            if errors:
                break
            if all(not p.is_alive() for p in procs.processes) and events.empty():
                break
        if errors:
            rank = min(errors)
            raise MemplanError(
                f"rank {rank} of {job.world} failed while verifying:\n{errors[rank].rstrip()}"
            )
        missing = sorted(set(range(job.world)) - set(results))
        if missing:
            codes = [p.exitcode for p in procs.processes]
            raise MemplanError(
                f"rank(s) {missing} exited without a result (exit codes {codes}); a rank that "
                "runs out of memory is killed without a message: try --layers or --fake."
            )
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
            p.join()
    return [results[r] for r in range(job.world)]
