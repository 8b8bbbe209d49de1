"""FSDP1's backward prefetch (ParallelismSpec.fsdp1_backward_prefetch), read from torch 2.13
torch/distributed/fsdp/_runtime_utils.py (PRE_BW = _pre_backward_hook, POST_BW =
_post_backward_hook via _post_backward_reshard, PREFETCH = _prefetch_handle,
_get_handle_to_prefetch):

- BACKWARD_PRE (`pre`, torch's and Lightning's default): PRE_BW of each unit, after
  gathering it, gathers the next unit in backward order (PREFETCH: only a unit whose
  `_needs_pre_backward_unshard` is set, i.e. one FULL_SHARD resharded after its forward).
  The root's PRE_BW runs first, at the loss's backward, and gathers the last decoder layer;
  each layer's PRE_BW gathers the layer before it. So under FULL_SHARD two decoder layers
  are gathered through backward (the running one and the next), and one already at the
  start of backward.
- BACKWARD_POST (`post`): POST_BW frees the unit's parameter (_post_backward_reshard) and
  then gathers the next unit (PREFETCH, its `_needs_pre_backward_unshard` set by FULL_SHARD's
  post-forward reshard), before the reduction (_reduce_grad): the reduction's moment holds
  the next layer's unsharded parameter where NO_PREFETCH's has freed this one's, the same
  size (post_freed). The last layer in backward order prefetches the root, already gathered
  (FSDP1 does not reshard the root after forward): nothing. Measured (2 ranks, FULL_SHARD)
  the backward peak rises over NO_PREFETCH's by 40,324 B bf16 and 80,640 B fp32, the
  reduction's moment (unsharded gradient, next layer, reduce-scatter output, cast) over
  NO_PREFETCH's highest (the gradient beside the parameter).
- SHARD_GRAD_OP keeps every layer gathered from its forward to its post-backward, so there
  is nothing to prefetch (no unit needs a pre-backward unshard).

Measured: benchmarks/results/fsdp1-prefetch.json (tests/test_fsdp1_prefetch.py).
"""

from __future__ import annotations

from memplan.memory import Transient
from memplan.states.engines.fsdp1.sharding import FlatUnit

SRC = (
    "torch/distributed/fsdp/_runtime_utils.py::_pre_backward_hook, _post_backward_reshard, "
    "_prefetch_handle, _get_handle_to_prefetch (2.13)"
)
PREFETCHED = "fsdp1 prefetched layer"


def prefetched_layer(layers: list[FlatUnit], *, param: str, pb: int) -> list[Transient]:
    """BACKWARD_PRE: the next decoder layer's padded flat parameter gathered beside the
    running one's, from the start of backward (the root's pre-backward hook gathers the last
    layer) through backward."""
    one = max(u.padded for u in layers) * pb
    return [
        Transient(
            name=PREFETCHED,
            bytes=one,
            phases=("backward_start", "backward"),
            formula=f"the next decoder layer's padded flat parameter, {one:,} B ({param}), "
            "gathered by the running unit's pre-backward hook (BACKWARD_PRE)",
            source=SRC,
        )
    ]


def post_freed(layers: list[FlatUnit], *, pb: int) -> int:
    """BACKWARD_POST: what a decoder layer's post-backward hook has freed by its reduction,
    net: its own padded flat parameter less the next layer's, gathered in between (the
    largest layer against one of the same size: 0; with one decoder layer the next unit is
    the root, already gathered, and the layer's own is freed)."""
    one = max(u.padded for u in layers) * pb
    return one if len(layers) < 2 else 0
