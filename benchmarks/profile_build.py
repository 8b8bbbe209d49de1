"""Time to build an activation profile (memplan.verify.trace.profile.build) for a 100-layer model.

The trace runs two layers of each kind under FakeTensorMode, so the time should not depend on
the layer count: this times a Llama-3-8B-shaped config at 100 layers and at 2 layers, for the
CPU kernels and for the CUDA kernels emulated on the CPU build (device=cuda,
memplan.verify.trace.cuda).

    PYTHONPATH=$PWD python benchmarks/profile_build.py
"""

from __future__ import annotations

import time

from memplan.verify.trace.profile import build

LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}


def main() -> None:
    started = time.perf_counter()
    build(
        {**LLAMA_8B, "num_hidden_layers": 2},
        stream="bf16",
        matmul="bf16",
        autocast=False,
        attention="sdpa",
    )
    print(f"warm-up (imports, first FakeTensorMode): {time.perf_counter() - started:.2f} s")
    for device in ("cpu", "cuda"):
        for layers in (100, 2):
            for attention in ("sdpa", "eager"):
                started = time.perf_counter()
                doc = build(
                    {**LLAMA_8B, "num_hidden_layers": layers},
                    stream="bf16",
                    matmul="bf16",
                    autocast=False,
                    attention=attention,
                    device=device,
                )
                seconds = time.perf_counter() - started
                counts = doc["model"]["layer_counts"]
                print(
                    f"{layers:>3} layers {attention:5} bf16 {device:4}: {seconds:.2f} s "
                    f"(layer counts {counts})"
                )


if __name__ == "__main__":
    main()
