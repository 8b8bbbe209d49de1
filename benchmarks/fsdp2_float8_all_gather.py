"""torchao's Float8 all-gather of FSDP2 weights, measured on gloo CPU ranks against memplan's rule
(memplan.states.engines.fsdp2.fp8, precision.fp8_all_gather).

    PYTHONPATH=$PWD python benchmarks/fsdp2_float8_all_gather.py   # about 2 min on 2 cores

Tiny Llama (tests/conftest.py::TINY_LLAMA, transformers' LlamaForCausalLM) built in fp32, its
decoder Linears converted by torchao 0.18 `convert_to_float8_training` (torchtitan's
module_filter_fn: dims multiples of 16, `lm_head` skipped as torchtitan's `filter_fqns =
["output"]`), wrapped as torchtitan e7c0cae and memplan verify wrap it (`fully_shard` per
decoder layer, then the root) with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32),
on 2 gloo ranks (torch.multiprocessing spawn); torch._scaled_mm runs on CPU in torch 2.13.
Cases: `bf16` (no Float8), `float8` (Float8Linear, 16-bit all-gather), `fp8_all_gather`
(enable_fsdp_float8_all_gather=True, dynamic scales), `fp8_all_gather_precompute` (plus
precompute_float8_dynamic_scale_for_fsdp after each optimizer step). Two training steps, then
the third forward's first all-gather of each group is measured:

- `all_gather_output`: the flat output's storage bytes and dtype (foreach_all_gather's result);
- `unsharded`: the storage bytes of every parameter's unsharded storage after the copy-out
  (FSDPParam.all_gather_outputs, each storage once);
- `pre_all_gather_peak`: the most bytes allocated and still alive at once inside
  `_get_param_all_gather_inputs` (the fp8 casts and the foreach copy, before the output
  exists), tracked op by op by a TorchDispatchMode (a new output storage counts, freed when
  its storage is collected);
- `scale_storages`: the distinct storages of the unsharded Float8TrainingTensors' scales;
- `precomputed_storage`: the storage under the weights' `_precomputed_scale` views.

Then `uneven`: the `fp8_all_gather` case over 3 ranks (the Float8Linear weights' 64, 32 and 160
rows split unevenly), run in a subprocess: whether the all-gather completes.

memplan's figures for the same model (fsdp2_bytes(...).unsharded of the layer and root groups,
fp8.cast_peak_bytes, fp8.precompute_bytes) are written beside the measured ones. Writes
benchmarks/results/fsdp2-float8-all-gather.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-float8-all-gather.json"
WORLD = 2
UNEVEN_WORLD = 3
CASES = ("bf16", "float8", "fp8_all_gather", "fp8_all_gather_precompute")
BATCH, SEQUENCE = 1, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tracker() -> Any:
    """A TorchDispatchMode counting bytes of new storages while they live (peak kept)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def _ptr(t: object) -> int:
        """The storage address of a plain tensor (0: not one, or no valid storage: the
        functional collectives' wrappers)."""
        if type(t) is not torch.Tensor:
            return 0
        try:
            return int(t.untyped_storage().data_ptr())
        except RuntimeError:
            return 0

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.now = 0
            self.peak = 0

        def _free(self, ptr: int) -> None:
            self.now -= self.live.pop(ptr, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            ins = {ptr for t in tree_flatten((args, kwargs or {}))[0] if (ptr := _ptr(t))}
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                ptr = _ptr(t)
                if not ptr:
                    continue
                st = t.untyped_storage()
                if ptr in ins or ptr in self.live or st.nbytes() == 0:
                    continue
                self.live[ptr] = st.nbytes()
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, ptr)
            return out

    return Live


def keep_fp8(mod: Any, fqn: str) -> bool:
    """torchtitan components/quantization/utils.py::module_filter_fn with filter_fqns=[output]:
    a Linear whose in and out features are multiples of 16, the LM head skipped (checked on
    the whole module, before any parallelism)."""
    dims = mod.in_features % 16 == 0 and mod.out_features % 16 == 0
    return bool(dims) and "lm_head" not in fqn


