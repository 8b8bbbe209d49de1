"""The layouts a plan searches: every (tensor, pipeline, virtual stages, context, expert)
degree whose product with the data degree is the GPU count, each engine, ZeRO stage,
pipeline schedule and offload that runs it, as a spec's `parallelism`; what cannot run is
counted in `pruned` with its reason (memplan.plan.search evaluates the rest)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from memplan.config.parallelism import OffloadSpec, ParallelismSpec
from memplan.config.plan import PlanSpec
from memplan.config.spec import Spec
from memplan.model.inventory import Inventory
from memplan.optimizers import FSDP2_REFUSED_OPTIMIZERS
from memplan.plan.space import (
    ENGINE_STAGES,
    TORCH_PIPELINE_ENGINES,
    divisors,
    layout_spec,
    pipeline_split,
)


def offload_spec(engine: str, where: str) -> OffloadSpec:
    """A searched layout's `parallelism.offload` for the offload column `where` (none, cpu):
    the optimizer (DeepSpeed's offload_optimizer, FSDP2's CPUOffloadPolicy, which moves
    parameters, gradients and optimizer states together); under FSDP1 the parameters too, its
    only switch (torch 2.13 torch/distributed/fsdp/api.py::CPUOffload(offload_params=True):
    the sharded parameters and gradients on the host, where the optimizer steps them)."""
    if engine == "fsdp1" and where != "none":
        return OffloadSpec(optimizer=where, parameters=where)
    return OffloadSpec(optimizer=where)


@dataclass(slots=True, kw_only=True)
class LayoutSpace:
    """The layouts of `gpus` GPUs a plan of `spec` searches (`layouts`)."""

    spec: Spec
    inventory: Inventory
    plan: PlanSpec
    gpus: int
    global_batch: int
    pruned: Counter[str] = field(default_factory=Counter)
    """Why each layout left out was left out, counted."""
    engines: tuple[str, ...] = ()
    """The engines searched (search_engines: plan.engines the implementation runs under)."""
    carried: dict[str, object] = field(default_factory=dict)
    """The spec's own parallelism keys kept on the layouts they apply to (carried_knobs)."""

    def degrees(self) -> Iterator[tuple[int, int, int, int, int, tuple[int, ...] | None]]:
        """(tensor, pipeline, virtual stages, context, expert, layers_per_stage (one entry per
        model chunk, None when even)) whose degrees multiply to the GPUs."""
        arch = self.inventory.architecture
        assert arch is not None
        gpn = self.spec.hardware.gpus_per_node
        max_tp = self.plan.max_tensor or gpn
        for tp in divisors(self.gpus):
            if self.plan.tensor is not None and tp != self.plan.tensor:
                continue
            if tp > max_tp:
                self.pruned["tensor degree above max_tensor (TP stays inside a node)"] += 1
                continue
            heads = (arch.num_attention_heads, arch.num_key_value_heads)
            if any(h % tp for h in heads if h):
                self.pruned["attention heads not divisible by tensor"] += 1
                continue
            for pp in divisors(self.gpus // tp):
                if pp > (self.plan.max_pipeline or arch.num_layers):
                    self.pruned["pipeline degree above max_pipeline"] += 1
                    continue
                for vp in self._virtual(pp):
                    split = pipeline_split(arch.num_layers, pp * vp)
                    if split is None:
                        self.pruned["layers not divisible by pipeline"] += 1
                        continue
                    yield from self._context_expert(tp, pp, vp, split)

    @staticmethod
    def _schedules(engine: str, vp: int) -> tuple[str, ...]:
        """The pipeline schedules of `vp` model chunks per rank under `engine`: 1F1B for one,
        interleaved for more; two chunks under torch's runtime (ddp, fsdp2) also run torch's
        ScheduleZBVZeroBubble (its V: exactly two stages per rank)."""
        if vp == 1:
            return ("1f1b",)
        if vp == 2 and engine in TORCH_PIPELINE_ENGINES:
            return ("interleaved", "zbv")
        return ("interleaved",)

    def _virtual(self, pp: int) -> list[int]:
        """Model chunks per pipeline rank to try: 1, and the interleaved schedules' 2, 4, ...
        up to plan.max_virtual_stages (Megatron's, and torch's ScheduleInterleaved1F1B under
        fsdp2 and ddp)."""
        if pp == 1 or self.plan.max_virtual_stages < 2:
            return [1]
        out, v = [1], 2
        while v <= self.plan.max_virtual_stages:
            out.append(v)
            v *= 2
        return out

    def _context_expert(
        self, tp: int, pp: int, vp: int, split: tuple[int, ...]
    ) -> Iterator[tuple[int, int, int, int, int, tuple[int, ...] | None]]:
        arch = self.inventory.architecture
        assert arch is not None
        for cp in divisors(self.gpus // (tp * pp)):
            if cp > self.plan.max_context:
                continue
            if cp > 1 and self.spec.training.sequence_length % (2 * cp):
                self.pruned["sequence not divisible by 2 x context"] += 1
                continue
            if tp > 1 and (self.spec.training.sequence_length // cp) % tp:
                self.pruned["sequence not divisible by tensor (sequence parallel)"] += 1
                continue
            dp = self.gpus // (tp * pp * cp)
            if self.global_batch % dp:
                self.pruned["global batch not divisible by data degree"] += 1
                continue
            experts = [1]
            if arch.num_experts:
                # The ranks EP is carved from, as memplan.states.layout.Layout.expert_data
                # takes them: torchtitan's EP borrows data x context x tensor (efsdp =
                # dp_shard x cp x tp / ep: torchtitan 0.3.0 parallel_dims.py), the other
                # stacks data x context (Megatron's expert-data group spans the context ranks:
                # megatron/core/parallel_state.py::initialize_model_parallel).
                pool = dp * cp * tp if self.spec.model.implementation == "torchtitan" else dp * cp
                experts = [e for e in divisors(pool) if arch.num_experts % e == 0]
            for ep in experts:
                even = len(set(split)) == 1
                yield tp, pp, vp, cp, ep, None if even else split

    @property
    def _mixed_accumulation(self) -> bool:
        recipe = self.spec.recipe()
        return bool(recipe.gradient_accumulation) and (
            recipe.gradient_accumulation != recipe.parameters
        )

    def layouts(self) -> Iterator[tuple[ParallelismSpec, str]]:
        offloads = ("none", "cpu") if self.plan.allow_offload else ("none",)
        for tp, pp, vp, cp, ep, split in self.degrees():
            dp = self.gpus // (tp * pp * cp)
            for engine in self.engines:
                if engine == "ddp" and (tp > 1 or pp > 1 or ep > 1 or cp > 1):
                    self.pruned["ddp has no tensor/pipeline/expert/context parallelism"] += 1
                    continue
                if vp > 1 and engine == "deepspeed":
                    continue  # DeepSpeed's pipeline engine has no interleaved schedule
                if engine == "fsdp2" and self.spec.optimizer.name in FSDP2_REFUSED_OPTIMIZERS:
                    self.pruned["optimizer does not run on FSDP2's DTensor parameters"] += 1
                    continue
                for stage in ENGINE_STAGES[engine]:
                    if engine == "deepspeed" and cp > 1:
                        # deepspeed/sequence/layer.py::DistributedAttention (0.19.8): DeepSpeed's
                        # sequence parallelism is Ulysses all-to-all, not the ring steptime models.
                        self.pruned["DeepSpeed has no ring context parallelism"] += 1
                        break
                    if engine == "deepspeed" and stage == 0 and self._mixed_accumulation:
                        # engine.py::_do_optimizer_sanity_check (0.19.8): NotImplementedError.
                        self.pruned["DeepSpeed ZeRO-0 cannot accumulate in another dtype"] += 1
                        continue
                    if engine == "deepspeed" and pp > 1 and stage >= 2:
                        self.pruned["DeepSpeed ZeRO-2/3 does not run with pipeline"] += 1
                        continue
                    for offload, schedule in (
                        (o, s) for o in offloads for s in self._schedules(engine, vp)
                    ):
                        if offload != "none" and engine in ("ddp", "megatron"):
                            continue
                        base = {
                            "engine": engine,
                            "data": dp,
                            "zero_stage": stage,
                            "tensor": tp,
                            "pipeline": pp,
                            "context": cp,
                            "expert": ep,
                            "layers_per_stage": split,
                            "schedule": schedule,
                            "virtual_stages": vp,
                            "sequence_parallel": tp > 1,
                            "offload": offload_spec(engine, offload),
                        }
                        par = layout_spec(base, self.carried)
                        if isinstance(par, str):
                            self.pruned[par] += 1
                            continue
                        yield par, offload
