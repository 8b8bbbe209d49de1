"""Model states per pipeline stage and per data-parallel rank, for any layout.

The layout is decomposed the way Megatron-LM builds it (megatron/core/parallel_state.py::
initialize_model_parallel): tensor and pipeline parallelism decide which slice of which tensor
a rank holds (`memplan.states.parallel`); the engine's ZeRO rule then shards that slice over the
data-parallel group (data x context ranks: context-parallel ranks hold the same weights and
reduce gradients together), and the experts of an MoE layer over the expert-data-parallel
group. Offload then moves bytes from the GPU to the host or NVMe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.memo import IdentityMemo
from memplan.model.inventory import Inventory, fold_name
from memplan.optimizers import FSDP2_REFUSALS, FSDP2_REFUSED_OPTIMIZERS, OptimizerConfig
from memplan.precision import Recipe
from memplan.states import engines as sharding
from memplan.states import terms
from memplan.states.engines import RankStates, Term, dtensor_tp
from memplan.states.engines import offload as offload_rules
from memplan.states.layout import Layout
from memplan.states.parallel import (
    SPLIT_FIELDS,
    TITAN_FIELDS,
    check_degrees,
    local_shape,
    split_experts,
    stage_inventories,
    stage_inventory,
    stage_layers,
    tensor_rank_classes,
    tp_split,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStates:
    """The model states of one pipeline stage: every TP rank of it holds the same bytes, but
    where torch's DTensor leaves the last TP ranks fewer vocabulary rows (`ranks` then lists
    each TP rank class's data-parallel classes, `RankStates.tensor_ranks`)."""

    stage: int
    layers: tuple[int, ...]
    """Indices of the decoder layers this stage holds."""
    num_parameters: int
    """Parameter elements one rank of this stage holds before data-parallel sharding."""
    ranks: tuple[RankStates, ...]
    """Classes of identical data-parallel ranks (of each class of TP ranks, TP rank 0's
    first)."""
    per_gpu: RankStates
    """The most-loaded data-parallel rank (of TP rank 0, which holds the most vocabulary
    rows)."""
    buffers: tuple[Term, ...]
    nvme: tuple[Term, ...] = ()
    """Bytes offloaded to NVMe by the most-loaded rank."""

    @property
    def model_state_bytes(self) -> int:
        return self.per_gpu.total_bytes + sum(t.bytes for t in self.buffers)


def most_loaded(ranks: Sequence[RankStates]) -> RankStates:
    return max(ranks, key=lambda r: (r.total_bytes, -r.ranks[0]))


def _merge(
    dense: list[RankStates], experts: list[RankStates], degree: int, ep: int, tp: tuple[int, int]
) -> list[RankStates]:
    """Per data-parallel rank r: its dense states plus the expert states of expert-data rank
    r // ep (Megatron orders expert-parallel ranks fastest within the data-parallel group);
    with `tp` = (TP degree, TP rank) of torchtitan's efsdp x ep mesh over data x TP ranks
    (Layout.titan_experts, EP fastest, TP innermost in the dense mesh), (r x TP + rank) // ep."""
    size, q = tp
    segments = _pair_runs(dense, experts, degree, ep, size, q)
    if segments is None:
        segments = _pair_ranks(dense, experts, degree, ep, size, q)
    # group_ranks(per-rank merges, key=(terms, host_terms)), without building the merge of
    # every rank: ranks with the same pair of classes join the last group unseen, and each
    # expert class is tagged once (DeepSeek-V3 on 2,048 GPUs: 1.4 million `replace` calls
    # before, three quarters of plan's time).
    # Each group's states are built once, with its ranks; expert classes share most of their
    # rows (the same Term objects), so each row is tagged once.
    rows: dict[int, Term] = {}
    tagged: dict[int, tuple[tuple[Term, ...], tuple[Term, ...]]] = {}
    groups: list[tuple[tuple[Term, ...], tuple[Term, ...], list[int]]] = []
    last: tuple[RankStates, RankStates] | None = None
    for lo, hi, a, b in segments:
        if last is not None and last[0] is a and last[1] is b:
            groups[-1][2].extend(range(lo, hi))
            continue
        last = (a, b)
        if id(b) not in tagged:
            tagged[id(b)] = (_tagged(b.terms, rows), _tagged(b.host_terms, rows))
        expert_terms, expert_host = tagged[id(b)]
        terms = (*a.terms, *expert_terms)
        host_terms = (*a.host_terms, *expert_host)
        if groups and (groups[-1][0], groups[-1][1]) == (terms, host_terms):
            groups[-1][2].extend(range(lo, hi))
        else:
            groups.append((terms, host_terms, list(range(lo, hi))))
    return [
        RankStates(ranks=tuple(ranks), terms=terms, host_terms=host_terms)
        for terms, host_terms, ranks in groups
    ]


