"""LoRA on the MoE router and fused experts (peft's lora.ParamWrapper), measured on the CPU.

    PYTHONPATH=. python benchmarks/lora_moe.py    # about 4 min on 2 cores; writes
                                                  # benchmarks/results/lora-moe.json

peft 0.21.2 adapts the router's weight and the fused 3-D expert weights of transformers 5's
Mixtral and Qwen3-MoE with lora.ParamWrapper, which adds the adapter's product into the weight
for the module's forward (memplan.activations.lora_moe). Each case builds the tiny model with
transformers, wraps it with peft as `memplan verify` does (memplan.verify.peft_support.
prepare) and records what autograd saves:

- `forward`: every storage saved by one forward + loss (tests/activation_probe.py's contract:
  deduplicated by storage, parameters and buffers excluded), for each family x target
  {router, gate_up_proj, down_proj, all-linear} x recipe x checkpointing {none, full};
- `recompute`: under full checkpointing, what each decoder layer's recomputation saves in
  backward (torch.utils.checkpoint's _recomputation_hook, memplan.verify.selective.
  recomputed_saves) with q_proj/v_proj adapters plus the wrapped targets, minus the same
  with q_proj/v_proj alone: the wrappers' own share, per layer.

tests/test_lora_moe.py holds memplan's prediction to these numbers (torch-free).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "lora-moe.json"

_SMALL: dict[str, Any] = {
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 777,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
# grouped_mm in bf16 wants 16-byte strides: intermediate 96 (tests/test_finetune_peft.py's)
MIXTRAL: dict[str, Any] = {
    **_SMALL,
    "model_type": "mixtral",
    "intermediate_size": 96,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
QWEN3_MOE: dict[str, Any] = {
    **_SMALL,
    "model_type": "qwen3_moe",
    "intermediate_size": 100,
    "moe_intermediate_size": 40,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "head_dim": 16,
}
FAMILIES = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE}
# peft's v4 names, converted to target_parameters (the family's peft_moe mapping)
TARGETS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "router": ["gate"],
        "gate_up": ["w1", "w3"],
        "down": ["w2"],
        "all-linear": "all-linear",
    },
    "qwen3_moe": {
        "router": ["gate"],
        "gate_up": ["gate_proj", "up_proj"],
        "down": ["down_proj"],
        "all-linear": "all-linear",
    },
}
QV = ["q_proj", "v_proj"]
AMP_BF16_BASE = {
    "preset": "amp-bf16",
    "parameters": "bf16",
    "gradients": "bf16",
    "optimizer_states": "bf16",
}
PRECISIONS: dict[str, Any] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "amp-bf16": "amp-bf16",
    "amp-bf16-base": AMP_BF16_BASE,
    "fp16": "fp16",
}


def spec_doc(
    family: str,
    targets: Any,
    precision: str,
    checkpointing: str,
    **finetune: Any,
) -> dict[str, Any]:
    """The memplan spec of one case (batch 2 x 16 tokens, SDPA, DDP on the CPU)."""
    training: dict[str, Any] = {"micro_batch_size": 2, "sequence_length": 16, "attention": "sdpa"}
    if checkpointing == "full":
        training["activation_checkpointing"] = "full"
    return {
        "model": {"architecture": FAMILIES[family]},
        "precision": PRECISIONS[precision],
        "finetune": {
            "method": "lora",
            "rank": 8,
            "alpha": 16,
            "target_modules": targets,
            **finetune,
        },
        "training": training,
        "parallelism": {"engine": "ddp"},
        "hardware": {"device": "cpu"},
    }


def forward_cases() -> list[dict[str, Any]]:
    out = []
    for family, named in TARGETS.items():
        for target in named:
            for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base"):
                for ck in ("none", "full"):
                    out.append(
                        {"family": family, "target": target, "precision": precision, "ck": ck}
                    )
    # the router's delta on the CPU with 16-bit adapters (Linear.get_delta_weight's fp32
    # cast), fp16 weights, and a router that trains whole beside wrapped experts
    for family in TARGETS:
        for precision in ("bf16", "amp-bf16-base"):
            out.append(
                {
                    "family": family,
                    "target": "router",
                    "precision": precision,
                    "ck": "none",
                    "finetune": {"autocast_adapter_dtype": False},
                }
            )
        out.append(
            {
                "family": family,
                "target": "all-linear",
                "precision": "bf16",
                "ck": "none",
                "finetune": {"autocast_adapter_dtype": False},
            }
        )
        for target in ("router", "gate_up", "down"):
            out.append({"family": family, "target": target, "precision": "fp16", "ck": "none"})
        out.append(
            {
                "family": family,
                "target": "down",
                "precision": "bf16",
                "ck": "none",
                "finetune": {"modules_to_save": ["gate"]},
            }
        )
    return out


def recompute_cases() -> list[dict[str, Any]]:
    return [
        {"family": family, "target": target, "precision": precision}
        for family, named in TARGETS.items()
        for target in ("router", "gate_up", "down", "all-three")
        for precision in ("fp32", "bf16", "amp-bf16", "amp-bf16-base")
    ]


def wrapped_names(family: str, target: str) -> list[str]:
    named = TARGETS[family]
    if target == "all-three":
        return [*named["router"], *named["gate_up"], *named["down"]]
    return list(named[target])


def _model(doc: dict[str, Any]) -> tuple[Any, Any]:
    """The peft model of the case, and its memplan Spec."""
    import torch
    import transformers

    from memplan.config.load import validate
    from memplan.precision import TORCH_NAMES
    from memplan.verify import peft_support

    spec = validate(doc).spec
    config = doc["model"]["architecture"]
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    dtype = getattr(torch, TORCH_NAMES[spec.recipe().parameters])
    # Gemma 2 has no SDPA path in transformers 5.25 (its softcaps): eager, as memplan's
    # family record says (lora_ends.eager_attention)
    attention = "eager" if config["model_type"] == "gemma2" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=dtype, attn_implementation=attention
    )
    if spec.training.activation_checkpointing == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    return peft_support.prepare(spec, model), spec


def _forward(model: Any, spec: Any, hooks: Any = None) -> tuple[Any, Any]:
    """The storages saved by one forward + loss (tests/activation_probe.py's Measured), and
    the loss."""
    import torch

    from memplan.precision import TORCH_NAMES

    recipe = spec.recipe()
    config = model.config
    torch.manual_seed(0)
    t = spec.training
    ids = torch.randint(0, config.vocab_size, (t.micro_batch_size, t.sequence_length))
    cast = (
        torch.autocast("cpu", dtype=getattr(torch, TORCH_NAMES[recipe.compute]))
        if recipe.autocast
        else contextlib.nullcontext()
    )
    extra = hooks if hooks is not None else contextlib.nullcontext()
    with _saved_storages(model) as got, cast, extra:
        loss = model(input_ids=ids, labels=ids.clone(), use_cache=False).loss
    return got, loss


@contextlib.contextmanager
def _saved_storages(model: Any) -> Iterator[Any]:
    """tests/activation_probe.py's saved_storages, with the parameters and buffers taken as
    they are when a tensor is saved, not before the forward: bitsandbytes 0.50.2's
    Linear4bit.forward replaces a bias of another dtype than its compute dtype
    (nn/modules.py: `bias.data = bias.data.to(x.dtype)`, Qwen2-MoE's q/k/v under QLoRA after
    prepare_model_for_kbit_training made them fp32), and a saved tensor allocated where the
    old bias lay was taken for a parameter and left out (measured: one 128 B rstd of the
    bf16 case, qwen2_moe_qlora)."""
    import torch

    from tests.activation_probe import NAMES, Measured, Storage

    def current() -> set[int]:
        return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    skip = current()
    out = Measured()

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in skip and ptr not in current():
            skip.discard(ptr)  # a parameter's old storage, freed: not a parameter now
        if ptr in skip:
            out.parameter_saves += 1
        elif ptr not in out.storages:
            out.storages[ptr] = Storage(storage.nbytes(), tuple(t.shape), NAMES.get(t.dtype, "?"))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def measure_forward(doc: dict[str, Any]) -> int:
    """Bytes saved by one forward + loss of the case's peft model."""
    model, spec = _model(doc)
    return int(_forward(model, spec)[0].bytes)


def measure_storages(doc: dict[str, Any]) -> list[Any]:
    """Each storage saved by one forward + loss (shape, dtype, bytes)."""
    model, spec = _model(doc)
    return list(_forward(model, spec)[0].storages.values())


def measure_recompute(doc: dict[str, Any]) -> list[int]:
    """Per decoder layer, in model order: the bytes of new storages its checkpoint's
    recomputation saves in backward (parameters, buffers and what the forward saved excluded;
    every saved tensor is held to the end, so no storage is freed and its address reused)."""
    import torch

    from memplan.verify.selective import recomputed_saves

    model, spec = _model(doc)
    held: list[Any] = []

    def hold(t: Any) -> Any:
        held.append(t)
        return t

    _, loss = _forward(model, spec, torch.autograd.graph.saved_tensors_hooks(hold, lambda t: t))
    # after the forward: Linear4bit may have replaced a bias in it (_saved_storages)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    forward = {t.untyped_storage().data_ptr() for t in held}
    groups: list[dict[int, int]] = []

    def save(t: Any) -> None:
        held.append(t)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in forward:
            groups[-1].setdefault(ptr, storage.nbytes())

    import torch.utils.checkpoint as checkpoint

    hook = checkpoint._recomputation_hook
    init = hook.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        groups.append({})

    hook.__init__ = counted  # type: ignore[method-assign]
    try:
        with recomputed_saves(save):
            loss.backward()
    finally:
        hook.__init__ = init  # type: ignore[method-assign]
    return [sum(g.values()) for g in reversed(groups)]  # backward runs the last layer first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import peft
    import torch
    import transformers

    start = time.time()
    forward = []
    for case in forward_cases():
        doc = spec_doc(
            case["family"],
            TARGETS[case["family"]][case["target"]],
            case["precision"],
            case["ck"],
            **case.get("finetune", {}),
        )
        forward.append({**case, "measured_bytes": measure_forward(doc)})
        print(forward[-1], flush=True)
    recompute = []
    for case in recompute_cases():
        family, precision = case["family"], case["precision"]
        wrapped = wrapped_names(family, case["target"])
        base = measure_recompute(spec_doc(family, QV, precision, "full"))
        with_wrapped = measure_recompute(spec_doc(family, QV + wrapped, precision, "full"))
        delta = [w - b for w, b in zip(with_wrapped, base, strict=True)]
        recompute.append({**case, "measured_delta_per_layer": delta})
        print(recompute[-1], flush=True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    result = stamp(
        command="python benchmarks/lora_moe.py",
        versions=versions,
        forward=forward,
        recompute=recompute,
        elapsed_s=round(time.time() - start, 1),
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
