"""Why memplan is 7-9% low on Hugging Face's BERT-large batch-4 runs (nvidia-smi on a V100,
benchmarks/published_others.py, issue 20): the step traced op by op and replayed through
memplan's caching-allocator model, against memplan's own phase-level replay.

What runs (CPU, no GPU, nothing downloaded): transformers' BertForSequenceClassification at
bert-large-uncased's config (benchmarks/published_others.py BERT_LARGE: 24 layers, hidden 1024,
eager attention, dropout 0.1), fp32, batch 4 x 512, under FakeTensorMode with memplan's CUDA
kernel emulation (memplan/verify/trace/cuda.py: dropout's fused kernel with its bool mask, layer
norm's fp32 statistics), then the row's optimizer as memplan's spec of it names it:
`torch.optim.AdamW(foreach=False)` (the page's default `adamw_hf` is a per-parameter loop too),
and, for the page's Adafactor row, `torch.optim.Adafactor(foreach=True)` (memplan's
`adafactor`: torch's states and its default foreach step) and the page's own optimizer,
transformers.optimization.Adafactor(scale_parameter=False, relative_step=False) (memplan's
`adafactor-hf`; the row then compares the optimizer step's allocated bytes, traced against
memplan's). A TorchDispatchMode records every
storage an op makes and the moment it dies (benchmarks/torchtitan_70b_trace.py's Recorder).
The page's 8-bit Adam row is not traced: bitsandbytes' optimizer needs CUDA.

The replay (memplan.step.allocator, torch's default allocator settings; the page set no
PYTORCH_CUDA_ALLOC_CONF) allocates what a real run allocates before its first step, one tensor
at a time as `.to("cuda")` and the first step make them: the parameters (model order), the
gradients (transformers 4.16's Trainer zeroes them with set_to_none=False, so they stay), the
optimizer's states (made by its first step: AdamW's exp_avg and exp_avg_sq, Adafactor's row
and column factors), then two traced steps. Its peak
reserved plus the page's measured CUDA context (1341 MiB) is what nvidia-smi would show.

Not the real run: transformers 4.16 / torch 1.10 (the page's) are not installable here, so the
model is transformers 5.25's BERT (the same saved tensors: memplan's profile of it is the
activations both use), and the op order is torch 2.13's CPU autograd engine's (a CUDA run's
frees follow the same reference counts).

    PYTHONPATH=$PWD python benchmarks/bert_op_trace.py   # ~2 min; writes
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.published_others import BERT_LARGE, SOURCES, hf_bert  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.torchtitan_70b_trace import Recorder, Track  # noqa: E402
from memplan.step import allocator  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bert-op-trace.json"
MIB, GIB = 1 << 20, 1 << 30
CONTEXT_MIB = 1341  # the page's idle reading less its tensor's segment (published_others)
PUBLISHED_MIB = {
    (4, "adamw"): 14949,  # "bs 4, fp32, AdamW": nvidia-smi after trainer.train()
    (4, "adafactor"): 12295,  # "bs 4, Adafactor", as torch.optim.Adafactor
    (4, "adafactor-hf"): 12295,  # the same row with the page's own optimizer (transformers')
}
"""The page's rows traced: (batch, memplan's optimizer name) -> published MiB."""
HOST_STATES = frozenset({"step"})
"""Optimizer state kept on the host: torch.optim's `step` is a CPU scalar tensor unless the
optimizer is capturable or fused (torch 2.13 torch/optim/adamw.py and _adafactor.py
::_init_group)."""


def optimizer(params: Any, name: str) -> torch.optim.Optimizer:
    """The optimizer memplan's spec of the row names (benchmarks/published_others.py hf_bert):
    `adamw` with `implementation: for_loop` (the page's `adamw_hf` is a per-parameter loop),
    `adafactor` as torch.optim.Adafactor with memplan's default `implementation: foreach`
    (memplan.optimizers: torch/optim/_adafactor.py's states), `adafactor-hf` as the HF
    Trainer's `optim="adafactor"` builds transformers.optimization.Adafactor (memplan.verify.
    build.HF_TRAINER_ADAFACTOR)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, foreach=False)
    if name == "adafactor-hf":
        from transformers.optimization import Adafactor

        from memplan.verify.build import HF_TRAINER_ADAFACTOR

        hf: torch.optim.Optimizer = Adafactor(params, **HF_TRAINER_ADAFACTOR)
        return hf
    assert name == "adafactor", name
    return torch.optim.Adafactor(params, lr=1e-2, foreach=True)


