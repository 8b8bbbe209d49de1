"""Model parallelism: which slice of which tensor one rank holds under TP, PP and EP.

Tensor parallelism follows Megatron-LM core (megatron/core/tensor_parallel/layers.py, core_r0.12):
`ColumnParallelLinear` splits the output features (dim 0 of a torch Linear weight, and its bias),
`RowParallelLinear` splits the input features (dim 1) and keeps its bias whole,
`VocabParallelEmbedding` and the output layer split a vocabulary padded to a multiple of
`make_vocab_size_divisible_by x TP` (megatron/training/tokenizer/tokenizer.py::
_vocab_size_with_padding), and norms, position embeddings and MoE routers are replicated.
A family's Conv1D modules (GPT-2's) keep weights as [in, out], so their split dims are swapped.

Pipeline parallelism gives each stage a contiguous block of layers; the first stage also holds
the embeddings, the last the final norm and the output layer (megatron/core/models/gpt/
gpt_model.py::GPTModel.__init__, pre_process / post_process). With tied embeddings the last
stage keeps its own copy of the word embedding for the output layer, kept in sync by an
all-reduce (megatron/core/models/common/language_module/language_module.py::
setup_embeddings_and_output_layer).

Expert parallelism gives each rank E / EP of the experts of every MoE layer (megatron/core/
transformer/moe/experts.py); the router and the shared experts are dense.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from typing import Literal

from memplan.errors import MemplanError
from memplan.model.families import family_of
from memplan.model.inventory import Inventory, TensorSpec
from memplan.states.layout import MAKE_VOCAB_SIZE_DIVISIBLE_BY, Layout, VocabSplit
from memplan.states.terms import ceil_div, round_up

Split = Literal["column", "row", "vocab", "replicated"]

# The Layout fields that decide which slice of which tensor a rank holds (the key of the
# cached splits below: layouts that differ only in data, engine or schedule share them).
SPLIT_FIELDS = (
    "tensor",
    "expert",
    "pipeline",
    "virtual_stages",
    "layers_per_stage",
    "schedule",  # zbv places the stages in a V (Layout.chunk_rank)
    "tensor_impl",
    "make_vocab_size_divisible_by",
    "tensor_rank",
)
TITAN_FIELDS = ("implementation", "engine")
"""Kept beside SPLIT_FIELDS only under Layout.titan_experts (torchtitan's routed experts are not
split over TP): other layouts of one plan search keep sharing their splits."""


def split_fields(layout: Layout) -> tuple[str, ...]:
    """The fields `layout`'s split of the tensors reads (SPLIT_FIELDS, TITAN_FIELDS)."""
    return (*SPLIT_FIELDS, *TITAN_FIELDS) if layout.titan_experts else SPLIT_FIELDS


