"""peft's lora.ParamWrapper on the model ends (an input embedding's weight, the LM head's),
GPT-2's Conv1D weights and Phi-3's fused projections, measured on the CPU.

    PYTHONPATH=. python benchmarks/lora_param_wrapper_ends.py   # about 5 min on 2 cores

writes benchmarks/results/lora-param-wrapper-ends.json.

`finetune.target_parameters: [embed_tokens.weight]` (or `lm_head.weight`, `attn.c_attn.weight`,
`self_attn.qkv_proj.weight`, ...) wraps the module in lora.ParamWrapper, which runs it on its
weight with the adapter's product merged in (peft 0.21.2 tuners/lora/layer.py::ParamWrapper.
forward, _activate_lora, _LoraParameterProxy.forward). Each case builds the tiny model with
transformers 5.25, wraps it with peft as `memplan verify` does (memplan.verify.peft_support.
prepare) and records (benchmarks/lora_moe.py's helpers, tests/activation_probe.py's contract):

- `parameters`: peft's parameter list (name, shape, dtype, requires_grad), bf16, every target;
- `forward`: every storage saved by one forward + loss, per family x target x recipe x
  checkpointing {none, full};
- `recompute`: under full checkpointing, what each decoder layer's recomputation saves in
  backward with the wrapped Conv1D / fused weights, minus the same with nothing wrapped in
  the layers (for a target without a layer adapter beside it, the baseline is the
  embedding's wrapper alone, which makes the layers' input require grad).

Every case runs in peft: none raised. tests/test_lora_param_wrapper_ends.py holds memplan's
prediction to these numbers (torch-free).
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

from benchmarks.lora_moe import PRECISIONS  # noqa: E402
from benchmarks.lora_param_wrapper import FAMILIES as LAYER_FAMILIES  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "lora-param-wrapper-ends.json"

LLAMA = LAYER_FAMILIES["llama"]
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": LLAMA,
    # the head tied to the embedding: a wrapper on either runs on its own module only
    "llama_tied": {**LLAMA, "tie_word_embeddings": True},
    "qwen2": LAYER_FAMILIES["qwen2"],
    "gemma": LAYER_FAMILIES["gemma"],  # embed_scale on the lookup
    "gemma2": LAYER_FAMILIES["gemma2"],  # the logits' softcap
    "gemma3_text": LAYER_FAMILIES["gemma3_text"],
    "olmo2": LAYER_FAMILIES["olmo2"],
    # Conv1D (addmm on a [in, out] weight); lm_head tied to wte
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 48,
        "n_layer": 3,
        "n_head": 6,
        "vocab_size": 777,
        "n_positions": 128,
    },
    "phi3": {**LLAMA, "model_type": "phi3"},  # qkv_proj, gate_up_proj
}
QV = ["q_proj", "v_proj"]


def _params(*names: str, modules: list[str] | None = None) -> dict[str, Any]:
    return {"target_modules": modules or [], "target_parameters": list(names)}


TARGETS: dict[str, dict[str, Any]] = {
    "emb": _params("embed_tokens.weight"),
    "head": _params("lm_head.weight"),
    "emb,head": _params("embed_tokens.weight", "lm_head.weight"),
    "qv+emb": _params("embed_tokens.weight", modules=QV),
    "qv+head": _params("lm_head.weight", modules=QV),
    "wte": _params("wte.weight"),
    "wpe": _params("wpe.weight"),
    "c_attn": _params("attn.c_attn.weight"),
    "c_fc": _params("mlp.c_fc.weight"),
    "c_proj": _params("c_proj.weight"),  # the attention's and the MLP's
    "c_attn,c_fc": _params("attn.c_attn.weight", "mlp.c_fc.weight"),
    "qkv": _params("self_attn.qkv_proj.weight"),
    "gate_up": _params("mlp.gate_up_proj.weight"),
    "o,down": _params("o_proj.weight", "down_proj.weight"),
    "o+qkv,gate_up": _params(
        "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight", modules=["o_proj"]
    ),
}
# the model ends and the layers' Conv1D / fused weights, in all four recipes (fp32, bf16,
# amp-bf16, amp-bf16 on a bf16 model) x checkpointing; the rest in bf16 and amp-bf16
FULL_MATRIX = [
    ("llama", "emb"),
    ("llama", "head"),
    ("llama", "emb,head"),
    ("llama", "qv+emb"),
    ("llama", "qv+head"),
    ("gpt2", "wte"),
    ("gpt2", "head"),
    ("gpt2", "c_attn,c_fc"),
    ("phi3", "o+qkv,gate_up"),
]
TWO_RECIPES = [
    ("llama_tied", "emb"),
    ("llama_tied", "head"),
    ("llama_tied", "emb,head"),
    ("qwen2", "head"),
    ("gemma", "emb"),
    ("gemma", "head"),
    ("gemma2", "emb"),
    ("gemma2", "head"),
    ("gemma3_text", "emb"),
    ("olmo2", "emb"),
    ("gpt2", "wpe"),
    ("gpt2", "c_attn"),
    ("gpt2", "c_fc"),
    ("gpt2", "c_proj"),
    ("phi3", "emb"),
    ("phi3", "head"),
    ("phi3", "qkv"),
    ("phi3", "gate_up"),
    ("phi3", "o,down"),
]


def spec_doc(
    family: str, target: str, precision: str, checkpointing: str = "none", **extra: Any
) -> dict[str, Any]:
    """The memplan spec of one case (batch 2 x 16 tokens, SDPA, DDP on the CPU)."""
    training: dict[str, Any] = {"micro_batch_size": 2, "sequence_length": 16, "attention": "sdpa"}
    if checkpointing == "full":
        training["activation_checkpointing"] = "full"
    return {
        "model": {"architecture": FAMILIES[family]},
        "precision": PRECISIONS[precision],
        "finetune": {"method": "lora", "rank": 8, "alpha": 16, **TARGETS[target], **extra},
        "training": training,
        "parallelism": {"engine": "ddp"},
        "hardware": {"device": "cpu"},
    }


def case_doc(case: dict[str, Any]) -> dict[str, Any]:
    return spec_doc(
        case["family"],
        case["target"],
        case["precision"],
        case.get("ck", "full"),
        **case.get("finetune", {}),
    )


def parameter_cases() -> list[dict[str, Any]]:
    pairs = list(dict.fromkeys(FULL_MATRIX + TWO_RECIPES))
    return [{"family": f, "target": t, "precision": "bf16"} for f, t in pairs]


def forward_cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for family, target in FULL_MATRIX:
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base"):
            for ck in ("none", "full"):
                out.append({"family": family, "target": target, "precision": precision, "ck": ck})
    for family, target in TWO_RECIPES:
        for precision in ("bf16", "amp-bf16"):
            for ck in ("none", "full"):
                out.append({"family": family, "target": target, "precision": precision, "ck": ck})
    # fp16, and 16-bit adapters (the delta made fp32 on the CPU: Linear.get_delta_weight)
    for family, target in (("llama", "emb,head"), ("gpt2", "c_attn,c_fc"), ("phi3", "qkv")):
        case = {"family": family, "target": target, "ck": "none"}
        out.append({**case, "precision": "fp16"})
        out.append({**case, "precision": "bf16", "finetune": {"autocast_adapter_dtype": False}})
    return out


# (family, layer target, its baseline): the baseline wraps the embedding alone, so the
# layers' input requires grad in both runs and the difference is the layer wrappers' own
RECOMPUTE = [
    ("gpt2", "c_attn,c_fc", "wte"),
    ("gpt2", "c_proj", "wte"),
    ("phi3", "qkv", "emb"),
    ("phi3", "o,down", "emb"),
]


def recompute_cases() -> list[dict[str, Any]]:
    return [
        {"family": family, "target": target, "baseline": base, "precision": precision}
        for family, target, base in RECOMPUTE
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base")
    ]


def with_baseline(case: dict[str, Any]) -> dict[str, Any]:
    """The recompute case's spec: its layer target beside the baseline's embedding."""
    doc = case_doc(case)
    doc["finetune"]["target_parameters"] += TARGETS[case["baseline"]]["target_parameters"]
    return doc


def baseline_doc(case: dict[str, Any]) -> dict[str, Any]:
    return case_doc({**case, "target": case["baseline"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import peft
    import torch
    import transformers

    from benchmarks.lora_moe import measure_forward, measure_recompute
    from benchmarks.lora_target_parameters import peft_parameters

    start = time.time()
    parameters = []
    for case in parameter_cases():
        parameters.append({**case, "parameters": peft_parameters(case_doc(case))})
        print(case, len(parameters[-1]["parameters"]), flush=True)
    forward = []
    for case in forward_cases():
        forward.append({**case, "measured_bytes": measure_forward(case_doc(case))})
        print(forward[-1], flush=True)
    recompute = []
    for case in recompute_cases():
        base = measure_recompute(baseline_doc(case))
        with_wrapped = measure_recompute(with_baseline(case))
        delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
        recompute.append({**case, "measured_delta_per_layer": delta})
        print(recompute[-1], flush=True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    result = stamp(
        command="python benchmarks/lora_param_wrapper_ends.py",
        versions=versions,
        parameters=parameters,
        forward=forward,
        recompute=recompute,
        elapsed_s=round(time.time() - start, 1),
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