Segment = tuple[int, int, RankStates, RankStates]
"""[lo, hi) data-parallel ranks that hold the same (dense, expert) pair of classes."""


def _pair_ranks(
    dense: list[RankStates], experts: list[RankStates], degree: int, ep: int, size: int, q: int
) -> list[Segment]:
    """`_merge`'s pairs rank by rank: runs of consecutive ranks with the same pair."""

    def by_rank(classes: list[RankStates]) -> dict[int, RankStates]:
        return {r: c for c in classes for r in c.ranks}

    d, e = by_rank(dense), by_rank(experts)
    out: list[Segment] = []
    for rank in range(degree):
        a, b = d[rank], e[(rank * size + q) // ep]
        if out and out[-1][2] is a and out[-1][3] is b:
            out[-1] = (out[-1][0], rank + 1, a, b)
        else:
            out.append((rank, rank + 1, a, b))
    return out


def _contiguous(classes: list[RankStates]) -> list[tuple[int, RankStates]] | None:
    """(first rank, class) of each class, in rank order, where every class holds one run of
    consecutive ranks and together they hold 0, 1, ... with none twice; None otherwise."""
    runs = []
    for c in classes:
        r = c.ranks
        if not r or r != tuple(range(r[0], r[-1] + 1)):
            return None
        runs.append((r[0], r[-1] + 1, c))
    runs.sort(key=lambda run: run[0])
    end = 0
    for lo, hi, _ in runs:
        if lo != end:
            return None
        end = hi
    return [(lo, c) for lo, _, c in runs] + [(end, _END)]


def _pair_runs(
    dense: list[RankStates], experts: list[RankStates], degree: int, ep: int, size: int, q: int
) -> list[Segment] | None:
    """`_pair_ranks` worked out from the classes' rank runs, without visiting every rank,
    where every class holds consecutive ranks (None otherwise): expert rank x = (r x size +
    q) // ep grows with r, so expert class runs starting at x = s start at the first r with
    r x size + q >= s x ep."""
    d_runs, e_runs = _contiguous(dense), _contiguous(experts)
    if d_runs is None or e_runs is None or d_runs[-1][0] != degree:
        return None
    if degree and ((degree - 1) * size + q) // ep >= e_runs[-1][0]:
        return None  # a rank past the expert classes: let _pair_ranks fail on it
    starts = {lo for lo, _ in d_runs[:-1]}
    starts.update(max(0, -((q - s * ep) // size)) for s, _ in e_runs[:-1])
    edges = sorted(r for r in starts if r < degree)
    out: list[Segment] = []
    i = j = 0
    for lo, hi in zip(edges, [*edges[1:], degree], strict=True):
        while d_runs[i + 1][0] <= lo:
            i += 1
        x = (lo * size + q) // ep
        while e_runs[j + 1][0] <= x:
            j += 1
        out.append((lo, hi, d_runs[i][1], e_runs[j][1]))
    return out


_END = RankStates(ranks=(), terms=())
"""The end marker of `_contiguous`'s runs."""


def _tagged(terms: Sequence[Term], done: dict[int, Term]) -> tuple[Term, ...]:
    """`terms` named as the experts' (each row tagged once, `done` keyed by its identity:
    one `_merge` call's, while the classes that hold the rows are alive)."""
    out = []
    for t in terms:
        mine = done.get(id(t))
        if mine is None:
            mine = done[id(t)] = replace(t, name=f"{t.name} (experts)")
        out.append(mine)
    return tuple(out)


def stage_states(
    inventory: Inventory, *, recipe: Recipe, opt: OptimizerConfig, layout: Layout
) -> list[StageStates]:
    """Model states of every pipeline stage's most-loaded rank, and of every rank class."""
    check_degrees(inventory, layout)
    if layout.engine == "fsdp2" and opt.name in FSDP2_REFUSED_OPTIMIZERS:
        raise MemplanError(
            f"{opt.name} does not run on FSDP2: {FSDP2_REFUSALS[opt.name]}. Use engine: ddp "
            "or deepspeed, or another optimizer.",
            field="optimizer.name",
        )
    arch = inventory.architecture
    held = _stage_layers(inventory.num_layers, layout) if arch else None
    key = _states_key(inventory, layout, held)
    classes = tensor_rank_classes(arch.vocab_size if arch else None, layout)
    per_class: list[list[StageStates]] = []
    for group in classes:
        states = _stage_states(inventory, recipe, opt, key.for_tensor_rank(group[0]))
        out = list(states)
        if (
            held is not None
            and key.pipeline > 1
            and key.layers_per_stage != layout.layers_per_stage
        ):
            out = list(_relabelled(states, held))
        if layout.engine == "ddp" and layout.tensor > 1:
            rank_layout = layout.for_tensor_rank(group[0])
            out = [_whole_embedding_gradient(st, inventory, recipe, rank_layout) for st in out]
            if group[0] > 0:
                out = [_scatter_padding(st, inventory, recipe, rank_layout) for st in out]
        per_class.append(out)
    if len(classes) == 1:
        return per_class[0]
    return [_tensor_rank_union(stages, classes) for stages in zip(*per_class, strict=True)]


_RELABELLED: IdentityMemo[tuple[StageStates, ...]] = IdentityMemo(1024)
"""`_relabelled` per (stages, held layers): plan's layouts of one `_states_key` and one
placement of the layers share it (the Llama-3.1-405B search asks 646 times)."""


def _relabelled(
    states: tuple[StageStates, ...], held: tuple[tuple[int, ...], ...]
) -> tuple[StageStates, ...]:
    """`states` (of a `_states_key` layout, whose layers are the contiguous split) with the
    layer indices each stage of the layout itself holds."""
    hit = _RELABELLED.get((states,), held)
    if hit is not None:
        return hit
    return _RELABELLED.put(
        (states,), held, tuple(replace(st, layers=held[st.stage]) for st in states)
    )


_HELD: IdentityMemo[tuple[tuple[int, ...], ...]] = IdentityMemo(1024)
"""`_stage_layers` by the layout's fields it reads."""


def _stage_layers(num_layers: int, layout: Layout) -> tuple[tuple[int, ...], ...]:
    """memplan.states.parallel.stage_layers (its errors raised), remembered per pipeline
    placement (plan's layouts of one placement ask again)."""
    key = (
        num_layers,
        layout.pipeline,
        layout.virtual_stages,
        layout.layers_per_stage,
        layout.schedule,
    )
    hit = _HELD.get((), key)
    if hit is not None:
        return hit
    return _HELD.put((), key, tuple(map(tuple, stage_layers(num_layers, layout))))


# The Layout fields model states depend on: the split of the tensors, and the engine's rule.
STATES_FIELDS = (
    *SPLIT_FIELDS,
    "engine",
    "data",
    "stage",
    "offload",
    "deepspeed",
    "device",
    "data_replicate",
    "fsdp_groups",  # torchtitan's FSDP2 wrapping shards experts on dim 1 (fsdp2.sharding)
)


def _states_key(
    inventory: Inventory, layout: Layout, held: tuple[tuple[int, ...], ...] | None
) -> Layout:
    """The layout whose model states are `layout`'s, with the fields states do not read at
    their defaults (plan's layouts then share them): context-parallel ranks hold the same
    weights as data-parallel ones, so they fold into `data` (`Layout.data_shards`); and with
    identical layers only how many each pipeline rank holds matters, not which, so an
    interleaved placement is the contiguous split with the same counts."""
    titan = TITAN_FIELDS if layout.titan_experts else ()
    # layout.keep(*STATES_FIELDS, *titan) with `data` (and the pipeline's fields) replaced,
    # made in one construction.
    kept = {n: getattr(layout, n) for n in (*STATES_FIELDS, *titan)}
    kept["data"] = layout.data_shards
    if (
        held is not None
        and layout.pipeline > 1
        and layout.schedule != "zbv"  # its V puts the head on rank 0
        and _identical_layers(inventory)
    ):
        kept.update(
            virtual_stages=1,
            layers_per_stage=tuple(len(h) for h in held),
            schedule="1f1b",
        )
    return Layout(**kept)


def _tensor_rank_union(
    stages: Sequence[StageStates], classes: Sequence[tuple[int, ...]]
) -> StageStates:
    """One stage's states over every class of TP ranks: TP rank 0's stage (the most
    vocabulary rows, so its most-loaded rank is the stage's) with every class's rank
    classes, each tagged with its TP ranks."""
    first = stages[0]
    return replace(
        first,
        ranks=tuple(
            replace(r, tensor_ranks=group)
            for st, group in zip(stages, classes, strict=True)
            for r in st.ranks
        ),
        per_gpu=replace(first.per_gpu, tensor_ranks=classes[0]),
    )


SRC_DTENSOR_SCATTER = (
    "torch/distributed/tensor/placement_types.py::Shard._shard_tensor (torch 2.13): "
    "distribute_tensor scatters every TP rank's shard into torch.empty_like of the first "
    "(ceil(V / TP)-row) padded chunk and narrows it, so the storage keeps the padded rows"
)


def _scatter_padding(
    st: StageStates, inventory: Inventory, recipe: Recipe, layout: Layout
) -> StageStates:
    """DDP over torch's DTensor tensor parallelism, a TP rank with fewer vocabulary rows than
    the first: its vocabulary-parallel parameters are narrowed views of a buffer with the first
    rank's rows (FSDP2 copies them into its own shards instead), so the parameters' storage
    holds the missing rows too; gradients and optimizer states (zeros_like) hold its own."""
    arch = inventory.architecture
    if arch is None:
        return st
    tensor_rank = layout.tensor_rank
    local = stage_inventory(inventory, layout, st.stage)
    first = stage_inventory(inventory, layout.for_tensor_rank(0), st.stage)
    rows: list[Term] = []
    for mine, top in zip(local.parameters, first.parameters, strict=True):
        if tp_split(mine) != "vocab" or mine.shape == top.shape:
            continue
        missing = (top.shape[0] - mine.shape[0]) * (top.numel // top.shape[0])
        dtype = terms.own_dtype(mine, recipe) or recipe.parameters
        rows.append(
            terms.term(
                "parameters",
                f"{mine.name} (scatter padding)",
                dtype,
                1,
                missing,
                f"[{top.shape[0]} - {mine.shape[0]}, {', '.join(map(str, top.shape[1:]))}] "
                f"rows TP rank 0 holds beyond TP rank {tensor_rank}'s",
                SRC_DTENSOR_SCATTER,
            )
        )
    if not rows:
        return st

    def add(r: RankStates) -> RankStates:
        return replace(r, terms=(*r.terms, *rows))

    return replace(st, ranks=tuple(add(r) for r in st.ranks), per_gpu=add(st.per_gpu))


SRC_DTENSOR_EMBEDDING = (
    "torch/distributed/tensor/_ops/_embedding_ops.py::embedding_dense_backward_strategy "
    "(no row-sharded output; FSDP2 redistributes it, DDP does not): measured by "
    "tests/test_verify_tp.py"
)


def _whole_embedding_gradient(
    st: StageStates, inventory: Inventory, recipe: Recipe, layout: Layout
) -> StageStates:
    """DDP over torch's DTensor tensor parallelism: the vocab-parallel embedding's gradient
    comes out of embedding backward whole, [vocab, hidden] on every TP rank, where its
    parameter is a [vocab / TP, hidden] shard (this TP rank's rows, `layout.tensor_rank`): the rows
    other TP ranks own come on top."""
    table = next((t for t in inventory.parameters if t.role == "embedding" and t.trainable), None)
    arch = inventory.architecture
    if table is None or arch is None or st.stage != 0:
        return st  # the embedding lives on the first pipeline stage
    rows = local_shape(table, layout, arch.model_type)[0]
    extra = (table.shape[0] - rows) * (table.numel // table.shape[0])
    dtype = terms.grad_dtype(recipe)
    row = terms.term(
        "gradients",
        dtensor_tp.WHOLE_EMBEDDING_GRADIENT,
        dtype,
        1,
        extra,
        f"[{table.shape[0]} - {rows}, {table.shape[1]}] rows other TP ranks own",
        SRC_DTENSOR_EMBEDDING,
    )

    def add(r: RankStates) -> RankStates:
        return replace(r, terms=(*r.terms, row))

    return replace(st, ranks=tuple(add(r) for r in st.ranks), per_gpu=add(st.per_gpu))


@lru_cache(maxsize=64)
def _identical_layers(inventory: Inventory) -> bool:
    """Whether every decoder layer holds the same tensors (names without the layer index,
    shapes, dtypes, trainability), parameters and buffers."""
    layers: dict[int, list[tuple[object, ...]]] = {}
    for t in (*inventory.parameters, *inventory.buffers):
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(
                (fold_name(t.name), t.shape, t.dtype, t.trainable, t.kind)
            )
    return len({tuple(v) for v in layers.values()}) <= 1


@lru_cache(maxsize=1024)
def _stage_states(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout
) -> tuple[StageStates, ...]:
    """Every stage's states for a `_states_key` layout (cached by value: plan re-estimates
    thousands of layouts that share few keys)."""
    knobs = sharding.DeepSpeedKnobs.of(layout) if layout.engine == "deepspeed" else None
    rule = sharding.engine_rule(layout.engine, layout.stage, knobs)
    held = (
        _stage_layers(inventory.num_layers, layout)
        if inventory.architecture
        else ((),) * layout.pipeline
    )
    # Stages that hold the same tensor shapes (the middle of a pipeline) have the same states.
    by_shapes: dict[
        tuple[tuple[tuple[int, ...], bool, str | None], ...],
        tuple[list[RankStates], dict[int, tuple[Term, ...]]],
    ] = {}
    out = []
    every = stage_inventories(inventory, layout)
    for index in range(layout.pipeline):
        local = every[index]
        key = _shapes_key(local)
        if key not in by_shapes:
            by_shapes[key] = _rank_states(local, rule, recipe, opt, layout)
        moved, nvme = by_shapes[key]
        top = most_loaded(moved)
        out.append(
            StageStates(
                stage=index,
                layers=tuple(held[index]),
                num_parameters=local.num_parameters,
                ranks=tuple(moved),
                per_gpu=top,
                buffers=tuple(sharding.buffer_terms(local, recipe, engine=layout.engine)),
                nvme=nvme[top.ranks[0]],
            )
        )
    return tuple(out)


@lru_cache(maxsize=1024)
def _shapes_key(local: Inventory) -> tuple[tuple[tuple[int, ...], bool, str | None], ...]:
    """What a stage's states depend on, per tensor (cached per stage inventory: inventories
    hash by identity, and stage_inventories gives plan's layouts the same objects)."""
    return tuple((t.shape, t.trainable, t.dtype) for t in local.parameters)


def _rank_states(
    local: Inventory,
    rule: sharding.EngineRule,
    recipe: Recipe,
    opt: OptimizerConfig,
    layout: Layout,
) -> tuple[list[RankStates], dict[int, tuple[Term, ...]]]:
    """Every data-parallel rank class of one stage: dense tensors over the data-parallel
    group (`Layout.data_shards`), experts over the expert-data group (`Layout.expert_data`),
    then offload.

    Experts are a group of their own only where the engine makes one: Megatron-LM always
    (expert parameters get their own DDP buffers and distributed-optimizer shards,
    megatron/core/distributed/distributed_data_parallel.py::DistributedDataParallel,
    `expert_parallel_params`), and any engine under expert parallelism. Without it, torch
    DDP/ZeroRedundancyOptimizer, FSDP2 and DeepSpeed see a transformers MoE model's expert
    tensors as ordinary parameters: one group, sharded and partitioned with the others."""
    dense, experts = split_experts(local)
    if experts.parameters and layout.expert == 1 and layout.engine != "megatron":
        dense, experts = local, replace(local, parameters=())
    ranks = rule(dense, recipe, opt, layout, layout.shard_group)
    if layout.data_replicate > 1:
        # HSDP: rank r holds shard r mod shard_group (torch's (replicate, shard) mesh is
        # row-major: init_device_mesh(..., (replicate, shard))).
        group, copies = layout.shard_group, layout.data_replicate
        ranks = [
            replace(c, ranks=tuple(sorted(r + k * group for k in range(copies) for r in c.ranks)))
            for c in ranks
        ]
    if experts.parameters:
        expert_ranks = rule(experts, recipe, opt, layout, layout.expert_data)
        tp = (layout.tensor, layout.tensor_rank) if layout.titan_experts else (1, 0)
        ranks = _merge(ranks, expert_ranks, layout.data_shards, layout.expert, tp)
    moved, nvme = [], {}
    for r in ranks:
        states, nvme[r.ranks[0]] = offload_rules.apply(
            r,
            engine=layout.engine,
            stage=layout.stage,
            optimizer=layout.offload.optimizer,
            parameters=layout.offload.parameters,
            inventory=local,
            param_dtype=recipe.parameters,
        )
        moved.append(states)
    return moved, nvme
