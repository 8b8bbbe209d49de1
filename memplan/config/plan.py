"""The spec's `plan:` section: what `memplan plan` searches."""

from typing import Any

from pydantic import Field, field_validator, model_validator

from memplan.config.base import Degree, Frozen, PositiveInt
from memplan.config.machine import parse_bytes
from memplan.config.parallelism import Engine


class PlanSpec(Frozen):
    """`memplan plan`: the cluster, the batch, and the constraints of the layout search."""

    gpus: Degree | None = None
    """GPUs in the job (default: nodes x hardware.gpus_per_node)."""
    nodes: Degree | None = None
    global_batch_size: PositiveInt | None = None
    """Sequences per optimizer step."""
    global_batch_tokens: PositiveInt | None = None
    """Tokens per optimizer step (alternative to global_batch_size)."""
    tensor: PositiveInt | None = None
    """Fix the tensor-parallel degree."""
    max_tensor: PositiveInt | None = None
    """Largest tensor degree searched (default: GPUs per node, so TP stays inside a node)."""
    max_pipeline: PositiveInt | None = None
    max_context: PositiveInt = 8
    max_virtual_stages: PositiveInt = 4
    """Largest number of model chunks per pipeline rank searched (Megatron's interleaved 1F1B
    schedule, tried in powers of two); 1 searches plain 1F1B only."""
    engines: tuple[Engine, ...] = ("deepspeed", "fsdp2", "megatron", "ddp")
    """Engines the search may use."""
    micro_batch_sizes: tuple[PositiveInt, ...] = (1, 2, 4, 8, 16)
    allow_recompute: bool = True
    allow_offload: bool = False
    """Also search host offload: `cpu` rows offload the optimizer (DeepSpeed's offload_optimizer;
    FSDP2's CPUOffloadPolicy moves parameters, gradients and optimizer states together) and
    under fsdp1 the parameters with it (CPUOffload(offload_params=True), its only switch)."""
    reserve: int = 0
    """Bytes to leave free on every GPU (accepts `4GiB`)."""
    top: PositiveInt = 10
    """Layouts shown."""
    mfu: float = Field(0.40, gt=0, le=1)
    """Assumed model-FLOPs utilisation for the step-time estimate."""
    intra_node_bandwidth: int | None = None
    """Bytes/s per GPU inside a node, one direction (default: the GPU catalog's)."""
    inter_node_bandwidth: int | None = None
    """Bytes/s per GPU between nodes, one direction (default: the GPU catalog's)."""

    @field_validator("reserve", "intra_node_bandwidth", "inter_node_bandwidth", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        if value is None or value == 0:
            return value  # type: ignore[no-any-return]
        return parse_bytes(value)

    @model_validator(mode="after")
    def _one_batch(self) -> "PlanSpec":
        if self.global_batch_size and self.global_batch_tokens:
            raise ValueError("give global_batch_size or global_batch_tokens, not both")
        return self
