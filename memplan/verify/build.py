"""Build the real model (transformers, random init), the real torch optimizer, and the one
adapter verify adds: fp32 master weights for *-mixed recipes on one process or DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memplan.errors import MemplanError
from memplan.precision import TORCH_NAMES, Recipe
from memplan.spec import Spec
from memplan.verify.job import TORCH_OPTIMIZERS

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


def build_model(config: dict[str, Any], dtype: torch.dtype, device: str) -> nn.Module:
    """`AutoModelForCausalLM.from_config` (random init, nothing downloaded), or the class the
    config's `architectures` names when the Auto mapping has none."""
    import transformers

    cfg = hf_config(config)
    auto: Any = transformers.AutoModelForCausalLM  # untyped classmethods
    torch.manual_seed(SEED)
    with torch.device(device):
        try:
            model = auto.from_config(cfg, dtype=dtype)
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
            model = cls._from_config(cfg, dtype=dtype)
    assert isinstance(model, nn.Module)
    model.train()
    return model


def decoder_layers(model: nn.Module, count: int) -> nn.ModuleList | None:
    """The ModuleList of the `count` repeated decoder blocks (model.layers, transformer.h...)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0:
            return module
    return None


def optimizer_class(spec: Spec) -> type[torch.optim.Optimizer]:
    cls = getattr(torch.optim, TORCH_OPTIMIZERS[spec.optimizer.name])
    assert isinstance(cls, type)
    return cls


def optimizer_kwargs(spec: Spec) -> dict[str, Any]:
    """The spec's optimizer settings as torch.optim keyword arguments."""
    opt = spec.optimizer
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
