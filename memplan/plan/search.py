"""`memplan plan`: search the layouts that fit a memory budget and rank them by step time.

Every candidate's memory comes from the same calculator as `memplan estimate` (so plan never
proposes a layout whose predicted peak exceeds the budget); its time from `memplan.plan.steptime`.
Model states do not depend on the micro-batch or on recomputation, so they are computed once
per (degrees, engine, stage, offload) and reused; and since the peak only grows with the
micro-batch, the search stops at the first micro-batch that does not fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby

from memplan.config.base import MAX_DEGREE
from memplan.config.parallelism import ParallelismSpec
from memplan.config.plan import PlanSpec
from memplan.config.spec import Spec, TrainingSpec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.model.inventory import Inventory
from memplan.plan.layouts import LayoutSpace
from memplan.plan.result import Candidate, PlanResult
from memplan.plan.rows import row_spec
from memplan.plan.space import (
    IMPLEMENTATION_ENGINES,
    carried_knobs,
    compile_options,
    recompute_policies,
    search_engines,
    search_notes,
)
from memplan.plan.steptime import (
    Link,
    Shape,
    step_time,
)
from memplan.plan.timing import link_of, shape_of, work_of
from memplan.plan.workers import Pool, ordered_map, workers_help
from memplan.report.estimate import assemble_within, model_states
from memplan.report.result import Report, verdict
from memplan.report.settings import capacity_of
from memplan.report.worked import Peak, Prepared, peak_within, prepare
from memplan.states.engines.base import StepCache
from memplan.states.layout import Layout
from memplan.states.stages import StageStates

Progress = Callable[[int, int], None]

DOMINATED = "does not fit: a policy that saves less already peaks above the budget"
"""Pruned without evaluating: at this layout and micro-batch (or a smaller one) a
recomputation policy that saves a subset of this one's tensors peaked above the budget."""
SKIP_DOMINATED = True
"""Whether the search skips those (off only in the test that checks the skip loses no row)."""


@dataclass(frozen=True, slots=True)
class _Common:
    """What every layout's evaluation of one search reads (`_Search.run` works it out)."""

    recomputes: tuple[str, ...]
    compiles: dict[str, tuple[bool, ...]]
    shape: Shape
    link: Link


