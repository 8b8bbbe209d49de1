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

from memplan.report.settings import layout_of
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


def _torchtitan_groups(
    model: nn.Module,
    base: nn.Module,
    layers: nn.ModuleList | None,
    mesh: Any,
    reshard: bool,
    policy: Any,
) -> None:
    """fully_shard the way torchtitan's apply_fsdp_to_decoder does
    (torchtitan/distributed/fsdp.py, 0.3.0) on a transformers model: the input embedding
    (reshard_after_forward=`reshard`, zero_stage 3 is its "default" policy, 2 its "never"),
    each decoder layer (`reshard`), every other module holding parameters outside the layers
    (the final norm and the LM head) as one group not resharded after forward, then the root;
    a tied head joins the embedding's group, not resharded after forward."""
    from torch.distributed.fsdp import fully_shard

    inside = {id(m) for block in layers or [] for m in block.modules()}
    get_input_embeddings: Any = base.get_input_embeddings  # transformers' PreTrainedModel
    embedding = get_input_embeddings()
    rest = [
        m
        for m in model.modules()
        if id(m) not in inside
        and m is not embedding
        and m is not model
        and any(True for _ in m.parameters(recurse=False))
    ]
    config = {"mesh": mesh, "mp_policy": policy}
    if getattr(base.config, "tie_word_embeddings", False):
        fully_shard([embedding, *rest], reshard_after_forward=False, **config)
    else:
        fully_shard(embedding, reshard_after_forward=reshard, **config)
        if rest:
            fully_shard(rest, reshard_after_forward=False, **config)
    for block in layers or []:
        fully_shard(block, reshard_after_forward=reshard, **config)
    fully_shard(model, **config)


def _wrap(job: Job, device_index: int, device: str, mesh: Any) -> Wrapped:
    recipe = job.recipe
    master = recipe.master_weights
    fsdp = job.engine == "fsdp2"
    # FSDP2 (and FSDP1) keep the sharded parameter in the dtype it was built in and cast to
    # the mixed-precision param_dtype for compute, so a *-mixed model is built in the master
    # dtype; everywhere else the module holds `recipe.parameters`.
    sharded = fsdp or job.engine == "fsdp1"
    at_rest = master if sharded and master else recipe.parameters
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

        replicate = job.spec.parallelism.data_replicate
        if mesh is None and replicate > 1:
            # HSDP: FSDP2 on a 2-D (replicate, shard) mesh (torchtitan's dp_replicate x
            # dp_shard).
            mesh = init_device_mesh(
                device, (replicate, job.world // replicate), mesh_dim_names=("replicate", "shard")
            )
        if mesh is None:
            mesh = init_device_mesh(device, (job.world,))
        # reduce_dtype as the calculator's Layout has it (parallelism.reduce_dtype, torchtitan's
        # fp32 default filled in); FSDP2 clamps it to None where it equals param_dtype.
        layout = layout_of(job.spec)
        reduce = layout.reduce_dtype
        policy = MixedPrecisionPolicy(
            param_dtype=build.torch_dtype(recipe.parameters) if master else None,
            reduce_dtype=build.torch_dtype(reduce) if reduce else None,
            cast_forward_inputs=layout.fsdp_groups != "torchtitan",
        )
        reshard = job.stage == 3
        if layout.fsdp_groups == "torchtitan":
            _torchtitan_groups(model, base, layers, mesh, reshard, policy)
        else:
            for block in layers or []:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    elif job.engine == "fsdp1":
        from memplan.verify import fsdp1_engine

        model = fsdp1_engine.wrap(model, layers, stage=job.stage, recipe=recipe, device=device)
    else:
        if master:
            dtype = build.torch_dtype(master)
            masters = build.MasterWeights(peft_support.mastered(model, dtype), dtype)
        if job.distributed and not job.fake and job.data > 1:
            # DDP cannot wrap fake tensors (it checks their data across ranks); it changes
            # no model state, only adds its reducer buckets (runner notes their absence).
            # Under TP verify runs ddp with data 1 only (job.plan): no group to reduce over.
            from torch.nn.parallel import DistributedDataParallel

            ids = [device_index] if device == "cuda" else None
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
    elif job.engine == "fsdp1":
        from memplan.verify import fsdp1_engine

        tracker = fsdp1_engine.storage_tracker()
        tracker.track_external(w.model, w.optimizer, *extra)
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


def measure_rank(
    job: Job, rank: int, progress: Progress, mesh: Any = None, local_rank: int | None = None
) -> RankMeasurement:
    """Build, run STEPS real steps, and measure the last one. The caller sets up the process
    group and, for --fake, FakeTensorMode (and then the FSDP2 `mesh`, made outside it).
    `local_rank`: the rank's CUDA device on its host (torchrun's LOCAL_RANK; default `rank`,
    all ranks on one host)."""
    device = "cpu" if job.fake else job.device
    index = rank if local_rank is None else local_rank
    if job.engine == "deepspeed":
        from memplan.verify import deepspeed_engine

        if device == "cuda":
            torch.cuda.set_device(index)
        measured: RankMeasurement = deepspeed_engine.measure_rank(job, rank, progress, index)
        return measured
    if device == "cuda":
        torch.cuda.set_device(index)
    w = _wrap(job, index, device, mesh)
    progress("build")
    ids = build.batch(
        job.spec, int(build.hf_config(job.config).get_text_config().vocab_size), device
    )
    for _ in range(STEPS - 1):  # the first step creates the optimizer state
        _step(job, w, ids, lambda _name: None, contextlib.nullcontext())
        _zero_grad(w)
        progress("step")
    phases: list[Phase] = []
    _phase(job, "before step", phases)
    saved = measure.SavedTensors()
    quant = list(peft_support.quant_states(w.model))
    with _peak_tracker(job, w, [ids, *(t for _, t in quant)]) as peak:
        if job.engine == "fsdp1":
            from memplan.verify import fsdp1_engine

            saving = fsdp1_engine.saved_tensors(saved, w.model, w.layers)
        else:
            saving = measure.saved_tensors(saved, w.model, w.layers)
        _step(job, w, ids, lambda name: _phase(job, name, phases), saving)
        peak_bytes = peak()
    pairs = zip(w.masters.params, w.masters.masters, strict=True) if w.masters else ()
    ledger = measure.model_states(w.model, w.state, masters=pairs, extra_buffers=quant)
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
