"""What one forward pass saves on one GPU, the whole model: `predict` (a family's hand rule, a
stack's own rule, or a profile traced from transformers' model code where no rule serves or
the rule refuses the setting) and `source`, where those activations come from. The layout's
slices and pipeline ranks are memplan.activations.per_gpu's."""

from __future__ import annotations

from dataclasses import fields, replace

from memplan.memo import IdentityMemo
from memplan.model import profile
from memplan.model.families import family_of, modelled_model_types
from memplan.model.forward import compiled
from memplan.model.forward.assemble import finish
from memplan.model.forward.tensors import Activations, Setting, not_modelled
from memplan.model.inventory import Architecture, Inventory


def predict(inventory: Inventory, setting: Setting) -> Activations:
    """The activations of one forward pass (and its loss) on one GPU; where a hand rule
    refuses the setting (`rule_refuses`), a profile traced for the config that serves it."""
    acts = predict_parts(inventory.architecture, setting, inventory.tied, inventory.profiles)
    arch = inventory.architecture
    if acts.modelled or arch is None or not rule_refuses(arch, setting):
        return acts
    traced = profile.serving(inventory.profiles, setting)
    if traced is None:
        return acts
    found = from_profile(traced, arch, setting)
    why = acts.notes[0].removeprefix("activations not modelled: ")
    return replace(found, notes=(*found.notes, f"the hand rule does not cover this: {why}"))


def rule_refuses(arch: Architecture, setting: Setting) -> bool:
    """Whether the model's hand rule refuses `setting` (Gemma 3's sliding window shorter than
    the sequence under sdpa, ...): a profile traced for the config serves there instead
    (memplan.verify.trace.traced_profiles traces one; verify traces one now)."""
    if setting.implementation != "transformers" or setting.softmax_input:
        return False
    if _transformers_refuses(setting) or unsupported(arch):
        return False
    family = family_of(arch.model_type)
    if family is None or isinstance(family.saved, str):
        return False
    return isinstance(family.saved(arch, setting, tied=False), str)


_ARCH_FIELDS = tuple(f.name for f in fields(Architecture) if f.name != "extra")
"""Architecture's fields but `extra` (a dict: `_predicted`'s key holds its items)."""

_PREDICTED: IdentityMemo[Activations] = IdentityMemo(1024)
"""`predict_parts` by value: the architecture's fields and setting, the tied pairs, and the
profiles by identity (plan's micro-batches ask again for the same local slice: 249 distinct
of 494 in the Llama-3.1-405B search)."""


def predict_parts(
    arch: Architecture | None,
    setting: Setting,
    tied: tuple[tuple[str, str], ...],
    profiles: tuple[profile.Profile, ...],
) -> Activations:
    """`predict` from what it reads of the inventory (its architecture, tied pairs and
    profiles: the slices `per_gpu.micro_batch` predicts need no Inventory of their own), memoized
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
            return from_profile(traced, arch, setting)
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
            return from_profile(traced, arch, setting)
        return not_modelled(
            f"activations of model_type {arch.model_type!r} are not modelled yet "
            f"(modelled: {', '.join(modelled_model_types())}): per_gpu.activations is 0 and "
            "the peak leaves them out." + _profile_hint(profiles)
        )
    why = unsupported(arch)
    if why:
        # A head the rule does not cover (BertForSequenceClassification, ...): a profile traced
        # for this config and head serves instead.
        traced = profile.serving(profiles, setting)
        if traced is not None:
            return from_profile(traced, arch, setting)
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


def from_profile(traced: profile.Profile, arch: Architecture, st: Setting) -> Activations:
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
    hand = family is not None and not isinstance(family.saved, str) and not unsupported(arch)
    if hand and not setting.softmax_input:  # the hand rules describe torch 2.13's softmax
        if not rule_refuses(arch, setting):
            return "rule", None
    traced = profile.serving(inventory.profiles, setting)
    return ("profile", traced) if traced is not None else ("none", None)


FINETUNE_PARALLEL = (
    "activations not modelled for fine-tuning under tensor, context or expert parallelism"
)


def unsupported(arch: Architecture) -> str:
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
