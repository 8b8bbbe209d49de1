"""An inventory from a checkpoint's own tensor table (names, shapes, stored dtypes).

The tensors are exact (they are what the file holds); what a file cannot say is filled in:
- kind and dtype: floating tensors are trainable parameters whose training dtype comes from
  the precision recipe (the file's bf16/fp32 is storage), so their dtype is None. Integer and
  bool tensors cannot take gradients: they are kept as persistent buffers at their stored dtype,
  and so are names that are buffers at run time (rotary `inv_freq`, `position_ids`, GPT-2's
  causal `attn.bias` mask, DeepSeek's `e_score_correction_bias`) and quantization scales.
- role and layer: from the model's config.json inventory when a tensor of the same name is in
  it (`reference`), else from the name (`classify`): `.layers.N.`, `.h.N.`, `.layer.N.`,
  `.block(s).N.` give the layer; name patterns give the role.
- with a reference, its architecture, tied pairs and non-persistent buffers (which no
  checkpoint stores), and a note on every difference between the file and the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from memplan.model.inventory import Inventory, TensorSpec

FLOAT_DTYPES = frozenset({"fp32", "fp16", "bf16", "fp8"})
"""Stored dtypes of trainable tensors (their training dtype is the recipe's)."""

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_NOT_DECODER = re.compile(r"vision|visual", re.IGNORECASE)

# First match wins; searched anywhere in the name.
_ROLES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), role)
    for pattern, role in (
        (r"_scale_inv$|\.weight_scale(_2)?$|\.input_scale$", "quantization"),
        (r"inv_freq$", "rotary"),
        (r"vision|visual|multi_modal_projector", "vision"),
        (r"shared_expert", "shared_expert"),
        (r"\.experts\.", "experts"),
        (r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$|\.router\.", "router"),
        (r"norm|(^|\.)ln_", "norm"),
        (r"pooler", "pooler"),
        (
            r"(^|\.)wpe\.|position_embeddings|embed_positions|position_ids"
            r"|relative_attention_bias",
            "position",
        ),
        (r"(^|\.)(lm_head|embed_out|cls|classifier|score)\.|^output\.weight$", "head"),
        (r"embed|(^|\.)wte\.|token_type|(^|\.)shared\.weight$", "embedding"),
        (r"DenseReluDense", "mlp"),
        (r"attn|attention|(^|\.)(q|k|v|o|query|key|value|wq|wk|wv|wo)(_proj)?\.", "attention"),
        (r"mlp|ffn|feed_forward|intermediate|\.output\.dense|dense_(h_to_4h|4h_to_h)", "mlp"),
        (r"(^|\.)(w1|w2|w3|fc1|fc2|c_fc)\.", "mlp"),
    )
)

# Names that are buffers at run time, whatever their stored dtype.
_BUFFER = re.compile(
    r"inv_freq$|position_ids$|token_type_ids$|e_score_correction_bias$"
    r"|\.attn\.(masked_)?bias$|_scale_inv$|\.weight_scale(_2)?$|\.input_scale$"
)


def classify(name: str) -> tuple[str, int | None]:
    """(role, layer index) read from a tensor name; role "other" when no pattern matches."""
    role = next((r for pattern, r in _ROLES if pattern.search(name)), "other")
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match and not _NOT_DECODER.search(name) else None
    return role, layer


