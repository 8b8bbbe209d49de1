"""Activations, tensor by tensor: what autograd saves for backward in one forward pass.

`predict(inventory, setting)` returns the saved tensors of the transformers 5.25 model the
inventory describes (the rules were read from 5.24, which differs only in Falcon's attention:
`Setting.transformers` picks), grouped in blocks (embeddings, decoder layers, head, loss), for
eager or SDPA attention, dropout on or off, any precision recipe (autocast included), activation
checkpointing none/full/selective, on CUDA or CPU kernels. Families without rules say so
(`Activations.modelled` is False) instead of guessing. With `model.implementation: torchtitan`
the saved tensors are those of torchtitan's own Llama 3 (memplan.model.stacks.torchtitan:
none, full, its per-op `selective-op` and every-Nth-layer `checkpoint_every`), never a profile
traced from transformers; with `model.implementation: litgpt` those of LitGPT's own GPT
(memplan.model.stacks.litgpt: none and full, one device or data parallelism; its LoRA:
memplan.model.stacks.litgpt_lora); with
`megatron-core`, those of Megatron-Core's GPTModel (memplan.model.stacks.megatron: local or TE
layer spec, none / full / selective).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from functools import lru_cache

from memplan.activations import lora
from memplan.config.finetune import FinetuneSpec
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
    """The activations of one forward pass (and its loss) on one GPU."""
    arch = inventory.architecture
    if arch is None:
        return not_modelled(
            "activations not modelled: the model is a bare parameter count (give hf_config, "
            "a preset or an architecture)."
        )
    if setting.implementation == "torchtitan":
        from memplan.model.stacks import torchtitan

        # torchtitan's own model code: its rule, never a profile traced from transformers.
        return torchtitan.saved(arch, setting)
    if setting.implementation == "litgpt":
        from memplan.model.stacks import litgpt

        # LitGPT's own model code: its rule, never a profile traced from transformers.
        return litgpt.saved(arch, setting)
    if setting.implementation == "megatron-core":
        from memplan.model.stacks import megatron

        # Megatron-Core's GPTModel: its rule, never a profile traced from transformers.
        return megatron.saved(arch, setting, setting.megatron_spec)
    why = _transformers_refuses(setting)
    if why:
        return not_modelled(why)
    family = family_of(arch.model_type)
    if family is None or isinstance(family.saved, str):
        traced = profile.serving(inventory.profiles, setting)
        if traced is not None:
            return _from_profile(traced, arch, setting)
        return not_modelled(
            f"activations of model_type {arch.model_type!r} are not modelled yet "
            f"(modelled: {', '.join(modelled_model_types())}): per_gpu.activations is 0 and "
            "the peak leaves them out." + _profile_hint(inventory.profiles)
        )
    why = _unsupported(arch)
    if why:
        # A head the rule does not cover (BertForSequenceClassification, ...): a profile traced
        # for this config and head serves instead.
        traced = profile.serving(inventory.profiles, setting)
        if traced is not None:
            return _from_profile(traced, arch, setting)
        return not_modelled(why + _profile_hint(inventory.profiles))
    model = family.saved(arch, setting, tied=bool(inventory.tied))
    if isinstance(model, str):
        return not_modelled(f"activations not modelled: {model}.")
    acts = finish(model, setting)
    if setting.compile:
        biased = any(
            t.name.endswith(".bias") and ".layers." in f".{t.name}" for t in inventory.parameters
        )
        acts = compiled.apply(acts, arch, setting, biased=biased)
    return acts


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
    if family is not None and not isinstance(family.saved, str) and not _unsupported(arch):
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
    checkpoints every N-th of its own blocks (memplan.activations.torchtitan_parallel.
    stage_every)."""
    arch = inventory.architecture
    if lay.pipeline == 1 or arch is None or not micro.modelled:
        return micro
    from memplan.activations import layout, torchtitan_parallel

    p = lay.pipeline
    every = chunk_layers(arch.num_layers, lay)
    mine = [c for c in range(len(every)) if lay.chunk_rank(c) == rank]
    kinds = None
    if any(b.name.startswith("layers.") for b in micro.blocks):
        if len(micro.layer_order) != arch.num_layers or checkpoint_every > 1:
            return layout.refused(
                "activations from a traced profile with several layer kinds are split over "
                "pipeline stages only where the profile records each kind's layers "
                "(re-trace it with this memplan: `memplan profile SPEC`), and not with "
                "training.checkpoint_every"
            )
        starts = [sum(every[:c]) for c in range(len(every))]
        kinds = tuple(Counter(micro.layer_order[starts[c] : starts[c] + every[c]]) for c in mine)
    alive = layout.in_flight(
        lay.schedule, p, lay.virtual_stages, rank, microbatches, runtime=lay.pipeline_runtime
    )
    source = layout.SRC_TORCH_SCHEDULE if lay.pipeline_runtime == "torch" else layout.SRC_SCHEDULE
    if checkpoint_every > 1:
        return torchtitan_parallel.stage_every(
            micro,
            chunk_layers=tuple(every[c] for c in mine),
            alive=alive,
            every=checkpoint_every,
            first=0 in mine,
            last=len(every) - 1 in mine,
            source=source,
        )
    return layout.stage(
        micro,
        chunk_layers=tuple(every[c] for c in mine),
        alive=alive,
        first=0 in mine,
        last=len(every) - 1 in mine,
        source=source,
        kinds=kinds,
    )


