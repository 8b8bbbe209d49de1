"""What selective recomputation re-creates in backward, traced (memplan.verify.trace.profile).

The trace runs forward with every attention core checkpointed (memplan.verify.selective.
attention_cores) and then backward, under FakeTensorMode. Each core's recomputation saves, for
the recomputed ops' backward, the tensors torch.utils.checkpoint keeps in its frame
(torch/utils/checkpoint.py::_recomputation_hook): those that are not the checkpoint's own
inputs (q, k, v, kept since the forward) nor parameters are new storages, alive while that
layer's backward runs. Each is recorded once, as block `recompute:<the block that ran the core
forward>`, module "attention_core", so the profile's fit (memplan.verify.trace.fit) treats
them as one more block per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from memplan.errors import MemplanError
from memplan.verify.trace import fit as fit_

PREFIX = "recompute:"
MODULE = "attention_core"


class Recomputed:
    """Records, per core, the storages its recomputation makes (`records`)."""

    def __init__(
        self, block: Callable[[], str], skip: set[int], names: Mapping[torch.dtype, str]
    ) -> None:
        self.block = block
        self.skip = skip
        self.names = names
        self.records: list[fit_.Record] = []
        self.storages: list[int] = []
        """The storage (`_cdata`) of each record, in order."""
        self._group: tuple[str, set[int]] | None = None

    def context(self, inputs: tuple[torch.Tensor, ...]) -> contextlib.AbstractContextManager[Any]:
        """Made when a core runs forward (its block and its inputs); entered around its
        recomputation in backward."""
        block = self.block()
        held = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}

        @contextlib.contextmanager
        def group() -> Iterator[None]:
            self._group = (block, set(held))
            try:
                yield
            finally:
                self._group = None

        return group()

    def save(self, t: torch.Tensor) -> None:
        """A tensor the recomputation saves (memplan.verify.selective.recomputed_saves)."""
        if self._group is None:
            return  # a checkpoint other than an attention core's
        block, seen = self._group
        storage = t.untyped_storage()
        key = storage._cdata
        if key in seen or key in self.skip:
            return
        seen.add(key)
        dtype = self.names.get(t.dtype)
        if dtype is None:
            raise MemplanError(f"a recomputed tensor of dtype {t.dtype} memplan does not know.")
        record = fit_.Record(
            PREFIX + block, MODULE, dtype, storage.nbytes() // t.element_size(), {PREFIX + block}
        )
        self.records.append(record)
        self.storages.append(key)