def is_buffer(name: str, stored_dtype: str) -> bool:
    """A tensor that gets no gradient: integer/bool data, or a run-time buffer by name."""
    return stored_dtype not in FLOAT_DTYPES or bool(_BUFFER.search(name))


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """`layers.10` after `layers.9`: digit runs compare as numbers."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)
    )


def build(
    tensors: Sequence[TensorSpec],
    *,
    name: str,
    reference: Inventory | None = None,
    notes: Iterable[str] = (),
) -> Inventory:
    """The inventory of a checkpoint whose tensors are `tensors` (dtype: the stored dtype).

    `reference` is the inventory of the same model from its config.json, if there is one.
    """
    out_notes = list(notes)
    known = {t.name: t for t in (*reference.parameters, *reference.buffers)} if reference else {}
    specs = [_spec(t, known.get(t.name)) for t in tensors]
    specs, tied, tie_notes = _ties(specs, reference)
    out_notes += tie_notes

    stored_floats: dict[str, int] = {}
    for t in tensors:
        if t.dtype in FLOAT_DTYPES and not is_buffer(t.name, t.dtype or ""):
            stored_floats[t.dtype] = stored_floats.get(t.dtype, 0) + 1
    if stored_floats:
        stored = ", ".join(f"{d} ({n} tensors)" for d, n in stored_floats.items())
        out_notes.append(
            f"the checkpoint stores its floating tensors as {stored}: that is storage; "
            "parameters are counted at the precision recipe's dtypes."
        )
    fixed = [s for s in specs if s.kind == "buffer"]
    if fixed:
        shown = ", ".join(f"{s.name} ({s.dtype})" for s in fixed[:3])
        out_notes.append(
            f"{len(fixed)} tensors kept as persistent buffers at their stored dtype (integer or "
            f"bool data, quantization scales, or run-time buffers: no gradient, no optimizer "
            f"state), e.g. {shown}."
        )

    if reference is not None:
        # The model's registration order when the file has its names, else name order.
        order = {n: i for i, n in enumerate(known)}
        if all(s.name in order for s in specs):
            specs.sort(key=lambda s: order[s.name])
        else:
            specs.sort(key=lambda s: natural_key(s.name))
        out_notes += _cross_check(specs, reference)
        in_file = {s.name for s in specs}
        runtime = [b for b in reference.buffers if not b.persistent and b.name not in in_file]
        if runtime:
            specs += runtime
            out_notes.append(
                f"{len(runtime)} non-persistent buffers from config.json added (no checkpoint "
                f"stores them, the model allocates them): {', '.join(b.name for b in runtime[:3])}"
                f"{', ...' if len(runtime) > 3 else ''}."
            )
    else:
        specs.sort(key=lambda s: natural_key(s.name))
        out_notes.append(
            "no config.json beside the checkpoint: the architecture is unknown, so roles and "
            "layers are read from tensor names, MoE active parameters need top_k, and "
            "activations are not modelled; put the model's config.json next to the file."
        )
    return Inventory(
        name=name,
        architecture=reference.architecture if reference else None,
        parameters=tuple(s for s in specs if s.kind == "parameter"),
        buffers=tuple(s for s in specs if s.kind == "buffer"),
        tied=tied,
        notes=tuple(out_notes),
    )


def _spec(stored: TensorSpec, ref: TensorSpec | None) -> TensorSpec:
    """The inventory entry of one stored tensor (see the module docstring)."""
    dtype = stored.dtype or ""
    if ref is not None:
        role, layer = ref.role, ref.layer
        buffer = ref.kind == "buffer" or dtype not in FLOAT_DTYPES
    else:
        role, layer = classify(stored.name)
        buffer = is_buffer(stored.name, dtype)
    if buffer:
        if ref is not None and ref.kind == "buffer":  # the model's own dtype and persistence
            dtype, persistent = ref.dtype or dtype, ref.persistent
        else:
            persistent = True
        return TensorSpec(
            stored.name, stored.shape, "buffer", dtype, persistent, layer=layer, role=role
        )
    # A float parameter: the recipe's dtype, unless the model pins one (DeepSeek's fp32 router).
    fixed = ref.dtype if ref is not None and ref.kind == "parameter" else None
    return TensorSpec(stored.name, stored.shape, "parameter", fixed, layer=layer, role=role)


def _ties(
    specs: list[TensorSpec], reference: Inventory | None
) -> tuple[list[TensorSpec], tuple[tuple[str, str], ...], list[str]]:
    """The reference's tied pairs: an alias the file also stores is the owner's tensor."""
    if reference is None or not reference.tied:
        return specs, (), []
    shapes = {s.name: s.shape for s in specs}
    tied: list[tuple[str, str]] = []
    dropped: list[str] = []
    for alias, owner in reference.tied:
        if owner not in shapes:
            continue
        if alias in shapes:
            if shapes[alias] != shapes[owner]:
                continue
            dropped.append(alias)
        tied.append((alias, owner))
    notes = (
        [
            f"config.json ties {', '.join(dropped)} to the embedding; the checkpoint stores "
            "a copy, counted once (one tensor in training)."
        ]
        if dropped
        else []
    )
    return [s for s in specs if s.name not in dropped], tuple(tied), notes


def _cross_check(specs: Sequence[TensorSpec], reference: Inventory) -> list[str]:
    """A note when the file's parameters differ from the config's, with examples."""
    file_params = [s for s in specs if s.kind == "parameter"]
    file_total = sum(s.numel for s in file_params)
    ref_total = reference.num_parameters
    ref_shapes = {t.name: t.shape for t in reference.parameters}
    file_shapes = {s.name: s.shape for s in file_params}
    reshaped = [n for n, shape in file_shapes.items() if n in ref_shapes and ref_shapes[n] != shape]
    if file_total == ref_total and len(file_params) == len(reference.parameters) and not reshaped:
        return []
    only_file = [n for n in file_shapes if n not in ref_shapes]
    only_ref = [n for n in ref_shapes if n not in file_shapes]
    examples = []
    for label, names in (
        ("only in the file", only_file),
        ("only in config.json", only_ref),
        ("shaped differently", reshaped),
    ):
        if names:
            more = ", ..." if len(names) > 3 else ""
            examples.append(f"{len(names)} {label} ({', '.join(names[:3])}{more})")
    delta = file_total - ref_total
    per_expert = [s.name for s in file_params if s.role == "experts" and not _FUSED.search(s.name)]
    layout = (
        f" {len(per_expert)} tensors hold one expert each; transformers >= 5 fuses them into "
        "experts.gate_up_proj and experts.down_proj on load, and expert-parallel slicing "
        "(parallelism.expert > 1) follows that fused layout: give model.hf_config for it."
        if per_expert
        else ""
    )
    return [
        f"the checkpoint holds {file_total:,} parameters in {len(file_params):,} tensors; its "
        f"config.json describes {ref_total:,} in {len(reference.parameters):,} "
        f"({delta:+,} parameters): {'; '.join(examples) or 'same names'}. Usual causes: a "
        "checkpoint layout other than the transformers >= 5 runtime one (per-expert MoE "
        "tensors), a tied embedding stored twice, extra layers the runtime drops (multi-token "
        "prediction), quantized weights. The file's tensors are used." + layout
    ]
