"""The `--json` documents of `estimate`, `plan`, `verify` and `inventory`, defined once, as typed
models, one module per document (on base's `Doc`), so that a command imports only its own.

The producers build these models and dump them: `memplan.report.json.estimate_json` and
`memplan.plan.json.plan_json` (from a Report and a PlanResult) and
`memplan.verify.result.to_json`, so a document's keys, their order and their types are the
fields of these modules. `memplan schema NAME` prints the JSON Schema of each (draft 2020-12),
`scripts/gen_docs.py` writes the same schemas to docs/schema/ and the field tables to
docs/json.md, and tests/test_schema.py validates real outputs against them. Building a model
validates it (strict: no coercion, unknown keys refused). All sizes are integer bytes.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from memplan.report.schema.base import JSON_SCHEMA_DIALECT, Doc

COMMANDS: dict[str, str] = {
    "estimate": "EstimateReport",
    "plan": "PlanReport",
    "verify": "VerifyReport",
    "inventory": "InventoryReport",
}
"""Command -> the model of its `--json` document, in memplan.report.schema.<command>."""


def documents() -> dict[str, type[Doc]]:
    """Command -> the model of its `--json` document (every module imported)."""
    return {
        command: getattr(import_module(f"memplan.report.schema.{command}"), model)
        for command, model in COMMANDS.items()
    }


def json_schema(command: str) -> dict[str, Any]:
    """The JSON Schema of `memplan COMMAND --json` (draft 2020-12)."""
    model = documents()[command]
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        **model.model_json_schema(),
    }
