"""Profiles of mixed layer structures, non-LM heads and encoder-decoders against real CPU tensors.

Issue 18. For each tiny config, eager and sdpa: mixed structures in bf16 (the MoE meta kernel's
dtype: DeepSeek-V3 and GLM-4.5 dense-first layers, Qwen MoE `mlp_only_layers` /
`decoder_sparse_step`, Llama 4 interleaved MoE + NoPE + chunked attention, Llama 4 NoPE only,
DeepSeek-V3.2's `mlp_layer_types`), heads (BERT sequence / token classification and QA, Llama
sequence classification) and encoder-decoders (T5, BART) in fp32 and bf16: the profile's bytes
(memplan.verify.trace.profile.build) against the bytes of the storages real tensors saved for
backward still hold when forward + loss returns (tests/test_trace_heads.py::_alive_bytes), at
two sizes the fit never saw; the layer groups found; the build time.

    PYTHONPATH=$PWD python benchmarks/trace_structures.py   # ~10 min on 2 cores
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
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import heads  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.test_trace_heads import CONFIGS as HEADS  # noqa: E402
from tests.test_trace_heads import SEQ2SEQ, _alive_bytes  # noqa: E402
from tests.test_trace_structure import BASE, CONFIGS, MOE, _hf_config  # noqa: E402


def _setting(batch: int, seq: int, attention: str, precision: str) -> Setting:
    return Setting(
        batch=batch,
        sequence=seq,
        stream=precision,
        matmul=precision,
        autocast=False,
        device="cpu",
        attention=attention,  # type: ignore[arg-type]
        dropout=None,
        checkpointing="none",
        transformers=transformers.__version__.rsplit(".", 1)[0],
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
    # (configuration_deepseek_v32.py); MLA expands keys to every head (4 of 4)
    "deepseek_v32": {
        "model_type": "deepseek_v32",
        **BASE,
        "num_key_value_heads": 4,
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
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases() -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, config, attention, precision): mixed structures in bf16 (MoE), heads and
    encoder-decoders in fp32 and bf16; eager and sdpa throughout."""
    out = []
    for attention in ("eager", "sdpa"):
        for name, config in {**CONFIGS, **MORE}.items():
            out.append((name, config, attention, "bf16"))
        for precision in ("fp32", "bf16"):
            for name, config in {**HEADS, **SEQ2SEQ}.items():
                out.append((name, config, attention, precision))
    return out


def real_model(config: dict[str, Any], attention: str, precision: str) -> Any:
    kind, cls = heads.head_class(config)
    cfg = _hf_config(config)
    torch.manual_seed(0)
    kwargs = {"dtype": DTYPE[precision], "attn_implementation": attention}
    if getattr(cfg, "is_encoder_decoder", False):
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg, **kwargs)
    elif cls is not None and kind != "lm":
        model = cls._from_config(cfg, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg, **kwargs)
    model.train()
    return model


def main() -> None:
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    rows: list[dict[str, Any]] = []
    for name, config, attention, precision in cases():
        row: dict[str, Any] = {"config": name, "attention": attention, "precision": precision}
        started = time.perf_counter()
        try:
            doc = tracer.build(
                config, stream=precision, matmul=precision, autocast=False, attention=attention
            )
        except Exception as err:  # noqa: BLE001 - recorded, the row says why
            row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            print(name, attention, row["error"], flush=True)
            continue
        row["build_seconds"] = round(time.perf_counter() - started, 2)
        row["head"] = doc["model"]["head"]
        row["layer_groups"] = doc["model"]["layer_groups"]
        traced = profile.from_document(json.loads(json.dumps(doc)), origin=name)
        model = real_model(config, attention, precision)
        row["sizes"] = []
        for batch, seq in SIZES:
            st = _setting(batch, seq, attention, precision)
            layers = sum(doc["model"]["layer_counts"].values())
            predicted = traced.activations(st, num_layers=layers).bytes
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
    exact = sum(all(x["ratio"] == 1.0 for x in r.get("sizes", [])) and "sizes" in r for r in rows)
    doc = {
        "stamp": stamp(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": "PYTHONPATH=$PWD python benchmarks/trace_structures.py",
        "summary": f"{exact} of {len(rows)} cases exact at both sizes",
        "rows": rows,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["summary"])
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
