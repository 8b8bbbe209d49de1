"""Measure what torchtitan's Llama 3 holds for backward per rank under torchao Float8 tensor
parallelism (tensorwise recipe), on 2 gloo CPU ranks.

torchtitan 018740b (models/llama3/infra/parallelize.py::parallelize_llama) converts the
decoder Linears to torchao Float8Linear (convert_to_float8_training; module_filter_fn: dims
multiples of 16, `output` filtered) and, for a tensorwise recipe (`enable_float8_tensorwise_tp`),
applies ::apply_tp with torchao 0.18's Float8 styles: `attention` and `feed_forward`
PrepareFloat8ModuleInput(Shard(1) -> Replicate), wq/wk/wv, w1, w3 Float8ColwiseParallel, wo and
w2 Float8RowwiseParallel(output Shard(1)), the norms SequenceParallel; sequence parallelism is
always on there. Here that plan runs on torchtitan 0.3.0's modules (as tests/torchtitan_tp_probe.
py runs 9dec370's), with the same embedding, head and loss; `sequence_parallel` False runs the
same Float8 styles with Replicate activations (torchao's styles take any layout; not a layout
018740b offers). `float8` False is the bf16 baseline, tests/torchtitan_tp_probe.py's plan.

gloo has no float8 type: the fp8 all-gather runs on a uint8 view of the same storage
(benchmarks/fsdp2_float8_tp.py::gloo_fp8_shim). A Float8TrainingTensor is counted by its fp8
`_data` and fp32 `_scale` storages, a DTensor by its local tensor's.
"""

from __future__ import annotations

import datetime
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests import torchtitan_probe as probe
from tests import torchtitan_tp_probe as tp_probe

WORLD = 2


@dataclass(frozen=True)
class Case:
    float8: bool
    mode: str
    sequence_parallel: bool = True
    fused_qkv: bool = True
    ffn: int = probe.FFN
    """The FFN width (a width not a multiple of 16 leaves w1 / w3 / w2 unconverted)."""

    @property
    def name(self) -> str:
        sp = "sp" if self.sequence_parallel else "nosp"
        qkv = "wqkv" if self.fused_qkv else "wq-wk-wv"
        ffn = "" if self.ffn == probe.FFN else f"-ffn{self.ffn}"
        return f"{'float8' if self.float8 else 'bf16'}-{self.mode}-{sp}-{qkv}{ffn}"

    @property
    def shape(self) -> probe.Shape:
        return probe.Shape(fused_qkv=self.fused_qkv, ffn=self.ffn)


def keep(module: torch.nn.Module, fqn: str) -> bool:
    """torchtitan's module_filter_fn (components/quantization/utils.py): Linears whose dims are
    multiples of 16, not the output head (llama3's filter_fqns)."""
    if not isinstance(module, torch.nn.Linear) or fqn.endswith("lm_head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def float8_tp(model: Any, mesh: Any, *, sequence_parallel: bool, fused_qkv: bool) -> None:
    """018740b's apply_tp with enable_float8_tensorwise_tp (module docstring), decoder layers;
    the embedding and head as tests/torchtitan_tp_probe.py::apply_tp."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()
    parallelize_module(
        model,
        mesh,
        {
            **({"norm": SequenceParallel()} if sp else {}),
            "lm_head": ColwiseParallel(
                input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
            ),
        },
    )
    tp_probe._vocab_parallel_embedding(model.tok_embeddings, mesh, seq)  # noqa: SLF001
    qkv = (
        ["attention.qkv_linear.wqkv"]
        if fused_qkv
        else [f"attention.qkv_linear.{n}" for n in ("wq", "wk", "wv")]
    )
    for block in model.layers.values():
        plan: dict[str, Any] = {
            "attention": PrepareFloat8ModuleInput(
                input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            **{name: Float8ColwiseParallel() for name in qkv},
            "attention.wo": Float8RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareFloat8ModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": Float8ColwiseParallel(),
            "feed_forward.w2": Float8RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": Float8ColwiseParallel(),
        }
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, mesh, plan)


def _storages(t: torch.Tensor) -> list[Any]:
    from torch.distributed.tensor import DTensor

    while isinstance(t, DTensor) or hasattr(t, "elem"):
        t = t._local_tensor if isinstance(t, DTensor) else t.elem  # AsyncCollectiveTensor
    if hasattr(t, "_data") and hasattr(t, "_scale"):  # Float8TrainingTensor
        return [*_storages(t._data), *_storages(t._scale)]
    return [t.untyped_storage()]


class _Made(probe._Made):  # noqa: SLF001
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.shapes: dict[int, tuple[int, str, tuple[int, ...], str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self.made.append((StorageWeakRef(st), self.key(st), st.nbytes()))
                    self.shapes[self.key(st)] = (
                        st.nbytes(),
                        str(func),
                        tuple(t.shape),
                        str(t.dtype),
                    )
        return out


class _Peak(_Made):
    """_Made that, while `tracking`, records the most bytes of made storages alive after any op
    (the storages of `before` not counted)."""

    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.tracking = False
        self.peak = 0
        self.before: set[int] = set()
        self.at_peak: dict[int, str] = {}

    def alive(self) -> int:
        return sum(self.live().values())

    def live(self) -> dict[int, int]:
        return {k: n for ref, k, n in self.made if not ref.expired() and k not in self.before}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.tracking:
            live = self.live()
            if sum(live.values()) > self.peak:
                self.peak = sum(live.values())
                self.at_peak = {k: self.shapes[k][3] for k in live}
        return out


def layer_forward(case: Case, mesh: Any) -> dict[str, Any]:
    """The first decoder layer's forward on this rank (checkpointing none): the bytes of the
    storages made since the forward began alive when the layer starts (`start`) and ends
    (`end`), and the most alive after any of its ops (`peak`); peak - end is what the layer
    holds beyond what it leaves (its momentary buffers: the SP all-gather and reduce-scatter,
    the casts); `momentary` lists the storages alive at the peak and freed by the end
    ([bytes, dtype])."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")
    model = _built(case, mesh)
    tokens = torch.randint(0, case.shape.vocab, (case.shape.batch, case.shape.seq))
    labels = torch.randint(0, case.shape.vocab, (case.shape.batch, case.shape.seq))

    def key(st: Any) -> int:
        return int(st.data_ptr())

    inputs = (*model.parameters(), *model.buffers(), tokens, labels)
    spy = _Peak(key)
    spy.before = {key(s) for t in inputs for s in _storages(t)}
    got: dict[str, Any] = {}
    momentary: list[list[Any]] = []
    layer = next(iter(model.layers.values()))

    def pre(*_: Any) -> None:
        dist.barrier()
        got["start"] = spy.alive()
        spy.peak, spy.tracking = 0, True

    def post(*_: Any) -> None:
        spy.tracking = False
        live = spy.live()
        got["end"] = sum(live.values())
        got["peak"] = spy.peak
        # The storages alive at the peak and freed by the layer's end, as [bytes, dtype].
        gone = [[spy.shapes[k][0], d] for k, d in spy.at_peak.items() if k not in live]
        momentary.extend(sorted(gone, reverse=True))

    layer.register_forward_pre_hook(pre)
    layer.register_forward_hook(post)
    with spy:
        loss = cross_entropy_loss(model(tokens), labels)
    loss.backward()
    return {**got, "momentary": momentary}


