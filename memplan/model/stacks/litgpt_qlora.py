"""LitGPT's QLoRA (`model.implementation: litgpt`, `finetune.method: qlora`): the model
litgpt 0.5.9's finetune/lora.py trains with `--quantize bnb.*` (Lightning's 4-bit linears,
bitsandbytes' StableEmbedding) and what the StableEmbedding saves for backward. The LoRA GPT
around it and its saved tensors are memplan.model.stacks.litgpt_lora's; the 4-bit weights'
sizes are memplan.model.finetune.qlora's. Proved by tests/test_litgpt_qlora.py (see the
module docstring of memplan.model.stacks.litgpt_lora for why not by Lightning's own run)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from memplan.config.finetune import FinetuneSpec
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture, Inventory, TensorSpec
from memplan.model.module_tree import owner
from memplan.model.stacks import litgpt

SRC_LIGHTNING = (
    "lightning 2.6 fabric/plugins/precision/bitsandbytes.py::BitsandbytesPrecision."
    "convert_module, _convert_layers (every torch.nn.Linear not under ignore_modules); litgpt "
    f"{litgpt.VERSION} finetune/lora.py::setup (BitsandbytesPrecision(quantize[4:], dtype))"
)
SRC_STABLE = (
    f"litgpt {litgpt.VERSION} finetune/lora.py::main (StableEmbedding swapped in after "
    "instantiate_bnb_optimizer); bitsandbytes 0.50 nn/modules.py::StableEmbedding (forward: "
    "F.embedding, `.to(torch.get_default_dtype())`, self.norm, a torch.nn.LayerNorm; __init__: "
    "GlobalOptimManager.register_module_override(self, 'weight', {'optim_bits': 32}))"
)
SRC_KEEPS_A = (
    "bitsandbytes 0.41.1 autograd/_functions.py::MatMul4Bit.forward (`ctx.tensors = (A, B)` "
    "when any input needs grad; (None, B) from 0.43.2, PR #1270)"
)
STABLE_NORM = "norm"
"""StableEmbedding's LayerNorm attribute (`self.norm`): its weight and bias are
`<embedding>.norm.weight` and `.bias`."""


SRC_NO_SWAP = (
    "litgpt v0.4.13 finetune/lora.py::main (`instantiate_bnb_optimizer(optimizer, "
    "model.parameters())`, no swap; the swap came in PR #1770, commit ae798aba, first tagged "
    "v0.5.0); lit-gpt 8641822 finetune/lora.py::main (bnb.optim.PagedAdamW over the trainable "
    "parameters, no swap)"
)


@dataclass(frozen=True, slots=True)
class Quant:
    """finetune/lora.py --quantize bnb.*: Lightning's 4-bit linears and, from litgpt 0.5.0,
    the StableEmbedding."""

    keeps_input: bool
    """bitsandbytes before 0.43.2: MatMul4Bit keeps its input when it needs grad (SRC_KEEPS_A)."""
    stable_embedding: bool
    """The embedding is swapped for StableEmbedding (SRC_STABLE; finetune.stable_embedding):
    its output requires grad. False: the frozen model's embedding (SRC_NO_SWAP)."""


def swaps_embedding(ft: FinetuneSpec) -> bool:
    """Whether the job's finetune/lora.py swaps in StableEmbedding (finetune.stable_embedding,
    None: true, as litgpt 0.5.9 runs); for qlora under model.implementation litgpt."""
    return ft.stable_embedding is not False


def lightning_quantization(ft: FinetuneSpec) -> FinetuneSpec:
    """The quantization litgpt's finetune/lora.py asks Lightning for, in memplan.model.
    finetune.qlora's terms (SRC_LIGHTNING): every Linear, the head included (no skipped
    module), and no peft prepare_model_for_kbit_training (LitGPT never calls it: the other
    parameters stay in the plugin's dtype)."""
    return ft.model_copy(update={"skip_modules": (), "prepare_kbit": False})


SRC_NOT_STEPPED = (
    f"litgpt {litgpt.VERSION} finetune/lora.py::main (`optimizer = instantiate_bnb_optimizer("
    "optimizer, model.parameters())` before the swap: the old embedding weight is in its "
    "param_groups, the StableEmbedding's tensors are not; `old_embedding` stays a local of main "
    "through fit); utils.py::instantiate_bnb_optimizer (bnb.optim.PagedAdamW); bitsandbytes "
    "0.50 optim/optimizer.py::Optimizer8bit.step (state only for param_groups tensors with a "
    "grad)"
)
REPLACED_PREFIX = "optimizer.param_groups."
"""The name memplan gives the replaced embedding weight the optimizer still holds: this prefix
and its old name (it is no longer in `model.named_parameters()`)."""
REPLACED_ROLE = "replaced"


