"""What `memplan plan` searches: the degrees that divide the GPUs, the engines and ZeRO stages,
and the engines, recomputation policies and torch.compile each model implementation runs
under."""

from __future__ import annotations

from typing import Any

from memplan.activations import predict
from memplan.config.parallelism import ParallelismSpec
from memplan.config.plan import PlanSpec
from memplan.config.spec import Spec
from memplan.model.inventory import Inventory
from memplan.plan.steptime import COMPILE_SPEEDUP, COMPILE_SPEEDUP_CODE
from memplan.report.settings import setting_of

# Engine -> ZeRO stages the search tries (each engine's own range; see memplan.config.spec).
ENGINE_STAGES = {
    "deepspeed": (0, 1, 2, 3),
    "fsdp2": (2, 3),
    "megatron": (0, 1),
    "ddp": (0, 1),
    "fsdp1": (0, 2, 3),
}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_split(layers: int, pipeline: int) -> tuple[int, ...] | None:
    """Layers per stage: an even split when it divides; else Megatron's uneven split, where
    the first and last stages take one layer less as if the embedding and the loss were
    layers (--account-for-embedding-in-pipeline-split, --account-for-loss-in-pipeline-split);
    None when neither divides."""
    if layers % pipeline == 0:
        return (layers // pipeline,) * pipeline
    if pipeline > 2 and (layers + 2) % pipeline == 0 and layers + 2 >= 2 * pipeline:
        per = (layers + 2) // pipeline
        return (per - 1, *([per] * (pipeline - 2)), per - 1)
    return None


# What each model implementation offers, as its own code or trainer runs it: the engines
# (the stack's data/model parallel code memplan models) and the recomputation policies.
IMPLEMENTATION_ENGINES: dict[str, tuple[str, ...]] = {
    # fsdp1: accelerate's FSDP plugin and the HF Trainer's `fsdp` (FullyShardedDataParallel);
    # searched only where plan.engines lists it (not in PlanSpec's default).
    "transformers": ("deepspeed", "fsdp2", "megatron", "ddp", "fsdp1"),
    # torchtitan parallelizes with FSDP2 / DDP and torch.distributed.pipelining
    # (torchtitan/models/llama3/parallelize.py, 0.3.0).
    "torchtitan": ("fsdp2", "ddp"),
    # LitGPT's scripts run Lightning's FSDP (FSDP1: its model states as FSDP2's, full shard) or
    # one device; no model parallelism (memplan.model.stacks.litgpt). fsdp1 models Lightning's
    # FSDPStrategy itself (auto_wrap_policy={Block}), where plan.engines lists it.
    "litgpt": ("fsdp2", "ddp", "fsdp1"),
    # Megatron-Core's GPTModel runs under Megatron's own DDP and distributed optimizer.
    "megatron-core": ("megatron",),
}
# Each implementation's policies in the order the search tries them: the one that saves least
# first (full keeps each layer's input; selective and selective-op keep a subset of what none
# keeps). At one layout and micro-batch a policy never peaks under one tried before it, so
# where one exceeds the budget the later ones are not evaluated there
# (tests/test_plan.py::test_dominated_policies_skipped_find_the_same_rows).
IMPLEMENTATION_RECOMPUTE: dict[str, tuple[str, ...]] = {
    "transformers": ("full", "selective", "none"),
    # torchtitan's activation_checkpoint.mode: none, full, selective (per-op SAC).
    "torchtitan": ("full", "selective-op", "none"),
    "litgpt": ("full", "none"),
    "megatron-core": ("full", "selective", "none"),
}


# training.compile values each implementation's code runs with, as memplan models it.
IMPLEMENTATION_COMPILE: dict[str, tuple[bool, ...]] = {
    # Each decoder layer compiled (memplan.model.forward.compiled: transformers'
    # LlamaDecoderLayer traced alike).
    "transformers": (False, True),
    # torchtitan's compile.enable compiles each TransformerBlock (memplan.model.stacks.torchtitan).
    "torchtitan": (False, True),
    # Refused as not modelled: memplan.model.stacks.litgpt.unsupported (pretrain.py compiles the
    # whole GPT) and memplan.model.stacks.megatron.unsupported.
    "litgpt": (False,),
    "megatron-core": (False,),
}


def compile_options(spec: Spec, inventory: Inventory, recompute: str) -> tuple[bool, ...]:
    """The training.compile values a plan of `spec` searches at `recompute`: the spec's own
    when it sets `training.compile` (a pinned value, as plan.tensor pins the tensor degree);
    else those its implementation runs with (IMPLEMENTATION_COMPILE), leaving out a compiled
    twin that cannot differ from its eager one: where no compile speed-up is published for the
    code (memplan.plan.steptime.COMPILE_SPEEDUP_CODE) and compile leaves what the layers save
    unchanged at `recompute` (full checkpointing, or a layer the compiled rule does not cover:
    memplan.model.forward.compiled), its memory and its time are the eager row's."""
    t = spec.training
    if "compile" in t.model_fields_set:
        return (t.compile,)
    options = IMPLEMENTATION_COMPILE[spec.model.implementation]
    if len(options) == 1 or spec.model.implementation in COMPILE_SPEEDUP_CODE:
        return options
    eager, compiled = (_saved(spec, inventory, recompute, c) for c in (False, True))
    return options if eager != compiled else (False,)


def _saved(spec: Spec, inventory: Inventory, recompute: str, compiled: bool) -> tuple[object, ...]:
    """What one device's forward saves at `recompute`, compiled or not, in bytes (the notes
    aside): the layouts split these same layers."""
    training = spec.training.model_copy(
        update={"compile": compiled, "activation_checkpointing": recompute}
    )
    acts = predict(inventory, setting_of(spec.model_copy(update={"training": training})))
    return (acts.blocks, acts.logits_bytes, acts.upcast_bytes, acts.loss_gradient_bytes)


def recompute_policies(allow: bool, implementation: str = "transformers") -> tuple[str, ...]:
    return IMPLEMENTATION_RECOMPUTE[implementation] if allow else ("none",)


def recompute_options(settings: PlanSpec, implementation: str = "transformers") -> tuple[str, ...]:
    """The activation recomputation policies a plan with `settings` searches for a model run
    by `implementation`'s code."""
    return recompute_policies(settings.allow_recompute, implementation)


# The spec's own `parallelism` keys a plan keeps (the user's engine knobs, not a searched
# dimension), each on the layouts it applies to: its engines, and the degree it needs above 1
# (None: any layout of those engines). Elsewhere the key means nothing and is left out;
# where it applies but the layout cannot run it (data_replicate not dividing data, hpZ below
# ZeRO-3), the layout is pruned with the key named.
CARRIED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "reduce_dtype": (("fsdp2",), None),
    "fsdp_wrap": (("fsdp2",), None),
    "data_replicate": (("fsdp2",), None),
    "async_tp": (("fsdp2",), "tensor"),
    "loss_parallel": (("ddp", "fsdp2"), "tensor"),
    "pipeline_return_outputs": (("ddp", "fsdp2"), "pipeline"),
    "gradient_as_bucket_view": (("ddp",), None),
    "deepspeed": (("deepspeed",), None),
    "make_vocab_size_divisible_by": (("megatron", "deepspeed", "fsdp2", "ddp"), None),
    "expert_capacity_factor": (("megatron", "deepspeed", "fsdp2", "ddp"), None),
}


