"""CUDA autocast emulated on a CPU build (memplan.verify.trace.autocast), the full matrix:

1. `cpu_lists`: the emulation run with CPU autocast's lists against torch's real CPU autocast
   (its C++ kernels), the same model traced twice: every saved storage (block, module, dtype,
   elements) equal, for every ruled family (tests/test_profile.py RULED), eager and sdpa,
   autocast bf16 and fp16, batch 2 x 24 tokens. This is the independent oracle of the
   mechanism (cast policies, the cast cache, casts recorded by autograd).
2. `cuda_rules`: the emulated CUDA autocast profile (amp-bf16, amp-fp16) against the CUDA
   autocast branch of the family's hand rule (memplan.model.forward: layer_norm, pow and
   softmax in fp32 on CUDA), bytes per block at batch 2 x 64 tokens. Both sides read the same
   source lists and neither is measured on a GPU here: a pinning comparison (agreement, not
   proof that CUDA does it). Known differences carry the reason.
The MoE families are refused by the tracer under autocast (their experts would run in the fp32
stream, which the _grouped_mm meta kernel does not take): `refused`, with the message.

    PYTHONPATH=$PWD python benchmarks/cuda_autocast.py   # writes results/cuda-autocast.json
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stamp import stamp  # noqa: E402

from memplan.errors import MemplanError  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import autocast as autocast_  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from memplan.verify.trace.forward import build_fake, trace_once  # noqa: E402
from tests.test_activations_families import NO_SDPA, with_dropout  # noqa: E402
from tests.test_profile import RULED  # noqa: E402
from tests.test_profile_cuda import BATCH, SEQ, _blocks, _rule, cuda_config  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cuda-autocast.json"
KNOWN = {
    "bert": "head+loss: the rule's causal-LM head (transformers' loss_function upcasts the "
    "logits) vs config.json's BertForMaskedLM, whose CrossEntropyLoss runs log_softmax in the "
    "logits' fp16/bf16 dtype (LossNLL.cpp::cross_entropy_loss passes self.scalar_type()) and "
    "nll_loss (CUDA fp32 list) saves an fp32 copy of it (tests/test_profile.py DIFFERS, the "
    "same head difference on CPU)",
    "gemma3-mixed-sdpa": "the rule refuses a sliding window next to full layers under sdpa",
    "gemma3-mixed-eager": "totals equal: each layer kind's RoPE cos/sin (one layer of each kind "
    "saves them) are the layers' in the trace, the embeddings' in the rule; the same on CPU "
    "without autocast (fp32: rule embeddings 6528 B, trace 384 B, equal totals), not the "
    "emulation's",
}


def cpu_lists(family: str, attention: str, dtype: str) -> dict[str, Any]:
    config = with_dropout(RULED[family], False)
    model, mode = build_fake(config, stream="fp32", attention=attention, checkpointing="none")
    n = int(model.config.num_hidden_layers)
    kw: dict[str, Any] = {"batch": 2, "sequence": 24, "autocast": dtype, "layer_count": n}
    real = Counter((r.block, r.module, r.dtype, r.numel) for r in trace_once(model, mode, **kw))
    emulated = Counter(
        (r.block, r.module, r.dtype, r.numel)
        for r in trace_once(model, mode, autocast_lists="cpu", **kw)
        if not r.block.startswith(autocast_.HELD)  # the cache's own copies: emulation only
    )
    return {
        "storages": sum(real.values()),
        "elements": sum(k[3] * v for k, v in real.items()),
        "equal": real == emulated,
        "only_real": [list(k) for k in (real - emulated)],
        "only_emulated": [list(k) for k in (emulated - real)],
    }


def cuda_rule(family: str, attention: str, matmul: str) -> dict[str, Any]:
    config = cuda_config(family, False)
    st = Setting(
        batch=BATCH,
        sequence=SEQ,
        stream="fp32",
        matmul=matmul,
        autocast=True,
        device="cuda",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="none",
    )
    rule = _rule(config, st)
    kernel = "eager" if family in NO_SDPA else attention
    doc = tracer.build(
        config, stream="fp32", matmul=matmul, autocast=True, attention=kernel, device="cuda"
    )
    got = profile.from_document(json.loads(json.dumps(doc)), origin="bench")
    trace = _blocks(got.activations(st, num_layers=2))
    ruled = _blocks(rule) if rule.modelled else None
    return {"rule": ruled, "trace": trace, "equal": ruled == trace}


def _known(family: str, attention: str) -> str | None:
    if family == "bert":
        return KNOWN["bert"]
    if family == "gemma3-mixed":
        return KNOWN[f"gemma3-mixed-{attention}"]
    return None


def main() -> None:
    cpu: list[dict[str, Any]] = []
    cuda: list[dict[str, Any]] = []
    for family in RULED:
        for attention in ("eager", "sdpa"):
            for dtype in ("bf16", "fp16"):
                started = time.perf_counter()
                case: dict[str, Any] = {"family": family, "attention": attention}
                try:
                    got = cpu_lists(family, attention, dtype)
                except MemplanError as err:  # the tracer's own refusal (MoE experts in fp32)
                    got = {"equal": None, "refused": str(err)}
                case |= {"autocast": dtype, **got}
                case["seconds"] = round(time.perf_counter() - started, 2)
                cpu.append(case)
                print("cpu_lists", json.dumps(case)[:300], flush=True)
                started = time.perf_counter()
                case = {"family": family, "attention": attention, "precision": f"amp-{dtype}"}
                try:
                    got = cuda_rule(family, attention, dtype)
                except MemplanError as err:
                    got = {"equal": None, "refused": str(err)}
                case |= {**got, "known": None if got["equal"] else _known(family, attention)}
                case["seconds"] = round(time.perf_counter() - started, 2)
                cuda.append(case)
                print("cuda_rules", json.dumps(case)[:300], flush=True)
    doc = {
        **stamp(),
        "command": "PYTHONPATH=$PWD python benchmarks/cuda_autocast.py",
        "cpu_lists": {
            "cases": len(cpu),
            "equal": sum(c["equal"] is True for c in cpu),
            "differ": sum(c["equal"] is False for c in cpu),
            "refused": sum(c["equal"] is None for c in cpu),
            "results": cpu,
        },
        "cuda_rules": {
            "cases": len(cuda),
            "equal": sum(c["equal"] is True for c in cuda),
            "known_differences": sum(c["equal"] is False and bool(c["known"]) for c in cuda),
            "unexplained": sum(c["equal"] is False and not c["known"] for c in cuda),
            "refused": sum(c["equal"] is None for c in cuda),
            "results": cuda,
        },
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"cpu lists: {doc['cpu_lists']['equal']} of {len(cpu)} equal; cuda rules: "
        f"{doc['cuda_rules']['equal']} of {len(cuda)} equal, "
        f"{doc['cuda_rules']['unexplained']} unexplained -> {OUT}"
    )


if __name__ == "__main__":
    main()
