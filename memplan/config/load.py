"""Reading a spec from disk: the I/O edge in front of the pure calculator (memplan.model.load
reads the model files it names).

YAML is parsed with `yaml.SafeLoader` (no tags that construct objects), keeping each node's
line so that a validation error names `file:line: field`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from memplan import versions
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.hardware import nearest

Marks = dict[tuple[Any, ...], int]


# eq=False: compared by identity, never by value (see memplan/report/result.py)
@dataclass(frozen=True, slots=True, eq=False)
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


def _named_field(loc: tuple[Any, ...], message: str) -> tuple[Any, ...]:
    """Where a check across fields points: pydantic locates a model validator's error at its
    section (or at the whole spec), but its message starts with the key it is about
    (`finetune.stable_embedding is LitGPT's ...`, `activation_offload moves ...`), whose line
    is the one to show. That key's location under `loc` (or from the spec's root), when the
    section has such a field; `loc` itself otherwise."""
    if not _field_names(Spec, loc):
        return loc  # an error of a field itself, not of a section
    parts = tuple(message.split(" ", 1)[0].split("."))
    for base in (loc, ()):
        path = (*base, *parts)
        if path[-1] in _field_names(Spec, path[:-1]):
            return path
    return loc


def _describe(err: Mapping[str, Any], file: Path | None, marks: Marks) -> str:
    raw = tuple(err["loc"])
    # Drop the model-class tags pydantic puts in union locations; an unknown key is the
    # user's own (it may be capitalised), so the last part of its location always stays.
    cut = len(raw) - 1 if err["type"] == "extra_forbidden" else len(raw)
    loc = tuple(p for p in raw[:cut] if not (isinstance(p, str) and p[:1].isupper())) + raw[cut:]
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        loc = _named_field(loc, message)
    dotted = ".".join(str(p) for p in loc) or "spec"
    where = locate(file, marks, loc)
    prefix = f"{where}: " if where else ""
    if err["type"] == "extra_forbidden":
        valid = _field_names(Spec, loc[:-1])
        hint = nearest(str(loc[-1]), valid)
        return f"{prefix}{dotted}: unknown key{hint}; valid keys here: {', '.join(valid)}."
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    named = "" if message.startswith(f"{dotted} ") else f"{dotted}: "  # said once
    return f"{prefix}{named}{message}{shown}."


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
    or None when it is not installed: importlib.metadata.version's answer.

    importlib.metadata.version parses the whole metadata file with the email package
    (importlib/metadata/__init__.py::Distribution.metadata, Python 3.11: `METADATA`, else
    `PKG-INFO`, else the egg-info file itself): for transformers 5.25.0 a 27 kB file, most of
    it the README after the headers, 2 ms of CPU in every `memplan estimate` whose spec gives
    no `model.transformers_version` (measured on the 2-core machine, email.parser's import
    included). `Version` is one of the headers, which end at the first blank line (the core
    metadata specification, packaging.python.org), so only they are read here; a file whose
    headers hold no `Version:` goes to importlib.metadata's own parse.
    tests/test_config_installed_version.py holds it to importlib.metadata.version for every
    installed distribution."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    text = found.read_text("METADATA") or found.read_text("PKG-INFO") or found.read_text("")
    version = _header(text or "", "version")
    return version if version is not None else found.version


def _header(text: str, name: str) -> str | None:
    """The first `name:` header of an RFC 822 header block (`name` lower-case), or None; its
    value as the email package's compat32 policy returns it (email/_policybase.py::
    Compat32.header_source_parse: leading blanks dropped; folded lines are not looked at, a
    version is never folded)."""
    for line in text.splitlines():
        if not line.strip():
            return None  # the headers end here
        key, colon, value = line.partition(":")
        if colon and key.lower() == name:
            return value.lstrip(" \t")
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
