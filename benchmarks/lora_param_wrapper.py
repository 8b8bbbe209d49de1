"""peft's lora.ParamWrapper on a decoder layer's Linear weight, measured on the CPU.

    PYTHONPATH=. python benchmarks/lora_param_wrapper.py   # about 1 min on 2 cores

writes benchmarks/results/lora-param-wrapper.json.

`finetune.target_parameters: [mlp.down_proj.weight]` (peft's `LoraConfig(target_parameters=
...)`) wraps the Linear in lora.ParamWrapper, which runs it on its weight with the adapter's
product merged in (peft 0.21.2 tuners/lora/layer.py::ParamWrapper.forward, _activate_lora,
_LoraParameterProxy.forward; memplan.activations.lora_moe.wrapped_saved). Each case builds the
tiny model with transformers 5.25, wraps it with peft as `memplan verify` does (memplan.verify.
peft_support.prepare) and records what autograd saves (benchmarks/lora_moe.py's helpers,
tests/activation_probe.py's contract):

- `forward`: every storage saved by one forward + loss, for Llama, Qwen2, Qwen3, Mistral,
  Gemma 1-3, OLMo 2 and Mixtral x wrapped targets x recipe x checkpointing {none, full};
- `recompute`: under full checkpointing, what each decoder layer's recomputation saves in
  backward with q_proj/v_proj adapters plus the wrapped weights, minus q_proj/v_proj alone;
- `parameters`: under QLoRA (bitsandbytes' 4-bit Linear on the CPU), peft's parameter list
  (name, shape, dtype, requires_grad) where target_parameters names a 4-bit weight: peft
  gives it bnb's LoRA Linear4bit, as target_modules would (forward cases too);
- `qlora_moe`, `qlora_moe_recompute`: QLoRA beside Mixtral's and Qwen3-MoE's wrapped router
  and experts (saved bytes; per-layer recompute beside q_proj/v_proj minus q_proj/v_proj);
- `qwen2_moe_qlora`: Qwen2-MoE under QLoRA with q_proj/v_proj alone (bf16, amp-bf16);
  `qwen2_moe_qlora_wrapped`, `qwen2_moe_qlora_recompute`: beside its wrapped router or fused
  experts, or with its 4-bit shared expert's down_proj / gate named (saved bytes; per-layer
  recompute beside q_proj/v_proj minus q_proj/v_proj).

tests/test_lora_param_wrapper.py holds memplan's prediction to these numbers (torch-free).
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

from benchmarks.lora_moe import _SMALL, MIXTRAL, PRECISIONS, QWEN3_MOE  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "lora-param-wrapper.json"

LLAMA: dict[str, Any] = {**_SMALL, "model_type": "llama", "intermediate_size": 96}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": LLAMA,
    "qwen2": {**LLAMA, "model_type": "qwen2"},  # q/k/v carry a bias
    "qwen3": {**LLAMA, "model_type": "qwen3", "head_dim": 16},  # q_norm / k_norm
    "mistral": {**LLAMA, "model_type": "mistral"},
    "gemma": {**LLAMA, "model_type": "gemma", "head_dim": 16},  # GemmaRMSNorm, gelu
    "gemma2": {**LLAMA, "model_type": "gemma2", "head_dim": 16},  # sandwich norms, softcaps
    "gemma3_text": {**LLAMA, "model_type": "gemma3_text", "head_dim": 16},
    "olmo2": {**LLAMA, "model_type": "olmo2"},  # q_norm / k_norm on the whole projection
    "mixtral": MIXTRAL,  # a wrapped Linear beside the wrapped router (lora_moe.unwrap)
    "qwen3_moe": QWEN3_MOE,
    # the router is a Qwen2MoeTopKRouter (F.linear on a bare weight), not converted by peft:
    # reached by target_parameters only
    "qwen2_moe": {**QWEN3_MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 56},
}
QV = ["q_proj", "v_proj"]
# finetune keys beside method / rank / alpha
TARGETS: dict[str, dict[str, Any]] = {
    # the MLP's last Linear alone: its input requires grad (gate and up train nothing, but
    # the merged weight makes down_proj's output require grad from layer 0 on)
    "down": {"target_modules": [], "target_parameters": ["mlp.down_proj.weight"]},
    # the first Linear alone: layer 0's input does not require grad (no merged weight saved)
    "q": {"target_modules": [], "target_parameters": ["self_attn.q_proj.weight"]},
    # beside lora.Linear adapters
    "qv+o,up": {"target_modules": QV, "target_parameters": ["o_proj.weight", "up_proj.weight"]},
    # Mixtral: the attention's o_proj beside the MoE router, both wrapped
    "qv+o,router": {"target_modules": QV, "target_parameters": ["o_proj.weight", "gate.weight"]},
    # Qwen2-MoE's router alone, and its fused experts (reached by target_parameters only)
    "qv+router": {"target_modules": QV, "target_parameters": ["mlp.gate.weight"]},
    "qv+experts": {
        "target_modules": QV,
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
    # Qwen2-MoE's shared expert and its sigmoid gate (Linear weights inside the MoE block)
    "qv+shared": {
        "target_modules": QV,
        "target_parameters": ["shared_expert.down_proj.weight", "shared_expert_gate.weight"],
    },
}
QLORA_DROPOUT: dict[str, Any] = {"method": "qlora", "dropout": 0.05}


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


def forward_cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for target in ("down", "q", "qv+o,up"):
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base"):
            for ck in ("none", "full"):
                out.append({"family": "llama", "target": target, "precision": precision, "ck": ck})
        out.append({"family": "llama", "target": target, "precision": "fp16", "ck": "none"})
        # 16-bit adapters: the delta made fp32 on the CPU (Linear.get_delta_weight)
        out.append(
            {
                "family": "llama",
                "target": target,
                "precision": "bf16",
                "ck": "none",
                "finetune": {"autocast_adapter_dtype": False},
            }
        )
    for family in ("qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo2"):
        for target in ("down", "q", "qv+o,up"):
            for precision in ("bf16", "amp-bf16"):
                out.append(
                    {"family": family, "target": target, "precision": precision, "ck": "none"}
                )
        out.append({"family": family, "target": "qv+o,up", "precision": "bf16", "ck": "full"})
    # QLoRA: a 4-bit Linear's weight gets bnb's LoRA Linear4bit, not a ParamWrapper
    # (memplan.model.finetune.lora._bnb_dispatched); lora_dropout is accepted there
    for target in ("down", "qv+o,up"):
        for precision in ("bf16", "amp-bf16"):
            for ck in ("none", "full"):
                case = {"family": "llama", "target": target, "precision": precision, "ck": ck}
                out.append({**case, "finetune": {"method": "qlora"}})
        out.append(
            {
                "family": "llama",
                "target": target,
                "precision": "bf16",
                "ck": "none",
                "finetune": QLORA_DROPOUT,
            }
        )
    moe = [("mixtral", "qv+o,router"), ("qwen3_moe", "qv+o,router")]
    moe += [("qwen2_moe", "qv+o,router"), ("qwen2_moe", "qv+shared")]
    for family, target in moe:
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base"):
            case = {"family": family, "target": target, "precision": precision}
            out.append({**case, "ck": "none"})
    return out


def recompute_cases() -> list[dict[str, Any]]:
    return [
        {"family": family, "target": target, "precision": precision}
        for family, target in (
            ("llama", "qv+o,up"),
            ("mixtral", "qv+o,router"),
            ("qwen2_moe", "qv+o,router"),
            ("qwen2_moe", "qv+shared"),
        )
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base")
    ] + [
        {"family": "llama", "target": "qv+o,up", "precision": precision, "finetune": qlora}
        for precision in ("bf16", "amp-bf16")
        for qlora in ({"method": "qlora"}, QLORA_DROPOUT)
    ]


def qlora_moe_cases() -> list[dict[str, Any]]:
    """QLoRA beside the wrapped router and fused experts (benchmarks/lora_moe.py's targets and
    spec): bitsandbytes quantizes the attention's Linears only."""
    out: list[dict[str, Any]] = []
    for family in ("mixtral", "qwen3_moe"):
        for target in ("router", "gate_up", "down", "all-linear"):
            for precision in ("bf16", "amp-bf16"):
                for ck in ("none", "full"):
                    out.append(
                        {"family": family, "target": target, "precision": precision, "ck": ck}
                    )
        for precision in ("bf16", "amp-bf16", "fp16"):
            case = {"family": family, "target": "all-linear", "precision": precision}
            out.append({**case, "ck": "none", "finetune": {"prepare_kbit": False}})
        out.append({"family": family, "target": "all-linear", "precision": "fp16", "ck": "none"})
    return out


