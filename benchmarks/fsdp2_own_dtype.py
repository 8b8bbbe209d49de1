"""What torch FSDP2 allocates for a parameter group whose parameters are not of one dtype.

    PYTHONPATH=. python benchmarks/fsdp2_own_dtype.py   # a few seconds; writes
                                                        # benchmarks/results/fsdp2-own-dtype.json

Each case builds one module of parameters held in several dtypes (QLoRA's packed 4-bit codes
in bf16 or uint8, peft's fp32 adapters, prepare_model_for_kbit_training's fp32 embedding and
norms beside the recipe's), shards it with `fully_shard` over a two-rank fake process group
(torch.testing's FakeStore: the collectives do nothing, every allocation is real) under a
MixedPrecisionPolicy, and records, in bytes, what torch 2.13 allocated: the flat all-gather
output (`AllGatherResult.all_gather_output`), the unsharded parameters' storage, the unsharded
gradients handed to `foreach_reduce`, and its reduce-scatter input and output (the first two
allocations of its `reduce_scatter_comm`). tests/test_fsdp2_own_dtype.py holds
memplan.states.engines.fsdp2.buffers.fsdp2_bytes to them.

Under tensor parallelism (TP_CASES): the same ranks as a (data 1, tensor 2) device mesh, the
module's parameters DTensors sharded or replicated over the tensor dimension, `fully_shard`
over the one-rank data dimension; recorded: the unsharded parameters' storage FSDP2's
one-rank copy allocates (_fsdp_param_group.py::FSDPParamGroup.wait_for_unshard,
`world_size == 1`), which memplan.states.engines.fsdp2.tp sizes (tp_fsdp2_unsharded_root).

Refusals (REFUSALS): a module whose trainable parameters are held in different dtypes, run
forward once; recorded: the error torch raises, or None where it runs
(_fsdp_param_group.py::FSDPParamGroup._init_mp_dtypes, at the first forward's lazy init).
memplan.states.engines.fsdp2.groups.check_uniform_dtype refuses the same specs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

WORLD = 2
# (name, [(parameter name, shape, fixed dtype or None: the held default, trainable)],
#  held default, MixedPrecisionPolicy param_dtype, reduce_dtype)
Tensor = tuple[str, tuple[int, ...], str | None, bool]
CASES: list[tuple[str, list[Tensor], str, str | None, str | None]] = []
_LAYER: list[Tensor] = [
    ("norm", (64,), None, False),
    ("q_packed", (1024, 1), "bf16", False),
    ("o_packed", (2049, 1), "uint8", False),
    ("lora_A", (8, 64), "fp32", True),
    ("lora_B", (64, 8), "fp32", True),
]
_ROOT: list[Tensor] = [
    ("embed", (1041, 64), "fp32", False),
    ("norm", (64,), "fp32", False),
    ("head", (1041, 64), "fp32", False),
    ("head_lora_A", (8, 64), "fp32", True),
]
CASES += [
    ("QLoRA layer, bf16, no param_dtype", _LAYER, "bf16", None, None),
    ("QLoRA layer, bf16-mixed (param_dtype bf16)", _LAYER, "fp32", "bf16", None),
    ("QLoRA layer, bf16, reduce_dtype bf16", _LAYER, "bf16", None, "bf16"),
    ("prepare_kbit root, bf16, no param_dtype", _ROOT, "bf16", None, None),
    ("prepare_kbit root, bf16-mixed (param_dtype bf16)", _ROOT, "fp32", "bf16", None),
]


# (name, [(parameter name, TP-local shape... given whole, fixed dtype or None, trainable,
#  tensor placement: "shard0" or "replicate")], held default, param_dtype)
TpTensor = tuple[str, tuple[int, ...], str | None, bool, str]
TP_CASES: list[tuple[str, list[TpTensor], str, str | None]] = []
_TP_ROOT: list[TpTensor] = [
    ("embed", (1040, 64), None, False, "shard0"),
    ("norm", (64,), "fp32", False, "replicate"),
    ("head", (1040, 64), None, False, "shard0"),
    ("head_lora_A", (8, 64), "fp32", True, "replicate"),
    ("head_lora_B", (1040, 8), "fp32", True, "shard0"),
]
TP_CASES += [
    ("TP 2 root, bf16, no param_dtype", _TP_ROOT, "bf16", None),
    ("TP 2 root, bf16-mixed (param_dtype bf16)", _TP_ROOT, "fp32", "bf16"),
]
# (name, [(parameter name, shape, fixed dtype or None, trainable)], held default)
REFUSALS: list[tuple[str, list[Tensor], str]] = [
    (
        "bf16 trainable bias beside fp32 adapters",
        [
            ("weight", (64, 64), None, False),
            ("bias", (64,), None, True),
            ("lora_A", (8, 64), "fp32", True),
            ("lora_B", (64, 8), "fp32", True),
        ],
        "bf16",
    ),
    (
        "frozen bf16 bias beside fp32 adapters",
        [
            ("weight", (64, 64), None, False),
            ("bias", (64,), None, False),
            ("lora_A", (8, 64), "fp32", True),
            ("lora_B", (64, 8), "fp32", True),
        ],
        "bf16",
    ),
]


def _module(tensors: list[Tensor], held: str) -> Any:
    """One module of `tensors` whose forward touches every trainable one."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, shape, dtype, trainable in tensors:
                t = torch.ones(shape, dtype=dtypes[dtype or held])
                self.register_parameter(name, torch.nn.Parameter(t, requires_grad=trainable))

        def forward(self, x: Any) -> Any:
            out = x.sum() * 0
            for p in self.parameters():
                if p.requires_grad:
                    out = out + p.float().sum()
            return out

    return Module()


