"""Fine-tuning recipes as inventory transforms: what trains, what is frozen, what is quantized.

`apply(spec, inventory)` returns the inventory of the model as the training job holds it:

- `full`: the model itself; `finetune.freeze` patterns mark parameters frozen.
- `lora`: the model wrapped by peft's `get_peft_model` (peft 0.21.2): every parameter frozen,
  each targeted module's tensors renamed under `base_layer`, and the adapters added —
  `lora_A.default.weight` [r, in] and `lora_B.default.weight` [out, r] per Linear / GPT-2
  Conv1D, `lora_embedding_A.default` [r, num_embeddings] and `lora_embedding_B.default`
  [dim, r] per Embedding — all trainable; `modules_to_save` keep the module as
  `original_module` (frozen) beside a trainable copy `modules_to_save.default`. Names carry
  peft's `base_model.model.` prefix, as `PeftModel.named_parameters()` gives them.
- `qlora`: transformers' BitsAndBytesConfig 4-bit quantization of every Linear / Conv1D (but
  the skipped ones), peft's `prepare_model_for_kbit_training`, then the same LoRA.

Frozen tensors keep their parameter bytes and get no gradient and no optimizer state: each
engine rule (memplan.states.engines) reads `TensorSpec.trainable`. Pure: no torch, no I/O. The
transform is checked against real peft models, tensor by tensor, in tests/test_finetune*.py.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import lru_cache

from memplan.config.spec import FinetuneSpec, Spec
from memplan.errors import MemplanError
from memplan.hardware import nearest
from memplan.model.families import family_of
from memplan.model.finetune.qlora import quantize_4bit
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE, Module, frozen, leaf, modules, owner

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
    return key in names or any(key.endswith(f".{n}") for n in names)


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
        targets = _peft_targets(model_type)
        if not targets:
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
    converted = moe_conversion(ft, model_type, targets)
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
    if not found and not (converted and converted[1]):
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


def moe_conversion(
    ft: FinetuneSpec, model_type: str, targets: tuple[str, ...] | str
) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """peft's v4 -> v5 MoE target conversion (SRC_MOE_CONVERSION), or None where it does not
    apply: (the module targets left, {target parameter suffix: LoRA rank}).

    `all-linear` becomes the leaf names of its Linear modules plus every v4 name of the
    mapping (the router `gate` and the expert projections); a list keeps its entries. An entry
    naming a v4 expert projection or the router moves to the parameter targets; both halves
    of a fused `gate_up_proj` give it rank 2r (`rank_pattern`), one half alone is refused as
    peft refuses it. A regex is left as it is (peft probes it against v4 names: not modelled).
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
        return None
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
    `key.endswith(f".{target_key}")`)."""
    arch = inventory.architecture
    model_type = arch.model_type if arch else ""
    mods = modules(inventory)
    targets: tuple[str, ...] | str
    if ft.target_modules is None:
        targets = _peft_targets(model_type)
    elif isinstance(ft.target_modules, str) and ft.target_modules.lower() == ALL_LINEAR:
        targets = tuple(
            m.name for m in mods.values() if m.kind in ("linear", "conv1d") and not m.output
        )
    else:
        targets = ft.target_modules
    converted = moe_conversion(ft, model_type, targets)
    if converted is None:
        return {}
    suffixes = converted[1]
    return {
        t.name: rank
        for t in inventory.parameters
        for suffix, rank in suffixes.items()
        if t.name.endswith(f".{suffix}")
    }


def param_lora_tensors(t: TensorSpec, *, rank: int, dtype: str | None) -> list[TensorSpec]:
    """The adapter pair of one wrapped parameter (SRC_PARAM_WRAPPER): a 2-D [out, in] weight is
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
            f"{t.name}.lora_{x}.{ADAPTER}.weight",
            shape,
            "parameter",
            dtype,
            layer=t.layer,
            role="mlp",
            trainable=True,
        )
        for x, shape in (("A", (width, inp)), ("B", (out, width)))
    ]


# --- the transforms --------------------------------------------------------------------------


