"""torchao Float8Linear's GEMMs in eager mode without tensor parallelism (precision.fp8
torchao-tensorwise / torchao-rowwise, torchtitan with FSDP2 alone): what each GEMM holds for a
moment beyond what it leaves, and what torchtitan's SelectiveAC keeps of its casts.

Each decoder Linear that torchtitan 0.3.0's Float8LinearConverter converts (components/
quantization/float8.py; module_filter_fn: in and out features multiples of 16; `lm_head`
filtered as its llama3 405B config does) runs torchao 0.18's float8/float8_linear.py::
matmul_with_hp_or_float8_args. Its forward saves `input_hp` and `weight_hp_t` as nn.Linear
saves them (a 16-bit input, the weight: the saved set is the 16-bit rule's) and runs, one GEMM
at a time (SRC_GEMM):

- forward: cast the input (rows: tokens), cast the weight, `_scaled_mm` (fast accumulation:
  no post-scale) into a 16-bit output;
- backward: cast the output gradient, cast the weight for the input gradient, `_scaled_mm`
  (the weight's fp8 transpose is row-major: float8_ops.py::preprocess_addmm copies it
  column-major); cast the output gradient again and the saved input for the weight gradient,
  `_scaled_mm` (both operands copied to the layouts it needs) into the weight gradient. Every
  cast's result stays referenced until the function returns.

A cast of n elements (float8_training_tensor.py::_ToFloat8ConstrFunc.forward, float8_utils.py::
to_fp8_saturated) holds its scaled fp32 tensor, the clamp of it and the 1 B result at once
(9 B per element) with its fp32 scale (one per tensor, tensorwise; one per row or column,
rowwise), and leaves the result and the scale. Without fast accumulation (the two backward
GEMMs) a rowwise `_scaled_mm` is run tensorwise and scaled after: float8_ops.py::
addmm_float8_unwrapped makes `post_inverse_scale = a_inverse_scale * b_inverse_scale`, fp32 of
the output's shape. rowwise_with_gw_hp (torchao's ROWWISE_WITH_GW_HP; torchtitan 0.3.0's second
recipe) casts the weight tensorwise for the input gradient (its scale repeated per column to
meet the rowwise output gradient: preprocess_addmm) and computes the weight gradient in 16-bit.

`gemm` replays that sequence for one Linear (every allocation and free, in the source's order);
measured to the byte on CPU (torch 2.13's _scaled_mm has CPU kernels), every GEMM of torchtitan
0.3.0's Llama 3, three recipes, by benchmarks/torchtitan_float8_activations.py (tests/
torchtitan_float8_probe.py). The step counts, per phase, the largest `extra` of a layer's GEMMs
(its peak minus what it leaves: the 16-bit GEMM holds only its outputs) beside the layer's
working set; checkpointing re-runs the forward GEMMs in backward.

SelectiveAC (torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops)
saves aten.max.default: a tensorwise cast's amax (float8_utils.py::tensor_to_amax,
`torch.max(torch.abs(x))`, 0-dim in x's dtype), two per Linear in forward (input, weight).
Rowwise casts reduce with aten.amax, which it does not save.

Not counted: `lm_head` converted (0.3.0's Float8LinearConverter.Config defaults to no
filter_fqns, and its debugmodel_float8 converts the head; its [tokens, vocabulary] casts would
be the largest); precision.fp8_all_gather's weights arriving in fp8 (their forward and
input-gradient weight casts skipped: `tensor_already_casted_to_fp8`; the weight casts are the
largest only at fewer tokens than features, so the term is then an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from memplan.memory import Phase, Transient
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Setting
from memplan.model.inventory import Architecture
from memplan.model.stacks import torchtitan_moe
from memplan.precision import dtype_bytes

Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]

SRC_GEMM = (
    "torchao 0.18 float8/float8_linear.py::matmul_with_hp_or_float8_args.forward / .backward; "
    "float8_scaling_utils.py::hp_tensor_to_float8_dynamic; float8_training_tensor.py::"
    "_ToFloat8ConstrFunc.forward (`tensor.to(torch.float32) * scale`, to_fp8_saturated: "
    "clamp, .to(fp8)); float8_ops.py::preprocess_addmm (`a_data.contiguous()`, "
    "`b_data.t().contiguous().t()`, the tensorwise scale repeated), addmm_float8_unwrapped "
    "(reciprocal scales; rowwise without fast accumulation: `post_inverse_scale`); "
    "config.py::Float8LinearConfig (gemm_config_output use_fast_accum=True), from_recipe_name"
)
SRC_AMAX = (
    "torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops "
    "(aten.max.default saved); torchao 0.18 float8/float8_utils.py::tensor_to_amax "
    "(tensorwise: torch.max(torch.abs(x)), 0-dim in x's dtype; axiswise: torch.amax)"
)
FP8_TILE = 16
"""torchtitan's module_filter_fn converts Linears whose in and out features are multiples of 16
(components/quantization/utils.py)."""

_FP32 = dtype_bytes("fp32")
_FP8 = dtype_bytes("fp8")
CAST_BYTES_PER_ELEMENT = 2 * _FP32 + _FP8
"""A cast's peak per element: the scaled fp32 tensor, its clamp, the fp8 result (SRC_GEMM)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Gemm:
    """One Float8 Linear's GEMM call on `tokens` rows, bytes relative to when it starts."""

    peak_bytes: int
    """The most it holds at once (its casts, copies, scales and outputs)."""
    after_bytes: int
    """What it leaves: its 16-bit output (forward), or input and weight gradients (backward)."""

    @property
    def extra_bytes(self) -> int:
        """What it holds for a moment beyond what it leaves."""
        return self.peak_bytes - self.after_bytes


