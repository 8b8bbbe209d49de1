"""One GPU of a layout: one micro-batch's activations on a tensor / context / expert parallel
rank (`micro_batch`: the layout's slice of the model, sequence parallelism, the layout's
communication buffers; LoRA and the stacks' own code), and a pipeline rank's at its peak
(`on_rank`, `for_stages`: its chunks' layers times the micro-batches its schedule keeps in
flight). What the whole model saves on one GPU is memplan.activations.saved's.

memplan.activations.layout, .torchtitan_parallel and the stacks' rules (memplan.model.stacks)
are imported in the functions below, where a spec needs them: a pipeline or model-parallel
layout, another stack's model code (issue 21: `estimate` imports no work it does not do)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.activations import lora, saved
from memplan.config.finetune import FinetuneSpec, bnb_keeps_input
from memplan.memo import IdentityMemo
from memplan.memory import Transient
from memplan.model import profile
from memplan.model.families import family_of
from memplan.model.forward.tensors import Activations, Setting
from memplan.model.inventory import Architecture, Inventory
from memplan.states.layout import Layout
from memplan.states.parallel import chunk_layers

# The Layout fields that change what one micro-batch saves on one GPU (`micro_batch`'s cache
# key: plan's layouts share few).
SAVED_FIELDS = (
    "tensor",
    "tensor_impl",
    "sequence_parallel",
    "context",
    "expert",
    "expert_capacity_factor",
    "make_vocab_size_divisible_by",
    "tensor_rank",
    "vocab_parallel_loss",
)


def for_stages(
    inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec, microbatches: int
) -> tuple[Activations, ...]:
    """The activations of one GPU of each pipeline rank of `lay`, at that rank's peak, with
    `microbatches` micro-batches per step (memplan.activations.layout)."""
    micro = micro_batch(inventory, st, lay, ft)
    return tuple(
        on_rank(inventory, micro, lay, r, microbatches, checkpoint_every=st.checkpoint_every)
        for r in range(lay.pipeline)
    )


def on_rank(
    inventory: Inventory,
    micro: Activations,
    lay: Layout,
    rank: int,
    microbatches: int,
    *,
    checkpoint_every: int = 1,
) -> Activations:
    """Pipeline rank `rank`'s activations from one micro-batch's (`micro_batch`): its model
    chunks' layers, times the micro-batches its schedule keeps in flight. With
    `checkpoint_every` > 1 (training.checkpoint_every: torchtitan's layer SAC) the rank
    checkpoints every N-th of its own blocks (memplan.activations.torchtitan_pipeline.
    stage_every)."""
    arch = inventory.architecture
    if lay.pipeline == 1 or arch is None or not micro.modelled:
        return micro
    # What `_on_rank` reads (the schedule's runtime, not the engine): plan's layouts of
    # several engines and ZeRO stages share it.
    key = (
        arch.num_layers,
        lay.pipeline,
        lay.schedule,
        lay.virtual_stages,
        lay.layers_per_stage,
        lay.pipeline_runtime,
        rank,
        microbatches,
        checkpoint_every,
    )
    hit = _ON_RANK.get((micro,), key)
    if hit is not None:
        return hit
    return _ON_RANK.put(
        (micro,), key, _on_rank(arch, micro, lay, rank, microbatches, checkpoint_every)
    )


_ON_RANK: IdentityMemo[Activations] = IdentityMemo(4096)


def _on_rank(
    arch: Architecture,
    micro: Activations,
    lay: Layout,
    rank: int,
    microbatches: int,
    checkpoint_every: int,
) -> Activations:
    """`on_rank` of a pipeline layout, worked out."""
    from memplan.activations import pipeline

    chunks = _rank_chunks(arch.num_layers, lay, rank)
    every, mine = chunks.every, chunks.mine
    kinds = None
    if any(b.name.startswith("layers.") for b in micro.blocks):
        if len(micro.layer_order) != arch.num_layers or checkpoint_every > 1:
            from memplan.activations import layout

            return layout.refused(
                "activations from a traced profile with several layer kinds are split over "
                "pipeline stages only where the profile records each kind's layers "
                "(re-trace it with this memplan: `memplan profile SPEC`), and not with "
                "training.checkpoint_every"
            )
        starts = [sum(every[:c]) for c in range(len(every))]
        kinds = tuple(Counter(micro.layer_order[starts[c] : starts[c] + every[c]]) for c in mine)
    torch = lay.pipeline_runtime == "torch"
    alive = pipeline.in_flight(
        lay.schedule,
        lay.pipeline,
        lay.virtual_stages,
        rank,
        microbatches,
        runtime=lay.pipeline_runtime,
    )
    source = pipeline.SRC_TORCH_SCHEDULE if torch else pipeline.SRC_SCHEDULE
    if checkpoint_every > 1:
        from memplan.activations import torchtitan_pipeline  # torchtitan's layer SAC only

        return torchtitan_pipeline.stage_every(
            micro,
            chunk_layers=chunks.layers,
            alive=alive,
            every=checkpoint_every,
            first=chunks.first,
            last=chunks.last,
            source=source,
        )
    # Under torch's runtime the stages' receive and output buffers join the rank's buffers
    # (in the same replace as its blocks).
    buffers = (
        _torch_stage_buffers(micro.hidden_bytes, chunks.ends, alive, microbatches) if torch else ()
    )
    return pipeline.stage(
        micro,
        chunk_layers=chunks.layers,
        alive=alive,
        first=chunks.first,
        last=chunks.last,
        source=source,
        kinds=kinds,
        buffers=buffers,
    )


@dataclass(frozen=True, slots=True)
class _Chunks:
    """Which model chunks one pipeline rank runs (`_rank_chunks`)."""

    every: tuple[int, ...]
    """Layers of every chunk, in model order (memplan.states.parallel.chunk_layers)."""
    mine: tuple[int, ...]
    """The rank's chunks."""
    layers: tuple[int, ...]
    """Layers of each of the rank's chunks."""
    first: bool
    """Whether it runs the first chunk (the embeddings)."""
    last: bool
    """Whether it runs the last chunk (the head and loss)."""
    ends: tuple[tuple[bool, bool], ...]
    """(first, last) of each of its chunks."""


_CHUNKS: IdentityMemo[_Chunks] = IdentityMemo(1024)
"""`_rank_chunks` by its layout's fields (plan's micro-batches ask again for each layout)."""


def _rank_chunks(num_layers: int, lay: Layout, rank: int) -> _Chunks:
    """The chunks pipeline rank `rank` of `lay` runs: Layout.chunk_rank's, every chunk's
    layers by chunk_layers (its errors raised)."""
    key = (num_layers, lay.pipeline, lay.schedule, lay.virtual_stages, lay.layers_per_stage, rank)
    hit = _CHUNKS.get((), key)
    if hit is not None:
        return hit
    every = tuple(chunk_layers(num_layers, lay))
    mine = (
        tuple(c for c in range(len(every)) if lay.chunk_rank(c) == rank)
        if lay.schedule == "zbv"
        else tuple(range(rank, len(every), lay.pipeline))  # Layout.chunk_rank: chunk % P
    )
    return _CHUNKS.put(
        (),
        key,
        _Chunks(
            every=every,
            mine=mine,
            layers=tuple(every[c] for c in mine),
            first=0 in mine,
            last=len(every) - 1 in mine,
            ends=tuple((c == 0, c == len(every) - 1) for c in mine),
        ),
    )


@lru_cache(maxsize=4096)
def _torch_stage_buffers(
    hidden: int, stages: tuple[tuple[bool, bool], ...], alive: tuple[int, ...], m: int
) -> tuple[Transient, ...]:
    """memplan.activations.pipeline.torch_stage_buffers, cached by value: a rank's buffers
    do not depend on what its layers save (plan's recomputation policies and compile flags
    of one micro-batch ask again)."""
    from memplan.activations import pipeline

    return pipeline.torch_stage_buffers(hidden, stages=stages, alive=alive, m=m)


def micro_batch(
    inventory: Inventory,
    st: Setting,
    lay: Layout,
    ft: FinetuneSpec,
    *,
    kept: Layout | None = None,
) -> Activations:
    """One micro-batch's activations on one GPU of the layout, every layer (the TP slice at
    sequence / CP, sequence parallelism applied), with the layout's communication buffers;
    on TP rank `lay.tensor_rank` (its vocabulary rows). `kept`: `lay.keep(*SAVED_FIELDS)`,
    when already made (plan asks again for every micro-batch of a layout)."""
    if st.implementation == "litgpt" and (
        lay.tensor > 1 or lay.context > 1 or lay.expert > 1 or lay.pipeline > 1
    ):
        from memplan.activations import layout

        # litgpt 0.5.9's training scripts shard with FSDP (data parallelism) only.
        return replace(
            layout.refused(
                "activations of LitGPT's model code are modelled for one device or data "
                "parallelism only (LitGPT's training scripts have no tensor, context, expert "
                "or pipeline parallelism)"
            ),
            implementation="litgpt",
        )
    return _micro_batch(inventory, st, lay.keep(*SAVED_FIELDS) if kept is None else kept, ft)


@lru_cache(maxsize=256)
def _micro_batch(inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec) -> Activations:
    """`micro_batch`, cached by value (inventories hash by identity)."""
    arch = inventory.architecture
    if st.implementation == "litgpt" and ft.method != "full" and arch is not None:
        from memplan.activations import stacks

        return stacks.litgpt_lora(arch, st, ft)
    if ft.method == "qlora" and bnb_keeps_input(ft):
        from memplan.activations import layout

        return replace(
            layout.refused(
                f"finetune.bnb_version {ft.bnb_version}: a bitsandbytes before 0.43.2 keeps "
                "every 4-bit matmul's input for backward, modelled under model.implementation "
                "litgpt only (memplan.model.stacks.litgpt_lora)"
            ),
            implementation=st.implementation,
        )
    if st.implementation != "transformers" and (ft.method != "full" or ft.freeze):
        from memplan.activations import layout

        who = "torchtitan's" if st.implementation == "torchtitan" else "LitGPT's"
        return replace(
            layout.refused(
                f"activations of {who} model code are not modelled for LoRA, QLoRA or "
                "frozen parameters (memplan's fine-tuning rules follow transformers' and peft's "
                "module names)"
            ),
            implementation=st.implementation,
        )
    if st.implementation == "megatron-core":
        from memplan.activations import stacks

        return stacks.megatron_core(inventory, st, lay, ft)
    if (lay.tensor == 1 and lay.context == 1 and lay.expert == 1) or arch is None:
        return lora.apply(ft, inventory, saved.predict(inventory, st), st)
    if st.implementation == "torchtitan":
        from memplan.activations import torchtitan_parallel  # torchtitan's model code only

        return torchtitan_parallel.micro_batch(arch, st, lay)
    from memplan.activations import layout

    family = family_of(arch.model_type)
    no_rule = family is None or isinstance(family.saved, str) or bool(saved.unsupported(arch))
    traced_p = profile.serving(inventory.profiles, st) if no_rule else None
    if no_rule:
        from memplan.activations import traced  # models without a hand rule only
    if traced_p is not None and traced.expert_parallel_only(traced_p, lay):
        whole = lora.apply(ft, inventory, saved.predict(inventory, st), st)
        return replace(
            whole,
            buffers=layout.buffers(arch, st, lay),
            notes=(*whole.notes, traced.EP_OVER_PROFILE),
        )
    if no_rule and (lay.tensor > 1 or lay.context > 1):
        return traced.tensor_parallel_profile(inventory, arch, st, lay, ft)
    if traced_p is not None:
        return layout.refused(traced.EP_REFUSED)
    why = layout.check(arch, st, lay)
    if why:
        return layout.refused(why)
    if ft.method != "full" or ft.freeze:
        return layout.refused(saved.FINETUNE_PARALLEL)
    local_st = layout.local_setting(st, lay)
    if arch.num_experts:
        local_st = replace(
            local_st,
            expert_pairs=layout.expert_pairs(arch, local_st.tokens, lay),
            local_experts=arch.num_experts // lay.expert,
        )
    local_arch = layout.local_architecture(arch, lay)
    local = saved.predict_parts(local_arch, local_st, inventory.tied, inventory.profiles)
    if not local.modelled:
        return local
    if lay.tensor > 1 and lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss:
        whole = saved.predict_parts(
            replace(local_arch, vocab_size=arch.vocab_size),
            local_st,
            inventory.tied,
            inventory.profiles,
        )
        local = layout.whole_vocabulary_loss(local, whole)
    if lay.sequence_parallel:
        local = layout.split(saved.predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=layout.buffers(arch, local_st, lay))
