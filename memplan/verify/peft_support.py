"""Fine-tuning for `memplan verify`: the spec's `finetune:` realised on the real model.

`prepare` wraps the transformers model as the training job would (peft's `get_peft_model` for
LoRA, `requires_grad_(False)` for `freeze:` patterns), and `optimizer_params` gives the
optimizer what training scripts give it: the trainable parameters only (transformers
trainer.py::Trainer.create_optimizer keeps `p.requires_grad`), with the *-mixed recipe's fp32
masters made for the 16-bit ones only (peft's fp32 adapters are their own masters, as
memplan.states.terms.own_dtype says). QLoRA needs CUDA and bitsandbytes: verify refuses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune


def prepare(spec: Spec, model: nn.Module) -> nn.Module:
    """The model the job trains: `model` itself for a full fine-tune, else wrapped/frozen."""
    ft = spec.finetune
    if ft.method == "qlora":
        raise MemplanError(
            "finetune.method: qlora cannot be verified: bitsandbytes' 4-bit weights need CUDA "
            "and are not built by verify. Verify the same spec with method: lora (the "
            "adapters, gradients and optimizer states are the same); the 4-bit base is held "
            "to bitsandbytes' own tensors by the GPU tests (tests/test_finetune_gpu.py).",
            field="finetune.method",
        )
    out = model
    if ft.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=ft.rank,
            lora_alpha=ft.alpha,
            target_modules=_names(ft.target_modules),
            exclude_modules=_names(ft.exclude_modules),
            modules_to_save=list(ft.modules_to_save) or None,
            lora_dropout=ft.dropout,
            bias=ft.bias,
        )
        out = get_peft_model(model, config, autocast_adapter_dtype=ft.autocast_adapter_dtype)
        out.train()
    for name, p in out.named_parameters():
        if any(finetune.freeze_matches(pattern, name) for pattern in ft.freeze):
            p.requires_grad_(False)
    return out


def _names(value: tuple[str, ...] | str | None) -> Any:
    return list(value) if isinstance(value, tuple) else value


def mastered(model: nn.Module, master: torch.dtype) -> list[nn.Parameter]:
    """The parameters a *-mixed recipe keeps fp32 masters of: trainable, not already held in
    the master dtype."""
    return [p for p in model.parameters() if p.requires_grad and p.dtype != master]


def optimizer_params(model: nn.Module, masters: Any) -> list[torch.Tensor]:
    """What the optimizer updates: the masters (when the recipe has them) and every other
    trainable parameter."""
    if masters is None:
        return [p for p in model.parameters() if p.requires_grad]
    own = {id(p) for p in masters.params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    return [*masters.masters, *rest]


class _NoHook:
    def remove(self) -> None:
        pass


def frozen_without_hooks(tracker: Any, model: nn.Module) -> None:
    """torch's MemTracker registers a gradient hook on every parameter of each module it
    enters (torch/distributed/_tools/mem_tracker.py::MemTracker.
    _track_module_params_and_buffers, 2.13), which raises for a frozen one ("cannot register
    a hook on a tensor that doesn't require gradient"). Marking the frozen parameters as
    already hooked (with handles that remove nothing) lets it track them as parameters."""
    handles = getattr(tracker, "_param_to_grad_hook_handles", None)
    if handles is None:
        return
    for p in model.parameters():
        if not p.requires_grad:
            handles[p] = (_NoHook(), _NoHook())
