"""One rank's real training steps and what they hold: build, wrap (FSDP2 / DDP /
ZeroRedundancyOptimizer, all torch's own), step, measure. Shared by the one-process, the
torch.distributed and the fake-tensor paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memplan.verify import build, measure, peft_support, tensor_parallel
from memplan.verify.job import STEPS, Job
from memplan.verify.result import Phase
from memplan.verify.trace import heads

Progress = Callable[[str], None]


@dataclass
class RankMeasurement:
    """What one rank measured (plain ints: it crosses process boundaries)."""

    rank: int
    bytes: dict[str, int]
    """parameters, gradients, buffers, each optimizer state by name (master_weights too),
    activations and the peak of the measured step."""
    layer_bytes: dict[str, int]
    """The part of each category held by decoder layers (for --layers extrapolation)."""
    state_names: list[str]
    phases: list[Phase] = field(default_factory=list)
    attention: str | None = None
    """The attention implementation transformers ran (`config._attn_implementation`)."""


@dataclass
class Wrapped:
    model: nn.Module
    optimizer: Any
    state: dict[torch.Tensor, dict[str, object]]
    masters: build.MasterWeights | None
    layers: nn.ModuleList | None
    base: nn.Module
    """The transformers model (before peft and the engine's wrappers)."""


def _wrap(job: Job, rank: int, device: str, mesh: Any) -> Wrapped:
    recipe = job.recipe
    master = recipe.master_weights
    fsdp = job.engine == "fsdp2"
    # FSDP2 keeps the sharded parameter in the dtype it was built in and casts to
    # MixedPrecisionPolicy.param_dtype for compute, so a *-mixed model is built in the master
    # dtype; everywhere else the module holds `recipe.parameters`.
    at_rest = master if fsdp and master else recipe.parameters
    model = build.build_model(
        job.config,
        build.torch_dtype(at_rest),
        device,
        job.spec.training,
        unruled=job.unruled,
    )
    base = model
    model = peft_support.prepare(job.spec, model)
    layers = build.decoder_layers(model, job.layers)
    masters = None
    if job.tensor > 1:
        # One 2-D mesh (data, tensor): FSDP2 shards over its data dimension,
        # parallelize_module over its tensor dimension.
        mesh, tp_mesh = tensor_parallel.meshes(device, job.data, job.tensor)
        tensor_parallel.apply(
            model, tp_mesh, job.spec.parallelism.sequence_parallel, job.loss_parallel
        )
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if mesh is None:
            mesh = init_device_mesh(device, (job.world,))
        policy = MixedPrecisionPolicy(
            param_dtype=build.torch_dtype(recipe.parameters) if master else None
        )
        reshard = job.stage == 3
        for block in layers or []:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    else:
        if master:
            dtype = build.torch_dtype(master)
            masters = build.MasterWeights(peft_support.mastered(model, dtype), dtype)
        if job.distributed and not job.fake and job.data > 1:
            # DDP cannot wrap fake tensors (it checks their data across ranks); it changes
            # no model state, only adds its reducer buckets (runner notes their absence).
            # Under TP verify runs ddp with data 1 only (job.plan): no group to reduce over.
            from torch.nn.parallel import DistributedDataParallel

            ids = [rank] if device == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
    cls = build.optimizer_class(job.spec)
    kwargs = build.optimizer_kwargs(job.spec)
    params: Any = peft_support.optimizer_params(model, masters)
    if job.tensor > 1 and not fsdp:
        params = tensor_parallel.param_groups(params)
    if job.engine == "ddp" and job.stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
        return Wrapped(
            model=model,
            optimizer=zero,
            state=zero.optim.state,
            masters=masters,
            layers=layers,
            base=base,
        )
    optimizer = cls(params, **kwargs)
    return Wrapped(
        model=model,
        optimizer=optimizer,
        state=optimizer.state,
        masters=masters,
        layers=layers,
        base=base,
    )


@contextlib.contextmanager
def _peak_tracker(job: Job, w: Wrapped, extra: list[torch.Tensor]) -> Iterator[Callable[[], int]]:
    """Peak bytes over the block: CUDA's allocator counter, else torch's MemTracker
    (FSDPMemTracker for FSDP2), which follows every storage the ops create."""
    if job.device == "cuda" and not job.fake:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield lambda: int(torch.cuda.max_memory_allocated())
        return
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker: MemTracker
    if job.engine == "fsdp2":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(w.model, w.optimizer)
        tracker.track_inputs(tuple(extra))
        if w.masters:
            tracker.track_external(*w.masters.masters)
    else:
        tracker = MemTracker()
        # ZeroRedundancyOptimizer keeps the state in its local optimizer, `.optim`.
        tracker.track_external(w.model, getattr(w.optimizer, "optim", w.optimizer), *extra)
        if w.masters:
            tracker.track_external(*w.masters.masters)
    peft_support.frozen_without_hooks(tracker, w.model)
    with tracker:
        yield lambda: _total(tracker.get_tracker_snapshot("peak"))


def _total(snapshot: dict[torch.device, dict[str, int]]) -> int:
    return sum(int(per_device["Total"]) for per_device in snapshot.values())


def _phase(job: Job, name: str, phases: list[Phase]) -> None:
    """CUDA allocator counters at the end of a phase of the measured step (the peak counter is
    reset once, at the step's start, so `max_allocated` is the step's peak so far)."""
    if job.device != "cuda" or job.fake:
        return
    torch.cuda.synchronize()
    phases.append(
        Phase(
            name=name,
            allocated=int(torch.cuda.memory_allocated()),
            max_allocated=int(torch.cuda.max_memory_allocated()),
            reserved=int(torch.cuda.memory_reserved()),
        )
    )


def _targets(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss inputs: labels = ids for a language-model head, else what the head's loss takes
    (memplan.verify.trace.heads), random and seeded."""
    kind = heads.kind_of_name(type(model).__name__) or "lm"
    if kind == "lm":
        return {"labels": ids}
    labels = int(getattr(model.config, "num_labels", 2))
    generator = torch.Generator().manual_seed(build.SEED)
    return heads.loss_inputs(kind, ids, labels, generator=generator)


def _step(
    job: Job,
    w: Wrapped,
    ids: torch.Tensor,
    phase: Callable[[str], None],
    saving: contextlib.AbstractContextManager[object],
) -> None:
    """One training step: forward with the loss (under `saving`, no key/value cache, the
    attention core recomputed for selective checkpointing), backward, optimizer step."""
    device = ids.device.type
    with tensor_parallel.loss_parallel(job.tensor if job.loss_parallel else 1):
        with (
            saving,
            build.unpacked(job.fake),
            build.selective(w.base, job.spec.training),
            build.autocast(job.recipe, device),
        ):
            loss = w.model(input_ids=ids, use_cache=False, **_targets(w.base, ids)).loss
        phase("forward")
        loss.backward()
        del loss
    phase("backward")
    if w.masters:
        w.masters.grads_in()
    w.optimizer.step()
    if w.masters:
        w.masters.weights_out()
    phase("optimizer step")


def _zero_grad(w: Wrapped) -> None:
    w.optimizer.zero_grad(set_to_none=True)
    w.model.zero_grad(set_to_none=True)  # the module's 16-bit grads when masters are in use


def measure_rank(job: Job, rank: int, progress: Progress, mesh: Any = None) -> RankMeasurement:
    """Build, run STEPS real steps, and measure the last one. The caller sets up the process
    group and, for --fake, FakeTensorMode (and then the FSDP2 `mesh`, made outside it)."""
    device = "cpu" if job.fake else job.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    w = _wrap(job, rank, device, mesh)
    progress("build")
    ids = build.batch(job.spec, int(build.hf_config(job.config).vocab_size), device)
    for _ in range(STEPS - 1):  # the first step creates the optimizer state
        _step(job, w, ids, lambda _name: None, contextlib.nullcontext())
        _zero_grad(w)
        progress("step")
    phases: list[Phase] = []
    _phase(job, "before step", phases)
    saved = measure.SavedTensors()
    with _peak_tracker(job, w, [ids]) as peak:
        saving = measure.saved_tensors(saved, w.model, w.layers)
        _step(job, w, ids, lambda name: _phase(job, name, phases), saving)
        peak_bytes = peak()
    pairs = zip(w.masters.params, w.masters.masters, strict=True) if w.masters else ()
    ledger = measure.model_states(w.model, w.state, masters=pairs)
    _zero_grad(w)
    progress("step")
    out = dict(ledger.bytes)
    out["optimizer_states"] = sum(out[n] for n in measure.optimizer_state_names(ledger))
    out["activations"] = saved.bytes
    layer_bytes = dict(ledger.layer_bytes)
    layer_bytes["activations"] = saved.layer_bytes
    out["peak"] = peak_bytes
    return RankMeasurement(
        rank=rank,
        bytes=out,
        layer_bytes=layer_bytes,
        state_names=measure.optimizer_state_names(ledger),
        phases=phases,
        attention=build.attention_built(w.base),
    )