def lora_tensors(mod: Module, *, rank: int, dtype: str | None) -> list[TensorSpec]:
    """The adapter pair peft adds to one module (trainable, in `dtype`, None: the recipe's).

    Linear / Conv1D: lora_A = nn.Linear(in, r) -> weight [r, in]; lora_B = nn.Linear(r, out)
    -> weight [out, r] (SRC_LORA_LAYER; Conv1D's in/out are its weight's [in, out], peft sets
    fan_in_fan_out). Embedding: lora_embedding_A [r, num_embeddings], lora_embedding_B
    [embedding_dim, r], bare nn.Parameters (SRC_LORA_EMBEDDING)."""
    weight = next(t for t in mod.tensors if leaf(t.name) == "weight")
    layer, role = weight.layer, weight.role
    if mod.kind == "embedding":
        a = (f"{mod.name}.lora_embedding_A.{ADAPTER}", (rank, mod.in_features))
        b = (f"{mod.name}.lora_embedding_B.{ADAPTER}", (mod.out_features, rank))
    else:
        a = (f"{mod.name}.lora_A.{ADAPTER}.weight", (rank, mod.in_features))
        b = (f"{mod.name}.lora_B.{ADAPTER}.weight", (mod.out_features, rank))
    return [
        TensorSpec(name, shape, "parameter", dtype, layer=layer, role=role, trainable=True)
        for name, shape in (a, b)
    ]


def adapter_dtype(spec: Spec) -> str | None:
    """The dtype the adapters are held in (None: the recipe's parameter dtype).

    peft's get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters to fp32
    (SRC_ADAPTER_DTYPE), and torch's engines (ddp, fsdp2) keep them so. DeepSpeed and
    Megatron cast the whole module to the 16-bit dtype afterwards (deepspeed/runtime/
    engine.py::DeepSpeedEngine._configure_distributed_model: `self.module.bfloat16()`;
    megatron/core/transformer/module.py::Float16Module), so adapters follow the recipe there.
    """
    recipe = spec.recipe()
    engine = spec.parallelism.engine
    held = recipe.parameters
    if engine == "fsdp2" and recipe.master_weights:
        held = recipe.master_weights  # FSDP2 keeps the at-rest (master) dtype in the module
    if spec.finetune.autocast_adapter_dtype and engine in ("ddp", "fsdp2"):
        if held in ("bf16", "fp16"):
            return "fp32"
    return None


def lora(
    inventory: Inventory, ft: FinetuneSpec, *, dtype: str | None, reference: Inventory | None = None
) -> Inventory:
    """The inventory of `get_peft_model(model, LoraConfig(...))` (see the module docstring).

    `reference` is the unquantized model when `inventory` holds 4-bit weights (QLoRA): module
    kinds and in/out features come from it; the tensors renamed come from `inventory`."""
    mods = modules(reference or inventory)
    targets = set(targets_of(ft, inventory, mods))
    wrapped = param_targets(ft, reference or inventory)
    roots = saved_roots(ft, mods)
    last: dict[str, str] = {}
    under: dict[str, list[TensorSpec]] = {}
    for t in inventory.parameters:
        last[owner(t.name)] = t.name
        root = _root_of(t.name, roots)
        if root is not None:
            under.setdefault(root, []).append(t)
    renamed: dict[str, str] = {}
    params: list[TensorSpec] = []
    for t in inventory.parameters:
        mod = owner(t.name)
        root = _root_of(t.name, roots)
        if root is not None:
            params.append(_rename(t, f"{root}.original_module.{t.name[len(root) + 1 :]}", renamed))
            if t is under[root][-1]:
                params += _copies(root, under[root])
        elif mod in targets:
            params.append(_rename(t, f"{mod}.base_layer.{leaf(t.name)}", renamed))
            if t.name == last[mod]:
                params += lora_tensors(mods[mod], rank=ft.rank, dtype=dtype)
        elif t.name in wrapped:
            params += [frozen(t), *param_lora_tensors(t, rank=wrapped[t.name], dtype=dtype)]
        else:
            params.append(frozen(t))
    # Tied aliases (GPT-2's lm_head): the alias is renamed like its module and stays tied to
    # its (renamed) owner; adapters or a trainable copy follow the other parameters.
    tied: list[tuple[str, str]] = []
    extra: list[TensorSpec] = []
    owners = {t.name: t for t in inventory.parameters}
    for alias, target in inventory.tied:
        mod = owner(alias)
        root = _root_of(alias, roots)
        new_alias = alias
        if root is not None:
            new_alias = f"{root}.original_module.{alias[len(root) + 1 :]}"
            extra += _copies(root, [replace(owners[target], name=alias)])
        elif mod in targets:
            new_alias = f"{mod}.base_layer.{leaf(alias)}"
            extra += lora_tensors(mods[mod], rank=ft.rank, dtype=dtype)
        tied.append((new_alias, renamed.get(target, target)))
    params = [_bias_rule(t, ft, targets) for t in (*params, *extra)]
    return replace(
        inventory,
        parameters=tuple(replace(t, name=PEFT_PREFIX + t.name) for t in params),
        buffers=tuple(replace(b, name=PEFT_PREFIX + b.name) for b in inventory.buffers),
        tied=tuple((PEFT_PREFIX + a, PEFT_PREFIX + o) for a, o in tied),
        notes=(*inventory.notes, _lora_note(ft, targets, set(roots), dtype)),
    )


