"""The sizes a profile is traced at (memplan.verify.trace.profile): the (batch, sequence) grid
its fit spans and the sizes it is checked on, and the sequence regimes of a model with a sliding
window or attention chunk (below the window at the ordinary unit, past it at multiples of
W + 1), and the unit of a model with a chunked loop over the sequence (loop_chunk)."""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
from typing import Any

from memplan.verify.trace import cuda
from memplan.verify.trace.notes import OWN_LOOP

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
    model takes; 0 when there is none. A multimodal config's text config holds it (Gemma 4:
    transformers 5.25 configuration_gemma4.py, `sliding_window` on Gemma4TextConfig only)."""
    text = getattr(cfg, "get_text_config", None)
    cfg = text(decoder=True) if callable(text) else cfg
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
    multiple of `unit` a model with `limit` positions (max_position_embeddings) takes when that
    is shorter; 0 when that is not past the ordinary check (CHECK). A model may take fewer
    tokens than `limit`: ProphetNet at most `limit` - 2 (transformers 5.25
    modeling_prophetnet.py::ProphetNetPositionalEmbeddings numbers the positions from
    padding_idx + 1, pad_token_id 0, and ProphetNetDecoder.forward looks up `position_ids + 1`
    for its predicting stream; a real tiny ProphetNetForCausalLM with 64 positions runs 62
    tokens and raises IndexError at 63: tests/test_trace_layers.py), so the far check stays
    two below it."""
    far = -(-FAR // unit) * unit
    if limit and far > limit - 2:
        far = (limit - 2) // unit * unit
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
    `forward` wraps it: unwrapped here). A loop a module's own forward runs (block_loops) is
    one more. Several such loops: the least common multiple."""
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
    for size, where in block_loops(model).items():
        found.setdefault(size, where)
    if not found:
        return 0, ""
    return math.lcm(*found), ", ".join(found[c] for c in sorted(found))


_LOOP_SIZES = ("block_size", "chunk_size")
"""The names of the module attributes a loop over blocks of the sequence steps by."""


@functools.cache
def _loop_attributes(cls: Any) -> tuple[str, ...]:
    """The attributes `self.<name>` (name ending in one of _LOOP_SIZES) read in the body of a
    `for` loop of `cls.forward`; () when its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return ()
    names = {
        node.attr
        for loop in ast.walk(tree)
        if isinstance(loop, ast.For)
        for stmt in loop.body
        for node in ast.walk(stmt)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.endswith(_LOOP_SIZES)
    }
    return tuple(sorted(names))


def block_loops(model: Any) -> dict[int, str]:
    """{block: where} of the loops over blocks of the sequence a module of the model runs in
    its own forward: a `for` loop whose body reads an int attribute (> 1) of the module named
    *block_size or *chunk_size. transformers 5.25 modeling_minimax.py::
    MiniMaxLightningAttention.forward: `num_blocks = (seq_len + self.block_size - 1) //
    self.block_size`, `for i in range(num_blocks)` slicing `i * self.block_size` tokens
    (`self.block_size = config.block_size`, 256 by default), saving per block its (block,
    block) attention weights and its inter-block state [b, heads, head_dim, head_dim]; the last
    block is as long as what remains (no padding), so what it saves is linear in the sequence
    only over the block's multiples (a tiny MiniMax, block 256, saves 7,192,580 elements in a
    linear-attention layer at batch 4 x 512 tokens where a fit over 8-24 tokens, one partial
    block, gives 9,089,028: the trace's far check). Of the modeling modules of transformers
    5.25 only esmfold's folding trunk has another such loop (`self.chunk_size`); no other
    language model's module does."""
    found: dict[int, str] = {}
    for module in model.modules():
        cls: Any = type(module)
        if not cls.__module__.startswith("transformers.models."):
            continue
        for attr in _loop_attributes(cls):
            size = getattr(module, attr, None)
            if isinstance(size, int) and not isinstance(size, bool) and size > 1:
                file = cls.__module__.rsplit(".", 1)[-1]
                found.setdefault(
                    size, f"{file}.py::{cls.__name__}.forward: {OWN_LOOP} over self.{attr} tokens"
                )
    return found


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
