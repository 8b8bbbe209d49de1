"""A plan row as the spec it stands for: `memplan estimate` on `row_spec` reproduces the row's
bytes, and `row_document` is that spec as `memplan plan --emit` writes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.config.spec import Spec

if TYPE_CHECKING:
    from memplan.plan.result import Candidate


def row_spec(spec: Spec, c: Candidate) -> Spec:
    """The spec of plan row `c`: `memplan estimate` on it reproduces the row's bytes."""
    training = spec.training.model_copy(
        update={
            "micro_batch_size": c.micro_batch_size,
            "activation_checkpointing": c.recompute,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "compile": c.compile,
        }
    )
    return spec.model_copy(update={"parallelism": c.parallelism, "training": training})


ROW_KEYS = {
    "training": ("micro_batch_size", "gradient_accumulation_steps", "activation_checkpointing"),
    "parallelism": (
        "engine", "data", "zero_stage", "tensor", "sequence_parallel", "pipeline", "schedule",
        "virtual_stages", "layers_per_stage", "context", "expert", "offload",
    ),
}  # fmt: skip
"""Keys the search sets on every row: the emitted spec names them even at their defaults."""


def row_document(spec: Spec, c: Candidate) -> dict[str, object]:
    """Plan row `c` as a spec document (`memplan plan --emit`): `row_spec` without the `plan`
    section, the keys the user left at their defaults left out, and every key the search set
    (ROW_KEYS) written out, so the row's assumptions read in the file. Validating it gives
    `row_spec(spec, c)`: `memplan estimate` on it reproduces the row's bytes."""
    row = row_spec(spec, c)
    doc = row.model_dump(mode="json", exclude_defaults=True, exclude={"plan"})
    full = row.model_dump(mode="json")
    for section, keys in ROW_KEYS.items():
        rest = doc.get(section, {})
        doc[section] = {
            **{k: v for k, v in rest.items() if k not in keys},
            **{k: full[section][k] for k in keys},
        }
    model = doc.setdefault("model", {})
    model["implementation"] = full["model"]["implementation"]
    if c.engine == "fsdp2":
        doc["parallelism"]["fsdp_wrap"] = c.fsdp_wrap
    doc["training"]["compile"] = c.compile
    return doc
