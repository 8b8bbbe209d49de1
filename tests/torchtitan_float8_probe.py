"""Measure torchtitan's Llama 3 with torchao Float8Linear on one rank, eager, no tensor
parallelism (the FSDP2-only layout: FSDP2 changes no activation), real CPU tensors.

torchtitan 0.3.0's own converter (components/quantization/float8.py::Float8LinearConverter.
convert) swaps every decoder Linear.Config whose dims are multiples of 16 for its Float8Linear
(torchao 0.18's Float8Linear); `filter_fqns=["lm_head"]` as its llama3 405B config sets it. Its
__init__ refuses a machine without SM89 (has_cuda_capability), so here the converter is made
without __init__, with what __init__ would set for the recipe (`recipe`: torchao's
Float8LinearConfig.from_recipe_name; "tensorwise" is 018740b's default Float8LinearConfig()).
torch 2.13 has CPU kernels for torch._scaled_mm, tensorwise and rowwise, so the model runs.

What is measured (a TorchDispatchMode recording the storage of every op's output; it declines
ops on tensor subclasses, `NotImplemented`, so Float8TrainingTensor's own dispatch runs and
its inner ops, the contiguous copies and the rowwise post-scale included, are recorded):

- `held`: bytes the forward + loss keep for backward (tests/torchtitan_probe.py's measure);
- `gemms`: each call of matmul_with_hp_or_float8_args.forward / .backward (the Float8 Linear's
  autograd Function; wrapped here to mark where it starts and ends): the bytes of recorded
  storages alive when it starts (`before`), when it returns (`after`) and at most after any
  op inside it (`peak`), with its Linear's (in, out) and the storages alive at the peak and
  freed by the return ([bytes, dtype, op]).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests import torchtitan_probe as probe

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


@dataclass(frozen=True)
class Case:
    recipe: str
    """"bf16" (no conversion) or one of RECIPES."""
    mode: str
    shape: probe.Shape = probe.Shape()

    @property
    def name(self) -> str:
        qkv = "" if self.shape.fused_qkv else "-wq-wk-wv"
        return f"{self.recipe}-{self.mode}-seq{self.shape.seq}{qkv}"


def torchao_config(recipe: str) -> Any:
    from torchao.float8 import Float8LinearConfig

    if recipe == "tensorwise":
        return Float8LinearConfig()
    return Float8LinearConfig.from_recipe_name(recipe)


def convert(model_config: Any, recipe: str) -> Any:
    """torchtitan 0.3.0's Float8LinearConverter.convert on `model_config` (module docstring)."""
    from torchtitan.components.quantization.float8 import Float8LinearConverter
    from torchtitan.components.quantization.utils import module_filter_fn

    conv = Float8LinearConverter.__new__(Float8LinearConverter)
    conv.config = Float8LinearConverter.Config(filter_fqns=["lm_head"])
    conv.torchao_config = torchao_config(recipe)
    conv.filter_fn = partial(module_filter_fn, filter_fqns=["lm_head"])
    conv.enabled = True
    return conv.convert(model_config)


def build(case: Case) -> torch.nn.Module:
    """The case's model in bf16 (FSDP2's param_dtype), converted, checkpointed."""
    torch.manual_seed(0)
    cfg = probe.config(case.shape)
    if case.recipe != "bf16":
        cfg = convert(cfg, case.recipe)
    model = cfg.build()
    model.init_states()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    probe.checkpoint(model, case.mode)
    return model


def _storages(t: torch.Tensor) -> list[Any]:
    if hasattr(t, "_data") and hasattr(t, "_scale"):  # Float8TrainingTensor
        return [*_storages(t._data), *_storages(t._scale)]
    return [t.untyped_storage()]


class _Spy(TorchDispatchMode):
    """Every storage an op makes, by weak reference; declines subclass arguments (module
    docstring). While `marks` is not empty, the most bytes alive after any op."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[StorageWeakRef, int, str, str]] = {}
        self.before: set[int] = set()
        self.peak = 0
        self.at_peak: dict[int, tuple[int, str, str]] = {}
        self.stage = "forward"

    def live(self) -> dict[int, tuple[int, str, str]]:
        return {
            k: (n, d, f)
            for k, (ref, n, d, f) in self.made.items()
            if not ref.expired() and k not in self.before
        }

    def alive(self) -> int:
        return sum(n for n, _, _ in self.live().values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(t is not torch.Tensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                k = int(st.data_ptr())
                if k and (k not in self.made or self.made[k][0].expired()):
                    self.made[k] = (StorageWeakRef(st), st.nbytes(), str(t.dtype), str(func))
        live = self.live()
        total = sum(n for n, _, _ in live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, live
        return out


def _marked(spy: _Spy, calls: list[dict[str, Any]], phase: str, fn: Any) -> Any:
    """`fn` (the Function's forward or backward) recording before / peak / after."""

    def wrapped(ctx: Any, *args: Any) -> Any:
        if phase == "forward":
            ctx.probe_shape = tuple(args[1].shape)  # weight_hp_t: (in, out)
        shape = ctx.probe_shape
        before = spy.alive()
        outer_peak, outer_at = spy.peak, spy.at_peak
        spy.peak, spy.at_peak = before, spy.live()
        out = fn(ctx, *args)
        live = spy.live()
        gone = sorted(
            ([n, d, f] for k, (n, d, f) in spy.at_peak.items() if k not in live), reverse=True
        )
        after = sum(n for n, _, _ in live.values())
        calls.append(
            {
                "phase": phase,
                "stage": spy.stage,
                "in": int(shape[0]),
                "out": int(shape[1]),
                "before": before,
                "peak": spy.peak,
                "after": after,
                "momentary": gone,
            }
        )
        if outer_peak > spy.peak:
            spy.peak, spy.at_peak = outer_peak, outer_at
        return out

    return wrapped


def run(case: Case) -> dict[str, Any]:
    """The case's `held` bytes and its `gemms` (module docstring)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args as fn
    from torchtitan.components.loss import cross_entropy_loss

    shape = case.shape
    model = build(case)
    torch.manual_seed(1)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    labels = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    spy = _Spy()
    spy.before = {
        int(s.data_ptr())
        for t in (*model.parameters(), *model.buffers(), tokens, labels)
        for s in _storages(t)
    }
    calls: list[dict[str, Any]] = []
    forward, backward = fn.forward, fn.backward
    fn.forward = staticmethod(_marked(spy, calls, "forward", forward))
    fn.backward = staticmethod(_marked(spy, calls, "backward", backward))
    try:
        with spy:
            logits = model(tokens)
            loss = cross_entropy_loss(logits, labels)
            del logits
            gc.collect()
            spy.before.add(int(loss.untyped_storage().data_ptr()))
            held = spy.alive() + tokens.nbytes + labels.nbytes
            spy.stage = "backward"
            loss.backward()
    finally:
        fn.forward, fn.backward = forward, backward
    return {"held": held, "gemms": calls}