TORCH_PIPELINE_ENGINES = ("ddp", "fsdp2")
"""Engines whose pipeline layouts run torch.distributed.pipelining (its schedules, its step)."""
TORCH_PIPELINE_NOTE = (
    "torch-pipelined rows (engines ddp, fsdp2) call the schedule's step(return_outputs=False), "
    "as torchtitan's trainer does: torch's default keeps the last stage's output of every "
    "micro-batch until the step ends (memplan.activations.pipeline), the same step time for "
    "more memory (set parallelism.pipeline_return_outputs in the spec to pin it)."
)


def carried_knobs(spec: Spec) -> dict[str, object]:
    """The spec's `parallelism` keys (CARRIED) it sets itself, as a plan keeps them."""
    par = spec.parallelism
    return {k: getattr(par, k) for k in CARRIED if k in par.model_fields_set}


def layout_spec(base: dict[str, Any], carried: dict[str, object]) -> ParallelismSpec | str:
    """The `parallelism` of one searched layout (`base`: its engine, degrees and schedule),
    with the trainer's step(return_outputs=False) on torch's pipeline schedules
    (TORCH_PIPELINE_NOTE) and the spec's `carried` keys that apply to it; or why it is pruned:
    the engine cannot run it, or a carried key cannot (named)."""
    engine = base["engine"]
    if base["pipeline"] > 1 and engine in TORCH_PIPELINE_ENGINES:
        base = {**base, "pipeline_return_outputs": False}
    try:
        par = ParallelismSpec(**base)
    except ValueError:
        return "engine cannot run this layout"
    knobs = {key: value for key, value in carried.items() if _applies(key, base)}
    if not knobs:
        return par
    try:
        return ParallelismSpec(**{**base, **knobs})
    except ValueError:
        pass
    refused = [k for k, v in knobs.items() if not _runs(base, k, v)] or list(knobs)
    return f"the spec's {', '.join(f'parallelism.{k}' for k in refused)} cannot run this layout"


