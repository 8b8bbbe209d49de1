"""The import direction is a contract: memplan's folders are the stages of its pipeline, and a
module imports only from its own stage or an earlier one.

    errors, versions, hardware, precision, optimizers, memo   the vocabulary every stage shares
    config     the spec and how it is read
    memory     phases of a step, a transient buffer, the allocator's rounding
    model      inventories, model files, families, the forward's saved tensors, fine-tuning
    states     precision x optimizer x engine: parameters, gradients, optimizer states per rank
    activations  a family's saved tensors laid out on a rank (TP/SP/CP/PP, LoRA)
    step       the timeline of one training step and its transient buffers
    report     the estimate and its --json document
    plan       the layout search
    cli, verify  the edges: verify runs torch (real steps, and verify/trace: inventories and
               saved tensors read from the model code); only cli, beside it, imports it

Every import counts, including those inside functions (the CLI imports lazily for speed).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("memplan", "memplan.errors", "memplan.versions", "memplan.hardware", "memplan.precision",
     "memplan.optimizers", "memplan.memo"),
    ("memplan.config",),
    ("memplan.memory",),
    ("memplan.model",),
    ("memplan.states",),
    ("memplan.activations",),
    ("memplan.step",),
    ("memplan.report",),
    ("memplan.plan",),
    ("memplan.cli", "memplan.verify", "memplan.__main__"),
)  # fmt: skip


def layer_of(module: str) -> int | None:
    """The layer of `module`: the longest prefix any layer names wins."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def imports(root: Path) -> Iterator[tuple[str, str, int]]:
    """(importer, imported module, line) for every memplan import under `root`/memplan."""
    for file in sorted((root / "memplan").rglob("*.py")):
        module = ".".join(file.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "memplan":  # `from memplan import x`: x is the module
                    names = [f"memplan.{a.name}" for a in node.names]
                    yield from ((module, n, node.lineno) for n in names)
                elif node.module.startswith("memplan."):
                    yield module, node.module, node.lineno
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("memplan"):
                        yield module, a.name, node.lineno


def violations(root: Path) -> list[str]:
    out = []
    for importer, imported, line in imports(root):
        mine, theirs = layer_of(importer), layer_of(imported)
        if mine is None or theirs is None:
            out.append(f"{importer}:{line} -> {imported}: a module in no layer")
        elif theirs > mine:
            out.append(f"{importer}:{line} (layer {mine}) imports {imported} (layer {theirs})")
    return out


def test_every_import_points_down_the_pipeline() -> None:
    assert violations(ROOT) == []


def test_every_module_is_in_a_layer() -> None:
    for file in (ROOT / "memplan").rglob("*.py"):
        module = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        assert layer_of(module) is not None, module


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("memplan/states/x.py", "from memplan.report.estimate import Report\n", "layer 4"),
        ("memplan/model/x.py", "def f():\n    from memplan import activations\n", "layer 3"),
        ("memplan/report/x.py", "import memplan.verify.runner\n", "layer 7"),
    ],
)
def test_the_check_catches_an_upward_import(
    tmp_path: Path, importer: str, source: str, expected: str
) -> None:
    """The checker itself, on a tree made to break the contract (so the test above can fail)."""
    file = tmp_path / importer
    file.parent.mkdir(parents=True)
    file.write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found
