"""peft's `target_parameters` (finetune.target_parameters), measured on the CPU.

    PYTHONPATH=. python benchmarks/lora_target_parameters.py   # under a minute on 2 cores

writes benchmarks/results/lora-target-parameters.json.

Each case builds the tiny model with transformers 5.25 and wraps it with peft 0.21.2 as
`memplan verify` does (memplan.verify.peft_support.prepare, which passes target_parameters to
LoraConfig), then records:

- `parameters`: every parameter of peft's model (name, shape, dtype, requires_grad), in fp32
  and bf16, for Mixtral, Qwen3-MoE, Qwen2-MoE and Llama (a Linear's weight wrapped by
  lora.ParamWrapper), beside target_modules or alone;
- `forward`: the bytes autograd saves in one forward + loss (benchmarks/lora_moe.py's
  measure_forward, tests/activation_probe.py's contract) for the MoE cases, per recipe and
  checkpointing.

tests/test_lora_target_parameters.py holds memplan's inventory and activations to these
numbers (torch-free); the live runs are marked slow.
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

OUT = ROOT / "benchmarks" / "results" / "lora-target-parameters.json"

QWEN2_MOE: dict[str, Any] = {
    **QWEN3_MOE,
    "model_type": "qwen2_moe",
    "shared_expert_intermediate_size": 56,
}
LLAMA: dict[str, Any] = {**_SMALL, "model_type": "llama", "intermediate_size": 96}
MODELS = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE, "llama": LLAMA}

# (model, finetune keys beside method/rank/alpha): what peft builds
PARAMETER_CASES: list[tuple[str, dict[str, Any]]] = [
    ("mixtral", {"target_parameters": ["mlp.experts.down_proj"]}),
    ("mixtral", {"target_parameters": ["gate_up_proj", "gate.weight"]}),
    ("mixtral", {"target_modules": ["w1", "w3"], "target_parameters": ["gate_up_proj"]}),
    ("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["down_proj"]}),
    ("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["no_such_param"]}),
    (
        "mixtral",
        {
            "target_modules": ["q_proj"],
            "target_parameters": ["down_proj"],
            "exclude_modules": ["experts"],
        },
    ),
    ("mixtral", {"target_modules": [], "target_parameters": ["self_attn.o_proj.weight"]}),
    ("qwen3_moe", {"target_parameters": ["experts.gate_up_proj", "mlp.gate.weight"]}),
    ("qwen3_moe", {"target_modules": "all-linear", "target_parameters": ["gate_up_proj"]}),
    (
        "qwen2_moe",
        {
            "target_modules": ["q_proj", "v_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
    ),
    ("llama", {"target_parameters": ["mlp.down_proj.weight"]}),
    ("llama", {"target_modules": [], "target_parameters": ["mlp.down_proj.weight"]}),
]

# (model, finetune keys, precision, checkpointing): what autograd saves
FORWARD_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("mixtral", {"target_parameters": ["mlp.experts.down_proj"]}, "bf16", "none"),
    ("mixtral", {"target_parameters": ["gate_up_proj", "gate.weight"]}, "amp-bf16", "none"),
    ("mixtral", {"target_parameters": ["gate_up_proj", "gate.weight"]}, "fp32", "full"),
    (
        "mixtral",
        {"target_modules": ["q_proj", "v_proj"], "target_parameters": ["down_proj"]},
        "amp-bf16-base",
        "none",
    ),
    (
        "mixtral",
        {"target_modules": ["w1", "w3"], "target_parameters": ["gate_up_proj"]},
        "bf16",
        "full",
    ),
    (
        "qwen3_moe",
        {"target_parameters": ["experts.gate_up_proj", "mlp.gate.weight"]},
        "bf16",
        "none",
    ),
    ("qwen3_moe", {"target_parameters": ["experts.down_proj"]}, "amp-bf16", "full"),
    (
        "qwen2_moe",
        {
            "target_modules": ["q_proj", "v_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
        "bf16",
        "none",
    ),
]


def spec_doc(
    model: str, finetune: dict[str, Any], precision: str = "fp32", checkpointing: str = "none"
) -> dict[str, Any]:
    """The memplan spec of one case (batch 2 x 16 tokens, SDPA, DDP on the CPU)."""
    training: dict[str, Any] = {"micro_batch_size": 2, "sequence_length": 16, "attention": "sdpa"}
    if checkpointing == "full":
        training["activation_checkpointing"] = "full"
    return {
        "model": {"architecture": MODELS[model]},
        "precision": PRECISIONS[precision],
        "finetune": {"method": "lora", "rank": 8, "alpha": 16, **finetune},
        "training": training,
        "parallelism": {"engine": "ddp"},
        "hardware": {"device": "cpu"},
    }


def peft_parameters(doc: dict[str, Any]) -> list[list[Any]]:
    """[name, shape, dtype, requires_grad] of every parameter of peft's model, in order."""
    from benchmarks.lora_moe import _model

    model, _ = _model(doc)
    return [
        [n, list(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad]
        for n, p in model.named_parameters()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import peft
    import torch
    import transformers

    from benchmarks.lora_moe import measure_forward

    start = time.time()
    parameters = []
    for model, ft in PARAMETER_CASES:
        for precision in ("fp32", "bf16"):
            doc = spec_doc(model, ft, precision)
            row = {"model": model, "finetune": ft, "precision": precision}
            parameters.append({**row, "parameters": peft_parameters(doc)})
            print(row, len(parameters[-1]["parameters"]), flush=True)
    forward = []
    for model, ft, precision, ck in FORWARD_CASES:
        row = {"model": model, "finetune": ft, "precision": precision, "ck": ck}
        forward.append(
            {**row, "measured_bytes": measure_forward(spec_doc(model, ft, precision, ck))}
        )
        print(forward[-1], flush=True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    result = stamp(
        command="python benchmarks/lora_target_parameters.py",
        versions=versions,
        parameters=parameters,
        forward=forward,
        elapsed_s=round(time.time() - start, 1),
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
