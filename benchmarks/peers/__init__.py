"""Adapters that ask the tools users compare memplan with for the same setting.

One module per peer. Each exposes `NAME`, `available()` (is its package importable here) and
`predict(setting)`, which returns a `Prediction` in bytes or a `NotExpressible` that says why
the tool cannot describe the setting (an optimizer, a precision or a sharding it has no input
for). Peers are benchmark-only: they are installed in the separate benchmark environment
(benchmarks/requirements.txt), never imported by memplan itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One training step, as every tool is asked about it."""

    name: str
    """Case name (for messages)."""
    config: dict[str, Any]
    """The model's config.json (transformers keys)."""
    precision: str
    """memplan preset: fp32, bf16 or bf16-mixed."""
    optimizer: str
    """adamw or sgd (SGD with momentum)."""
    engine: str
    """ddp (DDP, or ZeroRedundancyOptimizer with stage 1) or fsdp2."""
    stage: int
    """ZeRO stage: 0 or 1 for ddp, 2 or 3 for fsdp2."""
    ranks: int
    """Data-parallel ranks (GPUs)."""
    micro_batch_size: int
    sequence_length: int
    attention: str = "sdpa"
    """sdpa (a fused kernel, no attention scores saved) or eager (softmax per head saved)."""
    checkpointing: str = "none"
    """Activation recomputation: none, selective (the attention core) or full."""
    dropout: bool = False
    """Dropout forced on (attention dropout, and hidden dropout where the family has it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """What a tool says one GPU needs, in bytes. None: the tool does not report that part."""

    model_states: int | None
    """Parameters + gradients + optimizer states (+ master weights)."""
    total: int | None
    """The tool's figure for the whole training step on one GPU."""
    activations: int | None = None
    """What autograd keeps for backward, where the tool reports it."""
    how: str = ""
    """Which function or rule produced it (shown in the results)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The tool's own breakdown, for the JSON."""


@dataclass(frozen=True, slots=True)
class NotExpressible:
    """The tool has no input for this setting."""

    reason: str


Result = Prediction | NotExpressible

ADAM = ("adam", "adamw")
MIXED = ("bf16-mixed", "fp16-mixed")
