"""Which rank holds which bytes of the model states: one rule set per engine and ZeRO stage.

Each rule returns `RankStates` for every class of identical ranks, so that the report shows
the most-loaded rank to the byte, and every rank when asked. The rules are read from each
engine's source (cited per function) and proved on torch.distributed ranks by tests and by
`memplan verify`.
"""

from memplan.states.engines.ddp import replicated, zero_redundancy, zero_redundancy_partition
from memplan.states.engines.deepspeed import DeepSpeedKnobs
from memplan.states.engines.deepspeed import rule_for as deepspeed_rule
from memplan.states.engines.fsdp2 import fsdp2, fsdp2_rows
from memplan.states.engines.megatron import megatron
from memplan.states.terms import Category, EngineRule, RankStates, Term, buffer_terms


def engine_rule(engine: str, stage: int, knobs: DeepSpeedKnobs | None = None) -> EngineRule:
    """The sharding rule for an engine and ZeRO stage (the spec validated the pair)."""
    if engine == "ddp":
        return replicated if stage == 0 else zero_redundancy
    if engine == "fsdp2":
        return fsdp2
    if engine == "megatron":
        return megatron
    return deepspeed_rule(stage, knobs or DeepSpeedKnobs())


__all__ = [
    "Category",
    "DeepSpeedKnobs",
    "EngineRule",
    "RankStates",
    "Term",
    "buffer_terms",
    "engine_rule",
    "fsdp2_rows",
    "zero_redundancy_partition",
]
