"""What memplan knows about one architecture family, in one record.

Each family module (memplan/model/families/<family>.py) builds its tensors, lists its saved
tensors and ends with its `Family` record; memplan.model.families registers the records, and
every stage reads a family's facts from its record: the inventory builder (memplan.model.
sources), the saved-tensor rule (memplan.activations), peft's defaults (memplan.model.finetune),
the module kinds (memplan.model.module_tree), tensor parallelism (memplan.states.parallel,
memplan.activations.layout, memplan.verify.tensor_parallel) and the LoRA activation rules
(memplan.activations.lora).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from memplan.model.forward.assemble import Model
from memplan.model.inventory import Inventory

Tensors = Callable[..., Inventory]
"""`build(config, *, origin)`: the inventory of the model a config.json mapping describes."""

SavedRule = Callable[..., "Model | str"]
"""`rule(arch, setting, *, tied)`: the model's saved tensors, or why they are not modelled."""

PEFT_HAS_NONE: tuple[str, ...] = ()
"""`peft_targets` of a family peft 0.21.2 has no default target_modules for: LoRA needs
finetune.target_modules."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEnds:
    """How the model ends (the modules outside the layers) of a family whose frozen / LoRA
    activations memplan.activations.lora models are laid out, relative to the model root."""

    layer: Literal["llama", "gpt2", "phi3"]
    """The layer dataflow memplan.activations.lora_flow follows (`_llama_flow`, `_gpt2_flow`,
    `_phi3_flow`)."""
    embeddings: tuple[tuple[str, str], ...]
    """(saved-name prefix, embedding module) for each input embedding."""
    final_norm: str
    final_prefix: str
    rms_norm: bool
    """The final norm is an RMSNorm (else a LayerNorm)."""
    head: str = "lm_head"
    sandwich: frozenset[str] = frozenset()
    """model_types whose layers norm each sublayer's output before the residual and the MLP's
    input after it (Gemma 2 / 3: post_attention_layernorm, pre_/post_feedforward_layernorm)."""
    eager_attention: frozenset[str] = frozenset()
    """model_types that run eager attention whatever attention is asked for (Gemma 2:
    memplan.model.families.gemma._attention_kernel)."""
    moe: Mapping[str, Literal["routed", "shared"]] = field(default_factory=dict)
    """model_type -> its layers' MLP is a sparse MoE block (memplan.model.forward.mlp.
    sparse_moe), with a shared expert and its gate ("shared": Qwen2-MoE) or without."""
    embed_scale: bool = False
    """The input embedding multiplies its lookup by a 0-dim `embed_scale` buffer
    (GemmaTextScaledWordEmbedding), which peft applies to an embedding adapter's output too."""
    head_softcap: str = ""
    """Saved-name prefix of a tanh softcap on the logits (Gemma 2's final_logit_softcapping)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One architecture family: the config.json model_types it serves and its facts."""

    name: str
    model_types: tuple[str, ...]
    """config.json `model_type`s this record serves (each in exactly one record)."""
    tensors: Tensors
    """Builds the inventory from a config.json mapping."""
    saved: SavedRule | str
    """The saved-tensor rule (memplan.activations.predict), or why the family's activations
    are not modelled (shown on the models page; predict reports the model_type as not
    modelled)."""
    peft_targets: tuple[str, ...]
    """peft's default target_modules (peft 0.21.2 utils/constants.py::
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), or PEFT_HAS_NONE."""
    peft_moe: Mapping[str, str] = field(default_factory=dict)
    """model_type -> the MoE target mapping peft converts v4 target names with (peft 0.21.2
    utils/transformers_weight_conversion.py::_convert_peft_config_moe, keyed by transformers
    5.25 conversion_mapping.py::_MODEL_TO_CONVERSION_PATTERN; memplan.model.finetune.lora)."""
    conv1d: frozenset[str] = frozenset()
    """Modules that are transformers' Conv1D (pytorch_utils.py::Conv1D: weight [in, out]):
    LoRA adapts them as Conv1D, and tensor parallelism splits their weights along the other
    dimension."""
    tp_refusal: str = ""
    """Why the activations are not modelled under tensor parallelism ('' where they are)."""
    lora_ends: ModelEnds | None = None
    """The model ends for memplan.activations.lora (None: frozen / LoRA activations are not
    modelled)."""
    dtensor_tp: bool = False
    """memplan.verify.tensor_parallel's DTensor plan shards it (Llama-style modules: separate
    q/k/v and gate/up/down linears; attention views q/k/v as (..., -1, head_dim))."""

    @property
    def modelled(self) -> bool:
        """Its activations have a rule."""
        return not isinstance(self.saved, str)