@dataclass(slots=True, kw_only=True)
class _Search(LayoutSpace):
    """The search of one spec: its layouts (LayoutSpace) evaluated against the budget."""

    budget: int
    searched: int = 0
    activations_modelled: bool = True
    """Whether memplan models this model's activations at all (on plain data parallelism)."""
    cache: StepCache = field(default_factory=StepCache)
    """What the step's timelines derive from the model, shared by every layout of the search."""
    common: _Common | None = None
    """Set by `run`."""
    pool: Pool | None = None
    """The workers `run` forked, if it did: they replay the rows shown (`plan` closes them)."""
    trainings: dict[tuple[int, str, bool, int], TrainingSpec] = field(default_factory=dict)
    """The rows' training keys by (micro-batch, recomputation, compile, accumulation): the
    spec's with those four replaced, made once (`_report`)."""

    def run(
        self, progress: Progress | None, first: bool = False, workers: int = 1
    ) -> list[Candidate]:
        """Every layout that fits, fastest first; with `first`, only the first one found that
        also fits as `estimate` judges its spec (the allocator replayed), or none. `workers` >
        1 spreads the layouts over that many forked processes (memplan.plan.workers): the
        same rows, counts and order as one process."""
        layouts = list(self.layouts())
        recomputes = recompute_policies(self.plan.allow_recompute, self.spec.model.implementation)
        self.common = _Common(
            recomputes=recomputes,
            compiles={r: compile_options(self.spec, self.inventory, r) for r in recomputes},
            shape=shape_of(self.inventory, self.spec, self.global_batch),
            link=link_of(self.spec, self.plan),
        )
        out: list[Candidate] = []
        if first or not workers_help(workers, len(layouts)):
            for i, (par, offload) in enumerate(layouts):
                if progress:
                    progress(i, len(layouts))
                found = self._layout(par, offload, first)
                if first and found:
                    return found
                out.extend(found)
        else:
            # Adjacent layouts share their degrees (and so the workers' caches): dealt out
            # in runs of the same degrees, each tensor degree's runs on one worker while it
            # has them (_tensor_of), answered per layout, joined in the layouts' order.
            runs = [list(run) for _, run in groupby(layouts, key=lambda lo: _degrees_of(lo[0]))]
            self.pool = pool = Pool(workers)
            answers = pool.map(
                self._alone,
                runs,
                (lambda n: progress(n, len(layouts))) if progress else None,
                domain=_tensor_of,
                after=self._replayed,
            )
            for found, pruned, searched in answers:
                out.extend(found)
                self.pruned.update(dict(pruned))  # adds the counts, in the order counted
                self.searched += searched
        if progress:
            progress(len(layouts), len(layouts))
        return sorted(out, key=lambda c: (c.time.total_s, c.peak_bytes))

    def _replayed(self, c: Candidate) -> tuple[bool, tuple[str, ...]]:
        """`_replay_fits` of row `c` in a worker of the search (`Pool.prefix`), with the
        caches that worker's layouts made."""
        return _replay_fits(self.spec, self.inventory, c, self.plan, self.cache)

    def _alone(
        self, layout: tuple[ParallelismSpec, str]
    ) -> tuple[list[Candidate], list[tuple[str, int]], int]:
        """`_layout` in a worker (a fork of the search): what fits of `layout`, and the
        prunes and evaluations it counted, in the order it counted them."""
        self.pruned, self.searched = Counter(), 0
        return self._layout(*layout), list(self.pruned.items()), self.searched

    def _layout(self, par: ParallelismSpec, offload: str, first: bool = False) -> list[Candidate]:
        """What fits of one layout, over its recomputation policies, compile flags and
        micro-batches (`first`: the first that also fits as `estimate` judges it, or none);
        what does not is counted in `pruned`."""
        sh = self.common
        assert sh is not None  # set by run()
        spec = self.spec.model_copy(update={"parallelism": par})
        try:
            trained = finetune.apply(spec, self.inventory)
            states = model_states(spec, trained)
        except MemplanError as err:
            # What `estimate` refuses for this layout (LoRA under tensor parallelism,
            # QLoRA's engines, ...) is pruned with its field, never a failed search.
            self.pruned[f"estimate refuses this layout ({err.field or 'parallelism'})"] += 1
            return []
        held = [s.model_state_bytes for s in states]
        if max(held) > self.budget:
            self.pruned["does not fit: model states alone exceed the budget"] += 1
            return []
        resident = min(held)
        out: list[Candidate] = []
        # What every evaluation of this layout shares (assemble_within's `prepared`),
        # worked out by its first evaluation that gets that far.
        prepared: list[Prepared] = []
        eager: dict[tuple[str, int], Candidate] = {}
        # compile flag -> the smallest micro-batch at which a policy that saves less (tried
        # earlier: IMPLEMENTATION_RECOMPUTE's order) already peaked above the budget.
        over: dict[bool, int] = {}
        for recompute, compiled in ((r, c) for r in sh.recomputes for c in sh.compiles[r]):
            # (micro-batch, peak) of the last evaluation of this policy that fit: a larger
            # micro-batch whose peak beyond the model states, scaled up from it, stays
            # under the budget likely fits too, so its floors are not worked out (`_report`'s
            # likely_fits: a guess, the same answer either way).
            fitted: tuple[int, int] | None = None
            for mbs in self.plan.micro_batch_sizes:
                if self.global_batch % (mbs * par.data):
                    continue
                if SKIP_DOMINATED and mbs >= over.get(compiled, mbs + 1):
                    self.pruned[DOMINATED] += 1
                    break
                self.searched += 1
                try:
                    report = self._report(
                        spec,
                        trained,
                        states,
                        mbs,
                        recompute,
                        compiled,
                        prepared,
                        likely_fits=fitted is not None
                        and (fitted[1] - resident) * mbs <= (self.budget - resident) * fitted[0],
                    )
                except MemplanError as err:
                    # What estimate refuses at this recompute / compile / micro-batch
                    # (parallelism.async_tp without compile, ...): pruned with its field.
                    self.pruned[f"estimate refuses this layout ({err.field or 'training'})"] += 1
                    break
                if report is None or report.peak_bytes > self.budget:
                    over[compiled] = min(over.get(compiled, mbs), mbs)
                if report is None:
                    self.pruned["does not fit: peak exceeds the budget"] += 1
                    break  # a larger micro-batch only needs more
                if self.activations_modelled and not _activations_modelled(report):
                    # A peak without activations would look falsely small: never rank it.
                    self.pruned["activations not modelled for this layout"] += 1
                    break
                # The peak is a lower bound of what the allocator reserves: most layouts
                # that miss are pruned without working out the reserve.
                if report.peak_bytes > self.budget:
                    self.pruned["does not fit: peak exceeds the budget"] += 1
                    break  # a larger micro-batch only needs more
                fitted = (mbs, report.peak_bytes)
                headroom = (report.usable_bytes or 0) - self.plan.reserve
                if (
                    verdict(
                        usable_bytes=headroom,
                        activations_modelled=_activations_modelled(report),
                    )
                    != "fits"
                ):
                    self.pruned["does not fit: the allocator's reserve exceeds the budget"] += 1
                    break
                c = self._candidate(
                    report, par, mbs, recompute, compiled, offload, sh.shape, sh.link, headroom
                )
                twin = eager.get((recompute, mbs))
                if twin is None:
                    eager[recompute, mbs] = c
                elif twin.time.total_s <= c.time.total_s and twin.peak_bytes <= c.peak_bytes:
                    self.pruned["compiled: neither faster nor smaller than its eager twin"] += 1
                    continue
                if first:
                    if _replay_fits(self.spec, self.inventory, c, self.plan, self.cache):
                        return [c]
                    break
                out.append(c)
        return [] if first else out

    def _report(
        self,
        spec: Spec,
        trained: Inventory,
        states: list[StageStates],
        mbs: int,
        recompute: str,
        compiled: bool,
        prepared: list[Prepared],
        likely_fits: bool = False,
    ) -> Peak | None:
        """What the search reads of the layout's report (peak_within), or None when its floor
        or a stage's peak exceeds the budget (assemble_within). `prepared`: empty, or what
        assemble_within prepares for this layout (filled here); `likely_fits`:
        peak_within's."""
        # pipeline ranks keep up to this many micro-batches in flight
        accumulation = self.global_batch // (mbs * spec.parallelism.data)
        key = (mbs, recompute, compiled, accumulation)
        training = self.trainings.get(key)
        if training is None:  # made once per search: every layout's rows share it
            training = self.trainings[key] = self.spec.training.model_copy(
                update={
                    "micro_batch_size": mbs,
                    "activation_checkpointing": recompute,
                    "compile": compiled,
                    "gradient_accumulation_steps": accumulation,
                }
            )
        row = spec.model_copy(update={"training": training})
        if not prepared:
            try:
                prepared.append(prepare(row, trained, states))
            except MemplanError:
                pass  # assemble_within raises it below (or what it checks first)
        return peak_within(
            row,
            trained,
            states,
            budget=self.budget,
            cache=self.cache,
            prepared=prepared[0] if prepared else None,
            likely_fits=likely_fits,
        )

    def _candidate(
        self,
        report: Peak,
        par: ParallelismSpec,
        mbs: int,
        recompute: str,
        compiled: bool,
        offload: str,
        shape: Shape,
        link: Link,
        headroom: int,
    ) -> Candidate:
        work = work_of(self.spec, report, mbs, recompute, compiled)
        return Candidate(
            data=par.data,
            tensor=par.tensor,
            pipeline=par.pipeline,
            context=par.context,
            expert=par.expert,
            engine=par.engine,
            zero_stage=par.stage,
            micro_batch_size=mbs,
            gradient_accumulation_steps=self.global_batch // (mbs * par.data),
            recompute=recompute,
            offload=offload,
            layers_per_stage=par.layers_per_stage,
            virtual_stages=par.virtual_stages,
            sequence_parallel=par.sequence_parallel,
            schedule=par.schedule,
            implementation=report.layout.implementation,
            fsdp_wrap=report.layout.fsdp_groups if par.engine == "fsdp2" else None,
            compile=compiled,
            peak_bytes=report.peak_bytes,
            headroom_bytes=headroom,
            time=step_time(shape, report.layout, work, link),
            tokens_per_step=self.global_batch * self.spec.training.sequence_length,
            parallelism=par,
        )


