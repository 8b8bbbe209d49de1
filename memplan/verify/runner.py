"""`memplan verify`: predict, refuse what cannot fit, run the ranks, compare per category."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from memplan import versions
from memplan.config.load import LoadedSpec, installed_version
from memplan.memory import Phase
from memplan.precision import dtype_bytes
from memplan.report.result import Report
from memplan.states.engines import RankStates
from memplan.states.engines.deepspeed.step import ALLOCATED_IN_STEP, HPZ_SECONDARY_PERSISTENT
from memplan.states.engines.deepspeed.step import HPZ_SECONDARY as HPZ_PREFIX
from memplan.verify import job as jobs
from memplan.verify import refusals
from memplan.verify.job import Event, Job, Options, activations_modelled
from memplan.verify.result import (
    HPZ_BACKWARD,
    HPZ_STEP,
    STEP_TRANSIENT,
    RankResult,
    Row,
    VerifyResult,
    rows_for,
    to_json,
)

if TYPE_CHECKING:
    from memplan.verify.rank import RankMeasurement

__all__ = ["VerifyResult", "compare", "predicted", "to_json", "verify"]

# The suffix memplan/states/stages.py::_tagged gives the expert group's terms.
EXPERTS_SUFFIX = " (experts)"

# Categories extrapolated to full depth with --layers: additive over decoder layers.
_EXTRAPOLATED = ("parameters", "gradients", "optimizer_states", "buffers", "activations")


def state_name(name: str) -> str:
    """The torch state name a predicted row compares with: `exp_avg (experts)` -> `exp_avg`.

    memplan names the expert group's states apart (memplan/states/stages.py::_tagged); torch's
    optimizer keeps one `exp_avg` per parameter whatever group it is in, so the rows with the
    same base name are summed before they are compared."""
    return name.removesuffix(EXPERTS_SUFFIX)


def predicted(
    report: Report, rank: int, tensor_rank: int = 0
) -> tuple[dict[str, int | None], list[str]]:
    """memplan's bytes per category for data-parallel `rank` on TP rank `tensor_rank`, and
    its optimizer state names in order.

    Optimizer states include those the engine keeps in host memory (torch's CPU `step`
    scalars on CUDA runs): verify measures every state tensor wherever it lives. The peak
    is the device's (host terms excluded)."""
    states: RankStates = report.states_of(rank, tensor_rank)
    view = report.tensor_view(tensor_rank)
    out: dict[str, int | None] = {
        "parameters": states.bytes_of("parameters"),
        "gradients": states.bytes_of("gradients"),
        "buffers": report.buffer_bytes,
    }
    names: list[str] = []
    optimizer_total = 0
    for term in (*states.terms, *states.host_terms):
        if term.category == "optimizer_states":
            name = state_name(term.name)
            names.append(name)
            out[name] = (out.get(name) or 0) + term.bytes
            optimizer_total += term.bytes
    out["optimizer_states"] = optimizer_total
    if report.layout.engine == "deepspeed" and report.layout.deepspeed.zero_hpz_partition_size > 1:
        # hpZ's secondary partitions: transients of the step, alive in these phases
        # (memplan.states.engines.deepspeed.step.hpz_secondary).
        rows: tuple[tuple[str, Phase], ...] = (
            (HPZ_BACKWARD, "backward"),
            (HPZ_STEP, "optimizer_step"),
        )
        for name, phase in rows:
            out[name] = sum(
                t.bytes
                for t in report.timeline.transient_at(phase)
                if t.name.startswith(HPZ_PREFIX)
            )
    if activations_modelled(report):
        # The TP rank's own activations (the LM head's logits and loss over its vocabulary
        # rows) and peak; that peak is its most-loaded data-parallel rank's, and another
        # rank differs by its model states (activations and transients are the same on every
        # data-parallel rank).
        out["activations"] = view.activations_bytes
        out["peak"] = view.peak_bytes - view.per_gpu.total_bytes + states.total_bytes
    else:
        out["activations"] = None
        out["peak"] = None
    return out, list(dict.fromkeys(names))


