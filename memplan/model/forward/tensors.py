"""What one forward pass leaves for backward: the saved tensors, grouped by block.

The contract (issue 5): activations are the bytes of the tensors autograd holds for backward at
the end of the forward pass, loss included, deduplicated by storage, parameters and buffers
excluded. Each `Saved` is one storage: when two autograd nodes save the same storage (a linear's
input shared by q/k/v, a softmax output that the next matmul also saves) it is listed once, under
the first node that saves it. tests/test_activations.py proves every rule against
`torch.autograd.graph.saved_tensors_hooks` on the transformers models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from memplan.config.base import Implementation
from memplan.memory import Transient, rounding
from memplan.precision import dtype_bytes
from memplan.versions import RULES_TRANSFORMERS

Device = Literal["cuda", "cpu"]
AttentionKind = Literal["eager", "sdpa"]
Checkpointing = Literal["none", "full", "selective", "selective-op"]
"""`selective-op`: torchtitan's per-op selective checkpointing (memplan.model.stacks.torchtitan)."""

# Dtype ranks for type promotion of floating tensors (torch.promote_types): fp32 wins over the
# 16-bit types; bf16 and fp16 together promote to fp32.
_FLOAT_RANK = {"fp8": 0, "bf16": 1, "fp16": 1, "fp32": 2}


def promote(a: str, b: str) -> str:
    """`torch.promote_types` for the floating dtypes memplan knows (c10/core/ScalarType.cpp)."""
    if a == b:
        return a
    if _FLOAT_RANK[a] == _FLOAT_RANK[b]:
        return "fp32"
    return a if _FLOAT_RANK[a] > _FLOAT_RANK[b] else b


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """Everything about the run that changes which tensors a forward pass saves."""

    batch: int
    """Sequences per forward pass (micro-batch size)."""
    sequence: int
    """Tokens per sequence."""
    stream: str
    """Dtype of the embeddings, the residual stream and the norms (the parameters' dtype)."""
    matmul: str
    """Dtype matmuls run in: autocast's dtype, else the same as `stream`."""
    autocast: bool
    """torch.autocast is on: matmul inputs and weights are cast to `matmul` per op."""
    device: Device
    """The kernels' device: CPU and CUDA kernels save different tensors."""
    attention: AttentionKind
    """transformers `attn_implementation`."""
    dropout: bool | None
    """Force dropout on (True) or off (False); None: on where the config's probability > 0."""
    checkpointing: Checkpointing
    """Activation checkpointing of the decoder layers."""
    offload: bool = False
    """Checkpointed layer inputs kept in pinned host memory (transformers `offload=True`)."""
    expert_pairs: int | None = None
    """(token, expert) pairs one GPU's experts process per MoE layer, when the layout fixes
    them (memplan.activations.layout.expert_pairs); None: top_k x tokens."""
    local_experts: int | None = None
    """Experts on this GPU (expert parallelism); None: all of them."""
    moe_dispatcher: Literal["allgather", "alltoall"] = "allgather"
    """With model.implementation megatron-core: its MoE token dispatcher
    (parallelism.moe_dispatcher; memplan.model.stacks.megatron_moe)."""
    expert_capacity: int | None = None
    """With model.implementation megatron-core: each expert's capacity from each rank under
    drop-and-pad (parallelism.expert_capacity_factor; memplan.model.stacks.megatron_moe);
    None: dropless."""
    transformers: str = RULES_TRANSFORMERS
    """The transformers release whose modeling code runs (major.minor): rules that differ
    between supported releases pick by it (memplan.versions)."""
    implementation: Implementation = "transformers"
    """Whose model code runs the forward (model.implementation)."""
    checkpoint_every: int = 1
    """With `full` checkpointing, every Nth decoder layer is checkpointed, the rest keep
    everything (training.checkpoint_every; torchtitan's layer SAC)."""
    float8: Literal["none", "tensorwise", "rowwise"] = "none"
    """torchao Float8Linear in the decoder layers (precision.fp8 torchao-*), by scaling."""
    megatron_spec: Literal["local", "te"] = "local"
    """With model.implementation megatron-core: its local layer spec or Transformer Engine's
    (model.megatron_spec; memplan.model.stacks.megatron)."""
    compile: bool = False
    """Each decoder layer runs torch.compile'd (training.compile): AOTAutograd's min-cut
    partition decides what it saves (memplan.model.forward.compiled)."""
    compile_loss: bool = False
    """The loss runs torch.compile'd too (training.compile_loss, resolved: torchtitan 0.3.0
    compiles it with the model)."""
    softmax_input: bool = False
    """softmax and log_softmax keep their input for backward (training.softmax_saves_input:
    torch before 1.11)."""

    @property
    def tokens(self) -> int:
        return self.batch * self.sequence


