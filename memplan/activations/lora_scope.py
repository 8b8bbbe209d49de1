"""Who trains what in a fine-tuned model, by peft's parameter names: each decoder layer's
(and the model ends') modules whose weight trains, those with any trainable parameter, the LoRA
adapters with their shapes and dtype, and the bitsandbytes 4-bit modules (`scopes`).
memplan.activations.lora_flow follows a layer's dataflow through them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memplan.model.finetune import qlora
from memplan.model.finetune.targets import WRAPPED_ROLE
from memplan.model.forward.tensors import Setting
from memplan.model.inventory import Inventory

PEFT_PREFIX = "base_model.model."
PACKED_4BIT = "uint8"
"""The dtype of a bitsandbytes 4-bit weight as the inventory holds it
(memplan.model.finetune.qlora.packed_weight)."""

# peft's adapter parameters: `<module>.lora_A.<adapter>.weight` (and lora_B, its optional
# bias), `<module>.lora_embedding_A.<adapter>` (and B). Everything else is a module's own
# tensor, maybe under base_layer / original_module / modules_to_save.<adapter> (see _plain).
_ADAPTER = re.compile(r"^(?P<m>.+)\.(?P<a>lora_A|lora_B)\.[^.]+\.(weight|bias)$")
_EMB_ADAPTER = re.compile(r"^(?P<m>.+)\.(?P<a>lora_embedding_A|lora_embedding_B)\.[^.]+$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Adapter:
    """One LoRA adapter as the inventory shows it."""

    rank: int
    in_features: int
    out_features: int
    dtype: str
    embedding: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Wrapped:
    """One parameter peft adapts with lora.ParamWrapper (its `target_parameters`: an MoE
    router's weight, the fused 3-D experts' gate_up_proj or down_proj, a decoder layer's
    Linear or Conv1D weight, or an input embedding's or the LM head's), whose adapter is added
    into the parameter in forward
    (memplan.activations.lora_moe.wrapped_saved)."""

    shape: tuple[int, ...]
    """The parameter's shape: [out, in] (one router) or [experts, out, in]."""
    rank: int
    """The LoRA rank per expert (lora_A holds rank x experts rows)."""
    dtype: str
    """The adapters' dtype."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """Trainability of the modules of one decoder layer, or of the modules outside the
    layers (names relative to the layer, or to the model)."""

    weights: frozenset[str] = frozenset()
    """Modules whose weight trains (a trainable copy under modules_to_save counts)."""
    params: frozenset[str] = frozenset()
    """Modules with any trainable parameter (a trainable bias alone makes the output
    require grad, without saving the input)."""
    adapters: tuple[tuple[str, Adapter], ...] = ()
    dropout: float = 0.0
    """peft lora_dropout of the adapters."""
    four_bit: frozenset[str] = frozenset()
    """Modules whose weight is bitsandbytes' packed 4-bit weight (QLoRA's Linear4bit)."""
    wrapped: tuple[tuple[str, Wrapped], ...] = ()
    """Parameters held by a lora.ParamWrapper, by name (`mlp.experts.down_proj`,
    `mlp.down_proj.weight`): their adapters, not in `adapters` (a Linear's weight: `scopes`;
    the MoE block's: memplan.activations.lora_moe.unwrap)."""

    def adapted(self, module: str) -> Adapter | None:
        return next((a for m, a in self.adapters if m == module), None)

    def out_grad(self, module: str, in_grad: bool) -> bool:
        """Whether the module's output requires grad."""
        return in_grad or module in self.params or self.adapted(module) is not None

    def reads_x(self, module: str, st: Setting) -> bool:
        """Whether an adapter on `module` saves the module's input storage itself (lora_A's
        input is x: no dropout, no cast to the adapter's dtype, and no autocast cast — none is
        made where x, the adapter and autocast share one dtype, as with 16-bit adapters on a
        16-bit model: measured, tests/test_lora_adapter_dtype.py)."""
        ad = self.adapted(module)
        return (
            ad is not None
            and not ad.embedding
            and self.dropout == 0
            and ad.dtype == st.matmul
            and (not st.autocast or st.stream == st.matmul)
        )

    def input_saved(self, module: str, st: Setting) -> bool:
        """Whether the module's input is saved: its weight trains, or its adapter reads it."""
        return module in self.weights or self.reads_x(module, st)


def scopes(
    inventory: Inventory, num_layers: int, *, dropout: float, default: str
) -> tuple[tuple[Scope, ...], Scope, bool]:
    """(one Scope per decoder layer, the Scope outside the layers, whether anything is
    frozen), from the parameter names peft gives (tied aliases take their owner's flag).
    `default` is the dtype of tensors without a fixed one."""
    weights: dict[int | None, set[str]] = {}
    params: dict[int | None, set[str]] = {}
    parts: dict[int | None, dict[str, dict[str, tuple[tuple[int, ...], str]]]] = {}
    packed: dict[int | None, set[str]] = {}
    linear_wrapped: dict[int | None, set[str]] = {}
    frozen = False
    owners = {t.name: t for t in inventory.parameters}
    named = [(t.name, t) for t in inventory.parameters]
    named += [(alias, owners[owner]) for alias, owner in inventory.tied if owner in owners]
    for name, t in named:
        frozen |= not t.trainable
        rel = _relative(name.removeprefix(PEFT_PREFIX), t.layer)
        ad = _ADAPTER.match(rel) or _EMB_ADAPTER.match(rel)
        if ad:
            parts.setdefault(t.layer, {}).setdefault(ad["m"], {})[ad["a"]] = (
                t.shape,
                t.dtype or default,
            )
            if t.role == WRAPPED_ROLE:
                linear_wrapped.setdefault(t.layer, set()).add(ad["m"])
            continue
        module, leaf = _plain(rel)
        if leaf == "weight" and (t.dtype == PACKED_4BIT or qlora.is_packed(t)):
            packed.setdefault(t.layer, set()).add(module)
        if t.trainable:
            params.setdefault(t.layer, set()).add(module)
            if leaf == "weight":
                weights.setdefault(t.layer, set()).add(module)

    def scope(layer: int | None) -> Scope:
        found = []
        wrapped = []
        # layer None: the model ends' (an embedding's or the LM head's weight, memplan.
        # activations.lora._ends_wrapped)
        held = linear_wrapped.get(layer, set())
        for module, pair in sorted(parts.get(layer, {}).items()):
            emb = "lora_embedding_A" in pair
            a_shape, dtype = pair["lora_embedding_A" if emb else "lora_A"]
            b_shape, _ = pair["lora_embedding_B" if emb else "lora_B"]
            if module in held:
                # a Linear's weight [out, in] held by a lora.ParamWrapper: the weight the
                # Linear runs on is merged and requires grad (lora_moe.wrapped_saved)
                w = Wrapped(shape=(b_shape[0], a_shape[1]), rank=a_shape[0], dtype=dtype)
                wrapped.append((f"{module}.weight", w))
                continue
            found.append(
                (
                    module,
                    Adapter(
                        rank=a_shape[0],
                        in_features=a_shape[1],
                        out_features=b_shape[0],
                        dtype=dtype,
                        embedding=emb,
                    ),
                )
            )
        trains = frozenset(held)  # as far as what the layer saves goes, the weight trains
        return Scope(
            weights=frozenset(weights.get(layer, ())) | trains,
            params=frozenset(params.get(layer, ())) | trains,
            adapters=tuple(found),
            dropout=dropout,
            four_bit=frozenset(packed.get(layer, ())),
            wrapped=tuple(wrapped),
        )

    return tuple(scope(i) for i in range(num_layers)), scope(None), frozen


def param_wrapped(inventory: Inventory, ends: tuple[str, ...]) -> str:
    """Why the activations cannot be predicted where a lora.ParamWrapper holds a parameter
    outside the decoder layers that is not an input embedding's or the LM head's weight
    (`ends`, the family's ModelEnds modules), or ''. peft 0.21.2 tuners/lora/layer.py::
    ParamWrapper.forward runs the wrapped module on its weight with B @ A merged in
    (_LoraParameterProxy.forward, applied by ParamWrapper._activate_lora); `scopes` and
    memplan.activations.lora_moe.wrapped_saved model it for a decoder layer's Linear (Llama-
    style, GPT-2's Conv1D, Phi-3's fused projections), the MoE router and experts, and the
    model ends (memplan.activations.lora._ends_wrapped), each measured by benchmarks/
    lora_param_wrapper.py or lora_param_wrapper_ends.py."""
    names = sorted(
        {
            m["m"]
            for t in inventory.parameters
            if t.role == WRAPPED_ROLE
            and t.layer is None
            and (m := _ADAPTER.match(t.name.removeprefix(PEFT_PREFIX)))
            and m["m"] not in ends
        }
    )
    if not names:
        return ""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return (
        f"activations with finetune.target_parameters wrapping {names[0]}{more} in "
        "lora.ParamWrapper are not modelled outside the decoder layers but for the input "
        "embeddings and the LM head (not measured): per_gpu.activations is 0 and the peak "
        "leaves them out."
    )


def _relative(name: str, layer: int | None) -> str:
    """A layer's tensor name relative to the layer (`self_attn.q_proj.weight`)."""
    if layer is None:
        return name
    marker = f".{layer}."
    at = name.find(marker)
    return name[at + len(marker) :] if at >= 0 else name


def _plain(rel: str) -> tuple[str, str]:
    """(module, leaf) of a parameter name with peft's wrapper segments dropped: base_layer,
    original_module and modules_to_save.<adapter> (the copy replaces the module in forward)."""
    parts = rel.split(".")
    out: list[str] = []
    skip = False
    for part in parts:
        if skip:
            skip = False
        elif part == "modules_to_save":
            skip = True
        elif part not in ("base_layer", "original_module"):
            out.append(part)
    return ".".join(out[:-1]), out[-1]