def micro_batch(inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec) -> Activations:
    """One micro-batch's activations on one GPU of the layout, every layer (the TP slice at
    sequence / CP, sequence parallelism applied), with the layout's communication buffers;
    on TP rank `lay.tensor_rank` (its vocabulary rows)."""
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
    return _micro_batch(inventory, st, lay.keep(*SAVED_FIELDS), ft)


@lru_cache(maxsize=256)
def _micro_batch(inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec) -> Activations:
    """`micro_batch`, cached by value (inventories hash by identity)."""
    arch = inventory.architecture
    if st.implementation == "litgpt" and ft.method != "full" and arch is not None:
        return _litgpt_lora(arch, st, ft)
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
        return _megatron(inventory, st, lay, ft)
    if (lay.tensor == 1 and lay.context == 1 and lay.expert == 1) or arch is None:
        return lora.apply(ft, inventory, predict(inventory, st), st)
    from memplan.activations import layout, torchtitan_parallel

    if st.implementation == "torchtitan":
        return torchtitan_parallel.micro_batch(arch, st, lay)
    family = family_of(arch.model_type)
    no_rule = family is None or isinstance(family.saved, str) or bool(_unsupported(arch))
    traced = profile.serving(inventory.profiles, st) if no_rule else None
    if traced is not None and _expert_parallel_only(traced, lay):
        whole = lora.apply(ft, inventory, predict(inventory, st), st)
        return replace(
            whole,
            buffers=layout.buffers(arch, st, lay),
            notes=(*whole.notes, EP_OVER_PROFILE),
        )
    if no_rule and (lay.tensor > 1 or lay.context > 1):
        return _tensor_parallel_profile(inventory, arch, st, lay, ft)
    if traced is not None:
        return layout.refused(EP_REFUSED)
    why = layout.check(arch, st, lay)
    if why:
        return layout.refused(why)
    if ft.method != "full" or ft.freeze:
        return layout.refused(
            "activations not modelled for fine-tuning under tensor, context or expert parallelism"
        )
    local_st = layout.local_setting(st, lay)
    if arch.num_experts:
        local_st = replace(
            local_st,
            expert_pairs=layout.expert_pairs(arch, local_st.tokens, lay),
            local_experts=arch.num_experts // lay.expert,
        )
    local_arch = layout.local_architecture(arch, lay)
    local = predict(replace(inventory, architecture=local_arch), local_st)
    if not local.modelled:
        return local
    if lay.tensor > 1 and lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss:
        whole = predict(
            replace(inventory, architecture=replace(local_arch, vocab_size=arch.vocab_size)),
            local_st,
        )
        local = layout.whole_vocabulary_loss(local, whole)
    if lay.sequence_parallel:
        local = layout.split(predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=layout.buffers(arch, local_st, lay))