def deepspeed_step(report: Report, *, persistent_elements: int = 0) -> int:
    """What DeepSpeed's boundary engine.step() allocates and holds at once, gloo's collective
    staging left out (memplan.verify.deepspeed_engine.step_peak): the step's transients
    DeepSpeed allocates inside it (memplan.states.engines.deepspeed.step.ALLOCATED_IN_STEP).

    ZeRO-3 also re-allocates model states: the step releases every parameter (stage3.py::
    step -> _partition_all_parameters, 0.19.8) and `_post_step` all-gathers the persistent
    ones again (`persistent_parameters[0].all_gather(...)`: each a whole tensor, numel <=
    stage3_param_persistence_threshold, in the parameters' dtype: `persistent_elements`,
    memplan.verify.job.Job), after the fp32 gradient
    partition is dropped (_release_sub_group). The profiler sees those allocations but not the
    release before them (tensors made before it), so the measured step holds the larger of the
    two; on a GPU the release offsets the gather, and memplan's timeline keeps the parameters
    alive throughout (its parameters row), adding only the transient.

    ZeRO++ hpZ: `_partition_all_parameters` gives each persistent parameter its secondary
    partition (step.HPZ_SECONDARY_PERSISTENT, in ALLOCATED_IN_STEP), and `_post_step` drops
    them (`invalidate_secondary_tensor`) only after the persistent all-gather, so they are
    alive at both moments (stage3.py::_post_step, 0.19.8; measured with every parameter
    persistent, benchmarks/verify_deepspeed.py --step-hierarchy). MiCS (0.19.2, whose
    mics.py::MiCS_Optimizer keeps stage3.py's step) has no secondaries: its step is ZeRO-3's
    over the shard group's partition, which the report's partition already is."""
    layout = report.layout
    transients = report.timeline.transient_at("optimizer_step")
    in_step = sum(t.bytes for t in transients if t.name in ALLOCATED_IN_STEP)
    if layout.stage != 3:
        return in_step
    secondaries = sum(t.bytes for t in transients if t.name == HPZ_SECONDARY_PERSISTENT)
    gathered = persistent_elements * dtype_bytes(report.recipe.parameters)
    return max(in_step, gathered + secondaries)


