"""What an estimate says beside its figures: a sentence per setting the spec asks for that the
engine, the allocator or the model runs otherwise, or that memplan does not model, and the
sequence lengths no tensor could hold (refused)."""

from __future__ import annotations

from collections.abc import Iterable

from memplan import activations as acts
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.families import _llama_decoder, family_of
from memplan.model.sources import Inventory
from memplan.states import fp8
from memplan.states.layout import Layout
from memplan.step import replay as rp
from memplan.step import timeline as tl

ULYSSES_BUFFERS = "Ulysses' head all-to-all buffers are not modelled"


def allocator_notes(allocator: rp.AllocatorView | None) -> list[str]:
    if allocator is None or allocator.out_of_memory or not allocator.alloc_retries:
        return []
    return [
        f"the caching allocator fits this step only by freeing its cached segments and "
        f"retrying {allocator.alloc_retries} allocation(s) over the replayed init and two steps "
        "(cudaFree and a device synchronize each time; "
        "torch.cuda.memory_stats()['num_alloc_retries']): "
        "expect slow steps, or set hardware.alloc_conf: expandable_segments:True."
    ]


def zero_grad_notes(spec: Spec, layout: Layout) -> list[str]:
    if spec.training.zero_grad == "zero" and layout.engine not in tl.ZEROED_GRADIENT_ENGINES:
        return [
            f"training.zero_grad: zero changes nothing under {layout.engine}: the engine "
            "clears (or keeps) its own gradient buffers inside its step, whatever the "
            "trainer's zero_grad does."
        ]
    return []


# c10/core/StorageImpl.h: a storage's size in bytes is an int64 (SymInt), so no tensor can hold
# more bytes than this; a sequence length that asks for one is a typo, not a plan.
MAX_TENSOR_BYTES = 2**63 - 1


def sequence_notes(spec: Spec, inventory: Inventory, saved: list[acts.Activations]) -> list[str]:
    """Refuse a sequence whose tensors could not exist; note one beyond the model's
    max_position_embeddings."""
    seq = spec.training.sequence_length
    largest = max(
        (
            max(
                [a.logits_bytes, a.upcast_bytes]
                + [t.bytes for b in a.blocks for t in (*b.tensors, *b.recompute)]
            )
            for a in saved
        ),
        default=0,
    )
    if largest > MAX_TENSOR_BYTES:
        raise MemplanError(
            f"{seq:,} tokens make a tensor of {largest:,} bytes, more than a torch tensor can "
            f"hold (2^63 - 1 bytes: c10 StorageImpl's int64 size); use a realistic "
            "sequence length.",
            field="training.sequence_length",
        )
    arch = inventory.architecture
    limit = arch.max_position_embeddings if arch else 0
    if not limit or seq <= limit:
        return []
    if any(t.role == "position" for t in inventory.parameters):
        # A learned position table has max_position_embeddings rows: nn.Embedding fails on
        # a position past it (IndexError in the forward).
        raise MemplanError(
            f"{seq:,} tokens is beyond the model's max_position_embeddings={limit:,}: its "
            f"learned position embeddings have {limit:,} rows, so the forward fails; use at "
            f"most {limit:,}.",
            field="training.sequence_length",
        )
    return [
        f"training.sequence_length {seq:,} is beyond the model's max_position_embeddings="
        f"{limit:,}: rotary/relative positions run, but the model was not trained that long "
        "(scale RoPE, e.g. rope_scaling, and expect to fine-tune for it); memory is "
        "computed as given."
    ]


def engine_notes(par: Layout) -> list[str]:
    """What the engine really runs where the spec asks for something it does differently."""
    notes = []
    if (
        par.engine == "fsdp2"
        and par.offload.optimizer == "cpu"
        and par.offload.parameters == "none"
    ):
        # torch/distributed/fsdp/_fully_shard/_fsdp_api.py::CPUOffloadPolicy (2.13): one policy
        # for the sharded parameters, their gradients and the optimizer states together.
        notes.append(
            "FSDP2 has no optimizer-only offload: CPUOffloadPolicy moves the sharded parameters "
            "and gradients to the CPU as well, and this estimate offloads them too."
        )
    if par.engine == "deepspeed" and par.context > 1:
        # deepspeed/sequence/layer.py::DistributedAttention (0.19.8): DeepSpeed's sequence
        # parallelism is Ulysses (all-to-all over attention heads); it has no ring attention.
        notes.append(
            "DeepSpeed has no ring context parallelism: its sequence parallelism is Ulysses "
            "(deepspeed/sequence/layer.py::DistributedAttention, all-to-all over heads). "
            "parallelism.context is modelled as a ring (Megatron CP / torch context_parallel): "
            f"the sequence split of activations is the same, {ULYSSES_BUFFERS}."
        )
    if par.async_tp:
        notes.append(ASYNC_TP_NOTE)
    return notes


