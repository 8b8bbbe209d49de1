"""Why memplan is low on torchtitan's Llama 3.1 70B row (FSDP 32 x TP 8, full AC, compile +
Float8; published max reserved 71.9 GiB): one TP rank's step traced op by op from the code that
was measured, and replayed through memplan's caching-allocator model.

What runs (CPU, no GPU, nothing downloaded):
- torchtitan 9dec370's own model code (torchtitan/models/llama/model.py, and the RMSNorm of
  torchtitan/models/norms.py that the 70B config's `norm_type = "rmsnorm"` builds), its
  `apply_tp` (torchtitan/parallelisms/parallelize_llama.py: sequence parallelism, loss parallel,
  torchao's Float8ColwiseParallel / Float8RowwiseParallel / PrepareFloat8ModuleInput), full
  checkpointing as its `_apply_ac_to_transformer_block` applies it (`ptd_checkpoint_wrapper(
  block, preserve_rng_state=False)`), and train.py's step (`loss_fn`: `cross_entropy(
  pred.flatten(0, 1).float(), labels.flatten(0, 1))` inside torch's `loss_parallel()`, then `del
  pred`, `loss.backward()`). The three files are read from a torchtitan git checkout at 9dec370
  (`--torchtitan-repo`, default the mirror /work/.mirror/pytorch+torchtitan/repo) and executed,
  not copied into memplan.
- At the row's shapes on TP rank 0 of 8: Llama 3.1 70B (dim 8192, 80 layers, 64 heads, 8 kv
  heads, ffn 28672, vocabulary 128256), local batch 16 x 8192, parameters in bf16 (FSDP2's
  param_dtype), torchao 0.18 `convert_to_float8_training` (tensorwise, the `output` Linear
  excluded, as torchtitan/float8.py does) or plain bf16. SDPA is the flash kernel
  (aten._scaled_dot_product_flash_attention: what memplan assumes for the H100 run).
- Under FakeTensorMode on a fake process group of 8 ranks (torch.testing's FakeStore): no data,
  every op's real output shapes. A TorchDispatchMode records, in order, every storage an op
  makes and the moment it dies (DTensor and Float8 tensors by their inner tensors; DTensor's
  sharding propagation, which runs the op at global shapes to read its output metadata, is
  not counted; `_c10d_functional.wait_tensor`'s output is its input's memory, as on a device,
  not the new tensor its Meta kernel makes under FakeTensorMode: `Recorder.alias`).
- The recorded allocations and frees (two steps) are replayed through
  memplan.step.allocator with `expandable_segments:True` (the single-node launcher's
  setting) and with torch's default (no PYTORCH_CUDA_ALLOC_CONF: what the repo's multi-node
  launcher, multinode_trainer.slurm at 9dec370, sets), with the model states, the root's
  unsharded parameters and FSDP2's side-stream pools (the reduce-scatter stream's holds the
  sharded gradients) at the bytes memplan's own estimate of the row gives them (FSDP2 itself
  is not traced).

Not traced: torch.compile (the real run compiled each block, which changes the blocks' working
set but not the eager head and loss, see the notes), FSDP2's own buffers (taken from memplan),
AsyncTP. The CUDA caching allocator is memplan's model of it (tests/test_allocator.py), not a
GPU.

    PYTHONPATH=$PWD python benchmarks/torchtitan_70b_trace.py   # ~4 min on 2 quiet cores
    # writes benchmarks/results/torchtitan-70b-trace.json
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.states.engines.fsdp2.buffers import REDUCE_SCATTER_STREAM  # noqa: E402
from memplan.step import allocator  # noqa: E402
from memplan.step.alloc_conf import AllocConf  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "torchtitan-70b-trace.json"
COMMIT = "9dec370"
GIB = 1 << 30
TP = 8
PUBLISHED_GIB = 71.9


@dataclass(frozen=True)
class Shape:
    """The traced model and micro-batch: ModelArgs' fields and the row's batch x sequence."""

    dim: int = 8192
    layers: int = 80
    heads: int = 64
    kv_heads: int = 8
    multiplier: float = 1.3
    multiple_of: int = 4096
    vocab: int = 128256
    batch: int = 16
    seq: int = 8192

    def ffn(self) -> int:
        """FeedForward's hidden_dim (9dec370 model.py::FeedForward.__init__)."""
        hidden = int(self.multiplier * int(2 * 4 * self.dim / 3))
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def architecture(self) -> dict[str, Any]:
        """The same model as a config.json for memplan (model.architecture)."""
        return {
            "model_type": "llama", "hidden_size": self.dim, "intermediate_size": self.ffn(),
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": self.seq, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        }  # fmt: skip


ROW = Shape()
"""torchtitan/models/llama/__init__.py "70B" at 9dec370, 16 x 8192 per rank."""
CONFS = {"expandable_segments:True": "expandable_segments:True", "default": None}

# --- torchtitan 9dec370's code, read from its repository ---------------------------------------


def _show(repo: Path, path: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "show", f"{COMMIT}:{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(
            f"needs a torchtitan git checkout holding commit {COMMIT} (--torchtitan-repo): "
            f"`git show {COMMIT}:{path}` failed in {repo}: {err}"
        ) from None


def _definition(source: str, name: str) -> str:
    """The source of the top-level class or function `name` in `source`."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            segment = ast.get_source_segment(source, node)
            assert segment is not None
            return segment
    raise SystemExit(f"{name} not found in torchtitan {COMMIT}")


def load_torchtitan(repo: Path) -> tuple[types.ModuleType, Any]:
    """9dec370's model module (its norms import served by the RMSNorm class of its norms.py:
    the fused Triton norm there is not what `norm_type = "rmsnorm"` builds) and its apply_tp."""
    norms = types.ModuleType("torchtitan_9dec370_norms")
    exec("import torch\nimport torch.nn as nn\n", norms.__dict__)
    exec(_definition(_show(repo, "torchtitan/models/norms.py"), "RMSNorm"), norms.__dict__)

    def build_norm(norm_type: str, dim: int, eps: float = 1e-6) -> Any:
        assert norm_type == "rmsnorm", norm_type
        return norms.RMSNorm(dim, eps=eps)

    def reset_parameters(self: Any) -> None:  # 9dec370's RMSNorm.reset_parameters
        torch.nn.init.ones_(self.weight)

    norms.RMSNorm.reset_parameters = reset_parameters
    norms.build_norm = build_norm
    sys.modules["torchtitan.models.norms"] = norms
    model = types.ModuleType("torchtitan_9dec370_model")
    sys.modules[model.__name__] = model  # dataclasses look their module up
    exec(
        compile(_show(repo, "torchtitan/models/llama/model.py"), "model.py", "exec"), model.__dict__
    )
    del sys.modules["torchtitan.models.norms"]

    parallel: dict[str, Any] = {}
    exec(
        "import logging, torch, torch.nn as nn\n"
        "from torch.distributed import DeviceMesh\n"
        "from torch.distributed.tensor import Replicate, Shard\n"
        "from torch.distributed.tensor.parallel import (ColwiseParallel, parallelize_module,\n"
        "    PrepareModuleInput, RowwiseParallel, SequenceParallel)\n"
        "logger = logging.getLogger('torchtitan')\n",
        parallel,
    )
    source = _show(repo, "torchtitan/parallelisms/parallelize_llama.py")
    exec(_definition(source, "apply_tp"), parallel)
    return model, parallel["apply_tp"]


# --- recording what each op allocates and frees ------------------------------------------------

SUPPRESS = [0]
"""Non-zero while DTensor's sharding propagation runs an op at global shapes (metadata only)."""