class _Replay:
    """Allocations and frees in order; the most alive at once."""

    def __init__(self) -> None:
        self.alive: dict[str, int] = {}
        self.peak = 0

    def make(self, name: str, n_bytes: int) -> None:
        self.alive[name] = n_bytes
        self.peak = max(self.peak, sum(self.alive.values()))

    def free(self, *names: str) -> None:
        for name in names:
            del self.alive[name]

    def cast(self, name: str, elements: int, scales: int) -> None:
        """hp_tensor_to_float8_dynamic: its fp32 scale(s), then the scaled fp32 tensor, its
        clamp and the fp8 result together; leaves the result and the scale."""
        self.make(f"{name}.scale", scales * _FP32)
        self.make(f"{name}.scaled", elements * _FP32)
        self.make(f"{name}.clamped", elements * _FP32)
        self.make(name, elements * _FP8)
        self.free(f"{name}.scaled", f"{name}.clamped")


def _scaled_mm(
    r: _Replay,
    *,
    rows: int,
    cols: int,
    a_scales: int,
    b_scales: int,
    copies: tuple[int, ...],
    fast_accum: bool,
    out_bytes: int,
) -> None:
    """float8_ops.py::float8_mm for an output [rows, cols]: `copies` (elements, fp8) made by
    preprocess_addmm, the scales' reciprocals, the rowwise post-scale without fast
    accumulation, the output; all but the output freed after."""
    temps = [f"copy{i}" for i in range(len(copies))]
    for name, n in zip(temps, copies, strict=True):
        r.make(name, n * _FP8)
    if a_scales > 1 and b_scales == 1:  # a tensorwise b scale repeated per column
        r.make("b_scale.repeat", cols * _FP32)
        temps.append("b_scale.repeat")
        b_scales = cols
    r.make("a_inverse", a_scales * _FP32)
    r.make("b_inverse", b_scales * _FP32)
    inverses = ["a_inverse", "b_inverse"]
    if a_scales > 1 and not fast_accum:
        r.make("post_inverse_scale", rows * cols * _FP32)
        temps.append("post_inverse_scale")
        r.free("a_inverse")
        r.make("a_ones", _FP32)
        r.free("b_inverse")
        r.make("b_ones", _FP32)
        inverses = ["a_ones", "b_ones"]
    r.make("out", out_bytes)
    r.free(*temps, *inverses)


def gemm(
    phase: Literal["forward", "backward"],
    *,
    tokens: int,
    in_features: int,
    out_features: int,
    recipe: Recipe,
    dtype: str,
) -> Gemm:
    """matmul_with_hp_or_float8_args' forward or backward for one Linear (module docstring),
    its input, weight and gradients in `dtype`, replayed op by op (SRC_GEMM)."""
    t, i, o = tokens, in_features, out_features
    hp = dtype_bytes(dtype)
    rowwise = recipe != "tensorwise"
    r = _Replay()
    if phase == "forward":
        r.cast("input", t * i, t if rowwise else 1)
        r.cast("weight", i * o, o if rowwise else 1)
        _scaled_mm(
            r,
            rows=t,
            cols=o,
            a_scales=t if rowwise else 1,
            b_scales=o if rowwise else 1,
            copies=(),
            fast_accum=True,
            out_bytes=t * o * hp,
        )
        return Gemm(peak_bytes=r.peak, after_bytes=t * o * hp)
    # backward: the input gradient [t, i], then the weight gradient [i, o] (transposed view)
    r.cast("grad_output", t * o, t if rowwise else 1)
    weight_rowwise = recipe == "rowwise"
    r.cast("weight", i * o, i if weight_rowwise else 1)
    _scaled_mm(
        r,
        rows=t,
        cols=i,
        a_scales=t if rowwise else 1,
        b_scales=i if weight_rowwise else 1,
        copies=(i * o,),
        fast_accum=False,
        out_bytes=t * i * hp,
    )
    r.alive["grad_input"] = r.alive.pop("out")
    if recipe == "rowwise_with_gw_hp":
        r.make("grad_weight", i * o * hp)  # a 16-bit mm of the saved input and gradient
    else:
        r.cast("grad_output.dim1", t * o, o if rowwise else 1)
        r.cast("input", t * i, i if rowwise else 1)
        _scaled_mm(
            r,
            rows=o,
            cols=i,
            a_scales=o if rowwise else 1,
            b_scales=i if rowwise else 1,
            copies=(t * o, t * i),
            fast_accum=False,
            out_bytes=i * o * hp,
        )
    return Gemm(peak_bytes=r.peak, after_bytes=(t * i + i * o) * hp)


