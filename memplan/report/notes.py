"""What an estimate says beside its figures: a sentence per setting the spec asks for that the
engine, the allocator or the model runs otherwise, or that memplan does not model, and the
sequence lengths no tensor could hold (refused)."""

from __future__ import annotations

from memplan import activations as acts
from memplan.config.spec import Spec
from memplan.errors import MemplanError
from memplan.model.sources import Inventory
from memplan.states import fp8
from memplan.states.layout import Layout
from memplan.step import replay as rp
from memplan.step import timeline as tl


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
            "the sequence split of activations is the same, Ulysses' head all-to-all buffers "
            "are not modelled."
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


TORCHAO_NOTE = (
    "fp8 (torchao Float8Linear): each converted Linear saves its 16-bit input and weight, as "
    "nn.Linear does (torchao/float8/float8_linear.py::matmul_with_hp_or_float8_args.forward, "
    "0.18: ctx.save_for_backward(input_hp, weight_hp_t)); compiled layers save less "
    "(training.compile). Not modelled: the fp8 casts of each GEMM's input, weight and output "
    "gradient (1 B per element, transients of one GEMM at a time) and FSDP2's fp8 all-gather "
    "(enable_fsdp_float8_all_gather: unsharded Linear weights 1 B per element, not 2)."
)


def fp8_notes(spec: Spec, local: Inventory, saved: acts.Activations) -> list[str]:
    if spec.precision.fp8 == "none" or not saved.modelled:
        return []
    if spec.precision.fp8 not in fp8.TE_RECIPES:
        return [TORCHAO_NOTE]
    t = fp8.terms(
        local.parameters, tokens=spec.training.micro_batch_size * spec.training.sequence_length
    )
    return [
        f"fp8 ({spec.precision.fp8} scaling): activations follow transformers' 16-bit rules; "
        f"Transformer Engine's Linear modules save their {t.gemms} GEMM inputs in fp8 instead "
        f"({t.input_saved_bytes:,} B per micro-batch where 16-bit inputs take "
        f"{t.input_bf16_bytes:,} B, each GEMM counted once), not applied."
    ]
