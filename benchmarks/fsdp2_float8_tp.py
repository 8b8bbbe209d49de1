"""torchao's Float8 all-gather of FSDP2 weights under DTensor tensor parallelism, measured on 4
gloo CPU ranks against memplan's rule (memplan.states.engines.fsdp2.fp8, precision.
fp8_all_gather with parallelism.tensor > 1).

    PYTHONPATH=$PWD python benchmarks/fsdp2_float8_tp.py   # a few minutes on 2 cores

Tiny Llama (tests/conftest.py::TINY_LLAMA, transformers' LlamaForCausalLM) built in fp32, its
decoder Linears converted by torchao 0.18 `convert_to_float8_training` (tensorwise, torchtitan's
module_filter_fn on the whole Linears, benchmarks/fsdp2_float8_all_gather.py::keep_fp8), on a
2-D mesh ("dp" 2, "tp" 2; TP ranks consecutive, as torchtitan's ParallelDims builds
dp_shard x tp). Tensor parallelism as torchtitan lays out a transformers Llama with a float8
tensorwise recipe (torchtitan experiments/transformers_modeling_backend/parallelize.py::
apply_non_moe_tp, enable_float8_tensorwise_tp; the same plan as llama3's apply_tp at e7c0cae):
q/k/v and gate/up `Float8ColwiseParallel`, o_proj and down_proj `Float8RowwiseParallel`,
`PrepareFloat8ModuleInput` before attention and the MLP, the embedding `RowwiseParallel`, the
head `ColwiseParallel` (logits gathered: the loss runs in transformers' forward), norms
`SequenceParallel`. torchtitan always shards the sequence with TP; `sp_off` runs the same Float8
styles with Replicate activations (torchao's styles take any input layout). Then `fully_shard`
per decoder layer and the root over "dp" with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32). The Float8 cases without TP styles (plain ColwiseParallel on Float8Linear)
are not torchtitan's composition and are not run.

Cases: `bf16` (no Float8, torch's own TP styles), `float8` (Float8Linear and Float8 TP styles,
16-bit FSDP all-gather), `fp8_all_gather` (enable_fsdp_float8_all_gather=True),
`fp8_all_gather_precompute` (plus precompute_float8_dynamic_scale_for_fsdp after each optimizer
step), `fp8_all_gather_sp_off` (fp8_all_gather without sequence parallelism). Two training
steps, then the third forward's first all-gather of each FSDP group is measured on every rank
(benchmarks/fsdp2_float8_all_gather.py::probe_forward: all-gather output, unsharded storage,
pre-all-gather peak, precomputed scales).

memplan's figures for each TP rank (the TP-local inventory of that rank, sharded over "dp") are
written beside the measured ones. Writes benchmarks/results/fsdp2-float8-tp.json.

One trial run (MLP-176 case alone, load average above 10) gave one rank a cast peak 4 B above
the rule (34,080 B for 34,076): one fp32 scalar, most likely the amax all-reduce's output that
gloo's asynchronous work released a moment late; the stored run, the slow test's rerun and the
2-rank FSDP2-only runs match to the byte.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fsdp2_float8_all_gather import _free_port, keep_fp8, probe_forward  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-float8-tp.json"
DATA, TENSOR = 2, 2
CASES = (
    "bf16",
    "float8",
    "fp8_all_gather",
    "fp8_all_gather_precompute",
    "fp8_all_gather_sp_off",
    "fp8_all_gather_i176",
)
MODELS: dict[str, dict[str, Any]] = {"fp8_all_gather_i176": {"intermediate_size": 176}}
"""Cases run on TINY_LLAMA with these overrides: an MLP width of 176 (11 x 16) leaves each TP
rank 88 columns of gate/up and 88 rows of down, no multiple of 16, while the whole Linears
torchtitan's filter sees are."""
GLOO_FP8_CASE = "fp8_all_gather"
"""Rerun without the uint8 shim (`gloo_fp8_shim`) in a subprocess: the error gloo gives."""
BATCH, SEQUENCE = 1, 16


