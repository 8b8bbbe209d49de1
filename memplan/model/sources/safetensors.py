"""Reading the tensor table of a safetensors checkpoint from its headers only: an I/O edge.

The format (huggingface/safetensors README, "Format"): 8 bytes, `N`, a little-endian u64; then
`N` bytes of UTF-8 JSON mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin,
end]}` (offsets into the byte buffer that follows the header), plus an optional `__metadata__`
map of strings; then the tensor bytes. A sharded checkpoint adds `model.safetensors.index.json`,
whose `weight_map` names the shard file of every tensor.

Only the 8 + N header bytes of each file are read, with the standard library: a 671B-parameter
checkpoint's table costs a few megabytes of I/O, never its weights. Headers are checked as the
reference reader checks them (safetensors/src/tensor.rs, `SafeTensors::read_metadata`): the
length fits the file, the JSON is an object, every entry has a known dtype and a shape, and its
byte range lies inside the data section and matches numel x element width.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.precision import DTYPE_BYTES

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX = "model.safetensors.index.json"
DEFAULT_FILE = "model.safetensors"

# The u64 length prefix: `struct` format "<Q" (little-endian, unsigned, 8 bytes).
LENGTH_PREFIX = struct.Struct("<Q")

# The reference reader refuses longer headers (safetensors/src/tensor.rs: `MAX_HEADER_SIZE =
# 100_000_000`, error HeaderTooLarge); a larger claim means a damaged or foreign file.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype (safetensors/src/tensor.rs `enum Dtype`) -> memplan dtype name
# (memplan/precision.py `DTYPES`). Floating tensors' file dtype is storage only (training
# dtypes come from the precision recipe), so both 1-byte fp8 formats map to memplan's fp8.
# Dtypes with no memplan name (F64, I16, U16, U32, U64, C64, F8_E8M0, F4, F6_*, the FNUZ fp8
# variants) are refused by name.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "F8_E4M3": "fp8",
    "F8_E5M2": "fp8",
    "I64": "int64",
    "I32": "int32",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    name: str
    """The state-dict key."""
    shape: tuple[int, ...]
    """Shape in elements."""
    dtype: str
    """memplan dtype name of the stored data (`SAFETENSORS_DTYPES`)."""
    file_dtype: str
    """The dtype as the header writes it (`BF16`, `F8_E4M3`, ...)."""
    file: Path
    """The .safetensors file holding it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The tensor table of a checkpoint: one file, or the shards an index lists."""

    path: Path
    """What was given: a .safetensors file or a model.safetensors.index.json."""
    files: tuple[Path, ...]
    """The .safetensors files whose headers were read."""
    tensors: tuple[StoredTensor, ...]
    """Every tensor, in header order (file by file)."""
    header_bytes: int
    """Bytes read from disk: length prefixes plus JSON headers, over all files."""

    @property
    def directory(self) -> Path:
        """Where a config.json of the same model would sit."""
        return self.path.parent


def resolve_path(path: Path) -> Path:
    """A directory stands for its `model.safetensors.index.json` or `model.safetensors`."""
    if not path.is_dir():
        return path
    for name in (DEFAULT_INDEX, DEFAULT_FILE):
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.name.endswith((".safetensors", ".json")))
    listing = f" (it holds: {', '.join(found[:8])})" if found else ""
    raise MemplanError(
        f"{path} is a directory without {DEFAULT_INDEX} or {DEFAULT_FILE}{listing}; "
        "name the .safetensors file or its index."
    )


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensor table of `path`: a .safetensors file, an index .json, or their directory."""
    path = resolve_path(path)
    if path.name.endswith(".json"):
        return _read_index(path)
    tensors, header_bytes = read_header(path)
    return Checkpoint(path=path, files=(path,), tensors=tensors, header_bytes=header_bytes)