def one_device_engine(engine: str) -> str:
    """Why LitGPT's QLoRA is modelled under engine ddp only (one process, no wrapper)."""
    return (
        f"qlora under model.implementation litgpt runs on one device with Fabric's default "
        f'strategy (litgpt {litgpt.VERSION} finetune/lora.py::setup: strategy = "auto" for '
        f"devices=1), not {engine}: use parallelism.engine ddp (one rank, no wrapper)."
    )


@lru_cache(maxsize=64)
def stable_embedding(inventory: Inventory) -> Inventory:
    """The model after finetune/lora.py::main swaps `transformer.wte` for bitsandbytes'
    StableEmbedding (SRC_STABLE): a new module built after mark_only_lora_as_trainable, so
    its weight requires grad again, plus a LayerNorm of [hidden] weight and bias, moved to
    the old weight's dtype (`.to(device=..., dtype=old_embedding.weight.dtype)`).

    The PagedAdamW was built before the swap over `model.parameters()` (SRC_NOT_STEPPED):
    these three get gradients but no optimizer state (`stepped=False`: their gradients are
    held to the end, never cleared by that optimizer's zero_grad), and the old, frozen
    embedding weight stays alive in its param_groups (no gradient, no state), listed as a
    frozen parameter `optimizer.param_groups.<name>`. Proved on litgpt's model and
    bitsandbytes' PagedAdamW on CPU (tests/test_litgpt_qlora.py). Cached: caches keyed on an
    inventory want the same one per layout."""
    params: list[TensorSpec] = []
    swapped: TensorSpec | None = None
    for t in inventory.parameters:
        if swapped is None and t.role == "embedding" and len(t.shape) == 2:
            swapped = t
            hidden = t.shape[1]
            params.append(replace(t, trainable=True, stepped=False))
            params += [
                TensorSpec(
                    f"{owner(t.name)}.{STABLE_NORM}.{leaf}",
                    (hidden,),
                    "parameter",
                    t.dtype,
                    role="norm",
                    trainable=True,
                    stepped=False,
                )
                for leaf in ("weight", "bias")
            ]
        else:
            params.append(t)
    if swapped is None:
        return inventory
    params.append(
        replace(
            swapped,
            name=REPLACED_PREFIX + swapped.name,
            role=REPLACED_ROLE,
            trainable=False,
            stepped=True,
        )
    )
    note = (
        f"LitGPT's QLoRA swaps the embedding for bitsandbytes' StableEmbedding ({SRC_STABLE}) "
        f"after building its PagedAdamW ({SRC_NOT_STEPPED}): {swapped.name} and its "
        "LayerNorm's weight and bias require grad but the optimizer does not hold them, so "
        "memplan counts their gradients (held to the end, never zeroed by that optimizer) and "
        "no optimizer state; the replaced embedding weight stays allocated in the optimizer's "
        f"param_groups ({REPLACED_PREFIX}{swapped.name}, frozen: "
        f"{swapped.numel:,} elements in the parameters row)."
    )
    return replace(inventory, parameters=tuple(params), notes=(*inventory.notes, note))


def stable_embedding_saves(arch: Architecture, st: Setting, q: Quant | None) -> list[Saved]:
    """What StableEmbedding's forward keeps (SRC_STABLE), nothing for the frozen embedding
    (LoRA, or QLoRA without the swap, SRC_NO_SWAP): F.embedding its int64 indices (its weight
    requires grad), the LayerNorm its input (the embedding output: `.to(torch.
    get_default_dtype())` is Fabric's forward dtype, no copy), mean and rstd; its output,
    `.to(self.weight.dtype)`, is no copy either."""
    if q is None or not q.stable_embedding:
        return []
    h, t = arch.hidden_size, st.tokens
    return [
        kernels.embedding_indices("transformer.wte.indices", (st.batch, st.sequence)),
        *kernels.layer_norm(f"transformer.wte.{STABLE_NORM}", t, h, st.stream, st),
    ]