class Scalars(TorchDispatchMode):
    """`.item()` of a fake tensor answered 1.0: torch.optim.Adafactor reads its step and each
    parameter's norm as Python floats (torch 2.13 _adafactor.py::_multi_tensor_adafactor),
    which FakeTensorMode cannot give; the values scale the update, never a tensor's shape, so
    what the step allocates is the same."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0
        return func(*args, **(kwargs or {}))


def trace(
    batch: int, optim: str = "adamw", seq: int = 512
) -> tuple[Recorder, list[tuple[str, int, int]], list[str]]:
    """One training step recorded; what the run holds before it, (kind, index, storage bytes)
    in the order `replay_events` allocates them, and the names of the ops that made each
    recorded storage (for the report)."""
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
        opt = optimizer(model.parameters(), optim)
        for p in model.parameters():  # zero_grad(set_to_none=False): gradients stay allocated
            p.grad = torch.zeros_like(p)
        with Scalars():
            opt.step()  # makes the optimizer's states (the replay allocates them at init)
        held = [("param", i, n) for i, n in enumerate(params)]
        held += [("grad", i, n) for i, n in enumerate(params)]
        states = [opt.state[p] for p in model.parameters()]
        kinds = list(dict.fromkeys(k for state in states for k in state))
        held += [
            (kind, i, state[kind].untyped_storage().nbytes())
            for kind in kinds
            if kind not in HOST_STATES
            for i, state in enumerate(states)
            if isinstance(state.get(kind), torch.Tensor)
        ]
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
                with Scalars():
                    opt.step()
                for p in model.parameters():
                    assert p.grad is not None
                    p.grad.zero_()
                track.mark("end")
        rec.collect()
        del mode
    return rec, held, [rec.made[i][0] for i in sorted(rec.made)]


def replay_events(rec: Recorder, held: list[tuple[str, int, int]]) -> list[tuple[Any, ...]]:
    """Parameters, gradients and the optimizer's states tensor by tensor, kind by kind (as the
    run made them before its steady state: AdamW's exp_avg, then exp_avg_sq), then two traced
    steps (markers on the second)."""
    out: list[tuple[Any, ...]] = [("alloc", (kind, i), n) for kind, i, n in held]
    return out + rec.steps(2)


def memplan_figures(batch: int, optim: str = "adamw") -> dict[str, float]:
    """memplan's own estimate of the row (its profile traced into a temporary cache)."""
    import os
    import tempfile

    from benchmarks.published_others import trace_profile
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEMPLAN_CACHE"] = cache
        loaded = validate(hf_bert(batch, 1, optim=optim))
        trace_profile(loaded)
        report = estimate(loaded.spec, load_inventory(loaded))
    assert report.allocator is not None
    step = [p for p in report.allocator.phases if p.phase == "optimizer_step"]
    return {
        "step_allocated_gib": step[0].peak_allocated / GIB,
        "allocated_gib": report.peak_bytes / GIB,
        "reserved_gib": report.allocator.peak_reserved / GIB,
        "device_used_gib": (report.device_used or 0) / GIB,
    }


def step_phase(result: Any) -> int:
    """The replayed trace's peak allocated bytes in its optimizer_step phase."""
    return next(p.peak_allocated for p in result.phases if p.name == "optimizer_step")


def main() -> None:
    started = time.time()
    rows = []
    for batch, optim in PUBLISHED_MIB:
        rec, held, _ = trace(batch, optim)
        result = allocator.replay(replay_events(rec, held))
        mine = memplan_figures(batch, optim)
        published = PUBLISHED_MIB[batch, optim] / 1024
        traced_used = result.peak_reserved / GIB + CONTEXT_MIB / 1024
        row = {
            "batch": batch,
            "optimizer": optim,
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
            f"batch {batch}, {optim}: published {published:.2f} GiB (nvidia-smi); op-level replay "
            f"allocated {result.peak_allocated / GIB:.2f}, reserved "
            f"{result.peak_reserved / GIB:.2f} -> {traced_used:.2f} GiB "
            f"({row['traced_replay']['error']:+.1%}); memplan allocated "
            f"{mine['allocated_gib']:.2f}, reserved {mine['reserved_gib']:.2f} -> "
            f"{mine['device_used_gib']:.2f} GiB ({row['memplan']['error']:+.1%}); optimizer "
            f"step allocated: traced {step_phase(result) / GIB:.4f}, memplan "
            f"{mine['step_allocated_gib']:.4f} GiB"
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
