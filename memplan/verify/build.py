"""Build the real model (transformers, random init), the real torch optimizer, and the one
adapter verify adds: fp32 master weights for *-mixed recipes on one process or DDP.

The model is the step the spec's `training:` describes (`configure`, `checkpointing`,
`selective`): its attention implementation, dropout forced on or off, no key/value cache,
full activation checkpointing (offload included) or the attention core recomputed. The
activation tests (tests/activation_probe.py, tests/test_activations*.py) build theirs the same
way, so what verify measures is what those tests hold the rules to.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memplan.config.spec import Spec, TrainingSpec
from memplan.errors import MemplanError
from memplan.precision import TORCH_NAMES, Recipe
from memplan.verify.refusals import BNB_OPTIMIZERS, TORCH_OPTIMIZERS, TRANSFORMERS_OPTIMIZERS
from memplan.verify.trace import heads

SEED = 0


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, TORCH_NAMES[name])
    assert isinstance(dtype, torch.dtype)
    return dtype


def hf_config(config: dict[str, Any]) -> Any:
    """A transformers config object from a config.json mapping (no network)."""
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise MemplanError(
            f"transformers cannot make a config for model_type {model_type!r}: {err}"
        ) from None


# The config keys of the dropout probabilities memplan's activation rules read
# (memplan/activations/*.py, `dropout_on(st, extra, key)`): `training.dropout: true` makes each
# one the config has positive, `false` makes every dropout probability of the config 0.
DROPOUT_KEYS = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "embd_pdrop",
    "attn_pdrop",
    "resid_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)
# The probability `dropout: true` gives a key that is 0 in the config (any p in (0, 1) saves
# the same mask: torch Dropout.cpp::_dropout_impl; 0.1 is GPT2Config's default).
FORCED_DROPOUT = 0.1


def _is_probability(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def configure(cfg: Any, training: TrainingSpec) -> None:
    """The spec's step on a transformers config: no key/value cache (a training step keeps
    none: `use_cache` left on makes the layers build a DynamicCache during the forward), and
    dropout forced per `training.dropout` (None: the config's probabilities)."""
    cfg.use_cache = False
    force_dropout(cfg, training.dropout)


def force_dropout(cfg: Any, on: bool | None) -> None:
    """`training.dropout` on a transformers config: True makes each dropout probability the
    config has positive (0 becomes FORCED_DROPOUT), False makes every one 0, None keeps the
    config's."""
    if on is None:
        return
    if on:
        for key in DROPOUT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(cfg, key, float(value) if value > 0 else FORCED_DROPOUT)
        return
    for key, value in cfg.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and _is_probability(value):
            setattr(cfg, key, 0.0)


def build_model(
    config: dict[str, Any],
    dtype: torch.dtype,
    device: str,
    training: TrainingSpec | None = None,
    *,
    unruled: bool = False,
) -> nn.Module:
    """`AutoModelForCausalLM.from_config` (random init, nothing downloaded), or the class the
    config's `architectures` names when the Auto mapping has none or it names a sequence/token
    classification or question-answering head (memplan.verify.trace.heads), configured for
    `training` (`configure`; attention: `eager` asks transformers for eager, `sdpa` for its
    default, which is sdpa wherever the class supports it and eager otherwise, what memplan
    predicts there).

    `unruled` (a model_type with no hand family, predicted from a traced profile): the class
    the trace builds (memplan.verify.trace.forward.head_constructor: the `architectures`
    language-model head, else AutoModelForCausalLM), so both describe one model."""
    import transformers

    cfg = hf_config(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if training is not None:
        configure(cfg, training)
        if training.attention == "eager":
            kwargs["attn_implementation"] = "eager"
    auto: Any = transformers.AutoModelForCausalLM  # untyped classmethods
    kind, head = heads.head_class(config)
    make: Any = auto.from_config
    if unruled:
        from memplan.verify.trace.forward import head_constructor

        make = head_constructor(config)
    if head is not None and kind != "lm":  # a classification / QA head, and its loss
        make = head._from_config
    torch.manual_seed(SEED)
    with torch.device(device):
        try:
            model = make(cfg, **kwargs)
        except ValueError:
            names = config.get("architectures") or []
            cls: Any = next(
                (getattr(transformers, n) for n in names if hasattr(transformers, n)), None
            )
            if cls is None:
                raise MemplanError(
                    f"transformers has no causal-LM class for model_type "
                    f"{config.get('model_type')!r} and the config names none in `architectures`."
                ) from None
            model = cls._from_config(cfg, **kwargs)
    assert isinstance(model, nn.Module)
    model.train()
    if training is not None:
        checkpointing(model, training)
    return model


def attention_built(model: nn.Module) -> str | None:
    """The attention implementation transformers runs (`config._attn_implementation`)."""
    config = getattr(model, "config", None)
    value = getattr(config, "_attn_implementation", None)
    return str(value) if value is not None else None


def checkpointing(model: nn.Module, training: TrainingSpec) -> None:
    """Full activation checkpointing as transformers enables it: each decoder layer under
    torch.utils.checkpoint, non-reentrant (the form memplan's rule assumes: its layer keeps
    the input `_NoopSaveInputs` saves, torch/utils/checkpoint.py::
    _checkpoint_without_reentrant_generator), the layer inputs in pinned host memory with
    `activation_offload` (modeling_utils.py::_activation_checkpointing_enable, save_on_cpu)."""
    if training.activation_checkpointing != "full":
        return
    enable: Any = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise MemplanError(
            f"full cannot be verified for {type(model).__name__}: transformers does not "
            "support activation checkpointing for this class. Verify "
            "activation_checkpointing: none.",
            field="training.activation_checkpointing",
        )
    enable(
        activation_checkpointing_kwargs={"use_reentrant": False},
        offload=training.activation_offload,
    )


@contextlib.contextmanager
def selective(model: nn.Module, training: TrainingSpec) -> Iterator[None]:
    """Selective recomputation (Megatron's --recompute-activations, Korthikanti et al. 2022
    sec. 5): inside the block each attention core (QK^T, softmax, dropout, .V) runs under
    torch.utils.checkpoint (non-reentrant) with q, k, v as its inputs, which is what memplan's
    rule keeps instead (memplan/model/forward/assemble.py::finish). The wrapping is
    memplan.verify.selective.attention_cores, the one the profile trace applies under fake
    tensors: every function transformers' attention interface hands out (eager, sdpa, ...) and
    the modeling modules' `eager_attention_forward`, for any model. A model whose attention
    core is inline (none went through them) is refused: verify cannot recompute only its core."""
    if training.activation_checkpointing != "selective":
        yield
        return
    from memplan.verify.selective import attention_cores, no_core_message

    base: Any = getattr(model, "get_base_model", lambda: model)()
    with attention_cores(base) as cores:
        yield
    if not cores.calls:
        raise MemplanError(no_core_message(base), field="training.activation_checkpointing")


def decoder_layers(model: nn.Module, count: int) -> nn.ModuleList | None:
    """The ModuleList of the `count` repeated decoder blocks (model.layers, transformer.h...)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0:
            return module
    return None


def optimizer_class(spec: Spec) -> type[torch.optim.Optimizer]:
    name = spec.optimizer.name
    if name in BNB_OPTIMIZERS:
        # an optional package (refusals.check_supported says how to install it): not typed here
        optim = importlib.import_module("bitsandbytes.optim")
        cls = getattr(optim, BNB_OPTIMIZERS[name])
    elif name in TRANSFORMERS_OPTIMIZERS:
        from transformers import optimization

        cls = getattr(optimization, TRANSFORMERS_OPTIMIZERS[name])
    else:
        cls = getattr(torch.optim, TORCH_OPTIMIZERS[name])
    assert isinstance(cls, type)
    return cls


# What the HF Trainer passes transformers' Adafactor for `optim="adafactor"` (transformers 5.25
# trainer_optimizer.py::_get_adafactor: `scale_parameter=False, relative_step=False`, and
# trainer.py::get_optimizer_cls_and_kwargs `{"lr": args.learning_rate}`, 5e-5 by default).
HF_TRAINER_ADAFACTOR = {"lr": 5e-5, "scale_parameter": False, "relative_step": False}


def optimizer_kwargs(spec: Spec) -> dict[str, Any]:
    """The spec's optimizer settings as torch.optim keyword arguments."""
    opt = spec.optimizer
    if opt.name == "adafactor-hf":
        return dict(HF_TRAINER_ADAFACTOR)  # one kernel, a loop: no foreach/fused argument
    if opt.name in BNB_OPTIMIZERS:
        return {}  # bitsandbytes' own kernels: no foreach/fused argument
    kwargs: dict[str, Any] = {}
    if opt.name in ("adam", "adamw"):
        kwargs["amsgrad"] = opt.amsgrad
    if opt.name == "sgd":
        kwargs.update(lr=1e-3, momentum=opt.momentum)
    if opt.name == "rmsprop":
        kwargs.update(momentum=opt.momentum, centered=opt.centered)
    if opt.implementation == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = opt.implementation == "foreach"
    return kwargs


@contextlib.contextmanager
def unpacked(fake: bool) -> Iterator[None]:
    """Under FakeTensorMode, tell transformers the batch is not packed, as the real run finds.

    Without a key/value cache, transformers looks for packed sequences in the position ids
    (masking_utils.py::find_packed_sequence_indices); it cannot read a fake tensor's values
    (`is_tracing` is true for FakeTensors), so it keeps a packed-sequence mask, materialises a
    4-D attention mask and repeats k/v for SDPA, which the real run does not. verify's batch
    (`batch`) is one sequence per row (position ids 0 .. s - 1), where the real function returns
    None: the fake run gets that answer without reading values."""
    if not fake:
        yield
        return
    from transformers import masking_utils

    find: Any = masking_utils.find_packed_sequence_indices
    setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)  # noqa: B010
    try:
        yield
    finally:
        setattr(masking_utils, "find_packed_sequence_indices", find)  # noqa: B010


class MasterWeights:
    """The *-mixed recipe on real torch (one process or DDP): the module keeps 16-bit
    parameters and gradients; the torch optimizer updates fp32 copies ("master weights",
    ZeRO paper sec. 3.1). At each step the 16-bit gradients are cast into the masters'
    `.grad` (transient: freed right after the step) and the updated masters are copied back.

    Precision only: it never shards anything (FSDP2 realises the recipe itself with
    MixedPrecisionPolicy; ZeroRedundancyOptimizer partitions whatever it is given).
    """

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype):
        self.params = params
        self.masters = [
            nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=p.requires_grad)
            for p in params
        ]

    def grads_in(self) -> None:
        for master, p in zip(self.masters, self.params, strict=True):
            master.grad = None if p.grad is None else p.grad.to(master.dtype)

    @torch.no_grad()
    def weights_out(self) -> None:
        for master, p in zip(self.masters, self.params, strict=True):
            master.grad = None
            p.copy_(master)


@contextlib.contextmanager
def autocast(recipe: Recipe, device: str) -> Iterator[None]:
    """torch.autocast for amp-* recipes, nothing otherwise."""
    if recipe.autocast:
        with torch.autocast(device_type=device, dtype=torch_dtype(recipe.compute)):
            yield
    else:
        yield


def batch(spec: Spec, vocab_size: int, device: str) -> torch.Tensor:
    """Random token ids [micro_batch_size, sequence_length] (also the labels)."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (spec.training.micro_batch_size, spec.training.sequence_length)
    ids = torch.randint(0, vocab_size, shape, generator=generator)
    return ids.to(device)
