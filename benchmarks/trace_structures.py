"""Profiles of models with several layer structures against real CPU tensors (issue 18).

For each tiny config (DeepSeek-V3 and GLM-4.5 dense-first layers, Qwen MoE `mlp_only_layers` /
`decoder_sparse_step`, Llama 4 interleaved MoE + NoPE + chunked attention, Llama 4 NoPE only,
DeepSeek-V3.2's `mlp_layer_types`), eager and sdpa, bf16 (the MoE meta kernel's dtype): the
profile's bytes (memplan.verify.trace.profile.build, two layers per structure found by
memplan.verify.trace.structure) against the bytes of the storages real tensors saved for
backward still hold when forward + loss returns (tests/test_trace_structure.py::_alive_bytes),
at two sizes the fit never saw; the layer groups found; the build time.

    PYTHONPATH=$PWD python benchmarks/trace_structures.py   # ~3 min on 2 cores
    # writes benchmarks/results/trace_structures.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.stamp import stamp  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.test_trace_structure import (  # noqa: E402
    BASE,
    CONFIGS,
    MOE,
    _alive_bytes,
    _hf_config,
    _setting,
)

MORE: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        **BASE,
        "num_hidden_layers": 4,
        "num_experts": 4,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [3],
        **MOE,
    },
    # every layer MLA + the DSA indexer; `mlp_layer_types` from first_k_dense_replace
    # (configuration_deepseek_v32.py); MLA expands keys to every head: no num_key_value_heads
    "deepseek_v32": {
        "model_type": "deepseek_v32",
        **{k: v for k, v in BASE.items() if k != "num_key_value_heads"},
        "num_hidden_layers": 4,
        "n_routed_experts": 4,
        "q_lora_rank": 6,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
        "index_head_dim": 16,
        "index_n_heads": 2,
        "index_topk": 16,
        **MOE,
    },
}
SIZES = ((3, 37), (1, 50))
OUT = ROOT / "benchmarks" / "results" / "trace_structures.json"


def main() -> None:
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    rows: list[dict[str, Any]] = []
    for name, config in {**CONFIGS, **MORE}.items():
        for attention in ("eager", "sdpa"):
            row: dict[str, Any] = {"config": name, "attention": attention}
            started = time.perf_counter()
            try:
                doc = tracer.build(
                    config, stream="bf16", matmul="bf16", autocast=False, attention=attention
                )
            except Exception as err:  # noqa: BLE001 - recorded, the row says why
                row["error"] = f"{type(err).__name__}: {err}"
                rows.append(row)
                print(name, attention, row["error"], flush=True)
                continue
            row["build_seconds"] = round(time.perf_counter() - started, 2)
            row["layer_groups"] = doc["model"]["layer_groups"]
            traced = profile.from_document(json.loads(json.dumps(doc)), origin=name)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(
                _hf_config(config), dtype=torch.bfloat16, attn_implementation=attention
            )
            model.train()
            row["sizes"] = []
            for batch, seq in SIZES:
                st = _setting(batch, seq, attention)
                predicted = traced.activations(st, num_layers=config["num_hidden_layers"]).bytes
                measured = _alive_bytes(model, batch=batch, sequence=seq)
                row["sizes"].append(
                    {
                        "batch": batch,
                        "sequence": seq,
                        "profile_bytes": predicted,
                        "real_bytes": measured,
                        "ratio": round(predicted / measured, 6),
                    }
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {
        "stamp": stamp(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": "PYTHONPATH=$PWD python benchmarks/trace_structures.py",
        "rows": rows,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
