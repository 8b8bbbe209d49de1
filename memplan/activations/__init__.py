"""Activations, tensor by tensor: what autograd saves for backward in one forward pass.

`predict(inventory, setting)` returns the saved tensors of the transformers 5.25 model the
inventory describes (the rules were read from 5.24, which differs only in Falcon's attention:
`Setting.transformers` picks), grouped in blocks (embeddings, decoder layers, head, loss), for
eager or SDPA attention, dropout on or off, any precision recipe (autocast included), activation
checkpointing none/full/selective, on CUDA or CPU kernels. Families without rules say so
(`Activations.modelled` is False) instead of guessing. With `model.implementation: torchtitan`
the saved tensors are those of torchtitan's own Llama 3/Qwen3 (memplan.model.stacks.torchtitan:
none, full, its per-op `selective-op` and every-Nth-layer `checkpoint_every`), never a profile
traced from transformers; with `model.implementation: litgpt` those of LitGPT's own GPT
(memplan.model.stacks.litgpt: none and full, one device or data parallelism; its LoRA and
QLoRA: memplan.model.stacks.litgpt_lora, litgpt_qlora); with
`megatron-core`, those of Megatron-Core's GPTModel (memplan.model.stacks.megatron: local or TE
layer spec, none / full / selective).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from functools import lru_cache

from memplan.activations import lora
from memplan.config.finetune import FinetuneSpec, bnb_keeps_input
from memplan.memo import IdentityMemo
from memplan.memory import Transient
from memplan.model import profile
from memplan.model.families import family_of, modelled_model_types
from memplan.model.forward import compiled
from memplan.model.forward.assemble import finish
from memplan.model.forward.tensors import (
    Activations,
    AttentionKind,
    Block,
    Checkpointing,
    Device,
    Saved,
    Setting,
    not_modelled,
)
from memplan.model.inventory import Architecture, Inventory
from memplan.states.layout import Layout
from memplan.states.parallel import chunk_layers

# memplan.activations.layout, .torchtitan_parallel and the stacks' rules (memplan.model.stacks)
# are imported in the functions below, where a spec needs them: a pipeline or model-parallel
# layout, another stack's model code (issue 21: `estimate` imports no work it does not do).


def predict(inventory: Inventory, setting: Setting) -> Activations:
    """The activations of one forward pass (and its loss) on one GPU; where a hand rule
    refuses the setting (`rule_refuses`), a profile traced for the config that serves it."""
    acts = _predict(inventory.architecture, setting, inventory.tied, inventory.profiles)
    arch = inventory.architecture
    if acts.modelled or arch is None or not rule_refuses(arch, setting):
        return acts
    traced = profile.serving(inventory.profiles, setting)
    if traced is None:
        return acts
    found = _from_profile(traced, arch, setting)
    why = acts.notes[0].removeprefix("activations not modelled: ")
    return replace(found, notes=(*found.notes, f"the hand rule does not cover this: {why}"))


def rule_refuses(arch: Architecture, setting: Setting) -> bool:
    """Whether the model's hand rule refuses `setting` (Gemma 3's sliding window shorter than
    the sequence under sdpa, ...): a profile traced for the config serves there instead
    (memplan.verify.trace.traced_profiles traces one; verify traces one now)."""
    if setting.implementation != "transformers" or setting.softmax_input:
        return False
    if _transformers_refuses(setting) or _unsupported(arch):
        return False
    family = family_of(arch.model_type)
    if family is None or isinstance(family.saved, str):
        return False
    return isinstance(family.saved(arch, setting, tied=False), str)


_ARCH_FIELDS = tuple(f.name for f in fields(Architecture) if f.name != "extra")
"""Architecture's fields but `extra` (a dict: `_predicted`'s key holds its items)."""

_PREDICTED: IdentityMemo[Activations] = IdentityMemo(1024)
"""`_predict` by value: the architecture's fields and setting, the tied pairs, and the
profiles by identity (plan's micro-batches ask again for the same local slice: 249 distinct
of 494 in the Llama-3.1-405B search)."""


def _predict(
    arch: Architecture | None,
    setting: Setting,
    tied: tuple[tuple[str, str], ...],
    profiles: tuple[profile.Profile, ...],
) -> Activations:
    """`predict` from what it reads of the inventory (its architecture, tied pairs and
    profiles: the slices `_micro_batch` predicts need no Inventory of their own), memoized
    by value where the architecture's extras hash."""
    if arch is None:
        return _predicted(arch, setting, tied, profiles)
    key = (tuple(getattr(arch, f) for f in _ARCH_FIELDS), tuple(arch.extra.items()), setting, tied)
    try:
        hash(key)
    except TypeError:  # an unhashable extra (a list): worked out every time
        return _predicted(arch, setting, tied, profiles)
    hit = _PREDICTED.get((profiles,), key)
    if hit is not None:
        return hit
    return _PREDICTED.put((profiles,), key, _predicted(arch, setting, tied, profiles))


