"""One rank of DeepSpeed's real engine (deepspeed.initialize, ZeRO stages 0-3), measured.

On the CPU DeepSpeed runs with its CPU accelerator (DS_ACCELERATOR=cpu) over the gloo group
verify already made (deepspeed/comm/torch.py::TorchBackend adopts an initialised
torch.distributed). The model states are read from DeepSpeed's own structures, each storage
counted once (memplan.verify.measure.Ledger), read against deepspeed 0.19.8:

- parameters: the module's parameter storages (ZeRO-0..2: views into the flat 16-bit
  `bit16_groups_flat`, padded), plus ZeRO-3's partitions `param.ds_tensor` (views into
  `fp16_partitioned_groups_flat`) and the parameters it keeps gathered
  (stage3_param_persistence_threshold);
- gradients: the most gradient storage held at the end of a micro-batch's backward, outside
  the reduction bucket (the DS config asks for 2 micro-batches; both are measured, the
  second before engine.step()): ZeRO-0/1 every full `.grad` between micro-batches
  (stage_1_and_2.py::process_gradients reduces only at the boundary when
  `partition_gradients` is off), ZeRO-2 `averaged_gradients` at the boundary (whole
  parameters overlapping the rank's partition; between micro-batches its gradients wait in
  the ipg bucket, a transient), ZeRO-3 `grad_partitions_flat_buffer`;
- master_weights: the fp32 copy the optimizer updates (`single_partition_of_fp32_groups`,
  `fp32_partitioned_groups_flat`, FP16_Optimizer's `fp32_groups_flat`), not counted again
  where it is the parameter storage itself (ZeRO-3 fp32);
- each optimizer state by name from the wrapped torch optimizer's `state` (FusedAdam's
  `step` is a Python int: no bytes);
- with ZeRO++ hpZ, the secondary partitions (`param.ds_secondary_tensor`): the most held at
  the end of a micro-batch's backward, and what exists where the optimizer step drops them
  (`invalidate_secondary_tensor`); neither is a model state (the step frees them).

On CPU, the boundary engine.step() of the measured step is profiled allocation by allocation
(`step_peak`, the `deepspeed step transient` row): the most bytes it allocates and holds at
once, gloo's collective staging left out (GLOO_SCOPES), against memplan.verify.runner.
deepspeed_step.

MiCS (`mics_shard_size`) runs on deepspeed 0.19.2 (0.19.7 refuses the key; 0.19.3 to 0.19.6
hang with more than one shard group: memplan.verify.job), its gathers issued one by one on
gloo (`_gather_without_coalescing_manager`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memplan.verify import build, measure
from memplan.verify.job import STEPS, Job
from memplan.verify.refusals import DEEPSPEED_MICRO_BATCHES, DEEPSPEED_OPTIMIZERS
from memplan.verify.result import HPZ_BACKWARD, HPZ_STEP, STEP_TRANSIENT

MICRO_BATCHES = DEEPSPEED_MICRO_BATCHES


# The DeepSpeed optimizer wrappers' gradient and fp32 attributes (0.19.8):
# stage_1_and_2.py::DeepSpeedZeroOptimizer, stage3.py::DeepSpeedZeroOptimizer_Stage3,
# fp16/fused_optimizer.py::FP16_Optimizer, bf16_optimizer.py::BF16_Optimizer.
_GRADIENTS = (
    "averaged_gradients",
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "fp32_groups_gradients_flat",
)
_MASTERS = (
    "single_partition_of_fp32_groups",
    "fp32_partitioned_groups_flat",
    "fp32_groups_flat",
    "fp32_groups_flat_partition",
)


def config(job: Job) -> dict[str, Any]:
    """The DeepSpeed config the spec implies (the keys memplan/states/engines/deepspeed
    reads; unset ones keep DeepSpeed's defaults)."""
    spec, recipe = job.spec, job.recipe
    ds = spec.parallelism.deepspeed
    zero: dict[str, Any] = {
        "stage": job.stage,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "sub_group_size": ds.sub_group_size,
        "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
        "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
        "stage3_max_live_parameters": ds.stage3_max_live_parameters,
    }
    if ds.overlap_comm is not None:
        zero["overlap_comm"] = ds.overlap_comm
    if ds.zero_hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
    if ds.mics:
        zero["mics_shard_size"] = ds.mics_shard_size
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.training.micro_batch_size,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "zero_optimization": zero,
        "optimizer": {
            "type": DEEPSPEED_OPTIMIZERS[spec.optimizer.name],
            # FusedAdam takes no foreach/fused switch; the learning rate makes no bytes.
            "params": {"lr": 1e-3},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.communication_data_type is not None:
        out["communication_data_type"] = ds.communication_data_type
    if recipe.parameters == "bf16":
        out["bf16"] = {"enabled": True}
    elif recipe.parameters == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return out


def _tensors(value: object) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _parameters(engine: Any) -> list[torch.Tensor]:
    out = []
    for p in engine.module.parameters():
        if p.data.numel():
            out.append(p.data)
        if getattr(p, "ds_tensor", None) is not None:
            out.append(p.ds_tensor)
    return out


def _gradients(engine: Any) -> list[torch.Tensor]:
    opt = engine.optimizer
    out = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for name in _GRADIENTS:
        out.extend(_tensors(getattr(opt, name, None)))
    return [g for g in out if g.numel()]


def _sum(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        key = measure.storage_key(t)
        if key not in seen:
            seen.add(key)
            total += measure.storage_bytes(t)
    return total


def _secondary_partitions(engine: Any) -> list[torch.Tensor]:
    """ZeRO++ hpZ's secondary partitions (`param.ds_secondary_tensor`,
    partition_parameters.py::Init._partition_param_sec) that exist now."""
    out = []
    for p in engine.module.parameters():
        sec = getattr(p, "ds_secondary_tensor", None)
        if sec is not None and sec.numel():
            out.append(sec)
    return out


def _record_secondaries_at_step_end(engine: Any, record: dict[str, int]) -> None:
    """Measure the secondary partitions where the optimizer step ends: `_post_step` drops them
    (stage3.py::invalidate_secondary_tensor, 0.19.8); record what exists just before."""
    opt = engine.optimizer
    invalidate = opt.invalidate_secondary_tensor

    def measured_then_invalidated() -> None:
        record[HPZ_STEP] = _sum(_secondary_partitions(engine), set())
        invalidate()

    opt.invalidate_secondary_tensor = measured_then_invalidated


class _Works:
    """The async work handles of one gather, waited on together."""

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def _gather_without_coalescing_manager(deepspeed: Any) -> None:
    """MiCS on gloo: MiCS_Init gathers a module's parameters with `dist.all_gather_coalesced`
    (mics.py::MiCS_Init._flat_all_gather_with_coalescing_manager), which DeepSpeed's torch
    backend issues inside torch's `_coalescing_manager` (comm/torch.py::TorchBackend.
    all_gather_coalesced), and gloo has none ("RuntimeError: Backend gloo does not implement
    startCoalescing"). Here the same all-gathers, into the same output buffers MiCS allocated,
    are issued one by one (`all_gather_into_tensor`, async) and waited on together: what is
    allocated is MiCS's own; only the launch differs."""
    import torch.distributed as torch_dist

    deepspeed.init_distributed(dist_backend="gloo")  # adopts verify's torch.distributed
    backend = deepspeed.comm.comm.cdb

    def all_gather_coalesced(
        output_tensors: list[torch.Tensor],
        input_tensors: list[torch.Tensor],
        group: Any = None,
        async_op: bool = False,
    ) -> _Works | None:
        works = [
            torch_dist.all_gather_into_tensor(out, inp, group=group, async_op=True)
            for out, inp in zip(output_tensors, input_tensors, strict=True)
        ]
        handle = _Works(works)
        if async_op:
            return handle
        handle.wait()
        return None

    backend.all_gather_coalesced = all_gather_coalesced


# Collectives on gloo stage their buffers in new tensors (torch 2.13 torch/csrc/distributed/
# c10d/ProcessGroupGloo.cpp: `_allgather_base` -> AsyncAllgatherWork, `newLikeFlat` of the
# whole output; flattened inputs) that NCCL, writing in place, does not make: allocations
# inside these profiler scopes are gloo's, not DeepSpeed's, and are left out.
GLOO_SCOPES = ("c10d::", "gloo:")


def step_peak(run: Callable[[], None]) -> int:
    """The most bytes that `run` allocates and holds at once: every CPU allocation inside it,
    and every free of one of them, in time order, from torch's profiler (`profile_memory`:
    c10's CPU allocator reports each one, DeepSpeed's C++ ops included), less those made
    inside a gloo collective (GLOO_SCOPES). Frees of tensors made before `run` are not seen
    (the profiler has no record of their size): this is what the step adds on top of what it
    started with, at its worst moment, as if nothing older were released."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    gloo = [(e.start_ns(), e.end_ns()) for e in events if e.name().startswith(GLOO_SCOPES)]
    memory = sorted(
        (
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and not any(a <= e.start_ns() <= b for a, b in gloo)
        ),
        key=lambda pair: pair[0],
    )
    level = peak = 0
    for _, nbytes in memory:
        level += nbytes
        peak = max(peak, level)
    return peak


def _step_once(engine: Any, ids: torch.Tensor) -> None:
    """One optimizer step: MICRO_BATCHES forward/backward passes (engine.step() is a no-op
    until the accumulation boundary)."""
    for _ in range(MICRO_BATCHES):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        del loss
        engine.step()


def measure_rank(job: Job, rank: int, progress: Callable[[str], None], index: int) -> Any:
    """Build the model, hand it to deepspeed.initialize, run STEPS optimizer steps of
    MICRO_BATCHES micro-batches, and measure the last one."""
    if job.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # engine.py::_do_args_sanity_check asserts LOCAL_RANK (torchrun sets it; the ranks
    # verify spawns itself do not).
    os.environ.setdefault("LOCAL_RANK", str(index))
    import deepspeed

    from memplan.verify.rank import RankMeasurement

    model = build.build_model(
        job.config,
        build.torch_dtype(job.recipe.parameters),
        job.device,
        job.spec.training,
        unruled=job.unruled,
    )
    layers = build.decoder_layers(model, job.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    if job.spec.parallelism.deepspeed.mics and job.device == "cpu":
        _gather_without_coalescing_manager(deepspeed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config(job))
    progress("build")
    ids = build.batch(
        job.spec, int(build.hf_config(job.config).get_text_config().vocab_size), job.device
    )
    for _ in range(STEPS - 1):  # the first step creates the optimizer state
        _step_once(engine, ids)
        progress("step")
    saved = measure.SavedTensors()
    first: dict[str, int] = {}  # the most gradient bytes seen
    hpz = job.spec.parallelism.deepspeed.zero_hpz_partition_size > 1
    if hpz:
        _record_secondaries_at_step_end(engine, first)
    for micro in range(MICRO_BATCHES):
        recording = measure.saved_tensors(saved, engine.module, layers)
        with recording if micro == 0 else contextlib.nullcontext():
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        del loss
        held = {measure.storage_key(t) for t in _parameters(engine)}
        first["gradients"] = max(first.get("gradients", 0), _sum(_gradients(engine), held))
        if hpz:
            sec = _sum(_secondary_partitions(engine), set())
            first[HPZ_BACKWARD] = max(first.get(HPZ_BACKWARD, 0), sec)
        if micro == MICRO_BATCHES - 1 and job.device == "cpu":
            first[STEP_TRANSIENT] = step_peak(engine.step)
        else:
            engine.step()
    progress("step")
    seen: set[int] = set()
    out: dict[str, int] = {
        "parameters": _sum(_parameters(engine), seen),
        "gradients": first["gradients"],
        "buffers": _sum(engine.module.buffers(), seen),
    }
    if STEP_TRANSIENT in first:
        out[STEP_TRANSIENT] = first[STEP_TRANSIENT]
    for name in (HPZ_BACKWARD, HPZ_STEP) if hpz else ():
        out[name] = first.get(name, 0)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = _sum(
        (t for name in _MASTERS for t in _tensors(getattr(engine.optimizer, name, None))), seen
    )
    names = []
    if masters:
        out["master_weights"] = masters
        names.append("master_weights")
    for state in inner.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[str(key)] = out.get(str(key), 0) + _sum([value], seen)
                if str(key) not in names:
                    names.append(str(key))
    out["optimizer_states"] = sum(out[n] for n in names)
    out["activations"] = saved.bytes
    return RankMeasurement(
        rank=rank,
        bytes=out,
        layer_bytes={"activations": saved.layer_bytes},
        state_names=names,
        attention=build.attention_built(model),
    )
