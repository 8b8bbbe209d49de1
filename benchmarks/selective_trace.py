"""Selective recomputation, three ways, for every family with a hand rule: issue 18's proof that
the traced profile, the hand rule and real tensors agree.

For each ruled family (tests/test_profile.py's RULED tiny configs, dropout off), attention eager
and sdpa, precision fp32 / bf16 / amp-bf16, at batch 2 x 24 tokens:

  rule     memplan.activations.predict with activation_checkpointing: selective (the hand rule:
           memplan/model/forward/assemble.py::finish)
  trace    the profile memplan.verify.trace.profile.build traces with checkpointing
           "selective" (every attention core under torch.utils.checkpoint, FakeTensorMode,
           then backward)
  real     the same policy on real CPU tensors (tests/activation_probe.py::measure_selective):
           the storages the forward saves, and what each core's recomputation re-creates in
           the real backward

per block (embeddings, layers, head + loss) and, per layer, the bytes the backward re-creates
(`recompute`). MoE families trace in bf16 only (torch's meta kernel for _grouped_mm).

    PYTHONPATH=$PWD python benchmarks/selective_trace.py   # ~4 min on 2 cores
    # writes benchmarks/results/selective-trace.json
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from memplan.activations import predict  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.activation_probe import DTYPES, build_model, measure_selective  # noqa: E402
from tests.test_activations import inventory  # noqa: E402
from tests.test_activations_families import CARRIED, NO_SDPA, with_dropout  # noqa: E402
from tests.test_profile import MOE, RULED, _blocks, _setting  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "selective-trace.json"
BATCH, SEQ = 2, 24
PRECISIONS = {"fp32": ("fp32", "fp32", False), "bf16": ("bf16", "bf16", False)}
PRECISIONS["amp-bf16"] = ("fp32", "bf16", True)


def real_model(config: dict[str, Any], attention: str, dtype: str) -> Any:
    """The model the trace builds: config.json's `architectures` class when it names a
    language-model head (BertForMaskedLM), else tests/activation_probe.py's causal LM."""
    names = [str(n) for n in config.get("architectures") or ()]
    if not any("MaskedLM" in n for n in names):
        return build_model(config, attention=attention, dtype=dtype)
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    model = getattr(transformers, names[0])._from_config(
        cfg, dtype=DTYPES[dtype], attn_implementation=attention
    )
    model.train()
    return model


def case(family: str, attention: str, precision: str) -> dict[str, Any]:
    config = with_dropout(RULED[family], False)
    stream, matmul, cast = PRECISIONS[precision]
    out: dict[str, Any] = {"family": family, "attention": attention, "precision": precision}
    st = dataclasses.replace(_setting(precision, attention), checkpointing="selective")
    kernel = "eager" if family in NO_SDPA else attention
    started = time.perf_counter()
    try:
        doc = tracer.build(
            config,
            stream=stream,
            matmul=matmul,
            autocast=cast,
            attention=kernel,
            checkpointing="selective",
        )
    except MemplanError as err:
        out["trace_refused"] = str(err)
        return out
    out["trace_seconds"] = round(time.perf_counter() - started, 2)
    traced = profile.from_document(doc, origin="bench").activations(st, num_layers=2)
    out["trace"] = _blocks(traced)
    out["trace_recompute"] = sorted(
        {b.recompute_bytes for b in traced.blocks if b.name.startswith("layers")}
    )
    inv = inventory(config)
    assert inv.architecture is not None
    extra = {**inv.architecture.extra, **{k: config[k] for k in CARRIED if k in config}}
    inv = dataclasses.replace(inv, architecture=dataclasses.replace(inv.architecture, extra=extra))
    rule = predict(inv, st)
    if rule.modelled:
        layers = rule.block("layers")
        assert layers is not None
        out["rule"] = _blocks(rule)
        out["rule_recompute"] = [layers.recompute_bytes]
    else:
        out["rule_refused"] = rule.notes[0]
    model = real_model(config, kernel, stream)
    measured, recomputed = measure_selective(
        model, batch=BATCH, sequence=SEQ, autocast=matmul if cast else None
    )
    out["real_total"] = measured.bytes
    out["real_recompute"] = sorted(set(recomputed))
    out["trace_equals_real"] = (
        traced.bytes == measured.bytes and out["trace_recompute"] == out["real_recompute"]
    )
    if rule.modelled:
        out["rule_saved_equals_trace"] = out["rule"] == out["trace"]
        out["rule_recompute_equals_trace"] = out["rule_recompute"] == out["trace_recompute"]
    return out


def main() -> None:
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    cases = []
    for family in RULED:
        for attention in ("eager", "sdpa"):
            for precision in PRECISIONS:
                if family in MOE and precision != "bf16":
                    continue  # refused by the trace: tests/test_profile.py checks the refusal
                result = case(family, attention, precision)
                print(json.dumps(result), flush=True)
                cases.append(result)
    doc = {
        "command": "PYTHONPATH=$PWD python benchmarks/selective_trace.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "size": [BATCH, SEQ],
        "seconds": round(time.perf_counter() - started, 1),
        "summary": {
            "cases": len(cases),
            "trace_equals_real": sum(bool(c.get("trace_equals_real")) for c in cases),
            "rule_saved_equals_trace": sum(bool(c.get("rule_saved_equals_trace")) for c in cases),
            "rule_recompute_equals_trace": sum(
                bool(c.get("rule_recompute_equals_trace")) for c in cases
            ),
            "ruled_cases": sum("rule" in c for c in cases),
        },
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
