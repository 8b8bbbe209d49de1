"""Write a stored inventory (memplan.model.stored): the inventory transformers builds on the meta
device (memplan.verify.trace.meta), kept as JSON beside the activation profiles so that
`estimate` reads it without importing torch. `memplan profile` writes one for every model_type
without a hand-written family; benchmarks/flagships.py writes the shipped ones."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memplan.model import stored
from memplan.model.profile import config_hash


def document(config: Mapping[str, Any]) -> dict[str, Any]:
    """The stored-inventory document of `config` (a config.json mapping)."""
    import torch
    import transformers

    from memplan.verify.trace.meta import inventory_from_config

    digest = config_hash(config)  # before transformers edits nested values of its copy
    inventory = inventory_from_config(copy.deepcopy(dict(config)), origin="config")
    return stored.to_document(
        inventory,
        config_hash=digest,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )


def write(config: Mapping[str, Any], folder: Path) -> Path:
    """Write the stored inventory of `config` into `folder`; its path."""
    doc = document(config)
    path = folder / stored.file_name(str(config["model_type"]), doc["config_hash"])
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    return path
