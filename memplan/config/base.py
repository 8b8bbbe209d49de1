"""What every section of the spec shares: frozen models that refuse unknown keys, and the
bounds on counts and degrees.

The spec's modules (base, spec, parallelism, finetune, machine, plan) do not postpone their
annotations (no `from __future__ import annotations`): pydantic reads each field's annotation
when the class is made, and a postponed one is a string that it compiles and evaluates
(typing.ForwardRef), 128 of them for the spec's 12 models, about 2.5 ms of CPU in every
`memplan estimate` (measured: `import memplan.config.spec`, median of 21 fresh processes,
42.5 -> 39.8 ms; the models' fields and JSON schemas are the same objects and documents either
way). A validator that returns its own class names it in quotes, which Python 3.10 needs
(typing.Self is 3.11). tests/test_config_annotations.py holds it.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds on what a spec may say. Counts and sizes fit torch's int64 (shapes, numel,
# bytes), which also keeps every product of them far inside a float for the tables. Parallel
# degrees stay within what the calculator can list rank by rank in well under a second.
MAX_COUNT = 2**63 - 1
"""Largest count or size in bytes a spec may give (int64)."""
MAX_DEGREE = 2**16
"""Largest degree of one kind of parallelism, and of GPUs per node: 65,536."""

PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Degree = Annotated[int, Field(gt=0, le=MAX_DEGREE)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


Implementation = Literal["transformers", "torchtitan", "litgpt", "megatron-core"]
"""Whose model code runs a model's forward (`model.implementation`): transformers' modeling
files, torchtitan's own model code, LitGPT's (`litgpt.model.GPT`) or Megatron-Core's
GPTModel."""
