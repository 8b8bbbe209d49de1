"""fp8 training with NVIDIA Transformer Engine: the bytes TE adds, per GEMM (pure formulas).

Read from NVIDIA/TransformerEngine v2.18 (transformer_engine/pytorch/...), for TE's
Linear / LayerNormLinear / LayerNormMLP GEMMs under the DelayedScaling recipe (the default
`te.autocast` recipe) or Float8CurrentScaling, whose quantized tensors are Float8Tensor:

1. fp8 metadata per GEMM. module/base.py::TransformerEngineBaseModule.set_meta_tensor: 3
   quantizers per GEMM forward (input, weight, output) and 2 backward (grad_output,
   grad_input). quantization.py::DelayedScalingRecipeState.__init__: per direction a `scale`
   fp32 [n] and an `amax_history` fp32 [amax_history_len, n]; amax_history_len defaults to
   1024 (common/recipe/__init__.py::DelayedScaling). Current scaling keeps no history.
2. the fp8 weight. module/linear.py::_linear_forward quantizes the weight every forward
   (module/base.py::quantize_weight) and saves it for backward (`wt_save = weightmat`): the
   row-wise data [out, in] in 1 byte, plus, where the GPU has no non-TN fp8 GEMM (Hopper),
   the column-wise copy as a transpose [in, out] (csrc/quantizer.cpp::
   Float8Quantizer::create_tensor: `with_transpose = columnwise_usage &&
   !is_non_tn_fp8_gemm_supported`), plus a 4-byte scale_inv. It lives from the GEMM's forward
   to its backward, like an activation. With `is_first_microbatch` given (gradient
   accumulation, as Megatron-LM does) it is cached in `_fp8_workspaces["weight"]` for the
   whole step instead. Under FSDP (v1) or ZeRO-3 the module sees the gathered weight, so
   each rank caches the fp8 copy of the *whole* weight: 2 bytes per parameter on Hopper
   against 2 / N for the sharded bf16 parameters, the known pitfall. TE skips both for FSDP2
   (linear.py: `cache_name = None if ... self.is_fsdp2`, `wt_save = None` when is_fsdp2:
   "Backward will re-quantize from the FSDP2 all-gathered weight", issue #2681).
3. the fp8 input saved for the weight gradient: column-wise usage only (linear.py: "Discard
   row-wise data since it is not needed in backward pass"): [in, tokens] 1 byte (a
   transpose on Hopper, the data itself on Blackwell) plus a scale_inv, instead of the
   16-bit [tokens, in] (2 bytes per element).

`memplan estimate` adds them with `precision: {preset: bf16-mixed, fp8: delayed}`: the scaling
state as a buffer row (`scaling_state`), the fp8 weight copies as a transient term
(`weight_transient`). Activations keep the 16-bit transformers rules: TE's fp8 copies of the
GEMM inputs (`input_bytes`) belong to TE's own modules, which memplan does not list; a note
gives the difference.

Not modelled: fp8 attention (`fp8_dpa`, `fp8_mha`), the MXFP8 / block-scaling / NVFP4
recipes (their scale-inverse layouts), fp8 primary weights (`quantized_model_init`),
TE's fused LayerNorm outputs and its CPU offload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memplan.memory import FORWARD_BACKWARD, PHASES, Phase
from memplan.model.inventory import TensorSpec
from memplan.precision import dtype_bytes

SRC_META = (
    "TransformerEngine v2.18 pytorch/module/base.py::set_meta_tensor, "
    "pytorch/quantization.py::DelayedScalingRecipeState"
)
SRC_WEIGHT = (
    "TransformerEngine v2.18 pytorch/module/linear.py::_linear_forward (wt_save), "
    "pytorch/csrc/quantizer.cpp::Float8Quantizer::create_tensor"
)
SRC_INPUT = "TransformerEngine v2.18 pytorch/module/linear.py::_linear_forward (column-wise input)"

FORWARD_QUANTIZERS_PER_GEMM = 3
"""input, weight, output (module/base.py::set_meta_tensor)."""
BACKWARD_QUANTIZERS_PER_GEMM = 2
"""grad_output, grad_input."""
AMAX_HISTORY_LEN = 1024
"""DelayedScaling.amax_history_len default (common/recipe/__init__.py)."""
SCALE_INV_ELEMS = 1
"""A Float8Tensor's per-tensor scale inverse: one fp32."""


TE_RECIPES = ("delayed", "current")
"""precision.fp8 values that run Transformer Engine (the terms below); the torchao ones
(`torchao-tensorwise`, `torchao-rowwise`: torchao.float8's dynamic scaling, no state kept
between steps) add none of them."""


def meta_bytes(
    gemms: int, *, amax_history_len: int = AMAX_HISTORY_LEN, delayed: bool = True
) -> int:
    """Scaling state of `gemms` GEMMs (SRC_META): per quantizer an fp32 scale and, under
    delayed scaling, an fp32 amax history of `amax_history_len` entries."""
    quantizers = gemms * (FORWARD_QUANTIZERS_PER_GEMM + BACKWARD_QUANTIZERS_PER_GEMM)
    history = amax_history_len if delayed else 0
    return quantizers * (1 + history) * dtype_bytes("fp32")


