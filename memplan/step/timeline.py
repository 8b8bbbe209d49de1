"""One training step as a timeline: bytes alive on the most-loaded GPU at each phase, by
category, and the peak.

Phases of a steady-state step (step >= 2: optimizer states exist; gradients were freed by
`zero_grad(set_to_none=True)`, torch's default since 2.0):
  start           model states at rest
  forward         end of the last layer's forward: every layer's saved tensors
  loss            logits, their fp32 upcast and the log-softmax the loss saves
  backward_start  the loss's backward: two [tokens, vocab] fp32 gradients
  backward        first decoder layer's backward: the head's gradients, one recomputed layer
  backward_end    every gradient, no activations
  optimizer_step  the optimizer's temporaries
Memory alive grows and shrinks linearly between these points (layers free their activations
one by one while gradients appear), so the peak of the step is at one of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from memplan import memory
from memplan.activations import Activations
from memplan.config.spec import Spec
from memplan.memory import PHASES, Phase, Transient
from memplan.model.finetune import qlora
from memplan.model.inventory import Inventory
from memplan.precision import dtype_bytes
from memplan.states import fp8
from memplan.states.engines import RankStates, dtensor_tp
from memplan.states.engines import fsdp2_step as fsdp2_tr
from memplan.states.engines.deepspeed import FLAT_GRADIENT_BUFFER, selects_bf16_optimizer
from memplan.states.engines.megatron import main_grad_dtype
from memplan.step import transients as tr

T = TypeVar("T")
Category = Literal[
    "parameters", "gradients", "optimizer_states", "buffers", "activations", "transient"
]
CATEGORIES: tuple[Category, ...] = (
    "parameters",
    "gradients",
    "optimizer_states",
    "buffers",
    "activations",
    "transient",
)
LABELS: dict[Phase, str] = {
    "start": "after init",
    "forward": "forward",
    "loss": "at the loss",
    "backward_start": "backward (loss)",
    "backward": "backward (layers)",
    "backward_end": "backward end",
    "optimizer_step": "optimizer step",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    """Bytes alive at one phase of the step."""

    phase: Phase
    by_category: tuple[tuple[Category, int], ...]
    transients: tuple[str, ...]
    """Names of the transient terms alive."""

    @property
    def label(self) -> str:
        return LABELS[self.phase]

    total_bytes: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", sum(n for _, n in self.by_category))

    def of(self, category: Category) -> int:
        return dict(self.by_category)[category]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    points: tuple[Point, ...]
    transients: tuple[Transient, ...]
    cuda_context_bytes: int
    """CUDA context outside the allocator (0 on CPU)."""
    capacity_bytes: int | None
    reserved: Callable[[Timeline], int] | None = field(default=None, repr=False, compare=False)
    """Works out `reserved_bytes` (None on CPU): on demand, since plan never needs it."""

    @property
    def reserved_bytes(self) -> int | None:
        """What torch.cuda.memory_reserved() likely shows at the peak (None on CPU)."""
        return None if self.reserved is None else self.reserved(self)

    peak: Point = field(init=False, repr=False, compare=False)
    """The phase with the most bytes alive (the earliest on a tie)."""

    def __post_init__(self) -> None:
        # The points come in phase order, so max() keeps the earliest of equal totals.
        object.__setattr__(self, "peak", max(self.points, key=lambda p: p.total_bytes))

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    @property
    def usable_bytes(self) -> int | None:
        """GPU memory left after the CUDA context and the allocator's reserved segments."""
        if self.capacity_bytes is None:
            return None
        used = self.reserved_bytes if self.reserved_bytes is not None else self.peak_bytes
        return self.capacity_bytes - self.cuda_context_bytes - used

    def transient_at(self, phase: Phase) -> tuple[Transient, ...]:
        return tuple(t for t in self.transients if phase in t.phases)


_MEMO: dict[tuple[int, Hashable], tuple[Inventory, Any]] = {}
_MEMO_SIZE = 4096


