"""`memplan estimate` imports what the spec needs and nothing else (issue 21: "within 1.5x the
import floor: lazy imports, no work at import time").

Each case runs the CLI in a fresh interpreter and reads `sys.modules` afterwards: the tests
check which modules a command imported, never how long anything took (the timing is
benchmarks/estimate_speed.py, measured beside the floor; benchmarks/results/estimate-speed.json).
An engine, a family, another stack's rules, the pipeline and model-parallel activations, the
`--json` document models and rich's tables are each imported only by the spec or the output
that needs them; torch and transformers never.

The oracle is the spec itself: it names the model type, the engine, the model code and the
layout, so which rule modules a correct run needs is known without running memplan (each case
also checks that the modules it needs were imported, so that a run which imported nothing
cannot pass).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = """
import contextlib, io, json, sys
from memplan.cli.app import app
code = 0
try:
    with contextlib.redirect_stdout(io.StringIO()):
        app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

HEAVY = ("torch", "transformers", "peft", "matplotlib", "numpy", "safetensors")
"""Third-party packages `estimate` never imports (verify, profile and --plot do)."""

FAMILY_HELPERS = {"record", "_decoder", "_llama_decoder", "_classic", "_siglip"}
"""memplan.model.families modules that are building blocks, not one family's record."""


