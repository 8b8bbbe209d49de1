"""What a verify run will do, decided before torch is imported: the model config, the spec the
prediction uses, the path (one process, torch.distributed ranks, or fake tensors), and whether
the run fits in free memory. Refusals are `MemplanError`s that say what to do instead (what
verify cannot realise at all: memplan.verify.refusals).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from memplan.config.load import LoadedSpec
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model import sources as models
from memplan.model.load import PRESET_DIR, hf_cache_config, read_json
from memplan.model.sources import Inventory
from memplan.precision import Recipe
from memplan.report.estimate import estimate
from memplan.report.result import Report
from memplan.states.engines.deepspeed.sharding import DeepSpeedKnobs
from memplan.states.engines.deepspeed.zero3 import zero3_persistent_elements
from memplan.verify.refusals import check_supported
from memplan.verify.unruled import RULE, Served, is_unruled

Device = Literal["cpu", "cuda"]

Event = Callable[[int, str], None]
"""Progress callback: (rank, "build" | "step" | "done" | "error")."""

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
    over MiCS's shard group where there is one (zero3.zero3_persistent_elements, the
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
        if unruled.lacks_rule(config) or _rule_refuses(inventory, spec):
            return unruled.with_profile(inventory, config, spec)
        return inventory, RULE
    except MemplanError as err:
        raise err.located(field="model", where=loaded.where("model")) from None


def _rule_refuses(inventory: Inventory, spec: Spec) -> bool:
    """Whether the family's hand rule does not cover the spec's setting (memplan.activations.
    rule_refuses): a profile traced now serves, as `memplan estimate` traces one."""
    from memplan.activations import rule_refuses
    from memplan.report.settings import setting_of

    arch = inventory.architecture
    return arch is not None and rule_refuses(arch, setting_of(spec))


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
