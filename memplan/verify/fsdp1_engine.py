"""torch FSDP1 (`FullyShardedDataParallel`) as `memplan verify` runs it: wrapped as accelerate
1.16 wraps a transformers model for transformers 5.25's Trainer with `fsdp_version: 1`
(memplan.states.engines.fsdp1), and the storage tracker its peak is measured with.

On CPU ranks FSDP1 needs `device_id=torch.device("cpu")` (torch 2.13 fsdp/_init_utils.py::
_init_device_handle raises "FSDP needs a non-CPU accelerator device, but no accelerator
device is detected." for None) and sync_module_states=False (True raises "The module has CPU
parameters or buffers when `sync_module_states=True`, which requires them to be on GPU.");
every rank builds the model from the same seed, so the broadcast would change nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn

from memplan.verify import build, measure


def wrap(
    model: nn.Module, layers: nn.ModuleList | None, *, stage: int, recipe: Any, device: str
) -> nn.Module:
    """FullyShardedDataParallel over `model`: transformer_auto_wrap_policy of the decoder
    layer class (accelerate's TRANSFORMER_BASED_WRAP of `_no_split_modules`), the root unit
    holding the rest; use_orig_params=True, limit_all_gathers=True, no backward or forward
    prefetch (the Trainer's defaults); under a *-mixed recipe accelerate's
    MixedPrecision(param_dtype, reduce_dtype, buffer_dtype all the compute dtype)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    strategy = {3: "FULL_SHARD", 2: "SHARD_GRAD_OP", 0: "NO_SHARD"}[stage]
    classes = {type(block) for block in layers or []}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    mixed = None
    if recipe.master_weights:
        low = build.torch_dtype(recipe.parameters)
        mixed = MixedPrecision(param_dtype=low, reduce_dtype=low, buffer_dtype=low)
    index = torch.cuda.current_device() if device == "cuda" else None
    return FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy[strategy],
        auto_wrap_policy=policy if classes else None,
        mixed_precision=mixed,
        sync_module_states=device == "cuda",
        backward_prefetch=None,
        forward_prefetch=False,
        use_orig_params=True,
        limit_all_gathers=True,
        device_id=torch.device("cuda", index) if index is not None else torch.device("cpu"),
    )


def saved_tensors(
    record: measure.SavedTensors, model: nn.Module, layers: nn.ModuleList | None
) -> contextlib.AbstractContextManager[measure.SavedTensors]:
    """memplan.verify.measure.saved_tensors over FSDP1's units: auto-wrap replaced each decoder
    layer in the model's ModuleList (`layers`) with its FullyShardedDataParallel wrapper. The
    layer's entry is taken at the layer itself, after the wrapper has gathered its flat
    parameter (the unsharded views then count as parameters, not activations); its exit at
    the wrapper, after the reshard has freed them (an activation later made at their address
    is then counted)."""
    if layers is None:
        return measure.saved_tensors(record, model, None)
    inner = nn.ModuleList([getattr(block, "_fsdp_wrapped_module", block) for block in layers])
    return measure.saved_tensors(record, model, inner, wrappers=layers)


def storage_tracker() -> Any:
    """torch's MemTracker without its per-module statistics: its module pre-forward hook
    registers a post-accumulate-grad hook on every parameter, which FSDP1's unsharded views
    (use_orig_params=True) refuse ("post accumulate grad hooks cannot be registered on
    non-leaf tensors"). The storage accounting is MemTracker's own: every op's output
    storage, freed by weakref, and UntypedStorage.resize_, with which FSDP1 frees and
    re-allocates its unsharded flat parameters."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StorageTracker(MemTracker):  # type: ignore[no-untyped-call]
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

    return StorageTracker()
