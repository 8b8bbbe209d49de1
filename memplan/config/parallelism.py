"""The spec's `parallelism:` section: the engine, its ZeRO stage and knobs, offload, and the
data/tensor/pipeline/context/expert degrees (memplan.states.layout turns it into the one
Layout every stage reads)."""

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from memplan.config.base import Degree, Frozen, PositiveInt

Engine = Literal["deepspeed", "fsdp2", "ddp", "megatron", "fsdp1"]


class DeepSpeedSpec(Frozen):
    """DeepSpeed `zero_optimization` keys that change memory (DeepSpeed's own names and
    defaults: deepspeed/runtime/zero/config.py::DeepSpeedZeroConfig, 0.19.6; checked against
    0.19.8 in tests/data/deepspeed_zero_defaults.json)."""

    sub_group_size: PositiveInt = 10**9
    """Elements per fp32 optimizer sub-group (ZeRO-3)."""
    stage3_param_persistence_threshold: int = Field(10**5, ge=0)
    """ZeRO-3 keeps parameters with numel <= this gathered on every rank."""
    reduce_bucket_size: PositiveInt = 500_000_000
    """Elements in the gradient reduction (IPG) bucket, allocated in the gradient dtype
    (stage_1_and_2.py / stage3.py `torch.empty(reduce_bucket_size)`)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with backward. None: DeepSpeed's default, which depends on
    the stage (config.py::DeepSpeedZeroConfig.overlap_comm_valid: True for stage 3, else
    False); stage 1/2 then keep two reduction buckets instead of one."""
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0)
    """ZeRO-3 elements gathered ahead of the module that needs them."""
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0)
    """ZeRO-3 cap on gathered (full) parameter elements resident per rank."""
    communication_data_type: Literal["fp32", "bf16", "fp16"] | None = None
    """DeepSpeed's top-level `communication_data_type`: the dtype gradients are reduced in.
    None: DeepSpeed's default, the model's dtype (fp16, bf16, else fp32: engine.py::
    DeepSpeedEngine.communication_data_type, 0.19.8). ZeRO-3 allocates its reduction bucket in
    it (stage3.py, `ipg_buckets` keyed by it); BF16_Optimizer casts its flat gradient buffer
    to it for the all-reduce (engine.py::allreduce_bucket)."""
    zero_hpz_partition_size: int = Field(1, ge=0)
    """ZeRO++ hierarchical partitioning (hpZ), ZeRO-3 only: besides its primary partition
    over all data ranks, each rank keeps a secondary copy of every parameter in the model's
    dtype, partitioned over a group of this many consecutive ranks (a node), which the
    backward's all-gathers read instead of going across nodes
    (deepspeed/runtime/zero/partition_parameters.py::Init._partition_param_sec, 0.19.8).
    1 (DeepSpeed's default) or 0: off."""
    mics_shard_size: int = Field(-1, ge=-1)
    """MiCS, ZeRO-3 only: parameters, gradients, fp32 partitions and optimizer states are
    sharded over groups of this many consecutive data ranks and replicated across the groups
    (deepspeed/runtime/zero/mics.py::MiCS_Init, MiCS_Optimizer, 0.19.6). -1 or 0: off
    (DeepSpeed's default). DeepSpeed 0.19.7 removed MiCS (its config refuses the key:
    runtime/config.py::_REMOVED_ZERO_CONFIG_KEYS), and 0.19.3 to 0.19.6 hang with more than
    one shard group; `memplan verify` runs it on 0.19.2."""

    @property
    def mics(self) -> bool:
        """MiCS is on (DeepSpeed's `mics_shard_size > 0`, engine.py::_configure_zero_optimizer)."""
        return self.mics_shard_size > 0


