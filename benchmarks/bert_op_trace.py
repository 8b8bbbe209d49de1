"""Why memplan is 7-9% low on Hugging Face's BERT-large batch-4 runs (nvidia-smi on a V100,
benchmarks/published_others.py, issue 20): the step traced op by op and replayed through
memplan's caching-allocator model, against memplan's own phase-level replay.

What runs (CPU, no GPU, nothing downloaded): transformers' BertForSequenceClassification at
bert-large-uncased's config (benchmarks/published_others.py BERT_LARGE: 24 layers, hidden 1024,
eager attention, dropout 0.1), fp32, batch 4 x 512, under FakeTensorMode with memplan's CUDA
kernel emulation (memplan/verify/trace/cuda.py: dropout's fused kernel with its bool mask, layer
norm's fp32 statistics), then `torch.optim.AdamW(foreach=False)` (the page's default
`adamw_hf` is a per-parameter loop too). A TorchDispatchMode records every storage an op makes
and the moment it dies (benchmarks/torchtitan_70b_trace.py's Recorder).

The replay (memplan.step.allocator, torch's default allocator settings; the page set no
PYTORCH_CUDA_ALLOC_CONF) allocates what a real run allocates before its first step, one tensor
at a time as `.to("cuda")` and the first step make them: the parameters (model order), the
gradients (transformers 4.16's Trainer zeroes them with set_to_none=False, so they stay), the
optimizer's exp_avg and exp_avg_sq (made by its first step), then two traced steps. Its peak
reserved plus the page's measured CUDA context (1341 MiB) is what nvidia-smi would show.

Not the real run: transformers 4.16 / torch 1.10 (the page's) are not installable here, so the
model is transformers 5.25's BERT (the same saved tensors: memplan's profile of it is the
activations both use), and the op order is torch 2.13's CPU autograd engine's (a CUDA run's
frees follow the same reference counts).

    PYTHONPATH=$PWD python benchmarks/bert_op_trace.py   # ~1 min; writes
                                                       # benchmarks/results/bert-op-trace.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.published_others import BERT_LARGE, SOURCES, hf_bert  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.torchtitan_70b_trace import Recorder, Track  # noqa: E402
from memplan.step import allocator  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bert-op-trace.json"
MIB, GIB = 1 << 20, 1 << 30
CONTEXT_MIB = 1341  # the page's idle reading less its tensor's segment (published_others)
PUBLISHED_MIB = {4: 14949}  # "bs 4, fp32, AdamW": nvidia-smi after trainer.train()


def trace(batch: int, seq: int = 512) -> tuple[Recorder, list[int], list[str]]:
    """One training step recorded; the parameters' storage bytes in model order, and the names
    of the ops that made each recorded storage (for the report)."""
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.verify.trace import cuda

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    config = transformers.BertConfig(**{k: v for k, v in BERT_LARGE.items() if k != "model_type"})
    config.num_labels = 2
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = transformers.BertForSequenceClassification(config)
        model.config._attn_implementation = "eager"
        model.train()
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        labels = torch.randint(0, 2, (batch,))
        params = [p.untyped_storage().nbytes() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
        for p in model.parameters():  # zero_grad(set_to_none=False): gradients stay allocated
            p.grad = torch.zeros_like(p)
        opt.step()  # makes exp_avg and exp_avg_sq (the replay allocates them at init)
        rec = Recorder()
        rec.existing(
            [*model.parameters(), *model.buffers(), ids, labels]
            + [p.grad for p in model.parameters()]
            + [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        )
        em = cuda.Emulation(stream="fp32")
        with cuda.cuda_kernels(em):
            track = Track(rec)
            with track:
                track.mark("forward")
                loss = model(input_ids=ids, labels=labels).loss
                track.mark("backward")
                loss.backward()
                del loss
                track.mark("optimizer_step")
                opt.step()
                for p in model.parameters():
                    assert p.grad is not None
                    p.grad.zero_()
                track.mark("end")
        rec.collect()
        del mode
    return rec, params, [rec.made[i][0] for i in sorted(rec.made)]


def replay_events(rec: Recorder, params: list[int]) -> list[tuple[Any, ...]]:
    """Parameters, gradients and the two AdamW states tensor by tensor (as the run made them
    before its steady state), then two traced steps (markers on the second)."""
    out: list[tuple[Any, ...]] = []
    for kind in ("param", "grad", "exp_avg", "exp_avg_sq"):
        out += [("alloc", (kind, i), n) for i, n in enumerate(params)]
    return out + rec.steps(2)


def memplan_figures(batch: int) -> dict[str, float]:
    """memplan's own estimate of the row (its profile traced into a temporary cache)."""
    import os
    import tempfile

    from benchmarks.published_others import trace_profile
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEMPLAN_CACHE"] = cache
        loaded = validate(hf_bert(batch, 1))
        trace_profile(loaded)
        report = estimate(loaded.spec, load_inventory(loaded))
    assert report.allocator is not None
    return {
        "allocated_gib": report.peak_bytes / GIB,
        "reserved_gib": report.allocator.peak_reserved / GIB,
        "device_used_gib": (report.device_used or 0) / GIB,
    }


def main() -> None:
    started = time.time()
    rows = []
    for batch in PUBLISHED_MIB:
        rec, params, _ = trace(batch)
        result = allocator.replay(replay_events(rec, params))
        mine = memplan_figures(batch)
        published = PUBLISHED_MIB[batch] / 1024
        traced_used = result.peak_reserved / GIB + CONTEXT_MIB / 1024
        row = {
            "batch": batch,
            "published_nvidia_smi_gib": published,
            "traced_replay": {
                "peak_allocated_gib": result.peak_allocated / GIB,
                "peak_reserved_gib": result.peak_reserved / GIB,
                "fragmentation_gib": result.fragmentation / GIB,
                "device_used_gib": traced_used,
                "error": traced_used / published - 1,
                "phases": [
                    {
                        "phase": p.name,
                        "allocated_gib": p.peak_allocated / GIB,
                        "reserved_gib": p.peak_reserved / GIB,
                    }
                    for p in result.phases
                ],  # fmt: skip
            },
            "memplan": {**mine, "error": mine["device_used_gib"] / published - 1},
            "events": len(rec.events),
        }
        rows.append(row)
        print(
            f"batch {batch}: published {published:.2f} GiB (nvidia-smi); op-level replay "
            f"allocated {result.peak_allocated / GIB:.2f}, reserved "
            f"{result.peak_reserved / GIB:.2f} -> {traced_used:.2f} GiB "
            f"({row['traced_replay']['error']:+.1%}); memplan allocated "
            f"{mine['allocated_gib']:.2f}, reserved {mine['reserved_gib']:.2f} -> "
            f"{mine['device_used_gib']:.2f} GiB ({row['memplan']['error']:+.1%})"
        )
    doc = {
        **stamp(torch=torch.__version__),
        "command": "PYTHONPATH=$PWD python benchmarks/bert_op_trace.py",
        "source": SOURCES["hf-bert"]["reference"],
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
