"""Measure bytes by the storages that exist, deduplicated, category by category.

A tensor's bytes are its *storage's* bytes (`untyped_storage().nbytes()`), counted once per
storage: tied weights, views and FSDP2's padded shards then count exactly what is allocated.
Real storages are keyed by `data_ptr()`; fake ones (FakeTensorMode) have none, so they are
keyed by their StorageImpl (`_cdata`). DTensors are measured by their local shard (`local`).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_LAYER = re.compile(r"\.(\d+)\.")


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds the memory: a DTensor's rank-local tensor, the result inside an
    AsyncCollectiveTensor (what `DTensor.to_local()` returns after an async redistribute),
    the tensor itself otherwise. Wrapper subclasses with one inner tensor (a DTensor's other
    flattened attribute is its mesh) are unwrapped by their `__tensor_flatten__`, not by
    `to_local()`, an autograd op: this runs inside saved-tensor hooks."""
    while is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = [x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor)]
        if len(inner) != 1:
            break
        t = inner[0]
    return t


def storage_key(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    if isinstance(t, FakeTensor):
        return int(storage._cdata)
    return int(storage.data_ptr())


def storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def layer_of(name: str) -> int | None:
    """`model.layers.3.mlp.up_proj.weight` -> 3 (the first index in the name)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class Ledger:
    """Bytes per category, each storage counted once across all categories (first wins)."""

    seen: set[int] = field(default_factory=set)
    bytes: dict[str, int] = field(default_factory=dict)
    layer_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of storages that belong to a decoder layer (for --layers extrapolation)."""

    def add(self, category: str, t: torch.Tensor, layer: int | None = None) -> None:
        t = local(t)
        key = storage_key(t)
        self.bytes.setdefault(category, 0)
        if key in self.seen:
            return
        self.seen.add(key)
        n = storage_bytes(t)
        self.bytes[category] += n
        if layer is not None:
            self.layer_bytes[category] = self.layer_bytes.get(category, 0) + n


def model_states(
    model: nn.Module,
    optimizer_state: dict[torch.Tensor, dict[str, object]],
    *,
    masters: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
    extra_buffers: Iterable[tuple[str, torch.Tensor]] = (),
) -> Ledger:
    """Parameters, gradients, buffers, master weights and each optimizer state by name.

    `optimizer_state` is `optimizer.state` (param -> {name: tensor}); `masters` pairs each
    module parameter with the fp32 copy the optimizer updates (*-mixed recipes);
    `extra_buffers`, tensors the model holds outside its parameters and buffers (QLoRA's
    quantization state, memplan.verify.peft_support.quant_states), counted as buffers.
    """
    ledger = Ledger(bytes={"parameters": 0, "gradients": 0, "buffers": 0})
    names = {id(p): n for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        ledger.add("parameters", p, layer_of(name))
    for name, b in [*model.named_buffers(), *extra_buffers]:
        ledger.add("buffers", b, layer_of(name))
    for name, p in model.named_parameters():
        if p.grad is not None:
            ledger.add("gradients", p.grad, layer_of(name))
    layer_by_tensor: dict[int, int | None] = {}
    for param, master in masters:
        layer = layer_of(names.get(id(param), ""))
        layer_by_tensor[id(master)] = layer
        ledger.add("master_weights", master, layer)
    for name, p in model.named_parameters():
        layer_by_tensor.setdefault(id(p), layer_of(name))
    for updated, state in optimizer_state.items():
        layer = layer_by_tensor.get(id(updated))
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                ledger.add(str(key), value, layer)
    return ledger


def optimizer_state_names(ledger: Ledger) -> list[str]:
    fixed = {"parameters", "gradients", "buffers"}
    return [name for name in ledger.bytes if name not in fixed]


@dataclass
class Saved:
    """One storage autograd saved: its bytes, whether a decoder layer owns it, and a weak
    reference to each saved tensor that holds it (what the pack hook returned, which the
    graph's node keeps until it is freed)."""

    nbytes: int
    in_layer: bool
    holders: list[weakref.ref[torch.Tensor]] = field(default_factory=list)

    def alive(self) -> bool:
        return any(ref() is not None for ref in self.holders)


@dataclass
class SavedTensors:
    """Bytes autograd saves for backward and holds when the forward ends (the backward's
    start), each storage once, parameters and buffers excluded (their storages are model
    states). `layer` attributes a storage to the decoder layer whose forward saved it first.

    A saved tensor whose node the forward drops (a branch the loss does not reach: the router's
    group selection in DeepSeek-style MoE, the chunked delta rule's intermediate products) is
    freed mid-forward: it is no memory at the backward's start, and its address may be handed
    out again to a later saved storage (CPU malloc and CUDA's caching allocator both reuse a
    freed block). So a storage is known by its address *and* a weak reference to each saved
    tensor that holds it: a key whose holders are all gone is free, and a save there is a new
    storage. `bytes` and `layer_bytes` are the storages some saved tensor still holds when the
    recording ends (`close`, at the exit of `saved_tensors`), the definition the profile trace
    counts (memplan/verify/trace/forward.py::trace_once)."""

    exclude: dict[int, list[weakref.ref[torch.Tensor]]] = field(default_factory=dict)
    """The model's parameters and buffers by their storage's key when `saved_tensors` took them
    (layer entry and exit): a saved storage under one of these keys is a model state only if
    one of those tensors still holds its storage there (`is_model_state`)."""
    saved: dict[int, Saved] = field(default_factory=dict)
    """The storage each key holds now (the latest saved at that address)."""
    bytes: int = 0
    layer_bytes: int = 0
    layer: int | None = None
    shared: set[int] = field(default_factory=set)
    """Storages every layer receives besides its hidden state (RoPE's cos/sin, masks): made once
    per forward, so a layer that saves them does not own them (--layers extrapolation)."""

    def is_model_state(self, key: int) -> bool:
        """Whether a parameter or buffer holds its storage at `key` at the moment of the save.

        The set of keys alone is not enough: a module may move a parameter's data inside a
        layer, after the set was taken (bitsandbytes 0.50.2 nn/modules.py::Linear4bit.forward
        casts a bias of another dtype than its input's, `bias.data = bias.data.to(x.dtype)`:
        the q/k/v biases prepare_model_for_kbit_training made fp32). The old storage is then
        freed, and a tensor the layer saves later may be allocated at its address (the CPU's
        malloc and CUDA's caching allocator both hand a freed block out again), or the old
        storage itself may be held and saved: either is an activation, not a model state.
        Each tensor is held by a weak reference, so taking the set keeps no storage alive."""
        for ref in self.exclude.get(key, ()):
            held = ref()
            if held is not None and storage_key(local(held)) == key:
                return True
        return False

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Record `t`'s storage; the node holds a detached alias of `t` (torch/autograd/graph.py::
        saved_tensors_hooks, 2.13: "To avoid reference cycle, the return value of pack_hook
        cannot hold a reference to the input tensor"). Returning `t` itself makes a node that
        saves its own output hold that output, whose grad_fn is the node: a cycle through C++
        that no collector frees, so the outputs saved by nodes the forward drops (the chunked
        delta rule's exp(cum_decay), 33,280 B in benchmarks/profile_verify.py's qwen3_5_text)
        stayed allocated through the step, memory a run without hooks frees (the bytes live at
        the forward's end, torch's MemTracker: 74,640,904 without hooks and with this one,
        74,674,184 with `lambda t: t`)."""
        held = t.detach()
        t_local = local(t)
        key = storage_key(t_local)
        entry = self.saved.get(key)
        if entry is not None and not entry.alive():  # freed: the address holds a new storage
            entry = None
        if entry is None:
            if self.is_model_state(key):
                return held
            in_layer = self.layer is not None and key not in self.shared
            entry = self.saved[key] = Saved(storage_bytes(t_local), in_layer)
        entry.holders.append(weakref.ref(held))
        return held

    def close(self) -> None:
        """Count the storages a saved tensor holds now (the recording's end: the forward and
        its loss are done, the backward has not begun)."""
        held = [s for s in self.saved.values() if s.alive()]
        self.bytes = sum(s.nbytes for s in held)
        self.layer_bytes = sum(s.nbytes for s in held if s.in_layer)


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict of a module call's arguments."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@contextmanager
def saved_tensors(
    record: SavedTensors,
    model: nn.Module,
    layers: nn.ModuleList | None,
    wrappers: nn.ModuleList | None = None,
) -> Iterator[SavedTensors]:
    """Record into `record` what the forward inside the block saves
    (torch.autograd.graph.saved_tensors_hooks), counted at the block's exit
    (SavedTensors.close): the caller holds the loss until then, as the backward would.

    The set of parameter storages is taken again at each layer's entry and exit (replaced, not
    extended), so the unsharded parameters FSDP2 gathers for a layer are excluded while they
    live, and an address freed by a reshard cannot hide a later activation; a parameter whose
    data a module moves inside a layer is excluded at its old address no longer
    (SavedTensors.is_model_state). `wrappers`: the
    modules around the layers whose forward gathers and frees their parameters (FSDP1's
    FullyShardedDataParallel units, memplan.verify.fsdp1_engine); the exit is then taken
    after the wrapper's, once the layer's unsharded parameters are freed."""

    def model_storages() -> dict[int, list[weakref.ref[torch.Tensor]]]:
        out: dict[int, list[weakref.ref[torch.Tensor]]] = {}
        for t in [*model.parameters(), *model.buffers()]:
            out.setdefault(storage_key(local(t)), []).append(weakref.ref(t))
        return out

    record.exclude = model_storages()
    handles = []
    if layers is not None:
        for index, block in enumerate(layers):

            def enter(
                _m: nn.Module,
                args: tuple[object, ...],
                kwargs: dict[str, object],
                index: int = index,
            ) -> None:
                record.exclude = model_storages()
                record.layer = index
                # Everything but the hidden state (the first argument) is made outside the layer.
                extra = _tensors((args[1:], kwargs))
                record.shared |= {storage_key(local(t)) for t in extra}

            def leave(_m: nn.Module, _a: object, _o: object) -> None:
                record.exclude = model_storages()
                record.layer = None

            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
            outer = wrappers[index] if wrappers is not None else block
            handles.append(outer.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
            yield record
        record.close()
    finally:
        for handle in handles:
            handle.remove()
