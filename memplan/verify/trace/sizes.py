"""The sizes a profile is traced at (memplan.verify.trace.profile): the (batch, sequence) grid
its fit spans and the sizes it is checked on, and the sequence regimes of a model with a sliding
window or attention chunk (below the window at the ordinary unit, past it at multiples of
W + 1), and the unit of a model with a chunked loop over the sequence (loop_chunk)."""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

from memplan.verify.trace import cuda

GRID = ((2, 1), (3, 1), (2, 2), (3, 2), (2, 3), (3, 3))
"""(batch, sequence multiple) sizes fitted for batch >= 2: {2, 3} x {1, 2, 3} spans BASIS."""
CHECK = (4, 5)
"""(batch, sequence multiple) the batch >= 2 fit is checked on."""
GRID_B1 = ((1, 1), (1, 2), (1, 3))
"""Batch 1 is fitted on its own over 1, s, s*s: torch saves other storages there (transformers'
causal-LM loss shifts labels with `labels[..., 1:].contiguous()`, a view without a copy when
the batch is 1: s + 1 elements, b * s otherwise)."""
CHECK_B1 = (1, 5)
SEQ_UNIT = 8
"""Tokens per sequence multiple."""


def window_of(cfg: Any) -> int:
    """The sliding window (or attention chunk) that changes the code path of sequences the
    model takes; 0 when there is none."""
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", True):
        window = None
    # Llama 4's chunked attention cuts the same way (masking_utils.py::chunked_causal_mask).
    window = window or getattr(cfg, "attention_chunk_size", None)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if not isinstance(window, int) or window <= 0:
        return 0
    if limit and window >= limit:
        return 0  # never cuts a sequence the model takes
    return window


def sequence_unit(cfg: Any) -> int:
    """Tokens per traced sequence multiple past the window: 8, or one more than the sliding
    window, so that every traced sequence is longer than the window (the code path changes
    where the window starts to cut: sdpa gets an explicit mask). That regime holds from that
    length on; shorter sequences have their own (below_window)."""
    window = window_of(cfg)
    return max(SEQ_UNIT, window + 1) if window else SEQ_UNIT


def below_window(cfg: Any, device: str = "cpu") -> int:
    """The longest sequence of the regime below the window, traced at the ordinary unit; 0 when
    the model has no window or the window is too short to trace that regime (its check size,
    CHECK[1] units, must stay below it).

    The window itself is past: transformers 5.25 masking_utils.py::_ignore_causal_mask_sdpa
    returns False (sdpa gets an explicit mask) when `kv_length >= local_attention_size`, and
    create_sliding_window_causal_mask / create_chunked_causal_mask pass the window or chunk
    there; so the regime below holds up to window - 1 (tests/test_profile_regimes.py traces
    the window's own length and finds the past regime's tensors)."""
    window = window_of(cfg)
    unit = cuda.sequence_unit(SEQ_UNIT) if device == "cuda" else SEQ_UNIT
    if not window or CHECK[1] * unit > window - 1:
        return 0
    return window - 1


FAR = 512
"""A long sequence every profile's fit is also checked on (below max_position_embeddings):
code paths that change with the length past the traced sizes (a chunked linear-attention loop,
chunk 64, saves per chunk) make the fit fail there instead of extrapolating wrongly."""


def far_sequence(unit: int, limit: int) -> int:
    """The far check's sequence: FAR rounded up to a multiple of `unit`, or the longest
    multiple of `unit` the model takes when that is shorter; 0 when that is not past the
    ordinary check (CHECK)."""
    far = -(-FAR // unit) * unit
    if limit and far > limit:
        far = limit // unit * unit
    return far if far > CHECK[1] * unit else 0


def loop_chunk(model: Any) -> tuple[int, str]:
    """(chunk, where) of the chunked loop over the sequence a model's code runs, (0, "") when it
    has none: the int default of the `chunk_size` parameter of a function named *chunk* in the
    modeling module of one of the model's classes. transformers 5.25
    models/qwen3_5/modeling_qwen3_5.py::torch_chunk_gated_delta_rule (`chunk_size: int = 64`,
    its caller passes none; the same in qwen3_next, qwen3_5_moe, olmo_hybrid and others) pads
    the sequence to a multiple of the chunk and runs `for i in range(num_chunks)`, saving a
    recurrent state and a chunk of values per iteration: what it saves is linear in the
    sequence only over multiples of the chunk (a padded last chunk differs: a tiny
    qwen3_5_text's linear-attention layer, fp32, batch 2, saves 24,290,512 elements at 100
    tokens, where the fit over multiples of 128 gives 23,414,964).
    The function is wrapped by `@use_kernel_func_from_hub_with_fallback` (a Module whose
    `forward` wraps it: unwrapped here). Several such functions: the least common multiple."""
    found: dict[int, str] = {}
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        if module is None or not name.startswith("transformers.models."):
            continue
        for attr, obj in sorted(vars(module).items()):
            if "chunk" not in attr.lower() or isinstance(obj, type):
                continue
            fn = getattr(obj, "forward", obj)
            if not callable(fn):
                continue
            try:
                param = inspect.signature(inspect.unwrap(fn)).parameters.get("chunk_size")
            except (TypeError, ValueError):
                continue
            default = None if param is None else param.default
            if isinstance(default, int) and not isinstance(default, bool) and default > 1:
                found.setdefault(default, f"{name.rsplit('.', 1)[-1]}.py::{attr}")
    if not found:
        return 0, ""
    return math.lcm(*found), ", ".join(found[c] for c in sorted(found))


def chunked_unit(unit: int, chunk: int) -> int:
    """The traced sequence multiple of a model with a chunked loop of `chunk` tokens: `unit`
    rounded up to a multiple of 2 x chunk, so that every traced sequence (the fit's 1, 2 and 3
    units, its checks) is a whole number of chunks, two at least: a state carried from one
    chunk to the next in each (a single chunk carries none; on the tiny qwen3_5_text, fp32,
    it saves what the fit says, 14,627,328 elements at batch 2 x 64, but sequences below the
    traced ones are still noted as extrapolated)."""
    if not chunk:
        return unit
    return -(-unit // (2 * chunk)) * (2 * chunk)
