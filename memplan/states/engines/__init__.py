"""Which rank holds which bytes of the model states, and what each engine adds to the step:
one rule set per engine and ZeRO stage, and one `EngineStep` per engine (`STEPS`).

Each rule returns `RankStates` for every class of identical ranks, so that the report shows
the most-loaded rank to the byte, and every rank when asked. The rules are read from each
engine's source (cited per function) and proved on torch.distributed ranks by tests and by
`memplan verify`.
"""

# An engine's modules are imported when its rule or step is first asked for, not with this
# package: `memplan estimate` on a DeepSpeed spec does not import FSDP2's (issue 21).

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

from memplan.states.engines.base import EngineStep
from memplan.states.terms import Category, EngineRule, RankStates, Term, buffer_terms

if TYPE_CHECKING:
    from memplan.states.engines.ddp import zero_redundancy_partition
    from memplan.states.engines.deepspeed.sharding import DeepSpeedKnobs
    from memplan.states.engines.fsdp2.sharding import fsdp2_rows

ENGINES = ("ddp", "fsdp2", "deepspeed", "megatron", "fsdp1")
"""The engines, each a module (or package) of this package that ends in its `STEP`."""


class _Steps(Mapping[str, EngineStep]):
    """engine -> its EngineStep (the `STEP` of its module, imported on first lookup)."""

    def __init__(self) -> None:
        self._loaded: dict[str, EngineStep] = {}

    def __getitem__(self, engine: str) -> EngineStep:
        step = self._loaded.get(engine)
        if step is None:
            if engine not in ENGINES:
                raise KeyError(engine)
            step = import_module(f"{__name__}.{engine}").STEP
            assert isinstance(step, EngineStep), engine
            self._loaded[engine] = step
        return step

    def __iter__(self) -> Iterator[str]:
        return iter(ENGINES)

    def __len__(self) -> int:
        return len(ENGINES)


# The step hooks of each engine (memplan.step.timeline calls them).
STEPS: Mapping[str, EngineStep] = _Steps()


def engine_rule(engine: str, stage: int, knobs: DeepSpeedKnobs | None = None) -> EngineRule:
    """The sharding rule for an engine and ZeRO stage (the spec validated the pair)."""
    if engine == "ddp":
        from memplan.states.engines import ddp

        return ddp.replicated if stage == 0 else ddp.zero_redundancy
    if engine == "fsdp2":
        from memplan.states.engines.fsdp2 import sharding

        return sharding.fsdp2
    if engine == "fsdp1":
        from memplan.states.engines.fsdp1 import sharding as fsdp1_sharding

        return fsdp1_sharding.fsdp1
    if engine == "megatron":
        from memplan.states.engines import megatron

        return megatron.megatron
    from memplan.states.engines.deepspeed.sharding import DeepSpeedKnobs, rule_for

    return rule_for(stage, knobs or DeepSpeedKnobs())


_LAZY = {
    "DeepSpeedKnobs": "memplan.states.engines.deepspeed.sharding",
    "fsdp2_rows": "memplan.states.engines.fsdp2.sharding",
    "zero_redundancy_partition": "memplan.states.engines.ddp",
}


def __getattr__(name: str) -> Any:
    """The names above that live in one engine's modules, imported on first use."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENGINES",
    "STEPS",
    "Category",
    "DeepSpeedKnobs",
    "EngineRule",
    "EngineStep",
    "RankStates",
    "Term",
    "buffer_terms",
    "engine_rule",
    "fsdp2_rows",
    "zero_redundancy_partition",
]
