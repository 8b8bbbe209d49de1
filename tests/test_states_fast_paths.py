"""The model-state fast paths plan relies on, pinned against the unoptimized paths they
replace: `_merge`'s rank runs against a merge of every rank grouped by `group_ranks`,
FSDP2's counted shapes against `optimizer_terms_by_dtype` of every tensor's local shape,
the cached TP/EP split against `dataclasses.replace` per tensor, and the per-class rows of
Megatron's distributed optimizer and DeepSpeed ZeRO-2 against their per-rank definitions."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Literal

import pytest

from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.load import PRESET_DIR, read_json
from memplan.model.sources import from_config
from memplan.optimizers import OptimizerConfig
from memplan.precision import PRESETS
from memplan.states import parallel, stages
from memplan.states.engines import megatron
from memplan.states.engines.deepspeed import sharding as deepspeed
from memplan.states.engines.fsdp2 import sharding as fsdp2
from memplan.states.layout import Layout
from memplan.states.terms import (
    SRC_FSDP2,
    RankStates,
    Term,
    by_dtype,
    group_ranks,
    optimizer_terms,
    optimizer_terms_by_dtype,
    optimizer_terms_by_dtype_counted,
    relabel_shapes,
    shape_counts_by_dtype,
    term,
)

ADAMW = OptimizerConfig(name="adamw")
BF16 = PRESETS["bf16-mixed"]
DS_STAGES = (16, 15, 15, 15)  # DeepSeek-V3's 61 layers over 4 pipeline stages


def _preset(name: str) -> Inventory:
    return from_config(read_json(Path(PRESET_DIR, f"{name}.json"), what="preset"))


def _row(name: str, n: int) -> Term:
    return term("parameters", name, "bf16", 1, n, f"{n}", "test")


def _merge_per_rank(
    dense: list[RankStates], experts: list[RankStates], degree: int, ep: int, tp: tuple[int, int]
) -> list[RankStates]:
    """The unoptimized merge: every rank's dense plus expert-tagged states, grouped."""
    d = {r: c for c in dense for r in c.ranks}
    e = {r: c for c in experts for r in c.ranks}
    size, q = tp
    per_rank = []
    for rank in range(degree):
        a, b = d[rank], e[(rank * size + q) // ep]

        def tag(ts: tuple[Term, ...]) -> tuple[Term, ...]:
            return tuple(replace(t, name=f"{t.name} (experts)") for t in ts)

        per_rank.append(
            RankStates(
                ranks=(rank,),
                terms=(*a.terms, *tag(b.terms)),
                host_terms=(*a.host_terms, *tag(b.host_terms)),
            )
        )
    return group_ranks(per_rank, key=lambda r: (r.terms, r.host_terms))


def _classes(runs: list[tuple[int, ...]], sizes: list[int]) -> list[RankStates]:
    shared = _row("shared", 7)
    return [
        RankStates(ranks=ranks, terms=(shared, _row("shard", n)), host_terms=(_row("host", 1),))
        for ranks, n in zip(runs, sizes, strict=True)
    ]


@pytest.mark.parametrize(
    ("dense_runs", "dense_sizes", "expert_runs", "expert_sizes", "degree", "ep", "tp"),
    [
        # one class each (plan's usual case), over many ranks
        ([tuple(range(64))], [5], [tuple(range(16))], [3], 64, 4, (1, 0)),
        # several contiguous classes, some equal in bytes (so groups join across classes)
        (
            [(0, 1, 2), (3,), (4, 5, 6, 7), (8, 9, 10, 11)],
            [5, 5, 6, 5],
            [(0, 1), (2,), (3, 4, 5)],
            [3, 4, 3],
            12,
            2,
            (1, 0),
        ),
        # torchtitan's efsdp x ep mesh: expert rank (r x TP + TP rank) // ep
        ([(0, 1, 2), (3, 4, 5, 6, 7)], [5, 6], [(0, 1, 2, 3), (4, 5)], [3, 4], 8, 3, (2, 1)),
        ([tuple(range(6))], [5], [(0,), (1, 2), (3,)], [3, 4, 3], 6, 4, (2, 0)),
        # HSDP's interleaved classes (rank r holds shard r mod group): the per-rank walk
        ([(0, 2, 4), (1, 3, 5)], [5, 6], [(0, 1, 2)], [3], 6, 2, (1, 0)),
        # classes listed out of rank order
        ([(4, 5), (0, 1, 2, 3)], [5, 6], [(1,), (0,)], [3, 4], 6, 3, (1, 0)),
    ],
)
def test_merge_rank_runs_match_the_per_rank_merge(
    dense_runs: list[tuple[int, ...]],
    dense_sizes: list[int],
    expert_runs: list[tuple[int, ...]],
    expert_sizes: list[int],
    degree: int,
    ep: int,
    tp: tuple[int, int],
) -> None:
    dense, experts = _classes(dense_runs, dense_sizes), _classes(expert_runs, expert_sizes)
    assert stages._merge(dense, experts, degree, ep, tp) == _merge_per_rank(
        dense, experts, degree, ep, tp
    )


def _random_runs(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(n - 1, 5)))) if n > 1 else []
    edges = [0, *cuts, n]
    runs = [tuple(range(a, b)) for a, b in zip(edges, edges[1:], strict=False)]
    rng.shuffle(runs)  # classes come in any order
    return runs


