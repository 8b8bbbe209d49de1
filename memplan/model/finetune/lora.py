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
- `adapter`, `adapter_v2` (model.implementation litgpt only): litgpt's own adapter GPTs in
  LitGPT's names (memplan.model.stacks.litgpt_adapter).

Frozen tensors keep their parameter bytes and get no gradient and no optimizer state: each
engine rule (memplan.states.engines) reads `TensorSpec.trainable`. Pure: no torch, no I/O. The
transform is checked against real peft models, tensor by tensor, in tests/test_finetune*.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import lru_cache

from memplan.config.finetune import LITGPT_ADAPTERS, FinetuneSpec
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.hardware import nearest
from memplan.model.finetune import qlora
from memplan.model.finetune.qlora import quantize_4bit
from memplan.model.finetune.targets import (
    ADAPTER,
    MOE_ROLES,
    PEFT_PREFIX,
    is_saved_module,
    param_lora_tensors,
    param_targets,
    targets_of,
    user_parameter,
)
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE, Module, frozen, leaf, modules, owner

BASE = ".base_layer"
"""The segment a peft wrapper puts its wrapped module under."""

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
    if spec.model.implementation == "litgpt":
        # No peft: litgpt 0.5.9 finetune/lora.py::main builds the LoRA GPT (lora_A, lora_B
        # included) under `fabric.init_module()`, in the precision plugin's dtype.
        return None
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
    notes = _check_parameter_targets(ft, targets, wrapped, inventory, reference)
    four_bit = _bnb_dispatched(wrapped, inventory) if reference is not None else set()
    if four_bit:
        # a 4-bit Linear's weight named by target_parameters becomes bnb's LoRA Linear4bit,
        # as if its module were in target_modules (`_bnb_dispatched`)
        targets |= {owner(n) for n in four_bit}
        wrapped = {n: r for n, r in wrapped.items() if n not in four_bit}
    if wrapped and ft.dropout:
        shown = ", ".join(sorted({owner(n) for n in wrapped})[:2])
        raise MemplanError(
            f"finetune.dropout {ft.dropout} with LoRA on {shown}...: peft adapts the MoE router "
            "and fused experts (and any finetune.target_parameters) with lora.ParamWrapper, "
            "which raises 'lora.ParamWrapper does not work with lora_dropout != 0' (peft 0.21.2 "
            "tuners/lora/layer.py::ParamWrapper.__init__). Set finetune.dropout to 0, or target "
            "the attention projections only.",
            field="finetune.dropout",
        )
    roots = saved_roots(ft, mods)
    # peft wraps a module once per targeted parameter, in the module's registration order:
    # the first is the innermost lora.ParamWrapper (SRC_PARAM_WRAPPER; tuners_utils.py::
    # BaseTuner._inject_parameters). Each wrap moves the module under one more `base_layer`.
    nested: dict[str, list[TensorSpec]] = {}
    for t in inventory.parameters:
        if t.name in wrapped:
            nested.setdefault(owner(t.name), []).append(t)
    saved_wrapper = next((m for m in nested if m in roots), None)
    if saved_wrapper is not None:
        raise MemplanError(
            f"modules_to_save names {saved_wrapper}, which peft wraps in lora.ParamWrapper "
            "(the MoE router or fused experts are LoRA targets here): peft raises "
            "'modules_to_save cannot be applied to modules of type ParamWrapper' (peft 0.21.2 "
            "utils/other.py::AuxiliaryTrainingWrapper.check_module). Drop it from "
            "finetune.modules_to_save or from finetune.target_modules.",
            field="finetune.modules_to_save",
        )
    last: dict[str, str] = {}
    for t in inventory.parameters:
        last[owner(t.name)] = t.name

    def forms(t: TensorSpec) -> list[TensorSpec]:
        """`t` as peft holds it once its module is wrapped (then, after the module's last
        parameter, the wrappers' adapter pairs, innermost first)."""
        mod = owner(t.name)
        if mod not in nested:
            return [t]
        inner = nested[mod]
        depth = len(inner)
        out = [replace(t, name=f"{mod}{BASE * depth}.{leaf(t.name)}")]
        if t.name == last[mod]:
            for i, w in enumerate(inner):
                at = f"{mod}{BASE * (depth - 1 - i)}"
                out += param_lora_tensors(w, rank=wrapped[w.name], dtype=dtype, module=at)
        return out

    under: dict[str, list[TensorSpec]] = {}
    last_under: dict[str, str] = {}
    for t in inventory.parameters:
        root = _root_of(t.name, roots)
        if root is not None:
            under.setdefault(root, []).extend(forms(t))
            last_under[root] = t.name
    renamed: dict[str, str] = {}
    params: list[TensorSpec] = []
    for t in inventory.parameters:
        mod = owner(t.name)
        root = _root_of(t.name, roots)
        if root is not None:
            # a wrapped module inside a saved one: ModulesToSaveWrapper copies the wrappers
            # too, adapters included (measured: Mixtral, w2 with modules_to_save [mlp])
            for x in forms(t):
                name = f"{root}.original_module.{x.name[len(root) + 1 :]}"
                params.append(_rename(x, name, renamed))
                renamed[t.name] = renamed.get(t.name, name)
            if t.name == last_under[root]:
                params += _copies(root, under[root])
        elif mod in targets:
            params.append(_rename(t, f"{mod}.base_layer.{leaf(t.name)}", renamed))
            if t.name == last[mod]:
                params += lora_tensors(mods[mod], rank=ft.rank, dtype=dtype)
        elif mod in nested:
            head, *adapters = forms(t)
            params += [_rename(t, head.name, renamed), *adapters]
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
        elif alias in wrapped:
            # a lora.ParamWrapper on the alias's own module (targets.param_targets): the
            # owner keeps its name and stays frozen
            new_alias = f"{mod}.base_layer.{leaf(alias)}"
            like = replace(owners[target], name=alias, layer=None)
            extra += param_lora_tensors(like, rank=wrapped[alias], dtype=dtype, module=mod)
        tied.append((new_alias, renamed.get(target, target)))
    params = [_bias_rule(t, ft, targets) for t in (*params, *extra)]
    return replace(
        inventory,
        parameters=tuple(replace(t, name=PEFT_PREFIX + t.name) for t in params),
        buffers=tuple(
            replace(b, name=PEFT_PREFIX + _wrapped_name(b.name, nested)) for b in inventory.buffers
        ),
        tied=tuple((PEFT_PREFIX + a, PEFT_PREFIX + o) for a, o in tied),
        notes=(*inventory.notes, _lora_note(ft, targets, set(roots), dtype), *notes),
    )


