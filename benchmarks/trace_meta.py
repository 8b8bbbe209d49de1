"""How fast memplan.verify.trace.meta builds an inventory on the meta device, and which model_types
of the installed transformers it builds at all.

  python benchmarks/trace_meta.py            # medians for full-size presets
  python benchmarks/trace_meta.py --sweep    # every causal-LM model_type, default config

Timing: median of --repeat builds of `inventory_from_config` (transformers already imported;
the first build of a model_type also imports its modeling module, reported separately).
The sweep builds each model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES from its
config class's defaults (full size: the meta device allocates nothing) and prints ok with the
parameter count and seconds, or the error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memplan.errors import MemplanError  # noqa: E402
from memplan.verify.trace.meta import inventory_from_config, transformers_version  # noqa: E402

PRESETS = ROOT / "memplan" / "model" / "presets"
FULL_SIZE = ("llama-3.1-405b", "deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "llama-3.1-8b")
# model_types without a hand family, at their config class's default (full) size.
DEFAULTS = ("gpt_oss", "qwen3_next", "deepseek_v32", "glm4_moe", "llama4_text", "gemma4_text")


def time_presets(repeat: int) -> None:
    started = time.perf_counter()
    version = transformers_version()  # imports transformers (and torch)
    print(f"import torch + transformers {version}: {time.perf_counter() - started:.2f} s")
    print(f"median of {repeat} builds on the meta device ('first': the first build, which also "
          "imports the model's modeling module)")  # fmt: skip
    print(f"{'config':<24} {'layers':>6} {'parameters':>18} {'tensors':>8} {'first s':>8} "
          f"{'median s':>9}")  # fmt: skip
    cases = [(p, json.loads((PRESETS / f"{p}.json").read_text())) for p in FULL_SIZE]
    cases += [(f"{t} (defaults)", {"model_type": t}) for t in DEFAULTS]
    for preset, config in cases:
        started = time.perf_counter()
        inv = inventory_from_config(config)
        first = time.perf_counter() - started
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            inventory_from_config(config)
            times.append(time.perf_counter() - started)
        print(
            f"{preset:<24} {inv.num_layers:>6} {inv.num_parameters:>18,} "
            f"{len(inv.parameters) + len(inv.buffers):>8} {first:>8.2f} "
            f"{statistics.median(times):>9.2f}"
        )


def sweep() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ok = failed = 0
    for model_type, cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        started = time.perf_counter()
        try:
            inv = inventory_from_config({"model_type": model_type, "architectures": [cls]})
        except MemplanError as err:
            failed += 1
            print(f"FAIL {model_type:<28} {err}", flush=True)
            continue
        ok += 1
        print(
            f"ok   {model_type:<28} {cls:<40} {inv.num_parameters:>16,} "
            f"{time.perf_counter() - started:6.2f}s",
            flush=True,
        )
    print(f"{ok} built, {failed} failed, of {ok + failed} causal-LM model_types")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.sweep:
        sweep()
    else:
        time_presets(args.repeat)


if __name__ == "__main__":
    main()