def imported(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after `memplan ARGV` (its exit code checked)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["code"] == 0, proc.stderr
    return set(doc["modules"])


def under(modules: set[str], package: str) -> set[str]:
    """The direct children of `package` in `modules` (`a.b.c` counts as `c` under `a.b`)."""
    prefix = package + "."
    return {m[len(prefix) :].split(".")[0] for m in modules if m.startswith(prefix)}


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


# (spec, --json?, the family module its model_type needs, the engine, the stack's rule or None)
CASES = [
    ("llama-3-8b.yaml", True, "llama", "deepspeed", None),
    ("llama-3-8b.yaml", False, "llama", "deepspeed", None),
    ("mistral-7b.yaml", True, "llama", "fsdp2", None),
    ("mixtral-8x7b.yaml", True, "mixtral", "deepspeed", None),
    ("plan-llama-3.1-8b-torchtitan.yaml", True, "llama", "ddp", "torchtitan"),
]


# A stack's rules: torchtitan's dense blocks share one module with its MoE and MLA halves'
# checks (memplan.model.stacks.torchtitan imports both, a few small pure modules), its
# activation checkpointing and its compiled blocks (torchtitan_ac, torchtitan_compile: split
# out of torchtitan, which imports both at the top as it imported their code before).
STACK_MODULES: dict[str | None, set[str]] = {
    "torchtitan": {
        "torchtitan",
        "torchtitan_ac",
        "torchtitan_compile",
        "torchtitan_moe",
        "torchtitan_mla",
    },
}


@pytest.mark.parametrize(("spec", "as_json", "family", "engine", "stack"), CASES)
def test_estimate_imports_only_what_the_spec_needs(
    spec: str, as_json: bool, family: str, engine: str, stack: str | None
) -> None:
    modules = imported("estimate", f"configs/{spec}", *(["--json"] if as_json else []))
    assert not top_level(modules) & set(HEAVY), sorted(top_level(modules) & set(HEAVY))
    # One family: the one the config.json model_type names (memplan.model.families.REGISTRY).
    assert under(modules, "memplan.model.families") - FAMILY_HELPERS == {family}
    # One engine: the spec's (memplan.states.engines.STEPS imports it on lookup).
    engines = {"ddp", "fsdp2", "deepspeed", "megatron"}
    assert under(modules, "memplan.states.engines") & engines == {engine}
    # Another stack's rules only under its model.implementation; no pipeline / model-parallel
    # activations for these data-parallel layouts.
    assert under(modules, "memplan.model.stacks") == STACK_MODULES.get(stack, set())
    assert under(modules, "memplan.activations") <= {
        "lora",
        "lora_flow",
        "lora_scope",
        "per_gpu",  # one GPU of the layout: the package's two halves, always
        "saved",
    }
    # The plan search, traced inventories, checkpoint headers: other commands' and specs'.
    assert not under(modules, "memplan.plan")
    for module in (
        "memplan.model.stored",
        "memplan.model.sources.checkpoint",
        "memplan.model.sources.safetensors",
        "memplan.model.sources.counts",
        "memplan.verify.trace.meta",
        # the installed transformers' version is read from its metadata headers
        # (memplan.config.load.installed_version), not parsed by the email package
        "email.parser",
    ):
        assert module not in modules, module
    # The output: the --json document models, or rich's tables, never both.
    if as_json:
        # no document model: the document is built as plain dicts (memplan.report.json.
        # estimate_json; tests/test_json_fast.py proves it equal to the models' dump)
        assert "memplan.report.json" in modules
        assert "memplan.report.schema" not in modules
        assert "rich" not in top_level(modules)
        assert not under(modules, "memplan.cli") - {"app", "entry", "run"}
    else:
        assert "memplan.report.schema" not in modules
        assert {"rich.table", "memplan.cli.estimate_view"} <= modules
        # the console renders no emoji codes (memplan.cli.render.console): rich's table of
        # 3,600 of them is never loaded
        assert "rich._emoji_codes" not in modules


MAIN_IMPORTS = """
import contextlib, io, json, sys
from memplan.cli.entry import main
sys.argv = ["memplan", *sys.argv[1:]]
code = 0
try:
    with contextlib.redirect_stdout(io.StringIO()):
        main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("as_json", [True, False])
def test_a_plain_estimate_never_imports_typer(as_json: bool) -> None:
    """`main` (the console script) runs `memplan estimate SPEC [--json]` without typer or its
    click (memplan.cli.entry): typer's import and its commands were a ninth of the start."""
    flags = ["--json"] if as_json else []
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_IMPORTS, "estimate", "configs/mistral-7b.yaml", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["code"] == 0, proc.stderr
    modules = set(doc["modules"])
    assert not top_level(modules) & {"typer", "click", "shellingham"}, sorted(modules)
    assert "memplan.cli.app" not in modules
    assert "memplan.states.engines.fsdp2" in modules  # it did estimate


def test_importing_the_registries_imports_no_family_or_engine() -> None:
    """The packages that hold the rules are registries: importing them (as every command does)
    imports no family, engine or stack module."""
    code = (
        "import json, sys\n"
        "import memplan.cli.app, memplan.model.families, memplan.states.engines, "
        "memplan.model.stacks, memplan.activations\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    modules = set(json.loads(proc.stdout))
    assert under(modules, "memplan.model.families") == {"record"}
    assert under(modules, "memplan.states.engines") == {"base"}
    assert under(modules, "memplan.model.stacks") == set()
    assert not top_level(modules) & {*HEAVY, "rich"}


MAIN_PROBE = """
import gc, json, os, sys
from memplan.cli.app import main
sys.argv = ["memplan", *sys.argv[1:]]
seen = {}
import memplan.cli.app as cli
real = cli.app
def app():  # what the command sees
    seen["plugins"] = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
    seen["gc_at_start"] = gc.isenabled()
    real()
cli.app = app
try:
    main()
except SystemExit:
    pass
seen["gc_after"] = gc.isenabled()
seen["plugins_after"] = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
print(json.dumps(seen))
"""


def main_probe(*argv: str, env: dict[str, str] | None = None) -> dict[str, object]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    proc = subprocess.run(
        [sys.executable, "-c", MAIN_PROBE, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**environ, **(env or {})},
    )
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_main_runs_commands_without_plugins_or_the_cyclic_collector() -> None:
    """`main` (the console script and `python -m memplan`) turns pydantic's plugins off for the
    command and leaves the environment as it found it; the cyclic collector stays off."""
    seen = main_probe("schema", "estimate")
    assert seen == {"plugins": "1", "gc_at_start": False, "gc_after": False, "plugins_after": None}


def test_main_keeps_the_users_plugin_setting() -> None:
    seen = main_probe("schema", "estimate", env={"PYDANTIC_DISABLE_PLUGINS": ""})
    assert seen["plugins"] == "" and seen["plugins_after"] == ""


def test_verify_turns_the_cyclic_collector_back_on() -> None:
    """verify measures memory that cyclic garbage would hold: it runs with the collector on
    (checked on its cheapest path, a refused --device)."""
    seen = main_probe("verify", "configs/gpt2.yaml", "--device", "tpu")
    assert seen["gc_after"] is True


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_estimates_without_torch(spec: str, tmp_path: Path) -> None:
    # A rule or a stored profile serves every shipped config: estimate traces nothing (a
    # trace imports torch), with an empty profile cache.
    env = {**os.environ, "MEMPLAN_CACHE": str(tmp_path)}
    modules = imported("estimate", f"configs/{spec}", "--json", env=env)
    assert not top_level(modules) & set(HEAVY), sorted(top_level(modules) & set(HEAVY))
    assert "memplan.verify.trace.profile" not in modules
