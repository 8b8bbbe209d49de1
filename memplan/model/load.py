"""Reading model descriptions from disk: presets, config.json files, safetensors headers and the
local Hugging Face cache (never the network). The model side of the I/O edge in front of the
pure calculator; memplan.config.load reads the spec itself."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan.config.load import LoadedSpec
from memplan.config.spec import MODEL_SOURCES
from memplan.errors import MemplanError
from memplan.hardware import nearest
from memplan.model import sources as models
from memplan.model.families import family_of
from memplan.model.profile import Key as ProfileKey
from memplan.model.profile import Profile, config_hash, from_document
from memplan.model.sources import Inventory, TensorSpec

PRESET_DIR = Path(__file__).parent / "presets"
PROFILE_DIR = Path(__file__).parent / "profiles"
"""Activation profiles shipped with memplan (memplan.model.profile)."""

Unsupported = Callable[[Mapping[str, Any], str], Inventory]
"""`fallback(config, origin)`: the inventory of a config whose model_type no family serves
(the CLI passes memplan.verify.trace.fallback_inventory, which builds it with transformers)."""


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


def load_inventory(loaded: LoadedSpec, *, unsupported: Unsupported | None = None) -> Inventory:
    """The model's tensor inventory from whichever source the spec names, with the activation
    profiles stored for its config when its family has no saved-tensor rule.

    A config whose model_type has no family goes to `unsupported` when given (else
    memplan.model.sources.from_config says the model_type is not supported).
    """
    inventory = _load_inventory(loaded, unsupported)
    if inventory.architecture is not None:
        # Every config looks for its stored profiles: a model_type with no rule reads them,
        # and a ruled one where its rule does not cover a setting or a head (memplan.
        # activations.predict, rule_refuses; a ruled family's rule covers language-model heads)
        config = model_config(loaded)
        found = find_profiles(config) if config is not None else ()
        if found:
            inventory = replace(inventory, profiles=found)
    return inventory


def model_config(loaded: LoadedSpec) -> dict[str, Any] | None:
    """The config.json mapping the spec's model comes from, or None (a parameter count or a
    safetensors checkpoint)."""
    model = loaded.spec.model
    base = loaded.path.parent if loaded.path else Path.cwd()
    try:
        if model.architecture is not None:
            return dict(model.architecture)
        if model.preset is not None:
            file = PRESET_DIR / f"{model.preset}.json"
            return _config_object(file, what="preset") if file.is_file() else None
        if model.hf_id is not None:
            return _config_object(hf_cache_config(model.hf_id), what="config.json")
        if model.hf_config is not None:
            file = model.hf_config if model.hf_config.is_absolute() else base / model.hf_config
            return _config_object(file, what="hf_config")
    except MemplanError:
        return None  # _load_inventory reports it, with the spec's line
    return None


def profile_dirs() -> tuple[Path, ...]:
    """Where profiles are looked up: the user's cache ($MEMPLAN_CACHE/profiles, else
    ~/.cache/memplan/profiles), then the ones shipped with memplan."""
    return (cache_dir(), PROFILE_DIR)


def cache_dir() -> Path:
    root = os.environ.get("MEMPLAN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "memplan"
    return base / "profiles"


TENSOR_PARALLEL_DIR = "tensor-parallel"
"""The subfolder of a profile folder holding the profiles of TP rank slices (Key.tensor > 1):
apart, so that a memplan reading profiles without `tensor` never takes one for the whole
model's."""


def profile_file(folder: Path, key: ProfileKey) -> Path:
    """Where a profile with `key` is stored in `folder`."""
    sub = folder / TENSOR_PARALLEL_DIR if key.tensor > 1 else folder
    return sub / f"{key.file_stem()}.json"


def find_profiles(config: dict[str, Any]) -> tuple[Profile, ...]:
    """Every stored profile traced from this config (any recipe, kernel, checkpointing, TP
    slice)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return ()
    stem = f"{model_type}-{config_hash(config)[:12]}-"
    found: dict[str, Profile] = {}
    folders = (f for base in profile_dirs() for f in (base, base / TENSOR_PARALLEL_DIR))
    for folder in folders:
        if not folder.is_dir():
            continue
        for file in sorted(folder.glob(stem + "*.json")):
            doc = from_document(read_json(file, what="profile"), origin=str(file))
            if doc.key.config_hash == config_hash(config):
                found.setdefault(doc.key.file_stem(), doc)  # the cache wins over shipped ones
    return tuple(found.values())


def find_inventory(config: Mapping[str, Any]) -> Inventory | None:
    """The stored inventory of this config (memplan.model.stored), from the user's cache or
    shipped with memplan, or None."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    from memplan.model import stored

    digest = config_hash(config)
    for folder in profile_dirs():
        file = folder / stored.file_name(model_type, digest)
        if file.is_file():
            doc = read_json(file, what="stored inventory")
            if isinstance(doc, dict) and doc.get("config_hash") == digest:
                return stored.from_document(doc, origin=str(file))
    return None


def _load_inventory(loaded: LoadedSpec, unsupported: Unsupported | None) -> Inventory:
    model = loaded.spec.model
    base = loaded.path.parent if loaded.path else Path.cwd()

    def from_config(config: Mapping[str, Any], origin: str) -> Inventory:
        model_type = config.get("model_type")
        if isinstance(model_type, str) and not family_of(model_type):
            kept = find_inventory(config)  # stored beside the profiles: no torch
            if kept is not None:
                return kept
        if unsupported is not None and isinstance(model_type, str) and not family_of(model_type):
            return unsupported(config, origin)
        return models.from_config(config, origin=origin)

    try:
        if model.num_parameters is not None:
            return models.from_parameter_count(model.num_parameters)
        if model.architecture is not None:
            return from_config(model.architecture, "model.architecture")
        if model.preset is not None:
            file = PRESET_DIR / f"{model.preset}.json"
            if not file.is_file():
                raise MemplanError(
                    f"unknown preset {model.preset!r}{nearest(model.preset, presets())}; "
                    f"shipped: {', '.join(presets())}.",
                    field="model.preset",
                )
            return from_config(read_json(file, what="preset"), f"preset {model.preset}")
        if model.safetensors is not None:
            path = model.safetensors
            return load_checkpoint(path if path.is_absolute() else base / path)
        if model.hf_id is not None:
            file = hf_cache_config(model.hf_id)
            return from_config(_config_object(file, what="config.json"), str(file))
        assert model.hf_config is not None  # the spec guarantees exactly one source
        file = model.hf_config if model.hf_config.is_absolute() else base / model.hf_config
        return from_config(_config_object(file, what="hf_config"), str(file))
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
    from memplan.model.sources import safetensors as safetensors_header

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
