"""DeepSpeed ZeRO-3's model states (zero_stage 3, the rule that
memplan.states.engines.deepspeed.sharding.rule_for picks): every parameter partitioned into
ceil(numel / W) elements per rank over the data ranks or MiCS's shard group
(zero3_partition_ranks); the persistent small parameters kept gathered in padded all-gather
buffers (zero3_persistent_elements); hpZ's secondary partition, kept for the whole run by
frozen parameters (hpz_secondary_elements); the gradient partitions and the fp32 sub-groups
the optimizer steps (sub_groups).

Read from deepspeedai/DeepSpeed 0.19.6 (commit edaa7221) with the abbreviations and the SRC_
names of memplan.states.engines.deepspeed.sharding, which holds them beside stages 0-2 and
BF16_Optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from memplan.model.inventory import Inventory
from memplan.optimizers import OptimizerConfig
from memplan.precision import Recipe, dtype_bytes
from memplan.states.engines.deepspeed.sharding import (
    HPZ_FROZEN,
    SRC_HPZ,
    SRC_MICS,
    SRC_PP,
    SRC_S3,
    DeepSpeedKnobs,
    _flat_optimizer,
)
from memplan.states.layout import Layout
from memplan.states.terms import (
    EngineRule,
    RankStates,
    ceil_div,
    fmt,
    grad_dtype,
    round_up,
    term,
    trainable,
)


def sub_groups(partition_numels: list[int], sub_group_size: int) -> list[int]:
    """Elements of each fp32 sub-group on one rank (S3::_create_fp16_sub_groups): parameters
    in order, a group closes once its running per-rank numel reaches `sub_group_size`."""
    total = sum(partition_numels)
    if sub_group_size >= total:
        return [total]
    groups, running = [], 0
    for i, n in enumerate(partition_numels):
        running += n
        if running >= sub_group_size or i == len(partition_numels) - 1:
            groups.append(running)
            running = 0
    return groups


def zero3_partition_ranks(knobs: DeepSpeedKnobs, world: int) -> int:
    """Ranks ZeRO-3 partitions each parameter over: every data rank, or with MiCS its shard
    group. MiCS_Init partitions over `param.comm.param_shard_group` (`get_partition_dp_group`,
    `num_partitions`: mics_shard_size ranks), and MiCS_Optimizer replaces the optimizer's
    `dp_process_group` and `partition_count` with it, so the gradient partitions, the fp32
    sub-groups and the optimizer states follow the parameter partitions (SRC_MICS).

    Its step adds no buffer of its own beside ZeRO-3's: at the boundary
    `MiCS_Optimizer.allreduce_mics_shard_grads` all-reduces the gradient partitions across
    the replica groups in place (`scale_tensors`, then `dist.all_reduce_coalesced` on them;
    the `torch.cat` copy runs only where torch lacks all_reduce_coalesced, before 1.13), and
    its all-gather buffers hold a whole parameter padded to the shard group (`t_size =
    ds_numel x param_shard_size`), as ZeRO-3's do to the data-parallel world
    (memplan.states.engines.deepspeed.step.zero3_live_parameters counts whole modules)."""
    return knobs.mics_shard_size if knobs.mics_shard_size > 0 else world


def hpz_secondary_elements(numel: int, world: int, hpz: int) -> int:
    """Elements of one parameter's hpZ secondary partition (SRC_HPZ): `tensor_size =
    self._aligned_size(param)` (numel padded to a multiple of the data-parallel world),
    `secondary_partition_size = int(tensor_size // self.num_ranks_in_param_group)`, the same
    on every rank (the last ranks' tail is zeroed padding). The backward's all-gather over the
    hpZ group reads it into `ds_secondary_tensor.shape[0] x hpz` elements
    (Init._all_gather_sequential / _all_gather_coalesced), the same padded size as from the
    primary partition: the gathered-parameter transient is unchanged."""
    return round_up(numel, world) // hpz


def zero3_persistent_elements(numels: Iterable[int], knobs: DeepSpeedKnobs, world: int) -> int:
    """Elements of ZeRO-3's persistent parameters (numel <= stage3_param_persistence_threshold)
    in their all-gather buffers: each padded to ceil(numel / shard) x shard, shard the ranks
    it is partitioned over (zero3_partition_ranks: MiCS's shard group, else every data rank;
    the sources are at `stage3`'s parameters row, which uses this)."""
    shard = zero3_partition_ranks(knobs, world)
    threshold = knobs.stage3_param_persistence_threshold
    return sum(ceil_div(numel, shard) * shard for numel in numels if numel <= threshold)


def stage3(knobs: DeepSpeedKnobs) -> EngineRule:
    def rule(
        inventory: Inventory, recipe: Recipe, opt: OptimizerConfig, layout: Layout, world: int
    ) -> list[RankStates]:
        """ZeRO-3: each parameter split into ceil(n / W) elements per rank (the last ranks hold
        zero padding; SRC_PP); parameters with numel <= stage3_param_persistence_threshold are
        also kept gathered. Gradients live in `grad_partitions_flat_buffer` (same size, in the
        accumulation dtype); the fp32 master is one flat tensor per sub-group, a copy of the
        partition even when that is fp32 (S3::_create_fp32_partitions). With MiCS, W is the
        shard group (`zero3_partition_ranks`); with hpZ, frozen parameters also keep their
        secondary partition (`hpz_secondary_elements`) for the whole run."""
        # Every module parameter is partitioned, frozen ones too (parameter_offload.py::
        # DeepSpeedZeRoOffload._convert_to_zero_parameters -> Init); gradients and the fp32
        # sub-groups cover the trainable ones only (S3::_get_trainable_parameter_groups).
        params = inventory.parameters
        shard = zero3_partition_ranks(knobs, world)
        over = f"{shard} (MiCS shard group)" if shard != world else str(shard)
        shard_total = sum(ceil_div(p.numel, shard) for p in params)
        shards = [ceil_div(p.numel, shard) for p in trainable(params)]
        grad_total = sum(shards)
        persistent = [p for p in params if p.numel <= knobs.stage3_param_persistence_threshold]
        # A persistent parameter stays gathered in its all-gather buffer, padded to a whole
        # number of partitions: `buffer_size = math.ceil(param.ds_numel / world_size) *
        # world_size`, `param.data = param_buffer.narrow(0, 0, param.ds_numel)` keeps the
        # padded storage (partition_parameters.py::Init.all_gather_coalesced ->
        # _all_gather_sequential, 0.19.8; measured on 3 gloo ranks,
        # benchmarks/results/verify-deepspeed.json). MiCS gathers over its shard group:
        # `t_size = p.ds_tensor.ds_numel * param_shard_size` (SRC_MICS
        # ._flat_all_gather_with_coalescing_manager).
        persist_elems = zero3_persistent_elements((p.numel for p in params), knobs, world)
        p_dtype, g_dtype = recipe.parameters, grad_dtype(recipe)
        terms = [
            term(
                "parameters",
                "parameters",
                p_dtype,
                len(params),
                shard_total + persist_elems,
                f"{len(params)} tensors, sum of ceil(numel / {over}) = {fmt(shard_total)}"
                f" + {len(persistent)} persistent (numel <= "
                f"{fmt(knobs.stage3_param_persistence_threshold)}) kept gathered, padded to "
                f"ceil(numel / {shard}) x {shard} = "
                f"{fmt(persist_elems)}; x {dtype_bytes(p_dtype)} B ({p_dtype})",
                f"{SRC_PP}; persistence: partition_parameters.py::Init._convert_to_deepspeed_param"
                + (f"; {SRC_MICS}" if shard != world else ""),
            ),
            term(
                "gradients",
                "gradients",
                g_dtype,
                len(shards),
                grad_total,
                f"grad_partitions_flat_buffer: {fmt(grad_total)} elements x "
                f"{dtype_bytes(g_dtype)} B ({g_dtype})",
                SRC_S3 + "._setup_for_real_optimizer",
            ),
        ]
        frozen = [p for p in params if not p.trainable]
        if knobs.zero_hpz_partition_size > 1 and frozen:
            # Init partitions every parameter at conversion, secondary partition included
            # (Init._partition: `_partition_param_sec` while the parameter is AVAILABLE), and
            # only the optimizer's (trainable) groups drop theirs after each step
            # (S3.invalidate_secondary_tensor iterates self.fp16_groups): a frozen parameter
            # keeps its secondary partition for the whole run.
            hpz = knobs.zero_hpz_partition_size
            sec = sum(hpz_secondary_elements(p.numel, world, hpz) for p in frozen)
            terms.append(
                term(
                    "parameters",
                    HPZ_FROZEN,
                    p_dtype,
                    len(frozen),
                    sec,
                    f"{len(frozen)} frozen tensors, sum of ceil(numel / {world}) x {world} / "
                    f"{hpz} = {fmt(sec)} x {dtype_bytes(p_dtype)} B ({p_dtype})",
                    f"{SRC_HPZ}; stage3.py::invalidate_secondary_tensor (0.19.8)",
                )
            )
        groups = sub_groups(shards, knobs.sub_group_size)
        device, host = _flat_optimizer(
            [(g,) for g in groups],
            opt=opt,
            recipe=recipe,
            layout=layout,
            view=f"fp32 sub-group partitions (sub_group_size {fmt(knobs.sub_group_size)})",
            source=SRC_S3 + (f"; {SRC_MICS}" if shard != world else ""),
        )
        # The fp32 master is a copy even when the partition is already fp32: S3::
        # _create_fp32_partitions aliases it only when `fp16_partitioned_groups_flat[i].device
        # == self.device`, and `self.device` is the accelerator's current_device_name(), a str
        # ('cuda:0', 'cpu'), which a torch.device never equals (torch 2.13: the comparison is
        # False), so the `.clone()` branch runs (0.19.8; measured: DeepSpeed's ZeRO-3 with
        # fp32 on CPU gloo ranks, tests/test_verify_deepspeed.py).
        return [
            RankStates(ranks=tuple(range(world)), terms=(*terms, *device), host_terms=tuple(host))
        ]

    return rule
