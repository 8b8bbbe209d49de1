"""What `memplan verify` cannot run with real torch, and why: each refusal is a `MemplanError`
that says what can be verified instead (moved from memplan.verify.job, which calls
`check_supported` while it plans a run; no torch is imported here).
"""

from __future__ import annotations

import importlib.util

from memplan.config.load import installed_version
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.precision import Recipe

# Optimizers verify can build from torch.optim (spec name -> class name). lion and the
# bitsandbytes 8-bit optimizers live in other packages.
TORCH_OPTIMIZERS = {
    "adamw": "AdamW",
    "adam": "Adam",
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adafactor": "Adafactor",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adamax": "Adamax",
}

# Optimizers verify builds from transformers (spec name -> class in transformers.optimization),
# with the keyword arguments the HF Trainer passes (memplan.verify.build.optimizer_kwargs).
TRANSFORMERS_OPTIMIZERS = {"adafactor-hf": "Adafactor"}
# ... and from bitsandbytes (bitsandbytes.optim; paged ones fall back to ordinary tensors on the
# CPU, as memplan.optimizers.is_paged_state has them there).
_BNB = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "adamw": "AdamW", "adam": "Adam"}
BNB_OPTIMIZERS = {
    **{n: c for n, c in _BNB.items() if n.endswith("8bit")},
    **{f"paged_{n}": f"Paged{c}" for n, c in _BNB.items()},
}


def check_supported(spec: Spec, recipe: Recipe) -> None:
    """Refuse what verify cannot realise with real torch, saying what can be verified."""
    par = spec.parallelism
    t = spec.training
    if spec.model.implementation == "torchtitan" or t.activation_checkpointing == "selective-op":
        raise MemplanError(
            "model.implementation: torchtitan (and activation_checkpointing: selective-op, its "
            "per-op SelectiveAC) cannot be verified yet: verify builds transformers' model. "
            "tests/test_torchtitan_activations.py proves the rule on torchtitan's own model.",
            field="model.implementation",
        )
    if spec.model.implementation == "litgpt":
        raise MemplanError(
            "model.implementation: litgpt cannot be verified yet: verify builds transformers' "
            "model. tests/test_litgpt_activations.py proves the rule on LitGPT's own model.",
            field="model.implementation",
        )
    if t.checkpoint_every > 1:
        raise MemplanError(
            "training.checkpoint_every > 1 cannot be verified: transformers checkpoints every "
            "decoder layer. Verify checkpoint_every: 1.",
            field="training.checkpoint_every",
        )
    if par.engine == "deepspeed":
        _check_deepspeed(spec, recipe)
        return
    unsupported = [
        f"{key}: {getattr(par, key)}"
        for key in ("pipeline", "expert", "context")
        if getattr(par, key, 1) != 1
    ]
    offload = getattr(par, "offload", None)
    if offload is not None and (offload.optimizer != "none" or offload.parameters != "none"):
        unsupported.append("offload")
    if par.engine not in ("ddp", "fsdp2", "fsdp1") or unsupported:
        what = f"parallelism.engine: {par.engine}" if not unsupported else ", ".join(unsupported)
        raise MemplanError(
            f"{what} cannot be verified yet: verify runs data parallelism with torch "
            "DDP / ZeroRedundancyOptimizer (engine: ddp) or FSDP2 (engine: fsdp2), tensor "
            "parallelism with torch's DTensor, and no offload. Verify the same model with "
            "those, then trust the per-stage rules.",
            field="parallelism",
        )
    if par.tensor > 1:
        if par.engine == "ddp" and par.stage == 1:
            raise MemplanError(
                "parallelism.tensor > 1 with ZeroRedundancyOptimizer (engine: ddp, zero_stage: "
                "1) cannot be verified: it partitions over every rank, not over the "
                "data-parallel group of a TP layout. Verify zero_stage 0 (ddp) or fsdp2.",
                field="parallelism.zero_stage",
            )
        if spec.finetune.method != "full" or spec.finetune.freeze:
            raise MemplanError(
                "parallelism.tensor > 1 with fine-tuning cannot be verified (peft's adapters "
                "are not sharded by the DTensor plan); verify the full fine-tune's layout.",
                field="finetune",
            )
    name = spec.optimizer.name
    if name in BNB_OPTIMIZERS:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MemplanError(
                f"optimizer {name!r} is bitsandbytes.optim.{BNB_OPTIMIZERS[name]}, and "
                "bitsandbytes is not installed: pip install bitsandbytes to verify it.",
                field="optimizer.name",
            )
    elif name in TRANSFORMERS_OPTIMIZERS:
        if importlib.util.find_spec("transformers") is None:
            raise MemplanError(
                f"optimizer {name!r} is transformers' own "
                f"transformers.optimization.{TRANSFORMERS_OPTIMIZERS[name]}, and transformers "
                "is not installed: pip install 'memplan[verify]' (or transformers) to verify it.",
                field="optimizer.name",
            )
    elif name not in TORCH_OPTIMIZERS:
        raise MemplanError(
            f"optimizer {name!r} is not in torch.optim, so verify cannot build it; verifiable: "
            f"{', '.join([*TORCH_OPTIMIZERS, *TRANSFORMERS_OPTIMIZERS, *BNB_OPTIMIZERS])}.",
            field="optimizer.name",
        )
    at_rest = recipe.master_weights or recipe.parameters
    problems = []
    if recipe.gradients != recipe.parameters:
        problems.append(
            f"gradients ({recipe.gradients}) differ from parameters ({recipe.parameters}); "
            "autograd makes gradients in the parameter dtype"
        )
    if recipe.gradient_accumulation:
        problems.append("a separate gradient_accumulation buffer (Megatron main_grad)")
    if recipe.optimizer_states != at_rest:
        problems.append(
            f"optimizer_states ({recipe.optimizer_states}) differ from the tensor the optimizer "
            f"updates ({at_rest}); torch.optim keeps states like that tensor"
        )
    if problems:
        raise MemplanError(
            f"precision recipe {recipe.name!r} cannot be realised with torch.optim: "
            + "; ".join(problems)
            + ". Verifiable presets: fp32, bf16, fp16, amp-bf16, amp-fp16, bf16-mixed, "
            "fp16-mixed.",
            field="precision",
        )


