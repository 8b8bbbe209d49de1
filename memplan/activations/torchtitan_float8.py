"""torchtitan's decoder layers under torchao Float8 tensor parallelism (precision.fp8
torchao-tensorwise with parallelism.tensor > 1): the Float8 Linears' saved inputs in fp8.

torchtitan 018740b (models/llama3/infra/parallelize.py::parallelize_llama, the torchtitan that
offered tensorwise recipes: memplan.report.notes) applies apply_tp with
`enable_float8_tensorwise_tp` for a tensorwise recipe: `attention` and `feed_forward` get
torchao's PrepareFloat8ModuleInput (Shard(1) -> Replicate), wq / wk / wv, w1, w3
Float8ColwiseParallel, wo and w2 Float8RowwiseParallel (rowwise recipes get torch's plain styles:
their activations are the 16-bit rule's). torchao 0.18 (float8/float8_tensor_parallel.py):

- PrepareFloat8ModuleInput._prepare_input_arg casts the layer input to a Float8TrainingTensor
  (hp_tensor_to_float8_dynamic: fp8 data, a 0-dim fp32 scale) *before* the redistribute, so
  under sequence parallelism the all-gather moves fp8 (float8_ops.py::allgather_fp8) and the
  whole-sequence tensor wq / wk / wv or w1 / w3 receive is fp8, one storage for all of them
  (Float8ColwiseParallel._prepare_input_fn skips tensor_already_casted_to_fp8 inputs);
- Float8RowwiseParallel._prepare_input_fn casts wo's and w2's inputs the same way (a new fp8
  storage: wo's input is otherwise a view of the attention output);
- float8_linear.py::matmul_with_hp_or_float8_args.forward saves `input_hp` as it comes, here the
  Float8TrainingTensor (1 B per element and its 4 B scale), and the weight (a parameter).

So, per decoder layer, the attention and FFN inputs (`attention_norm.output`, `ffn_norm.output`:
whole-sequence with or without SP) and w2's input are saved in fp8 instead of 16-bit, wo's fp8
input is saved beside the attention output, and each of the four casts keeps its fp32 scale.
The 16-bit norm outputs (the sequence shard under SP) are freed once cast. Under torchtitan's
SelectiveAC (0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops saves
aten.max.default, "the absolute maximum used to compute the scaling factor") every cast's amax
is kept: a 0-dim tensor in the cast tensor's dtype, for the four input casts and each Float8
Linear's weight cast (float8_utils.py::tensor_to_amax, `torch.max(torch.abs(x))`); the fp8
inputs themselves are recomputed. Full checkpointing keeps the block input, as without Float8.

Measured on 2 gloo ranks (torchtitan 0.3.0's Llama 3 with 018740b's Float8 plan, tests/
torchtitan_float8_tp_probe.py; benchmarks/torchtitan_float8_tp_activations.py): bf16 and
Float8 x none / full / selective-op x SP on / off x wqkv or wq / wk / wv, every rank to the byte.

Each fp8 cast holds its scaled fp32 tensor, the clamp of it and the fp8 result at once (casts:
9 B per element of the largest cast, a buffer per phase beside the layer's working set). In the
first layer's forward the measured peak holds exactly that for w2's weight; the backward's
casts (the weights again, the output gradients) are read from the source, not measured.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.memory import Phase, Transient
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Block, Saved, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan_moe
from memplan.precision import dtype_bytes
from memplan.states.layout import Layout

SRC_FLOAT8_TP = (
    "torchtitan 018740b models/llama3/infra/parallelize.py::apply_tp "
    "(enable_float8_tensorwise_tp); torchao 0.18 float8/float8_tensor_parallel.py::"
    "PrepareFloat8ModuleInput._prepare_input_arg, Float8RowwiseParallel._prepare_input_fn "
    "(the input cast to fp8 before the redistribute); float8/float8_linear.py::"
    "matmul_with_hp_or_float8_args.forward (ctx.save_for_backward(input_hp, weight_hp_t))"
)
SRC_AMAX = (
    "torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops "
    "(aten.max.default saved); torchao 0.18 float8/float8_utils.py::tensor_to_amax "
    "(torch.max(torch.abs(x)), 0-dim in x's dtype)"
)
FP8_TILE = 16
"""torchtitan's module_filter_fn converts Linears whose in and out features are multiples of 16
(components/quantization/utils.py); memplan.states.engines.fsdp2.fp8.FP8_TILE."""

_INPUTS = ("attention_norm.output", "ffn_norm.output", "feed_forward.w2.input")
"""Saved 16-bit tensors that the Float8 styles replace by their fp8 cast."""


def applies(arch: Architecture, st: Setting, lay: Layout) -> bool:
    """Whether torchtitan lays this rank out with torchao's Float8 TP styles: a tensorwise
    recipe under TP (018740b: `enable_float8_tensorwise_tp`)."""
    return st.float8 == "tensorwise" and lay.tensor > 1 and not torchtitan_moe.is_moe(arch)


def refusal(arch: Architecture, *, fused_qkv: bool) -> str:
    """Why torchtitan cannot run its Float8 TP plan on this model, or ''. apply_tp gives every
    block Linear a Float8 style, and a Linear module_filter_fn left unconverted (a dimension not
    a multiple of 16) fails it: PrepareFloat8ModuleInput._apply asserts a Float8Linear under
    `attention` / `feed_forward` (`assert self.linear_mm_config is not None`: measured with an
    FFN width of 200 on 2 gloo ranks, benchmarks/torchtitan_float8_tp_activations.py), and
    Float8ColwiseParallel._apply / Float8RowwiseParallel._apply raise `ValueError: Expecting
    module to be Float8Linear` for each unconverted Linear."""
    _, heads, kv_heads, head_dim = kernels.attention_dims(arch)
    dims = {
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads x head_dim": heads * head_dim,
    }
    if fused_qkv:
        dims["(heads + 2 x kv_heads) x head_dim (wqkv)"] = (heads + 2 * kv_heads) * head_dim
    else:
        dims["num_key_value_heads x head_dim"] = kv_heads * head_dim
    odd = [f"{k}={v}" for k, v in dims.items() if v % FP8_TILE]
    if not odd:
        return ""
    return (
        "torchtitan's Float8 tensor parallelism (torchao-tensorwise under TP) needs every "
        f"decoder Linear converted to Float8Linear, but {', '.join(odd)} is not a multiple of "
        f"{FP8_TILE}, so torchtitan's module_filter_fn leaves that Linear in 16-bit and "
        "torchao 0.18's Float8 styles fail on it (float8/float8_tensor_parallel.py: "
        "PrepareFloat8ModuleInput._apply's `assert self.linear_mm_config is not None`; "
        '"ValueError: Expecting module to be Float8Linear" from Float8ColwiseParallel / '
        "Float8RowwiseParallel._apply); "
        "use fp8: torchao-rowwise (plain TP styles) or a model whose dimensions are multiples "
        "of 16"
    )


def _cast(t: Saved) -> list[Saved]:
    """`t` as the Float8 styles save it: its fp8 cast and the cast's fp32 scale."""
    fp8 = replace(t, dtype="fp8", saved_by="matmul_with_hp_or_float8_args", source=SRC_FLOAT8_TP)
    scale = kernels.saved(
        f"{t.name}.scale", (), kernels.FP32, "matmul_with_hp_or_float8_args", SRC_FLOAT8_TP
    )
    return [fp8, scale]


