"""Does QLoRA train under torch's FSDP on CPU gloo ranks? (issue 19)

    PYTHONPATH=. python benchmarks/qlora_fsdp_probe.py   # about 3 min on 2 cores; writes
                                                         # benchmarks/results/qlora-fsdp-probe.json

HF's FSDP-QLoRA recipe (bitsandbytes 0.50.2 docs/source/fsdp_qlora.md) loads the model with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=<the load dtype>) so that FSDP
can shard the packed 4-bit weights, then wraps it in peft LoRA. Each setting here builds the
verify table's tiny Llama that way (bf16, nf4, double quantization, LoRA r=8 on every Linear),
shards it on two gloo ranks with FSDP2 (`fully_shard` per decoder layer and the root) or FSDP1
(FullyShardedDataParallel, use_orig_params=True, a decoder-layer wrap policy,
device_id=cpu: memplan.verify.fsdp1_engine), and runs two AdamW steps. It records whether it
runs, the error if not, and one packed weight as each rank holds it. What runs is then
measured tensor by tensor by `memplan verify` (benchmarks/qlora_verify.py's FSDP2 cases).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import stamp  # noqa: E402
from benchmarks.verify_table import TINY_LLAMA  # noqa: E402

# (name, engine, bnb_4bit_quant_storage, prepare_model_for_kbit_training)
SETTINGS: list[tuple[str, str, str, bool]] = [
    ("FSDP2, quant_storage bf16", "fsdp2", "bfloat16", False),
    ("FSDP2, quant_storage uint8", "fsdp2", "uint8", False),
    ("FSDP2, quant_storage bf16, prepare_model_for_kbit_training", "fsdp2", "bfloat16", True),
    ("FSDP1 (use_orig_params), quant_storage bf16", "fsdp1", "bfloat16", False),
]
PROBED = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"


def _model(folder: str, storage: str, prepare: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=getattr(torch, storage),
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )
    model.train()
    if prepare:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, lora)


def _held(model: Any) -> str:
    for name, p in model.named_parameters():
        if name.endswith(PROBED.removeprefix("base_model.model.")):
            local = p.to_local() if hasattr(p, "to_local") else p
            return f"{type(p).__name__} {tuple(p.shape)} {p.dtype}, local {tuple(local.shape)}"
    return "not found"


def _rank(rank: int, setting: int, folder: str, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    name, engine, storage, prepare = SETTINGS[setting]
    result: dict[str, Any] = {"name": name, "rank": rank}
    try:
        model = _model(folder, storage, prepare)
        if engine == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer

            model = FullyShardedDataParallel(
                model,
                use_orig_params=True,
                auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                device_id=torch.device("cpu"),
            )
        result["packed_weight"] = _held(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        ids = torch.randint(0, 1041, (2, 16), generator=torch.Generator().manual_seed(rank))
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(float(loss), 4))
        result.update(runs=True, losses=losses)
    except Exception as e:  # the outcome is what this probe records
        result.update(runs=False, error=f"{type(e).__name__}: {e}"[:600])
        result["raised_in"] = traceback.extract_tb(e.__traceback__)[-1].filename.split(
            "site-packages/"
        )[-1]
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import bitsandbytes
    import peft
    import torch
    import torch.multiprocessing as mp
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = []
    with tempfile.TemporaryDirectory(prefix="memplan-qlora-fsdp-") as folder:
        config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(folder)
        for i, (name, *_) in enumerate(SETTINGS):
            out = os.path.join(folder, f"result{i}")
            mp.spawn(_rank, args=(i, folder, out, 29620 + i), nprocs=2, join=True)
            ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
            print(f"{'runs' if ranks[0]['runs'] else 'FAILS'} {name}: {ranks[0]}")
            settings.append({"name": name, "ranks": ranks})
    doc = {
        **stamp(),
        "command": "python benchmarks/qlora_fsdp_probe.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "settings": settings,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "qlora-fsdp-probe.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