def probe_forward(model: Any, ids: Any) -> dict[str, Any]:
    """One forward and backward of `model` (already stepped) with FSDP2's all-gather of each
    group's first unshard recorded (the quantities in the module docstring), and the storage
    under the Float8Linear weights' precomputed scales."""
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as coll
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg

    live = _tracker()
    records: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    orig_inputs = coll._get_param_all_gather_inputs
    orig_gather = pg.foreach_all_gather
    orig_copy_out = pg.foreach_all_gather_copy_out

    def inputs(fsdp_params):  # type: ignore[no-untyped-def]
        mode = live()
        with mode:
            out = orig_inputs(fsdp_params)
        state["peak"] = mode.peak
        return out

    def gather(fsdp_params, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = orig_gather(fsdp_params, *args, **kwargs)
        state["output"] = result.all_gather_output
        return result

    def copy_out(result, fsdp_params, group):  # type: ignore[no-untyped-def]
        orig_copy_out(result, fsdp_params, group)
        name = "root" if "layers." not in fsdp_params[0]._param_fqn else "layer"
        if name in records:
            return
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for p in fsdp_params
            for t in p.all_gather_outputs
        }
        scales: dict[int, int] = {}
        for p in fsdp_params:
            inner = getattr(p, "_unsharded_param", None)
            scale = getattr(inner, "_scale", None) if inner is not None else None
            if scale is not None:
                scales[scale.untyped_storage().data_ptr()] = scale.untyped_storage().nbytes()
        out = state["output"]
        records[name] = {
            "params": len(fsdp_params),
            "all_gather_output": out.untyped_storage().nbytes(),
            "all_gather_output_dtype": str(out.dtype).replace("torch.", ""),
            "unsharded": sum(storages.values()),
            "unsharded_dtypes": sorted(
                {
                    str(t.dtype).replace("torch.", "")
                    for p in fsdp_params
                    for t in p.all_gather_outputs
                }
            ),
            "pre_all_gather_peak": state["peak"],
            "scale_storages": sum(scales.values()),
        }

    coll._get_param_all_gather_inputs = inputs
    pg.foreach_all_gather = gather
    pg.foreach_all_gather_copy_out = copy_out
    try:
        model(ids, labels=ids).loss.backward()
    finally:
        coll._get_param_all_gather_inputs = orig_inputs
        pg.foreach_all_gather = orig_gather
        pg.foreach_all_gather_copy_out = orig_copy_out
    pre = {
        m.weight._local_tensor._precomputed_scale.untyped_storage().data_ptr(): (
            m.weight._local_tensor._precomputed_scale.untyped_storage().nbytes()
        )
        for m in model.modules()
        if getattr(
            getattr(getattr(m, "weight", None), "_local_tensor", None), "_precomputed_scale", None
        )
        is not None
    }
    return {"groups": records, "precomputed_storage": sum(pre.values())}


def _case(rank: int, case: str, world: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    fp8_ag = case.startswith("fp8_all_gather")
    precompute = case == "fp8_all_gather_precompute"
    if case != "bf16":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig(enable_fsdp_float8_all_gather=fp8_ag),
            module_filter_fn=keep_fp8,
        )
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
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
    return {"rank": rank, **probe_forward(model, ids)}


def _rank(rank: int, world: int, port: int, cases: tuple[str, ...], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = {case: _case(rank, case, world) for case in cases}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def measure(world: int, cases: tuple[str, ...]) -> list[dict[str, Any]]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, _free_port(), cases, tmp), nprocs=world)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def uneven() -> dict[str, Any]:
    """The fp8_all_gather case over UNEVEN_WORLD ranks, in a subprocess (gloo aborts it)."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.fsdp2_float8_all_gather import measure; "
        f"measure({UNEVEN_WORLD}, ('fp8_all_gather',)); print('COMPLETED')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    except subprocess.TimeoutExpired:
        return {"world": UNEVEN_WORLD, "completed": False, "error": "timed out after 300 s"}
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if "doesn't match" in ln]
    return {
        "world": UNEVEN_WORLD,
        "completed": "COMPLETED" in run.stdout,
        "returncode": run.returncode,
        "error": lines[0].strip() if lines else None,
    }


def predicted(world: int) -> dict[str, Any]:
    """memplan's figures for the measured model and cases (pure: no torch)."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.precision import dtype_bytes
    from memplan.states.engines.fsdp2 import fp8
    from memplan.states.engines.fsdp2.buffers import fsdp2_bytes
    from memplan.states.engines.fsdp2.groups import fsdp2_groups
    from memplan.states.engines.fsdp2.sharding import padded_elements
    from tests.conftest import TINY_LLAMA

    loaded = validate(
        {
            "model": {"architecture": TINY_LLAMA},
            "precision": {"preset": "bf16-mixed", "fp8": "torchao-tensorwise"},
            "parallelism": {"engine": "fsdp2", "data": world},
            "hardware": {"device": "cpu"},
        }
    )
    inv = load_inventory(loaded)
    p = dtype_bytes("bf16")
    out: dict[str, Any] = {}
    layer0 = [t for t in inv.parameters if t.layer == 0]
    other = padded_elements([t for t in layer0 if not fp8.fp8_gathered(t)], world)
    for case in CASES:
        on = case.startswith("fp8_all_gather")
        groups = fsdp2_groups(inv, world, "layers", None, on)
        block = fsdp2_bytes(groups.block, world, p, p, 4, 4)
        root = fsdp2_bytes(groups.root, world, p, p, 4, 4)
        row: dict[str, Any] = {"layer_unsharded": block.unsharded, "root_unsharded": root.unsharded}
        if on:
            precompute = case.endswith("precompute")
            row["layer_cast_peak"] = fp8.cast_peak_bytes(
                layer0, world, other_padded=other, param="bf16", precompute=precompute
            )
            row["precomputed_storage"] = fp8.precompute_bytes(inv.parameters) if precompute else 0
        out[case] = row
    return out


def main() -> None:
    t0 = time.perf_counter()
    ranks = measure(WORLD, CASES)
    result = {
        **stamp(),
        "model": "tests/conftest.py::TINY_LLAMA (LlamaForCausalLM, fp32 build)",
        "world": WORLD,
        "policy": "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fully_shard per "
        "decoder layer then the root",
        "measured": {case: [r[case] for r in ranks] for case in CASES},
        "predicted": predicted(WORLD),
        "uneven": uneven(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("predicted", "uneven")}, indent=1))
    for case in CASES:
        print(case, json.dumps(result["measured"][case][0]))


if __name__ == "__main__":
    main()