def _fp8_inputs(tensors: tuple[Saved, ...], wo_input: Saved) -> tuple[Saved, ...]:
    """`tensors` with the Float8 Linears' inputs cast (_INPUTS) and wo's fp8 input after the
    attention output (before the FFN norm where the list has no attention output: CUDA's
    SelectiveAC keeps it, memplan.model.stacks.torchtitan_ac._selective_op)."""
    out: list[Saved] = []
    names = {t.name for t in tensors}
    wo_at = "attn.output" if "attn.output" in names else None
    placed = not names.intersection(_INPUTS)
    for t in tensors:
        if not placed and wo_at is None and t.name.startswith("ffn_norm."):
            out.extend(_cast(wo_input))
            placed = True
        if t.name in _INPUTS:
            out.extend(_cast(t))
        else:
            out.append(t)
        if t.name == wo_at:
            out.extend(_cast(wo_input))
            placed = True
    if not placed:
        out.extend(_cast(wo_input))
    return tuple(out)


def block(b: Block, st: Setting, local: Architecture, *, fused_qkv: bool) -> Block:
    """A decoder-layer block (`local`: the rank's slice, `st` its local setting) as the Float8
    styles leave it (module docstring); other blocks as they are."""
    if not b.name.startswith("layers"):
        return b
    _, heads, _, head_dim = kernels.attention_dims(local)
    every = {t.name: t.dtype for t in (*b.tensors, *b.recompute)}
    wo_input = kernels.saved(
        "attention.wo.input",
        (st.tokens, heads * head_dim),
        every.get("attn.output", st.matmul),
        "",
        SRC_FLOAT8_TP,
    )
    tensors = b.tensors if b.recompute else _fp8_inputs(b.tensors, wo_input)
    if st.checkpointing == "selective-op":
        # The four input casts' amax in their inputs' dtypes, then each Float8 Linear's weight
        # cast's in the parameters' dtype: q / k / v (or wqkv), wo, w1, w2, w3.
        cast = [(n, every.get(n, st.matmul)) for n in _INPUTS] + [(wo_input.name, wo_input.dtype)]
        linears = (1 if fused_qkv else 3) + 4
        amax = [
            kernels.saved(f"{n}.amax", (), dtype, "MUST_SAVE", SRC_AMAX) for n, dtype in cast
        ] + [
            kernels.saved(f"float8.weight_amax.{i}", (), st.stream, "MUST_SAVE", SRC_AMAX)
            for i in range(linears)
        ]
        tensors = (*tensors, *amax)
    recompute = _fp8_inputs(b.recompute, wo_input) if b.recompute else ()
    return replace(b, tensors=tensors, recompute=recompute)


