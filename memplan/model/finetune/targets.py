"""Which modules peft wraps: its default target_modules per family, its matching rules for
`target_modules` / `exclude_modules` / `modules_to_save`, the MoE conversion it applies to fused
experts, and the parameter targets of its ParamWrapper (peft 0.21.2, each rule cited). The
transforms that add the adapters are memplan.model.finetune.lora."""

from __future__ import annotations

import re
from functools import lru_cache

from memplan.config.finetune import FinetuneSpec
from memplan.errors import MemplanError
from memplan.hardware import nearest
from memplan.model.families import family_of
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.module_tree import Module, leaf, modules, owner

PEFT = "peft 0.21.2"
SRC_LORA_LAYER = (
    f"{PEFT} tuners/lora/layer.py::LoraLayer.update_layer (lora_A [r, in], lora_B [out, r])"
)
SRC_LORA_EMBEDDING = f"{PEFT} tuners/lora/layer.py::Embedding.update_layer"
SRC_TARGETS = f"{PEFT} tuners/tuners_utils.py::check_target_module_exists"
SRC_DEFAULT_TARGETS = (
    f"{PEFT} utils/constants.py::TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
)
SRC_MODULES_TO_SAVE = f"{PEFT} utils/other.py::_set_trainable, ModulesToSaveWrapper"
SRC_ADAPTER_DTYPE = f"{PEFT} tuners/tuners_utils.py::cast_adapter_dtype (bf16/fp16 -> fp32)"
SRC_PREPARE_KBIT = f"{PEFT} utils/other.py::prepare_model_for_kbit_training"
# peft names every wrapped parameter `base_model.model.<name>` (PeftModel.base_model is the
# LoraModel, whose `.model` is the transformers model).
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
"""peft's adapter name when none is given."""

ALL_LINEAR = "all-linear"
"""peft's INCLUDE_LINEAR_LAYERS_SHORTHAND: every Linear / Conv1D but the output layer."""

# MoE models whose experts transformers 5 fuses into 3-D parameters (and whose router is no
# nn.Linear): peft converts the v4 target names into `target_parameters`, each adapted by a
# lora.ParamWrapper; which model_types, and with which mapping: their family's `peft_moe`.
# transformers conversion_mapping.py::_MODEL_TO_CONVERSION_PATTERN (5.25, the families memplan
# models; peft adds mixtral) and peft utils/transformers_weight_conversion.py::
# _MOE_TARGET_MODULE_MAPPING, _MOE_FUSED_TARGETS, _convert_peft_config_moe (0.21.2).
SRC_MOE_CONVERSION = f"{PEFT} utils/transformers_weight_conversion.py::_convert_peft_config_moe"
SRC_PARAM_WRAPPER = f"{PEFT} tuners/lora/layer.py::ParamWrapper.update_layer"
MOE_TARGET_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {
        "gate": "gate.weight",
        "w1": "gate_up_proj",
        "w3": "gate_up_proj",
        "w2": "down_proj",
    },
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def _peft_targets(model_type: str) -> tuple[str, ...]:
    """peft's default target_modules for `model_type` (SRC_DEFAULT_TARGETS; the family's
    `peft_targets`), () where it has none."""
    family = family_of(model_type)
    return family.peft_targets if family else ()


# --- peft's matching rules -------------------------------------------------------------------


