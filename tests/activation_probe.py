"""Measure what autograd saves for backward: the reference memplan's activations are held to.

Reusable (memplan verify can import it): `build_model` makes a small transformers causal LM
from a config.json-style mapping, `measure` runs forward + loss under
`torch.autograd.graph.saved_tensors_hooks` and returns every saved storage once.

The contract it measures (issue 5): bytes of the tensors autograd holds for backward at the end
of the forward pass, loss included, deduplicated by storage
(`untyped_storage().data_ptr()`), parameters and buffers excluded. Saved tensors stay alive
until backward (the pack hook returns them), so no measured storage is freed and reused while
the forward runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "int64",
    torch.bool: "bool",
    torch.uint8: "uint8",
}


@dataclass(frozen=True)
class Storage:
    """One saved storage."""

    nbytes: int
    shape: tuple[int, ...]
    """Shape of the first saved tensor that uses it."""
    dtype: str


@dataclass
class Measured:
    storages: dict[int, Storage] = field(default_factory=dict)
    parameter_saves: int = 0
    """Saves that were parameters or buffers (excluded)."""

    @property
    def bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values())

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.storages.values():
            out[s.dtype] = out.get(s.dtype, 0) + s.nbytes
        return out


def build_model(
    config: Mapping[str, Any],
    *,
    attention: str = "sdpa",
    dtype: str = "fp32",
    checkpointing: str = "none",
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised causal LM in train mode (dropout active where p > 0)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=DTYPES[dtype], attn_implementation=attention
    )
    model.train()
    if checkpointing == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    elif checkpointing != "none":
        raise ValueError(f"checkpointing {checkpointing!r}: build_model does none or full")
    return model


@contextlib.contextmanager
def saved_storages(exclude: list[torch.Tensor]) -> Iterator[Measured]:
    """Record every storage autograd saves inside the block (parameters/buffers excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    out = Measured()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in skip:
            out.parameter_saves += 1
        elif ptr not in out.storages:
            out.storages[ptr] = Storage(storage.nbytes(), tuple(t.shape), NAMES.get(t.dtype, "?"))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def measure(
    model: torch.nn.Module,
    *,
    batch: int,
    sequence: int,
    autocast: str | None = None,
    seed: int = 0,
) -> tuple[Measured, torch.Tensor]:
    """Forward + causal-LM loss on random tokens; the saved storages and the loss."""
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, sequence))
    exclude = [*model.parameters(), *model.buffers()]
    cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else contextlib.nullcontext()
    with saved_storages(exclude) as measured, cast:
        # labels are their own tensor, as in training (an MLM loss saves them).
        loss = model(input_ids=ids, labels=ids.clone(), use_cache=False).loss
    return measured, loss


def measure_selective(
    model: torch.nn.Module,
    *,
    batch: int,
    sequence: int,
    autocast: str | None = None,
    seed: int = 0,
) -> tuple[Measured, list[int]]:
    """`measure` with every attention core under torch.utils.checkpoint (memplan verify's
    selective recomputation, memplan/verify/selective.py), then the real backward: the saved
    storages of the forward, and per core (in the order backward recomputes them) the bytes
    of the new storages its recomputation saves (the core's inputs and parameters excluded)."""
    from memplan.verify.selective import attention_cores, recomputed_saves

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    groups: list[dict[int, int]] = []
    held: list[set[int]] = []

    def recompute_context(inputs: tuple[torch.Tensor, ...]) -> Any:
        @contextlib.contextmanager
        def group() -> Iterator[None]:
            groups.append({})
            held.append({t.untyped_storage().data_ptr() for t in inputs})
            yield

        return group()

    def save(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if groups and ptr not in held[-1] and ptr not in params:
            groups[-1].setdefault(ptr, storage.nbytes())

    with attention_cores(model, recompute_context=recompute_context) as cores:
        measured, loss = measure(
            model, batch=batch, sequence=sequence, autocast=autocast, seed=seed
        )
    assert cores.calls, "no attention core ran under the checkpoint"
    with recomputed_saves(save):
        loss.backward()
    model.zero_grad(set_to_none=True)
    return measured, [sum(g.values()) for g in groups]
