"""The caches plan's search leans on (issue 21) return what the uncached code returns.

memplan.activations.on_rank keeps each pipeline rank's activations by the layout fields it
reads (STAGED_FIELDS): plan asks it again under every ZeRO stage and offload of an engine. The
oracle is the same call with the cache emptied first; a key that missed a field the result
depends on would hand a later layout an earlier one's tensors and fail here.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import product

from memplan import activations
from memplan.activations import STAGED_FIELDS
from memplan.model.sources import from_config
from memplan.report.settings import layout_of
from memplan.states.layout import Layout
from tests.conftest import TINY_LLAMA, make_spec, micro_batch_of


def _layouts(base: Layout) -> list[Layout]:
    """Layouts of 8 layers that differ in every field on_rank reads, and in ones it does not
    (ZeRO stage, data degree), over all four engines."""
    out = []
    for engine, stage, p, v, schedule, split, data in product(
        ("megatron", "deepspeed", "fsdp2", "ddp"),
        (0, 1),
        (2, 4),
        (1, 2, 4),
        ("1f1b", "interleaved", "zbv"),
        (None, "uneven"),
        (1, 2),
    ):
        if (v == 1) != (schedule == "1f1b") or (schedule == "zbv" and v != 2) or p * v > 8:
            continue
        layers = None
        if split == "uneven":
            layers = (1,) + (2,) * (p * v - 2) + (8 - 1 - 2 * (p * v - 2),)
            if layers[-1] < 1:
                continue
        out.append(
            replace(
                base,
                engine=engine,
                stage=stage,
                pipeline=p,
                virtual_stages=v,
                schedule=schedule,
                layers_per_stage=layers,
                data=data,
            )
        )
    return out


def test_on_rank_cache_matches_uncached() -> None:
    arch = {**TINY_LLAMA, "num_hidden_layers": 8}
    spec = make_spec(model={"architecture": arch}, training={"micro_batch_size": 2})
    inventory = from_config(arch)
    micro = micro_batch_of(spec, inventory)
    layouts = _layouts(layout_of(spec))
    assert len({tuple(getattr(lay, n) for n in STAGED_FIELDS) for lay in layouts}) > 20
    activations._STAGED.clear()
    warm = [
        activations.on_rank(inventory, micro, lay, rank, m)
        for lay in layouts
        for rank in range(lay.pipeline)
        for m in (1, 3, 8)
    ]
    assert activations._STAGED  # the cache was used
    cold = []
    for lay in layouts:
        for rank in range(lay.pipeline):
            for m in (1, 3, 8):
                activations._STAGED.clear()
                cold.append(activations.on_rank(inventory, micro, lay, rank, m))
    assert warm == cold
    # The layouts' ranks do not all hold the same tensors (else the check says little).
    assert len({a.bytes for a in cold}) > 10