def _in_names(names: tuple[str, ...] | str, key: str) -> bool:
    """peft's list-or-regex rule: a string is a regex that must match the whole key
    (utils/other.py::match_target_against_key: `re.fullmatch`); a list matches a key equal to
    an entry or ending with `.entry`."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    # `key` ends with `.n` exactly when n is what follows one of its dots: one set lookup per
    # dot instead of one endswith per name (all-linear lists every Linear of the model).
    wanted = _name_set(names)
    return key in wanted or any(key[i + 1 :] in wanted for i, char in enumerate(key) if char == ".")


@lru_cache(maxsize=32)
def _name_set(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


def is_saved_module(ft: FinetuneSpec, key: str) -> bool:
    """peft utils/other.py::_set_trainable: a module is wrapped by ModulesToSaveWrapper when
    its name ends with an entry of modules_to_save (a plain suffix test)."""
    return any(key.endswith(m) for m in ft.modules_to_save)


def is_target(ft: FinetuneSpec, targets: tuple[str, ...] | str, key: str) -> bool:
    """peft tuners_utils.py::check_target_module_exists (0.21.2), in its order: excluded
    modules never match; nor does a module under a modules_to_save entry (regex
    `(^|.*\\.)m($|\\..*)`); then `targets` by the list-or-regex rule."""
    if ft.exclude_modules and _in_names(ft.exclude_modules, key):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in ft.modules_to_save):
        return False
    return _in_names(targets, key)


def targets_of(ft: FinetuneSpec, inventory: Inventory, mods: dict[str, Module]) -> list[str]:
    """Names of the modules LoRA adapts, in model order (peft raises where memplan raises)."""
    arch = inventory.architecture
    model_type = arch.model_type if arch else ""
    targets: tuple[str, ...] | str
    if ft.target_modules is None:
        _refuse_moe_default(ft, model_type)
        targets = _default_targets(ft, model_type)
        if not targets and not ft.target_parameters:
            raise MemplanError(
                f"peft has no default target_modules for model_type {model_type!r}: give "
                "finetune.target_modules (module names such as q_proj, a regex, or all-linear).",
                field="finetune.target_modules",
            )
    elif isinstance(ft.target_modules, str) and ft.target_modules.lower() == ALL_LINEAR:
        # tuners_utils.py::_maybe_include_all_linear_layers: every Linear / Conv1D module but
        # the output embedding (model.get_output_embeddings()), by exact name.
        targets = tuple(
            m.name for m in mods.values() if m.kind in ("linear", "conv1d") and not m.output
        )
    else:
        targets = ft.target_modules
    converted = moe_conversion(ft, model_type, targets, _keys(inventory))
    if converted is not None:
        targets = converted[0]
    found = [name for name in mods if is_target(ft, targets, name)]
    bad = [mods[n] for n in found if mods[n].kind == "other"]
    if bad:
        shown = ", ".join(m.name for m in bad[:3])
        raise MemplanError(
            f"target_modules matches {len(bad)} module(s) LoRA cannot adapt ({shown}): peft "
            "adapts Linear, Conv1D and Embedding modules only and raises 'Target module ... "
            "is not supported'. Name the projections inside them (e.g. q_proj, v_proj).",
            field="finetune.target_modules",
        )
    if not found and not (converted and converted[1]) and ft.target_parameters:
        _refuse_unmatched_parameters(ft, inventory, targets)
    if not found and not (converted and converted[1]) and not ft.target_parameters:
        linear = sorted({leaf(m.name) for m in mods.values() if m.kind in ("linear", "conv1d")})
        wanted = targets if isinstance(targets, str) else ", ".join(targets)
        hint = nearest(targets[0], linear) if isinstance(targets, tuple) and targets else ""
        raise MemplanError(
            f"target_modules {wanted} matches no module of the model{hint}; peft raises "
            f"'Target modules ... not found in the base model'. Linear modules here: "
            f"{', '.join(linear)}.",
            field="finetune.target_modules",
        )
    return found


SRC_MOE_DEFAULT = (
    f"{PEFT} tuners/tuners_utils.py::BaseTuner.inject_adapter (convert_peft_config_for_"
    "transformers runs before _prepare_adapter_config; NoMatchingPeftModuleError)"
)


def _refuse_moe_default(ft: FinetuneSpec, model_type: str) -> None:
    """peft's refusal of a converted MoE model without target_modules (SRC_MOE_DEFAULT).

    BaseTuner.inject_adapter converts the config for transformers 5 (SRC_MOE_CONVERSION)
    before LoraModel._prepare_adapter_config fills in the default targets: the conversion
    turns `target_modules=None` into an empty set, so the defaults (Mixtral's q_proj, v_proj
    in utils/constants.py) are never applied, nothing matches and get_peft_model raises
    NoMatchingPeftModuleError. Measured on transformers 5.25 for mixtral, qwen3_moe (which
    has no default anyway); qwen2_moe, not converted, raises peft's 'Please specify
    `target_modules`' (memplan's no-default error)."""
    family = family_of(model_type)
    if ft.method == "full" or family is None or model_type not in family.peft_moe:
        return
    if ft.target_parameters:
        return  # the parameters alone are adapted (_default_targets)
    defaults = family.peft_targets
    listed = f" (its listed default {', '.join(defaults)} is never applied)" if defaults else ""
    raise MemplanError(
        f"peft 0.21.2 with transformers 5 gives no default target_modules for model_type "
        f"{model_type!r}{listed}: it converts the MoE config first and get_peft_model raises "
        "NoMatchingPeftModuleError. Give finetune.target_modules (e.g. [q_proj, v_proj], "
        "all-linear, or the v4 expert names).",
        field="finetune.target_modules",
    )


def _keys(inventory: Inventory) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(module names, parameter names) of the model, as named_modules / named_parameters give
    them (the modules: every prefix of a parameter's name)."""
    params = tuple(t.name for t in inventory.parameters)
    mods: dict[str, None] = {}
    for name in params:
        parts = name.split(".")
        for i in range(1, len(parts)):
            mods[".".join(parts[:i])] = None
    return tuple(mods), params


