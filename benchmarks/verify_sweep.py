"""Every causal-LM model_type transformers builds, one `memplan verify` each: the honest count.

    PYTHONPATH=. python benchmarks/verify_sweep.py      # all of them, writes
                                                        # benchmarks/results/verify-sweep.json
    PYTHONPATH=. python benchmarks/verify_sweep.py --types mamba bart --out /tmp/x
    PYTHONPATH=. python benchmarks/verify_sweep.py --update --types mamba  # these rows replaced

For each model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, a tiny config derived
from its config class's defaults (`shrink`: the size keys it has set small by name, its per-layer
lists cut to one layer of each kind, nested sub-configs shrunk the same way; OVERRIDES where the
generic rules cannot work), and ONE setting (SETTING: fp32, sdpa, no recomputation, micro batch
2 x 32; MoE configs bf16, the one precision the trace serves them in: memplan/verify/trace/
moe.py::check) run through the whole `memplan verify` path by benchmarks/profile_verify.py's
run_case (the inventory on the meta device, a profile traced for the setting, the real model
stepped twice on CPU with torch AdamW, every category compared). Each type runs in its own
subprocess with a timeout, so a hang or a crash costs one row.

Each row is classified (`classify`): verified (every category within tolerance), off (ran; the
categories out of tolerance with predicted / measured), refused (memplan's MemplanError: why),
build-error (the tiny config or the model failed to build on the meta device: transformers'
error, before memplan runs), crash (the model's own code failed under verify: the exception),
timeout. One setting proves the categories of that one step at that one size; it does not
prove the other precisions, attention kernels, recomputation policies or sequence lengths
(benchmarks/profile_verify.py runs 12-18 settings for the types it lists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.sweep_configs import OVERRIDES, is_moe, shrink  # noqa: E402

SETTING = {"attention": "sdpa", "precision": "fp32", "checkpointing": "none"}
MOE_PRECISION = "bf16"
TIMEOUT_S = 120.0


def setting_of(config: dict[str, Any]) -> dict[str, str]:
    return {**SETTING, "precision": MOE_PRECISION} if is_moe(config) else dict(SETTING)


FAILURE = re.compile(
    r"^(?:rank \d+: )?(?P<name>.+?) predicted (?P<p>[\d,]+) B, measured (?P<m>[\d,]+) B"
)


CLASS_KEYS = ("class", "why", "off", "activations_checked", "covered_elsewhere")
"""The keys classify and elsewhere add to a row (the rest is the run's)."""


def classify(row: dict[str, Any]) -> dict[str, Any]:
    """The class of one type's row: {"class": ..., and the why}. `row` is run_case's row, or
    {"build_error": ...} / {"timeout": seconds} / {"crashed": stderr tail} from the sweep."""
    if "timeout" in row:
        return {"class": "timeout", "why": f"no result in {row['timeout']:.0f} s"}
    if "build_error" in row:
        return {"class": "build-error", "why": row["build_error"]}
    if "crashed" in row:
        return {"class": "crash", "why": row["crashed"]}
    if "error" in row:
        return {"class": "refused" if row.get("refused") else "crash", "why": row["error"]}
    if row.get("ok") and row.get("activations_predicted") is None:
        # Every category verify checked is within tolerance, but activations were measured
        # only: no rule and no profile predicted them (the note says why).
        return {"class": "unchecked", "why": " ".join(row.get("notes") or []) or None}
    if row.get("ok"):
        return {"class": "verified"}
    off = []
    for line in row.get("failures", []):
        m = FAILURE.match(line)
        if m is None:
            off.append({"category": line})
            continue
        p, meas = int(m["p"].replace(",", "")), int(m["m"].replace(",", ""))
        off.append(
            {
                "category": m["name"],
                "predicted": p,
                "measured": meas,
                "ratio": p / meas if meas else None,
            }
        )
    return {
        "class": "off",
        "off": off,
        "activations_checked": row.get("activations_predicted") is not None,
    }


def run_one(model_type: str) -> dict[str, Any]:
    """The child's work: shrink, build on the meta device (a build error is transformers',
    before memplan runs), then profile_verify.run_case."""
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    from benchmarks.profile_verify import run_case

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    torch.set_num_threads(1)
    try:
        config = shrink(model_type)
    except Exception as err:
        return {"build_error": f"default config: {_why(err)}"}
    setting = setting_of(config)
    base = {"config": config, "setting": setting}
    try:
        from memplan.verify.build import hf_config

        cfg = hf_config(config)
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as err:
        return {**base, "build_error": _why(err), "default_builds": _default_builds(model_type)}
    return {**base, **run_case(config, setting)}


def _default_builds(model_type: str) -> bool | str:
    """Whether the untouched default config builds on the meta device (False: transformers'
    own default does not, whatever the sweep's shrinking does)."""
    import torch
    import transformers
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(model_type, **OVERRIDES.get(model_type, {}))
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as err:
        return _why(err)
    return True


def _why(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    return f"{type(err).__name__}: {' '.join(str(text).split())[:400]}"


def run_sub(model_type: str, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_type]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        row: dict[str, Any] = {"timeout": timeout}
    else:
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            tail = " ".join(done.stderr.split())[-400:]
            row = {"crashed": f"exit {done.returncode}: {tail}"}
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def elsewhere(model_type: str) -> str | None:
    """Where else a type is proved: a hand rule, or profile_verify's matrix."""
    from benchmarks.profile_verify import TYPES
    from memplan.model.families import modelled_model_types

    if model_type in modelled_model_types():
        return "hand rules (memplan.model.families)"
    if model_type in TYPES:
        return "benchmarks/profile_verify.py (12-18 settings)"
    return None


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--types", nargs="*", default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    parser.add_argument("--update", action="store_true", help="keep the file's other rows")
    parser.add_argument(
        "--rewrite", action="store_true", help="run nothing: classify the file's rows again"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child)), flush=True)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    types = [] if args.rewrite else args.types or all_types()
    file = args.out / "verify-sweep.json"
    rows: dict[str, Any] = {}
    if (args.update or args.rewrite) and file.is_file():
        rows = json.loads(file.read_text())["types"]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def one(t: str) -> None:
        row = run_sub(t, args.timeout)
        rows[t] = {**classify(row), "covered_elsewhere": elsewhere(t), **row}
        what = rows[t].get("why") or rows[t].get("off") or ""
        print(
            f"{t:28s} {rows[t]['class']:12s} {row['wall_seconds']:6.1f}s {str(what)[:150]}",
            flush=True,
        )
        write(file, rows, start, done=False)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, types))
    print(json.dumps(write(file, rows, start, done=True)["summary"]))
    return 0