def test_merge_rank_runs_match_the_per_rank_merge_on_random_layouts() -> None:
    """Seeded random degrees, TP meshes and contiguous classes (sizes from a small set, so
    neighbouring pairs often hold equal bytes), against the per-rank merge."""
    rng = random.Random(21)
    for _ in range(400):
        size = rng.randint(1, 4)
        q = rng.randrange(size)
        ep = rng.randint(1, 6)
        degree = rng.randint(1, 40)
        experts_n = ((degree - 1) * size + q) // ep + 1 + rng.randint(0, 2)
        dense_runs, expert_runs = _random_runs(rng, degree), _random_runs(rng, experts_n)
        dense = _classes(dense_runs, [rng.choice([5, 6]) for _ in dense_runs])
        experts = _classes(expert_runs, [rng.choice([3, 4]) for _ in expert_runs])
        tp = (size, q)
        want = _merge_per_rank(dense, experts, degree, ep, tp)
        assert stages._merge(dense, experts, degree, ep, tp) == want, (degree, ep, tp)


def test_merge_on_deepseek_v3_matches_the_per_rank_merge() -> None:
    """DeepSeek-V3's first pipeline stage of 4 under ZeRO-2 on 256 data ranks, EP 8: dense
    and expert classes from DeepSpeed's per-rank gradient partitions."""
    layout = Layout(
        engine="deepspeed", stage=2, data=256, expert=8, pipeline=4, layers_per_stage=DS_STAGES
    )
    local = parallel.stage_inventories(_preset("deepseek-v3"), layout)[0]
    dense, experts = parallel.split_experts(local)
    rule = deepspeed.stage12(2)
    d = rule(dense, BF16, ADAMW, layout, layout.data_shards)
    e = rule(experts, BF16, ADAMW, layout, layout.expert_data)
    assert len(d) > 1 and len(e) > 1
    got = stages._merge(d, e, layout.data_shards, layout.expert, (1, 0))
    assert got == _merge_per_rank(d, e, layout.data_shards, layout.expert, (1, 0))


