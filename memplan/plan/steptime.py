"""A simple, documented step-time model to rank layouts (not to promise a throughput).

step = (compute + tensor/context/expert communication) x pipeline factor
       + pipeline p2p + data-parallel gradient/parameter communication

- compute: model FLOPs per token 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, arXiv
  2204.02311, appendix B; N parameters touched per token, L layers, H heads, Q head dim, T
  sequence), plus one extra forward with full recomputation (2 N + 4 L H Q T) or the attention
  core's forward with selective recomputation (4 L H Q T; Korthikanti et al. 2022, arXiv
  2205.05198, sec. 5), or with torchtitan's per-op SAC (`selective-op`) the forward of the
  matmuls its policy does not save, every second one of a block (the attention output
  projection and w3: 2 L D (H Q + F) for hidden D and MLP width F; torchtitan 0.3.0
  distributed/activation_checkpoint.py::_get_custom_policy), at an assumed model-FLOPs
  utilisation of the GPU's dense peak.
- collectives: alpha-beta ring costs (Thakur et al. 2005, "Optimization of collective
  communication operations in MPICH"): all-reduce 2 (n-1)/n x bytes, reduce-scatter and
  all-gather (n-1)/n x bytes, all-to-all (n-1)/n x bytes, plus 2 (n-1) or (n-1) latency hops.
  A group runs at the intra-node link speed when all its ranks share a node (Megatron's rank
  order: tensor fastest, then context, expert, data, pipeline), else at the per-GPU NIC speed.
- tensor parallelism: 4 all-reduces of the layer activations per layer and micro-batch (2
  forward, 2 backward; Narayanan et al. 2021, arXiv 2104.04473, sec. 3.2), 2 more with full
  recomputation. Sequence parallelism moves the same bytes (all-gather + reduce-scatter).
- pipeline: the 1F1B bubble (p-1)/m of the compute (interleaved: (p-1)/(v m)); GPipe the same
  bubble (Huang et al. 2019); torch's ScheduleZBVZeroBubble the idle share of its own action
  lists run with dependencies (memplan.plan.schedules: near zero once m >= 2p, Qi et al. 2024);
  activations sent and their gradients received per micro-batch.
- data parallelism, once per step: DDP all-reduces the gradients; ZeRO-1/2 and Megatron's
  distributed optimizer reduce-scatter the gradients and all-gather the 16-bit parameters;
  ZeRO-3/FSDP all-gather the parameters twice (forward, backward) and reduce-scatter the
  gradients per micro-batch (Rajbhandari et al. 2020, arXiv 1910.02054, sec. 7); FSDP2
  without resharding after forward gathers once per micro-batch.
- expert parallelism: 4 all-to-alls (dispatch and combine, forward and backward) per MoE layer
  and micro-batch of top_k x tokens x hidden activations.
- context parallelism (ring attention): each layer passes K and V around the ring, c-1 times
  forward and twice as many bytes backward (K, V and their gradients).
- optimizer offload: gradients to the host and parameters back over PCIe, per step.
- torch.compile (`training.compile`): the compute (and the bubble, its idle share) runs
  COMPILE_SPEEDUP times faster where that speed-up is published for the model code
  (COMPILE_SPEEDUP_CODE: torchtitan's per-block compile); compile changes the kernels, not the
  collectives. Other model code's compiled rows take their eager twins' time.
- torchao Float8 (`precision.fp8: torchao-tensorwise`) on a compiled row of that model code: the
  compute runs FLOAT8_SPEEDUP times faster again, the speed-up published against the same
  compiled bf16 run; other fp8 recipes, and Float8 without compile, take their bf16 twins' time.
No overlap of communication with compute is assumed: the figure ranks layouts and errs long.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.plan import schedules
from memplan.states.layout import Layout

# Named assumptions (override in `plan:`). MFU 0.4: the utilisation large dense runs report on
# A100/H100 (Llama 3 paper, Dubey et al. 2024, arXiv 2407.21783, Table 4: 38-43% BF16 MFU).
DEFAULT_MFU = 0.40
# Per-hop latency of a collective step: the order of NCCL's small-message latency.
LATENCY_INTRA_S = 5e-6
LATENCY_INTER_S = 20e-6
# PCIe Gen4 x16 host link, one direction (offload traffic).
PCIE_BYTES_PER_S = 32e9
ACTIVATION_BYTES = 2  # bf16/fp16 activations on the wire
# torch.compile'd decoder blocks against eager, the same layout, batch and recomputation:
# tokens/s per GPU 6,667 / 5,762 = 1.157 (pytorch/torchtitan benchmarks/
# llama3_h100_202412_torchtitan.md @ 31a17bfd, Table 1: Llama 3.1 8B, FSDP 8 on one host of
# H100s, per-op SAC, local batch 2 x 8192; torchtitan 9dec370 compiled each TransformerBlock,
# the loss ran eager). The same file's Table 3 (128 GPUs) gives 6,514 / 5,605 = 1.162: the
# one-host ratio, the smaller, is taken. Measured for torchtitan's model code only.
COMPILE_SPEEDUP = 6667 / 5762
COMPILE_SPEEDUP_CODE = ("torchtitan",)
"""The model implementations whose compiled step COMPILE_SPEEDUP was measured on."""
# torchao Float8 training (tensorwise dynamic scaling) against bf16, both torch.compile'd, the
# same layout, batch and recomputation: tokens/s per GPU 8,532 / 6,667 = 1.280 (the same file,
# Table 1: Llama 3.1 8B, FSDP 8, per-op SAC; torchao eab345c converted each decoder block's
# nn.Linear). Table 3 (128 GPUs) gives 8,380 / 6,514 = 1.286: the one-host ratio, the smaller,
# is taken. Measured on compiled torchtitan model code with tensorwise scaling only.
FLOAT8_SPEEDUP = 8532 / 6667
FLOAT8_SPEEDUP_RECIPES = ("torchao-tensorwise",)
"""The `precision.fp8` recipes whose speed-up FLOAT8_SPEEDUP was measured on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """The model and batch facts the time model needs."""

    parameters: int
    """Parameters touched per token (MoE: the active ones)."""
    total_parameters: int
    layers: int
    moe_layers: int
    hidden: int
    attention_width: int
    """heads x head_dim."""
    kv_width: int
    """kv_heads x head_dim."""
    top_k: int
    sequence: int
    global_batch: int
    """Sequences per optimizer step."""
    intermediate: int = 0
    """The MLP width (selective-op recomputes w3)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What one rank computes and communicates per step beside its layout."""

    micro_batch: int
    recompute: str
    grad_bytes: int
    """Bytes of one full set of this rank's gradients as communicated."""
    param_bytes: int
    """Bytes of one full set of this rank's 16-bit parameters (before DP sharding)."""
    compiled: bool = False
    """The decoder blocks run torch.compile'd by model code whose speed-up is published
    (COMPILE_SPEEDUP_CODE): the compute runs COMPILE_SPEEDUP times faster."""
    float8: bool = False
    """A compiled row whose decoder Linear layers run a Float8 recipe with a published speed-up
    (FLOAT8_SPEEDUP_RECIPES): the compute runs FLOAT8_SPEEDUP times faster again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """The cluster: the GPU's dense peak and the links between GPUs."""

    peak_flops: float
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    gpus_per_node: int
    """A group whose ranks span at most this many consecutive GPUs runs intra-node."""
    mfu: float = DEFAULT_MFU


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTime:
    compute_s: float
    bubble_s: float
    tensor_s: float
    pipeline_s: float
    data_s: float
    expert_s: float
    context_s: float
    offload_s: float

    @property
    def total_s(self) -> float:
        return (
            self.compute_s
            + self.bubble_s
            + self.tensor_s
            + self.pipeline_s
            + self.data_s
            + self.expert_s
            + self.context_s
            + self.offload_s
        )


