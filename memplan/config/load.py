"""Reading specs and model files from disk: the I/O edge in front of the pure calculator.

YAML is parsed with `yaml.SafeLoader` (no tags that construct objects), keeping each node's
line so that a validation error names `file:line: field`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from memplan import versions
from memplan.config.spec import MODEL_SOURCES, Spec
from memplan.errors import MemplanError
from memplan.hardware import nearest
from memplan.model import sources as models
from memplan.model.sources import Inventory, TensorSpec
from memplan.model.sources import safetensors as safetensors_header

PRESET_DIR = Path(__file__).parent.parent / "model" / "presets"
Marks = dict[tuple[Any, ...], int]


@dataclass(frozen=True, slots=True)
class LoadedSpec:
    spec: Spec
    path: Path | None
    marks: Marks
    """Spec key path -> 1-based YAML line."""

    def where(self, *path: Any) -> str | None:
        """`file:line` of the deepest node on `path` that exists."""
        return locate(self.path, self.marks, path)


def locate(file: Path | None, marks: Marks, path: tuple[Any, ...]) -> str | None:
    """`file:line` of the deepest node of `path` that the YAML has."""
    if file is None:
        return None
    for end in range(len(path), -1, -1):
        line = marks.get(tuple(path[:end]))
        if line is not None:
            return f"{file}:{line}"
    return str(file)


# A spec is a few hundred YAML nodes. Aliases share nodes, so a small file can stand for an
# enormous tree ("billion laughs": 9 aliases of 9 aliases of ...); everything that walks the
# values (validation, error messages that print a value) would expand it. Refuse a document
# whose expanded tree exceeds this many nodes, and one that is nested deeper than Python's
# recursion limit lets the parser go (`[[[[...]]]]`).
MAX_EXPANDED_NODES = 10_000


def _parse_yaml(text: str, where: str) -> tuple[Any, Marks]:
    try:
        # The reader refuses control characters (a NUL, ...) as the loader is made.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as err:
        raise MemplanError(f"not valid YAML: {err}", where=where) from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, where)
            _check_duplicates(node, where)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = err.problem or "malformed YAML"
        raise MemplanError(f"not valid YAML: {problem}.", where=f"{where}{line}") from None
    except yaml.YAMLError as err:
        raise MemplanError(f"not valid YAML: {err}", where=where) from None
    except RecursionError:
        raise MemplanError("not valid YAML: nested too deeply.", where=where) from None
    except (ValueError, OverflowError) as err:
        # SafeConstructor's int()/float()/date() on a scalar it cannot hold, e.g. an integer
        # of more than 4,300 digits or `!!timestamp 2024-13-01`.
        raise MemplanError(
            f"not valid YAML: a value cannot be read ({err}).", where=where
        ) from None
    finally:
        loader.dispose()
    marks: Marks = {}
    seen: set[int] = set()

    def walk(n: yaml.Node, path: tuple[Any, ...]) -> None:
        marks.setdefault(path, n.start_mark.line + 1)
        if id(n) in seen:  # an alias: walk each node once (no exponential blow-up)
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    marks.setdefault((*path, key.value), key.start_mark.line + 1)
                    walk(value, (*path, key.value))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return data, marks


def _check_duplicates(root: yaml.Node, where: str) -> None:
    """Refuse a mapping that names a key twice: PyYAML keeps the last silently
    (SafeConstructor.construct_mapping), so a spec would say one thing and run another. A merge
    key (`<<: *base`) overriding base's keys is not a duplicate."""
    seen: set[int] = set()

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in n.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if name in first:
                        dotted = ".".join((*path, str(name)))
                        raise MemplanError(
                            f"duplicate key {dotted!r} (first at line {first[name]}); YAML "
                            "would keep the last silently: give each key once.",
                            where=f"{where}:{line}",
                        )
                    first[name] = line
                walk(value, (*path, str(name)))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, str(i)))

    walk(root, ())


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse alias cycles and documents whose aliases expand past MAX_EXPANDED_NODES.

    Each node's expanded size is computed once (memoized by identity), so the check is linear
    in the file however many times the aliases multiply it.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        line = f"{where}:{n.start_mark.line + 1}"
        if key in open_nodes:
            raise MemplanError(
                "not valid YAML: an alias refers to a node that holds it.", where=line
            )
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        elif isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                raise MemplanError(
                    f"not valid YAML: its aliases expand it to more than "
                    f"{MAX_EXPANDED_NODES:,} values (an alias bomb?); write the values out.",
                    where=line,
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the spec section at `loc` (for did-you-mean)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _describe(err: Mapping[str, Any], file: Path | None, marks: Marks) -> str:
    raw = tuple(err["loc"])
    # Drop the model-class tags pydantic puts in union locations; an unknown key is the
    # user's own (it may be capitalised), so the last part of its location always stays.
    cut = len(raw) - 1 if err["type"] == "extra_forbidden" else len(raw)
    loc = tuple(p for p in raw[:cut] if not (isinstance(p, str) and p[:1].isupper())) + raw[cut:]
    dotted = ".".join(str(p) for p in loc) or "spec"
    where = locate(file, marks, loc)
    prefix = f"{where}: " if where else ""
    if err["type"] == "extra_forbidden":
        valid = _field_names(Spec, loc[:-1])
        hint = nearest(str(loc[-1]), valid)
        return f"{prefix}{dotted}: unknown key{hint}; valid keys here: {', '.join(valid)}."
    message = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    return f"{prefix}{dotted}: {message}{shown}."


def validate(data: Any, *, path: Path | None = None, marks: Marks | None = None) -> LoadedSpec:
    """Validate a parsed spec into a frozen `Spec`, naming `file:line: field` on error."""
    loaded_marks = marks or {}
    if not isinstance(data, dict):
        raise MemplanError(
            "a spec is a YAML mapping with at least a `model:` section.",
            where=str(path) if path else None,
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        lines = list(dict.fromkeys(_describe(e, path, loaded_marks) for e in err.errors()))
        raise MemplanError("\n".join(lines)) from None
    if spec.model.transformers_version is None:
        model = spec.model.model_copy(update={"transformers_version": transformers_version()})
        spec = spec.model_copy(update={"model": model})
    return LoadedSpec(spec, path, loaded_marks)


def installed_version(distribution: str) -> str | None:
    """The installed version of a package, from its metadata (the package is not imported),
    or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def transformers_version() -> str:
    """The transformers release a spec without `model.transformers_version` runs under: the
    installed one (major.minor) when memplan has rules for it or a newer one, else the
    release the rules describe (memplan.versions.RULES_TRANSFORMERS)."""
    found = installed_version("transformers")
    try:
        version = versions.major_minor(found) if found else None
    except ValueError:
        version = None
    if version is None or versions.parse(version) < versions.parse(versions.OLDEST_TRANSFORMERS):
        return versions.RULES_TRANSFORMERS
    return version


@contextmanager
def locating(loaded: LoadedSpec) -> Iterator[None]:
    """Name the YAML line of the field a calculator error is about (`precision.fp8` ->
    `spec.yaml:3`), for errors raised after validation."""
    try:
        yield
    except MemplanError as err:
        if err.where or not err.field:
            raise
        raise err.located(where=loaded.where(*err.field.split("."))) from None


def load_spec(path: Path) -> LoadedSpec:
    """Read and validate a spec file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MemplanError(f"no such spec file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MemplanError(f"cannot read spec file {path}: {err}") from None
    data, marks = _parse_yaml(text, str(path))
    return validate(data, path=path, marks=marks)


def read_json(path: Path, *, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemplanError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as err:
        raise MemplanError(
            f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise MemplanError(f"cannot read {what} {path}: {err}") from None


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_inventory(loaded: LoadedSpec) -> Inventory:
    """The model's tensor inventory from whichever source the spec names."""
    model = loaded.spec.model
    base = loaded.path.parent if loaded.path else Path.cwd()
    try:
        if model.num_parameters is not None:
            return models.from_parameter_count(model.num_parameters)
        if model.architecture is not None:
            return models.from_config(model.architecture, origin="model.architecture")
        if model.preset is not None:
            file = PRESET_DIR / f"{model.preset}.json"
            if not file.is_file():
                raise MemplanError(
                    f"unknown preset {model.preset!r}{nearest(model.preset, presets())}; "
                    f"shipped: {', '.join(presets())}.",
                    field="model.preset",
                )
            return models.from_config(
                read_json(file, what="preset"), origin=f"preset {model.preset}"
            )
        if model.safetensors is not None:
            path = model.safetensors
            return load_checkpoint(path if path.is_absolute() else base / path)
        if model.hf_id is not None:
            file = hf_cache_config(model.hf_id)
            return models.from_config(_config_object(file, what="config.json"), origin=str(file))
        assert model.hf_config is not None  # the spec guarantees exactly one source
        file = model.hf_config if model.hf_config.is_absolute() else base / model.hf_config
        return models.from_config(_config_object(file, what="hf_config"), origin=str(file))
    except MemplanError as err:
        # Config errors name their origin (file or model.architecture) and key in the message.
        source = next(k for k in MODEL_SOURCES if getattr(model, k) is not None)
        where = loaded.where("model", source, err.field or "")
        raise MemplanError(err.message, where=where) from None


def _config_object(file: Path, *, what: str) -> dict[str, Any]:
    config = read_json(file, what=what)
    if not isinstance(config, dict):
        raise MemplanError(f"{file} is not a config.json object.")
    return config


def load_checkpoint(path: Path) -> Inventory:
    """The inventory of a safetensors checkpoint, from its headers (and a config.json beside)."""
    checkpoint = safetensors_header.read_checkpoint(path)
    config_file = checkpoint.directory / "config.json"
    config = _config_object(config_file, what="config.json") if config_file.is_file() else None
    inventory = models.from_tensors(
        [TensorSpec(t.name, t.shape, dtype=t.dtype) for t in checkpoint.tensors],
        name=f"{checkpoint.directory.name}/{checkpoint.path.name}",
        config=config,
        origin=str(config_file),
    )
    files = len(checkpoint.files)
    read = (
        f"read {checkpoint.header_bytes:,} header bytes of {files} safetensors "
        f"file{'s' * (files > 1)}, no weights."
    )
    return replace(inventory, notes=(read, *inventory.notes))


def hf_hub_cache() -> tuple[Path, str]:
    """The local Hugging Face hub cache and the setting that named it.

    The order of huggingface_hub/constants.py (v0.20 to 1.x): HF_HUB_CACHE, the legacy
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
    """
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return _expand(env[key]), f"${key}"
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"]) / "hub", "$HF_HOME/hub"
    if env.get("XDG_CACHE_HOME"):
        return _expand(env["XDG_CACHE_HOME"]) / "huggingface" / "hub", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "huggingface" / "hub", "the default"


def _expand(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def hf_cache_config(repo_id: str) -> Path:
    """config.json of `repo_id` in the local Hugging Face cache; never the network.

    Cache layout (huggingface_hub/file_download.py, "cache structure"): `models--{org}--{name}/
    refs/main` holds the commit of the main branch, `snapshots/{commit}/config.json` the file.
    Without refs/main the newest snapshot that has a config.json is used.
    """
    cache, named_by = hf_hub_cache()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    fix = (
        f"download it with `hf download {repo_id} config.json` (or `huggingface-cli download`), "
        "or give the file as model.hf_config."
    )
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        file = repo / "snapshots" / commit / "config.json"
        if file.is_file():
            return file
        raise MemplanError(
            f"{repo_id} is not in the local Hugging Face cache: refs/main points at {commit}, "
            f"but {file} does not exist (cache from {named_by}); {fix}"
        )
    snapshots = repo / "snapshots"
    found = [d / "config.json" for d in snapshots.glob("*") if (d / "config.json").is_file()]
    if not found:
        raise MemplanError(
            f"{repo_id} is not in the local Hugging Face cache: no config.json under "
            f"{snapshots} (cache from {named_by}); {fix}"
        )
    return max(found, key=lambda f: f.parent.stat().st_mtime)