def tp_plan(model: Any, mesh: Any, *, float8: bool, sp: bool) -> None:
    """torchtitan's TP plan for a transformers Llama (module docstring), in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    colwise: Any = ColwiseParallel
    rowwise: Any = RowwiseParallel
    prepare: Any = PrepareModuleInput
    if float8:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        colwise, rowwise, prepare = (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )
    seq = Shard(1) if sp else Replicate()
    parallelize_module(
        model,
        mesh,
        {
            "model.embed_tokens": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=seq, use_local_output=not sp
            ),
            **({"model.norm": SequenceParallel()} if sp else {}),
            "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
        },
    )
    for layer in model.model.layers:
        plan: dict[str, Any] = {
            "self_attn": prepare(
                input_kwarg_layouts={"hidden_states": seq},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            ),
            "mlp": prepare(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "self_attn.o_proj": rowwise(output_layouts=seq, use_local_output=not sp),
            "mlp.down_proj": rowwise(output_layouts=seq, use_local_output=not sp),
        }
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            plan[name] = colwise()
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            plan[name] = colwise()
        if sp:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(layer, mesh, plan)


def gloo_fp8_shim() -> None:
    """gloo has no float8 dtypes: torchao's fp8 activation all-gather under sequence
    parallelism (float8_ops.py::allgather_fp8, the funcol all_gather_into_tensor on the
    Float8TrainingTensor's fp8 `_data`) fails in gloo ("RuntimeError: Invalid scalar type",
    recorded by `gloo_fp8_error`). For the measurement the same collective runs on a uint8 view
    of the same storage (what FSDP2 itself does for mixed dtypes), the output viewed back as
    fp8: the bytes and their lifetimes are unchanged. The FSDP2 weight all-gathers measured here
    never take this path (FSDP2 gathers its own uint8 buffers)."""
    import torch
    from torchao.float8 import float8_ops
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    def allgather_fp8_as_uint8(aten_op, args, kwargs=None):  # type: ignore[no-untyped-def]
        fp8_input = args[0]
        data = fp8_input._data.contiguous()
        out = aten_op(data.view(torch.uint8), *args[1:], **(kwargs or {})).view(data.dtype)
        return Float8TrainingTensor(
            out,
            fp8_input._scale,
            fp8_input._orig_dtype,
            fp8_input._linear_mm_config,
            fp8_input._gemm_input_role,
        )

    for op in (
        torch.ops.c10d_functional.all_gather_into_tensor.default,
        torch.ops._c10d_functional.all_gather_into_tensor.default,
    ):
        float8_ops.FLOAT8_OPS_TABLE[op] = allgather_fp8_as_uint8


def _case(rank: int, case: str) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **MODELS.get(case, {})}))
    fp8_ag = case.startswith("fp8_all_gather")
    precompute = case == "fp8_all_gather_precompute"
    if case != "bf16":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig(enable_fsdp_float8_all_gather=fp8_ag),
            module_filter_fn=keep_fp8,
        )
    mesh = init_device_mesh("cpu", (DATA, TENSOR), mesh_dim_names=("dp", "tp"))
    tp_plan(model, mesh["tp"], float8=case != "bf16", sp=not case.endswith("sp_off"))
    converted = sorted(
        name
        for name, m in model.model.layers[0].named_modules()
        if type(m).__name__ == "Float8Linear"
    )
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"], mp_policy=policy)
    fully_shard(model, mesh=mesh["dp"], mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (BATCH, SEQUENCE))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if precompute:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)

    for _ in range(2):
        step()
    return {
        "rank": rank,
        "tp_rank": rank % TENSOR,
        "float8_linears": converted,
        **probe_forward(model, ids),
    }


def _rank(rank: int, port: int, cases: tuple[str, ...], out: str, shim: bool) -> None:
    import torch.distributed as dist

    if shim:
        gloo_fp8_shim()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=DATA * TENSOR)
    got: dict[str, Any] = {}
    try:
        for case in cases:
            try:
                got[case] = _case(rank, case)
            except Exception as err:  # recorded: what does not run on CPU / gloo
                got[case] = {"rank": rank, "error": f"{type(err).__name__}: {err}"[:600]}
                raise
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
        dist.destroy_process_group()


def measure(cases: tuple[str, ...], shim: bool = True) -> list[dict[str, Any]]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank, args=(_free_port(), cases, tmp, shim), nprocs=DATA * TENSOR)
        finally:
            ranks = [
                json.loads(Path(tmp, f"rank{r}.json").read_text())
                if Path(tmp, f"rank{r}.json").exists()
                else {}
                for r in range(DATA * TENSOR)
            ]
        return ranks


def gloo_fp8_error() -> dict[str, Any]:
    """GLOO_FP8_CASE without gloo_fp8_shim, in a subprocess: whether it completes, and the
    error."""
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.fsdp2_float8_tp import measure; "
        f"measure(({GLOO_FP8_CASE!r},), shim=False); print('COMPLETED')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    except subprocess.TimeoutExpired:
        return {"case": GLOO_FP8_CASE, "completed": False, "error": "timed out after 300 s"}
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("RuntimeError")]
    return {
        "case": GLOO_FP8_CASE,
        "completed": "COMPLETED" in run.stdout,
        "returncode": run.returncode,
        "error": lines[-1].strip() if lines else None,
    }


def predicted() -> dict[str, Any]:
    """memplan's figures for each case on each TP rank (pure: no torch): the rank's TP-local
    layer and root groups sharded over DATA ranks, the layer's cast peak and the precomputed
    scales."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.precision import dtype_bytes
    from memplan.report.settings import layout_of
    from memplan.states.engines.fsdp2 import fp8
    from memplan.states.engines.fsdp2.buffers import fsdp2_bytes
    from memplan.states.engines.fsdp2.groups import fsdp2_groups
    from memplan.states.engines.fsdp2.sharding import padded_elements
    from memplan.states.parallel import stage_inventory
    from tests.conftest import TINY_LLAMA

    p = dtype_bytes("bf16")
    out: dict[str, Any] = {}
    for case in CASES:
        on = case.startswith("fp8_all_gather")
        precompute = case.endswith("precompute")
        loaded = validate(
            {
                "model": {"architecture": {**TINY_LLAMA, **MODELS.get(case, {})}},
                "precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
                "parallelism": {
                    "engine": "fsdp2",
                    "data": DATA,
                    "tensor": TENSOR,
                    "sequence_parallel": not case.endswith("sp_off"),
                },
                "hardware": {"device": "cpu"},
            }
        )
        inv = load_inventory(loaded)
        rows = []
        for tp_rank in range(TENSOR):
            local = stage_inventory(inv, layout_of(loaded.spec).for_tensor_rank(tp_rank), 0)
            groups = fsdp2_groups(local, DATA, "layers", None, on, TENSOR)
            row: dict[str, Any] = {
                "tp_rank": tp_rank,
                "layer_unsharded": fsdp2_bytes(groups.block, DATA, p, p, 4, 4).unsharded,
                "root_unsharded": fsdp2_bytes(groups.root, DATA, p, p, 4, 4).unsharded,
            }
            if on:
                layer0 = [t for t in local.parameters if t.layer == 0]
                other = padded_elements(
                    [t for t in layer0 if not fp8.fp8_gathered(t, TENSOR)], DATA
                )
                row["layer_cast_peak"] = fp8.cast_peak_bytes(
                    layer0,
                    DATA,
                    other_padded=other,
                    param="bf16",
                    precompute=precompute,
                    tensor=TENSOR,
                )
                row["precomputed_storage"] = (
                    fp8.precompute_bytes(local.parameters, TENSOR) if precompute else 0
                )
            rows.append(row)
        out[case] = rows
    return out


def main() -> None:
    t0 = time.perf_counter()
    ranks = measure(CASES)
    result = {
        **stamp(),
        "model": "tests/conftest.py::TINY_LLAMA (LlamaForCausalLM, fp32 build)",
        "data": DATA,
        "tensor": TENSOR,
        "policy": "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fully_shard per "
        "decoder layer then the root, over the dp mesh dimension",
        "measured": {case: [r.get(case) for r in ranks] for case in CASES},
        "predicted": predicted(),
        "without_shim": gloo_fp8_error(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    for case in CASES:
        for r in result["measured"][case]:
            print(case, json.dumps(r))


if __name__ == "__main__":
    main()