def flops_per_token(shape: Shape, recompute: str) -> float:
    """Model FLOPs per token of one training step (see the module docstring)."""
    attention = 12 * shape.layers * shape.attention_width * shape.sequence
    base = 6 * shape.parameters + attention
    if recompute == "full":
        return base + 2 * shape.parameters + attention / 3
    if recompute == "selective":
        return base + attention / 3
    if recompute == "selective-op":
        return base + 2 * shape.layers * shape.hidden * (shape.attention_width + shape.intermediate)
    return base


def _bandwidth(span: int, link: Link) -> tuple[float, float]:
    """(bytes/s, latency) of a group whose ranks span `span` consecutive GPUs."""
    if span <= link.gpus_per_node:
        return link.intra_bytes_per_s, LATENCY_INTRA_S
    return link.inter_bytes_per_s, LATENCY_INTER_S


def _collective(kind: str, n: int, n_bytes: float, span: int, link: Link) -> float:
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, alpha = _bandwidth(span, link)
    factor = {
        "all_reduce": 2 * (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_gather": (n - 1) / n,
        "all_to_all": (n - 1) / n,
    }[kind]
    hops = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return hops * alpha + factor * n_bytes / bw


def step_time(shape: Shape, layout: Layout, work: Work, link: Link) -> StepTime:
    """Estimated seconds of one optimizer step on `layout` (see the module docstring)."""
    tokens = shape.global_batch * shape.sequence
    compute = (
        tokens
        * flops_per_token(shape, work.recompute)
        / (layout.world_size * link.peak_flops * link.mfu)
    )
    if work.compiled:
        compute /= COMPILE_SPEEDUP
        if work.float8:
            compute /= FLOAT8_SPEEDUP
    micro_batches = max(1, shape.global_batch // (layout.data * work.micro_batch))
    p, v = layout.pipeline, layout.virtual_stages
    if p == 1:
        bubble = 0.0
    elif layout.schedule == "zbv":
        bubble = compute * schedules.zbv_idle_share(p, micro_batches)
    else:
        bubble = compute * (p - 1) / (v * micro_batches)

    t, c, d = layout.tensor, layout.context, layout.data
    layers_here = shape.layers / p
    act = work.micro_batch * (shape.sequence / c) * shape.hidden * ACTIVATION_BYTES
    per_layer = 6 if work.recompute == "full" else 4
    tensor = (
        micro_batches * layers_here * per_layer * _collective("all_reduce", t, act / 1, t, link)
    )

    pipeline = 0.0
    if p > 1:
        hop, _ = _bandwidth(t * c * d * 2, link)
        pipeline = 2 * micro_batches * v * act / t / hop

    kv = work.micro_batch * (shape.sequence / c) * 2 * shape.kv_width * ACTIVATION_BYTES
    context = 0.0
    if c > 1:
        bw, alpha = _bandwidth(t * c, link)
        context = micro_batches * layers_here * 3 * (c - 1) * (kv / t / bw + alpha)

    expert = 0.0
    if layout.expert > 1 and shape.moe_layers:
        tokens_mb = work.micro_batch * shape.sequence / c
        dispatch = tokens_mb * shape.top_k * shape.hidden * ACTIVATION_BYTES / t
        expert = (
            micro_batches
            * (shape.moe_layers / p)
            * 4
            * _collective("all_to_all", layout.expert, dispatch, t * c * layout.expert, link)
        )

    dp_span = t * c * d
    n = d * c
    if layout.engine in ("ddp",) or layout.stage == 0:
        data = _collective("all_reduce", n, work.grad_bytes, dp_span, link)
    elif layout.engine in ("fsdp2", "fsdp1"):
        # FSDP2 (and FSDP1) all-gathers per micro-batch: twice with reshard_after_forward
        # (stage 3, FULL_SHARD), once when the unsharded parameters are kept from forward to
        # backward (stage 2, SHARD_GRAD_OP).
        gathers = 2 if layout.stage == 3 else 1
        data = micro_batches * (
            gathers * _collective("all_gather", n, work.param_bytes, dp_span, link)
            + _collective("reduce_scatter", n, work.grad_bytes, dp_span, link)
        )
    elif layout.stage in (1, 2):
        data = _collective("reduce_scatter", n, work.grad_bytes, dp_span, link) + _collective(
            "all_gather", n, work.param_bytes, dp_span, link
        )
    else:
        data = micro_batches * (
            2 * _collective("all_gather", n, work.param_bytes, dp_span, link)
            + _collective("reduce_scatter", n, work.grad_bytes, dp_span, link)
        )
    offload = 0.0
    if layout.offload.optimizer != "none":
        offload = (work.grad_bytes + work.param_bytes) / n / PCIE_BYTES_PER_S
    return StepTime(
        compute_s=compute,
        bubble_s=bubble,
        tensor_s=tensor,
        pipeline_s=pipeline,
        data_s=data,
        expert_s=expert,
        context_s=context,
        offload_s=offload,
    )