def _check_parameter_targets(
    ft: FinetuneSpec,
    targets: set[str],
    wrapped: dict[str, int],
    inventory: Inventory,
    reference: Inventory | None,
) -> tuple[str, ...]:
    """peft's checks of finetune.target_parameters (peft 0.21.2 tuners/tuners_utils.py::
    BaseTuner._inject_parameters, inject_adapter), and the note on what they wrap."""
    if not ft.target_parameters:
        return ()
    both = sorted({owner(n) for n in wrapped} & targets)
    if both:
        raise MemplanError(
            f"{both[0]} is adapted by finetune.target_modules and its parameter by "
            "finetune.target_parameters: peft raises 'Trying to wrap an `nn.Parameter` of layer "
            f"'{both[0]}' ... which is not a valid target' (tuners_utils.py::BaseTuner."
            "_inject_parameters). Drop the module from target_modules, or the parameter from "
            "target_parameters (on a model with default targets, set target_modules: []).",
            field="finetune.target_parameters",
        )
    own = [n for n in wrapped if user_parameter(ft, n)]
    if not own:
        return (
            f"finetune.target_parameters {', '.join(ft.target_parameters)} match no parameter: "
            "peft only warns ('were set but no parameter was matched') and adapts the "
            "target_modules alone.",
        )
    four_bit = _bnb_dispatched(own, inventory) if reference is not None else set()
    dense = [n for n in own if not _in_moe_block(n, reference or inventory) and n not in four_bit]
    if dense and ft.method == "qlora":
        raise MemplanError(
            f"{dense[0]} wrapped under QLoRA: lora.ParamWrapper on a weight bitsandbytes "
            "does not quantize (beside its 4-bit Linears) is not modelled (not measured). "
            "Use method: lora, or target that module with target_modules.",
            field="finetune.target_parameters",
        )
    out = []
    kept = [n for n in own if n not in four_bit]
    if kept:
        shown = ", ".join(sorted({leaf(owner(n)) + "." + leaf(n) for n in kept}))
        out.append(
            f"finetune.target_parameters: {len(kept)} parameters wrapped by peft's "
            f"lora.ParamWrapper ({shown})."
        )
    if four_bit:
        shown = ", ".join(sorted({leaf(owner(n)) for n in four_bit}))
        out.append(
            f"finetune.target_parameters: {len(four_bit)} 4-bit Linear weights ({shown}) get "
            "bitsandbytes' LoRA Linear4bit, as target_modules would give them (peft 0.21.2 "
            "tuners/lora/model.py::LoraModel._create_new_module tries dispatch_bnb_4bit "
            "before dispatch_default, the only one that makes a lora.ParamWrapper)."
        )
    return tuple(out)


