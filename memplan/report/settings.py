"""What the calculator reads of a spec: the activation setting, the layout, the step's settings
and the GPU's capacity, with the checks a spec's combination of keys must pass first. Pure: no
I/O, no torch."""

from __future__ import annotations

from typing import Literal

from memplan import versions
from memplan.activations import Setting
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.hardware import CATALOG
from memplan.states.layout import Layout
from memplan.step import timeline as tl


def capacity_of(spec: Spec) -> int | None:
    """GPU memory of one device: hardware.memory, else the catalog's for hardware.gpu."""
    if spec.hardware.memory is None and spec.hardware.gpu:
        return CATALOG[spec.hardware.gpu].memory_bytes
    return spec.hardware.memory


def step_settings(spec: Spec, layout: Layout) -> tl.StepSettings:
    """What the step's timeline reads of the spec."""
    check_fp8_all_gather(spec, layout)
    return tl.StepSettings(
        layout=layout,
        recipe=spec.recipe(),
        optimizer=spec.optimizer,
        accumulation_steps=spec.training.gradient_accumulation_steps,
        device=spec.hardware.device,
        gpu=spec.hardware.gpu,
        cuda_context_bytes=spec.hardware.cuda_context,
        fp8=spec.precision.fp8,
        finetune=spec.finetune,
        fp8_all_gather=spec.precision.fp8_all_gather,
        fp8_precompute_scale=spec.precision.fp8_precompute_scale,
        zero_grad=spec.training.zero_grad,
    )


def check_fp8_all_gather(spec: Spec, layout: Layout) -> None:
    """precision.fp8_all_gather is an FSDP2 all-gather extension (torch 2.13
    _fsdp_param.py::FSDPParam.all_gather_inputs calls the weight's fsdp_pre_all_gather): it
    needs FSDP2 and torchao's Float8Linear, which memplan models in the decoder layers of
    transformers' and torchtitan's model code."""
    if not spec.precision.fp8_all_gather:
        return
    if layout.engine != "fsdp2":
        raise MemplanError(
            "fp8_all_gather is torchao's enable_fsdp_float8_all_gather: the Float8Linear "
            "weights' fsdp_pre_all_gather / fsdp_post_all_gather hooks, which only torch "
            f"FSDP2 (fully_shard) calls; parallelism.engine is {layout.engine}: set engine: "
            "fsdp2, or fp8_all_gather: false.",
            field="precision.fp8_all_gather",
        )
    if spec.model.implementation not in ("transformers", "torchtitan"):
        raise MemplanError(
            "fp8_all_gather gathers torchao Float8Linear weights, which memplan models in "
            "transformers' and torchtitan's decoder layers only; model.implementation is "
            f"{spec.model.implementation}: set fp8_all_gather: false.",
            field="precision.fp8_all_gather",
        )


def setting_of(spec: Spec) -> Setting:
    """The activation setting a spec describes.

    Under autocast (amp-* recipes) the model's parameters, embeddings and residual stream stay
    in the parameter dtype and matmuls run in the compute dtype; otherwise the model is cast to
    the compute dtype and everything runs in it.
    """
    check_moe_dispatcher(spec)
    recipe = spec.recipe()
    t = spec.training
    # Megatron-Core runs its model cast to the compute dtype (megatron/core/transformer/
    # module.py::Float16Module, 0.12), never under autocast.
    megatron = spec.model.implementation == "megatron-core"
    autocast = recipe.autocast and not (_torchtitan_fsdp(spec) or _litgpt_fsdp(spec) or megatron)
    stream = recipe.parameters if autocast else recipe.compute
    fp32 = not autocast and _kbit_prepared(spec)
    return Setting(
        batch=t.micro_batch_size,
        sequence=t.sequence_length,
        stream="fp32" if fp32 else stream,
        matmul="fp32" if fp32 else recipe.compute,
        autocast=autocast,
        device=spec.hardware.device,
        attention=t.attention,
        dropout=t.dropout,
        checkpointing=t.activation_checkpointing,
        offload=t.activation_offload,
        transformers=versions.rules_release(spec.model.transformers_version),
        implementation=spec.model.implementation,
        megatron_spec=spec.model.megatron_spec or "local",
        moe_dispatcher=spec.parallelism.moe_dispatcher or "allgather",
        checkpoint_every=t.checkpoint_every,
        compile=t.compile,
        compile_loss=(
            t.compile_loss
            if t.compile_loss is not None
            else t.compile and spec.model.implementation == "torchtitan"
        ),
        float8=_torchao_float8(spec.precision.fp8),
        softmax_input=t.softmax_saves_input,
    )