def memo(inventory: Inventory, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()` cached per inventory object and `key`: plan evaluates thousands of layouts
    of one inventory, and the per-tensor sums below need not be redone for each. Pure (the
    value depends only on the frozen inventory and the key)."""
    slot = (id(inventory), key)
    hit = _MEMO.get(slot)
    if hit is not None and hit[0] is inventory:
        return cast(T, hit[1])
    value = compute()
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
    _MEMO[slot] = (inventory, value)
    return value


def _grad_phases(spec: Spec) -> tuple[Phase, ...]:
    """When gradients are alive. DeepSpeed ZeRO-3 (`grad_partitions_flat_buffer`, zeroed, kept)
    and Megatron (the DDP grad buffer) hold them for the whole run; gradient accumulation keeps
    them across micro-batches; otherwise they appear in backward and go at zero_grad."""
    par = spec.parallelism
    if (par.engine == "deepspeed" and par.stage == 3) or par.engine == "megatron":
        return PHASES
    if spec.training.gradient_accumulation_steps > 1:
        return PHASES[1:]
    return ("backward", "backward_end", "optimizer_step")


def _head_fraction(inventory: Inventory) -> float:
    """Share of the gradients that exist when the first decoder layer's backward starts:
    the LM head and final norm (and the embedding, when the head is tied to it)."""
    total = inventory.num_parameters
    if not total:
        return 0.0
    tied = bool(inventory.tied)
    head = sum(
        t.numel
        for t in inventory.parameters
        if t.layer is None and (t.role != "embedding" or tied) and t.role != "position"
    )
    return head / total


def transients(
    spec: Spec, inventory: Inventory, per_gpu: RankStates, saved: Activations
) -> list[Transient]:
    """Every transient term of the step for `spec` (see memplan.step.transients)."""
    out = list(_state_transients(spec, inventory, per_gpu))
    out += _activation_transients(saved)
    if spec.parallelism.tensor > 1 and spec.parallelism.engine in ("fsdp2", "ddp"):
        # torch DTensor TP: loss_parallel's fused backward (memplan.states.engines.dtensor_tp).
        out.append(dtensor_tp.loss_parallel_gradient(saved.upcast_bytes or saved.logits_bytes))
    out += _tp_ddp_master_gradient(spec, per_gpu, out)
    out += saved.buffers
    embedding = None
    if saved.modelled and saved.block("embeddings") is not None:
        embedding = _embedding_backward(inventory, saved, spec.recipe().gradients)
    if _fsdp2(spec):
        # FSDP2's end of backward is the embedding's backward or the root's reduce-scatter,
        # whichever holds more: fsdp2_tr.fsdp2 keeps `embedding` only in the first case.
        out += fsdp2_tr.fsdp2(
            _fsdp2_groups(spec, inventory),
            gloo=spec.hardware.device == "cpu",
            acts=_fsdp2_activations(saved, out, embedding),
            **_fsdp2_dtypes(spec),
        )
        out += _tp_fsdp2(spec, inventory)
    elif spec.parallelism.engine == "fsdp2" and spec.parallelism.tensor > 1:
        # FSDP2 on a one-rank mesh under TP: the root's post-backward comes after the
        # embedding's backward and holds more (memplan.states.engines.dtensor_tp).
        out += _tp_fsdp2(spec, inventory)
    elif embedding is not None:
        out.append(embedding)
    if spec.hardware.device == "cuda":
        out += _rounding(spec, inventory, saved)
    if spec.precision.fp8 != "none":
        n, phases, formula = fp8.weight_transient(
            inventory.parameters,
            engine=spec.parallelism.engine,
            accumulation=spec.training.gradient_accumulation_steps,
            gpu=spec.hardware.gpu,
        )
        out.append(
            Transient(
                name="fp8_weights",
                bytes=n,
                phases=phases,
                formula=formula,
                source=fp8.SRC_WEIGHT,
            )
        )
    dequantized = qlora.dequantize_transient(
        inventory, spec.finetune, compute=spec.recipe().compute
    )
    if dequantized is not None:
        out.append(
            Transient(
                name="qlora_dequantized_weight",
                bytes=dequantized[0],
                phases=("forward", "loss", "backward_start", "backward"),
                formula=dequantized[1],
                source=qlora.SRC_BNB_DEQUANT,
            )
        )
    return [t for t in out if t is not None and t.bytes > 0]


_STATE_MEMO: dict[tuple[int, ...], tuple[tuple[object, ...], tuple[Transient, ...]]] = {}


def _state_transients(
    spec: Spec, inventory: Inventory, per_gpu: RankStates
) -> tuple[Transient, ...]:
    """The terms that depend on the model states only (buckets, gathers, the optimizer's
    temporaries), remembered per (states, inventory, layout, optimizer, precision) object:
    plan asks again for every micro-batch size and recompute option of a layout."""
    parts = (
        per_gpu,
        inventory,
        spec.parallelism,
        spec.optimizer,
        spec.precision,
        spec.training.gradient_accumulation_steps,
        spec.hardware.device,
    )
    key = tuple(id(p) for p in parts[:5]) + (parts[5], hash(parts[6]))
    hit = _STATE_MEMO.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0][:5], parts[:5], strict=True)):
        return hit[1]
    value = tuple(t for t in _compute_state_transients(spec, inventory, per_gpu) if t)
    if len(_STATE_MEMO) >= 4096:
        _STATE_MEMO.clear()
    _STATE_MEMO[key] = (parts, value)
    return value


def _is_flat_gradient_buffer(name: str) -> bool:
    """BF16_Optimizer's flat gradient buffer row, the dense group's or the experts'."""
    return name.removesuffix(" (experts)") == FLAT_GRADIENT_BUFFER


def _compute_state_transients(
    spec: Spec, inventory: Inventory, per_gpu: RankStates
) -> list[Transient | None]:
    par = spec.parallelism
    recipe = spec.recipe()
    out: list[Transient | None] = []
    grad_bytes = per_gpu.bytes_of("gradients")
    if par.engine == "ddp" and par.data > 1:  # one process trains without a DDP wrapper
        out.append(tr.ddp_buckets(grad_bytes, as_bucket_view=par.gradient_as_bucket_view))
    if par.engine == "deepspeed":
        ds = par.deepspeed
        bf16_opt = selects_bf16_optimizer(
            par.stage,
            recipe,
            pipeline=par.pipeline > 1,
            offload_optimizer=par.offload.optimizer,
        )
        accumulate = recipe.gradient_accumulation or recipe.gradients
        if bf16_opt:
            # No ZeRO reduction bucket: the engine all-reduces BF16_Optimizer's flat buffers,
            # the dense group's, then the experts' (a group of their own), one at a time.
            flats = [t for t in per_gpu.terms if _is_flat_gradient_buffer(t.name)]
            if flats:
                flat = max(flats, key=lambda t: t.elements)
                out.append(
                    tr.deepspeed_bf16_grad_reduce(
                        padded=flat.elements,
                        largest=max(
                            (p.numel for p in inventory.parameters if p.trainable), default=0
                        ),
                        accumulate=flat.dtype,
                    )
                )
        else:
            out.append(
                tr.deepspeed_ipg_bucket(
                    stage=par.stage,
                    reduce_bucket_size=ds.reduce_bucket_size,
                    dtype=recipe.gradients,
                    overlap_comm=ds.overlap_comm,
                )
            )
        if par.stage == 3 and par.data > 1:
            out.append(
                tr.zero3_live_parameters(
                    memo(inventory, "modules", lambda: tr.module_sizes(inventory)),
                    dtype=recipe.parameters,
                    prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    max_live_parameters=ds.stage3_max_live_parameters,
                )
            )
        partition = sum(t.elements for t in per_gpu.terms if t.name == "master_weights") or -(
            -inventory.num_parameters // par.data
        )
        out.append(
            tr.deepspeed_step_grads(
                stage=par.stage,
                partition=partition,
                sub_group=ds.sub_group_size,
                grad=accumulate,
                bf16_optimizer=bf16_opt,
            )
        )
    if par.engine == "megatron" and main_grad_dtype(recipe) != "fp32":
        masters = sum(t.elements for t in per_gpu.terms if t.name == "master_weights")
        if masters:
            out.append(tr.megatron_main_grads(masters))
    if par.engine in ("ddp", "fsdp2"):
        out.append(_optimizer_temporaries(spec, inventory, per_gpu))
    if par.engine == "ddp" and recipe.master_weights and recipe.master_weights != recipe.gradients:
        masters = sum(
            t.elements
            for t in per_gpu.terms
            if t.name.removesuffix(" (experts)") == "master_weights"
        )
        out.append(tr.master_gradients(masters, recipe.master_weights))
    return out


def _optimizer_temporaries(
    spec: Spec, inventory: Inventory, per_gpu: RankStates
) -> Transient | None:
    skip = {"step", "mu_product", "master_weights", "qmap1", "qmap2", "absmax1", "absmax2"}
    # One foreach list spans every tensor the optimizer updates on this rank: a state kept
    # for dense and expert tensors as two rows ("exp_avg", "exp_avg (experts)") is one list.
    per_state: dict[str, int] = {}
    for t in per_gpu.terms:
        if t.category == "optimizer_states" and t.name not in skip:
            key = t.name.removesuffix(" (experts)")
            per_state[key] = per_state.get(key, 0) + t.elements
    states = [t.elements for t in per_gpu.terms if t.category == "optimizer_states"]
    updated = max(per_state.values(), default=0) or max(states, default=0)
    shards = spec.parallelism.data if spec.parallelism.engine == "fsdp2" else 1
    sizes = memo(inventory, ("updated_sizes", shards), lambda: _updated_sizes(inventory, shards))
    return tr.torch_optimizer_step(
        name=spec.optimizer.name,
        implementation=spec.optimizer.implementation,
        updated=updated,
        sizes=sizes,
        dtype=spec.recipe().optimizer_states,
    )


def _updated_sizes(inventory: Inventory, shards: int) -> tuple[int, ...]:
    """The trainable tensors in `model.parameters()` order (the order the optimizer steps
    them), each as one rank's FSDP2 shard when `shards` > 1."""
    return tuple(
        -(-t.numel // shards) for t in inventory.parameters if t.kind == "parameter" and t.trainable
    )


def _activation_transients(saved: Activations) -> list[Transient]:
    """Tensors a step makes around its saved ones: the logits, the loss's fp32 upcast, the
    gradient of the log-softmax (two [tokens, vocab] fp32 tensors at once: nll_loss_backward's
    output and log_softmax_backward's), and working sets (an estimate: the op producing the
    largest saved tensor of a layer has its input alive too; in backward, that tensor's
    gradient and its input's, plus two hidden-state gradients)."""
    if not saved.modelled:
        return []
    src = "transformers loss/loss_utils.py::ForCausalLMLoss; " + "tools/autograd/derivatives.yaml"
    out = [
        Transient(
            name="logits",
            bytes=saved.logits_bytes,
            phases=("loss",),
            formula="[tokens, vocab] in the matmul dtype (the model output; dropped before "
            "backward, as transformers' Trainer.compute_loss does)",
            source=src,
        ),
        Transient(
            name="loss_fp32_upcast",
            bytes=saved.upcast_bytes,
            phases=("loss",),
            formula="logits.float(): [tokens, vocab] x 4 B",
            source=src,
        ),
        Transient(
            name="logits_gradient",
            bytes=2 * (saved.upcast_bytes or saved.logits_bytes),
            phases=("backward_start",),
            formula="2 x [tokens, vocab] x 4 B (nll_loss and log_softmax backward outputs)",
            source=src,
        ),
    ]
    layers = saved.block("layers")
    if layers is not None:
        inner = layers.recompute or layers.tensors
        largest = max((t.bytes for t in inner), default=0)
        out.append(
            Transient(
                name="forward_working_set",
                bytes=2 * largest,
                phases=("forward",),
                formula=f"2 x {largest:,} B (a layer's largest saved tensor and its input)",
                source="memplan estimate (checked by memplan verify's measured peak)",
            )
        )
        out.append(
            Transient(
                name="backward_working_set",
                bytes=2 * largest + 2 * saved.hidden_bytes + layers.recompute_bytes,
                phases=("backward",),
                formula=f"2 x {largest:,} B + 2 x {saved.hidden_bytes:,} B (hidden-state "
                f"gradients) + {layers.recompute_bytes:,} B recomputed by checkpointing",
                source="memplan estimate; recompute: torch/utils/checkpoint.py",
            )
        )
    return out


def _embedding_backward(inventory: Inventory, saved: Activations, grad: str) -> Transient:
    """The last op of backward: the embedding's gradient is built from the hidden-state
    gradient [tokens, hidden] (aten embedding_dense_backward: a zeroed [vocab, hidden] tensor
    that becomes `.grad`). With the LM head tied to the embedding, `.grad` already holds the
    head's gradient and accumulating the embedding's takes two more [vocab, hidden] tensors
    (measured with torch MemTracker on CPU: GPT-2 peaks here)."""
    width = dtype_bytes(grad)
    # The word embedding as this rank holds it (vocab-parallel under TP); tied to a head on
    # the same rank only without pipeline parallelism (the last stage keeps its own copy).
    table = max(
        (t for t in inventory.parameters if t.role == "embedding"),
        key=lambda t: t.numel,
        default=None,
    )
    tied_here = bool(inventory.tied) and saved.block("head") is not None
    tied = 2 * table.numel * width if tied_here and table is not None else 0
    return Transient(
        name="embedding_backward",
        bytes=saved.hidden_bytes + tied,
        phases=("backward_end",),
        formula=f"{saved.hidden_bytes:,} B hidden-state gradient"
        + (f" + 2 x {list(table.shape)} x {width} B (tied head)" if table and tied else ""),
        source="aten native/Embedding.cpp::embedding_dense_backward_cpu; "
        "torch/csrc/autograd/functions/accumulate_grad.h",
    )


def _rounding(spec: Spec, inventory: Inventory, saved: Activations) -> list[Transient]:
    """The caching allocator's 512-byte blocks (memory.ALLOCATOR_BLOCK) over every saved tensor
    and, for engines that keep one storage per parameter (ddp, fsdp2), over each parameter's
    parameter, gradient and optimizer-state tensors (flat-buffer engines: negligible)."""
    src = "c10/cuda/CUDACachingAllocator.cpp::round_size (kMinBlockSize = 512)"
    acts = sum(b.count * b.rounding_each for b in saved.blocks if not b.on_host)
    out = [
        Transient(
            name="allocator_rounding_activations",
            bytes=acts,
            phases=("forward", "loss", "backward_start", "backward"),
            formula="sum over saved tensors of (round_up(bytes, 512) - bytes)",
            source=src,
        )
    ]
    if spec.parallelism.engine in ("ddp", "fsdp2"):
        recipe = spec.recipe()
        widths = [dtype_bytes(recipe.parameters), dtype_bytes(recipe.gradients)]
        widths += [dtype_bytes(recipe.optimizer_states)] * 2
        shards = spec.parallelism.data if spec.parallelism.engine == "fsdp2" else 1
        states = memo(
            inventory,
            ("rounding", shards, tuple(widths)),
            lambda: sum(
                k * memory.rounding(-(-numel // shards) * w for w in widths)
                for numel, k in Counter(t.numel for t in inventory.parameters).items()
            ),
        )
        out.append(
            Transient(
                name="allocator_rounding_states",
                bytes=states,
                phases=PHASES,
                formula="per parameter tensor: parameter, gradient and two state tensors "
                "rounded up to 512 B",
                source=src,
            )
        )
    return out


def _fsdp2(spec: Spec) -> bool:
    """torch FSDP2 on more than one rank (one rank gathers nothing)."""
    return spec.parallelism.engine == "fsdp2" and spec.parallelism.data > 1


def _tp_fsdp2(spec: Spec, inventory: Inventory) -> list[Transient]:
    """FSDP2 over DTensor TP: the end-of-backward terms of memplan.states.engines.dtensor_tp."""
    p = spec.parallelism
    if p.engine != "fsdp2" or p.tensor <= 1:
        return []
    recipe = spec.recipe()
    return dtensor_tp.tp_fsdp2_backward_end(
        inventory,
        _fsdp2_groups(spec, inventory),
        world=p.data,
        param=dtype_bytes(recipe.parameters),
        grad=dtype_bytes(recipe.gradients),
    )


def _tp_ddp_master_gradient(
    spec: Spec, per_gpu: RankStates, terms: list[Transient]
) -> list[Transient]:
    """DDP over DTensor TP with master weights (`terms` hold master_gradients): the whole
    embedding's master gradient (memplan.states.engines.dtensor_tp)."""
    recipe = spec.recipe()
    if not any(t.name == "master_gradients" for t in terms):
        return []
    extra = sum(t.elements for t in per_gpu.terms if t.name == "embedding gradient (whole)")
    master = recipe.master_weights
    if not extra or master is None:
        return []
    return [dtensor_tp.whole_embedding_master_gradient(extra, dtype_bytes(master))]


def _fsdp2_groups(spec: Spec, inventory: Inventory) -> fsdp2_tr.Fsdp2Groups:
    world = spec.parallelism.data
    return memo(inventory, ("fsdp2", world), lambda: fsdp2_tr.fsdp2_groups(inventory, world))


def _fsdp2_activations(
    saved: Activations, terms: list[Transient], embedding: Transient | None
) -> fsdp2_tr.Fsdp2Activations | None:
    """The activation side of FSDP2's moments between phase points
    (memplan.states.engines.fsdp2_step.between_phases)."""
    layers = saved.block("layers") if saved.modelled else None
    if layers is None:
        return None
    by_name = {t.name: t.bytes for t in terms}
    return fsdp2_tr.Fsdp2Activations(
        layer=layers.bytes_each,
        forward_working_set=by_name.get("forward_working_set", 0),
        logits_gradient=by_name.get("logits_gradient", 0),
        embedding_backward=embedding,
        backward_working_set=by_name.get("backward_working_set", 0),
        hidden_gradient=saved.hidden_bytes,
    )


def _fsdp2_dtypes(spec: Spec) -> dict[str, Any]:
    """FSDP2's sizes besides the groups: MixedPrecisionPolicy.param_dtype (the recipe's
    parameters; the sharded ones stay in the master dtype), the gradients' dtype, the
    sharded storage's, the ranks and reshard_after_forward (ZeRO-3)."""
    recipe = spec.recipe()
    shard = recipe.gradient_accumulation or recipe.master_weights or recipe.parameters
    return {
        "world": spec.parallelism.data,
        "param": recipe.parameters,
        "grad": recipe.gradients,
        "shard": shard,
        "reshard": spec.parallelism.stage == 3,
    }


def build(
    spec: Spec,
    inventory: Inventory,
    *,
    per_gpu: RankStates,
    buffer_bytes: int,
    saved: Activations,
    capacity_bytes: int | None,
) -> Timeline:
    """The step's timeline on the most-loaded GPU."""
    terms = tuple(transients(spec, inventory, per_gpu, saved))
    # Gradient buffers allocated at init and never freed (BF16_Optimizer's flat buffer) are
    # alive in every phase; the rest follow `_grad_phases`.
    held_grads = sum(t.bytes for t in per_gpu.terms if _is_flat_gradient_buffer(t.name))
    grads = per_gpu.bytes_of("gradients") - held_grads
    grad_phases = _grad_phases(spec)
    head_grads = int(grads * memo(inventory, "head", lambda: _head_fraction(inventory)))
    fsdp2 = _fsdp2(spec)
    root_grads = (
        fsdp2_tr.fsdp2_root_gradients(
            _fsdp2_groups(spec, inventory), shard=_fsdp2_dtypes(spec)["shard"]
        )
        if fsdp2
        else 0
    )
    # Alive outside the loss: everything but the current micro-batch's head and loss
    # (pipeline ranks also hold the in_flight.* blocks of earlier micro-batches).
    kept = sum(b.bytes for b in saved.blocks if b.name not in ("head", "loss") and not b.on_host)
    acts: dict[Phase, int] = {
        "start": 0,
        "forward": kept,
        "loss": saved.bytes,
        "backward_start": saved.bytes,
        "backward": kept,
        "backward_end": 0,
        "optimizer_step": 0,
    }
    params, states = per_gpu.bytes_of("parameters"), per_gpu.bytes_of("optimizer_states")
    points = []
    for phase in PHASES:
        if phase in grad_phases:
            g = grads
            if phase == "backward" and grad_phases[0] == "backward":
                g = head_grads
            if fsdp2 and phase in ("backward", "backward_end") and grad_phases[0] == "backward":
                # FSDP2 makes sharded gradients in each group's post-backward: none while the
                # last layer runs backward, the root's only after the whole backward (its
                # unsharded gradients and the reduce-scatter are transients).
                g = 0 if phase == "backward" else grads - root_grads
        else:
            g = 0
        alive = [t for t in terms if phase in t.phases]
        by: tuple[tuple[Category, int], ...] = (
            ("parameters", params),
            ("gradients", g + held_grads),
            ("optimizer_states", states),
            ("buffers", buffer_bytes),
            ("activations", acts[phase]),
            ("transient", sum(t.bytes for t in alive)),
        )
        points.append(Point(phase=phase, by_category=by, transients=tuple(t.name for t in alive)))
    cuda = spec.hardware.device == "cuda"
    return Timeline(
        points=tuple(points),
        transients=terms,
        cuda_context_bytes=(
            (
                memory.CUDA_CONTEXT_BYTES
                if spec.hardware.cuda_context is None
                else spec.hardware.cuda_context
            )
            if cuda
            else 0
        ),
        capacity_bytes=capacity_bytes,
        reserved=(lambda tl: _reserved(tl, per_gpu, buffer_bytes, saved)) if cuda else None,
    )


def _reserved(
    timeline: Timeline, per_gpu: RankStates, buffer_bytes: int, saved: Activations
) -> int:
    """torch.cuda.memory_reserved() at the peak, likely: the peak's blocks packed into the
    allocator's segments (memory.segment_bytes; a lower bound). Model-state rows and transient
    terms count as one block each, saved tensors one block per tensor."""
    peak = timeline.peak
    sizes = [t.bytes for t in per_gpu.terms] + [buffer_bytes]
    if peak.of("gradients") < per_gpu.bytes_of("gradients"):
        sizes = [t.bytes for t in per_gpu.terms if t.category != "gradients"] + [buffer_bytes]
        sizes.append(peak.of("gradients"))
    sizes += [t.bytes for t in timeline.transients if peak.phase in t.phases]
    parts = [memory.segment_parts(sizes)]
    if peak.of("activations"):
        for b in saved.blocks:
            if b.on_host or (peak.phase in ("forward", "backward") and b.name in ("head", "loss")):
                continue
            parts.append(memory.segment_parts((t.bytes for t in b.tensors), b.count))
    total = tuple(sum(p[i] for p in parts) for i in range(3))
    return max(memory.pack((total[0], total[1], total[2])), peak.total_bytes)
