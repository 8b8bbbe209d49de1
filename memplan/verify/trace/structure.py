"""Layer kinds read from the model itself: which decoder layers a profile may trace for the rest.

A config can build layers of several structures that `layer_types` does not name: DeepSeek-V3 /
GLM-4.5's `first_k_dense_replace` dense layers before MoE layers, Qwen MoE's `mlp_only_layers`
and `decoder_sparse_step`, Llama 4's `moe_layers` (`interleave_moe_layer_step`) and
`no_rope_layers` (attention with or without RoPE). The model the profile traces is built at its
full depth (under FakeTensorMode: no memory, any size), so every layer keeps its own
`layer_idx` and the full model's config (masks and per-layer choices follow it), and its layers
are grouped by their structure:

- the config's `layer_types` entry (else "decoder");
- every module in the layer: its path and class (a dense MLP and a MoE block differ here; so do
  MiniMax's lightning and softmax attention, MiniMaxLightningAttention and MiniMaxAttention,
  which its `layer_types` also names: a config without the list is split the same way);
- every parameter and buffer: name, shape, dtype;
- every plain attribute of those modules (bool, int, float, str, None, and tuples of them), bar
  `layer_idx` and torch's own (`training`): what a layer decides at construction and reads in
  its forward (Llama 4's `use_rope`, `is_moe_layer`, a sliding window, ...).

`keeping(model, plan)` swaps every layer but the first two of each group for a stand-in that
returns its hidden states unchanged (and carries the layer's plain attributes, e.g. an
`attention_type` the model reads to pick a mask), so one traced forward runs two layers of each
kind in their places in the full model. What the grouping cannot see (a forward that reads a
per-layer config list by `layer_idx`) `check` catches: one forward of the full-depth model at one
size, every layer's saved storages compared with its group's fit, and the embeddings', head's
and loss's with the reduced trace's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from memplan.errors import MemplanError

_PLAIN = (bool, int, float, str, type(None))
_IGNORED_ATTRIBUTES = ("layer_idx", "training")


@dataclass(frozen=True, slots=True)
class Group:
    """Layers of one structure."""

    kind: str
    """The profile block's kind: the `layer_types` entry (else "decoder"), followed by what sets
    this group apart where several share that entry (e.g. `decoder[mlp=DeepseekV3MoE]`)."""
    layers: tuple[int, ...]
    """Their indices in the full model."""

    @property
    def traced(self) -> tuple[int, ...]:
        return self.layers[:2]


@dataclass(frozen=True, slots=True)
class Plan:
    depth: int
    groups: tuple[Group, ...]
    keep_all: bool = False
    """Trace every layer (encoder-decoder stacks: a T5 block hands its position bias to the
    next one, which a stand-in cannot)."""

    @property
    def kept(self) -> tuple[int, ...]:
        if self.keep_all:
            return tuple(range(self.depth))
        return tuple(sorted(i for g in self.groups for i in g.traced))

    @property
    def counts(self) -> dict[str, int]:
        return {g.kind: len(g.layers) for g in self.groups}

    def kind_of(self, index: int) -> str:
        return next(g.kind for g in self.groups if index in g.layers)


def _plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def features(layer: torch.nn.Module) -> dict[str, str]:
    """What the layer is built of and decided at construction, as path -> value."""
    out: dict[str, str] = {}
    for path, module in layer.named_modules():
        where = path or "(layer)"
        out[where] = type(module).__name__
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or attr in _IGNORED_ATTRIBUTES or not _plain(value):
                continue
            out[f"{where}.{attr}"] = repr(tuple(value) if isinstance(value, list) else value)
    for name, p in layer.named_parameters():
        out[f"param {name}"] = f"{tuple(p.shape)} {p.dtype}"
    for name, b in layer.named_buffers():
        out[f"buffer {name}"] = f"{tuple(b.shape)} {b.dtype}"
    return out


def plan(layers: torch.nn.ModuleList, types: Any, *, keep_all: bool = False) -> Plan:
    """The groups of `layers` (the full model's decoder layers); `types` is the built config's
    `layer_types` (config classes fill it in where config.json has none: Llama 4's from
    `no_rope_layers` and `attention_chunk_size`)."""
    n = len(layers)
    bases = [str(t) for t in types] if isinstance(types, list) and len(types) == n else None
    every = [features(layer) for layer in layers]
    # An attribute that is the layer's index (or index + 1) in every layer names the layer, it
    # does not change its forward (e.g. a `layer_number` beside `layer_idx`).
    for path in list(every[0]) if n > 1 else ():
        for off in (0, 1):
            if all(f.get(path) == repr(i + off) for i, f in enumerate(every)):
                for f in every:
                    f.pop(path, None)
    found: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
    described: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    for i, feats in enumerate(every):
        key = (bases[i] if bases else "decoder", tuple(sorted(feats.items())))
        found.setdefault(key, []).append(i)
        described.setdefault(key, feats)
    groups = []
    for key, idx in found.items():
        base = key[0]
        rivals = [described[k] for k in found if k[0] == base and k != key]
        groups.append(Group(kind=_name(base, described[key], rivals), layers=tuple(idx)))
    names = [g.kind for g in groups]
    if len(set(names)) != len(names):  # cannot happen: differing groups have a differing path
        raise MemplanError(f"layer kinds named twice: {names}")
    return Plan(depth=n, groups=tuple(groups), keep_all=keep_all)


def check(
    p: Plan,
    predicted: Mapping[str, list[tuple[str, int]]],
    measured: Mapping[str, list[tuple[str, int]]],
    size: tuple[int, int],
) -> None:
    """The grouping against one forward of the full-depth model at `size`: each layer's saved
    storages (dtype, elements) as its group's fit predicts them, and the embeddings', head's
    and loss's as the reduced trace's. `predicted` is keyed by block name (`layer:<kind>`,
    embeddings, head, loss), `measured` by the full trace's blocks (`layer.<i>`, ...)."""
    for i in range(p.depth):
        kind = p.kind_of(i)
        want = sorted(predicted[f"layer:{kind}"])
        got = sorted(measured.get(f"layer.{i}", []))
        if want != got:
            raise MemplanError(
                f"layer {i} ({kind}) saves {got} at batch x sequence {size} in the full model, "
                f"the traced layers of its kind {want}: the layers differ in a way their "
                "structure does not show, so two of them do not describe the rest."
            )
    for block in ("embeddings", "head", "loss"):
        if sorted(predicted[block]) != sorted(measured.get(block, [])):
            raise MemplanError(
                f"{block}: the full model saves {sorted(measured.get(block, []))} at {size}, the "
                f"reduced trace {sorted(predicted[block])}."
            )


def _name(base: str, mine: dict[str, str], rivals: list[dict[str, str]]) -> str:
    """`base`, or `base[path=value,...]` with, for each rival of the same base, the first path
    whose value sets this group apart from it (attributes before parameters, a path both groups
    have before one only one has, shallow before deep)."""
    if not rivals:
        return base
    shown: list[str] = []
    for other in rivals:
        diff = sorted(
            (p for p in set(mine) | set(other) if mine.get(p) != other.get(p)),
            # attributes before tensors, paths both have before one-sided ones, shallow first
            key=lambda p: (
                p.startswith(("param ", "buffer ")),
                p not in mine or p not in other,
                p.count("."),
                p,
            ),
        )
        if not any(other.get(p) != mine.get(p) for p in shown):
            pick = diff[0]
            shown.append(pick)
    parts = [f"{p}={mine.get(p, '-')}" for p in shown]
    return f"{base}[{','.join(parts)}]"


OWN_EXPERTS_NOTE = (
    "MoE: the experts run the model's own code (not transformers' experts interface, e.g. "
    "Llama 4's Llama4TextExperts: every token through every expert, weighted by its router "
    "score). FakeTensorMode ran it without data, and it stops on any shape that depends on data "
    "(torch/_subclasses/fake_tensor.py: DynamicOutputShapeException), so no saved size depends "
    "on the routing."
)


def experts_interface(model: torch.nn.Module) -> bool:
    """Whether the model's experts dispatch through transformers' experts interface
    (`@use_experts_implementation`: modeling_utils.py::PreTrainedModel.
    _can_set_experts_implementation reads the class's source for it)."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    return bool(can_set()) if callable(can_set) else False


class _Skipped(torch.nn.Module):
    """A layer left out of the trace: returns the hidden states it was given, and carries the
    layer's plain attributes (a model may read e.g. `attention_type` off its layers)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        for attr, value in vars(layer).items():
            if not attr.startswith("_") and attr != "training" and _plain(value):
                setattr(self, attr, value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def stacks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]] | None:
    """An encoder-decoder's two layer stacks, encoder first, as (module path, layers): the
    ModuleList holding the most parameters inside `get_encoder()` and `get_decoder()`; None for
    other models."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for part in (model.get_encoder(), model.get_decoder()):  # type: ignore[operator]
        lists = [m for m in part.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        if not lists:
            raise MemplanError(f"{type(part).__name__} has no list of layers.")
        best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        out.append((names[id(best)], best))
    return out


ENCODER_DECODER_NOTE = (
    "encoder-decoder: traced with the decoder as long as the encoder (labels = the input ids; "
    "the model shifts them right into decoder_input_ids): the profile's sequence is both."
)


@contextlib.contextmanager
def keeping(layers: torch.nn.ModuleList, p: Plan) -> Iterator[None]:
    """Within the block, every layer outside `p.kept` is a `_Skipped` stand-in."""
    if p.keep_all:
        yield
        return
    original = list(layers)
    kept = set(p.kept)
    for i, layer in enumerate(original):
        if i not in kept:
            layers[i] = _Skipped(layer)
    try:
        yield
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