def _job(spec: Spec, p: PlanSpec) -> tuple[int, int]:
    """The GPUs a plan of `spec` searches over and its global batch in sequences, each checked
    with the field that sets it."""
    gpn = spec.hardware.gpus_per_node
    gpus = p.gpus or (p.nodes * gpn if p.nodes else None)
    if gpus is None:
        raise MemplanError(
            "say how many GPUs to plan for: plan.gpus or plan.nodes.", field="plan.gpus"
        )
    if gpus > MAX_DEGREE:
        raise MemplanError(
            f"plan.nodes x hardware.gpus_per_node = {gpus:,} GPUs; plan searches at most "
            f"{MAX_DEGREE:,}.",
            field="plan.nodes",
        )
    seq = spec.training.sequence_length
    if p.global_batch_tokens:
        if p.global_batch_tokens % seq:
            raise MemplanError(
                f"global_batch_tokens {p.global_batch_tokens:,} is not a multiple "
                f"of the sequence length {seq:,}.",
                field="plan.global_batch_tokens",
            )
        return gpus, p.global_batch_tokens // seq
    return gpus, p.global_batch_size or gpus


def tensor_slices(spec: Spec, inventory: Inventory) -> tuple[tuple[int, int], ...]:
    """(TP degree, vocabulary rows) of every TP rank the search of `spec` tries
    (the layouts `_Search.layouts` yields): the slices a model without a hand rule needs a
    profile of (memplan.activations.layout.profile_slices; the CLI traces them first)."""
    from memplan.activations.layout import profile_slices

    p = spec.plan or PlanSpec()
    arch = inventory.architecture
    try:
        gpus, global_batch = _job(spec, p)
    except MemplanError:
        return ()  # plan() itself says what is wrong
    if arch is None:
        return ()
    space = LayoutSpace(
        engines=search_engines(spec),
        carried=carried_knobs(spec),
        spec=spec,
        inventory=inventory,
        plan=p,
        gpus=gpus,
        global_batch=global_batch,
    )
    out: set[tuple[int, int]] = set()
    for par, _ in space.layouts():
        if par.tensor > 1:
            impl = spec.model.implementation
            lay = Layout.of(par, device=spec.hardware.device, implementation=impl)
            out.update(profile_slices(arch, lay))
    return tuple(sorted(out))


