"""Measure what one decoder layer saves on a real tensor + sequence parallel rank (CPU, gloo).

Used by tests/test_tp_sp_activations_real.py; reuses tests/tp_probe.py (model, cases, the
column/row-parallel split). Each spawned rank shards a tiny transformers Llama the way
torchtitan applies torch's DTensor TP + sequence parallelism
(torchtitan/models/llama3/infra/parallelize.py::apply_tp):

- `SequenceParallel()` on input_layernorm / post_attention_layernorm and the final norm: the
  norms run on the sequence-sharded DTensor (Shard(1)) and save [b, s / t, h] shards;
- `PrepareModuleInput(Shard(1) -> Replicate())` on self_attn (its `hidden_states` is a keyword
  argument in transformers' LlamaDecoderLayer, hence input_kwarg_layouts) and on mlp: the
  all-gather runs as a separate op before the linears;
- ColwiseParallel q/k/v/gate/up, `RowwiseParallel(output_layouts=Shard(1))` o/down (a
  reduce-scatter back to the sequence shards; `use_local_output=False`, so the residual stream
  stays a Shard(1) DTensor of local shape [b, s / t, h]);
- the embedding (whole, not vocab-parallel) hands the first layer a Shard(1) DTensor (its
  global shape keeps transformers' position ids and causal mask whole), the rotary cos/sin and
  the attention mask stay plain full-sequence tensors (torchtitan keeps freqs_cis replicated),
  and lm_head (whole) gets the all-gathered final norm output as a plain tensor.

Every saved storage is attributed as in tp_probe (embeddings / rope / layers.<i> / head) and
labelled with the innermost module running when it was first saved and with the autograd
nodes that hold it (`<Node>._saved_<name>`, from a walk of the graph after forward).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.activation_probe import DTYPES, NAMES, build_model
from tests.tp_probe import (
    BATCH,
    COLWISE,
    PRECISIONS,
    ROWWISE,
    SEQ,
    Case,
    _local,
    cpu_mesh,
    spawn_ranks,
)
from tests.tp_probe import forward as forward_tp

NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class Stored:
    """One saved storage."""

    bytes: int
    shape: list[int]
    """Local shape of the first saved tensor that uses it."""
    dtype: str
    module: str
    """Innermost module (relative to its decoder layer) running when it was first saved."""
    saved_by: list[str] = field(default_factory=list)
    """Autograd nodes holding it: `<Node>._saved_<name>`."""


@dataclass
class Run:
    """One TP + SP forward pass on one rank."""

    regions: dict[str, list[Stored]]
    loss: float
    dtensor_saves: int
    """Saved tensors that were DTensors (counted by their local storage)."""
    parameter_saves: int


def sequence_parallel(model: Any, mesh: Any) -> None:
    """torchtitan's TP + SP plan on transformers' Llama (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {name: ColwiseParallel() for name in COLWISE}
    plan.update(
        {name: RowwiseParallel(output_layouts=Shard(1), use_local_output=False) for name in ROWWISE}
    )
    plan.update({name: SequenceParallel() for name in NORMS})
    plan["self_attn"] = PrepareModuleInput(
        input_kwarg_layouts={"hidden_states": Shard(1)},
        desired_input_kwarg_layouts={"hidden_states": Replicate()},
    )
    plan["mlp"] = PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
    )
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
        attn = layer.self_attn
        local_q = attn.q_proj.weight.to_local().shape[0] // attn.head_dim
        local_kv = attn.k_proj.weight.to_local().shape[0] // attn.head_dim
        assert attn.num_key_value_groups == local_q // local_kv, (local_q, local_kv)
    parallelize_module(
        model,
        mesh,
        {
            "model.embed_tokens": PrepareModuleOutput(
                output_layouts=Replicate(),
                desired_output_layouts=Shard(1),
                use_local_output=False,
            ),
            "model.norm": SequenceParallel(),
            "lm_head": PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            ),
        },
    )


