"""The values of the tensors a fake-tensor trace derives from its input alone (the token ids),
computed on real tensors beside the fake ones, so that model code reading one (`.item()`,
`.tolist()`) runs as it does on the real batch.

FakeTensorMode has no data: `aten._local_scalar_dense` on a fake tensor raises
DataDependentOutputException (torch 2.13's _subclasses/fake_impls.py::local_scalar_dense,
without a ShapeEnv). torch's own constant propagation (_subclasses/fake_tensor.py::
FakeTensorMode._dispatch_impl: ops whose inputs are all constants run on the constants) stops
at tensors of one element (CONSTANT_NUMEL_LIMIT), so a value computed from the [batch,
sequence] ids is lost. XLM checks its padding that way (modeling_xlm.py::XLMModel.forward:
`lengths = (input_ids != self.pad_index).sum(dim=1)`, then `assert lengths.max().item() <=
slen`). The ids the trace feeds are real (zeros, as the trace builds them), so every tensor
made from them by ops that read nothing else (no parameter, buffer or random number) has a
known value: `Values` computes it on CPU tensors as each op runs, and answers
`_local_scalar_dense` with it. A value the model reads from anything else (a router's
choice, a parameter) stays unknown and still raises: the trace does not invent data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
_SCALAR = (aten._local_scalar_dense.default, aten.item.default)


class Values(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Real values of the fake tensors derived from the seeded ones (the module docstring).
    Enter it after the FakeTensorMode; `seed` the input ids."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.real: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def seed(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`fake` holds `real`'s values; returns `fake`."""
        self.real[fake] = real
        return fake

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        known = bool(tensors) and all(t in self.real for t in tensors)
        if known and func in _SCALAR:
            with _disable_current_modes():
                return self.real[args[0]].item()
        out = func(*args, **kwargs)
        seeded = isinstance(func, torch._ops.OpOverload) and (
            torch.Tag.nondeterministic_seeded in func.tags
        )
        if known and not seeded:
            real_args, real_kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: self.real[t], (args, kwargs)
            )
            try:
                with _disable_current_modes():
                    real_out = func(*real_args, **real_kwargs)
            except Exception:  # noqa: BLE001 - the value stays unknown, as without this mode
                return out
            pairs = zip(pytree.tree_leaves(out), pytree.tree_leaves(real_out), strict=True)
            for fake, real in pairs:
                if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
                    self.real[fake] = real
        else:
            # a known tensor written by an op with unknown inputs: its value, and that of
            # every known tensor sharing its storage (views), is no longer known
            written = {t.untyped_storage()._cdata for t in _written(func, args, kwargs)}
            for t in [t for t in list(self.real) if t.untyped_storage()._cdata in written]:
                del self.real[t]
        return out


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors `func` writes: the arguments its schema marks `Tensor(a!)`."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return out