def read_header(path: Path) -> tuple[tuple[StoredTensor, ...], int]:
    """The tensors of one .safetensors file, and the bytes read; never the tensor data."""
    try:
        with path.open("rb") as f:
            file_bytes = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(LENGTH_PREFIX.size)
            if len(prefix) < LENGTH_PREFIX.size:
                raise _bad(path, f"the file is {file_bytes} bytes, shorter than the 8-byte length")
            (length,) = LENGTH_PREFIX.unpack(prefix)
            if length > MAX_HEADER_BYTES:
                raise _bad(
                    path,
                    f"the length prefix claims a {length:,}-byte header, over the format's "
                    f"limit of {MAX_HEADER_BYTES:,}",
                )
            if LENGTH_PREFIX.size + length > file_bytes:
                raise _bad(
                    path,
                    f"the length prefix claims a {length:,}-byte header but only "
                    f"{file_bytes - LENGTH_PREFIX.size:,} bytes follow it (truncated?)",
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise MemplanError(f"safetensors file not found: {path}") from None
    except IsADirectoryError:
        raise MemplanError(f"{path} is a directory, not a .safetensors file.") from None
    except OSError as err:
        raise MemplanError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad(path, "the header is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _bad(path, f"the header is not valid JSON ({err.msg} at byte {err.pos})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")
    data_bytes = file_bytes - LENGTH_PREFIX.size - length
    tensors = tuple(
        _entry(path, name, entry, data_bytes)
        for name, entry in header.items()
        if name != "__metadata__"
    )
    return tensors, LENGTH_PREFIX.size + length


def _entry(path: Path, name: str, entry: Any, data_bytes: int) -> StoredTensor:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name!r} is not an object")
    file_dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(file_dtype, str):
        raise _bad(path, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= data_bytes
    ):
        raise _bad(
            path,
            f"tensor {name!r}: data_offsets {offsets!r} do not lie inside the "
            f"{data_bytes:,}-byte data section (truncated?)",
        )
    dtype = SAFETENSORS_DTYPES.get(file_dtype)
    if dtype is None:
        raise MemplanError(
            f"{path}: tensor {name!r} has dtype {file_dtype}, which memplan does not model; "
            f"supported: {', '.join(SAFETENSORS_DTYPES)}. Give the model as hf_config or "
            "architecture instead."
        )
    stored_bytes = offsets[1] - offsets[0]
    expected_bytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if stored_bytes != expected_bytes:
        raise _bad(
            path,
            f"tensor {name!r}: {file_dtype} {shape} needs {expected_bytes:,} bytes but "
            f"data_offsets span {stored_bytes:,}",
        )
    return StoredTensor(
        name=name, shape=tuple(shape), dtype=dtype, file_dtype=file_dtype, file=path
    )


def _read_index(path: Path) -> Checkpoint:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemplanError(f"safetensors index not found: {path}") from None
    except json.JSONDecodeError as err:
        raise MemplanError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}; expected a "
            f"{DEFAULT_INDEX} with a weight_map."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise MemplanError(f"cannot read {path}: {err}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MemplanError(
            f"{path} has no weight_map (tensor name -> shard file); is it a "
            f"{DEFAULT_INDEX}? Give a .safetensors file instead."
        )
    shards = list(dict.fromkeys(weight_map.values()))
    by_name: dict[str, StoredTensor] = {}
    files: list[Path] = []
    header_bytes = 0
    for shard in shards:
        file = path.parent / shard
        if not file.is_file():
            raise MemplanError(f"{path} lists shard {shard}, which is not in {path.parent}.")
        tensors, read = read_header(file)
        files.append(file)
        header_bytes += read
        by_name.update((t.name, t) for t in tensors if weight_map.get(t.name) == shard)
    missing = [name for name in weight_map if name not in by_name]
    if missing:
        shown = ", ".join(f"{n} ({weight_map[n]})" for n in missing[:3])
        raise MemplanError(
            f"{path}: {len(missing)} tensors of the weight_map are not in their shard's "
            f"header, e.g. {shown}."
        )
    # Shard by shard, each in header order (the weight_map's order is arbitrary).
    ordered = sorted(by_name.values(), key=lambda t: files.index(t.file))
    return Checkpoint(
        path=path, files=tuple(files), tensors=tuple(ordered), header_bytes=header_bytes
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(path: Path, problem: str) -> MemplanError:
    return MemplanError(f"{path} is not a readable safetensors file: {problem}.")