def _built(case: Case, mesh: Any) -> Any:
    """The case's model, converted, sharded and checkpointed (held's), tokens seeded."""
    model = probe.build("bf16", case.shape)
    if case.float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=keep)
        float8_tp(model, mesh, sequence_parallel=case.sequence_parallel, fused_qkv=case.fused_qkv)
    else:
        tp_probe.apply_tp(
            model, mesh, sequence_parallel=case.sequence_parallel, fused_qkv=case.fused_qkv
        )
    probe.checkpoint(model, case.mode)
    torch.manual_seed(1)
    return model


def held(case: Case, mesh: Any, detail: bool = False) -> Any:
    """Bytes this rank's forward + loss hold for backward (tests/torchtitan_tp_probe.py::held's
    measure, Float8TrainingTensors by their storages)."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")
    shape = case.shape
    model = _built(case, mesh)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))

    def key(st: Any) -> int:
        return int(st.data_ptr())

    inputs = (*model.parameters(), *model.buffers(), tokens, labels)
    before = {key(s) for t in inputs for s in _storages(t)}
    spy = _Made(key)
    with spy:
        logits = model(tokens)
        loss = cross_entropy_loss(logits, labels)
    del logits
    dist.barrier()
    gc.collect()
    before.update(key(s) for s in _storages(loss))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    if detail:
        return sorted(spy.shapes[k] for k in alive)
    loss.backward()  # the saved tensors are usable: backward runs
    return sum(alive.values()) + labels.nbytes


def _rank(
    rank: int, world: int, port: int, cases: list[Case], out: str, detail: bool | str
) -> None:
    from benchmarks.fsdp2_float8_tp import gloo_fp8_shim

    gloo_fp8_shim()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        result: dict[str, Any] = {}
        for c in cases:
            try:
                if detail == "layer":
                    result[c.name] = layer_forward(c, mesh)
                    continue
                result[c.name] = held(c, mesh, detail)
            except (ValueError, AssertionError) as err:  # a plan torchao refuses
                import traceback

                where = traceback.extract_tb(err.__traceback__)[-1]
                result[c.name] = {
                    "error": f"{type(err).__name__}: {err} ({Path(where.filename).name}:"
                    f"{where.lineno} {where.name}: {where.line})"
                }
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(
    cases: list[Case], out: Path, world: int = WORLD, detail: bool | str = False
) -> list[dict[str, Any]]:
    """Every case's held bytes on each of `world` spawned gloo ranks (index = rank); with
    `detail` True the held storages listed, with "layer" layer_forward's figures instead."""
    import torch.multiprocessing as mp

    from memplan.verify.launch import free_port

    multiprocessing: Any = mp
    multiprocessing.start_processes(
        _rank,
        args=(world, free_port(), cases, str(out), detail),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