def plan(
    spec: Spec,
    inventory: Inventory,
    *,
    progress: Progress | None = None,
    suggest: bool = True,
    first: bool = False,
    workers: int = 1,
) -> PlanResult:
    """Every layout of `spec.plan` that fits, fastest first, and what was pruned and why.

    When nothing fits and `suggest` is set, `suggestion` says what would (each hint is a
    search of its own, run with `suggest=False` so the hints do not recurse). With `first`,
    the search stops at the first layout that fits (what `_fits` asks). `workers`: processes
    the search may spread its layouts over (memplan.plan.workers; the answer is the same)."""
    p = spec.plan or PlanSpec()
    if inventory.architecture is None:
        raise MemplanError(
            "plan searches tensor/pipeline layouts and needs the model's "
            "architecture: give hf_config, preset or architecture.",
            field="model",
        )
    gpus, global_batch = _job(spec, p)
    capacity = capacity_of(spec)
    if capacity is None:
        raise MemplanError(
            "plan needs the GPU memory: hardware.gpu (e.g. H100-80GB) or hardware.memory.",
            field="hardware",
        )
    # One plain torch process (ddp, no wrapper): it runs with any precision (DeepSpeed ZeRO-0
    # refuses some, see sharding/deepspeed.py) and tells whether activations are modelled.
    # Plan reads its activations, timeline and per-GPU states, never its allocator replay
    # (estimate's: tens of milliseconds for a 405B model's every tensor), so none is made.
    plain_spec = spec.model_copy(update={"parallelism": ParallelismSpec(engine="ddp")})
    plain_trained = finetune.apply(plain_spec, inventory)
    plain = assemble_within(
        plain_spec, inventory, plain_trained, model_states(plain_spec, plain_trained)
    )
    assert plain is not None  # no budget, nothing to prune
    if not _activations_modelled(plain):
        # A peak without activations is partial (memplan.report.result.verdict): ranking it as a
        # fit would be a false yes.
        why = next((n for n in plain.activations.notes if "not modelled" in n), "")
        raise MemplanError(
            "plan ranks layouts by their peak, and this model's activations are not "
            f"modelled, so no layout can be called a fit{': ' + why if why else '.'} "
            "`memplan estimate` still gives the model states per GPU.",
            field="model",
        )
    # The same usable memory estimate's verdict uses: capacity - CUDA context (outside the
    # allocator) - plan.reserve; each layout's reserved segments are checked against it.
    budget = capacity - plain.timeline.cuda_context_bytes - p.reserve
    engines = search_engines(spec)
    if not engines:
        raise MemplanError(
            f"plan.engines {', '.join(p.engines)} has none that model.implementation "
            f"{spec.model.implementation} runs under (it runs under "
            f"{', '.join(IMPLEMENTATION_ENGINES[spec.model.implementation])}).",
            field="plan.engines",
        )
    search = _Search(
        engines=engines,
        carried=carried_knobs(spec),
        spec=spec,
        inventory=inventory,
        plan=p,
        gpus=gpus,
        global_batch=global_batch,
        budget=budget,
        activations_modelled=_activations_modelled(plain),
    )
    try:
        found = search.run(progress, first=first, workers=workers)
        layouts = (
            found
            if first
            else _checked_by_replay(
                spec,
                inventory,
                found,
                p,
                search.pruned,
                search.cache,
                workers=workers,
                pool=search.pool,
            )
        )
    except BaseException:
        if search.pool is not None:
            search.pool.close(clean=False)
        raise
    if search.pool is not None:
        search.pool.close()
    suggestion = ""
    if not layouts and suggest:
        from memplan.plan.suggest import what_would_fit  # it searches again with plan()

        suggestion = what_would_fit(
            spec, inventory, p, gpus, plain.per_gpu.total_bytes, budget, search.pruned
        )
    return PlanResult(
        gpus=gpus,
        global_batch_size=global_batch,
        budget_bytes=budget,
        capacity_bytes=capacity,
        layouts=tuple(layouts),
        searched=search.searched,
        pruned=dict(search.pruned.most_common()),
        suggestion=suggestion,
        top=p.top,
        notes=search_notes(spec, engines),
    )


