"""`memplan verify --json`: measured against predicted, category by category."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memplan.config.parallelism import Engine
from memplan.report.schema.base import Doc


class VerifySetup(Doc):
    """What ran."""

    model: str = Field(description="Display name of the model.")
    model_type: str | None = Field(description="config.json `model_type`.")
    num_parameters: int = Field(description="Parameter elements of the full model.")
    device: Literal["cpu", "cuda"] = Field(description="cpu or cuda.")
    fake: bool = Field(description="FakeTensorMode: no real memory.")
    engine: Engine = Field(
        description="ddp, fsdp2 or fsdp1 (the engines torch runs itself), or deepspeed."
    )
    zero_stage: int = Field(description="ZeRO stage (0-3).")
    ranks: int = Field(description="Processes run (torch.distributed world size, or 1).")
    distributed: bool = Field(description="Ranks on torch.distributed.")
    precision: str = Field(description="Precision recipe name.")
    optimizer: str = Field(description="Optimizer name.")
    optimizer_implementation: str = Field(
        description="torch.optim kernel: foreach, fused or for_loop."
    )
    layers: int = Field(description="Decoder layers built.")
    full_layers: int = Field(description="Decoder layers of the spec's model.")
    micro_batch_size: int = Field(description="Sequences per forward pass.")
    sequence_length: int = Field(description="Tokens per sequence.")
    attention: str = Field(
        description=(
            "The attention implementation transformers ran (`config._attn_implementation`): eager "
            "when training.attention is eager; for sdpa, transformers' default (sdpa, or eager "
            "for a class without sdpa support)."
        )
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        description=(
            "training.activation_checkpointing as built: full (transformers' "
            "activation_checkpointing_enable, non-reentrant) or selective (each attention core "
            "under torch.utils.checkpoint)."
        )
    )
    activation_offload: bool = Field(
        description=(
            "training.activation_offload: the checkpointed layer inputs in pinned host memory."
        )
    )
    dropout: bool | None = Field(
        description=(
            "training.dropout: true/false forced on the config's dropout probabilities; null: the "
            "config's own."
        )
    )
    use_cache: bool = Field(
        description=(
            "transformers' key/value cache during the step (always false: a training step keeps "
            "none)."
        )
    )
    steps: int = Field(description="Training steps run; the last one is measured.")
    activations_source: Literal["rule", "profile", "none"] | None = Field(
        default=None,
        description=(
            "Where the predicted activations come from: a hand-written family's rule, a traced "
            "profile (for a model_type with no family: stored, or traced by verify itself), or "
            "none (not modelled: measured, not checked)."
        ),
    )
    activations_profile: str | None = Field(
        default=None, description="The profile's name (file stem) when one serves, else null."
    )
    activations_profile_origin: Literal["stored", "traced now"] | None = Field(
        default=None,
        description=(
            "stored: found in $MEMPLAN_CACHE/profiles or shipped with memplan; traced now: traced "
            "by this verify run under FakeTensorMode (not stored)."
        ),
    )
    torch: str = Field(description="torch version.")
    transformers: str = Field(description="transformers version.")


class VerifyRow(Doc):
    """One category on one rank."""

    predicted: int | None = Field(
        description="memplan's bytes; null when the calculator does not model the category."
    )
    measured: int | None = Field(
        description=(
            "Bytes measured on real (or fake) tensors; null when the run cannot measure it."
        )
    )
    delta: int | None = Field(description="measured - predicted.")
    ratio: float | None = Field(
        description="measured / predicted (null when either is null or predicted is 0)."
    )
    tolerance: float = Field(
        description=(
            "Allowed |delta| / predicted: 0.0 for model states, 0.01 activations, 0.03 peak."
        )
    )
    checked: bool = Field(description="Both sides are known, so the row is held to its tolerance.")
    ok: bool | None = Field(description="Within tolerance; null when the row is not checked.")
    slack_bytes: int = Field(
        0,
        description=(
            "Allowed |delta| in bytes on top of the tolerance: 1,024 for the DeepSpeed step "
            "transient (its 0-dim tensors), else 0."
        ),
    )


class AllocatorPhase(Doc):
    """CUDA allocator counters at the end of one phase of the measured step."""

    name: str = Field(description="The phase of the step (forward, backward, optimizer step, ...).")
    allocated: int = Field(description="torch.cuda.memory_allocated() at the end of the phase.")
    max_allocated: int = Field(description="torch.cuda.max_memory_allocated() during the phase.")
    reserved: int = Field(description="torch.cuda.memory_reserved() at the end of the phase.")


class FullDepthRow(Doc):
    predicted: int | None = Field(description="The prediction at the model's full depth.")
    extrapolated: int | None = Field(
        description="The K-layer measurement extrapolated with the measured per-layer bytes."
    )


class VerifyReport(Doc):
    """`memplan verify SPEC --json`: predicted against measured bytes."""

    ok: bool = Field(
        description=(
            "Every checked row on every rank is within its tolerance (exit code 0, else 3)."
        )
    )
    setup: VerifySetup = Field(description="What ran.")
    rank: int = Field(
        description=(
            "The rank `categories` describes: the one memplan predicts to be the most loaded."
        )
    )
    categories: dict[str, VerifyRow] = Field(
        description=(
            "Category (parameters, gradients, optimizer_states, each state by name, buffers, "
            "activations, peak) -> row, for `rank`."
        )
    )
    ranks: list[dict[str, VerifyRow]] | None = Field(
        None, description="Present with several ranks: ranks[i] is rank i's categories."
    )
    phases: list[AllocatorPhase] | None = Field(
        None, description="Present on CUDA: allocator counters per phase."
    )
    full_depth: dict[str, FullDepthRow] | None = Field(
        None,
        description=(
            "Present with --layers K: category -> full-depth prediction and extrapolation."
        ),
    )
    failures: list[str] = Field(description="One sentence per row out of tolerance.")
    notes: list[str] = Field(description="What the run could not check, or how it measured.")
    warnings: list[str] = Field(
        [],
        description=(
            "Installed torch or transformers whose major.minor differs from the versions the "
            "rules describe (also printed on stderr)."
        ),
    )
