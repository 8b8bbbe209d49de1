"""torchao's Float8 all-gather of FSDP2 weights (precision.fp8_all_gather): which weights FSDP2
gathers in fp8, their bytes in its buffers, and the fp8 cast of each weight's shard before
the all-gather. Measured on 2 gloo CPU ranks by benchmarks/fsdp2_float8_all_gather.py
(tests/test_fsdp2_float8_all_gather.py holds the rule to its stored results).

torchao 0.18 `convert_to_float8_training(Float8LinearConfig(enable_fsdp_float8_all_gather=
True))` wraps each Float8Linear weight in WeightWithDynamicFloat8CastTensor
(torchao/float8/float8_linear.py::Float8Linear.from_float). FSDP2 sees its
`fsdp_pre_all_gather` (torch 2.13 _fsdp_param.py::FSDPParam.all_gather_inputs L836-895) and
gathers what it returns, the weight shard cast to float8_e4m3fn (1 B per element), instead
of casting the shard to MixedPrecisionPolicy.param_dtype (_fsdp_collectives.py::
_get_param_all_gather_inputs, the foreach-copy path, only for parameters without the hook).
A group that mixes fp8 and 16-bit inputs is gathered as bytes: `foreach_all_gather` views
every input as uint8 and allocates a uint8 output of world x the inputs' bytes
(_get_all_gather_input_metadatas L789-809, foreach_all_gather L336-353). The copy-out makes
each weight's unsharded storage in its input dtype, world x the input's elements
(FSDPParam.init_all_gather_outputs), and `fsdp_post_all_gather` wraps that storage in a
Float8TrainingTensor with the shard's scale (torchao/float8/fsdp_utils.py::
WeightWithDynamicFloat8CastTensor.fsdp_post_all_gather): the unsharded weight is 1 B per
element, the other parameters of the group stay in param_dtype.

torchtitan (e7c0cae, June 2025, components/quantization/float8.py::Float8Converter) turns it
on only where FSDP shards (`parallel_dims.dp_shard_enabled and enable_fsdp_float8_all_gather`)
and converts every Linear whose dims are multiples of 16 and whose name matches no
`filter_fqns` (components/quantization/utils.py::module_filter_fn; llama3 configs filter
`output`). torchtitan 0.3.0's Float8LinearConverter has no fp8 all-gather option any more
(recipe_name rowwise only, or emulate).

Under DTensor tensor parallelism (SRC_TP) torchtitan converts the whole Linears to Float8Linear,
then applies TP with torchao's Float8 styles, then FSDP2 over the data mesh: FSDP2 shards each
weight's TP-local tensor (the WeightWithDynamicFloat8CastTensor under the DTensor) and gathers
it over the data ranks as above. Measured on 4 gloo ranks (dp 2 x tp 2, tiny Llama,
benchmarks/fsdp2_float8_tp.py, tests/test_fsdp2_float8_tp.py): every rank's layer all-gather,
unsharded storage, cast peak and precomputed scales are this rule's on its TP-local tensors, with
sequence parallelism on or off; which Linears are converted is decided on the whole Linear
(linear_features), not on the rank's shard. The fp8 all-gather of sequence-parallel activations
(PrepareFloat8ModuleInput) fails in gloo ("RuntimeError: Invalid scalar type": gloo has no
float8 dtypes; NCCL has), so the measurement runs that collective on uint8 views; it is outside
these weights' buffers. Neither torchtitan nor torchao refuses TP with the fp8 all-gather:
torchtitan uses the Float8 styles for tensorwise recipes (rowwise ones get plain TP), and
torchao's styles refuse only a non-Float8Linear or non-dynamic scaling, both outside
precision.fp8_all_gather (tensorwise only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from memplan.errors import MemplanError
from memplan.memory import Transient
from memplan.model.inventory import TensorSpec
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp2.sharding import padded_elements
from memplan.states.parallel import tp_split

SRC_PRE = (
    "torchao 0.18 float8/fsdp_utils.py::WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather "
    "(the shard cast to fp8, its scale as metadata); torch 2.13 _fsdp_param.py::FSDPParam."
    "all_gather_inputs L836-895"
)
SRC_GATHER = (
    "torch 2.13 _fsdp_collectives.py::_get_all_gather_input_metadatas L789-809 (mixed input "
    "dtypes: a uint8 all-gather), foreach_all_gather L336-353; _fsdp_param.py::FSDPParam."
    "init_all_gather_outputs (each unsharded weight world x its input's elements, in the "
    "input's dtype); torchao 0.18 float8/fsdp_utils.py::fsdp_post_all_gather"
)
SRC_CAST = (
    "torchao 0.18 float8/float8_scaling_utils.py::hp_tensor_to_float8_dynamic, "
    "float8_utils.py::tensor_to_amax (abs, max, all-reduce MAX), amax_to_scale; "
    "float8_training_tensor.py::_ToFloat8ConstrFunc.forward (`tensor.to(float32) * scale`, "
    "float8_utils.py::to_fp8_saturated: clamp, then .to(fp8)); torch 2.13 _fsdp_collectives.py"
    "::_get_param_all_gather_inputs (every weight's fp8 input made before the all-gather "
    "output, freed after its copy-in: `del param_all_gather_inputs`)"
)
SRC_UNEVEN = (
    "torchao 0.18 float8/fsdp_utils.py::fsdp_pre_all_gather(self, mesh) casts the unpadded "
    "local shard (FSDP2's sharded parameter is a narrow of its padded storage: _fsdp_param.py::"
    "_init_sharded_param L316-326) and torch 2.13 checks the padded size only for the 5-argument "
    "hook (all_gather_inputs L876-891)"
)
SRC_TP = (
    "torchtitan 018740b models/llama3/infra/parallelize.py::parallelize_llama "
    "(enable_float8_tensorwise_tp: a float8 converter and no rowwise recipe) and ::apply_tp "
    "(Float8ColwiseParallel q/k/v, w1/w3; Float8RowwiseParallel wo, w2; PrepareFloat8ModuleInput; "
    "sequence parallel always); torchao 0.18 float8/fsdp_utils.py (the order: "
    "convert_to_float8_training, then TP, then FSDP2 sharding the DTensor's local "
    "WeightWithDynamicFloat8CastTensor on dim 0) and float8_tensor_parallel.py::"
    "Float8ColwiseParallel._apply"
)
SRC_PRECOMPUTE = (
    "torchao 0.18 float8/fsdp_utils.py::precompute_float8_dynamic_scale_for_fsdp (one "
    "[Float8Linears] fp32 tensor; each weight's _precomputed_scale a view of it)"
)

FP8_BYTES = dtype_bytes("fp8")
"""float8_e4m3fn: one byte per element."""
SCALE_BYTES = dtype_bytes("fp32")
"""A tensorwise scale: one fp32 element (amax_to_scale's `res.to(torch.float32)`)."""
CAST_FP32_COPIES = 2
"""fp32 tensors of a shard's size alive as the cast ends: `tensor.to(float32) * scale` and its
clamp (to_fp8_saturated), beside the fp8 result (SRC_CAST). The sharded weight is fp32 (FSDP2's
sharded parameters stay in the dtype the model was built in; MixedPrecisionPolicy only casts the
unsharded copy), so `.to(float32)` copies nothing; a 16-bit shard's fp32 copy is freed by the
product, before the clamp."""
FP8_TILE = 16
"""torchtitan's module_filter_fn converts Linears whose in and out features are both multiples of
16 (float8 tensor-core GEMMs)."""
_ROLES = ("attention", "mlp")


def linear_features(t: TensorSpec, tensor: int = 1) -> tuple[int, int]:
    """(out, in) features of the whole Linear whose TP-local weight is `t` (shape [out, in],
    nn.Linear's layout: torchao converts nn.Linear only, never transformers' Conv1D). torchtitan
    converts to Float8Linear before it applies TP (SRC_TP: module_filter_fn sees the whole
    Linear), so a column-parallel weight (split on dim 0) or a row-parallel one (dim 1,
    memplan.states.parallel.tp_split) is `tensor` times wider there than on its rank."""
    out_features, in_features = t.shape
    split = tp_split(t) if tensor > 1 else "replicated"
    if split == "column":
        out_features *= tensor
    elif split == "row":
        in_features *= tensor
    return out_features, in_features


def fp8_gathered(t: TensorSpec, tensor: int = 1) -> bool:
    """Whether FSDP2 gathers `t` (a TP-local tensor under `tensor`-way TP) in fp8: a decoder
    layer's attention or MLP Linear weight whose whole Linear's dims are multiples of 16
    (torchtitan's module_filter_fn, before TP: linear_features; the output projection is
    outside the layers and `filter_fqns` skips it). Routed experts (3-D) and routers are not
    counted: torchtitan's Float8LinearConverter converts Linear modules only, and memplan
    models Float8Linear in the attention and MLP projections."""
    if not (
        t.layer is not None and t.role in _ROLES and len(t.shape) == 2 and t.name.endswith("weight")
    ):
        return False
    out_features, in_features = linear_features(t, tensor)
    return out_features % FP8_TILE == 0 and in_features % FP8_TILE == 0


def fp8_shard_elements(tensors: Iterable[TensorSpec], world: int, tensor: int = 1) -> int:
    """Elements of one rank's shards of the fp8-gathered weights among `tensors` (each
    dim 0 / `world` rows: check_even holds every rank to the same)."""
    return sum(t.numel // world for t in tensors if fp8_gathered(t, tensor))


def check_even(tensors: Iterable[TensorSpec], world: int, tensor: int = 1) -> None:
    """torchao's pre-all-gather hook gathers the unpadded shard (SRC_UNEVEN): where a weight's
    rows do not split evenly, the ranks' all-gather inputs differ in size and the collective
    fails (measured: tiny Llama's Float8Linear layers, 64, 32 and 160 rows, over 3 gloo ranks
    abort in gloo: "Received data size doesn't match expected size",
    benchmarks/fsdp2_float8_all_gather.py)."""
    for t in tensors:
        if fp8_gathered(t, tensor) and t.shape[0] % world:
            raise MemplanError(
                f"FSDP2 shards {t.name} ({t.shape[0]} rows) over "
                f"{world} ranks unevenly, and torchao's fp8 all-gather sends each rank's "
                f"unpadded shard, so the ranks' all-gathers differ in size and fail "
                f"({SRC_UNEVEN}). Use a data degree that divides {t.shape[0]}, or "
                "fp8_all_gather: false.",
                field="precision.fp8_all_gather",
            )


def cast_peak_bytes(
    tensors: Sequence[TensorSpec],
    world: int,
    *,
    other_padded: int,
    param: str,
    precompute: bool,
    tensor: int = 1,
) -> int:
    """The most a group's fsdp_pre_all_gather calls hold at once, before its all-gather
    output exists (SRC_CAST): the weights are cast in the group's parameter order, each
    leaving its fp8 shard (and, without precomputed scales, its fp32 scale) until the copy-in;
    weight j's cast ends with two fp32 copies of its shard and its fp8 shard alive
    (CAST_FP32_COPIES); then the foreach copy of the group's other parameters to `param`
    (`other_padded` elements of their padded shards) joins every fp8 shard. The amax
    temporary (abs of the shard, freed by the max) holds less than the cast that follows.
    Without fp8 all-gather that foreach copy is the whole group's (measured: 43,136 B for tiny
    Llama's layer on 2 ranks), where memplan counts no term: the flat all-gather output made
    next holds `world` times more."""
    kept = SCALE_BYTES if not precompute else 0
    done = 0
    peak = 0
    for t in tensors:
        if not fp8_gathered(t, tensor):
            continue
        n = t.numel // world
        peak = max(peak, done + n * (CAST_FP32_COPIES * SCALE_BYTES + FP8_BYTES) + kept)
        done += n * FP8_BYTES + kept
    return max(peak, done + other_padded * dtype_bytes(param))


def cast_term(
    tensors: Sequence[TensorSpec],
    world: int,
    *,
    other_padded: int,
    param: str,
    precompute: bool,
    stream: str,
    tensor: int = 1,
) -> list[Transient]:
    """The cast of a decoder layer's fp8 weights before its all-gather (cast_peak_bytes), a
    momentary buffer on the all-gather stream as forward begins (each layer's all-gather
    holds more: its output and unsharded parameters)."""
    n_bytes = cast_peak_bytes(
        tensors, world, other_padded=other_padded, param=param, precompute=precompute, tensor=tensor
    )
    if n_bytes <= 0:
        return []
    scales = "" if precompute else f" + {SCALE_BYTES} B scale"
    return [
        Transient(
            name="fsdp2_fp8_weight_cast",
            bytes=n_bytes,
            phases=(),
            formula=f"{n_bytes:,} B: a layer's fp8 all-gather inputs as they are made, the "
            f"largest of (earlier weights' fp8 shards{scales} each + this weight's shard x "
            f"({CAST_FP32_COPIES} x {SCALE_BYTES} B fp32 + {FP8_BYTES} B fp8){scales}) and "
            f"(every fp8 shard + the other parameters' {other_padded:,} padded elements in "
            f"{param})",
            source=f"{SRC_PRE}; {SRC_CAST}",
            stream=stream,
            momentary="forward",
        )
    ]


def layer_cast_terms(
    tensors: Iterable[TensorSpec],
    world: int,
    *,
    param: str,
    precompute: bool,
    stream: str,
    wrap: str = "layers",
    expert_parallel: bool = False,
    tensor: int = 1,
) -> list[Transient]:
    """cast_term of the decoder layer whose cast holds the most. Under expert parallelism the
    routed experts are another parameter group, gathered over the expert-data mesh by their
    own all-gather (memplan.states.engines.fsdp2.groups.EDP), so not in this one's inputs."""
    layers: dict[int, list[TensorSpec]] = {}
    for t in tensors:
        if t.layer is not None and not (expert_parallel and t.role == "experts"):
            layers.setdefault(t.layer, []).append(t)
    best: list[Transient] = []
    for ts in layers.values():
        other = padded_elements([t for t in ts if not fp8_gathered(t, tensor)], world, wrap)
        terms = cast_term(
            ts,
            world,
            other_padded=other,
            param=param,
            precompute=precompute,
            stream=stream,
            tensor=tensor,
        )
        if terms and (not best or terms[0].bytes > best[0].bytes):
            best = terms
    return best


def precompute_bytes(tensors: Iterable[TensorSpec], tensor: int = 1) -> int:
    """Bytes precompute_float8_dynamic_scale_for_fsdp keeps between steps (SRC_PRECOMPUTE):
    one fp32 scale per fp8-gathered weight of the model (the rank's stage; under TP one per
    Float8Linear all the same, its DTensor weight's amax all-reduced over the whole mesh)."""
    return SCALE_BYTES * sum(1 for t in tensors if fp8_gathered(t, tensor))