def _checked_by_replay(
    spec: Spec,
    inventory: Inventory,
    layouts: list[Candidate],
    p: PlanSpec,
    pruned: Counter[str],
    cache: StepCache | None = None,
    workers: int = 1,
    pool: Pool | None = None,
) -> list[Candidate]:
    """`layouts` (fastest first) with the rows plan shows checked as `estimate` checks a spec:
    the step replayed through the caching allocator (memplan.step.replay) plus the terms
    outside it, against capacity - plan.reserve. The search itself uses the packing bound
    (timeline.usable_bytes: a replay per layout would cost milliseconds each), so a row near
    the limit can pass the search and fail the replay: it is dropped here and the next one
    checked, until `p.top` rows hold or none are left. Rows past those shown are unchecked.
    The rows still wanted are replayed together, on `workers` processes where they help;
    with the search's `pool`, by its workers (their caches warm), one row at a time to each
    idle one while the rows under way could still fall short of `p.top` (Pool.prefix):
    the same rows checked as one by one."""
    out: list[Candidate] = []
    if pool is not None and pool.started:
        checked = pool.prefix(layouts, lambda answer: answer[0], p.top)
        for c, (ok, missing) in zip(layouts[: len(checked)], checked, strict=True):
            if ok:
                out.append(replace(c, not_modelled=missing) if missing else c)
            else:
                pruned["does not fit: the replayed allocator (as estimate) exceeds the budget"] += 1
        return out + layouts[len(checked) :]
    shown = i = 0
    while shown < p.top and i < len(layouts):
        batch = layouts[i : i + p.top - shown]
        i += len(batch)

        def fits(c: Candidate) -> tuple[bool, tuple[str, ...]]:
            return _replay_fits(spec, inventory, c, p, cache)

        if workers_help(workers, len(batch), least=REPLAYS_WORTH_A_FORK):
            answers = ordered_map(fits, [[c] for c in batch], workers)
        else:
            answers = [fits(c) for c in batch]
        for c, (ok, missing) in zip(batch, answers, strict=True):
            if ok:
                out.append(replace(c, not_modelled=missing) if missing else c)
                shown += 1
            else:
                pruned["does not fit: the replayed allocator (as estimate) exceeds the budget"] += 1
    return out + layouts[i:]


