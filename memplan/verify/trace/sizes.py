"""The sizes a profile is traced at (memplan.verify.trace.profile): the (batch, sequence) grid
its fit spans and the sizes it is checked on, and the sequence regimes of a model with a sliding
window or attention chunk (below the window at the ordinary unit, past it at multiples of
W + 1), the unit of a model with a chunked loop or a padded chunked scan over the sequence
(loop_chunk, scan_chunk), and the regime below one such chunk (span)."""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from memplan.verify.trace import cuda
from memplan.verify.trace.notes import OWN_LOOP, SCAN

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
    `forward` wraps it: unwrapped here). A loop a module's own forward runs (block_loops) and a
    padded scan over a module's chunks (scan_chunks) are more. Several: the least common
    multiple."""
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
    for size, where in (*block_loops(model).items(), *scan_chunks(model).items()):
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


def scan_chunks(model: Any) -> dict[int, str]:
    """{chunk: where} of the padded chunked scans a model runs without a Python loop: a module
    holding an int `chunk_size` attribute (> 1) whose modeling module has a function named
    *chunk* that takes `chunk_size` without a default (its caller passes the module's own).
    transformers 5.25 modeling_mamba2.py::mamba2_chunk_scan(..., chunk_size: int, ...),
    called by mamba2_scan_forward with `chunk_size=module.chunk_size` (Mamba2Mixer.__init__:
    `self.chunk_size = config.chunk_size`, 256 by default), pads the sequence to a multiple of
    the chunk (`pad_size = (chunk_size - sequence_length % chunk_size) % chunk_size`) and
    computes the SSD over all chunks at once: segment_sum gives [b, h, c, l, l] and, between
    chunks, [b, h, c + 1, c + 1] tensors (c the number of chunks), so what it saves is a
    polynomial in the sequence only over the chunk's multiples (with s * s / chunk^2 terms),
    and constant in the padded tensors up to one chunk. The same scan (copied) in bamba,
    falcon_h1, granitemoehybrid, nemotron_h and zamba2 (`config.mamba_chunk_size` or
    `config.chunk_size`); of the modeling modules of transformers 5.25 no other has such a
    function (the *chunk_size_feed_forward attributes of BERT-like models are no chunk_size)."""
    found: dict[int, str] = {}
    for module in model.modules():
        cls: Any = type(module)
        size = getattr(module, "chunk_size", None)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 1:
            continue
        where = _required_chunk_functions(cls.__module__)
        if where:
            file = cls.__module__.rsplit(".", 1)[-1]
            found.setdefault(size, f"{file}.py::{where} over {cls.__name__}.chunk_size ({SCAN})")
    return found


@functools.cache
def _required_chunk_functions(name: str) -> str:
    """The first (by name) function of modeling module `name` named *chunk* whose `chunk_size`
    parameter has no default; "" when none (or `name` is not a transformers model's module)."""
    module = sys.modules.get(name)
    if module is None or not name.startswith("transformers.models."):
        return ""
    for attr, obj in sorted(vars(module).items()):
        if "chunk" not in attr.lower() or isinstance(obj, type) or not callable(obj):
            continue
        fn = getattr(obj, "forward", obj)
        try:
            param = inspect.signature(inspect.unwrap(fn)).parameters.get("chunk_size")
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is inspect.Parameter.empty:
            return attr
    return ""


@dataclass(frozen=True, slots=True)
class Span:
    """The sizes one sequence regime is traced at: sequences `start + m * unit` (GRID's and
    CHECK's multiples m), and what the document records of it."""

    start: int
    unit: int
    top: int = 0
    """fit.max_sequence: the longest sequence the regime describes; 0: no bound."""
    above: int = 0
    """fit.above_sequence: the regime describes sequences longer than this."""
    chunk: int = 0
    """The chunk whose multiples the regime is traced on (fit.sequence_multiple); 0: none."""
    edge: int = 0
    """A chunk's own length, the last sequence of the regime below it: the trace's far check,
    which keeps it in the regime where the fit holds there (a padded chunk: one chunk, no
    padding) and else bounds the regime one token below it, checked then at CHECK alone
    (transformers 5.25 modeling_xlstm.py::wrap_chunkwise_arbitrary_sequence_length runs the
    whole chunks chunkwise and the rest through a per-token loop: another code path at the
    chunk's own length; a check one token below would trace 63 steps of that loop)."""

    def sequence(self, multiple: int) -> int:
        return self.start + multiple * self.unit


def span(cfg: Any, chunk: int, device: str = "cpu", sequence: int | None = None) -> Span:
    """The regime `sequence` runs in, as traced sizes. A model's window W (window_of) and chunk C
    (loop_chunk) cut the sequences into ranges: up to W - 1 (below_window), up to C (one
    chunk, padded: transformers 5.25 modeling_qwen3_5.py::torch_chunk_gated_delta_rule and
    modeling_mamba2.py::mamba2_chunk_scan pad to a multiple of the chunk, so up to one chunk
    the padded tensors are constant in the sequence, the others linear), and past both. A
    bounded range is traced at the ordinary unit (8 tokens, 32 on device=cuda: multiples from
    the last multiple of the unit at or below the range's start, so every traced sequence is in
    it) where its checks fit in it (CHECK[1] units past its start), at multiples of 2 x C where
    it lies past the chunk (below a longer window); a range that does not fit is served by the
    next one (extrapolated). Past every bound, multiples of W + 1 rounded up to 2 x C
    (sequence_unit, chunked_unit), as every profile before; for `sequence` None that one with
    no lower bound."""
    base = cuda.sequence_unit(SEQ_UNIT) if device == "cuda" else SEQ_UNIT
    past = chunked_unit(sequence_unit(cfg), chunk)
    if device == "cuda":
        past = cuda.sequence_unit(past)
    if sequence is None:
        return Span(start=0, unit=past, chunk=chunk)
    window = window_of(cfg)
    bounds = sorted({b for b in (window - 1 if window else 0, chunk) if b > 0})
    low = above = 0
    for high in bounds:
        past_chunk = bool(chunk) and low >= chunk
        if past_chunk:
            unit = chunked_unit(base, chunk)
            unit = cuda.sequence_unit(unit) if device == "cuda" else unit
            start = 0
        else:
            unit, start = base, low // base * base
        fits = start + CHECK[1] * unit <= high
        if fits and sequence <= high:
            return Span(
                start=start,
                unit=unit,
                top=high,
                above=above,
                chunk=chunk if past_chunk else 0,
                edge=high if high == chunk else 0,
            )
        if fits:
            # a chunk's own length may fall past the regime below it (Span.edge): the next
            # regime starts one token below
            above = high - 1 if high == chunk else high
        low = high
    return Span(start=0, unit=past, above=above, chunk=chunk)
