"""Record the `--json` of every spec memplan answers, and compare a later tree against it.

A refactor must not change a byte of the public contract. `record DIR` captures:
- the `estimate --json`, `inventory --json` and `plan --json` of every shipped config (the CLI,
  in a subprocess), and
- every spec the test suite estimates or plans: the suite runs in-process with
  `memplan`'s `estimate()` and `plan()` wrapped, and each top-level call's inputs (the spec as
  JSON, the inventory as JSON) and its `--json` document are written as one line.

`compare DIR` re-runs every recorded input through the current tree and prints the specs whose
JSON differs (exit 1), or how many matched (exit 0).

    python scripts/json_snapshot.py record /tmp/before    # before the change (~5 min)
    python scripts/json_snapshot.py compare /tmp/before   # after it
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Where the calculator's entry points live (the first importable wins: the list spans layouts).
ESTIMATE = ("memplan.report.estimate:estimate", "memplan.estimate:estimate")
ESTIMATE_JSON = (
    "memplan.report.json:estimate_json",
    "memplan.report.json:to_json",
    "memplan.estimate:to_json",
)
PLAN = ("memplan.plan.search:plan", "memplan.plan:plan")
PLAN_JSON = ("memplan.plan.json:plan_json", "memplan.plan.search:to_json", "memplan.plan:to_json")
SPEC = ("memplan.config.spec:Spec", "memplan.spec:Spec")
INVENTORY = ("memplan.model.inventory", "memplan.models.inventory")


def _locate(candidates: tuple[str, ...]) -> tuple[Any, str, Any]:
    """(module, attribute name, object) of the first importable `module:attr`."""
    for c in candidates:
        module_name, _, attr = c.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        if not attr:
            return module, "", module
        if hasattr(module, attr):
            return module, attr, getattr(module, attr)
    raise SystemExit(f"none of {candidates} imports")


# --- inventories as JSON (dataclasses tagged by class name, so a moved class still decodes) ----


def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
        }
        return {"__dc__": type(value).__name__, **fields}
    if isinstance(value, tuple):
        return {"__t__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {"__m__": [[encode(k), encode(v)] for k, v in value.items()]}
    return value


def decode(value: Any, classes: dict[str, type]) -> Any:
    if isinstance(value, list):
        return [decode(v, classes) for v in value]
    if isinstance(value, dict):
        if "__t__" in value:
            return tuple(decode(v, classes) for v in value["__t__"])
        if "__m__" in value:
            return {decode(k, classes): decode(v, classes) for k, v in value["__m__"]}
        name = value["__dc__"]
        return classes[name](**{k: decode(v, classes) for k, v in value.items() if k != "__dc__"})
    return value


def _inventory_classes() -> dict[str, type]:
    _, _, module = _locate(INVENTORY)
    return {n: getattr(module, n) for n in ("Inventory", "Architecture", "TensorSpec")}


def raised(e: Exception) -> dict[str, str]:
    return {"raised": type(e).__name__, "message": str(e)}


# --- recording -----------------------------------------------------------------------------------


class Recorder:
    """A pytest plugin that wraps estimate() and plan() while the suite runs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: dict[str, str] = {}
        self.depth = 0

    def _wrap(self, where: tuple[str, ...], to_json: tuple[str, ...], kind: str) -> None:
        module, attr, original = _locate(where)
        _, _, render = _locate(to_json)
        recorder = self

        def wrapped(spec: Any, inventory: Any, *args: Any, **kwargs: Any) -> Any:
            top = recorder.depth == 0 and not args and not kwargs
            recorder.depth += 1
            try:
                result = original(spec, inventory, *args, **kwargs)
            except Exception as e:
                if top:
                    recorder.add(kind, spec, inventory, raised(e))
                raise
            finally:
                recorder.depth -= 1
            if top:
                recorder.add(kind, spec, inventory, render(result))
            return result

        setattr(module, attr, wrapped)

    def add(self, kind: str, spec: Any, inventory: Any, document: Any) -> None:
        line = json.dumps(
            {
                "kind": kind,
                "spec": spec.model_dump(mode="json", exclude_unset=True),
                "inventory": encode(inventory),
                "json": document,
            },
            sort_keys=True,
        )
        self.lines[hashlib.sha256(line.encode()).hexdigest()] = line

    def pytest_configure(self, config: Any) -> None:
        self._wrap(ESTIMATE, ESTIMATE_JSON, "estimate")
        self._wrap(PLAN, PLAN_JSON, "plan")

    def pytest_unconfigure(self, config: Any) -> None:
        with gzip.open(self.out / "tests.jsonl.gz", "wt") as f:
            for key in sorted(self.lines):
                f.write(self.lines[key] + "\n")
        print(f"json_snapshot: {len(self.lines)} distinct estimate/plan calls recorded")


def _cli(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "memplan", *args], capture_output=True, text=True, cwd=ROOT
    )
    return json.dumps({"rc": run.returncode, "stdout": run.stdout}, sort_keys=True)


def _cli_documents() -> Iterator[tuple[str, str]]:
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        rel = str(config.relative_to(ROOT))
        commands = ["estimate", "inventory"] + (["plan"] if "plan" in config.name else [])
        for command in commands:
            yield f"{command} {rel}", _cli(command, rel, "--json")


def record(out: Path, pytest_args: list[str]) -> int:
    import pytest

    out.mkdir(parents=True, exist_ok=True)
    (out / "cli.json").write_text(json.dumps(dict(_cli_documents()), indent=1, sort_keys=True))
    args = ["-q", "-p", "no:cacheprovider", "-m", "not gpu", *pytest_args]
    return int(pytest.main(args, plugins=[Recorder(out)]))


# --- comparing -----------------------------------------------------------------------------------


def _replayer() -> Callable[[dict[str, Any]], Any]:
    _, _, spec_class = _locate(SPEC)
    classes = _inventory_classes()
    run = {
        "estimate": (_locate(ESTIMATE)[2], _locate(ESTIMATE_JSON)[2]),
        "plan": (_locate(PLAN)[2], _locate(PLAN_JSON)[2]),
    }

    def replay(entry: dict[str, Any]) -> Any:
        spec = spec_class.model_validate(entry["spec"])
        inventory = decode(entry["inventory"], classes)
        calculate, render = run[entry["kind"]]
        try:
            document = render(calculate(spec, inventory))
        except Exception as e:  # noqa: BLE001 - a raise is an answer too; compare it as one
            return raised(e)
        return json.loads(json.dumps(document, sort_keys=True))

    return replay


def compare(before: Path) -> int:
    differ: list[str] = []
    old_cli = json.loads((before / "cli.json").read_text())
    new_cli = dict(_cli_documents())
    for key in sorted(set(old_cli) | set(new_cli)):
        if old_cli.get(key) != new_cli.get(key):
            differ.append(f"cli: {key}")
    replay = _replayer()
    n = 0
    with gzip.open(before / "tests.jsonl.gz", "rt") as f:
        for line in f:
            entry = json.loads(line)
            n += 1
            got = replay(entry)
            if got != entry["json"]:
                name = entry["spec"].get("model", {})
                differ.append(f"{entry['kind']} #{n}: {json.dumps(name)[:120]}")
    print(f"{len(old_cli)} CLI documents and {n} recorded specs compared; {len(differ)} differ")
    for d in differ[:50]:
        print("  " + d)
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("record", "compare"):
        print(__doc__)
        return 2
    sys.path.insert(0, str(ROOT))
    if argv[0] == "record":
        return record(Path(argv[1]), argv[2:])
    return compare(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
