"""The inventory of any model transformers can build, read from the model itself.

`inventory_from_config(config)` builds the model a config.json describes on the meta device
(`with torch.device("meta")`: shapes and dtypes, no storage) with transformers' own classes,
never `from_pretrained` and never remote code, and reads every parameter and buffer:

- the model class: the first of `architectures` that transformers exports (a classification
  or encoder-decoder head included), else `AutoModelForCausalLM`, else `AutoModel`;
- parameters: `named_parameters()` (each tensor once), tied aliases found as
  `named_parameters(remove_duplicate=False)` names whose tensor is another name's object
  (torch/nn/modules/module.py::Module._named_members keeps the first name of each tensor);
- buffers: `named_buffers()` with persistence from the owning module's
  `_non_persistent_buffers_set` (torch/nn/modules/module.py::Module.register_buffer);
- dtypes: the model is built in fp16 (`from_config(..., dtype=torch.float16)`); a floating
  tensor in fp16 follows the recipe (dtype None), anything else keeps its dtype, e.g. the
  rotary `inv_freq` buffers transformers creates fp32 whatever the default dtype (the hand
  families mark them the same way: memplan.model.families._decoder.rotary_buffers), and
  RecurrentGemma's `normalizer`, created bf16 whatever the default dtype (transformers 5.25
  modeling_recurrent_gemma.py::RecurrentGemmaModel.__init__: `torch.tensor(hidden_size**0.5,
  dtype=torch.bfloat16)`), which a bf16 build could not tell from a tensor that follows (a
  fp32 run holds it in 2 bytes, not 4). fp16, not bf16: of transformers 5.25's modeling files
  only that buffer names a half dtype (`dtype=torch.bfloat16` / `torch.float16`), and every
  causal-LM type builds the same tensors in the same dtypes in fp16 as in bf16 but it;
- layer index and role: from the names (`heuristics`, below), as the hand families label them
  where the names follow the usual patterns;
- the Architecture: from the config object, whose `attribute_map` resolves each family's own
  key names (e.g. GPT-2's `n_embd` for hidden_size:
  transformers/configuration_utils.py::PreTrainedConfig.__getattribute__).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from memplan.errors import MemplanError
from memplan.model.families import supported_model_types
from memplan.model.inventory import Architecture, Inventory, TensorSpec

BUILD_DTYPE = "fp16"
"""The dtype the model is built in: a floating tensor left in it follows the recipe's dtype."""

IGNORED_KEYS = ("quantization_config", "auto_map")
"""config.json keys not passed to the config class (same as memplan.model.sources.from_config:
tensors are counted at the recipe's dtypes, and no remote code is run)."""

_TORCH_DTYPE_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "int64": "int64",
    "int32": "int32",
    "uint8": "uint8",
    "int8": "int8",
    "bool": "bool",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def build_model(config: Mapping[str, Any], *, origin: str = "config") -> Any:
    """The transformers model `config` describes, on the meta device, in fp16 (BUILD_DTYPE)."""
    import torch
    import transformers

    cls, hf_config = _model_class(config, origin=origin)
    try:
        with torch.device("meta"):
            return cls._from_config(hf_config, dtype=torch.float16)
    except Exception as err:  # noqa: BLE001 - any failure of the model code is the user's answer
        raise MemplanError(
            f"{origin}: transformers {transformers.__version__} could not build "
            f"{cls.__name__} from this config on the meta device: "
            f"{type(err).__name__}: {_one_line(err)}",
            field="model_type",
        ) from None


def inventory_from_config(config: Mapping[str, Any], *, origin: str = "config") -> Inventory:
    """Every parameter and buffer of the model `config` (a config.json mapping) describes, as
    transformers builds it."""
    model = build_model(config, origin=origin)
    parameters, tied = _parameters(model)
    # Parameters the loss never reaches: no gradient, no optimizer state (TensorSpec.gradient).
    from memplan.verify.trace.gradients import without_gradient

    no_grad, grad_note = without_gradient(type(model), model.config)
    if no_grad:
        names = set(no_grad)
        parameters = [replace(t, gradient=False) if t.name in names else t for t in parameters]
    buffers = _buffers(model)
    hf_config = model.config
    arch = architecture(hf_config, parameters)
    notes = [
        f"inventory built on the meta device by transformers {transformers_version()}'s "
        f"{type(model).__name__}."
    ]
    archs = config.get("architectures") or []
    if archs and type(model).__name__ not in archs:
        notes.append(
            f"architectures {list(archs)} name no class transformers {transformers_version()} "
            f"exports (remote code is never run): built as {type(model).__name__}."
        )
    if grad_note:
        notes.append(grad_note)
    ignored = [key for key in IGNORED_KEYS if key in config]
    if ignored:
        notes.append(
            f"{' and '.join(ignored)} in the config ignored: tensors are counted at the "
            "precision recipe's dtypes, and no remote code is run."
        )
    name = config.get("_name_or_path") or arch.model_type
    return Inventory(
        name=str(name),
        architecture=arch,
        parameters=tuple(parameters),
        buffers=tuple(buffers),
        tied=tuple(tied),
        notes=tuple(notes),
    )


