"""Transient buffers and overheads of a training step: named terms, each with its source and
the phases of the step in which it is alive (see memplan.timeline).

Not activations, but they live here beside them: they are what the step allocates on top of the
model states (memplan.sharding) and the saved tensors (memplan.activations).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from memplan.models.inventory import Inventory, TensorSpec
from memplan.precision import dtype_bytes

Phase = Literal[
    "start", "forward", "loss", "backward_start", "backward", "backward_end", "optimizer_step"
]
PHASES: tuple[Phase, ...] = (
    "start",
    "forward",
    "loss",
    "backward_start",
    "backward",
    "backward_end",
    "optimizer_step",
)
ALWAYS: tuple[Phase, ...] = PHASES
FORWARD_BACKWARD: tuple[Phase, ...] = ("forward", "loss", "backward_start", "backward")
BACKWARD: tuple[Phase, ...] = ("backward_start", "backward", "backward_end")

# DeepSpeed zero_optimization defaults (deepspeed/runtime/zero/config.py::DeepSpeedZeroConfig,
# 0.19.6; see notes/deepspeed-zero.md): sizes in elements.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
# torch DDP: bucket_cap_mb=25 (torch/nn/parallel/distributed.py::DistributedDataParallel).
DDP_BUCKET_CAP_MB = 25
# c10/cuda/CUDACachingAllocator.cpp: every block is rounded up to kMinBlockSize = 512 bytes;
# requests <= kSmallSize (1 MiB) come from 2 MiB segments (kSmallBuffer), requests below
# kMinLargeAlloc (10 MiB) from 20 MiB segments (kLargeBuffer), larger ones get a segment of
# their own rounded up to kRoundLarge (2 MiB).
ALLOCATOR_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20
# The CUDA context (driver state, kernel images, cuBLAS/cuDNN handles) outside the caching
# allocator: not in torch.cuda.memory_reserved() but not usable either. An assumption, not a
# measurement: a few hundred MiB with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default
# since CUDA 11.7 / torch 2.x). Override with hardware.cuda_context (nvidia-smi's used memory
# minus torch.cuda.memory_reserved() on an idle process).
CUDA_CONTEXT_BYTES = 512 << 20
# Optimizers whose foreach/for-loop step makes a temporary per updated element (a sqrt of the
# second moment or a variance estimate): torch/optim/{adam,adamw,nadam,radam,adamax,adagrad,
# rmsprop,_adafactor}.py. SGD without nesterov updates in place.
ADAPTIVE = frozenset(
    {"adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adafactor"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transient:
    """One transient buffer or overhead."""

    name: str
    bytes: int
    phases: tuple[Phase, ...]
    """The phases of the step in which it is alive."""
    formula: str
    source: str


def round_block(n_bytes: int) -> int:
    """`n_bytes` as the CUDA caching allocator hands it out (a multiple of 512 bytes)."""
    return -(-max(n_bytes, 1) // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


def rounding(sizes: Iterable[int]) -> int:
    """Bytes the 512-byte rounding adds over `sizes` (one allocation each)."""
    return sum(round_block(n) - n for n in sizes if n > 0)


def segment_bytes(sizes: Iterable[int]) -> int:
    """What `torch.cuda.memory_reserved()` needs at least to hold blocks of `sizes` at once:
    large blocks in their own segments rounded to 2 MiB, medium ones packed into 20 MiB
    segments, small ones into 2 MiB segments (allocator constants above; perfect packing, so
    a lower bound: fragmentation and blocks cached from earlier phases come on top)."""
    return pack(segment_parts(sizes))


Parts = tuple[int, int, int]


def segment_parts(sizes: Iterable[int], times: int = 1) -> Parts:
    """(large, medium, small) bytes of `sizes`, each allocated `times` times, before packing
    into segments: parts of several groups add up, `pack` turns the sum into bytes."""
    large = small = medium = 0
    for n in sizes:
        block = round_block(n)
        if block <= SMALL_SIZE:
            small += block
        elif block < MIN_LARGE_ALLOC:
            medium += block
        else:
            large += -(-block // ROUND_LARGE) * ROUND_LARGE
    return large * times, medium * times, small * times


def pack(parts: Parts) -> int:
    """`segment_bytes` of blocks whose `segment_parts` add up to `parts`."""
    large, medium, small = parts
    return large + _segments(medium, LARGE_SEGMENT) + _segments(small, SMALL_SEGMENT)


def _segments(n_bytes: int, segment: int) -> int:
    return -(-n_bytes // segment) * segment


def ddp_buckets(grad_bytes: int, *, as_bucket_view: bool) -> Transient | None:
    """torch DDP copies every gradient into flat allreduce buckets allocated once, at
    construction, for all parameters (bucket_cap_mb, default 25 MiB, sets their number, not
    their total): a second gradient-sized buffer, alive for the whole run. Source:
    torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets and the
    DistributedDataParallel docstring (`gradient_as_bucket_view=True` "can reduce peak memory
    usage, where the saved memory size will be equal to the total gradients size")."""
    if as_bucket_view or grad_bytes == 0:
        return None
    return Transient(
        name="ddp_gradient_buckets",
        bytes=grad_bytes,
        phases=ALWAYS,
        formula=f"{grad_bytes:,} B: one copy of every gradient ({DDP_BUCKET_CAP_MB} MiB buckets)",
        source="torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets",
    )


def deepspeed_ipg_bucket(
    *, stage: int, reduce_bucket_size: int, dtype: str, overlap_comm: bool | None
) -> Transient | None:
    """DeepSpeed's reduction (IPG) bucket: `torch.empty(reduce_bucket_size, dtype)`.

    Stage 1/2 (stage_1_and_2.py::setup_buckets): allocated at the first gradient hook of a
    backward, released at its epilogue, doubled with overlap_comm (default off for 1/2).
    Stage 3 (stage3.py::DeepSpeedZeroOptimizer_Stage3): allocated at init and kept; in the
    communication dtype. Stage 0 has none (the engine all-reduces flat buffers).
    """
    if stage == 0:
        return None
    overlap = overlap_comm if overlap_comm is not None else stage == 3
    copies = 2 if overlap and stage < 3 else 1
    n_bytes = copies * reduce_bucket_size * dtype_bytes(dtype)
    phases = ALWAYS if stage == 3 else BACKWARD
    where = "stage3.py (at init)" if stage == 3 else "stage_1_and_2.py::setup_buckets"
    return Transient(
        name="deepspeed_reduce_bucket",
        bytes=n_bytes,
        phases=phases,
        formula=f"{copies} x reduce_bucket_size {reduce_bucket_size:,} x "
        f"{dtype_bytes(dtype)} B ({dtype})",
        source=f"deepspeed/runtime/zero/{where} (0.19.6)",
    )


def module_sizes(inventory: Inventory) -> tuple[int, int]:
    """(elements of the largest decoder layer, of the largest tensor outside the layers)."""
    return _largest_layer(inventory.parameters), _largest_root(inventory.parameters)


def zero3_live_parameters(
    modules: tuple[int, int], *, dtype: str, prefetch_bucket_size: int, max_live_parameters: int
) -> Transient:
    """ZeRO-3 gathers each module's parameters for its forward and backward, prefetching up to
    stage3_prefetch_bucket_size elements ahead, never holding more than
    stage3_max_live_parameters. Alive: the largest module (a decoder layer, or the embedding /
    LM head) plus one prefetch bucket, capped. Source: deepspeed/runtime/zero/
    partitioned_param_coordinator.py::PartitionedParameterCoordinator.fetch_sub_module (0.19.6)."""
    biggest = max(modules)
    live = min(biggest + prefetch_bucket_size, max(max_live_parameters, biggest))
    return Transient(
        name="zero3_gathered_parameters",
        bytes=live * dtype_bytes(dtype),
        phases=FORWARD_BACKWARD,
        formula=f"min({biggest:,} (largest module) + {prefetch_bucket_size:,} prefetch, "
        f"max_live {max_live_parameters:,}) elements x {dtype_bytes(dtype)} B ({dtype})",
        source="deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.6)",
    )


# torch FSDP2 (`fully_shard`, torch 2.13) as memplan verify wraps a model
# (memplan/verify/rank.py::_wrap): one parameter group per decoder layer, then the root (every
# parameter outside the layers), each call given reshard_after_forward explicitly (True for
# ZeRO-3, False for ZeRO-2), so with ZeRO-3 the root is resharded after forward too (only
# reshard_after_forward=None keeps the root unsharded: _fully_shard.py L246, _fsdp_state.py
# L205). Files below are under torch/distributed/fsdp/_fully_shard/; lines are torch 2.13's.
_FSDP2 = "torch/distributed/fsdp/_fully_shard/"
_AG_OUT = _FSDP2 + "_fsdp_collectives.py::foreach_all_gather L351-353 (all_gather_output)"
_AG_COPY_OUT = (
    _FSDP2 + "_fsdp_collectives.py::foreach_all_gather_copy_out L457-463 "
    "(alloc_all_gather_outputs: the unsharded parameters' storage, padded)"
)
_AG_KEPT = (
    _FSDP2 + "_fsdp_param_group.py::wait_for_unshard L476-485 (all_gather_state kept in "
    "forward), dropped by the next group's wait_for_unshard L429-432 but held by its local "
    "`prev_all_gather_state` through that group's copy-out, or freed by the root's "
    "post-forward (_fsdp_state.py L335-342)"
)
_PREFETCH = _FSDP2 + "_fsdp_param_group.py::_backward_prefetch L795-830 (unshard only)"
_RESHARD = (
    _FSDP2 + "_fsdp_param_group.py::post_forward L557-566, reshard L498-509 "
    "(reshard_after_forward), post_backward L637-638 (reshard_after_backward)"
)
_POST_BW = _FSDP2 + "_fsdp_param_group.py::post_backward L618-630 (unsharded_param.grad)"
_RS_IN = (
    _FSDP2 + "_fsdp_collectives.py::foreach_reduce L592-606 (reduce_scatter_input, padded); "
    "kept in comm_ctx.reduce_scatter_states until the next group's post_backward "
    "(_fsdp_param_group.py L647-658, L717-719) or the final callback (_fsdp_state.py L431)"
)
_RS_OUT = _FSDP2 + "_fsdp_collectives.py::foreach_reduce L612-616 (reduce_output)"
_RS_CAST = _FSDP2 + "_fsdp_collectives.py::foreach_reduce L696 (_to_dtype_if_needed)"
_RS_LAST = (
    _FSDP2 + "_fsdp_collectives.py::foreach_reduce L580-590: the loop variable "
    "`unsharded_grad` still holds the last gradient after `unsharded_grads.clear()` (L606), "
    "until foreach_reduce returns"
)
# gloo has no reduce-scatter of its own: it all-reduces a copy of the input and copies this
# rank's chunk out when the caller waits (the copy goes with the work object). Its worker
# thread drops its own reference only after waking the caller, so now and then the copy
# outlives the collective by a few ops (seen as a rare one-rank spike in memplan verify).
_GLOO_RS = (
    "torch/csrc/distributed/c10d/ProcessGroupGloo.cpp::reduce_scatter_tensor_coalesced "
    "(`buffers.push_back(inputTensors[i].clone())`, all-reduced, then "
    "`outputTensors[i].copy_(buffers[i].chunk(worldSize)[rank])` in the LambdaWork's wait)"
)


@dataclass(frozen=True, slots=True)
class Fsdp2Group:
    """One FSDP2 parameter group (one `fully_shard` call), in elements on one rank."""

    padded: int
    """Every parameter's padded shard, ceil(dim0 / world) rows (`padded_sharded_param_size`):
    world x this is the all-gather output and the unsharded parameters' storage."""
    grad_padded: int
    """The same over the parameters with a gradient: the reduce-scatter output per rank
    (the reduce-scatter input is world x this)."""
    grads: int
    """Elements of its unsharded gradients (unpadded, parameters with a gradient)."""
    last: int
    """Elements of its last parameter with a gradient (see _RS_LAST)."""


@dataclass(frozen=True, slots=True)
class Fsdp2Groups:
    """The groups verify makes: the root and `layers` decoder layers (the largest one)."""

    root: Fsdp2Group
    block: Fsdp2Group
    layers: int
    head_grads: int
    """Elements of the root's gradients that exist while the decoder layers run backward:
    every root parameter but the input and position embeddings (unless tied to the head)."""


def fsdp2_groups(inventory: Inventory, world: int) -> Fsdp2Groups:
    """FSDP2's groups of `inventory` sharded `world` ways (see Fsdp2Group)."""
    tied = bool(inventory.tied)
    roots = [t for t in inventory.parameters if t.layer is None]
    layers: dict[int, list[TensorSpec]] = {}
    for t in inventory.parameters:
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
    blocks = [_fsdp2_group(ts, world) for ts in layers.values()]
    head = [t for t in roots if (t.role != "embedding" or tied) and t.role != "position"]
    return Fsdp2Groups(
        root=_fsdp2_group(roots, world),
        block=max(blocks, key=lambda b: b.padded, default=_fsdp2_group([], world)),
        layers=len(layers),
        head_grads=sum(t.numel for t in head if t.trainable),
    )


def _fsdp2_group(tensors: list[TensorSpec], world: int) -> Fsdp2Group:
    train = [t for t in tensors if t.trainable]
    return Fsdp2Group(
        padded=sum(_padded(t, world) for t in tensors),
        grad_padded=sum(_padded(t, world) for t in train),
        grads=sum(t.numel for t in train),
        last=train[-1].numel if train else 0,
    )


@dataclass(frozen=True, slots=True)
class _Fsdp2Bytes:
    """The buffers of one group, in bytes (see fsdp2())."""

    unsharded: int
    """world x padded x param dtype: the all-gather output, and again the parameters."""
    grads: int
    reduce_in: int
    reduce_out: int
    sharded_grads: int
    last: int


def _fsdp2_bytes(g: Fsdp2Group, world: int, param: int, grad: int, shard: int) -> _Fsdp2Bytes:
    return _Fsdp2Bytes(
        unsharded=world * g.padded * param,
        grads=g.grads * grad,
        reduce_in=world * g.grad_padded * grad,
        reduce_out=g.grad_padded * grad,
        sharded_grads=g.grad_padded * shard,
        last=g.last * grad,
    )


def fsdp2_root_gradients(groups: Fsdp2Groups, *, shard: str) -> int:
    """Bytes of the root's sharded gradients, which FSDP2 makes only in the root's
    post-backward, after the whole backward (the timeline leaves them out before)."""
    return groups.root.grad_padded * dtype_bytes(shard)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fsdp2Activations:
    """What the timeline's phase points hold besides FSDP2, for FSDP2's moments that fall
    between them (bytes): a moment is counted at a phase point with what that point holds
    but the moment does not subtracted."""

    layer: int
    """One decoder layer's saved tensors."""
    forward_working_set: int
    logits_gradient: int
    embedding_backward: Transient | None = None
    """The embedding's backward (the timeline's last op of backward, see fsdp2())."""


def fsdp2(
    groups: Fsdp2Groups,
    *,
    world: int,
    param: str,
    grad: str,
    shard: str,
    reshard: bool,
    gloo: bool,
    acts: Fsdp2Activations | None = None,
) -> list[Transient]:
    """FSDP2's buffers at each phase of the step, on top of the sharded model states.

    `param` is MixedPrecisionPolicy.param_dtype (the all-gather and compute dtype), `grad` the
    unsharded gradients' dtype (also the reduce-scatter's: reduce_dtype None), `shard` the
    sharded parameters' and gradients' dtype. With `reshard` (ZeRO-3) a decoder layer is
    unsharded only while it runs (and the next one prefetched in backward); without it
    (ZeRO-2) every group stays unsharded from its forward until its post-backward. `gloo`:
    the CPU process group, whose reduce-scatter copies its input (_GLOO_RS).

    At the end of backward the larger of two moments counts: the embedding's backward (the
    root still unsharded with all its unsharded gradients, the first layer's reduce-scatter
    input still held, and `acts.embedding_backward`, returned only then) or the root's own
    reduce-scatter (input, output, gloo's copy, the last unsharded gradient; the root's
    sharded gradients not yet made, see fsdp2_root_gradients). The decoder layers' backward
    is the worst of several moments (_fsdp2_layer_backward); with `acts`, two all-gathers of
    the root between phase points are added where they hold more (_fsdp2_between_phases)."""
    p, g, o = dtype_bytes(param), dtype_bytes(grad), dtype_bytes(shard)
    root = _fsdp2_bytes(groups.root, world, p, g, o)
    block = _fsdp2_bytes(groups.block, world, p, g, o)
    layers = groups.layers
    terms: dict[str, Transient] = {}

    def add(name: str, n_bytes: int, phases: tuple[Phase, ...], formula: str, src: str) -> None:
        if n_bytes > 0 and phases:
            terms[name] = Transient(
                name=name, bytes=n_bytes, phases=phases, formula=formula, source=src
            )

    def up(elements: int) -> str:
        return f"{world} ranks x {elements:,} padded shard elements x {p} B ({param})"

    # The end of backward: the embedding's backward or the root's reduce-scatter.
    embedding = acts.embedding_backward if acts is not None else None
    at_embedding = root.unsharded + root.grads + (block.reduce_in if layers else 0)
    copy = root.reduce_in if gloo else 0
    at_reduce = root.reduce_in + root.reduce_out + root.last + copy
    cast = root.reduce_in + root.reduce_out + root.sharded_grads + root.last if g != o else 0
    end_reduce = max(at_reduce, cast) > at_embedding + (embedding.bytes if embedding else 0)
    add(
        "fsdp2_unsharded_root",
        root.unsharded,
        ("forward", "loss", "backward_start", "backward")
        + (() if end_reduce else ("backward_end",)),
        up(groups.root.padded) + ": the root's all-gathered parameters (from its "
        "pre-forward to its post-forward, again from its pre-backward to its post-backward)",
        f"{_AG_COPY_OUT}; {_RESHARD}",
    )
    if reshard:
        add(
            "fsdp2_unsharded_block",
            block.unsharded if layers else 0,
            ("forward", "backward"),
            up(groups.block.padded) + ": the decoder layer that runs",
            f"{_AG_COPY_OUT}; {_RESHARD}",
        )
        add(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward", "loss", "backward_start") + (("backward",) if layers > 1 else ()),
            up(groups.block.padded) + ": one layer's flat all-gather output (the last "
            "layer's, kept until the root's post-forward; in backward the next layer's, "
            "prefetched)",
            f"{_AG_OUT}; {_AG_KEPT}; {_PREFETCH}",
        )
    else:
        add(
            "fsdp2_unsharded_blocks",
            layers * block.unsharded,
            ("forward", "loss", "backward_start", "backward"),
            f"{layers} layers x " + up(groups.block.padded) + ": every layer stays "
            "unsharded from its forward to its post-backward (reshard_after_forward=False)",
            f"{_AG_COPY_OUT}; {_RESHARD}",
        )
        add(
            "fsdp2_all_gather_output",
            block.unsharded if layers else 0,
            ("forward", "loss"),
            up(groups.block.padded) + ": the last layer's flat all-gather output, "
            "kept until the root's post-forward",
            f"{_AG_OUT}; {_AG_KEPT}",
        )
    add(
        "fsdp2_unsharded_head_grads",
        groups.head_grads * g,
        ("backward",),
        f"{groups.head_grads:,} elements x {g} B ({grad}): the root's gradients computed "
        "before the layers' backward (LM head, final norm), unsharded until the root's "
        "post-backward",
        _POST_BW,
    )
    layer = _fsdp2_layer_backward(
        block,
        layers=layers,
        reshard=reshard,
        gloo=gloo,
        saved=acts.layer if acts is not None else 0,
        grad=grad,
        shard=shard,
    )
    if layer is not None:
        terms[layer.name] = layer
    if not end_reduce:
        add(
            "fsdp2_unsharded_root_grads",
            root.grads,
            ("backward_end",),
            f"{groups.root.grads:,} elements x {g} B ({grad}): every root gradient, "
            "unsharded, at the embedding's backward",
            _POST_BW,
        )
        add(
            "fsdp2_reduce_scatter_input_block",
            block.reduce_in if layers else 0,
            ("backward_end",),
            f"{world} x {groups.block.grad_padded:,} elements x {g} B ({grad}): the first "
            "layer's reduce-scatter input, held until the root's post-backward",
            _RS_IN,
        )
    else:
        rs = f"{groups.root.grad_padded:,} padded elements x {g} B ({grad})"
        add(
            "fsdp2_reduce_scatter_input_root",
            root.reduce_in,
            ("backward_end",),
            f"{world} x {rs}: the root's reduce-scatter input",
            _RS_IN,
        )
        add(
            "fsdp2_reduce_scatter_output_root",
            root.reduce_out,
            ("backward_end",),
            f"{rs}: the root's reduce-scatter output",
            _RS_OUT,
        )
        add(
            "fsdp2_last_unsharded_grad",
            root.last,
            ("backward_end",),
            f"{groups.root.last:,} elements x {g} B ({grad}): the root's last gradient, "
            "unsharded, through its reduce-scatter",
            _RS_LAST,
        )
        if at_reduce >= cast:
            add(
                "gloo_reduce_scatter_copy",
                copy,
                ("backward_end",),
                f"{world} x {rs}: gloo's copy of the reduce-scatter input",
                _GLOO_RS,
            )
        else:
            add(
                "fsdp2_sharded_root_grads",
                root.sharded_grads,
                ("backward_end",),
                f"{groups.root.grad_padded:,} elements x {o} B ({shard}): the root's "
                f"sharded gradients, cast from {grad} beside the reduce-scatter output",
                _RS_CAST,
            )
        embedding = None
    out = list(terms.values())
    if acts is not None:
        out += _fsdp2_between_phases(root, block, layers=layers, reshard=reshard, acts=acts)
    return out + ([embedding] if embedding is not None else [])


def _fsdp2_between_phases(
    root: _Fsdp2Bytes, block: _Fsdp2Bytes, *, layers: int, reshard: bool, acts: Fsdp2Activations
) -> list[Transient]:
    """FSDP2 moments between the timeline's phase points, each counted at the nearest point
    where it holds more than that point, as the excess over it (the bytes the point holds
    and the moment does not are subtracted; a term only where the excess is positive):

    - forward: a layer's all-gather and copy-out, while the previous group's flat
      all-gather output is still kept (_AG_KEPT) and this layer and the later ones have
      saved nothing yet (with ZeRO-2 the later layers are not gathered yet either). Layer j
      holds more than the forward point by the previous output - (L - j) layers' saved
      tensors - the forward working set (- (L - 1 - j) layers with ZeRO-2): largest at the
      first layer (the previous group is the root) or at the last one;
    - backward_start (ZeRO-3): the root's pre-backward all-gather, before the loss gradient
      (the root was resharded after forward).
    The decoder layers' backward is _fsdp2_layer_backward."""
    out = []
    if layers:
        later = 0 if reshard else block.unsharded

        def excess(j: int) -> int:
            kept = root.unsharded if j == 0 else block.unsharded
            return (
                kept
                - (layers - j) * acts.layer
                - acts.forward_working_set
                - (layers - 1 - j) * later
            )

        j = max(sorted({0, layers - 1}), key=lambda i: (excess(i), -i))
        if excess(j) > 0:
            kept = "the root's" if j == 0 else "the previous layer's"
            unsharded = root.unsharded if j == 0 else block.unsharded
            not_yet = (
                f" - {layers - 1 - j} x {block.unsharded:,} B layers not gathered yet"
                if later and layers - 1 - j
                else ""
            )
            out.append(
                Transient(
                    name="fsdp2_all_gather_forward",
                    bytes=excess(j),
                    phases=("forward",),
                    formula=f"at layer {j}'s all-gather: {unsharded:,} B {kept} all-gather "
                    f"output still kept - {layers - j} x {acts.layer:,} B saved tensors - "
                    f"{acts.forward_working_set:,} B forward working set, not made yet"
                    f"{not_yet}",
                    source=f"{_AG_OUT}; {_AG_KEPT}",
                )
            )
    if reshard:
        # The root's pre-backward: its all-gather output and parameters; the backward_start
        # point holds its parameters, the last layer's prefetched all-gather output and the
        # loss gradient.
        prefetch = block.unsharded if layers else 0
        n_bytes = root.unsharded - prefetch - acts.logits_gradient
        if n_bytes > 0:
            out.append(
                Transient(
                    name="fsdp2_root_all_gather_backward",
                    bytes=n_bytes,
                    phases=("backward_start",),
                    formula=f"at the root's pre-backward: {root.unsharded:,} B root all-gather "
                    f"output - {prefetch:,} B last layer's all-gather (prefetched after it) - "
                    f"{acts.logits_gradient:,} B loss gradient (made after it)",
                    source=f"{_AG_OUT}; {_FSDP2}_fsdp_param_group.py::wait_for_unshard "
                    f"L486-489 (freed after the copy-out in backward); {_PREFETCH}",
                )
            )
    return out


def _fsdp2_layer_backward(
    block: _Fsdp2Bytes,
    *,
    layers: int,
    reshard: bool,
    gloo: bool,
    saved: int,
    grad: str,
    shard: str,
) -> Transient | None:
    """The decoder layers' backward beyond the backward point's FSDP2 terms (the root, the
    running layer, the prefetched all-gather output, the head's gradients), which is the
    last layer at the start of its backward with every saved tensor. Layer k from the last
    (k = 0 is the last) adds, while it runs: the previous layer's reduce-scatter input (held
    until this layer's post-backward, _RS_IN) and k layers' sharded gradients, minus k
    layers' saved tensors (`saved` each), minus k resharded layers under ZeRO-2 and the
    prefetch the first layer does not make under ZeRO-3 (_PREFETCH). At the end of its
    backward its saved tensors are gone and its gradients made (_POST_BW); then its
    post-backward reshards it and pops the previous input before allocating its own, copying
    the gradients in and reduce-scattering (output, gloo's copy, the last gradient: _RS_OUT,
    _GLOO_RS, _RS_LAST). Each moment is linear in k, so the largest is at k = 0, 1, L - 2
    or L - 1; the term is that largest excess (none when no moment exceeds the point)."""
    if not layers:
        return None
    slope = block.sharded_grads - saved - (0 if reshard else block.unsharded)
    copy = block.reduce_in if gloo else 0
    reduce = block.reduce_in + max(block.grads, block.reduce_out + block.last + copy)

    def moments(k: int) -> list[tuple[int, str]]:
        held = block.reduce_in if k else 0
        no_prefetch = block.unsharded if reshard and layers > 1 and k == layers - 1 else 0
        mid = held + k * slope - no_prefetch
        return [
            (mid, "running"),
            (mid + block.grads - saved, "at the end of its backward"),
            (mid - held - block.unsharded + reduce - saved, "in its reduce-scatter"),
        ]

    ks = sorted({k for k in (0, 1, layers - 2, layers - 1) if 0 <= k < layers})
    n_bytes, k, where = max(
        ((n, k, where) for k in ks for n, where in moments(k)), key=lambda c: (c[0], -c[1])
    )
    if n_bytes <= 0:
        return None
    parts = []
    if k:
        parts.append(f"{block.reduce_in:,} B previous reduce-scatter input")
        resharded = "" if reshard else f" - {block.unsharded:,} B resharded"
        parts.append(
            f"{k} x ({block.sharded_grads:,} B sharded gradients ({shard}) - {saved:,} B "
            f"saved{resharded})"
        )
        if reshard and layers > 1 and k == layers - 1:
            parts.append(f"-{block.unsharded:,} B prefetch not made")
    if where == "at the end of its backward":
        parts.append(f"{block.grads:,} B gradients ({grad}) - {saved:,} B saved")
    elif where == "in its reduce-scatter":
        if k:
            parts.append(f"-{block.reduce_in:,} B previous input popped")
        gloo_copy = " + gloo's copy" if gloo else ""
        parts.append(
            f"{reduce:,} B (reduce-scatter input + max(gradients, output + last gradient"
            f"{gloo_copy})) - {block.unsharded:,} B resharded - {saved:,} B saved"
        )
    return Transient(
        name="fsdp2_layer_backward",
        bytes=n_bytes,
        phases=("backward",),
        formula=f"layer {k} from the last, {where}: " + " + ".join(parts),
        source=f"{_POST_BW}; {_RS_IN}; {_RS_OUT}; {_RS_LAST}; {_GLOO_RS}; {_PREFETCH}",
    )


def torch_optimizer_step(
    *, name: str, implementation: str, updated: int, largest: int, dtype: str
) -> Transient | None:
    """Temporaries of a torch.optim step (torch/optim/adam.py, 2.13, and the other adaptive
    optimizers): foreach makes one full list of temporaries (`_foreach_sqrt(exp_avg_sqs)`,
    `updated` elements); the for-loop makes two of the largest tensor at a time
    (`(exp_avg_sq.sqrt() / bias_correction2_sqrt)`); fused kernels make none. Field notes
    (fake-tensor Llama-7B step): foreach about one parameter-sized copy, for-loop ~0.5 GB."""
    if name not in ADAPTIVE or implementation == "fused":
        return None
    if implementation == "foreach":
        elems, formula = updated, f"{updated:,} updated elements (one foreach list)"
    else:
        elems, formula = 2 * largest, f"2 x {largest:,} (largest tensor, for-loop)"
    return Transient(
        name="optimizer_step_temporaries",
        bytes=elems * dtype_bytes(dtype),
        phases=("optimizer_step",),
        formula=f"{formula} x {dtype_bytes(dtype)} B ({dtype})",
        source=f"torch/optim/{name}.py::_multi_tensor_/_single_tensor_ (2.13)",
    )


def master_gradients(elements: int, dtype: str) -> Transient:
    """A torch optimizer over fp32 master weights (a *-mixed recipe without DeepSpeed or
    Megatron) needs fp32 gradients: each 16-bit `.grad` is cast into its master's `.grad` for
    the step and dropped after it (memplan/verify/build.py::MasterWeights.step, the pattern of
    apex amp O2's master params)."""
    return Transient(
        name="master_gradients",
        bytes=elements * dtype_bytes(dtype),
        phases=("optimizer_step",),
        formula=f"{elements:,} master elements x {dtype_bytes(dtype)} B ({dtype})",
        source="memplan/verify/build.py::MasterWeights.step",
    )


def deepspeed_step_grads(*, stage: int, partition: int, sub_group: int, grad: str) -> Transient:
    """DeepSpeed converts this rank's gradient partition to fp32 for the optimizer, one group
    (stage 1/2) or sub-group (stage 3) at a time: a flattened 16-bit copy plus its fp32 cast.
    Source: stage_1_and_2.py::DeepSpeedZeroOptimizer.step, stage3.py::
    _prepare_fp32_grad_for_sub_group (0.19.6)."""
    elems = min(partition, sub_group) if stage == 3 else partition
    per = dtype_bytes(grad) + dtype_bytes("fp32") if grad != "fp32" else 0
    return Transient(
        name="deepspeed_fp32_gradient_partition",
        bytes=elems * per,
        phases=("optimizer_step",),
        formula=f"{elems:,} elements x ({dtype_bytes(grad)} + 4) B"
        if per
        else "gradients already fp32: no copy",
        source="deepspeed/runtime/zero/stage_1_and_2.py::step, stage3.py (0.19.6)",
    )


def _padded(t: TensorSpec, world: int) -> int:
    if not t.shape or not t.shape[0]:
        return t.numel
    return -(-t.shape[0] // world) * (t.numel // t.shape[0])


def _largest_layer(params: Iterable[TensorSpec]) -> int:
    sizes: dict[int, int] = {}
    for t in params:
        if t.layer is not None:
            sizes[t.layer] = sizes.get(t.layer, 0) + t.numel
    return max(sizes.values(), default=0)


def _largest_root(params: Iterable[TensorSpec]) -> int:
    return max((t.numel for t in params if t.layer is None), default=0)