def _resolve_regex(
    ft: FinetuneSpec,
    regex: str,
    mapping: dict[str, str],
    keys: tuple[tuple[str, ...], tuple[str, ...]],
) -> set[str]:
    r"""peft's resolution of a regex target_modules on a converted MoE model (peft 0.21.2
    utils/transformers_weight_conversion.py::_resolve_string_target_modules): the LEAF names of
    every module or parameter key it matches, so the list rule that follows adapts that leaf in
    every layer (`.*layers\.1\..*q_proj` becomes q_proj everywhere: measured, peft builds it
    so); a v4 expert name is added when the regex matches `<container>.<v4 name>` for a
    container holding the fused parameter it became."""
    module_keys, param_keys = keys
    matched = {leaf(k) for k in (*module_keys, *param_keys) if is_target(ft, regex, k)}
    containers: dict[str, list[str]] = {}
    for name in param_keys:
        containers.setdefault(leaf(name), []).append(owner(name))
    for old, new in mapping.items():
        if old in matched:
            continue
        if any(is_target(ft, regex, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


def moe_conversion(
    ft: FinetuneSpec,
    model_type: str,
    targets: tuple[str, ...] | str,
    keys: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """peft's v4 -> v5 MoE target conversion (SRC_MOE_CONVERSION), or None where it does not
    apply: (the module targets left, {target parameter suffix: LoRA rank}).

    `all-linear` becomes the leaf names of its Linear modules plus every v4 name of the
    mapping (the router `gate` and the expert projections); a list keeps its entries. An entry
    naming a v4 expert projection or the router moves to the parameter targets; both halves
    of a fused `gate_up_proj` give it rank 2r (`rank_pattern`), one half alone is refused as
    peft refuses it. A regex is resolved to leaf names first (_resolve_regex).
    """
    family = family_of(model_type)
    base = family.peft_moe.get(model_type) if family else None
    if base is None or ft.method == "full":
        return None
    mapping = MOE_TARGET_MAPPING[base]
    if isinstance(ft.target_modules, str) and ft.target_modules.lower() == ALL_LINEAR:
        resolved = {leaf(t) for t in targets} | set(mapping)
    elif isinstance(targets, tuple):
        resolved = set(targets)
    else:
        resolved = _resolve_regex(ft, targets, mapping, keys)
        if not resolved:
            return None  # left to the not-found error, as peft leaves it
    left: set[str] = set()
    params: dict[str, int] = {}
    present: dict[str, set[str]] = {}
    for target in sorted(resolved):
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            left.add(target)
            continue
        params[mapping[old]] = ft.rank
        present.setdefault(mapping[old], set()).add(old)
    for new, halves in MOE_FUSED[base].items():
        have = present.get(new, set())
        if 0 < len(have) < len(halves):
            raise MemplanError(
                f"target_modules names {', '.join(sorted(have))} without "
                f"{', '.join(sorted(set(halves) - have))}: transformers 5 fuses them into "
                f"{new}, and peft raises 'Cannot convert PEFT target(s)'. Name both or neither.",
                field="finetune.target_modules",
            )
        if len(have) == len(halves) > 1:
            params[new] = ft.rank * len(halves)
    return tuple(sorted(left)), params


def param_targets(ft: FinetuneSpec, inventory: Inventory) -> dict[str, int]:
    """{parameter name: LoRA rank} for the parameters peft wraps in lora.ParamWrapper: those
    whose name is a target parameter suffix (tuners_utils.py::BaseTuner.inject_adapter,
    `key.endswith(f".{target_key}")`), from the MoE conversion or finetune.target_parameters
    (`user_parameter`; peft unions the two sets, SRC_MOE_CONVERSION)."""
    arch = inventory.architecture
    model_type = arch.model_type if arch else ""
    mods = modules(inventory)
    targets: tuple[str, ...] | str
    if ft.target_modules is None:
        targets = _default_targets(ft, model_type)
    elif isinstance(ft.target_modules, str) and ft.target_modules.lower() == ALL_LINEAR:
        targets = tuple(
            m.name for m in mods.values() if m.kind in ("linear", "conv1d") and not m.output
        )
    else:
        targets = ft.target_modules
    converted = moe_conversion(ft, model_type, targets, _keys(inventory))
    suffixes = converted[1] if converted is not None else {}
    out: dict[str, int] = {}
    for t in inventory.parameters:
        # the conversion's rank_pattern `.*\.gate_up_proj` (2r) holds for the parameter
        # however it was named; a user entry alone gives it rank r (measured)
        rank = next((r for sfx, r in suffixes.items() if t.name.endswith(f".{sfx}")), None)
        if rank is None and user_parameter(ft, t.name):
            rank = ft.rank
            if len(t.shape) not in (2, 3):
                raise MemplanError(
                    f"{t.name} is a {len(t.shape)}-D parameter {list(t.shape)}: peft's "
                    "lora.ParamWrapper adapts 2-D and 3-D parameters only and raises "
                    "'lora.ParamWrapper was initialized with "
                    f"{len(t.shape)} dimensional Parameter' ({SRC_PARAM_WRAPPER_SHAPE}). Name "
                    "a weight matrix or the fused experts instead.",
                    field="finetune.target_parameters",
                )
        if rank is not None:
            out[t.name] = rank
    # a tied alias (GPT-2's lm_head.weight, tied to transformer.wte.weight) is its own
    # module's parameter to peft, which walks named_modules() and each module's
    # named_parameters(recurse=False) (SRC_TARGET_PARAMETERS): named, it is wrapped on that
    # module alone (measured: benchmarks/lora_param_wrapper.py's `ends` parameter lists)
    owners = {t.name: t for t in inventory.parameters}
    for alias, target in inventory.tied:
        if target in owners and alias not in out and user_parameter(ft, alias):
            out[alias] = ft.rank
    return out


SRC_TARGET_PARAMETERS = f"{PEFT} tuners/tuners_utils.py::BaseTuner._inject_parameters"
SRC_PARAM_WRAPPER_SHAPE = f"{PEFT} tuners/lora/layer.py::ParamWrapper._get_in_out_features"


def user_parameter(ft: FinetuneSpec, name: str) -> bool:
    """Whether parameter `name` is named by finetune.target_parameters: peft's rule
    (SRC_TARGET_PARAMETERS) is `key in target_names or key.endswith(f".{target}")`, key being
    the parameter's full name (its module's name, base_layer segments dropped, and the
    parameter's own); no regex, and exclude_modules / modules_to_save are not consulted."""
    return any(name == p or name.endswith(f".{p}") for p in ft.target_parameters or ())


def _default_targets(ft: FinetuneSpec, model_type: str) -> tuple[str, ...]:
    """peft's target_modules where none is given. LoraModel._prepare_adapter_config fills in
    the family's list (SRC_DEFAULT_TARGETS) even beside target_parameters (measured: Llama
    with target_parameters only gets q_proj/v_proj adapters too); on an MoE model peft
    converts (SRC_MOE_CONVERSION) the config first turns None into an empty set, so nothing
    is filled in and target_parameters alone are adapted."""
    family = family_of(model_type)
    if ft.target_parameters and family is not None and model_type in family.peft_moe:
        return ()
    return _peft_targets(model_type)


def _refuse_unmatched_parameters(
    ft: FinetuneSpec, inventory: Inventory, targets: tuple[str, ...] | str
) -> None:
    """peft's NoMatchingPeftModuleError where neither target_modules nor target_parameters
    adapt anything (SRC_TARGETS' caller, BaseTuner.inject_adapter). Where something else is
    adapted, peft only warns that target_parameters matched nothing (memplan notes it:
    memplan.model.finetune.lora)."""
    if any(user_parameter(ft, t.name) for t in inventory.parameters):
        return
    if any(user_parameter(ft, alias) for alias, _ in inventory.tied):
        return  # a tied alias is wrapped too (param_targets)
    wanted = ", ".join(ft.target_parameters or ())
    names = sorted({".".join(t.name.split(".")[-3:]) for t in inventory.parameters})
    first = (ft.target_parameters or ("",))[0]
    hint = nearest(first.split(".")[-1], sorted({leaf(t.name) for t in inventory.parameters}))
    modules = (
        f"target_modules {targets if isinstance(targets, str) else ', '.join(targets)} adapt "
        "no module either"
        if targets
        else "no target_modules are adapted"
    )
    raise MemplanError(
        f"target_parameters {wanted} matches no parameter of the model{hint}, and {modules}: "
        "peft raises NoMatchingPeftModuleError. A parameter matches when its full name equals "
        "an entry or ends with `.entry` (no regex); names here end like: "
        f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}.",
        field="finetune.target_parameters",
    )


MOE_ROLES = ("router", "experts")
"""Inventory roles of the MoE parameters whose lora.ParamWrapper's activations are modelled
(memplan.activations.lora_moe); a wrapper on any other parameter gets WRAPPED_ROLE."""
WRAPPED_ROLE = "param_wrapper"
"""The role of the adapter pair of a lora.ParamWrapper outside the MoE block (a
finetune.target_parameters entry naming, e.g., a Linear's weight): its adapters have
lora.Linear's names and shapes, but not its activations (memplan.activations.lora)."""


def param_lora_tensors(
    t: TensorSpec, *, rank: int, dtype: str | None, module: str
) -> list[TensorSpec]:
    """The adapter pair of one wrapped parameter, held by its lora.ParamWrapper, which takes
    the place of the parameter's module: `module` is that wrapper's name (the module's own
    name, with a `.base_layer` per wrapper outside it). Not the parameter's name: peft names
    the router's pair `mlp.gate.lora_A.default.weight`, the fused experts' gate_up_proj pair
    `mlp.experts.base_layer.lora_A...` when down_proj is wrapped around it
    (SRC_PARAM_WRAPPER; measured on transformers 5.25). A 2-D [out, in] weight is
    one expert; a 3-D [E, d1, d2] one is E experts with in = d2, out = d1 (`swap_in_out_features`
    where the experts module is not `is_transposed`). lora_A = nn.Linear(in, r x E) -> weight
    [r x E, in]; lora_B = nn.Linear(r x E, out) -> weight [out, r x E]."""
    if len(t.shape) == 3:
        experts, out, inp = t.shape
    else:
        experts, (out, inp) = 1, t.shape
    width = rank * experts
    return [
        TensorSpec(
            f"{module}.lora_{x}.{ADAPTER}.weight",
            shape,
            "parameter",
            dtype,
            layer=t.layer,
            role="mlp" if t.role in MOE_ROLES else WRAPPED_ROLE,
            trainable=True,
        )
        for x, shape in (("A", (width, inp)), ("B", (out, width)))
    ]