@dataclass(frozen=True, slots=True, kw_only=True)
class Saved:
    """One storage autograd keeps for backward."""

    name: str
    """What it is, relative to its block (`self_attn.softmax`)."""
    shape: tuple[int, ...]
    """Shape of the storage in elements (as the saving node sees it)."""
    dtype: str
    saved_by: str
    """The autograd node that saves it (the first one, when several share the storage)."""
    source: str
    """Where the rule comes from: the kernel or modeling file that saves it."""
    pooled: bool = False
    """The sum of many storages, not one tensor (a traced profile's pooled record, a chunked
    loop's: memplan.verify.trace.fit.pool): no working set is made of its size
    (memplan.step.transients.working_sets)."""

    numel: int = field(init=False, repr=False)
    bytes: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Computed once: plan sums these over thousands of layouts.
        numel = math.prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "bytes", numel * dtype_bytes(self.dtype))


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """Saved tensors of one part of the model: embeddings, decoder layers, head or loss."""

    name: str
    count: int
    """How many times the block repeats (decoder layers of this kind); 1 otherwise."""
    tensors: tuple[Saved, ...]
    """What one copy of the block holds at the end of the forward pass."""
    recompute: tuple[Saved, ...] = ()
    """With checkpointing: what one copy re-creates while its backward runs (alive on top)."""
    layered: bool = False
    """True for decoder layers: freed one by one during backward."""
    on_host: bool = False
    """Offloaded to pinned host memory (not on the GPU)."""
    held: tuple[Saved, ...] = ()
    """Under autocast: the cast copies one copy of the block makes that only autocast's cast
    cache holds (aten/src/ATen/autocast_mode.cpp::cached_cast), alive until the forward's
    autocast region exits (memplan.step.transients.autocast_cache)."""
    forward_working: int | None = None
    """Traced profiles (memplan.verify.trace.working): bytes a layer's forward holds beyond
    the saved tensors of the layers up to it, at its peak; None: memplan.step.transients.
    working_sets' estimate."""
    backward_working: int | None = None
    """Traced profiles: bytes the layers' backward holds beyond every layer's saved tensors,
    at its peak (gradients excluded); None: working_sets' estimate."""
    backward_temporaries: tuple[Saved, ...] = ()
    """Hand rules: the temporaries one copy's backward holds at its most beyond the two
    tensors working_sets' estimate counts there (the largest saved tensor's gradient and its
    input's), where an op's backward is a chain of elementwise ops in Python (BLOOM's
    bloom_gelu_back); () elsewhere."""

    bytes_each: int = field(init=False, repr=False)
    recompute_bytes: int = field(init=False, repr=False)
    rounding_each: int = field(init=False, repr=False)
    """Bytes the CUDA caching allocator's 512-byte blocks add to one copy's tensors."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bytes_each", sum(t.bytes for t in self.tensors))
        object.__setattr__(self, "recompute_bytes", sum(t.bytes for t in self.recompute))
        object.__setattr__(self, "rounding_each", rounding(t.bytes for t in self.tensors))

    def repeated(self, count: int, *, held_as: str | None = None) -> Block:
        """This block `count` times, its per-copy sums carried over rather than recounted
        (pipeline ranks of plan's thousands of layouts repeat the same blocks). `held_as`
        names copies held for later micro-batches: not freed layer by layer in this backward,
        nothing to re-create."""
        out = object.__new__(Block)
        for name in _BLOCK_FIELDS:
            object.__setattr__(out, name, getattr(self, name))
        object.__setattr__(out, "count", count)
        if held_as is not None:
            object.__setattr__(out, "name", held_as)
            object.__setattr__(out, "layered", False)
            object.__setattr__(out, "recompute", ())
            object.__setattr__(out, "held", ())
            object.__setattr__(out, "recompute_bytes", 0)
        return out

    @property
    def bytes(self) -> int:
        return self.count * self.bytes_each


_BLOCK_FIELDS = tuple(f.name for f in fields(Block))
"""Block's fields, every one (`repeated` copies them; plan repeats blocks millions of times)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Activations:
    """The activations of one forward pass on one GPU."""

    modelled: bool
    """False when memplan has no rules for this family or layout: then every byte below is 0."""
    blocks: tuple[Block, ...] = ()
    logits_bytes: int = 0
    """The logits tensor [batch, seq, vocab] in the matmul dtype: the model's output, alive at
    the loss but not saved for backward."""
    upcast_bytes: int = 0
    """The fp32 copy of the logits the loss makes (`logits.float()`), alive during the loss."""
    loss_gradient_bytes: int | None = None
    """The loss's gradients alive as backward starts; None: the eager cross entropy's
    nll_loss_backward and log_softmax_backward outputs, 2 x upcast_bytes (or logits_bytes)."""
    hidden_bytes: int = 0
    """One hidden state [batch, seq, hidden] in the stream dtype (backward working set)."""
    buffers: tuple[Transient, ...] = ()
    """Communication buffers of a model-parallel layout (memplan.activations.layout.buffers):
    transient, not saved."""
    checkpoint_held: tuple[Transient, ...] = ()
    """Tensors torch.utils.checkpoint holds for its recomputation that no node saves (the eager
    attention mask: memplan.activations.checkpoint_held): transient, not saved."""
    checkpoint_released_bytes: int = 0
    """Of `checkpoint_held`, the bytes freed before the first decoder layer's backward (that
    layer takes no eager mask: a linear-attention or convolution layer first)."""
    layer_scatter_bytes: int = 0
    """Under sequence parallelism that reduce-scatters each decoder layer's row-parallel output
    along the sequence (torchtitan's apply_tp: attention.wo, feed_forward.w2): that Partial
    output, [tokens, hidden] in the stream dtype, which the layer's forward holds beside its
    chunks concatenated for the collective (memplan.step.transients.working_sets); 0
    otherwise."""
    notes: tuple[str, ...] = ()
    source: Literal["rule", "profile"] = "rule"
    """Where the saved tensors come from: a family's hand rule or a traced profile
    (memplan.model.profile); meaningless when not `modelled`."""
    versions: tuple[tuple[str, str], ...] = ()
    """(library, version) the profile was traced with; () for a rule."""
    implementation: Implementation = "transformers"
    """Whose model code the saved tensors are of (model.implementation)."""
    megatron_spec: Literal["local", "te"] | None = None
    """Megatron-Core's layer spec (model.megatron_spec) when `implementation` is megatron-core,
    else None."""
    layer_order: tuple[str, ...] = ()
    """With several decoder-layer blocks (a traced profile's `layers.<kind>` beside `layers`):
    the block of each decoder layer, in model order (what a pipeline stage's layers are);
    () when there is one layer block, or when the profile does not say."""

    @property
    def bytes(self) -> int:
        """Bytes saved for backward on the GPU at the end of the forward pass (the contract)."""
        return sum(b.bytes for b in self.blocks if not b.on_host)

    @property
    def host_bytes(self) -> int:
        """Saved bytes offloaded to host memory (not in `bytes`)."""
        return sum(b.bytes for b in self.blocks if b.on_host)

    def block(self, name: str) -> Block | None:
        return next((b for b in self.blocks if b.name == name), None)


def not_modelled(why: str) -> Activations:
    """Activations memplan does not predict, with the reason in a note."""
    return Activations(modelled=False, notes=(why,))