def _setup(job: Job, report: Report, measured: list[RankMeasurement]) -> dict[str, Any]:
    import torch
    import transformers

    spec = job.spec
    training = spec.training
    built = next((m.attention for m in measured if m.attention), None)
    return {
        "model": report.model.name,
        "model_type": report.model.model_type,
        "num_parameters": report.model.num_parameters,
        "device": job.device,
        "fake": job.fake,
        "engine": job.engine,
        "zero_stage": job.stage,
        "ranks": job.world,
        "distributed": job.distributed,
        "precision": job.recipe.name,
        "optimizer": spec.optimizer.name,
        "optimizer_implementation": spec.optimizer.implementation,
        "layers": job.layers,
        "full_layers": job.full_layers,
        "micro_batch_size": spec.training.micro_batch_size,
        "sequence_length": spec.training.sequence_length,
        # The step that was built (memplan/verify/build.py): transformers' attention
        # implementation as built, checkpointing, offload, forced dropout (None: the
        # config's probabilities) and the key/value cache (always off in a training step).
        "attention": built or training.attention,
        "activation_checkpointing": training.activation_checkpointing,
        "activation_offload": training.activation_offload,
        "dropout": training.dropout,
        "use_cache": False,
        "steps": jobs.STEPS,
        # Where the prediction's activations come from (memplan.verify.unruled): a hand rule,
        # a profile (stored, or traced now for a model_type with no rule) or none.
        "activations_source": job.served.source if activations_modelled(report) else "none",
        "activations_profile": job.served.profile,
        "activations_profile_origin": job.served.origin,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def compare(
    job: Job, report: Report, full: Report | None, measured: list[RankMeasurement]
) -> VerifyResult:
    """Rows per rank, the headline rank, and the full-depth extrapolation for --layers."""
    ranks = []
    for m in measured:
        pred, names = predicted(report, job.data_rank(m.rank), job.tensor_rank(m.rank))
        if STEP_TRANSIENT in m.bytes:
            pred[STEP_TRANSIENT] = deepspeed_step(
                report, persistent_elements=job.persistent_elements
            )
        rows = rows_for(
            predicted=pred,
            measured=dict(m.bytes),
            state_names=[*names, *m.state_names],
            peak_enforced=jobs.transients_modelled(report),
        )
        ranks.append(RankResult(rank=m.rank, rows=rows))
    # memplan's most-loaded data-parallel rank; under TP its first tensor rank (torch.chunk
    # gives the first TP ranks the most vocabulary rows).
    most_loaded = report.per_gpu.ranks[0] * job.tensor
    notes = _tensor_parallel_notes(job)
    if job.served.detail:
        notes.append(job.served.detail)
    if not jobs.activations_modelled(report):
        notes.append(
            "activations are not modelled by the calculator yet: measured saved-tensor bytes "
            "and the measured peak are shown, not checked."
        )
    elif not jobs.transients_modelled(report):
        notes.append(
            "peak: the calculator does not model transient buffers yet (DDP buckets, FSDP2 "
            "all-gather and reduce-scatter buffers, optimizer-step temporaries), so its peak "
            "is a lower bound: shown, not checked."
        )
    if job.spec.training.gradient_accumulation_steps > 1:
        notes.append(
            "gradient_accumulation_steps > 1: verify runs one micro-batch per optimizer step "
            "(the per-step peak is the same)."
        )
    if job.engine == "ddp" and job.distributed and job.fake:
        notes.append(
            "--fake: the DDP wrapper is not built (it needs real tensors); model states are "
            "the same, but the peak lacks its reducer buckets (a second copy of the gradients)."
        )
    elif job.engine == "ddp" and job.distributed and job.data > 1:
        notes.append(
            "DDP's reducer buckets (a second copy of the gradients for all-reduce) are not a "
            "category: they appear only in the peak."
        )
    if job.engine == "ddp" and job.stage == 1 and job.recipe.master_weights:
        notes.append(
            "ZeroRedundancyOptimizer broadcasts each updated tensor from its owner to every "
            "rank, so the fp32 master copies it updates exist whole on every rank; memplan's "
            "ZeRO-1 rule keeps them on the owning rank only (the master_weights rows differ)."
        )
    if job.recipe.master_weights and job.engine == "ddp":
        notes.append(
            f"{job.recipe.name}: the optimizer updates {job.recipe.master_weights} master "
            "copies; for each step the 16-bit gradients are cast into the masters' .grad "
            "(a transient copy, freed after the step, seen only in the peak)."
        )
    if job.engine == "deepspeed":
        notes.append(
            f"DeepSpeed's own engine (deepspeed.initialize, ZeRO-{job.stage}) with "
            f"{refusals.DEEPSPEED_MICRO_BATCHES} micro-batches per optimizer step: model "
            "states read from its flat buffers and fp32 partitions; gradients are the most "
            "held at the end of a micro-batch's backward outside the reduction bucket; the "
            "peak is not measured."
        )
        ds = job.spec.parallelism.deepspeed
        if ds.zero_hpz_partition_size > 1:
            notes.append(
                f"ZeRO++ hpZ (zero_hpz_partition_size {ds.zero_hpz_partition_size}): its "
                "secondary partitions are transients of the step, measured at the end of each "
                "micro-batch's backward (the most) and where the optimizer step drops them "
                "(invalidate_secondary_tensor)."
            )
        if ds.mics and job.device == "cpu":
            notes.append(
                f"MiCS (mics_shard_size {ds.mics_shard_size}) on gloo: its coalesced "
                "parameter all-gathers are issued one by one into the buffers MiCS allocates "
                "(gloo has no coalescing manager)."
            )
    elif job.device == "cpu" and not job.fake:
        notes.append("peak on CPU: torch MemTracker's total of live storages (no allocator).")
    full_depth: tuple[Row, ...] = ()
    if full is not None:
        if job.engine == "ddp" and job.stage == 1:
            notes.append(
                "--layers: no full-depth extrapolation for ZeroRedundancyOptimizer (its "
                "partition depends on every tensor of the model)."
            )
        else:
            full_depth = _extrapolate(job, full, measured[most_loaded])
    phases = tuple(measured[most_loaded].phases)
    return VerifyResult(
        setup=_setup(job, report, measured),
        ranks=tuple(ranks),
        most_loaded=most_loaded,
        phases=phases,
        full_depth=full_depth,
        notes=tuple(notes),
    )


def _tensor_parallel_notes(job: Job) -> list[str]:
    """What the TP run is, and how a vocabulary TP does not divide is split."""
    if job.tensor == 1:
        return []
    from memplan.verify.tensor_parallel import vocab_rows

    par = job.spec.parallelism
    sp = "with sequence parallelism (SequenceParallel norms, PrepareModuleInput all-gathers)"
    out = [
        f"tensor parallelism {job.tensor}: torch DTensor parallelize_module, torchtitan's plan "
        "(ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down, vocabulary-parallel "
        "embedding, LM head column-parallel over the vocabulary "
        + ("with loss_parallel()), " if job.loss_parallel else "gathered to whole logits), ")
        + (sp if par.sequence_parallel else "without sequence parallelism")
        + f"; ranks {job.tensor} x d .. {job.tensor} x d + {job.tensor - 1} form data-parallel "
        "rank d's TP group."
    ]
    if job.engine == "ddp":
        out.append(
            "engine ddp, data 1: no DDP wrapper (no data-parallel group to reduce over), and "
            "nothing redistributes the embedding's gradient to its parameter's Shard(0): "
            "DTensor's embedding backward has no row-sharded output (torch/distributed/"
            "tensor/_ops/_embedding_ops.py::embedding_dense_backward_strategy), so every TP "
            "rank holds the whole [vocabulary, hidden] gradient (Replicate) until zero_grad, "
            "where memplan counts the rank's rows. FSDP2 redistributes it before its "
            "reduce-scatter (torch/distributed/fsdp/_fully_shard/_fsdp_param.py::"
            "FSDPParam._get_grad_inner_tensor)."
        )
    vocab = int(job.config.get("vocab_size") or 0)
    rows = vocab_rows(vocab, job.tensor) if vocab else []
    if rows and len(set(rows)) > 1:
        out.append(
            f"vocabulary {vocab} over {job.tensor} TP ranks: DTensor splits it like "
            f"torch.chunk, {', '.join(map(str, rows))} rows per TP rank; memplan predicts "
            "each TP rank's own rows (its embedding and LM head states, and its logits and "
            "loss over them), the first TP rank being the most loaded."
        )
    return out


def _extrapolate(job: Job, full: Report, m: RankMeasurement) -> tuple[Row, ...]:
    """Full depth = measured at K layers + (L - K) x measured bytes per decoder layer."""
    pred, _ = predicted(full, job.data_rank(m.rank), job.tensor_rank(m.rank))
    rows = []
    for name in _EXTRAPOLATED:
        measured = m.bytes.get(name, 0)
        layer_bytes = m.layer_bytes.get(name, 0)
        if name == "optimizer_states":
            layer_bytes = sum(m.layer_bytes.get(n, 0) for n in m.state_names)
        extra = layer_bytes * (job.full_layers - job.layers) // job.layers
        rows.append(
            Row(name=name, predicted=pred.get(name), measured=measured + extra, tolerance=0.0)
        )
    return tuple(rows)


def verify(loaded: LoadedSpec, options: Options, on_event: Event) -> VerifyResult:
    """Plan, check free memory, run, compare. Raises MemplanError for what cannot run."""
    job, report, full = jobs.plan(loaded, options)
    if job.device == "cuda" and not job.fake:
        import torch

        if not torch.cuda.is_available():
            from memplan.errors import MemplanError

            raise MemplanError(
                "--device cuda: torch sees no CUDA device here (torch "
                f"{torch.__version__}); use --device cpu or --fake."
            )
        free, _total = torch.cuda.mem_get_info()
        jobs.refuse_if_too_big(job, report, int(free) * job.world, "the GPU")
    else:
        jobs.refuse_if_too_big(job, report, jobs.available_host_bytes(), "this host")
    from memplan.verify import launch

    measured = launch.run(job, on_event)
    return replace(compare(job, report, full, measured), warnings=tuple(version_warnings(loaded)))


def version_warnings(loaded: LoadedSpec) -> list[str]:
    """The installed torch and transformers (read from package metadata) against the
    versions the rules this spec uses describe (memplan.versions)."""
    return versions.mismatches(
        torch=installed_version("torch"),
        transformers=installed_version("transformers"),
        rules_transformers=versions.rules_release(loaded.spec.model.transformers_version),
    )
