"""The decoder layers' working sets, traced: bytes alive beyond the saved tensors while a layer
runs its forward and while the layers run their backward (memplan.verify.trace.profile fits
them; memplan.step.transients.working_sets uses them in place of its generic estimate).

One forward + loss + backward under FakeTensorMode, as the real step runs it
(memplan/verify/rank.py::_step: only the loss kept, the backward outside the autocast region),
with a TorchDispatchMode that counts every storage an op makes (parameters and buffers
excluded; a parameter's gradient leaves the count when torch accumulates it: the step's
timeline holds gradients on their own), freed when its last tensor goes (a weakref finalizer on
the storage, as torch 2.13 torch/distributed/_tools/mem_tracker.py::MemTracker tracks
storages). What it records:
- forward, after each op of decoder layer i: the bytes alive, less the saved tensors of the
  embeddings and layers 0..i (what memplan's timeline holds at its forward point,
  memplan.step.terms._activations_by_phase): what the layer holds beyond them (its
  temporaries, the cast copies CPU autocast caches, what earlier layers made and nobody
  saved).
- backward, after each op from the gradient of the last layer's output on to the end of the
  backward: the bytes alive (gradients excluded), less every layer's and the embeddings' saved
  tensors (the timeline's backward point holds all of them: the first layer's backward with
  everything still saved): the output gradient, what checkpointing re-creates, the
  temporaries of the layers' backward.
The same ops run at every traced size, so each op's value is a polynomial over
memplan.model.profile.BASIS (fitted exactly, as the saved tensors are); the working set at a
size is the most of them there. The profile keeps those no other one bounds term by term
(`fitted`).
No torch at import time beyond this edge (memplan/verify/ is the torch importer).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memplan.model.profile import BASIS, terms
from memplan.precision import DTYPE_BYTES
from memplan.verify.trace import fit as fit_

BACKWARD = "backward"
"""The window of the layers' backward (Live.window)."""