def test_counted_shapes_match_optimizer_terms_by_dtype_per_tensor() -> None:
    """Mixed held dtypes (fp32 adapters in a bf16 model), shapes that become one local
    shape, and a 0-dim tensor."""
    tensors = [
        TensorSpec("a.weight", (10, 4)),
        TensorSpec("lora_a", (3, 4), dtype="fp32"),
        TensorSpec("b.weight", (9, 4)),
        TensorSpec("scale", ()),
        TensorSpec("c.weight", (10, 4)),
        TensorSpec("lora_b", (4, 3), dtype="fp32"),
        TensorSpec("d.weight", (7, 2)),
    ]
    # rows 10 and 9 both become 5 local rows on this rank
    local: dict[tuple[int, ...], tuple[int, ...]] = {
        (10, 4): (5, 4),
        (9, 4): (5, 4),
        (3, 4): (2, 4),
        (4, 3): (2, 3),
        (): (),
        (7, 2): (4, 2),
    }
    layout = Layout(engine="fsdp2", data=2)

    def fast(groups: dict[str | None, dict[tuple[int, ...], int]]) -> tuple[list[Term], ...]:
        return optimizer_terms_by_dtype_counted(
            groups, opt=ADAMW, recipe=BF16, layout=layout, view="shards", source="test"
        )

    counts = shape_counts_by_dtype(tensors, BF16)
    assert list(counts) == [None, "fp32"]
    slow = optimizer_terms_by_dtype(
        tensors,
        [local[t.shape] for t in tensors],
        opt=ADAMW,
        recipe=BF16,
        layout=layout,
        view="shards",
        source="test",
    )
    assert fast({fixed: relabel_shapes(group, local) for fixed, group in counts.items()}) == slow
    # one dtype: the path without merge_terms
    plain = [t for t in tensors if t.dtype is None]
    assert fast(
        {None: relabel_shapes(shape_counts_by_dtype(plain, BF16)[None], local)}
    ) == optimizer_terms(
        [local[t.shape] for t in plain],
        opt=ADAMW,
        recipe=BF16,
        layout=layout,
        view="shards",
        source="test",
    )


