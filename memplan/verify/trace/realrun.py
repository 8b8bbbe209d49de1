"""Weightless modules fake tensors cannot run, run on real tensors in a fake-tensor trace
(memplan.verify.trace.forward.trace_once).

FakeTensorMode has no data, so an op whose output shape depends on data stops it
(torch/_subclasses/fake_tensor.py: DynamicOutputShapeException, DataDependentOutputException).
transformers 5.25 modeling_kolibri1_1.py::Kolibri1_1Indexer.forward, a module with no weights
run under `@torch.no_grad()`, picks the keys each query of a sparse layer attends to with
`starts[batch_idx].unique().tolist()` and `nonzero()`; what it returns is a mask of its input
mask's shape (`visible.clone()`, written in place). Such a module saves nothing for backward;
only the shapes of what it returns enter what later ops save.

`real_runs` gives each module of the model's code a forward that, when that fails so, runs the
same module again on real tensors of its inputs' shapes and dtypes, twice (all zeros, all
ones: opposite masks, every branch on data taken both ways), and returns fake tensors of what
the real run returned. It refuses (MemplanError) a module with parameters or buffers (they are
fake: no real run), one whose real run builds an autograd graph (an output that requires grad:
it would save tensors), and one whose output shapes differ between the two runs (shapes that
depend on data, which no fake trace can size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._pytree import tree_flatten, tree_map

from memplan.errors import MemplanError

_DATA = (DynamicOutputShapeException, DataDependentOutputException)


class _Refused(MemplanError):
    """A module's real run refused: the modules around it do not try theirs."""


@contextlib.contextmanager
def real_runs(model: torch.nn.Module, mode: FakeTensorMode) -> Iterator[list[str]]:
    """Within the block, the modules of the model's code (transformers.models.*) that fake
    tensors cannot run are run on real tensors (module docstring); yields the names of those
    that were, one per call."""
    ran: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    patched = []
    for module in model.modules():
        if not type(module).__module__.startswith("transformers.models."):
            continue
        if "forward" in vars(module):
            continue  # an instance forward of someone else's (a stand-in's, a hook's)
        module.forward = _wrap(module, module.forward, mode, ran, names.get(module, "?"))
        patched.append(module)
    try:
        yield ran
    finally:
        for module in patched:
            del module.forward


def _wrap(
    module: torch.nn.Module, forward: Any, mode: FakeTensorMode, ran: list[str], name: str
) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return forward(*args, **kwargs)
        except _DATA as err:
            out = _real(module, forward, mode, args, kwargs, name, err)
            ran.append(name)
            return out

    return run


def _real(
    module: torch.nn.Module,
    forward: Any,
    mode: FakeTensorMode,
    args: Any,
    kwargs: Any,
    name: str,
    err: Exception,
) -> Any:
    what = f"{name} ({type(module).__name__}) stops fake tensors ({type(err).__name__}: {err})"
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        raise _Refused(f"{what} and has weights, which are fake: it cannot run on real ones.")
    results = []
    with unset_fake_temporarily():
        for fill in (0, 1):

            def real(t: Any, fill: int = fill) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                out = torch.full(tuple(t.shape), fill, dtype=t.dtype)
                return out.requires_grad_(t.requires_grad)

            out = forward(*tree_map(real, args), **tree_map(real, kwargs))
            leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if any(t.requires_grad for t in leaves):
                raise _Refused(
                    f"{what}, and its real run builds an autograd graph (it would save "
                    "tensors for backward, which the trace must see)."
                )
            results.append(out)
    shapes = [
        [tuple(t.shape) for t in tree_flatten(r)[0] if isinstance(t, torch.Tensor)] for r in results
    ]
    if shapes[0] != shapes[1]:
        raise _Refused(
            f"{what}, and run on real tensors its outputs' shapes depend on the data "
            f"({shapes[0]} on zeros, {shapes[1]} on ones): no fake trace sizes them."
        )
    return tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, results[0])