ASYNC_TP_NOTE = (
    "async_tp: the TP group's symmetric-memory workspace is outside the caching allocator "
    "(per_gpu.device_terms: symmetric_memory_workspace), so it adds to device_used, not to "
    "reserved. Allocated and reserved are modelled as without it: the fused ops take from the "
    "caching allocator what the unfused ones did (torch 2.13 _symmetric_memory/__init__.py: "
    "_fused_all_gather_matmul_impl allocates the whole gathered A even with return_A=False, "
    "and each [tokens, N] output; _fused_matmul_reduce_scatter_impl the [tokens, N] "
    "stacked partials and the reduced shard). What they avoid, functional collectives' "
    "chunk + cat copies for a gather / scatter along the sequence dimension "
    "(torch 2.13 _functional_collectives.py all_gather_single, reduce_scatter_single: a copy "
    "whenever the batch is > 1), is not itemized in "
    "memplan's per-layer working set; torchtitan measured max reserved 4.3 GiB lower with "
    "AsyncTP on Llama 3.1 70B (FSDP 32 x TP 8), of which those copies account for 0 to 1.0 GiB "
    "in an op-by-op replay (benchmarks/async_tp_trace.py)."
)


TORCHAO_CASTS_UNMODELLED = (
    " Not modelled: the fp8 casts of each GEMM's input, weight and output "
    "gradient, transients of one GEMM at a time, each holding two fp32 copies of its tensor "
    "and the 1 B result as it ends (float8_training_tensor.py::_ToFloat8ConstrFunc.forward: "
    "`tensor.to(float32) * scale`, clamp, .to(fp8); modelled for torchtitan's model code: "
    "benchmarks/results/torchtitan-float8-activations.json, torchtitan-float8-tp-activations."
    "json)."
)
"""TORCHAO_NOTE's sentence where the step has no float8_cast_* buffer (the casts are counted
for torchtitan's eager model code: memplan.activations.torchtitan_float8_gemm, and under its
Float8 TP styles: memplan.activations.torchtitan_float8)."""

TORCHAO_NOTE = (
    "fp8 (torchao Float8Linear): each converted Linear saves its 16-bit input and weight, as "
    "nn.Linear does (torchao/float8/float8_linear.py::matmul_with_hp_or_float8_args.forward, "
    "0.18: ctx.save_for_backward(input_hp, weight_hp_t)); compiled layers save less "
    "(training.compile)." + TORCHAO_CASTS_UNMODELLED + " FSDP2's fp8 all-gather "
    "(torchao enable_fsdp_float8_all_gather: unsharded Float8Linear weights 1 B per element, "
    "not 2) is precision.fp8_all_gather: off here."
)

TORCHAO_ALL_GATHER_NOTE = (
    "fp8_all_gather (torchao enable_fsdp_float8_all_gather, 0.18): FSDP2 gathers each decoder "
    "layer's Float8Linear weights in fp8, so their all-gather output and unsharded storage are "
    "1 B per element (a group mixing fp8 and 16-bit parameters is gathered as uint8 bytes: "
    "torch 2.13 _fsdp_collectives.py::_get_all_gather_input_metadatas), and the GEMMs get the "
    "weight already in fp8 (no weight cast in forward or for the input gradient); each "
    "weight's shard is cast before the all-gather (fsdp2_fp8_weight_cast: two fp32 copies and "
    "the fp8 shard at most; measured to the byte on gloo ranks, "
    "benchmarks/results/fsdp2-float8-all-gather.json, and under DTensor TP with torchao's "
    "Float8 TP styles on each rank's TP-local weights, benchmarks/results/fsdp2-float8-tp.json)."
    " Not counted: each unsharded weight's "
    "fp32 scale without precomputed scales (4 B, a 512 B block on CUDA). "
    "force_recompute_fp8_weight_in_bwd changes nothing at torchao 0.18 (nor since 2025-06-13, "
    "pytorch/ao#2356: float8/config.py only warns that it is deprecated)."
)