# The precision presets DeepSpeed's config expresses: its `bf16` / `fp16` sections make the
# module 16-bit with an fp32 master partition; no section keeps everything fp32.
DEEPSPEED_PRESETS = ("fp32", "bf16-mixed", "fp16-mixed")

# DeepSpeed's optimizer names for the spec's (deepspeed/runtime/engine.py::
# _configure_basic_optimizer, 0.19.8: FusedAdam, whose `step` is a Python int).
DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}

# Micro-batches per optimizer step in DeepSpeed's config (memplan.verify.deepspeed_engine):
# two, so that the gradients held between micro-batches (ZeRO-1's full .grad) are measured.
DEEPSPEED_MICRO_BATCHES = 2


def _check_deepspeed(spec: Spec, recipe: Recipe) -> None:
    """What verify runs with DeepSpeed's own engine (memplan.verify.deepspeed_engine)."""
    par = spec.parallelism
    others = [
        f"{key}: {getattr(par, key)}"
        for key in ("tensor", "pipeline", "expert", "context")
        if getattr(par, key, 1) != 1
    ]
    offload = par.offload
    if offload.optimizer != "none" or offload.parameters != "none":
        others.append("offload")
    if others:
        raise MemplanError(
            f"{', '.join(others)} with engine deepspeed cannot be verified yet: verify runs "
            "DeepSpeed's data-parallel ZeRO stages 0-3 without offload.",
            field="parallelism",
        )
    if spec.finetune.method != "full" or spec.finetune.freeze:
        raise MemplanError(
            "engine deepspeed with fine-tuning cannot be verified yet; verify the full "
            "fine-tune's layout.",
            field="finetune",
        )
    if spec.optimizer.name not in DEEPSPEED_OPTIMIZERS:
        raise MemplanError(
            f"optimizer {spec.optimizer.name!r} with engine deepspeed cannot be verified: "
            f"verify hands DeepSpeed's config one of {', '.join(DEEPSPEED_OPTIMIZERS)}.",
            field="optimizer.name",
        )
    if recipe.name not in DEEPSPEED_PRESETS:
        raise MemplanError(
            f"precision {recipe.name!r} with engine deepspeed cannot be verified: DeepSpeed's "
            f"config expresses {', '.join(DEEPSPEED_PRESETS)}.",
            field="precision",
        )
    mics = par.deepspeed.mics_shard_size
    installed = installed_version("deepspeed")
    if par.deepspeed.mics and installed is not None and _release(installed) > (0, 19, 2):
        # 0.19.7+: deepspeed/runtime/config.py::_REMOVED_ZERO_CONFIG_KEYS refuses the key
        # ("MiCS ZeRO-3 sharding has been removed"). 0.19.3-0.19.6: stage3.py::partition_grads
        # tests `contains_real_data` with `_get_param_partition_rank(param)`, the rank in the
        # whole data-parallel group, so every shard group but the first skips MiCS's replica
        # all-reduce (mics.py::MiCS_Optimizer.allreduce_mics_shard_grads) and the ranks of
        # the first wait for it: a hang at the first accumulation boundary (run on 4 gloo
        # ranks with mics_shard_size 2, 0.19.6).
        raise MemplanError(
            f"parallelism.deepspeed.mics_shard_size {mics}: deepspeed {installed} is installed "
            "here, and MiCS does not run on it (0.19.7 removed MiCS; 0.19.3 to 0.19.6 hang at "
            "the first accumulation boundary when there is more than one shard group). verify "
            "runs MiCS on deepspeed 0.19.2: DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 pip install "
            "--no-deps --no-build-isolation --target DIR deepspeed==0.19.2, then run with "
            "PYTHONPATH=DIR.",
            field="parallelism.deepspeed.mics_shard_size",
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise MemplanError(
            "parallelism.engine: deepspeed is verified by running DeepSpeed itself, and it is "
            "not installed here. Install it without its CUDA ops: DS_BUILD_OPS=0 "
            "DS_SKIP_CUDA_CHECK=1 pip install --no-deps deepspeed==0.19.8 hjson msgpack "
            "ninja py-cpuinfo (it runs on the CPU with DS_ACCELERATOR=cpu over gloo).",
            field="parallelism.engine",
        )


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a release string such as "0.19.8" or "0.19.6+cpu"."""
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