def _litgpt_lora(arch: Architecture, st: Setting, ft: FinetuneSpec) -> Activations:
    """LitGPT's LoRA (memplan.model.stacks.litgpt_lora): litgpt 0.5.9's finetune/lora.py,
    whose options are lora.py::Config's flags; what they cannot say is refused."""
    from memplan.model.stacks import litgpt, litgpt_lora

    why = ""
    if ft.method == "qlora":
        why = (
            "qlora under LitGPT (finetune/lora.py --quantize bnb.nf4: Lightning's "
            "BitsandbytesPrecision quantizes every Linear, the head included, and litgpt "
            "0.5.9 swaps the embedding for bitsandbytes' StableEmbedding) is not modelled: "
            "Lightning quantizes on CUDA only (lightning 2.6 fabric/plugins/precision/"
            "bitsandbytes.py::_Linear4bit.quantize raises on any other device), so no rule "
            "is proved for it"
        )
    elif ft.freeze or ft.modules_to_save or ft.exclude_modules or ft.bias != "none":
        why = (
            "LitGPT's LoRA trains the adapters only (lora.py::mark_only_lora_as_trainable, "
            "bias 'none' as finetune/lora.py calls it): finetune.freeze, modules_to_save, "
            "exclude_modules and bias are not LitGPT options"
        )
    flags = litgpt_lora.flags_of(ft.target_modules, rank=ft.rank, dropout=ft.dropout)
    if not why and isinstance(flags, str):
        why = flags
    if why or isinstance(flags, str):
        return litgpt.refused(f"activations not modelled: {why}.")
    return litgpt_lora.saved(arch, st, flags)


def _megatron(inventory: Inventory, st: Setting, lay: Layout, ft: FinetuneSpec) -> Activations:
    """Megatron-Core's GPTModel on one GPU (memplan.model.stacks.megatron) for full training, at
    EP = 1: one TP and CP rank's slice (with or without sequence parallelism); pipeline stages
    split its layers as any other."""
    from memplan.activations import layout
    from memplan.model.stacks import megatron

    why = ""
    if ft.method != "full" or ft.freeze:
        why = (
            "activations of Megatron-Core's model code are not modelled for LoRA, QLoRA or "
            "frozen parameters"
        )
    elif lay.expert > 1:
        why = (
            "activations of Megatron-Core's model code are modelled at expert = 1 (memplan's "
            "Megatron-Core rule is a dense Llama-like GPTModel)"
        )
    elif lay.context > 1 and st.megatron_spec == "local":
        why = (
            "Megatron-Core's local spec runs no context parallelism (its attention refuses it: "
            f"{megatron.SRC_NO_CP_LOCAL}): set model.megatron_spec: te"
        )
    elif lay.tensor > 1 and lay.sequence_parallel and st.megatron_spec == "local":
        why = (
            "Megatron-Core's local spec runs no sequence parallelism (its torch norms refuse "
            f"it: {megatron.SRC_NO_SP_LOCAL}): set sequence_parallel: false or "
            "model.megatron_spec: te"
        )
    arch = inventory.architecture
    if not why and lay.tensor > 1 and arch is not None:
        why = layout.check(arch, st, lay)
    if why:
        return replace(
            layout.refused(why), implementation="megatron-core", megatron_spec=st.megatron_spec
        )
    if (lay.tensor == 1 and lay.context == 1) or arch is None:
        return predict(inventory, st)
    # Megatron's TP (memplan.model.stacks.megatron: the rule at one TP rank's heads,
    # intermediate size and vocabulary rows), sequence parallelism splitting what TP leaves
    # whole (its linears save their sequence shard and gather it again in backward), CP
    # running sequence / CP tokens through TE's ring attention.
    local_st = layout.local_setting(st, lay)
    local_arch = layout.local_architecture(arch, lay)
    local = predict(replace(inventory, architecture=local_arch), local_st)
    if not local.modelled:
        return local
    extra = {}
    if lay.tensor > 1:
        extra["embeddings"] = (megatron.tensor_parallel_embedding(local_st),)
    blocks = tuple(
        replace(b, tensors=(*b.tensors, *extra[b.name])) if b.name in extra else b
        for b in local.blocks
    )
    if lay.context > 1:
        blocks = tuple(
            megatron.te_context_parallel(b, local_st, local_arch, lay.context)
            if b.name == "layers"
            else b
            for b in blocks
        )
    local = replace(local, blocks=blocks)
    if lay.sequence_parallel:
        local = layout.split(predict(inventory, local_st), local, local_st, lay)
    return replace(local, buffers=(*local.buffers, *layout.buffers(arch, local_st, lay)))