def qlora_moe_recompute_cases() -> list[dict[str, Any]]:
    return [
        {"family": family, "target": target, "precision": precision}
        for family in ("mixtral", "qwen3_moe")
        for target in ("router", "gate_up", "down", "all-three")
        for precision in ("bf16", "amp-bf16")
    ]


def qlora_moe_doc(case: dict[str, Any], wrapped: bool = True) -> dict[str, Any]:
    """The case's spec: benchmarks/lora_moe.py's, method qlora (q_proj / v_proj beside the
    wrapped targets in the recompute cases; `wrapped=False`: q_proj / v_proj alone)."""
    from benchmarks.lora_moe import TARGETS as MOE_TARGETS
    from benchmarks.lora_moe import spec_doc as moe_doc
    from benchmarks.lora_moe import wrapped_names

    family, target = case["family"], case["target"]
    ck = case.get("ck", "full")
    extra = {"method": "qlora", **case.get("finetune", {})}
    if "ck" not in case:  # a recompute case
        targets = QV + wrapped_names(family, target) if wrapped else QV
    else:
        named = MOE_TARGETS[family][target]
        targets = named if isinstance(named, str) else QV + named
    return moe_doc(family, targets, case["precision"], ck, **extra)


def qwen2_moe_qlora_doc(precision: str) -> dict[str, Any]:
    """Qwen2-MoE under QLoRA, q_proj / v_proj only (memplan was off here until its shared
    expert's 4-bit Linears handed back their input's dtype: memplan.activations.lora_moe.
    moe_flow's four_bit_outputs)."""
    doc = spec_doc("qwen2_moe", "qv+shared", precision, "none", method="qlora")
    doc["finetune"] = {"method": "qlora", "rank": 8, "alpha": 16, "target_modules": QV}
    return doc