# -- the model class ----------------------------------------------------------------------


def _model_class(config: Mapping[str, Any], *, origin: str) -> tuple[Any, Any]:
    """(the class to build, the transformers config object)."""
    import transformers

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise MemplanError(f"{origin} has no model_type.", field="model_type")
    kwargs = {k: v for k, v in config.items() if k not in (*IGNORED_KEYS, "model_type")}
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except ValueError as err:
        if model_type not in transformers.CONFIG_MAPPING:
            raise MemplanError(
                f"model_type {model_type!r} is not supported. Supported: "
                f"{', '.join(supported_model_types())}. Nor does the installed transformers "
                f"({transformers.__version__}) know it, so its model code cannot build the "
                "inventory either. Otherwise describe "
                "the model with `model: {architecture: {...}}` using one of those families' "
                "keys, or give `model: {num_parameters: N}` for model states only.",
                field="model_type",
            ) from None
        raise MemplanError(
            f"{origin}: transformers {transformers.__version__} refused this config: "
            f"{_one_line(err)}",
            field="model_type",
        ) from None
    except Exception as err:  # noqa: BLE001 - a config class's own validation
        raise MemplanError(
            f"{origin}: transformers {transformers.__version__} refused this config: "
            f"{type(err).__name__}: {_one_line(err)}",
            field="model_type",
        ) from None
    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, _config_for(cls, hf_config)
    autos = (
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSeq2SeqLM,  # encoder-decoders: T5ForConditionalGeneration
        transformers.AutoModel,
    )
    for auto in autos:
        if type(hf_config) in auto._model_mapping:
            cls = auto._model_mapping[type(hf_config)]
            return cls, _config_for(cls, hf_config)
    raise MemplanError(
        f"{origin}: transformers {transformers.__version__} has no causal-LM or base model "
        f"for model_type {model_type!r}, and none of architectures "
        f"{list(config.get('architectures') or [])} is a class it exports.",
        field="architectures",
    )


def _config_for(cls: Any, hf_config: Any) -> Any:
    """The config `cls` is built from: a text-only class (e.g. `Llama4ForCausalLM`, which the
    causal-LM mapping names for the image-text `llama4`) takes the composite config's text part
    (`PreTrainedConfig.get_text_config`), the way its `config_class` declares."""
    wanted = getattr(cls, "config_class", None)
    if not isinstance(wanted, type) or isinstance(hf_config, wanted):
        return hf_config
    text = hf_config.get_text_config(decoder=True)
    return text if isinstance(text, wanted) else hf_config


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# -- reading the tensors ------------------------------------------------------------------


def dtype_name(dtype: Any) -> str | None:
    """memplan's name for a torch dtype; None for the build dtype (it follows the recipe)."""
    name = _TORCH_DTYPE_NAMES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise MemplanError(f"a tensor of dtype {dtype} has no memplan dtype name.")
    return None if name == BUILD_DTYPE else name


def _parameters(model: Any) -> tuple[list[TensorSpec], list[tuple[str, str]]]:
    specs: list[TensorSpec] = []
    owners: dict[int, str] = {}
    for name, p in model.named_parameters():
        owners[id(p)] = name
        specs.append(
            TensorSpec(
                name,
                tuple(p.shape),
                "parameter",
                dtype=dtype_name(p.dtype),
                layer=layer_of(name),
                role=role_of(name),
                trainable=bool(p.requires_grad),
            )
        )
    tied = [
        (name, owners[id(p)])
        for name, p in model.named_parameters(remove_duplicate=False)
        if owners[id(p)] != name
    ]
    return specs, tied


