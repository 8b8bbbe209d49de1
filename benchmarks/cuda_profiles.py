"""CUDA profiles traced on a CPU build (memplan.verify.trace.cuda) against the hand rules' CUDA
branches: every ruled family, eager and sdpa, fp32 and bf16 (MoE: bf16 only), dropout off
and on, plus full checkpointing for five families, at batch 2 x 64 tokens.

    PYTHONPATH=$PWD python benchmarks/cuda_profiles.py    # writes results/cuda-profiles.json

Both sides read the same CUDA kernels and neither is measured on a GPU here: `equal` proves
the trace and the rule agree, not that CUDA does (tests/test_profile_cuda.py's gpu test
compares with a real CUDA run where there is one). Known differences carry the reason:
BERT in bf16 (the rule's head is the causal-LM one, the trace builds config.json's
BertForMaskedLM: the same difference as on CPU, tests/test_profile.py DIFFERS) and Gemma 3's
mixed layer kinds under sdpa (the rule refuses them: `rule` is null).
The test suite runs a representative subset (tests/test_profile_cuda.py SUBSET).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stamp import stamp  # noqa: E402

from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.test_profile import MOE, PRECISIONS, RULED  # noqa: E402
from tests.test_profile_cuda import BATCH, SEQ, _blocks, _rule, compare, cuda_config  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cuda-profiles.json"
FULL = ("llama", "gpt2", "gemma3_text", "falcon", "gpt_neox")
KNOWN = {
    "bert-bf16": "head+loss: the rule's causal-LM head vs config.json's BertForMaskedLM "
    "(tests/test_profile.py DIFFERS, the same on CPU)",
    "gemma3-mixed-sdpa": "the rule refuses a sliding window next to full layers under sdpa",
}


def _known(family: str, attention: str, precision: str) -> str | None:
    if family == "bert" and precision == "bf16":
        return KNOWN["bert-bf16"]
    if family == "gemma3-mixed" and attention == "sdpa":
        return KNOWN["gemma3-mixed-sdpa"]
    return None


def _full(family: str, attention: str, precision: str) -> dict[str, Any]:
    """Full checkpointing: saved bytes per block and one layer's recompute."""
    config = cuda_config(family, False)
    stream, matmul, cast = PRECISIONS[precision]
    st = Setting(
        batch=BATCH,
        sequence=SEQ,
        stream=stream,
        matmul=matmul,
        autocast=cast,
        device="cuda",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="full",
    )
    rule = _rule(config, st)
    doc = tracer.build(
        config,
        stream=stream,
        matmul=matmul,
        autocast=cast,
        attention=attention,
        checkpointing="full",
        device="cuda",
    )
    got = profile.from_document(doc, origin="bench").activations(st, num_layers=2)
    layers = (rule.block("layers"), got.block("layers"))
    return {
        "rule": {**_blocks(rule), "recompute": layers[0].recompute_bytes if layers[0] else None},
        "trace": {**_blocks(got), "recompute": layers[1].recompute_bytes if layers[1] else None},
    }


def main() -> None:
    cases: list[dict[str, Any]] = []
    for family in RULED:
        for attention in ("eager", "sdpa"):
            for precision in ("fp32", "bf16"):
                if family in MOE and precision != "bf16":
                    continue
                for dropout in (False, True):
                    started = time.perf_counter()
                    got = compare(family, attention, precision, dropout)
                    case = {
                        "family": family,
                        "attention": attention,
                        "precision": precision,
                        "dropout": dropout,
                        "checkpointing": "none",
                        "rule": got["rule"],
                        "trace": got["trace"],
                        "equal": got["rule"] == got["trace"],
                        "known": _known(family, attention, precision),
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                    cases.append(case)
                    print(json.dumps(case), flush=True)
    for family in FULL:
        for attention in ("eager", "sdpa"):
            for precision in ("fp32", "bf16"):
                started = time.perf_counter()
                got = _full(family, attention, precision)
                case = {
                    "family": family,
                    "attention": attention,
                    "precision": precision,
                    "dropout": False,
                    "checkpointing": "full",
                    **got,
                    "equal": got["rule"] == got["trace"],
                    "known": None,
                    "seconds": round(time.perf_counter() - started, 2),
                }
                cases.append(case)
                print(json.dumps(case), flush=True)
    unexplained = [c for c in cases if not c["equal"] and not c["known"]]
    doc = {
        **stamp(batch=BATCH, sequence=SEQ),
        "command": "PYTHONPATH=$PWD python benchmarks/cuda_profiles.py",
        "cases": len(cases),
        "equal": sum(c["equal"] for c in cases),
        "known_differences": sum(bool(c["known"]) and not c["equal"] for c in cases),
        "unexplained": len(unexplained),
        "results": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{doc['equal']} of {len(cases)} equal, {doc['unexplained']} unexplained -> {OUT}")


if __name__ == "__main__":
    main()