def _bnb_dispatched(names: Iterable[str], inventory: Inventory) -> set[str]:
    """The parameters among `names` that are bitsandbytes 4-bit weights in `inventory` (the
    quantized model). peft 0.21.2 tuners/lora/model.py::LoraModel._create_new_module passes
    a targeted parameter's module through its dispatchers in order, dispatch_bnb_4bit
    (tuners/lora/bnb.py, which ignores `parameter_name`) before dispatch_default (tuners/lora/
    layer.py, which alone makes a ParamWrapper): so such a weight gets lora.bnb.Linear4bit,
    the very layer target_modules gives (measured on the CPU, bitsandbytes 0.50: the same
    parameters and saved bytes, lora_dropout accepted; benchmarks/lora_param_wrapper.py)."""
    wanted = set(names)
    return {t.name for t in inventory.parameters if t.name in wanted and qlora.is_packed(t)}


def _in_moe_block(name: str, inventory: Inventory) -> bool:
    """Whether `name` is an MoE router's or fused experts' weight (the parameters whose
    lora.ParamWrapper memplan.activations.lora_moe models), by the inventory's roles."""
    return any(t.name == name and t.role in MOE_ROLES for t in inventory.parameters)


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


def _wrapped_name(name: str, nested: dict[str, list[TensorSpec]]) -> str:
    """A buffer's name once its module is wrapped by lora.ParamWrappers (DeepSeek-V3's
    router bias `e_score_correction_bias` moves under the router's `base_layer`)."""
    mod = owner(name)
    return f"{mod}{BASE * len(nested[mod])}.{leaf(name)}" if mod in nested else name


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
    if spec.model.implementation == "litgpt":
        from memplan.model.stacks import litgpt

        inventory = litgpt.own_inventory(inventory)  # LitGPT's lm_head is never tied
    ft = spec.finetune
    if ft.method == "full" and not ft.freeze:
        return inventory
    if spec.model.implementation == "litgpt":
        from memplan.model.stacks import litgpt_lora_adapters

        ft = litgpt_lora_adapters.default_targets(ft, inventory)
    lightning_4bit = spec.model.implementation == "litgpt" and ft.method == "qlora"
    if lightning_4bit:
        from memplan.model.stacks import litgpt_qlora

        if spec.parallelism.world_size > 1:
            raise MemplanError(
                f"qlora under model.implementation litgpt runs on one device: litgpt "
                f"{litgpt.VERSION} finetune/lora.py::setup refuses --quantize on more "
                '(NotImplementedError: "Quantization is currently not supported for multi-GPU '
                f'training"); this layout has {spec.parallelism.world_size} GPUs.',
                field="parallelism",
            )
        if spec.parallelism.engine != "ddp":
            raise MemplanError(
                litgpt_qlora.one_device_engine(spec.parallelism.engine),
                field="parallelism.engine",
            )

        ft = litgpt_qlora.lightning_quantization(ft)  # Lightning's 4-bit linears, head included
    out = _apply(
        inventory,
        ft,
        adapter=adapter_dtype(spec),
        held_default=spec.recipe().parameters,
        compute=spec.recipe().compute,
        updated_default=spec.recipe().master_weights or spec.recipe().parameters,
        engine=spec.parallelism.engine,
        stage=spec.parallelism.stage,
        tensor=spec.parallelism.tensor,
        state_dtype=qlora.LIGHTNING_STATE_DTYPE if lightning_4bit else None,
    )
    if lightning_4bit and litgpt_qlora.swaps_embedding(spec.finetune):
        out = litgpt_qlora.stable_embedding(out)  # litgpt >= 0.5.0 swaps in StableEmbedding
    if spec.model.implementation == "litgpt":
        # LitGPT's adapters on fused modules (q|k|v; Phi-3's gate|up), not peft's shapes
        out = litgpt_lora_adapters.fused_adapters(out, spec.finetune)
    return out


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
    state_dtype: str | None = None,
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
    if ft.method == "qlora":
        qlora.refuse_engine(ft, engine=engine, stage=stage)
    out = inventory
    if ft.method == "qlora":
        out = quantize_4bit(
            out, ft, compute=compute, state_dtype=state_dtype, sharded=engine == "fsdp2"
        )
    if ft.method in ("lora", "qlora"):
        out = lora(out, ft, dtype=adapter, reference=inventory)
    if ft.method in LITGPT_ADAPTERS:
        from memplan.model.stacks import litgpt_adapter

        out = litgpt_adapter.inventory(out, ft, compute=compute, held=held_default)
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
