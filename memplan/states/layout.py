"""The layout of a training job: one frozen value, built once from the spec's `parallelism`.

Every stage reads the layout from this value: the parallel degrees, the engine and its ZeRO
stage, whose tensor-parallel layers run (Megatron-LM's or torch's DTensor), the pipeline
schedule and offload. Attribute names are ParallelismSpec's where they mean the same thing;
what the spec leaves to defaults (the ZeRO stage, the vocabulary padding) is resolved here,
and the groups the rules shard over are named properties (`data_shards`, `expert_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from memplan.config.base import Implementation
from memplan.config.parallelism import DeepSpeedSpec, Engine, OffloadSpec, ParallelismSpec
from memplan.errors import MemplanError

VocabSplit = Literal["padded", "chunk"]
"""How TP splits the vocabulary: Megatron pads it and gives every rank the same rows
("padded"); torch's DTensor splits it like torch.chunk ("chunk",
memplan.states.parallel.vocab_rows)."""

TensorImpl = Literal["megatron", "dtensor"]

# Megatron-LM's default --make-vocab-size-divisible-by (megatron/training/arguments.py).
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Where one training step runs: the degrees, the engine, and the rules they imply."""

    engine: Engine = "ddp"
    data: int = 1
    """Data-parallel degree (ParallelismSpec.data; context ranks are not in it)."""
    stage: int = 0
    """The ZeRO stage, the engine's default filled in (ParallelismSpec.stage)."""
    tensor: int = 1
    tensor_impl: TensorImpl = "dtensor"
    """Whose tensor-parallel layers run: Megatron-LM's (engine megatron, and deepspeed via
    Megatron-DeepSpeed) or torch's own DTensor ones (fsdp2, ddp; torchtitan's composition)."""
    sequence_parallel: bool = False
    pipeline: int = 1
    schedule: Literal["1f1b", "interleaved", "gpipe", "zbv"] = "1f1b"
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B)."""
    layers_per_stage: tuple[int, ...] | None = None
    """An explicit split of the layers over the (virtual) stages; else an even split."""
    expert: int = 1
    context: int = 1
    expert_capacity_factor: float | None = None
    """MoE expert capacity factor (None: dropless, balanced routing assumed)."""
    make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY
    gradient_as_bucket_view: bool = False
    offload: OffloadSpec = OffloadSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    device: Literal["cuda", "cpu"] = "cuda"
    """Where the ranks run (hardware.device)."""
    implementation: Implementation = "transformers"
    """Whose model code runs (model.implementation): torchtitan's wraps FSDP2 its own way."""
    reduce_dtype: str | None = None
    """FSDP2 `reduce_dtype` (ParallelismSpec.reduce_dtype, torchtitan's fp32 filled in); None:
    the param dtype."""
    vocab_parallel_loss: bool = False
    """torch's loss_parallel() runs (ParallelismSpec.loss_parallel: DTensor TP over more than
    one rank, unless turned off): the loss on each rank's vocabulary slice."""
    data_replicate: int = 1
    """HSDP's replicate degree (ParallelismSpec.data_replicate): FSDP2 shards over
    `shard_group` ranks."""
    fsdp_groups: Literal["layers", "torchtitan"] = "layers"
    """FSDP2's parameter groups (ParallelismSpec.fsdp_wrap, torchtitan's filled in with
    implementation torchtitan)."""
    async_tp: bool = False
    """torch's micro-pipelined TP (ParallelismSpec.async_tp): a symmetric-memory workspace per
    TP group outside the caching allocator (memplan.step.device.symmetric_memory_workspace)."""
    pipeline_outputs_held: bool = False
    """torch.distributed.pipelining keeps the last stage's output of every micro-batch until
    the next step (ParallelismSpec.pipeline_return_outputs, its default filled in)."""
    fsdp1_backward_prefetch: Literal["none", "pre", "post"] = "none"
    """FSDP1's backward_prefetch (ParallelismSpec.fsdp1_backward_prefetch)."""
    tensor_rank: int = 0
    """The TP rank whose shards these are: only the vocabulary rows of a "chunk" split differ
    between TP ranks, and rank 0 holds the most (`for_tensor_rank`)."""

    @classmethod
    def of(
        cls,
        par: ParallelismSpec,
        *,
        device: Literal["cuda", "cpu"] = "cuda",
        implementation: Implementation = "transformers",
    ) -> Layout:
        """The layout `par` describes, on `device`, running `implementation`'s model code."""
        reduce_dtype = par.reduce_dtype
        if reduce_dtype is None and implementation == "torchtitan":
            # torchtitan/config/configs.py::Parallelism.mixed_precision_reduce (0.3.0; the
            # same "float32" default in 9dec370's job_config.py, Dec 2024).
            reduce_dtype = "fp32"
        stage = par.stage
        if (
            par.zero_stage is None
            and par.engine == "fsdp2"
            and par.pipeline > 1
            and implementation == "torchtitan"
        ):
            # torchtitan/distributed/fsdp.py::get_fsdp_reshard_after_forward_policy (0.3.0;
            # the same rule in 9dec370's parallelize_llama.py::apply_fsdp): "default" is
            # reshard_after_forward = not pp_enabled, i.e. FSDP2's ZeRO-2.
            stage = 2
        wrap = par.fsdp_wrap or ("torchtitan" if implementation == "torchtitan" else "layers")
        return cls(
            engine=par.engine,
            data=par.data,
            stage=stage,
            tensor=par.tensor,
            tensor_impl="megatron" if par.engine in ("megatron", "deepspeed") else "dtensor",
            sequence_parallel=par.sequence_parallel,
            pipeline=par.pipeline,
            schedule=par.schedule,
            virtual_stages=par.virtual_stages,
            layers_per_stage=par.layers_per_stage,
            expert=par.expert,
            context=par.context,
            expert_capacity_factor=par.expert_capacity_factor,
            make_vocab_size_divisible_by=par.make_vocab_size_divisible_by,
            gradient_as_bucket_view=par.gradient_as_bucket_view,
            offload=par.offload,
            deepspeed=par.deepspeed,
            device=device,
            implementation=implementation,
            reduce_dtype=reduce_dtype,
            vocab_parallel_loss=par.tensor > 1
            and par.engine in ("ddp", "fsdp2")
            and par.loss_parallel is not False,
            fsdp_groups=wrap,
            fsdp1_backward_prefetch=par.fsdp1_backward_prefetch,
            data_replicate=par.data_replicate,
            async_tp=par.async_tp,
            pipeline_outputs_held=par.pipeline > 1
            and par.engine in ("ddp", "fsdp2")
            and (
                par.pipeline_return_outputs
                if par.pipeline_return_outputs is not None
                # torchtitan 0.3.0 trainer.py::forward_backward_step: return_outputs=False.
                else implementation != "torchtitan"
            ),
        )

    @property
    def pipeline_runtime(self) -> Literal["torch", "megatron"]:
        """Whose pipeline schedules run: torch.distributed.pipelining's (ddp, fsdp2: the
        torch engines, torchtitan's PP) or Megatron-LM's (megatron, deepspeed)."""
        return "torch" if self.engine in ("ddp", "fsdp2") else "megatron"

    def chunk_rank(self, chunk: int) -> int:
        """The pipeline rank that holds model chunk (stage) `chunk`: chunk % P (looped, as
        Megatron's interleaving and torch's ScheduleInterleaved1F1B place them), or the V of
        zbv: stage s < P on rank s, stage s >= P on rank 2P - 1 - s (torch 2.13
        pipelining/schedules.py::ScheduleZBVZeroBubble, generate_stage_to_rank_mapping
        style "v")."""
        p = self.pipeline
        if self.schedule == "zbv" and chunk >= p:
            return 2 * p - 1 - chunk
        return chunk % p

    def for_tensor_rank(self, rank: int) -> Layout:
        """The same layout seen from TP rank `rank`."""
        return self if rank == self.tensor_rank else replace(self, tensor_rank=rank)

    def keep(self, *names: str) -> Layout:
        """This layout with every field but `names` at its default: the key of a cache whose
        value reads only those fields (plan's layouts then share it)."""
        return Layout(**{n: getattr(self, n) for n in names})

    @property
    def world_size(self) -> int:
        """GPUs in the job: data x tensor x pipeline x context."""
        return self.data * self.tensor * self.pipeline * self.context

    @property
    def data_shards(self) -> int:
        """The ranks ZeRO/FSDP shard one stage's model states over: data x context
        (context-parallel ranks hold the same weights and reduce gradients together:
        megatron/core/parallel_state.py::initialize_model_parallel, the data-parallel group
        `with_context_parallel`)."""
        return self.data * self.context

    @property
    def shard_group(self) -> int:
        """The ranks one copy of the sharded model states spans: data_shards, or under HSDP
        (data_replicate > 1) its shard dimension, data_shards / data_replicate."""
        return self.data_shards // self.data_replicate

    @property
    def fsdp_world(self) -> int:
        """The ranks FSDP2 shards over (its mesh's shard dimension): the shard group, data x
        context divided by HSDP's replicate degree. Context-parallel ranks hold the same
        weights, so torchtitan shards over them too (torchtitan/parallelisms/
        parallel_dims.py at 9dec370: the `dp_shard_cp` mesh; 0.3.0 distributed/
        parallel_dims.py, the "fsdp" mesh), as the model-state rows already do
        (`data_shards`)."""
        return self.shard_group

    @property
    def titan_experts(self) -> bool:
        """torchtitan's own MoE under expert parallelism with FSDP2: the routed experts on the
        sparse mesh (pp, dp_replicate, efsdp, ep), Shard(0) over `ep` only and not split over
        TP (models/common/moe_sharding.py::expert_param_placement_sparse), sharded by FSDP2
        over efsdp (`expert_data`)."""
        return self.implementation == "torchtitan" and self.expert > 1 and self.engine == "fsdp2"

    @property
    def expert_data(self) -> int:
        """Ranks that hold replicas of the same experts: Megatron's expert-data-parallel size,
        data x context / expert with expert tensor parallelism equal to TP
        (megatron/core/parallel_state.py::initialize_model_parallel). torchtitan's own MoE
        (`titan_experts`) borrows its expert ranks from data x context x tensor: its efsdp
        mesh, data x context x tensor / expert (torchtitan 0.3.0 distributed/parallel_dims.py::
        ParallelDims.build_mesh, `efsdp = fsdp * tp // ep`)."""
        if self.titan_experts:
            ranks = self.data_shards * self.tensor
            if ranks % self.expert:
                raise MemplanError(
                    f"expert degree {self.expert} must divide data x context x tensor = {ranks}"
                    " (torchtitan borrows its expert-parallel ranks from the data, context and "
                    "tensor ranks: dp_shard * cp * tp == efsdp * ep, torchtitan 0.3.0 "
                    "config/configs.py::ParallelismConfig.expert_parallel_degree).",
                    field="parallelism.expert",
                )
            return ranks // self.expert
        if self.data_shards % self.expert:
            raise MemplanError(
                f"expert degree {self.expert} must divide the data-parallel degree "
                f"{self.data_shards} (expert parallel ranks are carved out of the data-parallel "
                "ones).",
                field="parallelism.expert",
            )
        return self.data_shards // self.expert

    @property
    def vocab_multiple(self) -> int:
        """What the vocabulary is padded to a multiple of (x tensor) under TP: Megatron's
        make_vocab_size_divisible_by; 1 for torch's DTensor, which does not pad."""
        return self.make_vocab_size_divisible_by if self.tensor_impl == "megatron" else 1

    @property
    def vocab_split(self) -> VocabSplit:
        """How TP splits the vocabulary: Megatron's padded even split, or torch.chunk's
        (DTensor: ceil(V / TP) rows on the first ranks, torch/distributed/tensor/
        placement_types.py::Shard._split_tensor), where the last TP ranks can hold fewer."""
        return "padded" if self.tensor_impl == "megatron" else "chunk"

    @property
    def gathered_inputs(self) -> bool:
        """Sequence parallelism the torch DTensor way: the column-parallel linears save the
        all-gathered, whole-sequence input instead of the local shard
        (memplan.activations.layout)."""
        return self.tensor_impl == "dtensor"
