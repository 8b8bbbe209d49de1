"""Wall time of `memplan estimate` beside `accelerate estimate-memory`, and plan's search
throughput, measured in one run.

`accelerate estimate-memory MODEL` asks the Hugging Face Hub for the model's config (it
fails offline: "Name or service not known"), so its side runs the command's own code on a
local config.json instead: `accelerate.commands.estimate.estimate_command`, with only its
Hub step (`create_empty_model`) replaced by the same AutoModel-on-meta construction from the
file (benchmarks/peers/accelerate_sizes.py). Both sides are timed two ways:

  cold  a fresh process per run, as a user runs the command (interpreter start and imports
        included: accelerate's side imports torch and transformers, memplan's neither)
  warm  the library calls alone, imports done: memplan's load_inventory + estimate against
        accelerate's gather_data (meta model + calculate_maximum_sizes) on the same model

The plan part is benchmarks/plan_speed.py (Llama-3.1-405B on 1,024 GPUs), run as is.

  python benchmarks/speed.py [--runs 7] [--model llama-3-8b]

Run it in the benchmark environment (benchmarks/requirements.txt) for the accelerate side;
without accelerate only memplan's timings are printed. The machine may be shared: medians
of several runs, both sides interleaved, reported together.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The accelerate side in a fresh process: import what the CLI imports, print its table.
ACCELERATE_ONCE = """
import json, sys
sys.path.insert(0, {bench!r})
from peers.accelerate_sizes import print_table
print(print_table(json.load(open({config!r})), ["float32", "float16"]))
"""


def spec_text(model: str) -> str:
    """The smallest spec for the preset: what `memplan estimate` reads."""
    return f"model:\n  preset: {model}\n"


def cold_ms(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return (time.perf_counter() - start) * 1000


def warm_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", default="llama-3-8b", help="a memplan preset")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="where speed.json goes"
    )
    args = parser.parse_args()

    from memplan.config.load import load_spec
    from memplan.model.load import PRESET_DIR, load_inventory, read_json
    from memplan.report.estimate import estimate

    has_accelerate = importlib.util.find_spec("accelerate") is not None
    config = read_json(PRESET_DIR / f"{args.model}.json", what="preset")
    out: dict[str, Any] = {"model": args.model, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(spec_text(args.model))
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config))
        memplan_argv = [sys.executable, "-m", "memplan", "estimate", str(spec)]
        accelerate_argv = [
            sys.executable,
            "-c",
            ACCELERATE_ONCE.format(bench=str(ROOT / "benchmarks"), config=str(config_file)),
        ]
        ours, theirs = [], []
        for _ in range(args.runs):  # interleaved, so load on the machine hits both alike
            ours.append(cold_ms(memplan_argv))
            if has_accelerate:
                theirs.append(cold_ms(accelerate_argv))
        out["cold_ms"] = {"memplan": statistics.median(ours)}
        if theirs:
            out["cold_ms"]["accelerate"] = statistics.median(theirs)

        loaded = load_spec(spec)
        # A fresh inventory each run (read from the preset, as the command does), so no cache
        # keyed on it survives from the previous run.
        out["warm_ms"] = {
            "memplan": warm_ms(lambda: estimate(loaded.spec, load_inventory(loaded)), args.runs)
        }
        if has_accelerate:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from peers.accelerate_sizes import gather

            gather(config, ["float32"])  # first call imports torch and transformers
            out["warm_ms"]["accelerate"] = warm_ms(
                lambda: gather(config, ["float32", "float16"]), args.runs
            )

    def line(kind: str) -> str:
        t = out[f"{kind}_ms"]
        text = f"{kind:4}  memplan estimate {t['memplan']:8.1f} ms"
        if "accelerate" in t:
            text += (
                f"   accelerate estimate-memory {t['accelerate']:8.1f} ms"
                f"   ratio {t['accelerate'] / t['memplan']:5.1f}x"
            )
        return text

    if not args.json:
        print(f"{args.model}: median of {args.runs} runs (wall clock)")
        print(line("cold"))
        print(line("warm"))
        if not has_accelerate:
            print("accelerate is not installed here: run in the benchmark environment")
        print("accelerate estimate-memory itself needs the Hub; its own code ran on a local config")
    plan = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_speed.py")],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    out["plan_speed"] = plan.splitlines()
    out["load_average_1min"] = os.getloadavg()[0]
    out["cpus"] = os.cpu_count()
    sys.path.insert(0, str(ROOT))
    from benchmarks.stamp import stamp

    out["stamp"] = stamp()  # commit, dirty flag, date, machine: scripts/gen_readme.py prints them
    out["accelerate_version"] = importlib.metadata.version("accelerate") if has_accelerate else None
    if not args.json:
        print("plan search (benchmarks/plan_speed.py):")
        print(plan, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.json").write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
