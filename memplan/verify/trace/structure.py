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

What the modules cannot show, one forward of the full-depth model does (`Plan.refine`): how
often each layer runs with grad (Dory's recurrent section, HRM's two stacks run in cycles) and
what it saves (a layer the model's own work between sections follows, listed with it). The
layers are where `layer_lists` finds them: one list of the config's layer count, an
encoder-decoder's two stacks, or the lists of transformers' decoder-layer class where the
config counts something else (LongcatFlash's sub-layers, HRM's cache slots).

`keeping(model, plan)` swaps every layer but the first two of each group for a stand-in that
returns its hidden states unchanged, in the structure its group's traced layer returns them
(and carries the layer's plain attributes, e.g. an `attention_type` the model reads to pick a
mask), so one traced forward runs two layers of each kind in their places in the full model.
What the grouping cannot see (a forward that reads a per-layer config list by `layer_idx`)
`check` catches: one forward of the full-depth model at another size, every layer's saved
storages compared with its group's fit, and the embeddings', head's and loss's with the
reduced trace's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

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

    def refine(self, calls: Sequence[int], saves: Sequence[Any]) -> Plan:
        """The groups split by what one forward of the full-depth model showed each layer do:
        `calls[i]`, how often layer i ran with grad enabled (Dory's recurrent section runs
        `n_recurrent_loops` times, HRM's low-level stack more often than its high-level one),
        and `saves[i]`, what it saved (a comparable value: its storages as module, dtype,
        elements). A model's forward can also do work between layers that the trace lists with
        the layer before it (Dory's `self.norm` after its input section, HRM's stack's
        `final_norm`): that layer saves more than the others of its structure. Neither shows in
        the modules; two layers of one group differing here would stand one in for the other
        wrongly. Each part is named `kind[calls=N]` where the call counts differ, else
        `kind[+module]` (a module only this part's layers save under), else
        `kind[from=i]` (its first layer)."""
        if self.keep_all:
            return self
        groups: list[Group] = []
        for g in self.groups:
            parts: dict[tuple[int, Any], list[int]] = {}
            for i in g.layers:
                parts.setdefault((calls[i], saves[i]), []).append(i)
            if len(parts) == 1:
                groups.append(g)
                continue
            for key, idx in parts.items():
                tags = _tags(key, [k for k in parts if k != key], idx[0])
                kind = f"{g.kind[:-1]},{tags}]" if g.kind.endswith("]") else f"{g.kind}[{tags}]"
                groups.append(Group(kind=kind, layers=tuple(idx)))
        return Plan(depth=self.depth, groups=tuple(groups), keep_all=self.keep_all)


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


def _tags(mine: tuple[int, Any], rivals: list[tuple[int, Any]], first: int) -> str:
    """What sets a part of a group (calls, saves: Plan.refine) apart from each rival: `calls=N`
    where the calls differ, else `+module` (a module only this part saves under), else
    `from=i` (its first layer); one tag per rival not already told apart."""
    shown: list[str] = []

    def apart(tag: str, other: tuple[int, Any]) -> bool:
        if tag.startswith("calls="):
            return other[0] != mine[0]
        if tag.startswith("+"):
            return tag[1:] not in {m for m, *_ in other[1]}
        return True

    for other in sorted(rivals, key=lambda r: r[0] == mine[0]):  # other calls first
        if any(apart(t, other) for t in shown):
            continue
        if other[0] != mine[0]:
            shown.append(f"calls={mine[0]}")
            continue
        only = sorted({m for m, *_ in mine[1]} - {m for m, *_ in other[1]})
        shown.append(f"+{only[0]}" if only else f"from={first}")
    return ",".join(dict.fromkeys(shown))


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
    layer's plain attributes (a model may read e.g. `attention_type` off its layers). Where
    its group's first traced layer returned more than a tensor (openai-gpt's Block a list,
    transformers 5.25 modeling_openai.py::Block.forward `outputs = [h] + attn_outputs[1:]`,
    which OpenAIGPTModel.forward indexes), the same structure, with the hidden states in
    place of its first tensor (`like()`: that output, flattened; None before it ran)."""

    def __init__(self, layer: torch.nn.Module, like: Any = None) -> None:
        super().__init__()
        for attr, value in vars(layer).items():
            if not attr.startswith("_") and attr != "training" and _plain(value):
                setattr(self, attr, value)
        self._like = like

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        template = self._like() if self._like is not None else None
        if template is None:
            return hidden_states
        leaves, spec = template
        first = next((k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor)), None)
        if first is None:
            return hidden_states
        out = list(leaves)
        out[first] = hidden_states
        return tree_unflatten(out, spec)


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
def keeping(layers: torch.nn.ModuleList | Sequence[torch.nn.ModuleList], p: Plan) -> Iterator[None]:
    """Within the block, every layer outside `p.kept` is a `_Skipped` stand-in. `layers`: the
    layer list, or the lists (`Layers.lists`' modules) the plan's indices run through in order."""
    if p.keep_all:
        yield
        return
    lists = [layers] if isinstance(layers, torch.nn.ModuleList) else list(layers)
    slots = [(lst, j) for lst in lists for j in range(len(lst))]
    original = [lst[j] for lst, j in slots]
    kept = set(p.kept)
    outputs: dict[str, Any] = {}  # kind: its first traced layer's last output, flattened
    hooks = []
    for g in p.groups:

        def seen(_m: Any, _a: Any, out: Any, kind: str = g.kind) -> None:
            outputs[kind] = tree_flatten(out)

        hooks.append(original[g.traced[0]].register_forward_hook(seen))

    def like(kind: str) -> Any:
        return lambda: outputs.get(kind)

    for i, (lst, j) in enumerate(slots):
        if i not in kept:
            lst[j] = _Skipped(original[i], like(p.kind_of(i)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for (lst, j), layer in zip(slots, original, strict=True):
            lst[j] = layer


@dataclass(frozen=True, slots=True)
class Layers:
    """Where a model's layers are: the lists the trace's layer indices run through, in order."""

    lists: tuple[tuple[str, torch.nn.ModuleList], ...]
    """(module path, list) pairs."""
    encoder_decoder: bool = False
    """An encoder's layer stack, then a decoder's (`stacks`)."""

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [m for _, lst in self.lists for m in lst]


def layer_lists(model: torch.nn.Module, n: int) -> Layers:
    """The model's layers: an encoder-decoder's two stacks (`stacks`); else the ModuleList of
    `n` modules holding the most parameters (`n`: the config's layer count); else, where no
    list has `n` (a config whose count counts something else), every ModuleList of
    transformers' GradientCheckpointingLayer (modeling_layers.py: the base class of its
    models' decoder layers), outermost ones, in module order. transformers 5.25:
    configuration_longcat_flash.py::LongcatFlashConfig.num_hidden_layers is `2 * num_layers`
    (each LongcatFlashDecoderLayer holds two attention sub-layers; the model has `num_layers`
    layers); configuration_hrm_text.py::HrmTextConfig.__post_init__ rewrites
    `num_hidden_layers` to `num_layers_per_stack * H_cycles * (L_cycles + 1)`, the cache
    slots of its recurrence (modeling_hrm_text.py::HrmTextModel.forward runs the L_module's
    and H_module's layer lists several times each)."""
    two = stacks(model)
    if two:
        return Layers(lists=tuple(two), encoder_decoder=True)
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is not None:
        return Layers(lists=((best[1], best[2]),))
    from transformers.modeling_layers import GradientCheckpointingLayer

    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    within = next((n for n, m in model.named_modules() if m is decoder), "")
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if within and name != within and not name.startswith(f"{within}."):
            continue  # outside the decoder (a vision tower's layers)
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue  # inside a layer already found
        if (  # a stand-in (`keeping`) in a layer's place is still one
            isinstance(module, torch.nn.ModuleList)
            and any(isinstance(m, GradientCheckpointingLayer) for m in module)
            and all(isinstance(m, GradientCheckpointingLayer | _Skipped) for m in module)
        ):
            found.append((name, module))
    if not found:
        raise MemplanError(f"no list of {n} layers found in {type(model).__name__}.")
    return Layers(lists=tuple(found))


@contextlib.contextmanager
def counting(layers: Sequence[torch.nn.Module]) -> Iterator[list[int]]:
    """Within the block, how often each of `layers` runs its forward with grad enabled (what it
    saves for backward; a call under torch.no_grad saves nothing)."""
    calls = [0] * len(layers)

    def hook(i: int) -> Any:
        def pre(*_: Any) -> None:
            if torch.is_grad_enabled():
                calls[i] += 1

        return pre

    hooks = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def signature(records: Sequence[Any]) -> tuple[tuple[str, str, int], ...]:
    """What a layer saved in one forward, comparable between layers: its storages' (module
    relative to the layer, dtype, elements), sorted (memplan.verify.trace.fit.Record). An index
    in a module's path is `*`: a module of the model's outside the layer, one per layer in a
    list of its own (`model.norms.3`), names no difference between layers."""
    return tuple(sorted((_INDEX.sub(".*", r.module), r.dtype, r.numel) for r in records))


_INDEX = re.compile(r"\.\d+(?=\.|$)")