def precompute_note(n_bytes: int) -> str:
    """precision.fp8_precompute_scale's bytes (memplan.states.engines.fsdp2.fp8.SRC_PRECOMPUTE)."""
    return (
        f"fp8_precompute_scale: precompute_float8_dynamic_scale_for_fsdp keeps one fp32 scale "
        f"per Float8Linear weight between steps, {n_bytes:,} B here (one tensor; on CUDA a "
        "512 B block at least), not added; its temporaries while it runs after the optimizer "
        "step (the weights' infinity norms stacked, an fp64 copy and the scales) are as small, "
        "and the weights' casts keep no scale of their own."
    )


def _torchao_scope(spec: Spec, local: Inventory) -> list[str]:
    """What torchao Float8 does not reach in this spec's model code, said beside its notes."""
    out = []
    arch = local.architecture
    family = family_of(arch.model_type) if arch else None
    if arch and family and family.conv1d:
        out.append(
            "fp8: torchao's convert_to_float8_training swaps nn.Linear modules only (0.18 "
            f"float8/float8_linear_utils.py), and {arch.model_type}'s "
            f"{', '.join(sorted(family.conv1d))} are transformers' Conv1D: they run and are "
            "gathered in 16-bit."
        )
    if spec.model.implementation == "torchtitan" and spec.precision.fp8 == "torchao-tensorwise":
        out.append(
            "fp8: torchtitan 0.3.0's Float8LinearConverter takes the rowwise recipes only "
            "(components/quantization/float8.py: recipe_name rowwise or rowwise_with_gw_hp); "
            "tensorwise scaling, its fp8 all-gather and precomputed scales are modelled as "
            "torchao 0.18 runs them under the torchtitan that offered them (018740b: "
            "float8.enable_fsdp_float8_all_gather)."
        )
        if spec.parallelism.tensor > 1:
            out.append(
                "fp8 under tensor parallelism: torchtitan (018740b apply_tp, "
                "enable_float8_tensorwise_tp) gives tensorwise recipes torchao's Float8 TP "
                "styles, which cast the decoder layers' Linear inputs to fp8 before the "
                "sequence-parallel all-gather: those inputs are saved in fp8, not 16-bit, and "
                "each layer's largest cast is counted (float8_cast_forward / _backward; "
                "memplan.activations.torchtitan_float8, measured on gloo ranks); MoE models "
                "keep the 16-bit rule (not measured)."
            )
    return out


def fp8_notes(spec: Spec, local: Inventory, saved: acts.Activations) -> list[str]:
    if spec.precision.fp8 == "none" or not saved.modelled:
        return []
    if spec.precision.fp8 not in fp8.TE_RECIPES:
        out = [*_torchao_scope(spec, local)]
        note = TORCHAO_NOTE
        if any(b.name.startswith("float8_cast_") for b in saved.buffers):
            note = note.replace(TORCHAO_CASTS_UNMODELLED, "")
        if not spec.precision.fp8_all_gather:
            return [note, *out]
        out = [note.split(" FSDP2's fp8 all-gather")[0], TORCHAO_ALL_GATHER_NOTE, *out]
        if spec.precision.fp8_precompute_scale:
            # Imported here: only an FSDP2 spec loads the engine's rules (tests/test_startup.py).
            from memplan.states.engines.fsdp2 import fp8 as fsdp2_fp8

            tensor = spec.parallelism.tensor
            out.append(precompute_note(fsdp2_fp8.precompute_bytes(local.parameters, tensor)))
        return out
    t = fp8.terms(
        local.parameters, tokens=spec.training.micro_batch_size * spec.training.sequence_length
    )
    return [
        f"fp8 ({spec.precision.fp8} scaling): activations follow transformers' 16-bit rules; "
        f"Transformer Engine's Linear modules save their {t.gemms} GEMM inputs in fp8 instead "
        f"({t.input_saved_bytes:,} B per micro-batch where 16-bit inputs take "
        f"{t.input_bf16_bytes:,} B, each GEMM counted once), not applied."
    ]


NOT_MODELLED: tuple[tuple[str, str], ...] = (
    (TORCHAO_CASTS_UNMODELLED.strip(), "torchao's fp8 casts"),
    (_llama_decoder.CUDA_MASK_PADDING, "the memory-efficient kernel's padded mask"),
    (ULYSSES_BUFFERS, "Ulysses' all-to-all buffers"),
)
"""(the sentence a note carries, a short name) for each memory term the figure leaves out
that would add to it: the verdict names them (Report.not_modelled, hardware.not_modelled)."""


def not_modelled(said: Iterable[str]) -> tuple[str, ...]:
    """The short names of the terms `said` (an estimate's notes) leaves out, in NOT_MODELLED's
    order: a "fits" beside them is on a partial figure, and says so."""
    text = "\n".join(said)
    return tuple(name for sentence, name in NOT_MODELLED if sentence in text)