class Live(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Bytes alive in storages ops made, after each op, by window (`window()` names the current
    one: a layer block while the forward runs, BACKWARD in the layers' backward, "" outside)."""

    def __init__(self, window: Callable[[], str], skip: set[int]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.window = window
        self.skip = skip
        self.live = 0
        self.sizes: dict[int, int] = {}
        self.series: dict[str, list[int]] = {}
        self.order: list[str] = []
        """The windows in the order ops ran in them, each run of ops once."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        name = self.window()
        if name:
            self.series.setdefault(name, []).append(self.live)
            if not self.order or self.order[-1] != name:
                self.order.append(name)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.sizes or key in self.skip:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def gradient(self, t: torch.Tensor | None) -> None:
        """A parameter's gradient, accumulated: no longer a working-set byte."""
        if t is not None:
            self.live -= self.sizes.pop(t.untyped_storage()._cdata, 0)


@dataclass
class Recorder:
    """One traced size's working sets (filled by memplan.verify.trace.forward.trace_once when
    given one): per op, the bytes alive beyond what the timeline holds there."""

    forward: list[int] = field(default_factory=list)
    """After each op of each decoder layer's forward, in order: bytes alive less the saved
    tensors of the embeddings and the layers up to that one."""
    backward: list[int] = field(default_factory=list)
    """After each op of the layers' backward: bytes alive (gradients excluded) less every
    layer's and the embeddings' saved tensors; empty when no backward ran through them."""
    _live: Live | None = None
    _started: bool = False
    _ended: bool = False

    def mode(self, window: Callable[[], str], skip: set[int]) -> Live:
        self._live = Live(self._window(window), skip)
        return self._live

    def _window(self, forward: Callable[[], str]) -> Callable[[], str]:
        def window() -> str:
            if self._ended:
                return ""
            return BACKWARD if self._started else forward()

        return window

    def watch(self, params: Iterable[torch.nn.Parameter]) -> list[Any]:
        """Hooks: each parameter's gradient leaves the count once accumulated."""
        live = self._live
        if live is None:
            return []
        return [
            p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                lambda p: live.gradient(p.grad)
            )
            for p in params
            if p.requires_grad
        ]

    def pending(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> list[Any]:
        """Hooks: a gradient contribution to a parameter that several nodes feed (a tied
        weight: the LM head's and the embedding's uses of one table) leaves the count when its
        node returns it. Autograd's engine holds it in the parameter's AccumulateGrad input
        buffer until the last contribution arrives and sums them out of place (torch 2.13
        torch/csrc/autograd/input_buffer.cpp::InputBuffer::add; the embedding's backward
        comes after every decoder layer's), so through the layers' backward it is the
        parameter's gradient already, which the step's timeline holds on its own
        (memplan.step.timeline._gradients: the head's share, the tied embedding included), not
        a working-set byte. A parameter one node feeds is accumulated as soon as its node
        returns (AccumulateGrad's sequence number is the highest: it runs next), so its
        gradient leaves the count in `watch` as before."""
        live = self._live
        fn = loss.grad_fn
        if live is None or fn is None:
            return []
        owned = {id(p) for p in params if p.requires_grad}
        feeds: dict[int, list[tuple[Any, int]]] = {}  # AccumulateGrad: (node, output index)
        seen: set[int] = set()
        todo = [fn]
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for index, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                if id(getattr(nxt, "variable", None)) in owned:
                    feeds.setdefault(id(nxt), []).append((node, index))
                else:
                    todo.append(nxt)
        hooks = []
        for fed in feeds.values():
            if len(fed) < 2:
                continue
            for node, index in fed:

                def made(grads: Any, _outputs: Any, index: int = index) -> None:
                    live.gradient(grads[index])

                hooks.append(node.register_hook(made))
        return hooks

    def start_backward(self, output: Any) -> None:
        """The last layer's output: the window BACKWARD opens when its gradient is made."""
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        for t in tensors[:1]:
            if t.requires_grad:
                t.register_hook(self._open)  # type: ignore[no-untyped-call]

    def end_backward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The first layer's input (its hidden states): the window BACKWARD closes when its
        gradient is made (what follows is the embedding's backward: its own term,
        memplan.step.transients.embedding_backward)."""
        first = args[0] if args else kwargs.get("hidden_states")
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(self._close)  # type: ignore[no-untyped-call]

    def _open(self, grad: torch.Tensor) -> None:
        self._started = True

    def _close(self, grad: torch.Tensor) -> None:
        self._ended = self._started

    def windows(self) -> dict[str, list[int]]:
        return self._live.series if self._live is not None else {}

    def in_order(self) -> bool:
        """Whether the layers' forward windows ran once each, in index order: what `close`
        subtracts (the saved tensors of the layers up to the one running) assumes it. A model
        that runs a layer again (Dory's recurrent section, HRM's stacks: transformers 5.25
        modeling_dory.py::DoryModel.forward, modeling_hrm_text.py::HrmTextModel.forward) has
        more saved by then; its working sets are left out (the estimate's serve)."""
        order = [w for w in (self._live.order if self._live else []) if w.startswith("layer.")]
        return order == sorted(set(order), key=lambda w: int(w[6:]))


def layer_window(block: str) -> str:
    """The forward's window: a decoder layer's block (`layer.<i>`), else none."""
    return block if block.startswith("layer.") else ""


def close(recorder: Recorder, records: Iterable[fit_.Record]) -> None:
    """`recorder`'s windows less what the timeline holds there, against the saved storages of
    one forward (`records`, those alive at its end: memplan.verify.trace.forward.trace_once),
    each in its block as the profile lists it (fit_.split: a storage several layers save is the
    embeddings')."""
    by_block = {
        block: sum(r.numel * DTYPE_BYTES[r.dtype] for r in rs)
        for block, rs in fit_.split(list(records)).items()
    }
    windows = recorder.windows()
    if not recorder.in_order():
        return  # forward and backward stay empty: left out (`fitted`)
    layers = sorted(
        {b for b in (*by_block, *windows) if b.startswith("layer.")}, key=lambda b: int(b[6:])
    )
    through = by_block.get("embeddings", 0)
    for block in layers:
        through += by_block.get(block, 0)
        recorder.forward += [v - through for v in windows.get(block, ())]
    recorder.backward = [v - through for v in windows.get(BACKWARD, ())]


def fitted(
    recorders: list[Recorder],
    sizes: list[tuple[int, int]],
    checks: list[tuple[int, int]],
) -> dict[str, list[list[int]]]:
    """The working sets of the traces at `sizes` then `checks` (one recorder each): for
    "forward" and "backward", each op's value over the traces at `sizes` fitted over
    memplan.model.profile.BASIS (over 1, s, s*s when every size has batch 1) as the saved
    tensors are (fit_.solve), only those no other one bounds term by term kept (`envelope`),
    and their most held to the most each check traced, exactly (a check may run a few ops
    fewer: falcon_h1's scan pads nothing at a whole chunk). Where other sizes run other ops (a
    per-token loop), the most at each size is fitted instead, held to the checks the same way.
    A working set left out (no window; a fit that is not integral; a check missed) falls back
    on memplan.step.transients' estimate."""
    columns = [0, 2, 4] if all(b == 1 for b, _ in sizes) else list(range(len(BASIS)))
    rows = [tuple(terms(b, s)[c] for c in columns) for b, s in sizes]
    out: dict[str, list[list[int]]] = {}
    done: dict[tuple[int, ...], tuple[int, ...]] = {}  # many ops leave the same bytes alive
    for name in ("forward", "backward"):
        seen = [getattr(r, name) for r in recorders]
        fits, at_checks = seen[: len(sizes)], seen[len(sizes) :]
        if not all(seen):
            continue
        if len({len(x) for x in fits}) != 1:
            # Other ops at other sizes (a per-token loop: Mamba-1's selective scan, transformers
            # 5.25 modeling_mamba.py::MambaMixer.slow_forward, one step per token): no op to
            # follow across sizes, so the most at each size is fitted, as one polynomial.
            most = _fit(rows, columns, [max(x) for x in fits])
            if most is not None and all(
                _most([most], size) == max(traced)
                for size, traced in zip(checks, at_checks, strict=True)
            ):
                out[name] = [list(most)]
            continue
        polys: set[tuple[int, ...]] = set()
        for column in zip(*fits, strict=True):
            if column not in done:
                poly = _fit(rows, columns, list(column))
                if poly is None:
                    break
                done[column] = poly
            polys.add(done[column])
        else:
            kept = envelope(polys)
            if all(
                _most(kept, size) == max(traced)
                for size, traced in zip(checks, at_checks, strict=True)
            ):
                out[name] = [list(p) for p in kept]
    return out


def _fit(
    rows: list[tuple[int, ...]], columns: list[int], values: list[int]
) -> tuple[int, ...] | None:
    """`values` at the sizes `rows` over BASIS (the terms `columns`), or None where a
    coefficient is not integral (no polynomial of the basis: the fit is left out)."""
    coef = fit_.solve(rows, values)
    if any(c.denominator != 1 for c in coef):
        return None
    full = [0] * len(BASIS)
    for c, value in zip(columns, coef, strict=True):
        full[c] = int(value)
    return tuple(full)


def _most(polys: list[tuple[int, ...]], size: tuple[int, int]) -> int:
    t = terms(*size)
    return max(sum(c * x for c, x in zip(p, t, strict=True)) for p in polys)


def envelope(polys: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The polynomials no other one bounds term by term (each basis term is >= 0 at every
    size, so a bounded one is never the most), largest first at the first basis values."""
    out: list[tuple[int, ...]] = []
    for p in sorted(polys, key=lambda p: tuple(reversed(p)), reverse=True):
        if not any(all(a >= b for a, b in zip(q, p, strict=True)) for q in out):
            out.append(p)
    return out
