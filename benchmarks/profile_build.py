"""Time to build an activation profile (memplan.verify.trace.profile.build) for a 100-layer model.

The trace runs two layers of each structure under FakeTensorMode, in their places in the
full-depth model (memplan.verify.trace.structure), and checks the grouping with one forward of
every layer at one size: building the full-depth fake model (~1 s for 100 Llama-8B layers) and
that check forward (~2 s) grow with the layer count, the fitted traces do not. This times a
Llama-3-8B-shaped config at 100 layers and at 2 layers. Measured (2 shared CPUs, loaded):
before structure.py (7d49b44) 1.15 s sdpa / 1.26 s eager at 100 layers; after (h2) 7.25 s /
5.20 s; 2 layers 0.66 s / 0.87 s both.

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
    for layers in (100, 2):
        for attention in ("sdpa", "eager"):
            started = time.perf_counter()
            doc = build(
                {**LLAMA_8B, "num_hidden_layers": layers},
                stream="bf16",
                matmul="bf16",
                autocast=False,
                attention=attention,
            )
            seconds = time.perf_counter() - started
            counts = doc["model"]["layer_counts"]
            print(f"{layers:>3} layers {attention:5} bf16: {seconds:.2f} s (layer counts {counts})")


if __name__ == "__main__":
    main()