SRC_CAST = (
    "torchao 0.18 float8/float8_training_tensor.py::_ToFloat8ConstrFunc.forward "
    "(`tensor_scaled = tensor.to(torch.float32) * scale`, float8_utils.py::to_fp8_saturated: "
    "`x.clamp(...)`, `.to(float8_dtype)`: the scaled fp32 tensor, its clamp and the fp8 result "
    "alive at once); float8_linear.py::matmul_with_hp_or_float8_args (the weight cast in "
    "forward and again for the input gradient, the output gradient cast in backward); "
    "float8_tensor_parallel.py (the input casts; NoopFwToFloat8BwDynamic casts the output "
    "gradient)"
)
CAST_BYTES_PER_ELEMENT = 2 * dtype_bytes("fp32") + dtype_bytes("fp8")
"""One cast's peak per element of its tensor (SRC_CAST): the scaled fp32 tensor and its clamp,
4 B each, and the 1 B result (a 16-bit tensor's `.to(float32)` copy is freed by the multiply).
Measured: the first layer's forward peak on 2 gloo ranks holds w2's weight cast as 24,576 B +
24,576 B fp32 + 6,144 B fp8 for its 6,144 elements (benchmarks/results/
torchtitan-float8-tp-activations.json, layer_forward)."""


def casts(
    local: Architecture, st: Setting, lay: Layout, *, fused_qkv: bool
) -> tuple[Transient, ...]:
    """The largest fp8 cast of a decoder layer on this rank, in forward and in backward
    (SRC_CAST, CAST_BYTES_PER_ELEMENT): one cast at a time, per layer while it runs, beside
    the layer's working set. `local`: the rank's slice (heads / TP, intermediate / TP), `st`
    its local setting. Forward casts: each Float8 Linear's TP-local weight, the attention and
    FFN inputs before their all-gather (the sequence shard under SP), wo's and w2's inputs;
    backward: the weights again and each Linear's output gradient (the colwise Linears'
    [tokens, out / TP], the rowwise ones' [tokens (/ TP under SP), hidden])."""
    hidden, heads, kv_heads, head_dim = kernels.attention_dims(local)
    tokens, ffn = st.tokens, local.intermediate_size
    shard = tokens // lay.tensor if lay.sequence_parallel else tokens
    qkv = (heads + 2 * kv_heads) * head_dim
    weights = max(qkv if fused_qkv else heads * head_dim, ffn) * hidden
    forward = max(weights, shard * hidden, tokens * heads * head_dim, tokens * ffn)
    backward = max(weights, tokens * qkv, tokens * ffn, shard * hidden)
    out = []
    sizes: tuple[tuple[Phase, int], ...] = (("forward", forward), ("backward", backward))
    for phase, n in sizes:
        out.append(
            Transient(
                name=f"float8_cast_{phase}",
                bytes=n * CAST_BYTES_PER_ELEMENT,
                phases=(phase,),
                formula=f"{n:,} elements (a layer's largest fp8 cast in {phase}) x "
                f"{CAST_BYTES_PER_ELEMENT} B (2 x fp32 + fp8)",
                source=SRC_CAST,
            )
        )
    return tuple(out)


NOTE = (
    "fp8: torchao Float8 tensor parallelism as torchtitan 018740b applies it to tensorwise "
    "recipes (Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput): each "
    "layer's attention and FFN inputs are cast to fp8 before the sequence-parallel all-gather "
    "and saved in fp8, as are wo's and w2's inputs, each with a 4 B scale; the largest cast "
    "of a layer (two fp32 copies and the fp8 result) is a buffer in forward and backward "
    "(memplan.activations.torchtitan_float8)."
)