def saved_roots(ft: FinetuneSpec, mods: dict[str, Module]) -> list[str]:
    """The modules ModulesToSaveWrapper wraps (SRC_MODULES_TO_SAVE): every module whose name
    ends with an entry (a plain suffix test: `norm` matches every *norm), the outermost when
    a module and one inside it both match."""
    matched = [name for name in mods if name and is_saved_module(ft, name)]
    return [m for m in matched if not any(m.startswith(o + ".") for o in matched)]


def _root_of(name: str, roots: Sequence[str]) -> str | None:
    return next((r for r in roots if name.startswith(r + ".")), None)


def _copies(mod: str, tensors: Sequence[TensorSpec]) -> list[TensorSpec]:
    """ModulesToSaveWrapper's trainable deep copy of a module (SRC_MODULES_TO_SAVE): same
    shapes and dtypes as the original, which peft keeps (frozen) beside it."""
    return [
        replace(t, name=f"{mod}.modules_to_save.{ADAPTER}.{t.name[len(mod) + 1 :]}", trainable=True)
        for t in tensors
    ]


def _rename(t: TensorSpec, name: str, renamed: dict[str, str]) -> TensorSpec:
    renamed[t.name] = name
    return replace(t, name=name, trainable=False)


def _bias_rule(t: TensorSpec, ft: FinetuneSpec, targets: set[str]) -> TensorSpec:
    """peft tuners_utils.py::BaseTuner._mark_only_adapters_as_trainable: bias "all" trains
    every `.bias`; "lora_only" the biases of adapted modules (their base_layer.bias)."""
    if not t.name.endswith(".bias") or t.trainable:
        return t
    if ft.bias == "all":
        return replace(t, trainable=True)
    if ft.bias == "lora_only" and t.name.endswith(".base_layer.bias"):
        if t.name.removesuffix(".base_layer.bias") in targets:
            return replace(t, trainable=True)
    return t


def _lora_note(ft: FinetuneSpec, targets: set[str], saved: set[str], dtype: str | None) -> str:
    leaves = sorted({leaf(t) for t in targets})
    where = f"{dtype} (peft autocast_adapter_dtype)" if dtype else "the parameter dtype"
    extra = f"; modules_to_save: {', '.join(sorted(saved))}" if saved else ""
    return (
        f"{FINETUNE_NOTE} LoRA r={ft.rank} on {len(targets)} modules ({', '.join(leaves)}), "
        f"adapters in {where}; every other parameter frozen (no gradient, no optimizer "
        f"state){extra}."
    )


def freeze(inventory: Inventory, patterns: Sequence[str]) -> Inventory:
    """Mark the parameters whose names match any fnmatch pattern as frozen. A name under
    peft's prefix also matches without it (`model.embed_tokens.*` freezes
    `base_model.model.model.embed_tokens.weight`)."""
    if not patterns:
        return inventory
    names = [t.name for t in inventory.parameters]
    for pattern in patterns:
        if not any(freeze_matches(pattern, n) for n in names):
            plain = [n.removeprefix(PEFT_PREFIX) for n in names]
            hint = nearest(pattern, plain)
            raise MemplanError(
                f"freeze pattern {pattern!r} matches no parameter{hint}. Patterns are fnmatch "
                f"(shell-style) over parameter names, e.g. {plain[0].rsplit('.', 1)[0]}.* or "
                "model.layers.[0-9].* (see `memplan inventory`).",
                field="finetune.freeze",
            )
    params = tuple(
        frozen(t) if any(freeze_matches(p, t.name) for p in patterns) else t
        for t in inventory.parameters
    )
    count = sum(
        1 for a, b in zip(inventory.parameters, params, strict=True) if a.trainable != b.trainable
    )
    return replace(
        inventory,
        parameters=params,
        notes=(
            *inventory.notes,
            f"{FINETUNE_NOTE} freeze {', '.join(patterns)}: {count} tensors frozen.",
        ),
    )