REPLAYS_WORTH_A_FORK = 4
"""The fewest rows replayed on several processes: a replay of a large model's step takes
tens of milliseconds, a fork of the search a few."""


def _replay_fits(
    spec: Spec, inventory: Inventory, c: Candidate, p: PlanSpec, cache: StepCache | None = None
) -> tuple[bool, tuple[str, ...]]:
    """Whether row `c` fits as `estimate` judges its spec: the usable memory after the
    replayed allocator and the terms outside it covers plan.reserve; and the terms its
    figure leaves out (Report.not_modelled), which its fit is before. Only the stages plan
    views are worked out (assemble's every_stage=False: the dominated interior ones cannot
    be the most-loaded), then the most-loaded replayed as estimate replays it."""
    row = row_spec(spec, c)
    trained = finetune.apply(row, inventory)
    report = assemble_within(
        row, inventory, trained, model_states(row, trained), replay=True, cache=cache
    )
    assert report is not None  # no budget, nothing to prune
    headroom = report.usable_bytes
    return headroom is None or headroom >= p.reserve, report.not_modelled


def _degrees_of(par: ParallelismSpec) -> tuple[object, ...]:
    """What the search's layouts of one run of `_Search.layouts` share: the degrees."""
    return (par.tensor, par.pipeline, par.virtual_stages, par.context, par.expert)


def _tensor_of(run: Sequence[tuple[ParallelismSpec, str]]) -> int:
    """The tensor degree of a run of layouts: the runs of one tensor degree share the
    micro-batches' activations (keyed by the TP and CP slice, not the pipeline degree) and
    their stage inventories, so one worker searches them (memplan.plan.workers.homes)."""
    return run[0][0].tensor


def _activations_modelled(report: Report | Peak) -> bool:
    return report.activations.modelled
