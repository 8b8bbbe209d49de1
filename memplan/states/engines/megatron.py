"""Megatron-LM's DDP and distributed optimizer (zero_stage 1).

Read from NVIDIA/Megatron-LM core_r0.12 (megatron/core/distributed/param_and_grad_buffer.py::
_ParamAndGradBuffer.__init__, megatron/core/optimizer/distrib_optimizer.py). Gradients
accumulate in a contiguous `main_grad` buffer, fp32 for bf16 training unless
--grad-reduce-in-bf16 (megatron/training/arguments.py: "accumulate and all-reduce gradients in
fp32 for bfloat16 data type"). With the distributed optimizer the parameters live in a
contiguous buffer too, every parameter starts at a multiple of 64 elements, the (single, by
default) bucket ends at a multiple of lcm(DP, 128), and each DP rank's optimizer owns
1 / DP of it: fp32 main params, exp_avg and exp_avg_sq. Without it every rank keeps the fp32
main params and states of all its parameters (Float16OptimizerWithFloat16Params). Apex/TE
FusedAdam counts steps in a Python int. The step keeps the gradient buffer for the whole run
and, with 16-bit main_grad, casts this rank's main_grads to fp32 (STEP).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import replace

from memplan.memory import Transient
from memplan.model.inventory import Inventory
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.base import EngineStep, GradientLife, StepCache, StepStates
from memplan.states.layout import Layout
from memplan.states.terms import (
    RankStates,
    Term,
    elementwise,
    fmt,
    optimizer_terms,
    round_up,
    term,
    trainable,
    whole,
    whole_by_dtype,
)

SRC_BUFFER = (
    "megatron/core/distributed/param_and_grad_buffer.py::_ParamAndGradBuffer.__init__ (core_r0.12)"
)
SRC_DIST_OPT = "megatron/core/optimizer/distrib_optimizer.py::DistributedOptimizer (core_r0.12)"
SRC_DDP = (
    "megatron/core/distributed/distributed_data_parallel.py::DistributedDataParallel.__init__ "
    "(core_r0.12): frozen parameters stay outside the buffers"
)

# _pad_start_of_param_if_needed: 128-byte aligned starts = 64 elements of >= 16-bit data.
PARAM_START_ALIGNMENT = 64
# _pad_end_of_bucket_if_needed: 256-byte aligned bucket ends = 128 elements.
BUCKET_END_ALIGNMENT = 128


def main_grad_dtype(recipe: Recipe) -> str:
    """The dtype of Megatron's `main_grad` buffer: fp32 for bf16 only (megatron/training/
    arguments.py::validate_args sets accumulate_allreduce_grads_in_fp32 for --bf16, not --fp16;
    distributed_data_parallel.py::DistributedDataParallel.__init__: grad_dtype = fp32 if
    grad_reduce_in_fp32 else param.dtype, core_r0.12), or the asked accumulation dtype; fp16
    keeps 16-bit grads (fp32 copies are made at the step: main_grads_fp32)."""
    if recipe.gradient_accumulation:
        return recipe.gradient_accumulation
    return "fp32" if recipe.parameters == "bf16" else recipe.gradients


def buffer_layout(numels: list[int], data: int) -> tuple[list[tuple[int, int]], int]:
    """([start, end) of each parameter, total elements) of the distributed optimizer's
    contiguous buffer for one bucket: parameters in reverse order (backward order), each start
    padded to 64, the bucket end to lcm(DP, 128) (SRC_BUFFER)."""
    spans: list[tuple[int, int]] = []
    end = 0
    for n in reversed(numels):
        start = round_up(end, PARAM_START_ALIGNMENT)
        end = start + n
        spans.append((start, end))
    return spans, round_up(end, math.lcm(data, BUCKET_END_ALIGNMENT))


def owned_elements(spans: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """Sizes of the parameter pieces inside [lo, hi): the optimizer's main params on a rank
    cover only real parameter elements, not the padding (distrib_optimizer.py::
    _build_model_gbuf_param_range_map)."""
    first = max(bisect.bisect_right(spans, (lo, math.inf)) - 1, 0)
    pieces = []
    for i in range(first, len(spans)):  # not spans[first:]: a copy of the rest per rank
        a, b = spans[i]
        if a >= hi:
            break
        overlap = min(b, hi) - max(a, lo)
        if overlap > 0:
            pieces.append(overlap)
    return pieces


def megatron(
    inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
) -> list[RankStates]:
    # Only `requires_grad` parameters enter the contiguous param/grad buffers and the
    # optimizer (megatron/core/distributed/distributed_data_parallel.py::
    # DistributedDataParallel.__init__: `if not param.requires_grad: continue`); frozen ones
    # stay ordinary module parameters, whole on every data-parallel rank. A parameter the loss
    # never reaches (TensorSpec.gradient False) still requires grad: its slice of the
    # contiguous grad buffer and of the optimizer's flat fp32 shard stays
    # (megatron/core/distributed/param_and_grad_buffer.py::_ParamAndGradBuffer allocates
    # `grad_data` over every parameter of the buffer), so its bytes stay counted.
    params = trainable(inventory.parameters)
    frozen = [p for p in inventory.parameters if not p.trainable]
    held = tuple(
        whole_by_dtype("parameters", "frozen parameters", recipe.parameters, frozen, SRC_DDP)
        if frozen
        else ()
    )
    g_dtype = main_grad_dtype(recipe)
    master = recipe.master_weights or "fp32"
    mega_recipe = replace(recipe, master_weights=master if recipe.parameters != master else None)
    if layout.stage == 0:
        replicas = (
            *held,
            whole("parameters", "parameters", recipe.parameters, params, SRC_BUFFER),
            whole("gradients", "main_grad", g_dtype, params, SRC_BUFFER),
        )
        device, host = optimizer_terms(
            (p.shape for p in params),
            opt=opt,
            recipe=mega_recipe,
            layout=layout,
            view="tensors",
            source=SRC_DIST_OPT,
            step_is_int=True,
        )
        return [
            RankStates(
                ranks=tuple(range(world)), terms=(*replicas, *device), host_terms=tuple(host)
            )
        ]
    spans, padded = buffer_layout([p.numel for p in params], world)
    shard = padded // world
    what = (
        f"{len(params)} tensors in one buffer, starts padded to {PARAM_START_ALIGNMENT}, "
        f"end to lcm({world}, {BUCKET_END_ALIGNMENT}) = {fmt(padded)} elements"
    )
    terms = (
        *held,
        term(
            "parameters",
            "parameters",
            recipe.parameters,
            len(params),
            padded,
            f"{what} x {dtype_bytes(recipe.parameters)} B ({recipe.parameters})",
            SRC_BUFFER,
        ),
        term(
            "gradients",
            "main_grad",
            g_dtype,
            len(params),
            padded,
            f"{what} x {dtype_bytes(g_dtype)} B ({g_dtype})",
            SRC_BUFFER,
        ),
    )
    spans.sort()
    # Ranks whose shards cut the same piece sizes have the same states (most shards lie
    # inside one large tensor): work each set out once, with its total bytes.
    seen: dict[tuple[int, ...], tuple[list[Term], list[Term], int]] = {}
    # With an elementwise optimizer only the number of pieces and their total matter.
    by_total = elementwise(opt, mega_recipe.optimizer_states)
    common_bytes = sum(t.bytes for t in terms)
    # group_ranks(per-rank states, key=total_bytes) without building every rank's states: a
    # rank whose total equals its class's joins it, and each class's states are made once,
    # with its ranks.
    groups: list[tuple[list[Term], list[Term], int, list[int]]] = []
    rank = first = 0  # spans[first]: the first parameter that ends after the shard starts
    while rank < world:
        lo, hi = rank * shard, (rank + 1) * shard
        while first < len(spans) and spans[first][1] <= lo:
            first += 1
        if shard and first < len(spans) and spans[first][0] <= lo and hi <= spans[first][1]:
            # This shard lies inside one parameter, as do the next ones up to its end: one
            # piece of `shard` elements each (what owned_elements gives them).
            upto = min(world, spans[first][1] // shard)
            pieces: tuple[int, ...] = (shard,)
        else:
            upto = rank + 1
            pieces = tuple(sorted(owned_elements(spans, lo, hi)))
        key = (len(pieces), sum(pieces)) if by_total else pieces
        hit = seen.get(key)
        if hit is None:
            dev, hst = optimizer_terms(
                [(n,) for n in pieces],
                opt=opt,
                recipe=mega_recipe,
                layout=layout,
                view=f"parameter pieces in one buffer shard ({fmt(shard)} elements)",
                source=SRC_DIST_OPT,
                step_is_int=True,
            )
            hit = seen[key] = (dev, hst, common_bytes + sum(t.bytes for t in dev))
        device, host, total = hit
        if groups and groups[-1][2] == total:
            groups[-1][3].extend(range(rank, upto))
        else:
            groups.append((device, host, total, list(range(rank, upto))))
        rank = upto
    return [
        RankStates(ranks=tuple(ranks), terms=(*terms, *device), host_terms=tuple(host))
        for device, host, _, ranks in groups
    ]


def main_grads_fp32(elements: int) -> Transient:
    """Megatron with 16-bit main_grad (fp16): the step casts each main_grad to an fp32 grad of
    its fp32 main parameter (`main_param.grad = model_param.main_grad.float()`), this rank's
    main parameters' worth, alive through the step. Source: megatron/core/optimizer/
    optimizer.py::Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads and
    distrib_optimizer.py::DistributedOptimizer._copy_model_grads_to_main_grads (core_r0.12)."""
    return Transient(
        name="megatron_fp32_main_grads",
        bytes=elements * dtype_bytes("fp32"),
        phases=("optimizer_step",),
        formula=f"{elements:,} main-parameter elements x 4 B (main_grad.float())",
        source="megatron/core/optimizer/optimizer.py::_copy_model_grads_to_main_grads (core_r0.12)",
    )


def _state_transients(states: StepStates, cache: StepCache) -> list[Transient]:
    """The fp32 copies of a 16-bit main_grad, over this rank's main parameters."""
    if main_grad_dtype(states.recipe) == "fp32":
        return []
    masters = sum(t.elements for t in states.per_gpu.terms if t.name == "master_weights")
    return [main_grads_fp32(masters)] if masters else []


def _gradients(states: StepStates, cache: StepCache) -> GradientLife:
    """The contiguous main_grad buffer (SRC_BUFFER) is allocated at init and kept."""
    return GradientLife(whole_run=True)


STEP = EngineStep(states=_state_transients, gradients=_gradients)
