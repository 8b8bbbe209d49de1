"""Run by tests/test_deepspeed_hierarchy.py in a child process: DeepSpeed's optimizers on one
gloo rank (a tiny bf16 model) in each case, printing as JSON the dtypes of the reduction
buckets each allocates (stage 1/2: in `setup_buckets` at the first gradient hook; stage 3: at
init). A child process, because deepspeed.initialize patches torch globally (ZeRO-3's
parameter hooks and linear wrapper) for the rest of the process."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

CASES: list[tuple[dict[str, Any], str | None, str | None]] = [
    # (zero_optimization, grad_accum_dtype, communication_data_type)
    ({"stage": 1, "offload_optimizer": {"device": "cpu"}}, "fp32", None),
    ({"stage": 2}, "fp32", None),
    ({"stage": 3}, "fp32", None),
    ({"stage": 3}, None, "fp32"),
]


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": sys.argv[1], "LOCAL_RANK": "0",
         "RANK": "0", "WORLD_SIZE": "1"}
    )  # fmt: skip
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    width = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    out = []
    for zero, accumulate, communication in CASES:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {**zero, "reduce_bucket_size": 1000},
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        if accumulate:
            config["data_types"] = {"grad_accum_dtype": accumulate}
        if communication:
            config["communication_data_type"] = communication
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        ds_opt = engine.optimizer
        seen: list[torch.dtype] = []
        if zero["stage"] < 3:
            setup = ds_opt.setup_buckets

            def recorded(setup: Any = setup, ds_opt: Any = ds_opt, seen: list[Any] = seen) -> None:
                setup()
                seen.extend(b.dtype for k in ds_opt.ipg_buckets.values() for b in k.buffer)

            ds_opt.setup_buckets = recorded
            x = torch.randn(1, 8, dtype=torch.bfloat16)
            engine.backward(engine(x).float().sum())
        else:
            seen.extend(b.buffer.dtype for b in ds_opt.ipg_buckets.values())
        out.append(sorted({width[d] for d in seen}))
    dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