def _suppressed(fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        SUPPRESS[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            SUPPRESS[0] -= 1

    return wrapped


class Recorder:
    """The allocations and frees of the step, in order: ("alloc", id, bytes), ("free", id),
    ("phase", name)."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[Any, int]] = {}
        self.events: list[tuple[Any, ...]] = []
        self.made: dict[int, tuple[str, tuple[int, ...], str]] = {}
        self.holders: Counter[int] = Counter()
        """Live storages per recorded id (a collective's output and its waited alias)."""

    def steps(self, count: int = 2) -> list[tuple[Any, ...]]:
        """The recorded step `count` times over (ids keyed by step, what a step leaves alive
        freed at its end), the phase markers on the last."""
        out: list[tuple[Any, ...]] = []
        for step in range(count):
            live: set[int] = set()
            for e in self.events:
                if e[0] == "alloc":
                    out.append(("alloc", (step, e[1]), e[2]))
                    live.add(e[1])
                elif e[0] == "free":
                    out.append(("free", (step, e[1])))
                    live.discard(e[1])
                elif step == count - 1:
                    out.append(e)
            out += [("free", (step, i)) for i in sorted(live)]
        return out

    def existing(self, tensors: Any) -> None:
        """Storages made before the step (parameters, buffers, inputs): never counted."""
        for t in tensors:
            ref = StorageWeakRef(_inner(t).untyped_storage())
            self.live[ref.cdata] = (ref, -1)
            self.holders[-1] += 1

    def collect(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            _, i = self.live.pop(key)
            self.holders[i] -= 1
            if i >= 0 and not self.holders[i]:
                self.events.append(("free", i))

    def alias(self, out: torch.Tensor, of: torch.Tensor) -> None:
        """`out` is `of`'s memory: `_c10d_functional.wait_tensor` returns its input on a
        device (torch/csrc/distributed/c10d/Functional.cpp::wait_tensor: `return tensor`),
        but its Meta kernel, which FakeTensorMode runs, makes a new tensor (torch/distributed/
        _functional_collectives.py::_wait_tensor_meta: `torch.empty_like(self)`). The
        collective's output is freed when both are."""
        src = self.live.get(StorageWeakRef(of.untyped_storage()).cdata)
        ref = StorageWeakRef(out.untyped_storage())
        if src is None or ref.cdata in self.live:
            self.record(out, "wait_tensor")
            return
        self.live[ref.cdata] = (ref, src[1])
        self.holders[src[1]] += 1

    def record(self, out: Any, func: Any) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, FakeTensor):
                continue  # a wrapper's inner tensors are recorded by the ops that made them
            st = t.untyped_storage()
            ref = StorageWeakRef(st)
            if ref.cdata in self.live or st.nbytes() == 0:
                continue  # a view, or an input
            i = len(self.made)
            self.live[ref.cdata] = (ref, i)
            self.holders[i] += 1
            self.events.append(("alloc", i, st.nbytes()))
            self.made[i] = (str(func), tuple(t.shape), str(t.dtype).removeprefix("torch."))


def _inner(t: torch.Tensor) -> torch.Tensor:
    while isinstance(t, DTensor):
        t = t._local_tensor
    return t


class Track(TorchDispatchMode):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, FakeTensor):
                # DTensor, torchao's Float8TrainingTensor: let the subclass run, and see the
                # ops it runs on its inner tensors
                return NotImplemented
        if SUPPRESS[0]:
            return func(*args, **kwargs)
        self.rec.collect()
        out = func(*args, **kwargs)
        if func is torch.ops._c10d_functional.wait_tensor.default:
            self.rec.alias(out, args[0])
        else:
            self.rec.record(out, func)
        return out

    def mark(self, name: str) -> None:
        self.rec.collect()
        self.rec.events.append(("phase", name))


@contextmanager
def metadata_unrecorded() -> Iterator[None]:
    """DTensor's sharding propagation runs each op at global shapes to read its output's
    metadata: not an allocation of the step (SUPPRESS)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    propagate = ShardingPropagator._propagate_tensor_meta_non_cached
    ShardingPropagator._propagate_tensor_meta_non_cached = _suppressed(propagate)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate  # type: ignore[method-assign]


def _flash_sdpa(q: Any, k: Any, v: Any, is_causal: bool = False, **_: Any) -> Any:
    """SDPA as the CUDA flash kernel runs it (its output and logsumexp saved)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal)[0]


def trace(repo: Path, float8: bool, shape: Shape = ROW) -> Recorder:
    """One training step of TP rank 0, recorded."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    model_code, apply_tp = load_torchtitan(repo)
    model_code.F = types.SimpleNamespace(
        **{**F.__dict__, "scaled_dot_product_attention": _flash_sdpa}
    )
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    args = model_code.ModelArgs(
        dim=shape.dim, n_layers=shape.layers, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
        ffn_dim_multiplier=shape.multiplier, multiple_of=shape.multiple_of, rope_theta=500000,
        vocab_size=shape.vocab, max_seq_len=shape.seq,
    )  # fmt: skip
    with torch.device("meta"):
        model = model_code.Transformer.from_model_args(args)
    model = model.to(torch.bfloat16)
    if float8:  # torchtitan/float8.py::Float8Handler.convert_to_float8_training
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model, config=Float8LinearConfig(), module_filter_fn=lambda m, fqn: fqn != "output"
        )
    apply_tp(model, mesh, loss_parallel=True, enable_float8=float8, enable_async_tp=False)
    for name, block in model.layers.named_children():  # _apply_ac_to_transformer_block, "full"
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
    with metadata_unrecorded(), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        rec = Recorder()
        rec.existing([*model.parameters(), *model.buffers(), tokens, labels])
        for param in model.parameters():
            # FSDP2 reduce-scatters each unsharded gradient and frees it (the sharded fp32
            # gradients are memplan's, allocated in the replay's init)
            param.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        with loss_parallel():  # train.py: train_context(loss_parallel_enabled)
            track = Track(rec)
            with track:
                track.mark("forward")
                pred = model(tokens)
                track.mark("loss")
                loss = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))
                del pred
                track.mark("backward")
                loss.backward()
                track.mark("end")
    return rec


# --- what the trace shows -----------------------------------------------------------------------


def peak(rec: Recorder) -> tuple[int, list[dict[str, Any]]]:
    """The traced step's highest allocated bytes and what is alive then (>= 64 MiB, grouped)."""
    live: dict[int, int] = {}
    cur = top = 0
    at: dict[int, int] = {}
    for e in rec.events:
        if e[0] == "alloc":
            live[e[1]] = e[2]
            cur += e[2]
            if cur > top:
                top, at = cur, dict(live)
        elif e[0] == "free":
            cur -= live.pop(e[1])
    groups: Counter[tuple[str, tuple[int, ...], str, int]] = Counter()
    for i, n in at.items():
        op, shape, dtype = rec.made[i]
        groups[(op, shape, dtype, n)] += 1
    alive = [
        {"op": op, "shape": list(shape), "dtype": dtype, "count": k, "gib": round(k * n / GIB, 3)}
        for (op, shape, dtype, n), k in sorted(groups.items(), key=lambda x: -x[0][3] * x[1])
        if k * n >= 64 << 20
    ]
    return top, alive


def spec_doc(shape: Shape = ROW, float8: bool = True) -> dict[str, Any]:
    """The published row's spec (benchmarks/published.py), at `shape` (the row's own preset
    when it is the row's); `float8` False: its blocks in bf16 (precision.fp8 dropped), as the
    traced step's bf16 variant runs them."""
    from benchmarks.published import ROWS

    row = next(r for r in ROWS if r.table == 4 and not r.unmodelled)
    doc = row.doc()
    if not float8:
        doc["precision"] = {k: v for k, v in doc["precision"].items() if k != "fp8"}
    if shape != ROW:
        doc["model"] = {"architecture": shape.architecture(), "implementation": "torchtitan"}
        doc["training"] = {
            **doc["training"], "micro_batch_size": shape.batch, "sequence_length": shape.seq,
        }  # fmt: skip
    return doc


def memplan_row(shape: Shape = ROW, float8: bool = True) -> dict[str, Any]:
    """memplan's estimate of the published row (at `shape`), and the bytes the replay takes
    from it: the model states, the root's unsharded parameters and FSDP2's side-stream
    pools."""
    from memplan.config.load import validate
    from memplan.model.load import load_inventory
    from memplan.report.estimate import estimate

    loaded = validate(spec_doc(shape, float8))
    inventory = load_inventory(loaded)
    report = estimate(loaded.spec, inventory)
    assert report.allocator is not None
    tl = report.timeline
    points = {p.phase: p for p in tl.points}
    start = points["start"]
    states = start.total_bytes
    grads = max(p.of("gradients") for p in tl.points)
    root = next(t.bytes for t in tl.transients if t.name == "fsdp2_unsharded_root")
    side = {s: n for s, n in report.allocator.reserved_by_stream if s != "compute"}
    at = points["backward_start"]
    doc = spec_doc(shape, float8)
    doc["hardware"] = {k: v for k, v in doc["hardware"].items() if k != "alloc_conf"}
    default = estimate(validate(doc).spec, inventory).peak_reserved
    return {
        "allocated_gib": report.peak_bytes / GIB,
        "reserved_gib": report.peak_reserved / GIB if report.peak_reserved else None,
        "reserved_default_alloc_conf_gib": default / GIB if default else None,
        "states_bytes": states,
        "gradients_bytes": grads,
        "root_unsharded_bytes": root,
        "side_stream_pools": side,
        # what memplan holds at its peak beside the states and FSDP2's buffers: the traced
        # step's counterpart
        "activations_and_loss_at_peak_gib": (
            at.of("activations")
            + sum(
                t.bytes
                for t in tl.transients
                if "backward_start" in t.phases and not t.name.startswith("fsdp2_")
            )
        )
        / GIB,
    }


def replay_events(rec: Recorder, row: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Init (states, side-stream pools) and two traced steps, the root's unsharded parameters
    alive through each; markers on the second step. FSDP2's sharded gradients are the
    reduce-scatter stream's (memplan.states.engines.fsdp2: `gradient_stream`), so that
    stream's pool holds them; they are on the compute stream only when it has no pool."""
    out: list[tuple[Any, ...]] = [("alloc", "states", row["states_bytes"])]
    if REDUCE_SCATTER_STREAM not in row["side_stream_pools"]:
        out.append(("alloc", "gradients", row["gradients_bytes"]))
    for stream, n in row["side_stream_pools"].items():
        out.append(("alloc", ("pool", stream), n, stream))
    # The root's unsharded parameters are alive through each step: around the first step's
    # events, and around the second's (rec.steps keys them by step).
    events = rec.steps(2)
    split = next(i for i, e in enumerate(events) if e[0] == "phase" or e[1][0] == 1)
    first, second = events[:split], events[split:]
    out.append(("alloc", ("root", 0), row["root_unsharded_bytes"]))
    out += [*first, ("free", ("root", 0)), ("alloc", ("root", 1), row["root_unsharded_bytes"])]
    out += [*second, ("free", ("root", 1))]
    return out


def loss_layout(rec: Recorder, row: dict[str, Any]) -> list[str]:
    """The compute stream's segment, bottom to top, when the loss's backward makes its third
    [tokens, vocab / TP] fp32 tensor (with the saved log-probabilities, four: the step's peak;
    expandable segments): where the holes are."""
    state = allocator._Allocator(AllocConf.parse("expandable_segments:True"), None)
    blocks: dict[Any, Any] = {"states": state.malloc(row["states_bytes"])}
    blocks["root"] = state.malloc(row["root_unsharded_bytes"])
    names: dict[int, str] = {
        id(blocks["states"]): "model states (memplan's)",
        id(blocks["root"]): "the root's unsharded parameters (memplan's)",
    }
    big = 7 * GIB
    phase = ""
    count = 0
    for e in rec.events:
        if e[0] == "phase":
            phase = e[1]
        elif e[0] == "free":
            b = blocks.pop(e[1])
            if b is not None:
                state.free(b)
        else:
            b = state.malloc(e[2])
            blocks[e[1]] = b
            op, shape, dtype = rec.made[e[1]]
            names[id(b)] = f"{op.split('.')[1]} {list(shape)} {dtype}"
            count += phase == "backward" and e[2] > big
            if count == 3:  # zeros_like, exp(x), then their sum: the peak
                break
    first = next(b for b in blocks.values() if b is not None)
    while first.prev is not None:
        first = first.prev
    lines, small = [], 0
    b = first
    while b is not None and b.mapped:
        what = names.get(id(b), "?") if b.allocated else "FREE"
        if b.allocated and b.size <= GIB // 4:
            small += b.size
        else:
            if small:
                lines.append(f"{small / GIB:6.2f} GiB  saved layer inputs and other small blocks")
                small = 0
            if b.size >= 16 << 20:
                lines.append(f"{b.size / GIB:6.2f} GiB  {what}")
        b = b.next
    return lines


MATRIX = (2, 3, 4, 8, 16)
"""Layer counts of the matrix (the row's widths and batch): the holes' placement differs with
the number of saved block inputs below them, so memplan's phase-level replay is checked at
several (tests/test_sequence_parallel_trace.py runs 3 and 4 layers)."""


def layer_matrix(repo: Path, layers: tuple[int, ...]) -> list[dict[str, Any]]:
    """memplan's phase-level replay against the traced step replayed op by op, Float8 and bf16
    blocks, at the row's widths with each of `layers` layers: under expandable segments (the
    keys without a suffix) and under torch's default allocator (`_default`)."""
    out = []
    for n in layers:
        shape = replace(ROW, layers=n)
        row = memplan_row(shape)
        entry: dict[str, Any] = {
            "layers": n,
            "memplan_gib": round(row["reserved_gib"], 3),
            "memplan_default_gib": round(row["reserved_default_alloc_conf_gib"], 3),
        }
        for float8 in (True, False):
            rec = trace(repo, float8, shape)
            events = replay_events(rec, row)
            kind = "float8" if float8 else "bf16"
            for suffix, conf in (("", "expandable_segments:True"), ("_default", None)):
                got = allocator.replay(events, AllocConf.parse(conf) if conf else None)
                entry[f"{kind}{suffix}_gib"] = round(got.peak_reserved / GIB, 3)
                entry[f"error_vs_{kind}{suffix}"] = round(
                    entry[f"memplan{suffix}_gib"] / entry[f"{kind}{suffix}_gib"] - 1, 4
                )
        for suffix, name in (("", "expandable"), ("_default", "default")):
            print(
                f"{n:3d} layers, {name:10s}: memplan {entry[f'memplan{suffix}_gib']:6.2f} GiB, "
                f"replayed op by op {entry[f'float8{suffix}_gib']:6.2f} (Float8, "
                f"{entry[f'error_vs_float8{suffix}']:+.1%}) {entry[f'bf16{suffix}_gib']:6.2f} "
                f"(bf16, {entry[f'error_vs_bf16{suffix}']:+.1%})"
            )
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--torchtitan-repo", type=Path, default=Path("/work/.mirror/pytorch+torchtitan/repo")
    )
    parser.add_argument("--layers", type=int, default=ROW.layers)
    ns = parser.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    row = memplan_row()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP)
    variants = []
    try:
        for float8 in (True, False):
            t0 = time.perf_counter()
            rec = trace(ns.torchtitan_repo, float8, replace(ROW, layers=ns.layers))
            top, alive = peak(rec)
            events = replay_events(rec, row)
            reserved = {}
            for name, conf in CONFS.items():
                r = allocator.replay(events, AllocConf.parse(conf) if conf else None)
                mine = row["reserved_gib" if conf else "reserved_default_alloc_conf_gib"]
                reserved[name] = {
                    "allocated_gib": round(r.peak_allocated / GIB, 2),
                    "reserved_gib": round(r.peak_reserved / GIB, 2),
                    "error_vs_published": round(r.peak_reserved / GIB / PUBLISHED_GIB - 1, 4),
                    # memplan's phase-level replay under the same setting, against this one
                    "memplan_error": round(mine / (r.peak_reserved / GIB) - 1, 4),
                }
            variant = {
                "variant": "Float8 (torchao tensorwise), eager blocks" if float8 else
                           "bf16, eager blocks",
                "events": len(rec.events),
                "traced_peak_gib": round(top / GIB, 3),
                "alive_at_peak": alive,
                "replayed": reserved,
                "layout_at_the_loss_backward": loss_layout(rec, row),
                "seconds": round(time.perf_counter() - t0, 1),
            }  # fmt: skip
            variants.append(variant)
            print(
                f"{variant['variant']:44s} traced peak {top / GIB:6.2f} GiB (memplan's "
                f"counterpart {row['activations_and_loss_at_peak_gib']:.2f}); replayed: "
                + ", ".join(
                    f"{k} {v['reserved_gib']:.2f} GiB ({v['error_vs_published']:+.1%})"
                    for k, v in reserved.items()
                )
            )
            for line in variant["layout_at_the_loss_backward"]:
                print("    ", line)
        by_layers = layer_matrix(ns.torchtitan_repo, MATRIX)
    finally:
        dist.destroy_process_group()
    out = {
        **stamp(),
        "row": "table 4: Llama 3.1 70B, 256 H100s, FSDP 32 x TP 8, full AC, compile + Float8",
        "published_gib": PUBLISHED_GIB,
        "torchtitan": COMMIT,
        "layers": ns.layers,
        "memplan": {k: v for k, v in row.items() if k.endswith("gib")},
        "variants": variants,
        "by_layers": by_layers,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