def freeze_matches(pattern: str, name: str) -> bool:
    """Whether a freeze pattern (fnmatch) matches a parameter name, with or without peft's
    `base_model.model.` prefix."""
    return fnmatch.fnmatchcase(name, pattern) or (
        name.startswith(PEFT_PREFIX) and fnmatch.fnmatchcase(name[len(PEFT_PREFIX) :], pattern)
    )


def num_trainable(params: Iterable[TensorSpec]) -> int:
    """Elements of the trainable parameters (peft's `print_trainable_parameters` count)."""
    return sum(t.numel for t in params if t.trainable)


def apply(spec: Spec, inventory: Inventory) -> Inventory:
    """The inventory the job trains (see the module docstring); the input itself for a full
    fine-tune without freeze patterns. Apply it once, to the model's own inventory
    (memplan.report.estimate.estimate does)."""
    ft = spec.finetune
    if ft.method == "full" and not ft.freeze:
        return inventory
    return _apply(
        inventory,
        ft,
        adapter=adapter_dtype(spec),
        held_default=spec.recipe().parameters,
        compute=spec.recipe().compute,
        updated_default=spec.recipe().master_weights or spec.recipe().parameters,
        engine=spec.parallelism.engine,
        stage=spec.parallelism.stage,
        tensor=spec.parallelism.tensor,
    )


@lru_cache(maxsize=256)
def _apply(
    inventory: Inventory,
    ft: FinetuneSpec,
    *,
    adapter: str | None,
    held_default: str,
    updated_default: str,
    compute: str,
    engine: str,
    stage: int,
    tensor: int,
) -> Inventory:
    if inventory.is_bare_count or inventory.architecture is None:
        raise MemplanError(
            "fine-tuning needs the model's tensors (LoRA targets and freeze patterns are "
            "matched by name): give hf_config, a preset or an architecture instead of "
            "num_parameters.",
            field="finetune",
        )
    if ft.method != "full" and tensor > 1:
        raise MemplanError(
            f"{ft.method} with parallelism.tensor={tensor} is not modelled (memplan's tensor-"
            "parallel rules do not know peft's adapter tensors); use tensor: 1.",
            field="finetune.method",
        )
    if ft.method == "qlora" and not (engine == "ddp" or (engine == "deepspeed" and stage < 3)):
        raise MemplanError(
            f"qlora with engine {engine} (ZeRO stage {stage}) is not modelled: sharding 4-bit "
            "weights needs bnb_4bit_quant_storage and keeps the quantization state per rank. "
            "Use engine: ddp, or deepspeed with zero_stage 0-2 (the frozen 4-bit base stays "
            "whole on every rank).",
            field="finetune.method",
        )
    out = inventory
    if ft.method == "qlora":
        out = quantize_4bit(out, ft, compute=compute)
    if ft.method in ("lora", "qlora"):
        out = lora(out, ft, dtype=adapter, reference=inventory)
    out = freeze(out, ft.freeze)
    if not any(t.trainable for t in out.parameters):
        raise MemplanError(
            "every parameter is frozen: nothing would train. Loosen finetune.freeze.",
            field="finetune.freeze",
        )
    # The dtype each trainable tensor is updated in: its own, or the master copy's.
    held = sorted(
        {
            t.dtype if t.dtype and t.dtype != held_default else updated_default
            for t in out.parameters
            if t.trainable
        }
    )
    if engine == "ddp" and stage == 1 and len(held) > 1:
        # torch/distributed/optim/zero_redundancy_optimizer.py::_verify_same_dense_param_type
        raise MemplanError(
            f"ZeroRedundancyOptimizer (engine: ddp, zero_stage: 1) needs one dtype for every "
            f"trainable parameter, but these train in {' and '.join(held)} (peft's fp32 "
            "adapters beside modules_to_save in the model dtype). Set "
            "finetune.autocast_adapter_dtype: false, or use a *-mixed precision recipe.",
            field="finetune",
        )
    return out
