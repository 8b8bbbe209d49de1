"""torch FSDP2's parameter groups (one `fully_shard` call each): which parameters each holds
and their padded shard sizes on one rank, as memplan verify wraps a model or as torchtitan
does (Layout.fsdp_groups), with routed experts over the expert-data ranks under expert
parallelism. memplan.states.engines.fsdp2.step sizes the buffers each group holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.model.families import family_of
from memplan.model.inventory import Inventory, TensorSpec, by_layer
from memplan.precision import dtype_bytes
from memplan.states.engines.base import StepCache, StepStates
from memplan.states.engines.fsdp2.fp8 import check_even, fp8_shard_elements
from memplan.states.engines.fsdp2.sharding import padded_elements


@dataclass(frozen=True, slots=True)
class Fsdp2Group:
    """One FSDP2 parameter group (one `fully_shard` call), in elements on one rank."""

    padded: int
    """Every parameter's padded shard (memplan.states.engines.fsdp2.sharding.padded_elements):
    world x this is the all-gather output and the unsharded parameters' storage."""
    grad_padded: int
    """The same over the parameters with a gradient: the reduce-scatter output per rank
    (the reduce-scatter input is world x this)."""
    grads: int
    """Elements of its unsharded gradients (unpadded, parameters with a gradient)."""
    last: int
    """Elements of its last parameter with a gradient (memplan.states.engines.fsdp2.step's
    _RS_LAST)."""
    expert_world: int = 1
    """Under expert parallelism, the expert-data ranks its routed experts are sharded over
    (EDP); `padded` and `grad_padded` are then the other parameters'."""
    expert_padded: int = 0
    """The routed experts' padded shard elements over `expert_world` ranks (as `padded`)."""
    expert_grad_padded: int = 0
    fp8_padded: int = 0
    """With precision.fp8_all_gather: the elements of `padded` that FSDP2 gathers in fp8, the
    Float8Linear weights' shards (memplan.states.engines.fsdp2.fp8)."""
    fixed: tuple[FixedDtype, ...] = ()
    """Its parameters held in a fixed dtype (TensorSpec.dtype: peft's fp32 adapters, packed
    4-bit weights, prepare_model_for_kbit_training's fp32 root), per dtype: their share of
    the element counts above, which FSDP2 may gather and reduce in their own dtype
    (memplan.states.engines.fsdp2.buffers.fsdp2_bytes)."""
    last_dtype: str | None = None
    """The fixed dtype of its last parameter with a gradient (None: the recipe's)."""


@dataclass(frozen=True, slots=True)
class FixedDtype:
    """One group's parameters of one fixed dtype, in elements on one rank."""

    dtype: str
    """The dtype they are held (sharded) in."""
    gathered: int
    """Elements of the all-gather output they fill: world x padded (+ EDP x expert_padded)."""
    reduce_in: int
    """The same over those with a gradient: their share of the reduce-scatter input."""
    reduce_out: int
    """Their share of the reduce-scatter output (one rank's padded gradient shards)."""
    grads: int
    """Elements of their unsharded gradients (unpadded)."""


@dataclass(frozen=True, slots=True)
class Fsdp2Groups:
    """The groups verify makes (fsdp_wrap `layers`): the root and `layers` decoder layers (the
    largest one); with torchtitan's wrapping also its head group (`head`)."""

    root: Fsdp2Group
    """The group gathered first in forward and reduced last in backward: every parameter
    outside the decoder layers, or with a `head` group the input (and position) embeddings."""
    block: Fsdp2Group
    layers: int
    head_grads: int
    """Elements of the root's gradients that exist while the decoder layers run backward:
    every root parameter but the input and position embeddings (unless tied to the head)."""
    head: Fsdp2Group | None = None
    """torchtitan's `fully_shard([model.norm, model.output], reshard_after_forward=False)`
    (TITAN_WRAP): the final norm and the output projection, gathered after the last layer's
    forward, unsharded until their post-backward (before the layers' backward); None: those
    parameters are in the root."""


# torchtitan 0.3.0 torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder (called by
# models/llama3/parallelize.py::parallelize_llama), untied head: fully_shard(tok_embeddings,
# reshard_after_forward=True), each block (True), fully_shard([norm, output],
# reshard_after_forward=False: policy "default", not "always"), then fully_shard(model) over
# no parameters; fsdp_reshard_after_forward "never" makes every group False. A tied head
# is one group [tok_embeddings, norm, output]. torchtitan 9dec370 (Dec 2024, the published
# H100 table) wrapped differently: parallelisms/parallelize_llama.py::apply_fsdp shards each
# block (the last one not resharded after forward) and the root holding tok_embeddings, norm
# and output (memplan's `layers` grouping but for that last block).
TITAN_WRAP = "torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder (torchtitan 0.3.0)"


