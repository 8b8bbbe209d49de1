"""The tensor inventory of a model: every parameter and buffer, by name, shape and dtype."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from memplan.errors import MemplanError

if TYPE_CHECKING:
    from memplan.model.profile import Profile

TensorKind = Literal["parameter", "buffer"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the model, as the transformers (>= 5) runtime module holds it."""

    name: str
    """Fully qualified name, as in `model.named_parameters()` / `named_buffers()`."""
    shape: tuple[int, ...]
    """Shape in elements."""
    kind: TensorKind = "parameter"
    """A trainable parameter or a buffer (buffers get no gradient and no optimizer state)."""
    dtype: str | None = None
    """A fixed dtype (e.g. rotary `inv_freq` stays fp32), or None: the recipe's parameter dtype."""
    persistent: bool = True
    """For buffers: saved in the state dict (False for `register_buffer(..., persistent=False)`)."""
    layer: int | None = None
    """Index of the repeated block it belongs to (decoder layer), None for embeddings and head."""
    role: str = ""
    """What it is: "embedding", "attention", "mlp", "experts", "router", "norm", "head", ...."""
    trainable: bool = True
    """For parameters: `requires_grad` (False: frozen by fine-tuning, memplan.model.finetune.lora;
    it
    then has no gradient and no optimizer state)."""
    stepped: bool = True
    """For trainable parameters: whether the optimizer holds it. False for a parameter that
    requires grad but was never given to the optimizer (LitGPT QLoRA's StableEmbedding, made
    after its optimizer: memplan.model.stacks.litgpt_qlora): autograd still fills its `.grad`,
    held to the end (the optimizer's zero_grad clears only its own param_groups), but it gets
    no optimizer state and no update (memplan.states.terms.stepped)."""
    gradient: bool = True
    """For trainable parameters: whether the loss gives it a gradient. False for a parameter
    that requires grad and is held by the optimizer but that autograd never reaches from the
    loss (DeepSeek-V3.2's DSA indexer, whose forward transformers 5.25 runs under
    `@torch.no_grad`), found by one fake forward + backward of the model
    (memplan.verify.trace.gradients): its `.grad` stays None, so it has no gradient and, under
    torch.optim, no optimizer state (memplan.states.terms.graded); engines whose flat buffers
    cover every parameter keep its bytes (each engine says so)."""
    numel: int = field(init=False, repr=False, compare=False)
    """Number of elements (computed once: plan reads it millions of times)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "numel", math.prod(self.shape))

    def reshaped(self, shape: tuple[int, ...]) -> TensorSpec:
        """This tensor with another shape: `dataclasses.replace(self, shape=shape)` without its
        field walk (plan splits tens of thousands of tensors per search). A field added above
        is copied here too (tests/test_states_fast_paths.py holds it to `replace`)."""
        return TensorSpec(
            name=self.name,
            shape=shape,
            kind=self.kind,
            dtype=self.dtype,
            persistent=self.persistent,
            layer=self.layer,
            role=self.role,
            trainable=self.trainable,
            stepped=self.stepped,
            gradient=self.gradient,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """The shape facts later stages (activations, tensor parallelism) need from a config."""

    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_token: int = 0
    max_position_embeddings: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Family-specific facts (e.g. MLA ranks), by config key."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Inventory:
    """Every tensor of one model, plus the facts needed to account for it. Compared and
    hashed by identity (`eq=False`), so caches keyed on an inventory stay cheap."""

    name: str
    """A display name (the config's `_name_or_path`, the file name, or the preset)."""
    architecture: Architecture | None
    """None when the model is only a parameter count."""
    parameters: tuple[TensorSpec, ...]
    buffers: tuple[TensorSpec, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    """(alias, owner) pairs: `alias` is the same tensor as `owner` and is not listed again."""
    notes: tuple[str, ...] = ()
    """What the inventory ignored or assumed, in a sentence each."""
    profiles: tuple[Profile, ...] = ()
    """Activation profiles traced for this config (memplan.model.profile.Profile), found by the
    I/O edge (memplan.model.load.find_profiles); activations use one when the family has no
    saved-tensor rule."""
    num_parameters: int = field(init=False, repr=False)
    """Elements over all distinct parameter tensors (tied weights once); counted once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_parameters", sum(t.numel for t in self.parameters))

    @property
    def is_bare_count(self) -> bool:
        """A model known only by its size: one stand-in tensor, no tensor boundaries."""
        return len(self.parameters) == 1 and self.parameters[0].role == "flat"

    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers if self.architecture else 0


def numel_of(tensors: Iterable[TensorSpec]) -> int:
    """Elements over `tensors`."""
    return sum(t.numel for t in tensors)


def by_layer(tensors: Iterable[TensorSpec]) -> dict[int, list[TensorSpec]]:
    """The decoder-layer tensors among `tensors`, per layer index in order of appearance."""
    layers: dict[int, list[TensorSpec]] = {}
    for t in tensors:
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
    return layers


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def fold_name(name: str) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `model.layers.*.mlp.up_proj.weight` (first index)."""
    return _LAYER_INDEX.sub(".*.", name, count=1)


MAX_CONFIG_INT = 2**63 - 1
"""The largest integer a config.json size may be (torch's int64)."""
# Keys that count repeated blocks. The inventory lists every block's tensors, so building it
# takes time in proportion (about 0.1 s per 1,000 layers); real models have a few hundred.
LAYER_KEYS = frozenset({"num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"})
MAX_LAYERS = 10_000
# Keys that count attention heads (query, or key/value groups): sizes are divided by them, so
# zero is refused.
HEAD_KEYS = frozenset(
    {"num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_kv_heads"}
)


class Config:
    """Read access to a config.json mapping that names the missing key in its error."""

    def __init__(self, data: Mapping[str, Any], *, origin: str = "config"):
        self.data = data
        self.origin = origin

    def __contains__(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` when it is absent or null."""
        value = self.data.get(key)
        return default if value is None else value

    def first(self, *keys: str, default: Any = None) -> Any:
        """The value of the first present key (families name the same fact differently)."""
        for key in keys:
            if key in self:
                return self.data[key]
        if default is None:
            raise MemplanError(
                f"{self.origin} has none of the keys {', '.join(keys)}; the model needs one.",
                field=keys[0],
            )
        return default

    def int(self, *keys: str, default: int | None = None) -> int:
        """A positive integer under the first present key of `keys`."""
        value = self.first(*keys, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MemplanError(
                f"{self.origin}: {keys[0]} must be a non-negative integer, got {value!r}.",
                field=keys[0],
            )
        if keys[0] in HEAD_KEYS and value == 0:
            raise MemplanError(f"{self.origin}: {keys[0]} must be positive.", field=keys[0])
        if keys[0] in LAYER_KEYS and value > MAX_LAYERS:
            raise MemplanError(
                f"{self.origin}: {keys[0]} must be at most {MAX_LAYERS:,} layers, got {value:,}.",
                field=keys[0],
            )
        if value > MAX_CONFIG_INT:
            # torch shapes are int64; a larger size is a typo, and products of such numbers
            # would overflow the floats the tables print.
            raise MemplanError(
                f"{self.origin}: {keys[0]} must be at most {MAX_CONFIG_INT:,} (int64), "
                f"got {value:,}.",
                field=keys[0],
            )
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise MemplanError(f"{self.origin}: {key} must be true or false, got {value!r}.")
        return value


def rotary_fraction(value: Any) -> float:
    """`partial_rotary_factor` (GPT-NeoX: `rotary_pct`): the share of each head that is
    rotated, a number from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise MemplanError(
            f"partial_rotary_factor must be a number from 0 to 1, got {value!r}.",
            field="partial_rotary_factor",
        )
    return float(value)


def model_name(cfg: Config, fallback: str) -> str:
    """The config's own name for the model, else `fallback`."""
    name = cfg.get("_name_or_path") or fallback
    return str(name)