# Name patterns (the module's last path component before .weight/.bias) -> how TP splits it.
_COLUMN = re.compile(
    r"\.(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|gate_proj|up_proj|gate_up_proj|"
    r"c_fc|fc1|fc_in|dense_h_to_4h|wi|wi_0|wi_1|query|key|value|q|k|v|q_b_proj|kv_b_proj|"
    r"intermediate\.dense|w1|w3)\.(weight|bias)$"
)
_ROW = re.compile(
    r"\.(o_proj|c_proj|down_proj|fc2|fc_out|dense_4h_to_h|wo|o|out_proj|attention\.dense|"
    r"self_attention\.dense|attention\.output\.dense|layer\.\d+\.output\.dense|w2)"
    r"\.(weight|bias)$"
)
_VOCAB = re.compile(
    r"(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|shared)\.weight$"
)
_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def vocab_rows(
    vocab: int, tp: int, divisible_by: int, split: VocabSplit = "padded"
) -> tuple[int, ...]:
    """Vocabulary rows of each TP rank.

    padded (Megatron): the vocabulary padded to a multiple of divisible_by x TP, split evenly
    (megatron/training/tokenizer/tokenizer.py::_vocab_size_with_padding, megatron/core/
    tensor_parallel/utils.py::VocabUtility). chunk (torch DTensor): torch.chunk's split,
    ceil(V / TP) rows on the first ranks, the remainder on the next, none on any after
    (torch/distributed/tensor/placement_types.py::Shard._split_tensor, torch 2.13)."""
    if split == "padded":
        return (padded_vocab(vocab, tp, divisible_by) // tp,) * tp
    each = ceil_div(vocab, tp)
    return tuple(max(0, min(each, vocab - r * each)) for r in range(tp))


def tensor_rank_classes(vocab: int | None, layout: Layout) -> tuple[tuple[int, ...], ...]:
    """The TP ranks grouped by the vocabulary rows they hold, most rows first: one group
    unless torch's chunk split leaves the last ranks fewer rows."""
    if not vocab or layout.tensor == 1:
        return (tuple(range(layout.tensor)),)
    rows = vocab_rows(vocab, layout.tensor, layout.vocab_multiple, layout.vocab_split)
    groups: dict[int, list[int]] = {}
    for rank, n in enumerate(rows):
        groups.setdefault(n, []).append(rank)
    return tuple(tuple(g) for g in groups.values())


def tp_split(t: TensorSpec) -> Split:
    """How Megatron-style TP splits tensor `t` (see the module docstring)."""
    name = t.name
    if t.kind != "parameter" or t.role in ("norm", "router", "position", "pooler"):
        return "replicated"
    if _VOCAB.search(name):
        return "vocab"
    if _EXPERTS.search(name):
        return "column"  # handled by expert_local_shape
    if _COLUMN.search(name):
        return "column"
    if _ROW.search(name):
        return "replicated" if name.endswith(".bias") else "row"
    return "replicated"


def _tp_dim(t: TensorSpec, split: Split, model_type: str) -> int | None:
    if split == "replicated":
        return None
    if split == "vocab":
        return 0
    if split == "column":
        return 1 if _conv1d_weight(t, model_type) else 0
    return 0 if _conv1d_weight(t, model_type) else (1 if len(t.shape) >= 2 else None)


def _conv1d_weight(t: TensorSpec, model_type: str) -> bool:
    """`t` is the weight of one of the family's Conv1D modules (`Family.conv1d`): stored
    [in, out], so column and row splits take the other dimension."""
    family = family_of(model_type)
    return (
        family is not None
        and t.name.endswith(".weight")
        and t.name.rsplit(".", 2)[-2] in family.conv1d
    )


def local_shape(t: TensorSpec, layout: Layout, model_type: str) -> tuple[int, ...]:
    """The shape of `t` on TP rank `layout.tensor_rank` of `layout`'s TP and EP degrees."""
    tp, ep = layout.tensor, layout.expert
    shape = list(t.shape)
    if _EXPERTS.search(t.name):
        # fused experts [E, 2I, H] (gate_up: column) / [E, H, I] (down: row)
        shape[0] //= ep
        if tp > 1 and not layout.titan_experts:  # torchtitan's: not split over TP
            shape[1 if t.name.endswith("gate_up_proj") else 2] //= tp
        return tuple(shape)
    if tp == 1:
        return t.shape
    split = tp_split(t)
    dim = _tp_dim(t, split, model_type)
    if dim is None:
        return t.shape
    if split == "vocab":
        rows = vocab_rows(shape[0], tp, layout.vocab_multiple, layout.vocab_split)
        shape[0] = rows[layout.tensor_rank]
    else:
        shape[dim] //= tp
    return tuple(shape)


@lru_cache(maxsize=32)
def tp_counts(inventory: Inventory) -> tuple[tuple[str, int], ...]:
    """Every size tensor parallelism divides, named: the attention and key/value heads
    (megatron/core/transformer/attention.py: `divide(num_query_groups, world_size)`), the MLP
    width, and each column/row-parallel tensor's split dimension (megatron/core/tensor_parallel/
    layers.py: `divide(output_size, world_size)` / `divide(input_size, world_size)`). The
    vocabulary is padded instead, so it is not among them."""
    arch = inventory.architecture
    assert arch is not None
    out: list[tuple[str, int]] = [
        (what, count)
        for what, count in (
            ("num_attention_heads", arch.num_attention_heads),
            ("num_key_value_heads", arch.num_key_value_heads),
            ("intermediate_size", arch.intermediate_size),
        )
        if count
    ]
    seen = {count for _, count in out}
    for t in inventory.parameters:
        split = tp_split(t)
        if split in ("replicated", "vocab"):
            continue
        if _EXPERTS.search(t.name):
            dim = 1 if t.name.endswith("gate_up_proj") else 2
        else:
            dim = _tp_dim(t, split, arch.model_type)  # type: ignore[assignment]
            if dim is None:
                continue
        size = t.shape[dim]
        if size not in seen:
            seen.add(size)
            out.append((f"{t.name}.shape[{dim}]", size))
    return tuple(out)


def check_degrees(inventory: Inventory, layout: Layout) -> None:
    """Refuse layouts the frameworks refuse, naming the valid degrees."""
    arch = inventory.architecture
    if arch is None:
        if layout.tensor > 1 or layout.pipeline > 1 or layout.expert > 1:
            raise MemplanError(
                "tensor, pipeline and expert parallelism need the model's tensors: give the "
                "model as hf_config, preset or architecture, not num_parameters.",
                field="parallelism",
            )
        return

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if layout.tensor > 1:
        counts = tp_counts(inventory)
        for what, count in counts:
            if count % layout.tensor:
                # Only degrees that pass every check: the divisors of their common divisor.
                common = math.gcd(*(c for _, c in counts))
                raise MemplanError(
                    f"{layout.tensor} does not divide {what}={count}; valid tensor degrees: "
                    f"{divisors(common)}.",
                    field="parallelism.tensor",
                )
    if layout.tensor > 1 and arch.vocab_size:
        rows = vocab_rows(arch.vocab_size, layout.tensor, layout.vocab_multiple, layout.vocab_split)
        if not all(rows):
            # torch.chunk makes fewer chunks than asked when V is small: DTensor gives the
            # ranks past the last an empty shard, whose tensors memplan's rules do not take.
            raise MemplanError(
                f"torch's DTensor splits the {arch.vocab_size}-token vocabulary over "
                f"{layout.tensor} TP ranks like torch.chunk ({', '.join(map(str, rows))} rows), "
                "leaving a TP rank no rows; use a smaller tensor degree.",
                field="parallelism.tensor",
            )
    if layout.expert > 1:
        if not arch.num_experts:
            raise MemplanError(
                "expert parallelism needs a mixture-of-experts model.", field="parallelism.expert"
            )
        if arch.num_experts % layout.expert:
            raise MemplanError(
                f"{layout.expert} does not divide the {arch.num_experts} experts; valid expert "
                f"degrees: {divisors(arch.num_experts)}.",
                field="parallelism.expert",
            )
    stage_layers(arch.num_layers, layout)  # raises on a bad pipeline split


def chunk_layers(num_layers: int, layout: Layout) -> list[int]:
    """Layers of each model chunk, in model order (P x virtual stages chunks; chunk c lives on
    pipeline rank c % P, Megatron's interleaved placement)."""
    p, v = layout.pipeline, layout.virtual_stages
    if layout.layers_per_stage is not None:
        counts = list(layout.layers_per_stage)
        if len(counts) != p * v or sum(counts) != num_layers:
            raise MemplanError(
                f"layers_per_stage must list {p * v} stages summing to {num_layers} layers "
                f"(got {len(counts)} summing to {sum(counts)}).",
                field="parallelism.layers_per_stage",
            )
        return counts
    if num_layers % (p * v):
        valid = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise MemplanError(
            f"{num_layers} layers do not split evenly over pipeline {p} x virtual stages "
            f"{v}; use degrees whose product divides {num_layers} "
            f"({', '.join(map(str, valid))}) or give layers_per_stage.",
            field="parallelism.pipeline",
        )
    return [num_layers // (p * v)] * (p * v)


def stage_layers(num_layers: int, layout: Layout) -> list[list[int]]:
    """The layer indices each pipeline rank holds (all of its virtual chunks)."""
    held: list[list[int]] = [[] for _ in range(layout.pipeline)]
    start = 0
    for chunk, count in enumerate(chunk_layers(num_layers, layout)):
        held[layout.chunk_rank(chunk)].extend(range(start, start + count))
        start += count
    return held


def stage_inventory(inventory: Inventory, layout: Layout, stage: int) -> Inventory:
    """The tensors one rank of pipeline `stage` holds, with TP/EP-local shapes."""
    return stage_inventories(inventory, layout)[stage]


def stage_inventories(inventory: Inventory, layout: Layout) -> tuple[Inventory, ...]:
    """`stage_inventory` of every stage, in one pass over the tensors."""
    return _stage_inventories(inventory, layout.keep(*split_fields(layout)))


@lru_cache(maxsize=256)
def _stage_inventories(inventory: Inventory, layout: Layout) -> tuple[Inventory, ...]:
    """`stage_inventories`, cached per inventory and split (plan calls it for thousands of
    layouts that share few splits; the same objects come back, so the caches keyed on them
    downstream hit too)."""
    arch = inventory.architecture
    if arch is None:
        return (inventory,) * layout.pipeline
    stage_of_layer = {
        layer: s for s, held in enumerate(stage_layers(arch.num_layers, layout)) for layer in held
    }
    last = layout.chunk_rank(layout.pipeline * layout.virtual_stages - 1)
    titan = TITAN_FIELDS if layout.titan_experts else ()
    local = _localised(inventory, layout.keep(*_LOCAL_FIELDS, *titan))

    def stage_of(t: TensorSpec) -> int:
        if layout.pipeline == 1:
            return 0
        if t.layer is not None:
            if t.layer not in stage_of_layer:
                # T5 numbers its decoder blocks after the encoder's `num_layers`.
                raise MemplanError(
                    f"pipeline parallelism splits {arch.model_type}'s {arch.num_layers} layers, "
                    f"but {t.name} is in layer {t.layer}: encoder-decoder models are not split "
                    "over pipeline stages; use parallelism.pipeline: 1.",
                    field="parallelism.pipeline",
                )
            return stage_of_layer[t.layer]
        return last if t.role == "head" or _is_final_norm(t) else 0

    params: list[list[TensorSpec]] = [[] for _ in range(layout.pipeline)]
    if layout.pipeline == 1:
        params[0] = list(local)
    else:
        # stage_of per run of consecutive tensors that share their place (a layer's tensors),
        # not per tensor: the runs are the inventory's, worked out once (`_placements`).
        for lo, hi in _placements(inventory):
            params[stage_of(inventory.parameters[lo])].extend(local[lo:hi])
    if last > 0 and inventory.tied:
        # The last stage's own copy of the tied word embedding (the output layer's weight).
        owners = {t.name: mine for t, mine in zip(inventory.parameters, local, strict=True)}
        params[last] += [
            replace(owners[owner], name=alias, role="head")
            for alias, owner in inventory.tied
            if owner in owners
        ]
    buffers: list[list[TensorSpec]] = [[] for _ in range(layout.pipeline)]
    for b in inventory.buffers:
        for s in [stage_of_layer[b.layer]] if b.layer is not None else range(layout.pipeline):
            buffers[s].append(b)
    return tuple(
        replace(inventory, parameters=tuple(params[s]), buffers=tuple(buffers[s]))
        for s in range(layout.pipeline)
    )


@lru_cache(maxsize=64)
def _placements(inventory: Inventory) -> tuple[tuple[int, int], ...]:
    """[lo, hi) runs of consecutive parameters that every pipeline split places on one stage
    (`_stage_inventories`' stage_of reads a tensor's layer, or else whether it is the head or
    the final norm): the same layer, or no layer and the same answer (cached per inventory,
    hashed by identity)."""

    def place(t: TensorSpec) -> tuple[int | None, bool]:
        return (t.layer, t.layer is None and (t.role == "head" or _is_final_norm(t)))

    runs: list[tuple[int, int]] = []
    last: tuple[int | None, bool] | None = None
    for i, t in enumerate(inventory.parameters):
        mine = place(t)
        if runs and mine == last:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
            last = mine
    return tuple(runs)


# The Layout fields that decide a tensor's TP/EP-local shape (`local_shape`).
_LOCAL_FIELDS = ("tensor", "expert", "tensor_impl", "make_vocab_size_divisible_by", "tensor_rank")


@lru_cache(maxsize=64)
def _localised(inventory: Inventory, layout: Layout) -> tuple[TensorSpec, ...]:
    """Every parameter with its TP/EP-local shape, in inventory order (shared by all pipeline
    splits of one TP x EP layout)."""
    arch = inventory.architecture
    assert arch is not None
    shapes: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
    out = []
    for t, key in zip(inventory.parameters, _split_keys(inventory), strict=True):
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = local_shape(t, layout, arch.model_type)
        if shape == t.shape:
            out.append(t)
        else:
            out.append(t.reshaped(shape))
    return tuple(out)


@lru_cache(maxsize=64)
def _split_keys(inventory: Inventory) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Per parameter, what its local shape depends on besides the layout: its name without
    the layer index (layers share their split) and its shape. The same for every layout, so
    worked out once per inventory (hashed by identity)."""
    return tuple((_LAYER_INDEX.sub(".", t.name), t.shape) for t in inventory.parameters)


_LAYER_INDEX = re.compile(r"\.\d+\.")


def _is_final_norm(t: TensorSpec) -> bool:
    """A norm outside the layers that is not an embedding norm (bert, bloom) is the final one."""
    return t.role == "norm" and t.layer is None and "embed" not in t.name


@lru_cache(maxsize=1024)
def split_experts(inventory: Inventory) -> tuple[Inventory, Inventory]:
    """(dense tensors, expert tensors): experts shard over the expert-data-parallel group
    (cached per inventory, hashed by identity: plan splits the same stage inventories, from
    `stage_inventories`, for every engine and data degree)."""
    dense = tuple(t for t in inventory.parameters if t.role != "experts")
    experts = tuple(t for t in inventory.parameters if t.role == "experts")
    return (
        replace(inventory, parameters=dense),
        replace(inventory, parameters=experts, buffers=()),
    )


def padded_vocab(vocab: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """megatron/training/tokenizer/tokenizer.py::_vocab_size_with_padding."""
    return round_up(vocab, divisible_by * tp)


def most_loaded(values: Sequence[int]) -> int:
    """Index of the largest value (the lowest index on a tie)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


__all__ = [
    "VocabSplit",
    "ceil_div",
    "check_degrees",
    "local_shape",
    "padded_vocab",
    "split_experts",
    "stage_inventory",
    "stage_layers",
    "tensor_rank_classes",
    "tp_split",
    "vocab_rows",
]