def _refused(tensors: list[Tensor], held: str) -> str | None:
    """What torch raises at the first forward of `tensors` under fully_shard (None: runs)."""
    import torch
    from torch.distributed.fsdp import fully_shard

    model = _module(tensors, held)
    fully_shard(model)
    try:
        model(torch.ones(1)).backward()
    except AssertionError as err:
        return str(err)
    return None


def _run_tp(tensors: list[TpTensor], held: str, param: str | None) -> dict[str, int]:
    """The storage of the unsharded parameters FSDP2's one-rank data mesh copies out."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("data", "tensor"))
    model: Any = torch.nn.Module()
    for name, shape, dtype, trainable, placement in tensors:
        whole = torch.ones(shape, dtype=dtypes[dtype or held])
        where = [Shard(0)] if placement == "shard0" else [Replicate()]
        local = distribute_tensor(whole, mesh["tensor"], where)
        model.register_parameter(name, torch.nn.Parameter(local, requires_grad=trainable))
    policy = MixedPrecisionPolicy(param_dtype=dtypes[param] if param else None)
    fully_shard(model, mesh=mesh["data"], reshard_after_forward=True, mp_policy=policy)
    model.unshard()
    group = model._get_fsdp_state()._fsdp_param_group
    assert group is not None
    out = {
        "unsharded_parameters": sum(
            p.all_gather_outputs[0].untyped_storage().nbytes() for p in group.fsdp_params
        )
    }
    model.reshard()
    return out


def _run(tensors: list[Tensor], held: str, param: str | None, reduce: str | None) -> dict[str, int]:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as _pg

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
    model: Any = _module(tensors, held)  # an FSDPModule once fully_shard has run
    policy = MixedPrecisionPolicy(
        param_dtype=dtypes[param] if param else None,
        reduce_dtype=dtypes[reduce] if reduce else None,
    )
    fully_shard(model, reshard_after_forward=True, mp_policy=policy)
    out: dict[str, int] = {}
    handle = model.unshard(async_op=True)
    group = model._get_fsdp_state()._fsdp_param_group
    assert group is not None and handle is not None
    flat = group._all_gather_result.all_gather_output
    out["all_gather_output"] = flat.numel() * flat.element_size()
    handle.wait()
    out["unsharded_parameters"] = sum(
        p._unsharded_param.untyped_storage().nbytes() for p in group.fsdp_params
    )
    model.reshard()

    pg: Any = _pg  # foreach_reduce as the group's post_backward looks it up
    original = pg.foreach_reduce

    def recording(
        fsdp_params: Any, grads: list[Any], group: Any, stream: Any, comm: Any, *a: Any, **k: Any
    ) -> Any:
        out["unsharded_gradients"] = sum(g.numel() * g.element_size() for g in grads)
        allocate, sizes = comm.allocate, []

        def allocating(size: Any, *, dtype: Any, device: Any) -> Any:
            t = allocate(size, dtype=dtype, device=device)
            sizes.append(t.numel() * t.element_size())
            return t

        comm.allocate = allocating
        try:
            return original(fsdp_params, grads, group, stream, comm, *a, **k)
        finally:
            comm.allocate = allocate
            out["reduce_scatter_input"], out["reduce_scatter_output"] = sizes[:2]

    pg.foreach_reduce = recording
    try:
        model(torch.ones(1)).backward()
    finally:
        pg.foreach_reduce = original
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fsdp2-own-dtype.json"))
    parser.add_argument("--print", action="store_true", help="print, do not write")
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    cases = []
    for name, tensors, held, param, reduce in CASES:
        cases.append(
            {
                "name": name,
                "tensors": [list(t) for t in tensors],
                "held": held,
                "param_dtype": param,
                "reduce_dtype": reduce,
                "measured": _run(tensors, held, param, reduce),
            }
        )
    tp_cases = [
        {
            "name": name,
            "tensors": [list(t) for t in tensors],
            "held": held,
            "param_dtype": param,
            "tensor": WORLD,
            "measured": _run_tp(tensors, held, param),
        }
        for name, tensors, held, param in TP_CASES
    ]
    refusals = [
        {
            "name": name,
            "tensors": [list(t) for t in tensors],
            "held": held,
            "raised": _refused(tensors, held),
        }
        for name, tensors, held in REFUSALS
    ]
    dist.destroy_process_group()
    doc = {
        **stamp(),
        "command": "PYTHONPATH=. python benchmarks/fsdp2_own_dtype.py",
        "versions": {"torch": torch.__version__},
        "world": WORLD,
        "cases": cases,
        "tp_cases": tp_cases,
        "refusals": refusals,
    }
    text = json.dumps(doc, indent=1) + "\n"
    if args.print:
        print(json.dumps([cases, tp_cases, refusals], indent=1))
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
