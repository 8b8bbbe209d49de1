"""Print constraints.txt: every distribution `memplan[test]` pulls in, at its installed version.

Run in an environment where `make dev` succeeded (or after upgrading a package on purpose):

    python scripts/pin_constraints.py > constraints.txt

Walks the requirements of memplan's base dependencies and of its torch, verify and test extras
(not plot) through the installed packages' metadata; environment markers are evaluated for
this interpreter and platform. Local version labels are dropped (`torch==2.13.0`, not
`2.13.0+cpu`) so the pin matches the CPU and the CUDA builds alike.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

EXTRAS = ("torch", "verify", "test")
HEADER = """\
# Constraints for the test environment: the exact versions `make dev` / `make test` and .ci/run
# install (pip install -c constraints.txt ...), so the README's test command passes on a fresh
# machine today and next month. torch and transformers are the releases memplan's rules
# transcribe (memplan/versions.py: torch 2.13, transformers 5.25); everything else is what
# memplan[test] pulled in when the rules were last checked.
# Refresh: upgrade on purpose, run the whole suite, then
#   python scripts/pin_constraints.py > constraints.txt
# torch: `make dev` installs `torch==2.13.0` first; on these machines that is the local CPU
# wheel, on an ordinary machine add `--index-url https://download.pytorch.org/whl/cpu` for the
# CPU build (PyPI's default Linux wheel is the CUDA build, whose nvidia-* packages are left
# unpinned here).
"""


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    roots = []
    for req in md.distribution("memplan").requires or []:
        r = Requirement(req)
        wanted = r.marker is None or any(r.marker.evaluate({"extra": e}) for e in EXTRAS)
        if wanted:
            roots.append(Requirement(r.name))
    seen: dict[str, str] = {}
    stack = roots
    while stack:
        r = stack.pop()
        name = _key(r.name)
        if name in seen:
            continue
        dist = md.distribution(r.name)
        seen[name] = dist.version.split("+")[0]
        for req in dist.requires or []:
            q = Requirement(req)
            if q.marker is None or q.marker.evaluate({"extra": ""}):
                stack.append(q)
    sys.stdout.write(HEADER)
    sys.stdout.writelines(f"{name}=={seen[name]}\n" for name in sorted(seen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