def _applies(key: str, base: dict[str, Any]) -> bool:
    """Whether the carried `key` means anything on the layout `base` (CARRIED)."""
    engines, degree = CARRIED[key]
    return base["engine"] in engines and (degree is None or base[degree] > 1)


def _runs(base: dict[str, Any], key: str, value: object) -> bool:
    """Whether the layout `base` runs with the one carried key `key` set to `value`."""
    try:
        ParallelismSpec(**{**base, key: value})
    except ValueError:
        return False
    return True


def search_engines(spec: Spec) -> tuple[str, ...]:
    """The engines a plan of `spec` searches: plan.engines that its model implementation
    runs under (IMPLEMENTATION_ENGINES)."""
    p = spec.plan or PlanSpec()
    runs = IMPLEMENTATION_ENGINES[spec.model.implementation]
    return tuple(e for e in p.engines if e in runs)


def search_notes(spec: Spec, engines: tuple[str, ...]) -> tuple[str, ...]:
    """What a plan of `spec` searched differently from what it asked: engines its model code
    does not run under, how compile was chosen, the GPU the step time assumes."""
    p = spec.plan or PlanSpec()
    out = []
    left = [e for e in p.engines if e not in engines]
    if left:
        out.append(
            f"model.implementation {spec.model.implementation} runs under "
            f"{', '.join(IMPLEMENTATION_ENGINES[spec.model.implementation])}: plan.engines "
            f"{', '.join(left)} not searched."
        )
    compile_note = _compile_note(spec)
    if compile_note:
        out.append(compile_note)
    carried = carried_knobs(spec)
    if "pipeline_return_outputs" not in carried and set(engines) & set(TORCH_PIPELINE_ENGINES):
        out.append(TORCH_PIPELINE_NOTE)
    if carried:
        kept = "; ".join(
            f"{k} {_shown(v)} ({', '.join(e for e in CARRIED[k][0] if e in engines)}"
            + (f", {CARRIED[k][1]} > 1" if CARRIED[k][1] else "")
            + ")"
            for k, v in carried.items()
        )
        out.append(
            f"kept from the spec's parallelism on the layouts they apply to: {kept}; every "
            "row that has them names them (--emit)."
        )
    if not spec.hardware.gpu:
        out.append(
            "no hardware.gpu named: layouts are ranked by the H100-80GB's speed "
            "(memplan.hardware.CATALOG); name hardware.gpu to rank by another GPU's."
        )
    return tuple(out)


def _shown(value: object) -> str:
    """A carried key's value as the spec writes it."""
    if hasattr(value, "model_dump"):
        return str(value.model_dump(mode="json", exclude_defaults=True))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _compile_note(spec: Spec) -> str:
    """How the rows' training.compile was chosen, and what it does to their step time."""
    code = spec.model.implementation
    if "compile" in spec.training.model_fields_set:
        return ""  # the spec pins it: every row says it (shared_assumptions, --emit)
    if len(IMPLEMENTATION_COMPILE[code]) == 1:
        return f"training.compile is not modelled for model.implementation {code}: not searched."
    if code in COMPILE_SPEEDUP_CODE:
        return (
            f"training.compile searched (set it in the spec to pin it): a compiled row's compute "
            f"runs {COMPILE_SPEEDUP:.3f}x faster (torchtitan's published Llama 3.1 8B TPS/GPU, "
            "compile against eager: memplan.plan.steptime.COMPILE_SPEEDUP)."
        )
    return (
        "training.compile searched (set it in the spec to pin it): no compile speed-up is "
        f"published for the {code} model code, so a compiled row takes its eager twin's step time "
        "and ranks by its memory; where compile leaves the saved tensors as eager, no compiled "
        "row is listed."
    )
