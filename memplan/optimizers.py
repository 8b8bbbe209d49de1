"""Optimizer state, tensor by tensor, exactly as each optimizer keeps it.

`state_tensors` answers: for one tensor the optimizer updates (shape, dtype), which state
tensors does it create on its first step? The answers are read from each optimizer's
`_init_group` / `init_state` and proved against real torch optimizers in
tests/test_optimizers.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

OptimizerName = Literal[
    "adamw",
    "adam",
    "sgd",
    "adagrad",
    "rmsprop",
    "adafactor",
    "adafactor-hf",
    "nadam",
    "radam",
    "adamax",
    "lion",
    "adamw8bit",
    "adam8bit",
    "paged_adamw8bit",
    "paged_adam8bit",
    "paged_adamw",
    "paged_adam",
]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
# torch.optim classes with a fused kernel in 2.13 (`fused=True` accepted by __init__, on CPU
# too): adam.py, adamw.py, sgd.py, adagrad.py. RMSprop, NAdam, RAdam, Adamax and Adafactor
# raise TypeError (measured: tests/test_optimizers.py::test_step_temporaries_match_torch).
FUSED_OPTIMIZERS = frozenset({"adam", "adamw", "sgd", "adagrad"})
NOT_FUSED_OPTIMIZERS = frozenset({"rmsprop", "nadam", "radam", "adamax", "adafactor"})
# Optimizers that are not torch.optim classes and have one kernel, a Python loop over the
# parameters: `implementation` foreach and for_loop both mean it, fused is refused.
# adafactor-hf: transformers.optimization.Adafactor (transformers 5.25 optimization.py::
# Adafactor.__init__ takes no foreach/fused argument; Adafactor.step loops over p).
LOOP_ONLY_OPTIMIZERS = frozenset({"adafactor-hf"})
# torch optimizers whose step fails on FSDP2's dim-0-sharded DTensor parameters: Adafactor's
# in-place square of a column norm (a Partial placement) is refused by DTensor dispatch
# (torch/optim/_adafactor.py:399 and :559, 2.13; reproduced on 2 gloo ranks, foreach and
# for-loop, tests/test_optimizers.py::test_adafactor_fails_on_fsdp2).
# transformers' Adafactor (adafactor-hf) makes its states as plain tensors of the gradient's
# global shape (`torch.zeros(grad_shape[:-1]).to(grad)`, transformers 5.25 optimization.py:1237)
# and adds the DTensor `update.mean(dim=-1)` into them (:1266): DTensor dispatch refuses "aten.
# add_.Tensor got mixed torch.Tensor and DTensor" (reproduced on 2 gloo ranks, torch 2.13).
FSDP2_REFUSALS = {
    "adafactor": "its step squares a column norm in place (torch/optim/_adafactor.py::"
    "_single_tensor_adafactor `torch.norm(grad, dim=-2).square_()`, _multi_tensor_adafactor "
    "`_foreach_mul_`, torch 2.13), which a dim-0-sharded DTensor refuses ('in-place operations "
    "that require placement changes are not supported')",
    "adafactor-hf": "transformers' Adafactor keeps its factored second moment as plain tensors "
    "of the gradient's global shape and adds the DTensor gradient's row means into them "
    "(transformers 5.25 optimization.py::Adafactor.step), which DTensor refuses ('aten.add_."
    "Tensor got mixed torch.Tensor and DTensor')",
}
FSDP2_REFUSED_OPTIMIZERS = frozenset(FSDP2_REFUSALS)

# The dtype torch gives the per-tensor `step` counter: `_get_scalar_dtype()` is float32
# unless the default dtype is float64 (torch/optim/optimizer.py::_get_scalar_dtype, 2.13).
STEP_DTYPE = "fp32"

# bitsandbytes 8-bit optimizers (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state,
# 0.45-0.48): tensors with fewer than `min_8bit_size` elements keep 32-bit states; larger ones
# keep uint8 states plus one fp32 absmax per block of BNB_BLOCKSIZE elements
# (`blocks = n // 256; blocks += 1 if n % 256 > 0`). The 256-entry fp32 quantization maps
# (qmap1/qmap2) are shared by all tensors of the optimizer and counted once.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_QMAP_ELEMS = 256


# bitsandbytes optim/optimizer.py::Optimizer8bit.get_state_buffer (0.50.1): a paged optimizer
# (Paged*8bit) allocates `state1` / `state2` of a CUDA parameter with numel >= 1e5 through
# functional.py::get_paged -> csrc/pythonInterface.cpp::cget_managed_ptr ->
# `cudaMallocManaged(&ptr, bytes, cudaMemAttachHost)`: unified memory that lives in host RAM
# until a kernel touches it and is evicted back under GPU memory pressure, outside torch's
# caching allocator (not in memory_allocated()). Smaller tensors, the absmax tensors and any
# CPU run (`p.device.type == "cpu"`: zeros_like, a warning) get ordinary device memory.
BNB_PAGED_MIN_NUMEL = 100_000
# bitsandbytes optim/adamw.py::PagedAdamW and optim/adam.py::PagedAdam (0.41-0.50): an
# Optimizer2State("adam", ..., optim_bits=32, is_paged=True), the one code path for both
# names (AdamW is Adam with decoupled weight decay in the same 32-bit kernel).
# optimizer.py::Optimizer2State.init_state with optim_bits 32: `state["step"] = 0` (a Python
# int), `state1` and `state2` = get_state_buffer(p, dtype=torch.float32) (fp32 whatever the
# parameter's dtype, paged by the rule above), no qmaps (fill_qmap runs for uint8 states only).
BNB_32BIT_PAGED = ("paged_adamw", "paged_adam")
BNB_PAGED_STATES = ("state1", "state2")
PAGED_SUFFIX = " (paged)"


def is_paged_state(opt: OptimizerConfig, name: str, numel: int, *, device: str) -> bool:
    """Whether bitsandbytes keeps this state in unified (host-backed) memory (see above)."""
    return (
        opt.is_paged
        and device == "cuda"
        and name in BNB_PAGED_STATES
        and numel >= BNB_PAGED_MIN_NUMEL
    )


@dataclass(frozen=True, slots=True)
class StateTensor:
    """One optimizer state tensor for one updated tensor."""

    name: str
    """The key in `optimizer.state[p]` (exp_avg, step, ...)."""
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerConfig:
    """The optimizer settings that change its state layout."""

    name: str
    momentum: float = 0.0
    amsgrad: bool = False
    centered: bool = False
    fused: bool = False

    @property
    def is_8bit(self) -> bool:
        return self.name.endswith("8bit")

    @property
    def is_paged(self) -> bool:
        return self.name.startswith("paged_")


def state_tensors(opt: OptimizerConfig, shape: tuple[int, ...], dtype: str) -> list[StateTensor]:
    """The state `opt` keeps for one updated tensor of `shape` and `dtype`.

    `dtype` is the dtype of the tensor the optimizer updates: the parameter itself, or the
    fp32 master copy under a *-mixed recipe (states follow it: `torch.zeros_like(p)`).
    """
    step = StateTensor("step", (), STEP_DTYPE)

    def like(name: str) -> StateTensor:
        return StateTensor(name, shape, dtype)

    name = opt.name
    if name in ("adam", "adamw"):
        # torch/optim/adam.py::Adam._init_group (AdamW subclasses Adam in 2.13)
        return [step, like("exp_avg"), like("exp_avg_sq")] + (
            [like("max_exp_avg_sq")] if opt.amsgrad else []
        )
    if name == "sgd":
        # torch/optim/sgd.py::SGD._init_group: momentum_buffer only when momentum != 0
        return [like("momentum_buffer")] if opt.momentum else []
    if name == "adagrad":
        # torch/optim/adagrad.py::Adagrad.__init__ (state made eagerly)
        return [step, like("sum")]
    if name == "rmsprop":
        # torch/optim/rmsprop.py::RMSprop._init_group
        out = [step, like("square_avg")]
        if opt.momentum > 0:
            out.append(like("momentum_buffer"))
        if opt.centered:
            out.append(like("grad_avg"))
        return out
    if name == "adafactor":
        # torch/optim/_adafactor.py::Adafactor._init_group: >= 2-D tensors keep a row factor
        # (last dim set to 1) and a column factor (second-to-last dim set to 1), else a full
        # `variance`.
        if len(shape) >= 2:
            row = (*shape[:-1], 1)
            col = (*shape[:-2], 1, shape[-1])
            return [step, StateTensor("row_var", row, dtype), StateTensor("col_var", col, dtype)]
        return [step, like("variance")]
    if name == "adafactor-hf":
        return _hf_adafactor_states(shape, dtype)
    if name == "nadam":
        # torch/optim/nadam.py::NAdam._init_group: mu_product is a 0-dim fp32 like step
        return [
            step,
            StateTensor("mu_product", (), STEP_DTYPE),
            like("exp_avg"),
            like("exp_avg_sq"),
        ]
    if name == "radam":
        return [step, like("exp_avg"), like("exp_avg_sq")]  # torch/optim/radam.py
    if name == "adamax":
        return [step, like("exp_avg"), like("exp_inf")]  # torch/optim/adamax.py
    if name == "lion":
        # lion-pytorch (lucidrains) lion_pytorch.py::Lion.step: one `exp_avg`, no step counter
        return [like("exp_avg")]
    if opt.is_8bit:
        return _bnb_8bit_states(shape)
    if name in BNB_32BIT_PAGED:
        return [StateTensor("state1", shape, "fp32"), StateTensor("state2", shape, "fp32")]
    raise ValueError(f"unknown optimizer {name!r}")  # the spec validates names first


# transformers' own Adafactor, as the HF Trainer builds it for `optim="adafactor"`
# (transformers 5.25 trainer_optimizer.py::_get_adafactor: `scale_parameter=False,
# relative_step=False`, lr=args.learning_rate; beta1 left at its default None, so no exp_avg).
# Its state, optimization.py::Adafactor.step (5.25, lines 1218-1257):
# - `grad = grad.float()` for fp16/bf16 gradients (:1221) and every state is made `.to(grad)`
#   (:1237-1240): fp32 whatever the 16-bit parameter dtype (HF_ADAFACTOR_WIDENED).
# - `state["step"] = 0` (:1231): a Python int, no tensor.
# - factored (`len(param_shape) >= 2`, _get_options :1186): `exp_avg_sq_row` of
#   grad_shape[:-1] and `exp_avg_sq_col` of grad_shape[:-2] + grad_shape[-1:] (:1237-1238),
#   else `exp_avg_sq` like grad (:1240).
# - `state["RMS"] = self._rms(p_data_fp32)` (:1257): `tensor.norm(2) / (numel ** 0.5)` (_rms,
#   :1191-1192), a 0-dim tensor in the (fp32) dtype of p_data_fp32.
HF_ADAFACTOR_WIDENED = frozenset({"bf16", "fp16"})


def hf_adafactor_dtype(dtype: str) -> str:
    """The dtype transformers' Adafactor computes and keeps its state in for a parameter of
    `dtype`: fp32 for fp16/bf16 (`grad.float()`, optimization.py:1221, 5.25), else its own."""
    return "fp32" if dtype in HF_ADAFACTOR_WIDENED else dtype


def hf_adafactor_factors(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(row, column) elements of a factored tensor's second moment, None for an unfactored
    one (transformers 5.25 optimization.py::Adafactor._get_options: factored when ndim >= 2)."""
    if len(shape) < 2:
        return None
    return math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]


