"""Fine-tuning for `memplan verify`: the spec's `finetune:` realised on the real model.

`prepare` wraps the transformers model as the training job would (peft's `get_peft_model` for
LoRA, `requires_grad_(False)` for `freeze:` patterns), and `optimizer_params` gives the
optimizer what training scripts give it: the trainable parameters only (transformers
trainer.py::Trainer.create_optimizer keeps `p.requires_grad`), with the *-mixed recipe's fp32
masters made for the 16-bit ones only (peft's fp32 adapters are their own masters, as
memplan.states.terms.own_dtype says). QLoRA's base is loaded as transformers loads it
(`quantized`): bitsandbytes 0.46 and later run its 4-bit Linear on the CPU too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.finetune import lora as finetune
from memplan.verify import build


def prepare(spec: Spec, model: nn.Module) -> nn.Module:
    """The model the job trains: `model` itself for a full fine-tune, else wrapped/frozen."""
    ft = spec.finetune
    out = quantized(spec, model) if ft.method == "qlora" else model
    if ft.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=ft.rank,
            lora_alpha=ft.alpha,
            target_modules=_names(ft.target_modules),
            target_parameters=list(ft.target_parameters) if ft.target_parameters else None,
            exclude_modules=_names(ft.exclude_modules),
            modules_to_save=list(ft.modules_to_save) or None,
            lora_dropout=ft.dropout,
            bias=ft.bias,
        )
        out = get_peft_model(out, config, autocast_adapter_dtype=ft.autocast_adapter_dtype)
        out.train()
    for name, p in out.named_parameters():
        if any(finetune.freeze_matches(pattern, name) for pattern in ft.freeze):
            p.requires_grad_(False)
    return out


def quantized(spec: Spec, model: nn.Module) -> nn.Module:
    """QLoRA's base model as a training script loads it: `model` saved, then loaded again by
    transformers with BitsAndBytesConfig(load_in_4bit=True) and the spec's quant_type,
    double_quant, skip_modules and the recipe's compute dtype (transformers' own choice of the
    modules to quantize: quantizers/quantizer_bnb_4bit.py, integrations/bitsandbytes.py::
    replace_with_bnb_linear); then peft's prepare_model_for_kbit_training (`prepare_kbit`),
    which freezes the model and casts every other 16-bit parameter to fp32. Checkpointing is
    enabled as for any model (memplan.verify.build.checkpointing: transformers then makes the
    embedding's output require grad, what prepare_model_for_kbit_training's own
    use_gradient_checkpointing=True does; without checkpointing a script passes False)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MemplanError(
            "finetune.method: qlora is verified with bitsandbytes' own 4-bit Linear, and "
            "bitsandbytes is not installed: pip install 'bitsandbytes>=0.46' (its 4-bit "
            "kernels run on the CPU from 0.46 on).",
            field="finetune.method",
        )
    from transformers import BitsAndBytesConfig

    ft = spec.finetune
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=ft.quant_type,
        bnb_4bit_use_double_quant=ft.double_quant,
        bnb_4bit_compute_dtype=build.torch_dtype(spec.recipe().compute),
        llm_int8_skip_modules=list(ft.skip_modules) if ft.skip_modules is not None else None,
        bnb_4bit_quant_storage=build.torch_dtype(ft.quant_storage),
    )
    device = next(model.parameters()).device
    cls: Any = type(model)
    # transformers' loading imports DeepSpeed where it is installed (integrations/
    # accelerate.py), whose logger prints to stdout: kept off `verify --json`'s stdout.
    quiet = contextlib.redirect_stdout(sys.stderr)
    with tempfile.TemporaryDirectory(prefix="memplan-qlora-") as folder, quiet:
        # Every rank writes and reads its own copy (ranks may be on other hosts): under
        # torch.distributed save_pretrained writes on rank 0 only (transformers 5.25
        # distributed/mixin.py::should_save_on_this_rank), so this model is told to write.
        saving: Any = model
        saving.should_save_on_this_rank = lambda is_main_process: True
        saving.save_pretrained(folder)
        out: nn.Module = cls.from_pretrained(
            folder,
            quantization_config=config,
            dtype=next(model.parameters()).dtype,
            device_map=str(device),
            attn_implementation=getattr(model.config, "_attn_implementation", None),
        )
    out.train()
    if ft.prepare_kbit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            out, use_gradient_checkpointing=False
        )
    build.checkpointing(out, spec.training)
    return out


def quant_states(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of each bitsandbytes 4-bit weight's QuantState (absmax, the code, and with
    double quantization the nested absmax, code and offset: bitsandbytes functional.py::
    QuantState), which are neither parameters nor buffers; memplan lists them with the
    buffers (memplan.model.finetune.qlora.quant_state). Read from each Linear4bit module:
    its weight's, or, where FSDP2 has swapped the weight for a DTensor shard, the copy the
    module keeps (bitsandbytes 0.50.2 nn/modules.py::Params4bit: `self.module.quant_state`,
    fix_4bit_weight_quant_state_from_module: "the quant state got lost when the parameter got
    converted. This happens for example for fsdp")."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if "weight" not in module._parameters:  # peft's wrappers reach their base's
            continue
        weight = module._parameters["weight"]
        state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        name = f"{module_name}.weight"
        nested = getattr(state, "state2", None)
        for key, t in (
            ("absmax", state.absmax),
            ("quant_map", state.code),
            ("nested_absmax", getattr(nested, "absmax", None)),
            ("nested_quant_map", getattr(nested, "code", None)),
            ("offset", getattr(state, "offset", None)),
        ):
            if isinstance(t, torch.Tensor):
                yield f"{name}.{key}", t


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
