"""README figures are generated, never pasted (scripts/gen_readme.py); its references live.

- README.md equals what scripts/gen_readme.py writes from benchmarks/results/*.json: a figure
  edited by hand, or a results file re-measured without regenerating, fails here.
- Every generated block names a results file that exists and the commit that file was measured
  at, and that commit is in the repository's history.
- Every relative link, and every repository file the README names in backticks, exists.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

GEN_README = ROOT / "scripts" / "gen_readme.py"
README = (ROOT / "README.md").read_text()


def gen_readme() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_readme", GEN_README)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_up_to_date() -> None:
    """CI's staleness check: regenerate with `python scripts/gen_readme.py`."""
    out = subprocess.run(
        [sys.executable, str(GEN_README), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr


def test_every_generated_block_names_a_results_file_and_its_commit() -> None:
    module = gen_readme()
    blocks = list(module.BLOCK.finditer(README))
    assert {b["name"] for b in blocks} == set(module.BLOCKS)  # every block is in the README
    for block in blocks:
        path = ROOT / block["file"]
        assert path.is_file(), block["file"]
        assert block["file"] == f"benchmarks/results/{module.BLOCKS[block['name']][0]}"
        doc = json.loads(path.read_text())
        commit = module.commit_of(doc)
        assert block["commit"] == commit
        sha = commit.removesuffix("+dirty")
        known = subprocess.run(
            ["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT, capture_output=True
        )
        if known.returncode != 0 and (ROOT / ".git").exists():
            # A shallow clone may lack old commits; a full one must have it.
            shallow = subprocess.run(
                ["git", "rev-parse", "--is-shallow-repository"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
            assert shallow == "true", f"{block['file']}: commit {sha} is not in the history"


def test_check_fails_on_a_hand_edited_figure(tmp_path: Path) -> None:
    module = gen_readme()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert module.main(["--check", "--readme", str(readme)]) == 0
    block = next(module.BLOCK.finditer(README))
    body = block["body"]
    digit = re.search(r"\d", body)
    assert digit is not None
    edited = body[: digit.start()] + str((int(digit[0]) + 1) % 10) + body[digit.end() :]
    readme.write_text(README.replace(body, edited, 1))
    assert module.main(["--check", "--readme", str(readme)]) == 1
    assert module.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == README


def test_misses_name_every_peak_further_off_than_a_tenth_of_a_percent() -> None:
    module = gen_readme()

    def case(name: str, total: float, engine: str = "ddp") -> dict[str, object]:
        tools = {"memplan": {"error_total": total, "error_activations": 0.0}, "deepspeed": {}}
        return {
            "case": name,
            "model": "tiny-llama",
            "engine": engine,
            "model_states_exact": True,
            "tools": tools,
        }

    doc = {"cases": [case("a", 0.0001), case("b", -0.028, "fsdp2"), case("c", 0.049)]}
    text = module.accuracy_misses(doc)
    assert "within 0.1% in 1 of 3 cases; the others: b -2.8%, c +4.9%." in text
    assert "at most 4.90% on the peak (c)" in text


def test_counts_say_n_of_m_unless_all() -> None:
    module = gen_readme()
    assert module.of(3, 3, "rows") == "all 3 rows"
    assert module.of(2, 3, "rows") == "2 of 3 rows"


def test_relative_links_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    for link in links:
        if "://" in link:
            continue
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize(
    "path",
    sorted(
        set(
            re.findall(
                r"`((?:memplan|benchmarks|configs|tests|scripts|docs)/[\w./-]+\.(?:py|yaml|md|json))",
                README,
            )
        )
    ),
)
def test_files_the_readme_names_exist(path: str) -> None:
    assert (ROOT / path).exists(), path


def test_make_targets_the_readme_names_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for target in re.findall(r"`make ([\w-]+)`", README):
        assert target in targets, target


def test_extras_the_readme_names_exist() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r'pip install -e "\.\[([\w,-]+)\]"', README)
    assert named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, extra
