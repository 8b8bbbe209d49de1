"""Measure loss_parallel's forward on 2 gloo CPU ranks (used by tests/test_loss_parallel.py).

Each rank holds fp32 logits sharded over the vocabulary (a DTensor, Shard(-1) on a 1-D mesh
of 2), made inside torch's MemTracker, and runs torch's F.cross_entropy under
`loss_parallel()` (torch/distributed/tensor/parallel/loss.py): the tracker's peak during the
forward, in units of the rank's [tokens, vocabulary / TP] fp32 slice, is what the rank
writes.
"""

from __future__ import annotations

import datetime
import gc
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TOKENS, VOCAB = 256, 4096


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        import torch.nn.functional as F  # noqa: N812
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.parallel import loss_parallel

        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        whole = torch.randn(TOKENS, VOCAB)
        labels = torch.randint(0, VOCAB, (TOKENS,))
        logits = distribute_tensor(whole, mesh, [Shard(-1)]).requires_grad_()
        del whole
        tracker: Any = MemTracker()
        tracker.track_external(logits)
        cpu = torch.device("cpu")
        with tracker:
            before = tracker.get_tracker_snapshot("current")[cpu]["Total"]
            tracker.reset_mod_stats()
            with loss_parallel():
                loss = F.cross_entropy(logits, labels)
            peak = tracker.get_tracker_snapshot("peak")[cpu]["Total"]
            # gloo runs the statistics' all-reduces on a worker thread that can drop its
            # references a few ops late (tests/test_fsdp2_peak.py: gloo's race); a barrier
            # waits for every rank's collectives before the forward's leftovers are read.
            dist.barrier()
            gc.collect()
            after = tracker.get_tracker_snapshot("current")[cpu]["Total"]
        slice_bytes = TOKENS * (VOCAB // world) * 4
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "before": before,
                    "peak": peak,
                    "after": after,
                    "slice": slice_bytes,
                    "loss": float(loss.detach().full_tensor()),
                }
            )
        )
    finally:
        dist.destroy_process_group()


def run(out: Path, world: int = 2) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    multiprocessing.start_processes(
        _rank, args=(world, free_port(), str(out)), nprocs=world, join=True, start_method="spawn"
    )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for r in run(Path(d)):
            print(
                r, (r["peak"] - r["before"]) / r["slice"], (r["after"] - r["before"]) / r["slice"]
            )