# Experts over the expert-data mesh: torchtitan 0.3.0 torchtitan/distributed/fsdp.py::
# apply_fsdp_to_decoder with ep_degree > 1 gives each MoE block's routed-expert parameters
# (moe.routed_experts.inner_experts) the `edp_mesh` (dp_shard_mod_ep, data / EP ranks) through
# a shard_placement_fn (ShardPlacementResult(mesh_info=edp_mesh_info)) and every other
# parameter of the block the dp mesh: one fully_shard call, two FSDPParamGroups, each
# all-gathering and reduce-scattering over its own mesh (torch _fsdp_init.py /
# _fully_shard.py: one group per mesh). Both reduce-scatter inputs stay alive together
# (_fsdp_param_group.py::post_backward pops the previous inputs only in the module's last
# group, L647-658). memplan's model states already shard experts over Layout.expert_data
# under EP for every engine (memplan.states.stages._rank_states), so the gather follows.
# torchtitan's Shard(1) placement of the experts when efsdp x EP (the fsdp mesh at EP 1)
# exceeds the expert count: an even dim-1 share, no padding
# (memplan.states.engines.fsdp2.sharding.SRC_DIM1, `padded_elements` with `wrap`).
EDP = "torchtitan/distributed/fsdp.py::apply_fsdp_to_decoder, ep_degree > 1 (torchtitan 0.3.0)"


def fsdp2_groups(
    inventory: Inventory,
    world: int,
    wrap: str = "layers",
    expert_world: int | None = None,
    fp8: bool = False,
    tensor: int = 1,
) -> Fsdp2Groups:
    """FSDP2's groups of `inventory` sharded `world` ways (see Fsdp2Group), as `wrap`
    (Layout.fsdp_groups) groups them; with `expert_world` (expert parallelism) the routed
    experts of each layer are sharded over that many expert-data ranks instead (EDP); with
    `fp8` (precision.fp8_all_gather) the Float8Linear weights are gathered in fp8
    (Fsdp2Group.fp8_padded); `tensor`: the TP degree `inventory`'s TP-local shapes are of
    (which Linears torchao converts is decided on the whole Linears, fsdp2.fp8.fp8_gathered)."""
    if fp8 and _conv1d_blocks(inventory):
        # torchao 0.18 float8/float8_linear_utils.py::convert_to_float8_training swaps
        # nn.Linear modules only: GPT-2's Conv1D blocks keep their 16-bit weights, gathered
        # as without fp8.
        fp8 = False
    if fp8:
        check_even(inventory.parameters, world, tensor)
        groups = fsdp2_groups(inventory, world, wrap, expert_world)
        # Only decoder layers hold Float8Linear weights (fp8_gathered): the root and
        # torchtitan's head group gather as without fp8.
        block = _largest_fp8_block(inventory, world, expert_world, wrap, tensor)
        return replace(groups, block=block)
    tied = bool(inventory.tied)
    roots = [t for t in inventory.parameters if t.layer is None]
    layers = by_layer(inventory.parameters)
    blocks = [_fsdp2_group(ts, world, expert_world, wrap) for ts in layers.values()]
    block = max(blocks, key=lambda b: b.padded, default=_fsdp2_group([], world))
    if wrap == "torchtitan" and not tied:
        first = [t for t in roots if t.role in ("embedding", "position")]
        rest = [t for t in roots if t.role not in ("embedding", "position")]
        if first and rest:
            return Fsdp2Groups(
                root=_fsdp2_group(first, world),
                block=block,
                layers=len(layers),
                head_grads=0,
                head=_fsdp2_group(rest, world),
            )
    head = [t for t in roots if (t.role != "embedding" or tied) and t.role != "position"]
    return Fsdp2Groups(
        root=_fsdp2_group(roots, world),
        block=block,
        layers=len(layers),
        head_grads=sum(t.numel for t in head if t.trainable),
    )


def _conv1d_blocks(inventory: Inventory) -> bool:
    """Whether the model's decoder layers are built of transformers' Conv1D (GPT-2's c_attn,
    c_proj, c_fc), which torchao never converts to Float8Linear."""
    arch = inventory.architecture
    family = family_of(arch.model_type) if arch else None
    return bool(family and family.conv1d)