def _buffers(model: Any) -> list[TensorSpec]:
    specs = []
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        specs.append(
            TensorSpec(
                name,
                tuple(buf.shape),
                "buffer",
                dtype=dtype_name(buf.dtype),
                persistent=leaf not in module._non_persistent_buffers_set,
                layer=layer_of(name),
                role=role_of(name),
            )
        )
    return specs


# -- heuristics ---------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")
"""`model.layers.N.`, GPT-2's `transformer.h.N.`, T5's `encoder.block.N.`, BERT's
`encoder.layer.N.`: the first such index in a name is its layer."""


def layer_of(name: str) -> int | None:
    """The index of the repeated block `name` belongs to, from its name; None outside one."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


_NORM = re.compile(r"(^|_)(norm|layernorm|layer_norm|ln(_\w+)?|ln\d*|rms_norm|rmsnorm)$|norm")
_HEAD = ("lm_head", "score", "classifier", "qa_outputs", "cls", "pooler", "head")
_EMBED = ("embed", "wte", "wpe", "shared")
_ATTN = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value",
         "rotary", "qkv")  # fmt: skip
_MLP = ("mlp", "feed_forward", "ffn", "fc1", "fc2", "c_fc", "intermediate", "dense_h_to_4h",
        "dense_4h_to_h", "gate_proj", "up_proj", "down_proj", "wi", "wo", "moe")  # fmt: skip


def role_of(name: str) -> str:
    """What a tensor is, from its module path: embedding / attention / mlp / experts /
    shared_expert / router / norm / head / other (the labels the hand families use)."""
    modules = name.split(".")[:-1]
    leaf = modules[-1] if modules else ""
    if _NORM.search(leaf):
        return "norm"
    if any("shared_expert" in m for m in modules):
        return "shared_expert"
    if any(m == "experts" or m.startswith("experts") for m in modules):
        return "experts"
    if leaf in ("gate", "router") or "router" in leaf:
        return "router"
    if any(m.startswith(_ATTN) or m.endswith(_ATTN) for m in modules):
        return "attention"
    if any(m.startswith(_MLP) or m.endswith(_MLP) for m in modules):
        return "mlp"
    if any(m.startswith(_EMBED) or "embed" in m for m in modules):
        return "embedding"
    if any(m in _HEAD or m.endswith("_head") for m in modules):
        return "head"
    return "other"


# -- the architecture ---------------------------------------------------------------------


def architecture(hf_config: Any, parameters: list[TensorSpec]) -> Architecture:
    """The shape facts of the (text) model, read through the config's attribute_map."""
    text = (
        hf_config.get_text_config(decoder=True)
        if hasattr(hf_config, "get_text_config")
        else hf_config
    )

    def first(*keys: str) -> int:
        for key in keys:
            try:
                value = getattr(text, key, None)
            except Exception:  # noqa: BLE001 - e.g. a per-layer attribute of a heterogeneous config
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    hidden = first("hidden_size", "d_model", "n_embd")
    heads = first("num_attention_heads", "n_head", "num_heads")
    layers = first("num_hidden_layers", "num_layers", "n_layer")
    built = len({t.layer for t in parameters if t.layer is not None})
    if not layers:
        layers = built
    elif layers != built and first("num_layers") == built:
        # two layer keys that disagree, the built layers matching one: transformers 5.25
        # configuration_longcat_flash.py, `num_hidden_layers` is 2 x `num_layers` (the
        # attention sub-layers; the model builds `num_layers` LongcatFlashDecoderLayer)
        layers = built
    head_dim = first("head_dim", "d_kv") or (hidden // heads if heads else 0)
    experts = first("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return Architecture(
        model_type=str(hf_config.model_type),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=first("vocab_size"),
        num_attention_heads=heads,
        num_key_value_heads=first("num_key_value_heads", "num_kv_heads") or heads,
        head_dim=head_dim,
        intermediate_size=first("intermediate_size", "ffn_dim", "d_ff", "n_inner"),
        num_experts=experts,
        num_experts_per_token=first("num_experts_per_tok", "moe_topk", "top_k") if experts else 0,
        max_position_embeddings=first("max_position_embeddings", "n_positions"),
        extra={"traced_by": "meta"},
    )


__all__ = ["architecture", "build_model", "dtype_name", "inventory_from_config", "layer_of",
           "role_of"]  # fmt: skip
