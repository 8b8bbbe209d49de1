"""Record Falcon's saved bytes under transformers 5.24 into tests/data/ (run once, by hand).

transformers 5.25 rewrote FalconAttention, and the test environment pins 5.25 (constraints.txt),
so the 5.24 rule (memplan/model/families/falcon.py, `Setting.transformers` "5.24") is checked
against bytes measured once under 5.24 and kept as a fixture (tests/test_falcon_versions.py).
To refresh it, in a throwaway venv that shares the pinned torch:

    python -m venv --system-site-packages /tmp/tf524
    /tmp/tf524/bin/pip install --no-deps transformers==5.24.0
    PYTHONPATH=$PWD /tmp/tf524/bin/python -m tests.record_falcon_transformers_524

The measurement is tests/test_activations_families.py's (saved_tensors_hooks, per block).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.activation_probe import build_model
from tests.test_activations import CARRIED as BASE_CARRIED
from tests.test_activations import PRECISIONS
from tests.test_activations_families import (
    BATCH,
    CARRIED,
    FAMILIES,
    SEQ,
    VARIANTS,
    measure_blocks,
    with_dropout,
)

OUT = Path(__file__).parent / "data" / "falcon_transformers_5_24.json"
CASES = ("falcon", "falcon-new-arch", "falcon2-one-norm-relu", "falcon-mha-sequential")
COMMAND = "PYTHONPATH=$PWD /tmp/tf524/bin/python -m tests.record_falcon_transformers_524"


def main() -> int:
    if not transformers.__version__.startswith("5.24."):
        print(f"needs transformers 5.24.x, found {transformers.__version__}", file=sys.stderr)
        return 1
    cases: list[dict[str, Any]] = []
    grid = itertools.product(CASES, ("eager", "sdpa"), tuple(PRECISIONS), (False, True))
    for name, attention, precision, dropout in grid:
        config = with_dropout({**FAMILIES, **VARIANTS}[name], dropout)
        dtype, cast, _, _ = PRECISIONS[precision]
        model = build_model(config, attention=attention, dtype=dtype, checkpointing="none")
        measured = measure_blocks(model, batch=BATCH, sequence=SEQ, autocast=cast)
        carried = {k: config[k] for k in (*BASE_CARRIED, *CARRIED) if k in config}
        cases.append(
            {
                "id": f"{name}-{attention}-{precision}-dropout{int(dropout)}",
                "config": config,
                "carried": carried,
                "attention": attention,
                "precision": precision,
                "measured": measured,
            }
        )
    doc = {
        "note": (
            "Saved bytes per block (forward + causal-LM loss, CPU, no checkpointing) of tiny "
            "Falcon models measured under transformers 5.24 with saved_tensors_hooks: the "
            "oracle for memplan's 5.24 Falcon rule, which the 5.25-pinned test environment "
            "cannot run. 'carried': the config keys the tests copy into Architecture.extra."
        ),
        "command": COMMAND,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "batch": BATCH,
        "sequence": SEQ,
        "precisions": {k: list(v) for k, v in PRECISIONS.items()},
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