def _saved_by(root: Any) -> dict[int, list[str]]:
    """Storage pointer -> the autograd nodes (and their saved-variable names) that hold it."""
    out: dict[int, list[str]] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - a saved variable that cannot be unpacked
                continue
            values = value if isinstance(value, tuple | list) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor):
                    ptr = _local(v).untyped_storage().data_ptr()
                    out.setdefault(ptr, []).append(f"{node.name()}.{attr}")
        stack.extend(nxt for nxt, _ in node.next_functions)
    return out


@contextmanager
def _measure(model: Any) -> Iterator[tuple[dict[str, list[Stored]], dict[int, Stored], list[int]]]:
    regions: dict[str, list[Stored]] = {}
    by_ptr: dict[int, Stored] = {}
    counts = [0, 0]  # DTensor saves, parameter saves
    current = ["embeddings"]
    modules: list[str] = []
    rope: set[int] = set()
    skip = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    handles = []

    def enter(name: str) -> Any:
        def hook(*_: Any) -> None:
            current[0] = name

        return hook

    def push(name: str) -> Any:
        def hook(*_: Any) -> None:
            modules.append(name)

        return hook

    def pop(*_: Any) -> None:
        modules.pop()

    def rope_out(_m: Any, _i: Any, out: Any) -> None:
        rope.update(_local(t).untyped_storage().data_ptr() for t in out)

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(enter(f"layers.{i}")))
        handles.append(layer.register_forward_hook(enter("head")))
        for name, sub in layer.named_modules():
            if name:
                handles.append(sub.register_forward_pre_hook(push(name)))
                handles.append(sub.register_forward_hook(pop))
    handles.append(model.model.rotary_emb.register_forward_hook(rope_out))

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = _local(t)
        if local is not t:
            counts[0] += 1
        storage = local.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in skip:
            counts[1] += 1
        elif ptr not in by_ptr:
            where = "rope" if ptr in rope else current[0]
            module = modules[-1] if modules and where.startswith("layers.") else ""
            entry = Stored(storage.nbytes(), list(local.shape), NAMES.get(local.dtype, "?"), module)
            by_ptr[ptr] = entry
            regions.setdefault(where, []).append(entry)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield regions, by_ptr, counts
    finally:
        for h in handles:
            h.remove()


def forward(config: dict[str, Any], case: Case, mesh: Any) -> tuple[Run, torch.Tensor]:
    """Build the model, shard it with TP + SP, run forward + loss; the run and the (whole,
    plain) logits."""
    config = {**config, "attention_dropout": 0.0}
    dtype, autocast = PRECISIONS[case.precision]
    model = build_model(config, attention=case.attention, dtype=dtype)
    sequence_parallel(model, mesh)
    torch.manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ))
    cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else nullcontext()
    with _measure(model) as (regions, by_ptr, counts), cast:
        out = model(input_ids=ids, labels=ids.clone(), use_cache=False)
    for ptr, nodes in _saved_by(out.loss.grad_fn).items():
        if ptr in by_ptr:
            by_ptr[ptr].saved_by = sorted(set(nodes))
    run = Run(regions, float(out.loss.detach()), dtensor_saves=counts[0], parameter_saves=counts[1])
    logits = out.logits
    assert not hasattr(logits, "to_local"), type(logits)
    return run, logits.detach()


def _rank(
    rank: int, world: int, port: int, config: dict[str, Any], cases: Sequence[Case], out: str
) -> None:
    with cpu_mesh(rank, world, port) as mesh:
        result: dict[str, Any] = {}
        for case in cases:
            sp, sp_logits = forward(config, case, mesh)
            whole, logits = forward_tp(config, case, None)
            tol = 1e-5 if case.precision == "fp32" else 5e-2
            result[case.name] = {
                "sp": asdict(sp),
                "whole_bytes": {name: r.bytes for name, r in whole.regions.items()},
                "max_logit_diff": float((sp_logits.float() - logits.float()).abs().max()),
                "tol": tol,
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(
    config: dict[str, Any], cases: Sequence[Case], out: Path, world: int = 2
) -> list[dict[str, Any]]:
    """Every rank's results (index = rank), from `world` processes on gloo."""
    return spawn_ranks(_rank, config, cases, out, world)


__all__ = ["NORMS", "Run", "Stored", "forward", "run_ranks", "sequence_parallel"]
