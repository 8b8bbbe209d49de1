"""What a verify run will do, decided before torch is imported: the model config, the spec the
prediction uses, the path (one process, torch.distributed ranks, or fake tensors), and whether
the run fits in free memory. Refusals are `MemplanError`s that say what to do instead.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from memplan.config.load import LoadedSpec, installed_version
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model import sources as models
from memplan.model.load import PRESET_DIR, hf_cache_config, read_json
from memplan.model.sources import Inventory
from memplan.precision import Recipe
from memplan.report.estimate import estimate
from memplan.report.result import Report
from memplan.states.engines.deepspeed.sharding import DeepSpeedKnobs, zero3_persistent_elements
from memplan.verify.unruled import RULE, Served, is_unruled

Device = Literal["cpu", "cuda"]

Event = Callable[[int, str], None]
"""Progress callback: (rank, "build" | "step" | "done" | "error")."""

# Optimizers verify can build from torch.optim (spec name -> class name). lion and the
# bitsandbytes 8-bit optimizers live in other packages.
TORCH_OPTIMIZERS = {
    "adamw": "AdamW",
    "adam": "Adam",
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adafactor": "Adafactor",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adamax": "Adamax",
}

# Optimizers verify builds from transformers (spec name -> class in transformers.optimization),
# with the keyword arguments the HF Trainer passes (memplan.verify.build.optimizer_kwargs).
TRANSFORMERS_OPTIMIZERS = {"adafactor-hf": "Adafactor"}
# ... and from bitsandbytes (bitsandbytes.optim; paged ones fall back to ordinary tensors on the
# CPU, as memplan.optimizers.is_paged_state has them there).
_BNB = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "adamw": "AdamW", "adam": "Adam"}
BNB_OPTIMIZERS = {
    **{n: c for n, c in _BNB.items() if n.endswith("8bit")},
    **{f"paged_{n}": f"Paged{c}" for n, c in _BNB.items()},
}

# Optimizer steps per run: the first creates the optimizer state lazily, the second is the
# steady state that is measured (and the one whose peak is reported).
STEPS = 2

# The share of MemAvailable (or CUDA free memory) a real run may plan to use; the rest is
# for the interpreter, transformers' import and kernel workspaces.
MEMORY_HEADROOM = 0.8

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The command line of `memplan verify`."""

    device: Device = "cpu"
    nproc: int | None = None
    """Ranks to launch; default: the spec's parallelism.data x tensor (then data = nproc /
    tensor)."""
    layers: int | None = None
    """Build only this many decoder layers (verify exactly, extrapolate to full depth)."""
    fake: bool = False
    """Run under FakeTensorMode: no real memory, any size."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """Everything a rank needs to build and measure (picklable: it crosses mp.spawn)."""

    config: dict[str, Any]
    """config.json of the model that is built (decoder layers already cut to `layers`)."""
    spec: Spec
    """The spec with data = ranks and hardware.device = the run's device."""
    recipe: Recipe
    device: Device
    world: int
    distributed: bool
    """True: ranks on torch.distributed (also for one fsdp2 or ZeroRedundancyOptimizer rank)."""
    fake: bool
    layers: int
    """Decoder layers built."""
    full_layers: int
    """Decoder layers of the spec's model."""
    layer_key: str | None
    """The config key that holds the number of decoder layers."""
    unruled: bool = False
    """No hand-written family serves the model_type: the inventory is the meta build and the
    activations a traced profile (memplan.verify.unruled); the model is built as the trace
    builds it (build.build_model's `unruled`)."""
    served: Served = RULE
    """Where the prediction's activations come from (a rule, a stored or a fresh profile)."""
    persistent_elements: int = 0
    """DeepSpeed ZeRO-3: elements of the all-gather buffers of the parameters kept gathered
    (numel <= stage3_param_persistence_threshold), each padded to a whole number of partitions,
    over MiCS's shard group where there is one (sharding.zero3_persistent_elements, the
    parameters row's), in the built model (the step all-gathers them again: memplan.verify.
    runner.deepspeed_step)."""

    @property
    def engine(self) -> str:
        return self.spec.parallelism.engine

    @property
    def stage(self) -> int:
        return self.spec.parallelism.stage

    @property
    def loss_parallel(self) -> bool:
        """torch's loss_parallel() runs (parallelism.loss_parallel; None: on under TP)."""
        return self.spec.parallelism.loss_parallel is not False

    @property
    def tensor(self) -> int:
        """Tensor-parallel degree (ranks tensor x r + 0 .. tensor - 1 form one TP group)."""
        return self.spec.parallelism.tensor

    @property
    def data(self) -> int:
        """Data-parallel degree: world / tensor."""
        return self.spec.parallelism.data

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank (memplan's rank classes) of global `rank`."""
        return rank // self.tensor

    def tensor_rank(self, rank: int) -> int:
        """The tensor-parallel rank of global `rank` within its TP group."""
        return rank % self.tensor


def model_config(loaded: LoadedSpec) -> dict[str, Any]:
    """The config.json mapping the spec's model names: verify builds from it (random init),
    so a model given only as a parameter count, or a checkpoint with no config.json beside
    it, cannot be built."""
    model = loaded.spec.model
    base = loaded.path.parent if loaded.path else Path.cwd()
    if model.num_parameters is not None:
        raise MemplanError(
            "verify builds the real model, so it needs its architecture: give model.hf_config, "
            "model.preset or model.architecture instead of model.num_parameters.",
            field="model.num_parameters",
            where=loaded.where("model", "num_parameters"),
        )
    if model.architecture is not None:
        return dict(model.architecture)
    if model.preset is not None:
        file = PRESET_DIR / f"{model.preset}.json"
    elif model.hf_id is not None:
        file = hf_cache_config(model.hf_id)
    elif model.safetensors is not None:
        path = model.safetensors if model.safetensors.is_absolute() else base / model.safetensors
        file = (path if path.is_dir() else path.parent) / "config.json"
        if not file.is_file():
            raise MemplanError(
                f"verify builds the model from its config.json, and there is none beside the "
                f"checkpoint ({file}); give model.hf_config.",
                field="model.safetensors",
            )
    else:
        assert model.hf_config is not None  # the spec guarantees exactly one source
        file = model.hf_config if model.hf_config.is_absolute() else base / model.hf_config
    data = read_json(file, what="model config")
    if not isinstance(data, dict):
        raise MemplanError(f"{file} is not a config.json object.", field="model")
    return data


def layer_key(config: dict[str, Any]) -> str | None:
    return next((k for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)


def with_layers(config: dict[str, Any], key: str, layers: int) -> dict[str, Any]:
    """The config with `layers` decoder layers (per-layer lists such as `layer_types` cut)."""
    out = dict(config)
    out[key] = layers
    for name, value in config.items():
        if name.endswith("layer_types") and isinstance(value, list):
            out[name] = value[:layers]
    return out


def check_supported(spec: Spec, recipe: Recipe) -> None:
    """Refuse what verify cannot realise with real torch, saying what can be verified."""
    par = spec.parallelism
    t = spec.training
    if spec.model.implementation == "torchtitan" or t.activation_checkpointing == "selective-op":
        raise MemplanError(
            "model.implementation: torchtitan (and activation_checkpointing: selective-op, its "
            "per-op SelectiveAC) cannot be verified yet: verify builds transformers' model. "
            "tests/test_torchtitan_activations.py proves the rule on torchtitan's own model.",
            field="model.implementation",
        )
    if spec.model.implementation == "litgpt":
        raise MemplanError(
            "model.implementation: litgpt cannot be verified yet: verify builds transformers' "
            "model. tests/test_litgpt_activations.py proves the rule on LitGPT's own model.",
            field="model.implementation",
        )
    if t.checkpoint_every > 1:
        raise MemplanError(
            "training.checkpoint_every > 1 cannot be verified: transformers checkpoints every "
            "decoder layer. Verify checkpoint_every: 1.",
            field="training.checkpoint_every",
        )
    if par.engine == "deepspeed":
        _check_deepspeed(spec, recipe)
        return
    unsupported = [
        f"{key}: {getattr(par, key)}"
        for key in ("pipeline", "expert", "context")
        if getattr(par, key, 1) != 1
    ]
    offload = getattr(par, "offload", None)
    if offload is not None and (offload.optimizer != "none" or offload.parameters != "none"):
        unsupported.append("offload")
    if par.engine not in ("ddp", "fsdp2", "fsdp1") or unsupported:
        what = f"parallelism.engine: {par.engine}" if not unsupported else ", ".join(unsupported)
        raise MemplanError(
            f"{what} cannot be verified yet: verify runs data parallelism with torch "
            "DDP / ZeroRedundancyOptimizer (engine: ddp) or FSDP2 (engine: fsdp2), tensor "
            "parallelism with torch's DTensor, and no offload. Verify the same model with "
            "those, then trust the per-stage rules.",
            field="parallelism",
        )
    if par.tensor > 1:
        if par.engine == "ddp" and par.stage == 1:
            raise MemplanError(
                "parallelism.tensor > 1 with ZeroRedundancyOptimizer (engine: ddp, zero_stage: "
                "1) cannot be verified: it partitions over every rank, not over the "
                "data-parallel group of a TP layout. Verify zero_stage 0 (ddp) or fsdp2.",
                field="parallelism.zero_stage",
            )
        if spec.finetune.method != "full" or spec.finetune.freeze:
            raise MemplanError(
                "parallelism.tensor > 1 with fine-tuning cannot be verified (peft's adapters "
                "are not sharded by the DTensor plan); verify the full fine-tune's layout.",
                field="finetune",
            )
    name = spec.optimizer.name
    if name in BNB_OPTIMIZERS:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MemplanError(
                f"optimizer {name!r} is bitsandbytes.optim.{BNB_OPTIMIZERS[name]}, and "
                "bitsandbytes is not installed: pip install bitsandbytes to verify it.",
                field="optimizer.name",
            )
    elif name in TRANSFORMERS_OPTIMIZERS:
        if importlib.util.find_spec("transformers") is None:
            raise MemplanError(
                f"optimizer {name!r} is transformers' own "
                f"transformers.optimization.{TRANSFORMERS_OPTIMIZERS[name]}, and transformers "
                "is not installed: pip install 'memplan[verify]' (or transformers) to verify it.",
                field="optimizer.name",
            )
    elif name not in TORCH_OPTIMIZERS:
        raise MemplanError(
            f"optimizer {name!r} is not in torch.optim, so verify cannot build it; verifiable: "
            f"{', '.join([*TORCH_OPTIMIZERS, *TRANSFORMERS_OPTIMIZERS, *BNB_OPTIMIZERS])}.",
            field="optimizer.name",
        )
    at_rest = recipe.master_weights or recipe.parameters
    problems = []
    if recipe.gradients != recipe.parameters:
        problems.append(
            f"gradients ({recipe.gradients}) differ from parameters ({recipe.parameters}); "
            "autograd makes gradients in the parameter dtype"
        )
    if recipe.gradient_accumulation:
        problems.append("a separate gradient_accumulation buffer (Megatron main_grad)")
    if recipe.optimizer_states != at_rest:
        problems.append(
            f"optimizer_states ({recipe.optimizer_states}) differ from the tensor the optimizer "
            f"updates ({at_rest}); torch.optim keeps states like that tensor"
        )
    if problems:
        raise MemplanError(
            f"precision recipe {recipe.name!r} cannot be realised with torch.optim: "
            + "; ".join(problems)
            + ". Verifiable presets: fp32, bf16, fp16, amp-bf16, amp-fp16, bf16-mixed, "
            "fp16-mixed.",
            field="precision",
        )


# The precision presets DeepSpeed's config expresses: its `bf16` / `fp16` sections make the
# module 16-bit with an fp32 master partition; no section keeps everything fp32.
DEEPSPEED_PRESETS = ("fp32", "bf16-mixed", "fp16-mixed")

# DeepSpeed's optimizer names for the spec's (deepspeed/runtime/engine.py::
# _configure_basic_optimizer, 0.19.8: FusedAdam, whose `step` is a Python int).
DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}

# Micro-batches per optimizer step in DeepSpeed's config (memplan.verify.deepspeed_engine):
# two, so that the gradients held between micro-batches (ZeRO-1's full .grad) are measured.
DEEPSPEED_MICRO_BATCHES = 2


def _check_deepspeed(spec: Spec, recipe: Recipe) -> None:
    """What verify runs with DeepSpeed's own engine (memplan.verify.deepspeed_engine)."""
    par = spec.parallelism
    others = [
        f"{key}: {getattr(par, key)}"
        for key in ("tensor", "pipeline", "expert", "context")
        if getattr(par, key, 1) != 1
    ]
    offload = par.offload
    if offload.optimizer != "none" or offload.parameters != "none":
        others.append("offload")
    if others:
        raise MemplanError(
            f"{', '.join(others)} with engine deepspeed cannot be verified yet: verify runs "
            "DeepSpeed's data-parallel ZeRO stages 0-3 without offload.",
            field="parallelism",
        )
    if spec.finetune.method != "full" or spec.finetune.freeze:
        raise MemplanError(
            "engine deepspeed with fine-tuning cannot be verified yet; verify the full "
            "fine-tune's layout.",
            field="finetune",
        )
    if spec.optimizer.name not in DEEPSPEED_OPTIMIZERS:
        raise MemplanError(
            f"optimizer {spec.optimizer.name!r} with engine deepspeed cannot be verified: "
            f"verify hands DeepSpeed's config one of {', '.join(DEEPSPEED_OPTIMIZERS)}.",
            field="optimizer.name",
        )
    if recipe.name not in DEEPSPEED_PRESETS:
        raise MemplanError(
            f"precision {recipe.name!r} with engine deepspeed cannot be verified: DeepSpeed's "
            f"config expresses {', '.join(DEEPSPEED_PRESETS)}.",
            field="precision",
        )
    mics = par.deepspeed.mics_shard_size
    installed = installed_version("deepspeed")
    if par.deepspeed.mics and installed is not None and _release(installed) > (0, 19, 2):
        # 0.19.7+: deepspeed/runtime/config.py::_REMOVED_ZERO_CONFIG_KEYS refuses the key
        # ("MiCS ZeRO-3 sharding has been removed"). 0.19.3-0.19.6: stage3.py::partition_grads
        # tests `contains_real_data` with `_get_param_partition_rank(param)`, the rank in the
        # whole data-parallel group, so every shard group but the first skips MiCS's replica
        # all-reduce (mics.py::MiCS_Optimizer.allreduce_mics_shard_grads) and the ranks of
        # the first wait for it: a hang at the first accumulation boundary (run on 4 gloo
        # ranks with mics_shard_size 2, 0.19.6).
        raise MemplanError(
            f"parallelism.deepspeed.mics_shard_size {mics}: deepspeed {installed} is installed "
            "here, and MiCS does not run on it (0.19.7 removed MiCS; 0.19.3 to 0.19.6 hang at "
            "the first accumulation boundary when there is more than one shard group). verify "
            "runs MiCS on deepspeed 0.19.2: DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 pip install "
            "--no-deps --no-build-isolation --target DIR deepspeed==0.19.2, then run with "
            "PYTHONPATH=DIR.",
            field="parallelism.deepspeed.mics_shard_size",
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise MemplanError(
            "parallelism.engine: deepspeed is verified by running DeepSpeed itself, and it is "
            "not installed here. Install it without its CUDA ops: DS_BUILD_OPS=0 "
            "DS_SKIP_CUDA_CHECK=1 pip install --no-deps deepspeed==0.19.8 hjson msgpack "
            "ninja py-cpuinfo (it runs on the CPU with DS_ACCELERATOR=cpu over gloo).",
            field="parallelism.engine",
        )


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a release string such as "0.19.8" or "0.19.6+cpu"."""
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def plan(loaded: LoadedSpec, options: Options) -> tuple[Job, Report, Report | None]:
    """The job, the prediction for what is built, and (with --layers) the full-depth one."""
    spec = loaded.spec
    recipe = spec.recipe()
    if spec.parallelism.engine == "fsdp1" and options.fake:
        raise MemplanError(
            "engine fsdp1 is verified on real tensors: FullyShardedDataParallel flattens and "
            "shards real storages (no --fake). Use --layers K to build K decoder layers.",
            field="parallelism.engine",
        )
    if spec.parallelism.engine == "deepspeed" and (options.fake or options.layers):
        raise MemplanError(
            "engine deepspeed is verified on real tensors at full depth: DeepSpeed's flat "
            "buffers need real storage (no --fake) and span every layer (no --layers).",
            field="parallelism.engine",
        )
    if spec.finetune.method == "qlora" and options.fake:
        raise MemplanError(
            "finetune.method qlora is verified on real tensors: bitsandbytes quantizes real "
            "weights (no --fake). Use --layers K to build K decoder layers.",
            field="finetune.method",
        )
    check_supported(spec, recipe)
    tensor = spec.parallelism.tensor
    world = options.nproc if options.nproc is not None else spec.parallelism.data * tensor
    if world < 1:
        raise MemplanError(f"--nproc must be at least 1, got {world}.")
    if world % tensor:
        raise MemplanError(
            f"--nproc {world} is not a multiple of parallelism.tensor {tensor}: each "
            "data-parallel replica needs all its tensor-parallel ranks.",
            field="parallelism.tensor",
        )
    replicate = spec.parallelism.data_replicate
    if replicate > 1 and (tensor > 1 or world != spec.parallelism.data):
        raise MemplanError(
            f"parallelism.data_replicate {replicate} (HSDP) is verified on exactly `data` "
            f"ranks without tensor parallelism (the replicate x shard mesh is data_replicate x "
            f"data / data_replicate): got {world} ranks, tensor {tensor}.",
            field="parallelism.data_replicate",
        )
    if tensor > 1 and options.fake:
        raise MemplanError(
            "--fake cannot run tensor parallelism: DTensor's sharding and collectives "
            "(uneven vocabulary shards, FSDP2's 2-D mesh) need real tensors. Use --layers K "
            "to build K decoder layers on real tensors and extrapolate to full depth.",
            field="parallelism.tensor",
        )
    if tensor > 1 and spec.parallelism.engine == "ddp" and world > tensor:
        raise MemplanError(
            f"parallelism.tensor {tensor} with engine ddp on {world} ranks (data "
            f"{world // tensor}) cannot be verified: torch's DDP + DTensor composition "
            "(torch/distributed/tensor/parallel/ddp.py) swaps the module's parameters for "
            "local tensors around each forward. Verify data 1 (--nproc "
            f"{tensor}), or engine fsdp2 for the 2-D layout.",
            field="parallelism.data",
        )
    if spec.training.activation_offload and (options.device == "cpu" or options.fake):
        raise MemplanError(
            "cannot be verified on the CPU: transformers offloads "
            "the checkpointed layer inputs to pinned host memory (modeling_utils.py::"
            "_activation_checkpointing_enable, save_on_cpu(pin_memory=True)), and pinned "
            "memory needs an accelerator. Verify it with --device cuda, or verify "
            "activation_offload: false here (the same step with the inputs kept).",
            field="training.activation_offload",
            where=loaded.where("training", "activation_offload"),
        )
    spec = spec.model_copy(
        update={
            "parallelism": spec.parallelism.model_copy(update={"data": world // tensor}),
            "hardware": spec.hardware.model_copy(update={"device": options.device}),
        }
    )
    config = model_config(loaded)
    if tensor > 1:
        from memplan.verify.tensor_parallel import check_model

        check_model(config, tensor)
    key = layer_key(config)
    full_layers = int(config[key]) if key else 0
    layers = full_layers
    if options.layers is not None:
        if key is None:
            raise MemplanError("--layers: the model config names no number of layers.")
        if not 1 <= options.layers <= full_layers:
            raise MemplanError(
                f"--layers must be between 1 and the model's {full_layers} layers, "
                f"got {options.layers}."
            )
        layers = options.layers
    built = with_layers(config, key, layers) if key and layers != full_layers else config
    inventory, served = _inventory(built, loaded, spec)
    report = estimate(spec, inventory)
    full = estimate(spec, _inventory(config, loaded, spec)[0]) if built is not config else None
    par = spec.parallelism
    job = Job(
        config=built,
        spec=spec,
        recipe=recipe,
        device=options.device,
        world=world,
        distributed=world > 1 or par.engine in ("fsdp2", "fsdp1", "deepspeed") or par.stage == 1,
        fake=options.fake,
        layers=layers,
        full_layers=full_layers,
        layer_key=key,
        unruled=is_unruled(config),
        served=served,
        persistent_elements=zero3_persistent_elements(
            (p.numel for p in inventory.parameters), DeepSpeedKnobs.of(report.layout), world
        )
        if par.engine == "deepspeed" and par.stage == 3
        else 0,
    )
    return job, report, full


def _inventory(config: dict[str, Any], loaded: LoadedSpec, spec: Spec) -> tuple[Inventory, Served]:
    """The inventory verify predicts from: the hand family's (with a profile where the family
    has no activation rule), or for a model_type with none the meta build with a traced profile
    (memplan.verify.unruled)."""
    try:
        from memplan.verify import unruled

        if is_unruled(config):
            return unruled.inventory(config, spec, origin="model")
        inventory = models.from_config(config, origin="model")
        if unruled.lacks_rule(config):
            return unruled.with_profile(inventory, config, spec)
        return inventory, RULE
    except MemplanError as err:
        raise err.located(field="model", where=loaded.where("model")) from None


def _modelled(report: Report, part: str, bytes_: int) -> bool:
    """Whether the calculator models `part` (activations, transients): its own flag when it
    has one (`report.<part>_modelled` or `report.<part>.modelled`), else a non-zero figure."""
    flag = getattr(report, f"{part}_modelled", None)
    if flag is None:
        flag = getattr(getattr(report, part, None), "modelled", None)
    if isinstance(flag, bool):
        return flag
    return bytes_ > 0


def activations_modelled(report: Report) -> bool:
    return _modelled(report, "activations", report.activations_bytes)


def transients_modelled(report: Report) -> bool:
    """Transient buffers: DDP buckets, FSDP2 all-gather / reduce-scatter buffers, optimizer
    step temporaries. Until they are modelled the predicted peak is a lower bound."""
    return _modelled(report, "transient", report.transient_bytes)


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where the file does not exist)."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 2**10 if match else None


def required_bytes(job: Job, report: Report, ranks: range | None = None) -> int:
    """Bytes a real run holds at once on this machine: every rank's (or only `ranks`')
    predicted peak (model states, plus activations once modelled) and one more
    parameter-sized copy per rank for the optimizer step's temporaries (field notes: foreach
    adds about one parameter-sized copy at the peak)."""
    total = 0
    for rank in range(job.world) if ranks is None else ranks:
        states = report.states_of(job.data_rank(rank), job.tensor_rank(rank))
        total += (
            states.total_bytes
            + report.buffer_bytes
            + report.activations_bytes
            + report.transient_bytes
            + states.bytes_of("parameters")
        )
    return total


def refuse_if_too_big(
    job: Job, report: Report, free_bytes: int | None, where: str, ranks: range | None = None
) -> None:
    """Raise before anything is allocated when the run (or its `ranks` on this machine, under
    torchrun) would not fit in `free_bytes`."""
    if job.fake or free_bytes is None:
        return
    need = required_bytes(job, report, ranks)
    count = job.world if ranks is None else len(ranks)
    budget = int(free_bytes * MEMORY_HEADROOM)
    if need <= budget:
        return
    from memplan.cli.render import human

    per_layer = ""
    if job.layer_key and job.full_layers > 1:
        per_layer = f" (the model has {job.full_layers} layers)"
    raise MemplanError(
        f"too big to build here: the run needs about {human(need)} ({need:,} B: predicted "
        f"model states of {count} rank(s), plus one parameter copy each for the optimizer "
        f"step) but {where} has {human(free_bytes)} free, of which verify uses "
        f"{MEMORY_HEADROOM:.0%}. Use --layers K to build K decoder layers{per_layer}, verify "
        "them to the byte and extrapolate to full depth, or --fake to run the full model "
        "under FakeTensorMode without real memory."
    )
