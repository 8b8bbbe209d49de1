"""The attention masks transformers would choose on real tensors, given to a fake-tensor trace
(memplan.verify.trace.profile), which has no data for transformers' mask utilities to read."""

from __future__ import annotations

import contextlib
from typing import Any


@contextlib.contextmanager
def real_tensor_masks() -> Any:
    """Let transformers decide the attention mask as it does on real tensors.

    transformers.masking_utils reads data to choose the mask, and counts a FakeTensor as
    "tracing" (utils/import_utils.py::is_tracing), where it takes the general path: under
    FakeTensorMode SDPA would get an explicit (b, 1, s, s) mask, and so repeated k/v instead of
    `enable_gqa`, which a real run does not make. The trace passes neither attention_mask nor
    position_ids (no padding, one sequence per row, as the real-tensor probe and training
    without packing do), so the real-tensor answers are known without data, and given here:

    - `find_packed_sequence_indices(position_ids)`: position_ids are arange(s), no packed
      sequences, None;
    - `_ignore_causal_mask_sdpa(padding_mask, ...)`: no padding, so the causal mask is skipped
      (`is_causal=True`) unless a local window is not longer than the keys;
    - `_ignore_bidirectional_mask_sdpa(padding_mask, ...)`: the same without causality.
    A padding mask the model makes itself when none is given is all ones (BART's decoder:
    `torch.ones(batch, length)`, modeling_bart.py::BartDecoder.forward), which is no padding:
    transformers' own test, `padding_mask.all()`, holds on real tensors."""
    import transformers.masking_utils as masking

    packed = masking.find_packed_sequence_indices
    original = masking._ignore_causal_mask_sdpa
    bidirectional = masking._ignore_bidirectional_mask_sdpa

    def ignore(padding_mask: Any, q_length: int, kv_length: int, *args: Any, **kw: Any) -> bool:
        local = kw.get("local_attention_size", args[2] if len(args) > 2 else None)
        return not (local is not None and kv_length >= local)

    def ignore_bidirectional(
        padding_mask: Any, kv_length: int, local_attention_size: int | None = None
    ) -> bool:
        return local_attention_size is None or kv_length < local_attention_size

    masking._ignore_causal_mask_sdpa = ignore
    masking._ignore_bidirectional_mask_sdpa = ignore_bidirectional
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking._ignore_causal_mask_sdpa = original
        masking._ignore_bidirectional_mask_sdpa = bidirectional
        masking.find_packed_sequence_indices = packed