def _kbit_prepared(spec: Spec) -> bool:
    """QLoRA under peft's prepare_model_for_kbit_training (transformers' model): every
    parameter but the 4-bit weights is fp32 (peft 0.21 utils/other.py::
    prepare_model_for_kbit_training casts each fp16/bf16 one), so the embeddings, norms, head
    and adapters run in fp32, and bitsandbytes' Linear4bit hands back its input's dtype (nn/
    modules.py::Linear4bit.forward, 0.50: the input cast to bnb_4bit_compute_dtype for the
    matmul, `.to(inp_dtype)` after): without autocast the whole stream is fp32, as in an fp32
    LoRA run (measured by `memplan verify` on the CPU: tests/test_qlora_verify.py)."""
    ft = spec.finetune
    return spec.model.implementation == "transformers" and ft.method == "qlora" and ft.prepare_kbit


def _torchtitan_fsdp(spec: Spec) -> bool:
    """torchtitan applies its mixed precision through FSDP2's `param_dtype` when it shards
    (data > 1 or context > 1): the model then runs wholly in the compute dtype, with no
    autocast; only under DDP or one device does it use torch.autocast (torchtitan/config/
    configs.py::Training.mixed_precision_param docstring, 0.3.0)."""
    par = spec.parallelism
    return (
        spec.model.implementation == "torchtitan"
        and par.engine == "fsdp2"
        and (par.data > 1 or par.context > 1)
    )


def _litgpt_fsdp(spec: Spec) -> bool:
    """LitGPT shards with Lightning's FSDPStrategy when it runs on more than one device; its
    FSDPPrecision("bf16-mixed") gives FSDP `param_dtype` bf16 (lightning/fabric/plugins/
    precision/fsdp.py::FSDPPrecision.mixed_precision_config, lightning 2.6), so the model runs
    in the compute dtype and the autocast around it casts nothing it runs."""
    par = spec.parallelism
    return (
        spec.model.implementation == "litgpt" and par.engine in ("fsdp2", "fsdp1") and par.data > 1
    )


def _torchao_float8(fp8_recipe: str) -> Literal["none", "tensorwise", "rowwise"]:
    """precision.fp8's torchao scaling, or none (Transformer Engine's recipes, no fp8)."""
    if fp8_recipe == "torchao-tensorwise":
        return "tensorwise"
    if fp8_recipe == "torchao-rowwise":
        return "rowwise"
    return "none"


def layout_of(spec: Spec) -> Layout:
    """The layout `spec.parallelism` describes, on `spec.hardware.device`."""
    check_async_tp(spec)
    return Layout.of(
        spec.parallelism, device=spec.hardware.device, implementation=spec.model.implementation
    )


def check_moe_dispatcher(spec: Spec) -> None:
    """parallelism.moe_dispatcher names Megatron-Core's token dispatcher: other model code
    has its own (torchtitan's EP always runs all-to-all; transformers' MoE none)."""
    chosen = spec.parallelism.moe_dispatcher
    if chosen is not None and spec.model.implementation != "megatron-core":
        raise MemplanError(
            f"moe_dispatcher {chosen} picks Megatron-Core's MoE token dispatcher "
            "(--moe-token-dispatcher-type), but model.implementation is "
            f"{spec.model.implementation}: set model.implementation: megatron-core, or leave "
            "moe_dispatcher out (torchtitan's expert parallelism always runs its all-to-all "
            "dispatcher).",
            field="parallelism.moe_dispatcher",
        )


def check_async_tp(spec: Spec) -> None:
    """parallelism.async_tp as torchtitan runs it: its own model code, compiled
    (9dec370 parallelize_llama.py: "Async TP requires --training.compile"; the fusion is an
    Inductor pass), on CUDA (symmetric memory needs CUDA's virtual memory API)."""
    par = spec.parallelism
    if not par.async_tp:
        return
    why = [
        text
        for text, wrong in (
            ("model.implementation: torchtitan", spec.model.implementation != "torchtitan"),
            ("training.compile: true", not spec.training.compile),
            ("hardware.device: cuda", spec.hardware.device != "cuda"),
            (
                "tensor > 1, sequence_parallel: true and engine: fsdp2",
                not (par.tensor > 1 and par.sequence_parallel and par.engine == "fsdp2"),
            ),
        )
        if wrong
    ]
    if why:
        raise MemplanError(
            "async_tp is torchtitan's enable_async_tensor_parallel: an Inductor pass "
            "(torch._inductor.config._micro_pipeline_tp) over its compiled blocks, with "
            "CUDA symmetric memory; memplan models it only as torchtitan runs it: set "
            + "; ".join(why)
            + ", or leave async_tp out.",
            field="parallelism.async_tp",
        )