@pytest.mark.parametrize(
    ("world", "wrap", "experts"),
    [(3, "layers", False), (64, "layers", False), (1000, "layers", False)]
    + [(64, "torchtitan", True), (7, "torchtitan", True), (64, "torchtitan", False)],
)
def test_fsdp2_rank_classes_match_the_rows_of_every_tensor(
    world: int, wrap: Literal["layers", "torchtitan"], experts: bool
) -> None:
    """Each FSDP2 rank class: padded rows by_dtype + padded_elements of every parameter
    (trainable ones for gradients), optimizer rows optimizer_terms_by_dtype of its first
    rank's local shard of every trainable tensor (torch.chunk rows, `fsdp2_rows`; dim-1
    shards of torchtitan's routed experts, `dim1_experts`)."""
    layout = Layout(
        engine="fsdp2",
        stage=3,
        data=world,
        expert=8 if experts else 1,
        pipeline=4,
        layers_per_stage=DS_STAGES,
        fsdp_groups=wrap,
    )
    local = parallel.stage_inventories(_preset("deepseek-v3"), layout)[3]
    if experts:
        local = parallel.split_experts(local)[1]
    # half the tensors frozen, a few in a fixed dtype: several rows per category
    local = replace(
        local,
        parameters=tuple(
            replace(p, trainable=i % 2 == 0, dtype="fp32" if i % 5 == 0 else None)
            for i, p in enumerate(local.parameters)
        ),
    )
    classes = fsdp2.fsdp2(local, BF16, ADAMW, layout, world)
    params = local.parameters
    train = [p for p in params if p.trainable]
    padded = [
        [
            (d, len(g), fsdp2.padded_elements(g, world, wrap))
            for d, g in by_dtype(ts, "fp32").items()
        ]
        for ts in (params, train)
    ]
    recipe = replace(BF16, master_weights=None, optimizer_states="fp32")
    for c in classes:
        rows = [[(t.dtype, t.tensors, t.elements) for t in c.terms if t.category == k] for k in
                ("parameters", "gradients")]  # fmt: skip
        assert rows == padded
        shapes = [
            (p.shape[0], p.shape[1] // world, p.shape[2])
            if fsdp2.dim1_experts(p, world, wrap)
            else (fsdp2.fsdp2_rows(p.shape[0], world, c.ranks[0]), *p.shape[1:])
            if p.shape
            else ()
            for p in train
        ]
        device, host = optimizer_terms_by_dtype(
            train,
            shapes,
            opt=ADAMW,
            recipe=recipe,
            layout=layout,
            view="local shards (unpadded)",
            source=SRC_FSDP2,
        )
        opt_rows = tuple(t for t in c.terms if t.category == "optimizer_states")
        assert opt_rows == tuple(device) and c.host_terms == tuple(host)


@pytest.mark.parametrize(
    "layout",
    [
        Layout(tensor=8, tensor_impl="megatron"),
        Layout(tensor=4, expert=8),
        Layout(tensor=3, tensor_rank=2),
        Layout(tensor=2, expert=4, engine="fsdp2", implementation="torchtitan"),
    ],
)
def test_localised_matches_replace_per_tensor(layout: Layout) -> None:
    inventory = _preset("deepseek-v3") if layout.tensor != 3 else _preset("gpt2")
    arch = inventory.architecture
    assert arch is not None
    frozen = replace(
        inventory,
        parameters=tuple(
            replace(t, trainable=False, stepped=False, dtype="fp32", persistent=False)
            if i % 7 == 0
            else t
            for i, t in enumerate(inventory.parameters)
        ),
    )
    for inv in (inventory, frozen):
        titan = parallel.TITAN_FIELDS if layout.titan_experts else ()
        got = parallel._localised(inv, layout.keep(*parallel._LOCAL_FIELDS, *titan))
        want = tuple(
            replace(t, shape=parallel.local_shape(t, layout, arch.model_type))
            for t in inv.parameters
        )
        assert got == want
        assert [f.name for f in fields(TensorSpec) if f.init] == [
            "name", "shape", "kind", "dtype", "persistent", "layer", "role", "trainable",
            "stepped", "gradient",
        ], "parallel._localised copies these fields: add a new one there"  # fmt: skip


def _pieces(numels: list[int], shard: int, rank: int) -> tuple[int, ...]:
    """Brute force: overlaps of [rank x shard, (rank + 1) x shard) with every parameter of
    the buffer (reverse order, starts padded to 64)."""
    spans, end = [], 0
    for n in reversed(numels):
        start = -(-end // megatron.PARAM_START_ALIGNMENT) * megatron.PARAM_START_ALIGNMENT
        spans.append((start, start + n))
        end = start + n
    lo, hi = rank * shard, (rank + 1) * shard
    return tuple(sorted(o for a, b in spans if (o := min(b, hi) - max(a, lo)) > 0))


@pytest.mark.parametrize("world", [8, 96, 1024])
def test_megatron_classes_are_runs_of_equal_per_rank_totals(world: int) -> None:
    """group_ranks(key=total_bytes) over every rank's distributed-optimizer shard: classes are
    the maximal runs of ranks with equal totals, each with its first rank's rows."""
    layout = Layout(engine="megatron", stage=1, data=world, pipeline=3)
    local = parallel.stage_inventories(_preset("llama-3.1-405b"), layout)[1]
    classes = megatron.megatron(local, BF16, ADAMW, layout, world)
    numels = [p.numel for p in local.parameters if p.trainable]
    padded = megatron.buffer_layout(numels, world)[1]
    shard = padded // world
    recipe = replace(BF16, master_weights="fp32")  # bf16 parameters, an fp32 master
    totals = []
    for rank in range(world):
        device, _ = optimizer_terms(
            [(n,) for n in _pieces(numels, shard, rank)],
            opt=ADAMW,
            recipe=recipe,
            layout=layout,
            view="v",
            source="s",
            step_is_int=True,
        )
        totals.append(sum(t.bytes for t in device))
    runs = [list(g) for g in _runs(totals)]
    assert [list(c.ranks) for c in classes] == runs
    common = sum(t.bytes for t in classes[0].terms[:2])
    for c in classes:
        assert c.total_bytes == common + totals[c.ranks[0]]
        first = _pieces(numels, shard, c.ranks[0])
        assert c.terms[2].tensors == len(first) and c.terms[2].elements == sum(first)


def _runs(values: list[int]) -> list[range]:
    out: list[range] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append(range(start, i))
            start = i
    return out


@pytest.mark.parametrize("world", [3, 64, 2048])
def test_deepspeed_stage2_classes_are_runs_of_equal_gradient_partitions(world: int) -> None:
    """group_ranks(key=gradient elements) over every rank's `grads_in_partition`: classes
    are its maximal runs, each with its first rank's row (its partition window)."""
    layout = Layout(engine="deepspeed", stage=2, data=world, pipeline=4, layers_per_stage=DS_STAGES)
    local = parallel.stage_inventories(_preset("deepseek-v3"), layout)[2]
    classes = deepspeed.stage12(2)(local, BF16, ADAMW, layout, world)
    numels = [p.numel for p in local.parameters]
    part = deepspeed.stage12_partition(sum(numels), world)[1]
    # brute force: the whole numel of every parameter overlapping the rank's window, plus
    # the window's part past the last parameter
    ends = [sum(numels[: i + 1]) for i in range(len(numels))]
    per_rank = []
    for r in range(world):
        lo, hi = r * part, (r + 1) * part
        whole = sum(n for n, e in zip(numels, ends, strict=True) if e > lo and e - n < hi)
        per_rank.append(whole + max(0, hi - max(lo, ends[-1])))
    assert [list(c.ranks) for c in classes] == [list(g) for g in _runs(per_rank)]
    for c in classes:
        grads = next(t for t in c.terms if t.category == "gradients")
        assert grads.elements == per_rank[c.ranks[0]]
        assert f"[{c.ranks[0] * part:,}, {(c.ranks[0] + 1) * part:,})" in grads.formula


def test_split_experts_is_shared_per_inventory() -> None:
    local = parallel.stage_inventories(_preset("mixtral-8x7b"), Layout(expert=2))[0]
    dense, experts = parallel.split_experts(local)
    again = parallel.split_experts(local)
    assert again[0] is dense and again[1] is experts
    assert Counter(t.role for t in experts.parameters) == {"experts": len(experts.parameters)}
    assert "experts" not in {t.role for t in dense.parameters}
    assert dense.num_parameters + experts.num_parameters == local.num_parameters


@pytest.mark.parametrize(
    ("preset", "layout"),
    [
        ("llama-3.1-8b", Layout(pipeline=4, virtual_stages=2, tensor=2)),
        ("llama-3.1-8b", Layout(pipeline=2, virtual_stages=2, schedule="zbv")),
        ("qwen2.5-0.5b", Layout(pipeline=2)),  # tied embeddings: the head's own copy
        ("deepseek-v3", Layout(pipeline=4, layers_per_stage=DS_STAGES, expert=8)),
        ("gpt2", Layout(pipeline=3)),
    ],
)
def test_stage_inventories_place_each_tensor_like_its_layer(preset: str, layout: Layout) -> None:
    """Per-run placement against every tensor placed on its own: a decoder layer's tensors on
    the rank that holds the layer (stage_layers), the head and final norm on the last model
    chunk's rank, the rest on rank 0, each stage in inventory order."""
    inventory = _preset(preset)
    arch = inventory.architecture
    assert arch is not None
    stages_ = parallel.stage_inventories(inventory, layout)
    held = parallel.stage_layers(arch.num_layers, layout)
    last = layout.chunk_rank(layout.pipeline * layout.virtual_stages - 1)
    local = parallel._localised(inventory, layout.keep(*parallel._LOCAL_FIELDS))
    for s, st in enumerate(stages_):
        want = [
            mine
            for t, mine in zip(inventory.parameters, local, strict=True)
            if (t.layer in held[s] if t.layer is not None else s == (
                last if t.role == "head" or (t.role == "norm" and "embed" not in t.name) else 0
            ))
        ]  # fmt: skip
        aliases = len(inventory.tied) if s == last and last > 0 else 0
        assert list(st.parameters[: len(st.parameters) - aliases]) == want


def test_reshaped_is_replace_of_the_shape_for_every_field() -> None:
    """TensorSpec.reshaped (the TP/EP split's fast copy) against dataclasses.replace, on a
    tensor whose every init field but the shape differs from its default: a field added to
    TensorSpec and not copied by `reshaped` fails here."""
    import dataclasses

    from memplan.model.inventory import TensorSpec

    base = TensorSpec(name="w", shape=(4, 6))
    odd: dict[str, object] = {}
    for f in dataclasses.fields(TensorSpec):
        if not f.init or f.name in ("name", "shape"):
            continue
        value = getattr(base, f.name)
        if isinstance(value, bool):
            odd[f.name] = not value
        elif isinstance(value, str):
            odd[f.name] = value + "x"
        else:  # None: dtype, layer
            odd[f.name] = "fp32" if f.name == "dtype" else 3
    odd["kind"] = "buffer"
    t = dataclasses.replace(base, **odd)
    assert t.reshaped((2, 6)) == dataclasses.replace(t, shape=(2, 6))
    assert [getattr(t.reshaped((2, 6)), k) for k in odd] == list(odd.values())