def write(file: Path, rows: dict[str, Any], start: float, *, done: bool) -> dict[str, Any]:
    import transformers

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    ordered = {}
    for t in sorted(rows):  # classified again: the rules are the script's, whichever run ran it
        raw = {k: v for k, v in rows[t].items() if k not in CLASS_KEYS}
        ordered[t] = {**classify(raw), "covered_elsewhere": elsewhere(t), **raw}
    counts: dict[str, int] = {}
    for row in ordered.values():
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    uncovered = [r for r in ordered.values() if not r.get("covered_elsewhere")]
    doc = {
        "stamp": stamp(torch=torch_version, transformers=transformers.__version__),
        "setting": SETTING,
        "moe_precision": MOE_PRECISION,
        "batch": [2, 32],
        "summary": {
            "complete": done,
            "types": len(ordered),
            "by_class": dict(sorted(counts.items())),
            "types_not_covered_elsewhere": len(uncovered),
            "verified_not_covered_elsewhere": sum(1 for r in uncovered if r["class"] == "verified"),
            "seconds": round(time.perf_counter() - start, 1),
            # The types' own wall times summed (the run's seconds count only this process:
            # --update and --rewrite runs keep rows an earlier run timed).
            "type_wall_seconds": round(sum(r.get("wall_seconds", 0) for r in ordered.values())),
        },
        "types": ordered,
    }
    file.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