def _predicted(
    arch: Architecture | None,
    setting: Setting,
    tied: tuple[tuple[str, str], ...],
    profiles: tuple[profile.Profile, ...],
) -> Activations:
    """`predict`, worked out."""
    if arch is None:
        return not_modelled(
            "activations not modelled: the model is a bare parameter count (give hf_config, "
            "a preset or an architecture)."
        )
    if setting.softmax_input:
        # torch before 1.11 (training.softmax_saves_input): only a trace keeps every softmax's
        # input (memplan.verify.trace.forward.SoftmaxInputs); the hand rules describe 2.13.
        traced = (
            profile.serving(profiles, setting) if setting.implementation == "transformers" else None
        )
        if traced is not None:
            return _from_profile(traced, arch, setting)
        return not_modelled(
            "training.softmax_saves_input: true (torch before 1.11) is modelled from a profile "
            "traced with it, for transformers' model code only: per_gpu.activations is 0 and the "
            "peak leaves them out." + _profile_hint(profiles)
        )
    if setting.implementation == "torchtitan":
        from memplan.model.stacks import torchtitan

        # torchtitan's own model code: its rule, never a profile traced from transformers;
        # torchao Float8's GEMM casts beside it (eager, no tensor parallelism).
        own = torchtitan.saved(arch, setting)
        if setting.float8 == "none":
            return own
        from memplan.activations import torchtitan_float8_gemm

        return torchtitan_float8_gemm.eager(own, arch, setting)
    if setting.implementation == "litgpt":
        from memplan.model.stacks import litgpt

        # LitGPT's own model code: its rule, never a profile traced from transformers.
        return litgpt.saved(arch, setting, tied=bool(tied))
    if setting.implementation == "megatron-core":
        from memplan.model.stacks import megatron

        # Megatron-Core's GPTModel: its rule, never a profile traced from transformers.
        return megatron.saved(arch, setting, setting.megatron_spec)
    why = _transformers_refuses(setting)
    if why:
        return not_modelled(why)
    family = family_of(arch.model_type)
    if family is None or isinstance(family.saved, str):
        traced = profile.serving(profiles, setting)
        if traced is not None:
            return _from_profile(traced, arch, setting)
        return not_modelled(
            f"activations of model_type {arch.model_type!r} are not modelled yet "
            f"(modelled: {', '.join(modelled_model_types())}): per_gpu.activations is 0 and "
            "the peak leaves them out." + _profile_hint(profiles)
        )
    why = _unsupported(arch)
    if why:
        # A head the rule does not cover (BertForSequenceClassification, ...): a profile traced
        # for this config and head serves instead.
        traced = profile.serving(profiles, setting)
        if traced is not None:
            return _from_profile(traced, arch, setting)
        return not_modelled(why + _profile_hint(profiles))
    model = family.saved(arch, setting, tied=bool(tied))
    if isinstance(model, str):
        return not_modelled(f"activations not modelled: {model}.")
    acts = finish(model, setting)
    if setting.compile:
        acts = compiled.apply(acts, arch, setting)
    return _held_mask(acts, setting)


def _held_mask(acts: Activations, st: Setting, kinds: tuple[str, ...] = ()) -> Activations:
    """`acts` with the eager mask torch.utils.checkpoint holds, saved by no node
    (memplan.activations.checkpoint_held: eager attention, full or selective recomputation;
    `kinds`: the layers' kinds in model order, where a profile records them)."""
    if st.attention != "eager" or st.checkpointing not in ("full", "selective"):
        return acts
    from memplan.activations import checkpoint_held

    return checkpoint_held.with_held_mask(acts, st, kinds)


def _transformers_refuses(st: Setting) -> str:
    """Why a transformers model's activations are not modelled at `st`'s checkpointing, or ''."""
    if st.checkpointing == "selective-op":
        return (
            "activations not modelled: activation_checkpointing selective-op is torchtitan's "
            "per-op SelectiveAC, which transformers does not apply (set model.implementation: "
            "torchtitan, or use selective or full)."
        )
    if st.checkpoint_every > 1:
        return (
            "activations not modelled: checkpoint_every > 1 is torchtitan's layer SAC; "
            "transformers' gradient_checkpointing_enable checkpoints every layer (set "
            "model.implementation: torchtitan, or checkpoint_every: 1)."
        )
    return ""


