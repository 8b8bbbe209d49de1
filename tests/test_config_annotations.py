"""The spec's pydantic models keep their annotations as objects, not postponed strings
(memplan/config/base.py says why: pydantic compiles and evaluates each string when the class is
made, in every `memplan estimate`).

The oracle is Python's own record of each class body, `cls.__annotations__`: a module with
`from __future__ import annotations` stores every annotation there as a string."""

from __future__ import annotations

import importlib

import pytest
from pydantic import BaseModel

MODULES = ("base", "spec", "parallelism", "finetune", "machine", "plan")


@pytest.mark.parametrize("name", MODULES)
def test_spec_models_annotations_are_evaluated_objects(name: str) -> None:
    module = importlib.import_module(f"memplan.config.{name}")
    models = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == module.__name__
    ]
    assert models, name  # every module listed defines at least one model
    for model in models:
        own = model.__dict__.get("__annotations__", {})
        strings = sorted(k for k, v in own.items() if isinstance(v, str))
        assert not strings, f"{model.__name__}: postponed annotations {strings}"