def linears(arch: Architecture, *, fused_qkv: bool) -> list[tuple[str, int, int]]:
    """A decoder layer's Linears that torchtitan converts to Float8Linear: (name, in, out)."""
    hidden, heads, kv_heads, head_dim = kernels.attention_dims(arch)
    ffn = arch.intermediate_size
    qkv = (
        [("wqkv", hidden, (heads + 2 * kv_heads) * head_dim)]
        if fused_qkv
        else [
            ("wq", hidden, heads * head_dim),
            ("wk", hidden, kv_heads * head_dim),
            ("wv", hidden, kv_heads * head_dim),
        ]
    )
    every = [*qkv, ("wo", heads * head_dim, hidden), ("w1", hidden, ffn), ("w3", hidden, ffn)]
    every.append(("w2", ffn, hidden))
    return [(n, i, o) for n, i, o in every if i % FP8_TILE == 0 and o % FP8_TILE == 0]


def casts(arch: Architecture, st: Setting, *, fused_qkv: bool) -> tuple[Transient, ...]:
    """The largest `extra` of a decoder layer's Float8 GEMMs in forward and in backward (the
    forward's again in backward under checkpointing, which re-runs them), one GEMM at a time,
    beside the layer's working set. Empty without torchao Float8 or with no Linear converted."""
    if st.float8 == "none":
        return ()
    recipe: Recipe = st.float8
    out = []
    found: dict[str, tuple[int, str]] = {}
    for phase in ("forward", "backward"):
        best = (0, "")
        for name, i, o in linears(arch, fused_qkv=fused_qkv):
            g = gemm(
                phase,
                tokens=st.tokens,
                in_features=i,
                out_features=o,
                recipe=recipe,
                dtype=st.matmul,
            )
            best = max(best, (g.extra_bytes, f"{name}'s {phase} ({i} -> {o})"))
        found[phase] = best
    if st.checkpointing != "none":
        found["backward"] = max(found["backward"], found["forward"])
    phases: tuple[Phase, ...] = ("forward", "backward")
    for phase in phases:
        n_bytes, which = found[phase]
        if n_bytes <= 0:
            continue
        out.append(
            Transient(
                name=f"float8_cast_{phase}",
                bytes=n_bytes,
                phases=(phase,),
                formula=f"{which} at {st.tokens:,} tokens, {recipe}: its fp8 casts "
                f"({CAST_BYTES_PER_ELEMENT} B per element at once), copies and scales beyond "
                "the outputs it leaves",
                source=SRC_GEMM,
            )
        )
    return tuple(out)


def with_amax(b: Block, st: Setting, arch: Architecture, *, fused_qkv: bool) -> Block:
    """A decoder-layer block under SelectiveAC with tensorwise casts: each Float8 Linear's input
    and weight amax kept (SRC_AMAX), 0-dim in the input's and the weight's dtype."""
    if not b.name.startswith("layers") or st.float8 != "tensorwise":
        return b
    if st.checkpointing != "selective-op":
        return b
    amax = []
    for name, _, _ in linears(arch, fused_qkv=fused_qkv):
        for what, dtype in (("input", st.matmul), ("weight", st.stream)):
            amax.append(kernels.saved(f"{name}.{what}.amax", (), dtype, "MUST_SAVE", SRC_AMAX))
    return replace(b, tensors=(*b.tensors, *amax))


NOTE = (
    "fp8 (torchao Float8Linear, eager, no tensor parallelism): each decoder Linear's GEMM "
    "casts its input and weight in forward, its output gradient (twice), weight and saved "
    "input in backward; the largest of a layer's GEMMs beyond the outputs it leaves is "
    "counted per phase (float8_cast_forward / _backward: 9 B per element of a cast at once, "
    "the fp8 copies the backward GEMMs need, rowwise's post-scale; measured to the byte per "
    "GEMM on CPU, memplan.activations.torchtitan_float8_gemm)"
)


def eager(
    saved: Activations, arch: Architecture, st: Setting, *, fused_qkv: bool = True
) -> Activations:
    """`saved` (one rank's activations without tensor parallelism) with the Float8 GEMMs'
    casts as buffers and SelectiveAC's amax kept: eager dense models (the compiled layers are
    memplan.model.forward.compiled's; MoE blocks are not traced with Float8)."""
    if not saved.modelled or st.float8 == "none" or st.compile or torchtitan_moe.is_moe(arch):
        return saved
    blocks = tuple(with_amax(b, st, arch, fused_qkv=fused_qkv) for b in saved.blocks)
    return replace(
        saved,
        blocks=blocks,
        buffers=(*saved.buffers, *casts(arch, st, fused_qkv=fused_qkv)),
        notes=(*saved.notes, NOTE + "."),
    )