def _from_profile(traced: profile.Profile, arch: Architecture, st: Setting) -> Activations:
    """A traced profile's saved tensors at `st` (memplan.model.profile)."""
    acts = traced.activations(st, num_layers=arch.num_layers)
    order = {i: kind for kind, indices in traced.layer_groups for i in indices}
    kinds = tuple(order[i] for i in sorted(order))
    if not kinds:
        kinds = tuple(blk.kind for blk in traced.blocks if blk.kind)
    acts = _held_mask(acts, st, kinds)
    if st.compile:
        note = (
            "training.compile: profiles are traced eager; the compiled layers' saved set is "
            "modelled for Llama-style rules only: the eager profile is used."
        )
        acts = replace(acts, notes=(*acts.notes, note))
    return acts


def _profile_hint(profiles: tuple[profile.Profile, ...]) -> str:
    if profiles:
        have = ", ".join(p.key.file_stem() for p in profiles)
        return f" Profiles found for this config serve other settings: {have}."
    return (
        " With torch and transformers installed, `memplan estimate` and `plan` trace one "
        "themselves (`memplan profile SPEC` writes it; it says why when it cannot)."
    )


def source(inventory: Inventory, setting: Setting) -> tuple[str, profile.Profile | None]:
    """Where `predict`'s activations come from: "rule", "profile" (and which) or "none"."""
    arch = inventory.architecture
    if arch is None:
        return "none", None
    if setting.implementation != "transformers":
        return ("rule" if predict(inventory, setting).modelled else "none"), None
    family = family_of(arch.model_type)
    hand = family is not None and not isinstance(family.saved, str) and not _unsupported(arch)
    if hand and not setting.softmax_input:  # the hand rules describe torch 2.13's softmax
        if not rule_refuses(arch, setting):
            return "rule", None
    traced = profile.serving(inventory.profiles, setting)
    return ("profile", traced) if traced is not None else ("none", None)


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
        return lora.apply(ft, inventory, predict(inventory, st), st)
    if st.implementation == "torchtitan":
        from memplan.activations import torchtitan_parallel  # torchtitan's model code only

        return torchtitan_parallel.micro_batch(arch, st, lay)
    from memplan.activations import layout

    family = family_of(arch.model_type)
    no_rule = family is None or isinstance(family.saved, str) or bool(_unsupported(arch))
    traced_p = profile.serving(inventory.profiles, st) if no_rule else None
    if no_rule:
        from memplan.activations import traced  # models without a hand rule only
    if traced_p is not None and traced.expert_parallel_only(traced_p, lay):
        whole = lora.apply(ft, inventory, predict(inventory, st), st)
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
        return layout.refused(FINETUNE_PARALLEL)
    local_st = layout.local_setting(st, lay)
    if arch.num_experts:
        local_st = replace(
            local_st,
            expert_pairs=layout.expert_pairs(arch, local_st.tokens, lay),
            local_experts=arch.num_experts // lay.expert,
        )
    local_arch = layout.local_architecture(arch, lay)
    local = _predict(local_arch, local_st, inventory.tied, inventory.profiles)
    if not local.modelled:
        return local
    if lay.tensor > 1 and lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss:
        whole = _predict(
            replace(local_arch, vocab_size=arch.vocab_size),
            local_st,
            inventory.tied,
            inventory.profiles,
        )
        local = layout.whole_vocabulary_loss(local, whole)
    if lay.sequence_parallel:
        local = layout.split(predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=layout.buffers(arch, local_st, lay))


FINETUNE_PARALLEL = (
    "activations not modelled for fine-tuning under tensor, context or expert parallelism"
)


def _unsupported(arch: Architecture) -> str:
    """Why this architecture's forward is outside the rules, or ''."""
    cls = arch.extra.get("model_class")
    if profile.other_head(cls):
        return (
            f"activations not modelled for {cls}: memplan models causal-LM heads and their "
            "loss (or BERT's masked-LM head) only."
        )
    if arch.extra.get("add_cross_attention"):
        return "activations not modelled: cross-attention layers."
    return ""


__all__ = [
    "Activations",
    "AttentionKind",
    "Block",
    "Checkpointing",
    "Device",
    "Saved",
    "Setting",
    "for_stages",
    "micro_batch",
    "modelled_families",
    "on_rank",
    "predict",
]