def _with_fp8(group: Fsdp2Group, tensors: list[TensorSpec], world: int, tensor: int) -> Fsdp2Group:
    """`group` with the fp8-gathered elements of its `tensors` (none outside the layers)."""
    return replace(group, fp8_padded=fp8_shard_elements(tensors, world, tensor))


def _largest_fp8_block(
    inventory: Inventory, world: int, expert_world: int | None, wrap: str, tensor: int
) -> Fsdp2Group:
    """The decoder layer whose unsharded bytes are the largest with its fp8 weights at 1 B
    (ties: the most padded elements, as fsdp2_groups picks without fp8)."""
    layers = by_layer(inventory.parameters)
    blocks = [
        _with_fp8(_fsdp2_group(ts, world, expert_world, wrap), ts, world, tensor)
        for ts in layers.values()
    ]
    return max(
        blocks,
        key=lambda b: (b.padded - b.fp8_padded, b.padded),
        default=_fsdp2_group([], world),
    )


def _fsdp2_group(
    tensors: list[TensorSpec], world: int, expert_world: int | None = None, wrap: str = "layers"
) -> Fsdp2Group:
    group = _plain_group(tensors, world, expert_world, wrap)
    dtypes = dict.fromkeys(t.dtype for t in tensors if t.dtype)
    if not dtypes:
        return group
    fixed = []
    for dtype in dtypes:
        part = _plain_group([t for t in tensors if t.dtype == dtype], world, expert_world, wrap)
        ew = part.expert_world
        fixed.append(
            FixedDtype(
                dtype=dtype,
                gathered=world * part.padded + ew * part.expert_padded,
                reduce_in=world * part.grad_padded + ew * part.expert_grad_padded,
                reduce_out=part.grad_padded + part.expert_grad_padded,
                grads=part.grads,
            )
        )
    train = [t for t in tensors if t.trainable]
    last = train[-1].dtype if train else None
    return replace(group, fixed=tuple(fixed), last_dtype=last)


def _plain_group(
    tensors: list[TensorSpec], world: int, expert_world: int | None = None, wrap: str = "layers"
) -> Fsdp2Group:
    """A group's element counts, whatever each parameter's dtype. The reduce-scatter takes the
    parameters with a gradient (`fsdp_params_with_grad`: trainable, and reached by the loss,
    TensorSpec.gradient)."""
    train = [t for t in tensors if t.trainable and t.gradient]
    experts = [t for t in tensors if t.role == "experts"] if expert_world else []
    if experts:
        assert expert_world is not None
        dense = [t for t in tensors if t.role != "experts"]
        return Fsdp2Group(
            padded=padded_elements(dense, world),
            grad_padded=padded_elements([t for t in dense if t.trainable and t.gradient], world),
            grads=sum(t.numel for t in train),
            last=train[-1].numel if train else 0,
            expert_world=expert_world,
            expert_padded=padded_elements(experts, expert_world, wrap),
            expert_grad_padded=padded_elements(
                [t for t in experts if t.trainable and t.gradient], expert_world, wrap
            ),
        )
    return Fsdp2Group(
        padded=padded_elements(tensors, world, wrap),
        grad_padded=padded_elements(train, world, wrap),
        grads=sum(t.numel for t in train),
        last=train[-1].numel if train else 0,
    )


def fsdp2_root_gradients(groups: Fsdp2Groups, *, shard: str) -> int:
    """Bytes of the root's sharded gradients, which FSDP2 makes only in the root's
    post-backward, after the whole backward (the timeline leaves them out before)."""
    root, o = groups.root, dtype_bytes(shard)
    # A parameter held in a fixed dtype gets its sharded gradient in that dtype
    # (_fsdp_collectives.py::foreach_reduce L696, as memplan.states.engines.fsdp2.sharding).
    return root.grad_padded * o + sum(p.reduce_out * (dtype_bytes(p.dtype) - o) for p in root.fixed)


def groups_of(states: StepStates, cache: StepCache) -> Fsdp2Groups:
    """`fsdp2_groups` of the rank's model, sharded over the data-parallel ranks."""
    layout = states.layout
    inventory, world, wrap = states.inventory, layout.fsdp_world, layout.fsdp_groups
    experts = layout.expert_data if layout.expert > 1 else None
    # torchtitan turns the fp8 all-gather on only where FSDP shards (fsdp2.fp8).
    fp8 = states.fp8_all_gather and world > 1
    tensor = layout.tensor
    return cache.get(
        ("fsdp2 groups", inventory, world, wrap, experts, fp8, tensor),
        lambda: fsdp2_groups(inventory, world, wrap, experts, fp8, tensor),
    )