def weight_bytes(numel: int, *, transpose: bool) -> int:
    """One GEMM's fp8 weight (SRC_WEIGHT): row-wise data, the transpose where the GPU needs
    one (Hopper; not Blackwell), and a scale_inv."""
    copies = 2 if transpose else 1
    return copies * numel * dtype_bytes("fp8") + SCALE_INV_ELEMS * dtype_bytes("fp32")


def input_bytes(tokens: int, in_features: int) -> int:
    """One GEMM's saved input in fp8 (SRC_INPUT): the column-wise copy only, and a scale_inv."""
    return tokens * in_features * dtype_bytes("fp8") + SCALE_INV_ELEMS * dtype_bytes("fp32")


def gemm_weights(parameters: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The weights TE runs as fp8 GEMMs: the 2-D weights of the decoder layers (TE modules
    replace the layers' linears; embeddings and the output layer stay 16-bit, as in
    Megatron-LM's GPT model)."""
    return [
        t
        for t in parameters
        if t.layer is not None
        and len(t.shape) == 2
        and t.name.endswith(".weight")
        and t.role in ("attention", "mlp", "shared_expert")
    ]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Fp8Terms:
    """What fp8 training with TE adds on one GPU (bytes)."""

    gemms: int
    """fp8 GEMMs (one per TE linear weight)."""
    meta_bytes: int
    """Scales and amax histories, for the whole run."""
    weight_bytes: int
    """fp8 weight copies of every GEMM: saved for backward (alive from each GEMM's forward to
    its backward), or cached for the whole step with is_first_microbatch."""
    input_saved_bytes: int
    """The GEMMs' saved inputs in fp8, where 16-bit training saves `input_bf16_bytes`."""
    input_bf16_bytes: int


def terms(
    parameters: Iterable[TensorSpec],
    *,
    tokens: int,
    transpose: bool = True,
    amax_history_len: int = AMAX_HISTORY_LEN,
    delayed: bool = True,
) -> Fp8Terms:
    """The fp8 terms of a model whose decoder-layer weights (held unsharded by the module:
    DDP, FSDP v1 or ZeRO-3 gathered) run through TE, for `tokens` tokens per micro-batch.
    Inputs shared by several GEMMs (q/k/v) are counted once per GEMM, as TE's separate
    modules quantize them separately (a fused LayerNormLinear quantizes once)."""
    weights = gemm_weights(parameters)
    return Fp8Terms(
        gemms=len(weights),
        meta_bytes=meta_bytes(len(weights), amax_history_len=amax_history_len, delayed=delayed),
        weight_bytes=sum(weight_bytes(t.numel, transpose=transpose) for t in weights),
        input_saved_bytes=sum(input_bytes(tokens, t.shape[1]) for t in weights),
        input_bf16_bytes=sum(tokens * t.shape[1] * dtype_bytes("bf16") for t in weights),
    )


# GPUs with a non-TN fp8 GEMM (Blackwell) keep no transposed copy (SRC_WEIGHT).
NO_TRANSPOSE_GPUS = frozenset({"B200"})


def scaling_state(
    parameters: Iterable[TensorSpec], *, recipe: str, amax_history_len: int
) -> tuple[int, int, str]:
    """(GEMMs, bytes, formula) of the fp8 scaling state of one rank's decoder-layer GEMMs."""
    gemms = len(gemm_weights(parameters))
    delayed = recipe == "delayed"
    n = meta_bytes(gemms, amax_history_len=amax_history_len, delayed=delayed)
    per = FORWARD_QUANTIZERS_PER_GEMM + BACKWARD_QUANTIZERS_PER_GEMM
    history = f" x (1 + {amax_history_len} amax history)" if delayed else ""
    return gemms, n, f"{gemms} GEMMs x {per} quantizers{history} x 4 B (fp32)"


def weight_transient(
    parameters: Iterable[TensorSpec], *, engine: str, accumulation: int, gpu: str | None
) -> tuple[int, tuple[Phase, ...], str]:
    """(bytes, phases, formula) of the fp8 weight copies one rank holds (SRC_WEIGHT).

    Every GEMM's fp8 weight is saved from its forward to its backward; Megatron-LM passes
    `is_first_microbatch` under gradient accumulation, and TE then caches the copies for the
    whole step. Under FSDP2 TE neither caches nor saves them (it re-quantizes the gathered
    weight): one layer's GEMMs at a time. ZeRO-3 modules see the gathered weight, so the
    copies are of whole weights (the pitfall the module docstring describes)."""
    weights = gemm_weights(parameters)
    transpose = gpu not in NO_TRANSPOSE_GPUS
    copies = "row-wise + transpose" if transpose else "row-wise"
    if engine == "fsdp2":
        layers: dict[int, int] = {}
        for t in weights:
            assert t.layer is not None
            layers[t.layer] = layers.get(t.layer, 0) + weight_bytes(t.numel, transpose=transpose)
        n = max(layers.values(), default=0)
        return (
            n,
            FORWARD_BACKWARD,
            f"one layer's GEMM weights in fp8 ({copies}), re-quantized per use",
        )
    n = sum(weight_bytes(t.numel, transpose=transpose) for t in weights)
    phases = PHASES if engine == "megatron" and accumulation > 1 else FORWARD_BACKWARD
    kept = "cached for the step" if phases is PHASES else "saved for backward"
    return n, phases, f"{len(weights)} GEMM weights in fp8 ({copies}, 1 B), {kept}"
