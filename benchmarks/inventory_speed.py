"""Time `memplan.model.sources.from_config` on the DeepSeek-V3 (671B) preset: median of 20 runs, in
ms.

Budget: under 50 ms (the inventory is built from one layer template stamped per layer, never
by instantiating a model). Run: `python benchmarks/inventory_speed.py`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from memplan.model import sources as models

PRESET = Path(__file__).resolve().parents[1] / "memplan" / "model" / "presets" / "deepseek-v3.json"
RUNS = 20
BUDGET_MS = 50.0


def median_ms(config: dict[str, object], runs: int = RUNS) -> float:
    """Median wall time of `models.from_config(config)` over `runs` calls, in milliseconds."""
    times_ms = []
    for _ in range(runs):
        start = time.perf_counter()
        models.from_config(config, origin=PRESET.name)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


def main() -> None:
    config = json.loads(PRESET.read_text())
    inventory = models.from_config(config, origin=PRESET.name)
    ms = median_ms(config)
    print(
        f"deepseek-v3: {len(inventory.parameters)} parameter tensors, "
        f"{len(inventory.buffers)} buffers, {inventory.num_parameters:,} parameters; "
        f"from_config median {ms:.2f} ms over {RUNS} runs (budget {BUDGET_MS:.0f} ms)"
    )


if __name__ == "__main__":
    main()
