"""DeepSpeed's ZeRO model-state estimators (deepspeed.runtime.zero.stage_1_and_2 /
stage3: `estimate_zero2_model_states_mem_needs_all_cold`,
`estimate_zero3_model_states_mem_needs_all_cold`).

The `_all_cold` functions print a table of offload options; each row comes from
`estimate_zero{2,3}_model_states_mem_needs(...)`, which returns bytes. We call the printer
(stdout captured), read the row without offload, and take the exact bytes from the function
it called for that row, checking that the printed GiB figure is the same number.

What it models: model states only (no activations, buffers or padding), for 16-bit mixed
precision with Adam: ZeRO-2 per GPU = 2 x params (16-bit weights) + 18 x params / GPUs
(16-bit and fp32 gradients, fp32 master weights, two fp32 Adam moments); ZeRO-3 adds
4 x the largest layer (gathered) to 18 x params / GPUs. It has no ZeRO-0 or ZeRO-1 estimator
(a replica is the 1-GPU figure) and no input for precision or optimizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re

from . import ADAM, MIXED, NotExpressible, Prediction, Result, Setting, _hf

NAME = "deepspeed"
GIB = 2**30


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _printed_gpu_gib(text: str, options: str) -> float:
    """The per-GPU column of the printed row whose options column is `options`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and re.sub(r"\s+", "", cells[2]) == options:
            return float(cells[1].removesuffix("GB"))
    raise ValueError(f"no row {options!r} in DeepSpeed's table:\n{text}")


def predict(s: Setting) -> Result:
    if s.optimizer not in ADAM:
        return NotExpressible("assumes Adam (fp32 moments)")
    if s.precision not in MIXED:
        return NotExpressible("assumes 16-bit mixed precision")
    if s.engine == "fsdp2":
        stage, gpus = s.stage, s.ranks
    elif s.stage == 0 or s.ranks == 1:
        stage, gpus = 2, 1  # a replica: everything on one GPU
    else:
        return NotExpressible("no ZeRO-1 estimator")

    # Quiet the accelerator probe DeepSpeed logs on import.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.zero import stage3
        from deepspeed.runtime.zero import stage_1_and_2 as stage12

    total, largest = _hf.parameter_counts(s.config)
    out = io.StringIO()
    if stage == 2:
        with contextlib.redirect_stdout(out):
            stage12.estimate_zero2_model_states_mem_needs_all_cold(
                total_params=total, num_gpus_per_node=gpus, num_nodes=1
            )
        _cpu, gpu = stage12.estimate_zero2_model_states_mem_needs(
            total_params=total, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False
        )
        printed = _printed_gpu_gib(out.getvalue(), "offload_optimizer=none")
        how = f"estimate_zero2_model_states_mem_needs_all_cold({total:,} params, {gpus} GPU)"
    else:
        with contextlib.redirect_stdout(out):
            stage3.estimate_zero3_model_states_mem_needs_all_cold(
                total_params=total,
                largest_layer_params=largest,
                num_gpus_per_node=gpus,
                num_nodes=1,
            )
        _cpu, gpu, _largest = stage3.estimate_zero3_model_states_mem_needs(
            total_params=total,
            largest_layer_params=largest,
            num_gpus_per_node=gpus,
            num_nodes=1,
            cpu_offload=False,
            cpu_offload_params=False,
            zero_init=True,
        )
        printed = _printed_gpu_gib(
            out.getvalue(), "offload_param=none,offload_optimizer=none,zero_init=1"
        )
        how = (
            f"estimate_zero3_model_states_mem_needs_all_cold({total:,} params, largest layer "
            f"{largest:,}, {gpus} GPUs)"
        )
    if abs(printed - gpu / GIB) > 0.005 + 1e-9:
        raise AssertionError(f"printed {printed} GB, function returned {gpu / GIB:.4f} GiB")
    return Prediction(
        model_states=int(gpu), total=int(gpu), how=how, extra={"printed_gpu_gb": printed}
    )