QWEN2_MOE_QLORA_TARGETS = ("qv+router", "qv+experts", "qv+shared", "qv+o,router")


def qwen2_moe_qlora_cases() -> list[dict[str, Any]]:
    """QLoRA on Qwen2-MoE beside its wrapped router or fused experts (lora.ParamWrapper, left
    unquantized: no nn.Linear), or with its 4-bit shared expert's down_proj and gate named
    (bitsandbytes' LoRA Linear4bit), in the four QLoRA recipes."""
    out: list[dict[str, Any]] = []
    for target in QWEN2_MOE_QLORA_TARGETS:
        for precision in ("bf16", "amp-bf16"):
            for ck in ("none", "full"):
                case = {"family": "qwen2_moe", "target": target, "precision": precision}
                out.append({**case, "ck": ck, "finetune": {"method": "qlora"}})
        out.append(
            {
                "family": "qwen2_moe",
                "target": target,
                "precision": "fp16",
                "ck": "none",
                "finetune": {"method": "qlora"},
            }
        )
        for precision in ("bf16", "amp-bf16"):
            case = {"family": "qwen2_moe", "target": target, "precision": precision, "ck": "none"}
            out.append({**case, "finetune": {"method": "qlora", "prepare_kbit": False}})
    return out


def qwen2_moe_qlora_recompute_cases() -> list[dict[str, Any]]:
    return [
        {
            "family": "qwen2_moe",
            "target": target,
            "precision": precision,
            "finetune": {"method": "qlora"},
        }
        for target in QWEN2_MOE_QLORA_TARGETS
        for precision in ("bf16", "amp-bf16")
    ]


def parameter_cases() -> list[dict[str, Any]]:
    """QLoRA: peft's parameter list where target_parameters names a 4-bit Linear's weight."""
    return [
        {"family": "llama", "target": target, "precision": precision, "finetune": QLORA_DROPOUT}
        for target in ("down", "qv+o,up")
        for precision in ("bf16", "amp-bf16")
    ]


def case_doc(case: dict[str, Any]) -> dict[str, Any]:
    return spec_doc(
        case["family"],
        case["target"],
        case["precision"],
        case.get("ck", "full"),
        **case.get("finetune", {}),
    )


def qv_doc(case: dict[str, Any]) -> dict[str, Any]:
    """The recompute case's baseline: q_proj / v_proj adapters alone."""
    doc = case_doc(case)
    method = case.get("finetune", {}).get("method", "lora")
    doc["finetune"] = {"method": method, "rank": 8, "alpha": 16, "target_modules": QV}
    return doc


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
    qlora_moe = []
    for case in qlora_moe_cases():
        qlora_moe.append({**case, "measured_bytes": measure_forward(qlora_moe_doc(case))})
        print(qlora_moe[-1], flush=True)
    qlora_moe_recompute = []
    for case in qlora_moe_recompute_cases():
        base = measure_recompute(qlora_moe_doc(case, wrapped=False))
        with_wrapped = measure_recompute(qlora_moe_doc(case))
        delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
        qlora_moe_recompute.append({**case, "measured_delta_per_layer": delta})
        print(qlora_moe_recompute[-1], flush=True)
    qwen2_moe_qlora = {
        precision: measure_forward(qwen2_moe_qlora_doc(precision))
        for precision in ("bf16", "amp-bf16")
    }
    qwen2_moe_qlora_wrapped = []
    for case in qwen2_moe_qlora_cases():
        qwen2_moe_qlora_wrapped.append({**case, "measured_bytes": measure_forward(case_doc(case))})
        print(qwen2_moe_qlora_wrapped[-1], flush=True)
    qwen2_moe_qlora_recompute = []
    for case in qwen2_moe_qlora_recompute_cases():
        base = measure_recompute(qv_doc(case))
        with_wrapped = measure_recompute(case_doc(case))
        delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
        qwen2_moe_qlora_recompute.append({**case, "measured_delta_per_layer": delta})
        print(qwen2_moe_qlora_recompute[-1], flush=True)
    recompute = []
    for case in recompute_cases():
        base = measure_recompute(qv_doc(case))
        with_wrapped = measure_recompute(case_doc(case))
        delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
        recompute.append({**case, "measured_delta_per_layer": delta})
        print(recompute[-1], flush=True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    result = stamp(
        command="python benchmarks/lora_param_wrapper.py",
        versions=versions,
        parameters=parameters,
        qlora_moe=qlora_moe,
        qlora_moe_recompute=qlora_moe_recompute,
        qwen2_moe_qlora=qwen2_moe_qlora,
        qwen2_moe_qlora_wrapped=qwen2_moe_qlora_wrapped,
        qwen2_moe_qlora_recompute=qwen2_moe_qlora_recompute,
        forward=forward,
        recompute=recompute,
        elapsed_s=round(time.time() - start, 1),
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
