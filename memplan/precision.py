"""Dtype widths and precision recipes: which dtype each kind of tensor is kept in.

Every byte width in memplan comes from `DTYPE_BYTES`; formulas never write a bare 2 or 4.
A recipe names the dtype of each persistent model-state tensor (parameters, gradients, fp32
master weights, optimizer states) and the compute dtype of the forward and backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

DType = Literal["fp32", "fp16", "bf16", "fp8", "int64", "int32", "uint8", "int8", "bool"]
DTYPES: tuple[str, ...] = get_args(DType)

# Element widths in bytes: IEEE 754 binary32/binary16, bfloat16 (Kalamkar et al. 2019, arXiv
# 1905.12322), fp8 (Micikevicius et al. 2022, arXiv 2209.05433), and torch.bool = 1 byte
# (torch/csrc/api: `torch.empty(1, dtype=torch.bool).element_size() == 1`). uint64 (8 bytes) is
# no recipe's dtype (not in `DType`): flash attention's philox rng state, a saved tensor
# (cuda/flash_attn/flash_api.cpp::mha_fwd).
DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "fp16": 2,
    "bf16": 2,
    "fp8": 1,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "int8": 1,
    "bool": 1,
    "uint64": 8,
    "complex64": 8,  # two fp32: Llama 4's rotary freqs_cis, saved by its attention (a trace)
    "fp64": 8,  # IEEE 754 binary64: DeepSpeed's gradient-norm dtype (zero/utils.py::get_norm_dtype)
}

# The name torch gives each dtype, for the tables and for verify.
TORCH_NAMES: dict[str, str] = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "int64": "int64",
    "int32": "int32",
    "uint8": "uint8",
    "int8": "int8",
    "bool": "bool",
    "uint64": "uint64",
    "complex64": "complex64",
    "fp64": "float64",
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype`."""
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """The dtype of every persistent tensor class, and the compute dtype of the step."""

    name: str
    """Preset name, or "custom" for an explicit table."""
    parameters: str
    """Dtype of the model's parameters as the module holds them."""
    gradients: str
    """Dtype of `param.grad` (and of the 16-bit gradient buffers of ZeRO)."""
    master_weights: str | None
    """Dtype of the optimizer's weight copy, or None when it updates `parameters` in place."""
    optimizer_states: str
    """Dtype of the optimizer's per-element states (exp_avg, ...)."""
    gradient_accumulation: str | None
    """Dtype of a separate gradient-accumulation buffer (Megatron main_grad), or None."""
    compute: str
    """Dtype of the forward/backward math (autocast's dtype, or the parameter dtype)."""
    autocast: bool
    """True when torch.autocast casts fp32 parameters to `compute` on the fly (transient copies)."""
    description: str


# Presets. Bytes per parameter for Adam are in docs and in `bytes_per_parameter`; each
# recipe is the one named by its framework:
# - amp-*: torch.autocast over fp32 parameters (torch/amp/autocast_mode.py); low-precision
#   weight copies exist only while an op runs.
# - *-mixed: ZeRO paper (Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1): 16-bit
#   parameters and gradients, fp32 master weights, momentum and variance, "2 + 2 + 12" bytes.
PRESETS: dict[str, Recipe] = {
    "fp32": Recipe(
        name="fp32",
        parameters="fp32",
        gradients="fp32",
        master_weights=None,
        optimizer_states="fp32",
        gradient_accumulation=None,
        compute="fp32",
        autocast=False,
        description="everything in fp32",
    ),
    "bf16": Recipe(
        name="bf16",
        parameters="bf16",
        gradients="bf16",
        master_weights=None,
        optimizer_states="bf16",
        gradient_accumulation=None,
        compute="bf16",
        autocast=False,
        description="pure bf16: parameters, gradients and optimizer states in bf16",
    ),
    "fp16": Recipe(
        name="fp16",
        parameters="fp16",
        gradients="fp16",
        master_weights=None,
        optimizer_states="fp16",
        gradient_accumulation=None,
        compute="fp16",
        autocast=False,
        description="pure fp16: parameters, gradients and optimizer states in fp16",
    ),
    "amp-bf16": Recipe(
        name="amp-bf16",
        parameters="fp32",
        gradients="fp32",
        master_weights=None,
        optimizer_states="fp32",
        gradient_accumulation=None,
        compute="bf16",
        autocast=True,
        description="torch.autocast(bf16) over fp32 parameters, gradients and states",
    ),
    "amp-fp16": Recipe(
        name="amp-fp16",
        parameters="fp32",
        gradients="fp32",
        master_weights=None,
        optimizer_states="fp32",
        gradient_accumulation=None,
        compute="fp16",
        autocast=True,
        description="torch.autocast(fp16) over fp32 parameters, gradients and states",
    ),
    "bf16-mixed": Recipe(
        name="bf16-mixed",
        parameters="bf16",
        gradients="bf16",
        master_weights="fp32",
        optimizer_states="fp32",
        gradient_accumulation=None,
        compute="bf16",
        autocast=False,
        description="bf16 parameters and gradients, fp32 master weights and optimizer states",
    ),
    "fp16-mixed": Recipe(
        name="fp16-mixed",
        parameters="fp16",
        gradients="fp16",
        master_weights="fp32",
        optimizer_states="fp32",
        gradient_accumulation=None,
        compute="fp16",
        autocast=False,
        description="fp16 parameters and gradients, fp32 master weights and optimizer states",
    ),
}