class OffloadSpec(Frozen):
    """What lives in host (or NVMe) memory instead of on the GPU (ZeRO-Offload/Infinity,
    FSDP CPUOffload)."""

    optimizer: Literal["none", "cpu", "nvme"] = "none"
    """fp32 master weights, optimizer states and fp32 gradient partitions."""
    parameters: Literal["none", "cpu", "nvme"] = "none"
    """Sharded parameters (ZeRO-3, FSDP2; FSDP1 CPUOffload, with them its gradients and
    optimizer)."""
    pin_memory: bool = True
    """Host buffers are page-locked (DeepSpeed `pin_memory`, FSDP2 CPUOffloadPolicy default)."""


class ParallelismSpec(Frozen):
    """How the job is spread over GPUs. Degrees left out are 1; world size is
    data x tensor x pipeline x context (expert ranks are carved out of data; under
    model.implementation torchtitan, out of data x context x tensor)."""

    engine: Engine = "ddp"
    """ddp (torch DistributedDataParallel; ZeroRedundancyOptimizer at zero_stage 1), fsdp2
    (torch fully_shard), deepspeed (ZeRO), megatron (Megatron-LM DDP; zero_stage 1 = its
    distributed optimizer) or fsdp1 (torch FullyShardedDataParallel as accelerate and the HF
    Trainer wrap it: zero_stage 3 FULL_SHARD, 2 SHARD_GRAD_OP, 0 NO_SHARD). Default: torch's
    own engines, which `memplan verify` runs as is: ddp (what torchrun, the HF Trainer and
    accelerate run with no FSDP or DeepSpeed config; plain single-GPU training at data 1), or
    fsdp2 when zero_stage is 2 or 3."""
    data: Degree = 1
    """Data-parallel degree (ranks that hold a replica or a shard of the model states)."""
    zero_stage: int | None = Field(None, ge=0, le=3)
    """ZeRO stage 0-3; default: 0 for deepspeed, ddp and megatron, 3 for fsdp2 and fsdp1."""
    tensor: Degree = 1
    """Tensor-parallel degree (Megatron column/row-parallel linears, vocab-parallel embedding)."""
    sequence_parallel: bool = False
    """Split the activations TP leaves replicated (norms, dropout) over the TP ranks.
    torchtitan turns it on with TP by default (0.3.0 config/configs.py
    `enable_sequence_parallel: True`; 9dec370 always): set it true to model a torchtitan job."""
    pipeline: Degree = 1
    """Pipeline-parallel degree."""
    schedule: Literal["1f1b", "interleaved", "gpipe", "zbv"] = "1f1b"
    """Pipeline schedule: how many micro-batches each stage keeps in flight. Engines ddp and
    fsdp2 run torch.distributed.pipelining (torchtitan's PP): 1f1b is Schedule1F1B,
    interleaved ScheduleInterleaved1F1B, gpipe ScheduleGPipe, zbv ScheduleZBVZeroBubble (two
    stages per rank in a V: virtual_stages 2; rank 0 holds the first and the last stage).
    Engines megatron and deepspeed run Megatron-LM's schedules (1f1b, interleaved, gpipe:
    megatron/core/pipeline_parallel/schedules.py); zbv is torch's only."""
    virtual_stages: Degree = 1
    """Model chunks per pipeline rank (the interleaved and zbv schedules)."""
    layers_per_stage: tuple[PositiveInt, ...] | None = None
    """An explicit split of the layers over the (virtual) stages; else an even split."""
    expert: Degree = 1
    """Expert-parallel degree (MoE): each rank holds num_experts / expert of each MoE layer.
    It divides data x context; with torchtitan's model code it divides data x context x tensor
    (torchtitan's EP borrows TP ranks; its experts are not split over TP)."""
    context: Degree = 1
    """Context-parallel degree (ring attention / Megatron CP): the sequence is split."""
    expert_capacity_factor: float | None = Field(None, gt=0, le=1024)
    """MoE expert capacity factor (Megatron --moe-expert-capacity-factor with
    --moe-pad-expert-input-to-capacity): each expert's token buffer is padded to
    ceil(tokens x top_k / experts x factor). None: dropless, balanced routing assumed. With
    model.implementation megatron-core it needs moe_dispatcher: alltoall (drop and pad is
    measured there; memplan.model.stacks.megatron_moe)."""
    moe_dispatcher: Literal["allgather", "alltoall"] | None = None
    """Megatron-Core's MoE token dispatcher (`--moe-token-dispatcher-type`, TransformerConfig.
    moe_token_dispatcher_type; model.implementation megatron-core only): allgather
    (MoEAllGatherTokenDispatcher: every TP x EP rank's tokens gathered, each rank keeps its
    experts' share) or alltoall (MoEAlltoAllTokenDispatcher: each rank sends its tokens' pairs
    to the experts' ranks). None: allgather, Megatron-Core 0.12.0's default
    (transformer/transformer_config.py)."""
    make_vocab_size_divisible_by: PositiveInt = 128
    """Megatron pads the vocabulary to a multiple of this x tensor (its default, 128); torch's
    own tensor parallelism (engine fsdp2 or ddp) does not pad
    (memplan.states.layout.Layout.vocab_multiple)."""
    gradient_as_bucket_view: bool = False
    """torch DDP `gradient_as_bucket_view` (default False): True makes each `.grad` a view into
    DDP's flat allreduce buckets, saving one gradient-sized copy (torch/nn/parallel/
    distributed.py::DistributedDataParallel docstring, 2.13). Used with engine ddp."""
    reduce_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """FSDP2 `MixedPrecisionPolicy.reduce_dtype`: the dtype gradients are reduced in. None:
    torch's default (the `param_dtype`, the recipe's compute dtype), or fp32 with
    `model.implementation: torchtitan` (its `mixed_precision_reduce` default,
    torchtitan/config/configs.py::Parallelism, 0.3.0)."""
    loss_parallel: bool | None = None
    """torch's `loss_parallel()` under DTensor tensor parallelism (engines ddp and fsdp2): the
    LM head's output stays sharded over the vocabulary and the cross entropy runs on each
    rank's [tokens, vocabulary / TP] slice (torch/distributed/tensor/parallel/loss.py). None:
    on whenever tensor > 1 (torchtitan's default, `disable_loss_parallel: false`; memplan
    verify runs it). false: torchtitan's `disable_loss_parallel`, the output all-gathered to
    whole [tokens, vocabulary] logits on every TP rank (torchtitan/models/llama3/
    parallelize.py::apply_tp, ColwiseParallel(output_layouts=Replicate())). Megatron and
    DeepSpeed always run Megatron's vocabulary-parallel cross entropy."""
    pipeline_return_outputs: bool | None = None
    """torch.distributed.pipelining's `schedule.step(return_outputs=...)` (engines ddp and
    fsdp2, pipeline > 1): true keeps the last stage's output (the logits) of every
    micro-batch in `stage.output_chunks` until the next step and concatenates them when the
    step ends (torch 2.13 pipelining/stage.py::forward_one_chunk, schedules.py `step`; the
    only behaviour before pytorch#165822, Oct 2025: torchtitan 9dec370's train.py, Dec 2024).
    false: torchtitan's trainer since e5ef99a (2025-10-22; 0.3.0 trainer.py passes
    `return_outputs=False`). None: false with `model.implementation: torchtitan`, else true
    (torch's default)."""
    data_replicate: Degree = 1
    """HSDP (engine fsdp2): the data-parallel ranks form a 2-D (replicate, shard) DeviceMesh of
    data_replicate x (data / data_replicate) ranks; FSDP2 shards the model states over the
    shard dimension and all-reduces the reduce-scattered gradients over the replicate one
    (torch fully_shard on a 2-D mesh, _fsdp_collectives.py::foreach_reduce; torchtitan's
    `data_parallel_replicate_degree`). Default 1: plain FSDP2 over all data ranks."""
    fsdp_wrap: Literal["layers", "torchtitan"] | None = None
    """How FSDP2 (`engine: fsdp2`) groups the parameters, one `fully_shard` call per group.
    `layers`: each decoder layer, then the root holding every other parameter (memplan
    verify's wrapping). `torchtitan`: torchtitan's `apply_fsdp_to_decoder`
    (torchtitan/distributed/fsdp.py, 0.3.0): the input embedding, each decoder layer, then the
    final norm and the output projection together, not resharded after forward (with a
    tied head all three in one group, as `layers`). None: `torchtitan` with
    `model.implementation: torchtitan`, else `layers`."""
    async_tp: bool = False
    """torch's asynchronous (micro-pipelined) tensor parallelism, torchtitan's
    `experimental.enable_async_tensor_parallel` (9dec370 parallelisms/parallelize_llama.py::
    apply_tp: `torch._inductor.config._micro_pipeline_tp = True` and
    `enable_symm_mem_for_group` on the TP group): Inductor fuses the compiled blocks' TP
    all-gathers and reduce-scatters with their matmuls into symmetric-memory ops, whose
    workspace lives outside the caching allocator (memplan.step.device.
    symmetric_memory_workspace). Needs tensor > 1, sequence_parallel, engine fsdp2,
    model.implementation torchtitan and training.compile."""
    fsdp1_backward_prefetch: Literal["none", "pre", "post"] = "none"
    """FSDP1's `backward_prefetch` (engine fsdp1): `none` (the HF Trainer's and accelerate's
    NO_PREFETCH, the default), `pre` (BackwardPrefetch.BACKWARD_PRE, torch's and Lightning's
    FSDPStrategy default: each unit's pre-backward hook gathers the next unit in backward
    order) or `post` (BACKWARD_POST: its post-backward hook does, before the reduction)
    (torch 2.13 fsdp/_runtime_utils.py::_get_handle_to_prefetch). Only FULL_SHARD gathers
    in backward, so only zero_stage 3 is changed by it."""
    offload: OffloadSpec = OffloadSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """DeepSpeed config keys (used when engine is deepspeed)."""

    @field_validator("async_tp")
    @classmethod
    def _async_tp_needs_sequence_parallel_fsdp2(cls, value: bool, info: ValidationInfo) -> bool:
        """torchtitan 9dec370 applies AsyncTP in apply_tp (TP > 1, whose plan always shards the
        norms: sequence parallel) and composes TP with FSDP2 only (parallelize_llama: "DDP has
        not supported > 1D parallelism"); Inductor's micro_pipeline_tp pass fuses the
        all-gathers / reduce-scatters that sequence parallelism puts around each block's
        matmuls. (Its model code and compile: memplan.report.estimate.layout_of.)"""
        tensor = info.data.get("tensor", 1)
        sequence_parallel = info.data.get("sequence_parallel", False)
        engine = info.data.get("engine")
        if value and not (tensor > 1 and sequence_parallel and engine == "fsdp2"):
            raise ValueError(
                "async_tp fuses the all-gathers and reduce-scatters of sequence-parallel TP "
                "with their matmuls, as torchtitan runs it: it needs tensor > 1, "
                f"sequence_parallel: true and engine: fsdp2; this spec has tensor {tensor}, "
                f"sequence_parallel {str(sequence_parallel).lower()} and engine {engine}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_engine(cls, data: Any) -> Any:
        """No engine named: torch's, ddp for ZeRO stage 0/1 and fsdp2 for 2/3."""
        if isinstance(data, dict) and data.get("engine") is None:
            stage = data.get("zero_stage")
            sharded = str(stage).strip() in ("2", "3")  # YAML may give the stage as text
            data = {**data, "engine": "fsdp2" if sharded else "ddp"}
        return data

    @model_validator(mode="after")
    def _stage_fits_engine(self) -> "ParallelismSpec":
        if self.engine == "fsdp2" and self.zero_stage in (0, 1):
            raise ValueError(
                "fsdp2 shards parameters, so it runs ZeRO stage 3 (reshard_after_forward=True) "
                "or 2 (reshard_after_forward=False); for stage 0 or 1 use engine: ddp"
            )
        if self.engine == "ddp" and self.zero_stage in (2, 3):
            raise ValueError(
                "torch DDP offers ZeRO stage 0 (plain DDP) or 1 (ZeroRedundancyOptimizer); "
                "for stage 2 or 3 use engine: deepspeed or fsdp2"
            )
        if self.engine == "megatron" and self.zero_stage not in (None, 0, 1):
            raise ValueError(
                "Megatron-LM shards optimizer states only (zero_stage 1: "
                "--use-distributed-optimizer); for stage 2 or 3 use engine: deepspeed or fsdp2"
            )
        if self.engine == "fsdp1":
            self._check_fsdp1()
        if self.data_replicate > 1:
            if self.engine != "fsdp2":
                raise ValueError(
                    f"data_replicate {self.data_replicate} is FSDP2's HSDP (a replicate x shard "
                    f"mesh), but engine is {self.engine}: set engine: fsdp2"
                )
            if self.data % self.data_replicate:
                raise ValueError(
                    f"data_replicate {self.data_replicate} must divide data {self.data}: the "
                    "data ranks form a data_replicate x (data / data_replicate) mesh"
                )
            if self.expert > 1 or self.context > 1:
                raise ValueError(
                    "data_replicate > 1 (HSDP) with expert or context parallelism is not "
                    "modelled: torchtitan carves those from the shard dimension"
                )
        self._check_deepspeed_hierarchy()
        if self.fsdp1_backward_prefetch != "none" and self.engine != "fsdp1":
            raise ValueError(
                f"fsdp1_backward_prefetch is FSDP1's backward_prefetch, but engine is "
                f"{self.engine}: set engine: fsdp1 or leave fsdp1_backward_prefetch out"
            )
        if self.fsdp_wrap is not None and self.engine != "fsdp2":
            raise ValueError(
                f"fsdp_wrap groups FSDP2's fully_shard calls, but engine is {self.engine}: "
                "set engine: fsdp2 or leave fsdp_wrap out"
            )
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ValueError("the interleaved schedule needs virtual_stages >= 2")
        if self.virtual_stages > 1 and self.schedule not in ("interleaved", "zbv"):
            raise ValueError("virtual_stages > 1 needs schedule: interleaved (or zbv)")
        if self.schedule == "zbv" and self.virtual_stages != 2:
            # torch 2.13 schedules.py::ScheduleZBVZeroBubble.__init__: "ZBV requires exactly
            # 2 stages per rank".
            raise ValueError("the zbv schedule runs exactly 2 stages per rank: virtual_stages: 2")
        if self.schedule == "zbv" and self.engine not in ("ddp", "fsdp2"):
            raise ValueError(
                "zbv is torch.distributed.pipelining's ScheduleZBVZeroBubble: use engine ddp "
                "or fsdp2 (Megatron-LM and DeepSpeed run 1f1b, interleaved or gpipe)"
            )
        if self.loss_parallel is not None and (
            self.tensor == 1 or self.engine not in ("ddp", "fsdp2")
        ):
            raise ValueError(
                "loss_parallel is torch's DTensor tensor parallelism's choice: it needs "
                "tensor > 1 and engine ddp or fsdp2 (Megatron-LM and DeepSpeed always run "
                "Megatron's vocabulary-parallel cross entropy)"
            )
        if self.pipeline_return_outputs is not None and (
            self.pipeline == 1 or self.engine not in ("ddp", "fsdp2")
        ):
            raise ValueError(
                "pipeline_return_outputs is torch.distributed.pipelining's step() argument: it "
                "needs pipeline > 1 and engine ddp or fsdp2 (Megatron-LM's and DeepSpeed's "
                "schedules keep no outputs)"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "sequence_parallel splits activations over tensor ranks: set tensor > 1"
            )
        if self.engine == "fsdp2" and "nvme" in (self.offload.optimizer, self.offload.parameters):
            # torch/distributed/fsdp/_fully_shard/_fsdp_api.py (2.13): FSDP2's only offload
            # policy is CPUOffloadPolicy; there is no NVMe tier (DeepSpeed ZeRO-Infinity has one).
            raise ValueError("FSDP2 offloads to CPU only (CPUOffloadPolicy): use cpu, not nvme")
        if self.offload.parameters != "none" and self.stage != 3 and self.engine != "fsdp1":
            # (FSDP1's CPUOffload runs with any sharding strategy: _check_fsdp1_offload)
            raise ValueError("parameter offload needs sharded parameters: zero_stage 3")
        if self.offload.optimizer != "none" and self.engine == "deepspeed" and self.stage == 0:
            # DeepSpeed config docs, zero_optimization.offload_optimizer: "Valid only with
            # stage 1, 2 and 3" (the offload lives in the ZeRO optimizers).
            raise ValueError("DeepSpeed offloads the optimizer with zero_stage 1, 2 or 3, not 0")
        return self

    def _check_fsdp1(self) -> None:
        """What memplan's fsdp1 engine models (memplan.states.engines.fsdp1): the sharding
        strategies FULL_SHARD, SHARD_GRAD_OP and NO_SHARD over the data ranks, nothing else."""
        if self.zero_stage == 1:
            raise ValueError(
                "fsdp1 has no ZeRO stage 1 (ShardingStrategy FULL_SHARD is stage 3, "
                "SHARD_GRAD_OP 2, NO_SHARD 0); for stage 1 use engine: ddp or deepspeed"
            )
        other = [
            f"{key} {getattr(self, key)}"
            for key in ("tensor", "pipeline", "context", "expert")
            if getattr(self, key) > 1
        ]
        if other:
            raise ValueError(
                f"engine fsdp1 is modelled over data ranks only, but this spec has "
                f"{', '.join(other)}: FSDP1 composes with tensor, pipeline, context or expert "
                "parallelism only through code memplan does not model; use engine: fsdp2 "
                "(torch's DTensor TP and pipelining) or megatron"
            )
        self._check_fsdp1_offload()

    def _check_fsdp1_offload(self) -> None:
        """FSDP1's CPUOffload(offload_params=True) as memplan models it
        (memplan.states.engines.fsdp1.offload): FULL_SHARD or SHARD_GRAD_OP over more than
        one rank, the parameters (and with them gradients and optimizer) on the host."""
        off = self.offload
        if off.parameters == "none" and off.optimizer == "none":
            return
        if "nvme" in (off.parameters, off.optimizer):
            # torch 2.13 torch/distributed/fsdp/api.py::CPUOffload: offload_params only.
            raise ValueError("FSDP1 offloads to CPU only (CPUOffload): use cpu, not nvme")
        if off.parameters != "cpu":
            raise ValueError(
                "FSDP1 offloads the optimizer only with the parameters: CPUOffload("
                "offload_params=True) keeps the sharded parameters and gradients on the host, "
                "where the optimizer steps them; set offload.parameters: cpu"
            )
        if not off.pin_memory:
            raise ValueError(
                "FSDP1's CPUOffload always pins its host shards and gradients "
                "(_flat_param.py::init_flat_param_attributes): leave offload.pin_memory true"
            )
        if self.zero_stage == 0 or self.data == 1:
            # NO_SHARD (FSDP1 also runs it on one rank: torch 2.13 torch/distributed/fsdp/
            # _init_utils.py::_init_core_state, `world_size == 1`): with offload each
            # pre-forward and pre-backward copies the whole flat parameter to the GPU
            # (_flat_param.py::pre_unshard, flat_param_to / _use_low_precision_shard), and
            # autograd keeps the forward's copy alive through the original parameters' views
            # saved for backward; a CPU run's compute device is the host, so it makes no
            # copies. Measured on gloo CPU ranks (benchmarks/results/fsdp1-offload.json):
            # the host rows are FSDP1's to the byte, but the device rule falls short of the
            # phase peaks: 2 ranks fp32 backward -18% (bf16 within 0.5%), one rank bf16
            # forward -18% and backward -38%, fp32 backward -18%.
            raise ValueError(
                "engine fsdp1 with offload is modelled for FULL_SHARD and SHARD_GRAD_OP "
                "(zero_stage 3 or 2) over more than one rank; NO_SHARD (zero_stage 0, and one "
                "rank, where FSDP1 runs NO_SHARD) copies the whole flat parameter to the GPU "
                "before each forward and backward (torch/distributed/fsdp/_flat_param.py::"
                "pre_unshard), which a CPU-only run cannot make, and on gloo CPU ranks the "
                "rule fell up to 38% short of the measured backward peak (one rank, bf16; "
                "benchmarks/results/fsdp1-offload.json). Set zero_stage 3 or 2 and data > 1, "
                "or offload to none"
            )

    def _check_deepspeed_hierarchy(self) -> None:
        """ZeRO++ hpZ and MiCS: DeepSpeed's ZeRO-3 over groups of data ranks."""
        ds = self.deepspeed
        hpz = ds.zero_hpz_partition_size
        named = [
            (key, size)
            for key, size, on in (
                ("zero_hpz_partition_size", hpz, hpz > 1),
                ("mics_shard_size", ds.mics_shard_size, ds.mics),
            )
            if on
        ]
        for key, size in named:
            where = f"deepspeed.{key} {size}"
            if self.engine != "deepspeed" or self.stage != 3:
                raise ValueError(
                    f"{where} partitions DeepSpeed's ZeRO-3 over groups of ranks, but engine is "
                    f"{self.engine} at zero_stage {self.stage}: set engine: deepspeed and "
                    "zero_stage: 3, or leave it out"
                )
            if size > self.data or self.data % size:
                # hpZ: deepspeed/utils/groups.py::_create_zero_param_parallel_group
                # (_ensure_divisibility); MiCS: mics_utils.py::_generate_mics_config asserts
                # the data-parallel size is divisible by the shard size.
                raise ValueError(
                    f"{where} must divide data {self.data}: the data ranks form groups of "
                    f"{size} consecutive ranks"
                )
            if self.tensor * self.pipeline * self.context * self.expert > 1:
                # DeepSpeed forms these groups from consecutive global ranks
                # (groups.py::_create_zero_param_parallel_group, mics_utils.py::
                # create_mics_comm_groups), not from a data-parallel group of a model-parallel
                # layout: memplan does not model which ranks they then span.
                raise ValueError(
                    f"{where} is modelled with data parallelism only (tensor, pipeline, "
                    "context and expert 1)"
                )
            if self.offload.parameters != "none" or self.offload.optimizer != "none":
                # hpZ keeps its secondary partition on the parameters' offload device
                # (partition_parameters.py::Init._partition_param_sec: self.remote_device);
                # MiCS refuses gradients off the accelerator (mics.py::MiCS_Optimizer.
                # allreduce_mics_shard_grads: "Local sharding has no support for CPU
                # offloading").
                raise ValueError(f"{where} with offload is not modelled: set offload to none")
        if len(named) == 2:
            # engine.py::_return_mics_optimizer (0.19.6) builds MiCS_Optimizer without
            # zero_hpz_partition_size: MiCS would run without hpZ's secondary partition.
            raise ValueError(
                "deepspeed.zero_hpz_partition_size and deepspeed.mics_shard_size are two "
                "different hierarchies (DeepSpeed's MiCS optimizer takes no hpZ): set one"
            )

    @property
    def world_size(self) -> int:
        """GPUs in the job: data x tensor x pipeline x context."""
        return self.data * self.tensor * self.pipeline * self.context

    @property
    def stage(self) -> int:
        """The ZeRO stage with the engine's default filled in."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 3 if self.engine in ("fsdp2", "fsdp1") else 0