def _hf_adafactor_states(shape: tuple[int, ...], dtype: str) -> list[StateTensor]:
    """transformers.optimization.Adafactor's state for one parameter (see above)."""
    kept = hf_adafactor_dtype(dtype)
    rms = StateTensor("RMS", (), kept)
    if len(shape) >= 2:
        return [
            StateTensor("exp_avg_sq_row", shape[:-1], kept),
            StateTensor("exp_avg_sq_col", (*shape[:-2], shape[-1]), kept),
            rms,
        ]
    return [StateTensor("exp_avg_sq", shape, kept), rms]


def _bnb_8bit_states(shape: tuple[int, ...]) -> list[StateTensor]:
    """bitsandbytes Optimizer2State.init_state for Adam/AdamW 8-bit (blockwise).

    The step counter is a Python int (`state["step"] = 0`), so it takes no tensor memory.
    """
    n = math.prod(shape)
    if n < BNB_MIN_8BIT_SIZE:
        return [StateTensor("state1", shape, "fp32"), StateTensor("state2", shape, "fp32")]
    blocks = -(-n // BNB_BLOCKSIZE)
    return [
        StateTensor("state1", shape, "uint8"),
        StateTensor("state2", shape, "uint8"),
        StateTensor("absmax1", (blocks,), "fp32"),
        StateTensor("absmax2", (blocks,), "fp32"),
    ]


def shared_state_tensors(opt: OptimizerConfig) -> list[StateTensor]:
    """State the optimizer keeps once, whatever the number of tensors (bnb's qmaps)."""
    if opt.is_8bit:
        return [
            StateTensor("qmap1", (BNB_QMAP_ELEMS,), "fp32"),
            StateTensor("qmap2", (BNB_QMAP_ELEMS,), "fp32"),
        ]
    return []