def _tensor_parallel_profile(
    inventory: Inventory, arch: Architecture, st: Setting, lay: Layout, ft: FinetuneSpec
) -> Activations:
    """A model without a hand rule on one TP and CP rank, as the hand rules do it: the
    profile traced for the rank's slice (memplan.verify.trace.tp.local_config, the profile's
    `tensor` and `vocab_rows`; the whole model's at TP 1) at sequence / CP (layout.
    local_setting: ring attention saves the SDPA's tensors at the local length), the whole
    vocabulary's head and loss from the TP-1 profile without loss_parallel under DTensor,
    sequence parallelism splitting what the slice leaves as wide as the TP-1 profile
    (memplan.activations.layout.split_traced), and the layout's communication buffers. With
    EP > 1 as over a TP-1 profile (EP_OVER_PROFILE: dropless routing, grouped_mm experts whose
    saved tensors hold per rank)."""
    from memplan.activations import layout

    rows = layout.local_architecture(arch, lay).vocab_size if lay.tensor > 1 else 0
    local_p = profile.serving(inventory.profiles, st, tensor=lay.tensor, vocab_rows=rows)
    whole_p = profile.serving(inventory.profiles, st)
    if local_p is None:
        return layout.refused(
            f"activations from a traced profile under tensor parallelism need the profile of "
            f"one TP rank's slice (tensor {lay.tensor}, {rows} vocabulary rows), not traced: "
            "with torch and transformers installed `memplan estimate` and `plan` trace it"
        )
    why = layout.check(arch, st, lay)
    if why:
        return layout.refused(why)
    if ft.method != "full" or ft.freeze:
        return layout.refused(
            "activations not modelled for fine-tuning under tensor, context or expert parallelism"
        )
    needs_whole = lay.sequence_parallel or (
        lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss
    )
    if needs_whole and whole_p is None:
        return layout.refused(
            "activations from a traced profile under sequence parallelism or without "
            "loss_parallel need the whole model's profile beside the TP slice's, not traced"
        )
    if lay.sequence_parallel and arch.num_experts and lay.gathered_inputs:
        # A single-device trace lists a storage once, under its first saver: where the router
        # and a shared expert's column-parallel linear both save the layer's input (Qwen2-MoE),
        # DTensor SP keeps the router's shard and the linear's gathered copy, which the trace
        # cannot tell apart (measured: the shared expert's gate_proj input whole, 3,072 B per
        # layer above the hand rule, tiny Qwen2-MoE, TP 2, 2 x 32 tokens; Mixtral, without a
        # shared expert, agrees; Megatron SP gathers no inputs and agrees for both).
        return layout.refused(
            "activations from a traced profile of a MoE model are not split for DTensor "
            "sequence parallelism (engines fsdp2, ddp) yet: set sequence_parallel: false, or "
            "engine megatron or deepspeed"
        )
    if lay.expert > 1 and not (
        lay.expert_capacity_factor is None and local_p.experts == "grouped_mm"
    ):
        return layout.refused(EP_REFUSED)
    if local_p.head != "lm":
        return layout.refused(
            f"activations of a {local_p.head} head from a traced profile are not split for "
            "tensor parallelism (memplan slices language-model heads only)"
        )
    st = layout.local_setting(st, lay)  # CP: one rank's sequence / CP tokens, as the rules
    local = _from_profile(local_p, arch, st)
    full = _from_profile(whole_p, arch, st) if whole_p is not None else local
    if lay.tensor_impl == "dtensor" and not lay.vocab_parallel_loss:
        # The head (final norm, the LM head's input) and the loss are as wide as the hidden
        # size and the vocabulary, never the sliced heads or MLP: the TP-1 profile's are the
        # slice's with the whole vocabulary (the rule's `whole`; tests/test_profile_tp.py).
        local = layout.whole_vocabulary_loss(local, full)
    if lay.sequence_parallel:
        local = layout.split_traced(full, local, st, lay, local_p.token_major())
    notes = (EP_OVER_PROFILE,) if lay.expert > 1 else ()
    return replace(local, buffers=layout.buffers(arch, st, lay), notes=(*local.notes, *notes))


EP_REFUSED = (
    "activations from a traced profile are split over experts with dropless routing of "
    "transformers' grouped_mm experts only (no expert_capacity_factor)"
)
EP_OVER_PROFILE = (
    "expert parallelism over a traced profile: on balanced dropless routing a rank's experts "
    "receive top_k x tokens (token, expert) pairs, the rows the traced grouped_mm experts save "
    "whatever the routing, so the profile's tensors hold per rank (memplan.activations.layout."
    "expert_pairs); tensors sized by the expert count (the grouped GEMM's [E] offsets) are "
    "counted whole."
)


def _expert_parallel_only(traced: profile.Profile, lay: Layout) -> bool:
    """A profile serves a layout split only over experts, with dropless routing, when its
    experts ran transformers' grouped_mm (sizes independent of the routing)."""
    return (
        lay.expert > 1
        and lay.tensor == 1
        and lay.context == 1
        and lay.expert_capacity_factor is None
        and traced.experts == "grouped_mm"
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
