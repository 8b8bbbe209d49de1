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


@dataclass(frozen=True, slots=True)
class Quant:
    """finetune/lora.py --quantize bnb.*: Lightning's 4-bit linears and the StableEmbedding."""

    keeps_input: bool
    """bitsandbytes before 0.43.2: MatMul4Bit keeps its input when it needs grad (SRC_KEEPS_A)."""


def lightning_quantization(ft: FinetuneSpec) -> FinetuneSpec:
    """The quantization litgpt's finetune/lora.py asks Lightning for, in memplan.model.
    finetune.qlora's terms (SRC_LIGHTNING): every Linear, the head included (no skipped
    module), and no peft prepare_model_for_kbit_training (LitGPT never calls it: the other
    parameters stay in the plugin's dtype)."""
    return ft.model_copy(update={"skip_modules": (), "prepare_kbit": False})


@lru_cache(maxsize=64)
def stable_embedding(inventory: Inventory) -> Inventory:
    """The model after finetune/lora.py::main swaps `transformer.wte` for bitsandbytes'
    StableEmbedding (SRC_STABLE): a new module built after mark_only_lora_as_trainable, so
    its weight requires grad again, plus a LayerNorm of [hidden] weight and bias, moved to
    the old weight's dtype (`.to(device=..., dtype=old_embedding.weight.dtype)`). The
    optimizer was built before the swap: these three get gradients but no optimizer state
    in LitGPT (memplan's optimizer rows count them, see the note). Cached: caches keyed on
    an inventory want the same one per layout."""
    params: list[TensorSpec] = []
    swapped = ""
    for t in inventory.parameters:
        if not swapped and t.role == "embedding" and len(t.shape) == 2:
            swapped = t.name
            hidden = t.shape[1]
            params.append(replace(t, trainable=True))
            params += [
                TensorSpec(
                    f"{owner(t.name)}.{STABLE_NORM}.{leaf}",
                    (hidden,),
                    "parameter",
                    t.dtype,
                    role="norm",
                    trainable=True,
                )
                for leaf in ("weight", "bias")
            ]
        else:
            params.append(t)
    if not swapped:
        return inventory
    note = (
        f"LitGPT's QLoRA swaps the embedding for bitsandbytes' StableEmbedding ({SRC_STABLE}): "
        f"{swapped} and its LayerNorm's weight and bias require grad, but the PagedAdamW "
        "LitGPT built before the swap does not hold them; memplan counts their gradients "
        "(held to the end, never zeroed by that optimizer) and, as for every trainable "
        "tensor, optimizer state LitGPT does not have (paged: outside max_allocated)."
    )
    return replace(inventory, parameters=tuple(params), notes=(*inventory.notes, note))


def stable_embedding_saves(arch: Architecture, st: Setting, q: Quant | None) -> list[Saved]:
    """What StableEmbedding's forward keeps (SRC_STABLE), nothing for the frozen embedding:
    F.embedding its int64 indices (its weight requires grad), the LayerNorm its input (the
    embedding output: `.to(torch.get_default_dtype())` is Fabric's forward dtype, no copy),
    mean and rstd; its output, `.to(self.weight.dtype)`, is no copy either."""
    if q is None:
        return []
    h, t = arch.hidden_size, st.tokens
    return [
        kernels.embedding_indices("transformer.wte.indices", (st.batch, st.sequence)),
        *kernels.layer_norm(f"transformer.wte.{STABLE_NORM}", t, h, st.stream, st),
    ]
