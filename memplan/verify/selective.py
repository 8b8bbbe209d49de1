"""Selective recomputation on any transformers model: every attention core under
torch.utils.checkpoint, and what the backward re-creates.

memplan's `training.activation_checkpointing: selective` is Megatron's selective recomputation
(--recompute-activations, Korthikanti et al. 2022 sec. 5): the attention core (QK^T, softmax,
dropout, .V, or the SDPA call) is recomputed in backward, everything else is saved. Modern
transformers models call their core through the attention interface
(modeling_utils.py::AttentionInterface.get_interface(impl, eager_attention_forward), e.g.
models/llama/modeling_llama.py::LlamaAttention.forward) or, in a few, `ALL_ATTENTION_FUNCTIONS
[impl]` directly; every such function takes (module, query, key, value, attention_mask,
**kwargs). `attention_cores` wraps each one the interface hands out, and the modeling modules'
own `eager_attention_forward`, so that it runs under `torch.utils.checkpoint(core, q, k, v,
use_reentrant=False)`: the checkpoint keeps q, k, v (torch/utils/checkpoint.py::
_NoopSaveInputs) and re-runs the core in backward. One implementation serves the trace under
FakeTensorMode (memplan.verify.trace.profile) and verify on real tensors (memplan.verify.build).

`recomputed_saves` reports every tensor the checkpoint's recomputation saves in backward
(torch/utils/checkpoint.py::_recomputation_hook.pack_hook, torch 2.13): what one layer's core
re-creates while its backward runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

WRAPPED = "_memplan_recomputed_core"
"""Attribute marking a wrapped attention function (never wrapped twice)."""


NOTE = (
    "selective recomputation: every attention core transformers runs through its attention "
    "interface (eager_attention_forward, sdpa_attention_forward, ...) under "
    "torch.utils.checkpoint, non-reentrant, q, k, v its inputs; `recompute` is what each "
    "core's recomputation re-creates in backward (memplan/verify/selective.py)."
)


def no_core_message(model: nn.Module) -> str:
    """Why selective cannot run on `model`: no attention core went through the interface."""
    name = type(model).__name__
    return (
        f"selective cannot be applied to {name}: its attention did not call "
        "eager_attention_forward or transformers' attention interface (the core is inline in "
        "its attention module), so no attention core could be recomputed. Use "
        "activation_checkpointing: none or full."
    )


@dataclass
class Cores:
    """What `attention_cores` did inside its block."""

    calls: int = 0
    """Attention cores run under the checkpoint (forward only)."""


def _modeling_modules(model: nn.Module | None) -> list[Any]:
    """The transformers modeling modules that define the classes of `model`'s submodules."""
    if model is None:
        return []
    names: dict[str, None] = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith("transformers.models."):
                names.setdefault(cls.__module__)
    return [sys.modules[n] for n in names if n in sys.modules]


@contextlib.contextmanager
def attention_cores(
    model: nn.Module | None = None,
    *,
    recompute_context: Callable[[tuple[torch.Tensor, ...]], contextlib.AbstractContextManager[Any]]
    | None = None,
) -> Iterator[Cores]:
    """Inside the block, every attention core transformers runs is checkpointed (non-reentrant,
    q, k, v its inputs; the mask and keyword arguments reach it through the closure, as they
    reach the core in the forward). `model`: its modeling modules' `eager_attention_forward`
    are wrapped too (for code that calls it without the interface). `recompute_context`: a
    context entered around each core's recomputation in backward, made from the core's inputs
    (q, k, v) when it runs forward (torch.utils.checkpoint's `context_fn`)."""
    from transformers.modeling_utils import AttentionInterface as interface_class

    interface: Any = interface_class  # patched and restored below
    cores = Cores()

    def contexts(inputs: tuple[torch.Tensor, ...]) -> Callable[[], tuple[Any, Any]]:
        def made() -> tuple[Any, Any]:
            inner = recompute_context(inputs) if recompute_context else contextlib.nullcontext()
            return contextlib.nullcontext(), inner

        return made

    def wrap(fn: Any) -> Any:
        if not callable(fn) or getattr(fn, WRAPPED, False):
            return fn

        def run(mod: Any, q: Any, k: Any, v: Any, mask: Any, *args: Any, **kw: Any) -> Any:
            cores.calls += 1

            def core(q: Any, k: Any, v: Any) -> Any:
                return fn(mod, q, k, v, mask, *args, **kw)

            return torch_checkpoint.checkpoint(
                core, q, k, v, use_reentrant=False, context_fn=contexts((q, k, v))
            )

        setattr(run, WRAPPED, True)
        return run

    get_interface = interface.get_interface
    own_item = interface.__dict__.get("__getitem__")
    item = interface.__getitem__

    def get_interface_wrapped(self: Any, impl: str, default: Callable[..., Any]) -> Any:
        return wrap(get_interface(self, impl, default))

    def item_wrapped(self: Any, key: str) -> Any:
        return wrap(item(self, key))

    eager = {
        m: m.eager_attention_forward
        for m in _modeling_modules(model)
        if callable(getattr(m, "eager_attention_forward", None))
    }
    interface.get_interface = get_interface_wrapped
    interface.__getitem__ = item_wrapped
    for module, fn in eager.items():
        module.eager_attention_forward = wrap(fn)
    try:
        yield cores
    finally:
        interface.get_interface = get_interface
        if own_item is None:
            del interface.__getitem__
        else:
            interface.__getitem__ = own_item
        for module, fn in eager.items():
            module.eager_attention_forward = fn


@contextlib.contextmanager
def recomputed_saves(save: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, `save(t)` sees every tensor a non-reentrant checkpoint's recomputation
    saves in backward (the tensors torch.utils.checkpoint keeps for the recomputed ops'
    backward: torch/utils/checkpoint.py::_recomputation_hook, torch 2.13), before torch's own
    pack hook stores it."""
    hook = torch_checkpoint._recomputation_hook
    init = hook.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        pack = self.pack_hook

        def recorded(x: torch.Tensor) -> Any:
            save(x)
            return pack(x)

        self.pack_hook = recorded

    hook.__init__ = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        hook.__init__ = init  # type: ignore[method-assign]
