"""Which rank holds which bytes of the model states, and what each engine adds to the step:
one rule set per engine and ZeRO stage, and one `EngineStep` per engine (`STEPS`).

Each rule returns `RankStates` for every class of identical ranks, so that the report shows
the most-loaded rank to the byte, and every rank when asked. The rules are read from each
engine's source (cited per function) and proved on torch.distributed ranks by tests and by
`memplan verify`.
"""

from memplan.states.engines import ddp, deepspeed, fsdp2, megatron
from memplan.states.engines.base import EngineStep
from memplan.states.engines.ddp import replicated, zero_redundancy, zero_redundancy_partition
from memplan.states.engines.deepspeed.sharding import DeepSpeedKnobs
from memplan.states.engines.deepspeed.sharding import rule_for as deepspeed_rule
from memplan.states.engines.fsdp2.sharding import fsdp2_rows
from memplan.states.terms import Category, EngineRule, RankStates, Term, buffer_terms

# The step hooks of each engine (memplan.step.timeline calls them).
STEPS: dict[str, EngineStep] = {
    "ddp": ddp.STEP,
    "fsdp2": fsdp2.STEP,
    "deepspeed": deepspeed.STEP,
    "megatron": megatron.STEP,
}


def engine_rule(engine: str, stage: int, knobs: DeepSpeedKnobs | None = None) -> EngineRule:
    """The sharding rule for an engine and ZeRO stage (the spec validated the pair)."""
    if engine == "ddp":
        return replicated if stage == 0 else zero_redundancy
    if engine == "fsdp2":
        return fsdp2.sharding.fsdp2
    if engine == "megatron":
        return megatron.megatron
    return deepspeed_rule(stage, knobs or DeepSpeedKnobs())


__all__ = [
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
