"""QLoRA (transformers + bitsandbytes + peft) measured on the CPU by `memplan verify`.

    PYTHONPATH=. python benchmarks/qlora_verify.py    # about 5 min on 2 cores; writes
                                                      # benchmarks/results/qlora-verify.json

bitsandbytes runs its 4-bit Linear on the CPU from 0.46 on, so `memplan verify` builds a QLoRA
job as a training script does (memplan.verify.peft_support.quantized: the model saved and
loaded again by transformers with BitsAndBytesConfig(load_in_4bit=True), peft's
prepare_model_for_kbit_training, get_peft_model) and compares every category with memplan's
prediction. Each case is the verify table's tiny Llama (benchmarks/verify_table.py) with one
setting changed: the precision recipe (with and without autocast), recomputation, the 4-bit
format, prepare_model_for_kbit_training, dropout, the adapters' targets, the quantized head
(bf16, fp16, amp-bf16, amp-fp16), wide layers with a small vocabulary (the layers' backward
peaks), GPT-2's Conv1D, Gemma, Phi-3 and OLMo 2, DDP and FSDP2 on two gloo ranks (FSDP2 with and
without prepare_model_for_kbit_training, and Qwen2's biased q/k/v), and bitsandbytes'
8-bit and paged optimizers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.verify_table import LLAMA, TINY_GPT2, run_case, spec, training  # noqa: E402

PAGED_8BIT = {"name": "paged_adamw8bit"}
QLORA: dict[str, Any] = {
    "method": "qlora",
    "rank": 8,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": "all-linear",
    "quant_type": "nf4",
    "double_quant": True,
}


def case(precision: str = "bf16", ft: dict[str, Any] | None = None, **steps: Any) -> dict[str, Any]:
    return spec(
        LLAMA,
        precision=precision,
        finetune={**QLORA, **(ft or {})},
        training=training(**steps),
    )


# The families LoRA's rules cover beside Llama's and GPT-2's (tests/test_finetune_peft.py's).
_SMALL: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
GEMMA = {**_SMALL, "model_type": "gemma", "head_dim": 16}
PHI3 = {**_SMALL, "model_type": "phi3"}
OLMO2 = {**_SMALL, "model_type": "olmo2"}
QWEN2 = {**_SMALL, "model_type": "qwen2"}


def family(config: dict[str, Any], precision: str) -> dict[str, Any]:
    return spec(
        {"architecture": config},
        precision=precision,
        finetune=dict(QLORA),
        training=training(),
    )


def gpt2(precision: str = "bf16") -> dict[str, Any]:
    return spec(
        {"architecture": TINY_GPT2},
        precision=precision,
        finetune={**QLORA, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        training=training(),
    )


WIDE = {**LLAMA["architecture"], "hidden_size": 128, "intermediate_size": 512, "vocab_size": 96}


def wide(precision: str) -> dict[str, Any]:
    return spec(
        {"architecture": WIDE}, precision=precision, finetune=dict(QLORA), training=training()
    )


# (name, spec): the QLoRA paper's recipe first (nf4, double quantization, bf16 compute,
# prepare_model_for_kbit_training, all linear layers), then one change each.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("nf4 + double quant, bf16, all-linear", case()),
    ("full recomputation", case(activation_checkpointing="full")),
    ("fp16", case("fp16")),
    ("fp32 compute", case("fp32")),
    ("amp-bf16 (autocast)", case("amp-bf16")),
    ("amp-bf16, full recomputation", case("amp-bf16", activation_checkpointing="full")),
    ("bf16-mixed (autocast)", case("bf16-mixed")),
    ("fp4, no double quant", case(ft={"quant_type": "fp4", "double_quant": False})),
    ("without prepare_model_for_kbit_training", case(ft={"prepare_kbit": False})),
    (
        "without prepare_model_for_kbit_training, full recomputation",
        case(ft={"prepare_kbit": False}, activation_checkpointing="full"),
    ),
    ("LoRA dropout 0.05", case(ft={"dropout": 0.05})),
    ("q_proj and v_proj only", case(ft={"target_modules": ["q_proj", "v_proj"]})),
    ("eager attention", case(attention="eager")),
    ("amp-bf16, eager attention", case("amp-bf16", attention="eager")),
    ("amp-bf16, LoRA dropout 0.05", case("amp-bf16", ft={"dropout": 0.05})),
    ("amp-fp16", case("amp-fp16")),
    (
        "amp-bf16, without prepare_model_for_kbit_training",
        case("amp-bf16", ft={"prepare_kbit": False}),
    ),
    ("the head quantized too (skip_modules: [])", case(ft={"skip_modules": []})),
    ("amp-bf16, the head quantized too", case("amp-bf16", ft={"skip_modules": []})),
    # The 4-bit head's backward (memplan.step.transients.qlora_head_backward): its logits'
    # gradient in the compute dtype beside its weight dequantized in the dtype it was loaded
    # in (fp32 under amp) and cast to the compute dtype.
    ("amp-fp16, the head quantized too", case("amp-fp16", ft={"skip_modules": []})),
    ("fp16, the head quantized too", case("fp16", ft={"skip_modules": []})),
    (
        "amp-bf16, the head quantized, without prepare_model_for_kbit_training",
        case("amp-bf16", ft={"skip_modules": [], "prepare_kbit": False}),
    ),
    # The layers' backward peaks (a small vocabulary, wide layers): the largest layer weight
    # dequantized for its input's gradient, in fp32 then bf16 under amp
    # (memplan.model.finetune.qlora.backward_dequantized), beside the backward working set.
    ("amp-bf16, wide layers, small vocabulary", wide("amp-bf16")),
    ("bf16, wide layers, small vocabulary", wide("bf16")),
    ("GPT-2 (Conv1D), bf16", gpt2()),
    ("GPT-2 (Conv1D), amp-bf16", gpt2("amp-bf16")),
    ("DDP, 2 gloo ranks", {**case(), "parallelism": {"engine": "ddp", "data": 2}}),
    # HF's FSDP-QLoRA recipe (bitsandbytes docs/source/fsdp_qlora.md): the packed weights in
    # the load dtype (bnb_4bit_quant_storage), no prepare_model_for_kbit_training, FSDP2.
    *(
        (
            f"FSDP2, 2 gloo ranks, {precision}, quant_storage {storage}",
            {
                **case(precision, ft={"prepare_kbit": False, "quant_storage": storage}),
                "parallelism": {"engine": "fsdp2", "data": 2},
            },
        )
        for precision, storage in (("bf16", "bf16"), ("bf16", "uint8"), ("amp-bf16", "bf16"))
    ),
    # The same with prepare_model_for_kbit_training: the root (embedding, final norm, head)
    # and the layers' norms fp32, all-gathered in fp32 (memplan.states.engines.fsdp2.buffers.
    # OWN_DTYPE).
    *(
        (
            f"FSDP2, 2 gloo ranks, {precision}, quant_storage bf16, "
            "prepare_model_for_kbit_training",
            {
                **case(precision, ft={"prepare_kbit": True, "quant_storage": "bf16"}),
                "parallelism": {"engine": "fsdp2", "data": 2},
            },
        )
        for precision in ("bf16", "amp-bf16")
    ),
    # Qwen2's q/k/v biases under FSDP2: Linear4bit's bias cast reaches only the unsharded
    # parameter, which keeps its compute-dtype copy between steps; the sharded bias keeps
    # its own dtype (memplan.model.finetune.qlora.fsdp2_bias_copies). bf16 without
    # prepare_model_for_kbit_training: no cast (the bias already bf16).
    *(
        (
            f"FSDP2, 2 gloo ranks, Qwen2 (q/k/v biases), {precision}, quant_storage bf16"
            + (", prepare_model_for_kbit_training" if prepare else ""),
            {
                **family(QWEN2, precision),
                "finetune": {**QLORA, "prepare_kbit": prepare, "quant_storage": "bf16"},
                "parallelism": {"engine": "fsdp2", "data": 2},
            },
        )
        for precision, prepare in (
            ("bf16", True),
            ("amp-bf16", True),
            ("amp-bf16", False),
            ("bf16", False),
        )
    ),
    *(
        (f"{name}, {precision}", family(config, precision))
        for name, config in (("Gemma", GEMMA), ("Phi-3", PHI3), ("OLMo 2", OLMO2))
        for precision in ("bf16", "amp-bf16")
    ),
    # bitsandbytes' optimizers (paged ones keep ordinary tensors on the CPU): tensors under
    # min_8bit_size (4,096 elements) keep 32-bit states, rank 64 makes 8-bit ones.
    ("paged_adamw8bit, rank 8 (32-bit states)", {**case(), "optimizer": PAGED_8BIT}),
    (
        "paged_adamw8bit, rank 64 (8-bit states)",
        {**case(ft={"rank": 64}), "optimizer": PAGED_8BIT},
    ),
    ("paged_adamw (32-bit)", {**case(ft={"rank": 64}), "optimizer": {"name": "paged_adamw"}}),
    (
        "full fine-tune, no LoRA, adamw8bit",
        spec(LLAMA, precision="bf16", optimizer={"name": "adamw8bit"}, training=training()),
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    import bitsandbytes
    import peft
    import torch
    import transformers

    cases = []
    start = time.perf_counter()
    for name, doc in CASES:
        if args.only and args.only not in name:
            continue
        out = run_case(doc, {"nproc": 2} if doc["parallelism"]["data"] == 2 else {})
        rows = {
            k: (v["predicted"], v["measured"], v["ok"])
            for k, v in out["categories"].items()
            if v.get("checked")
        }
        print(f"{'ok ' if out['ok'] else 'MISS'} {name}")
        for k, (p, m, ok) in rows.items():
            if not ok or p != m:
                print(f"      {k}: predicted {p:,} measured {m:,} ({(p - m) / m:+.2%})")
        cases.append({"name": name, "spec": doc, "verify": out})
    doc = {
        **stamp(),
        "command": "python benchmarks/qlora_verify.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "cases": cases,
        "verified": sum(c["verify"]["ok"] for c in cases),
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "qlora-verify.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
