"""LitGPT's adapter fine-tuning (`model.implementation: litgpt` with `finetune.method: adapter`
or `adapter_v2`): the model as litgpt 0.5.9's finetune/adapter.py and finetune/adapter_v2.py
build and train it, tensor by tensor, in LitGPT's own parameter names.

Read from litgpt 0.5.9:
- finetune/adapter.py::main: `GPT(config)` from litgpt/adapter.py under `fabric.init_module()`
  (every tensor in the precision plugin's dtype), then `mark_only_adapter_as_trainable(model)`:
  a parameter trains when its name holds "adapter_wte" or "gating_factor"
  (adapter.py::adapter_filter); `instantiate_torch_optimizer(optimizer, model.parameters())`
  gives every parameter, and torch's optimizers keep state only for those with a gradient.
- adapter.py::CausalSelfAttention.__init__: from layer `adapter_start_layer` on (default 2),
  `adapter_wte = nn.Embedding(adapter_prompt_length, n_embd)` (default 10 positions) and
  `gating_factor = nn.Parameter(torch.zeros(1, 1, n_head, 1))`.
- finetune/adapter_v2.py::main: `GPT(config)` from litgpt/adapter_v2.py, then
  `mark_only_adapter_v2_as_trainable(model)`: the names holding "adapter_wte", "gating_factor",
  "adapter_scale", "adapter_bias", "norm_1", "norm_2" or "ln_f" (adapter_v2.py::adapter_filter).
- adapter_v2.py: every Linear of the model (attention `qkv` and `proj`, the MLP's `fc_1`,
  `fc_2`, `proj`, and `lm_head`) is an `AdapterV2Linear`: the Linear as `.linear`, beside
  `adapter_bias = zeros(out_features)` and `adapter_scale = ones(out_features)`.

The rest of the model is LitGPT's GPT (memplan.model.stacks.litgpt): one fused `attn.qkv`
[(n_head + 2 n_query_groups) head_size, n_embd] (the HF q/k/v weights stacked, as
scripts/convert_hf_checkpoint.py::copy_weights_hf_llama does; Phi-3's `qkv_proj` is that
already), `mlp.fc_1` / `mlp.fc_2` / `mlp.proj` (gate / up / down; Phi-3's `gate_up_proj` split
in halves), norms `norm_1` / `norm_2` / `ln_f`, and its own `lm_head`.

Proved on the meta device against litgpt's own adapter GPTs and their mark_only_* functions
by tests/test_litgpt_adapter.py (benchmarks/litgpt_adapter.py: names, shapes, dtypes and
trainable flags of whole published models).

What their forward saves for backward: memplan.model.stacks.litgpt_adapter_saved.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.config.finetune import FinetuneSpec
from memplan.errors import MemplanError
from memplan.model.inventory import Architecture, Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE
from memplan.model.stacks import litgpt

SRC_ADAPTER = f"litgpt {litgpt.VERSION} litgpt/adapter.py"
SRC_ADAPTER_V2 = f"litgpt {litgpt.VERSION} litgpt/adapter_v2.py"

COVERED = frozenset({"llama", "mistral", "qwen2", "phi3", "phi", "gpt_neox"})
"""The model types whose HF tensors map onto LitGPT's GPT one to one: the Llama-shaped ones
(RMSNorm, LLaMAMLP, sequential residual), as memplan.model.stacks.litgpt_lora covers them, and
Phi (phi-1.5 / phi-2: litgpt config.py's "phi-1_5" / "phi-2", the parallel-residual Block with
one shared LayerNorm, GptNeoxMLP `fc` / `proj`, biases, lm_head's bias; HF names as litgpt
scripts/convert_hf_checkpoint.py::copy_weights_phi maps them), and GPT-NeoX (StableLM Alpha,
Pythia: the parallel-residual Block with two LayerNorms, GptNeoxMLP, biases; HF names as
copy_weights_gpt_neox maps them)."""

SRC_CACHE = (
    f"{SRC_ADAPTER}::CausalSelfAttention.scaled_dot_product_attention (`if self.adapter_kv_cache "
    "is not None: ak, av = self.adapter_kv_cache`, else computed and stored); "
    f"litgpt {litgpt.VERSION} finetune/adapter.py::fit and adapter_v2.py::fit (`validate(...)` "
    "before the loop, initial_validation or the sanity check) and ::validate "
    "(@torch.no_grad())"
)
NO_GRAD_PREFIX = "adapter_wte"
"""The prefix embedding: requires grad (adapter_filter) but its keys and values come from the
cache validate filled without a graph, so no gradient ever reaches it (SRC_CACHE; measured by
tests/litgpt_probe.py::adapter_fit_grads on litgpt's own GPT)."""
ADAPTER_V1_TRAINS = ("adapter_wte", "gating_factor")
"""adapter.py::adapter_filter: the substrings of the names that train."""
ADAPTER_V2_TRAINS = (
    *ADAPTER_V1_TRAINS,
    "adapter_scale",
    "adapter_bias",
    "norm_1",
    "norm_2",
    "ln_f",
)
"""adapter_v2.py::adapter_filter: the substrings of the names that train."""

# HF module suffix (under model.layers.{i}.) -> LitGPT module under transformer.h.{i}.
_LAYER = {
    "input_layernorm": "norm_1",
    "self_attn.o_proj": "attn.proj",
    "post_attention_layernorm": "norm_2",
    "mlp.gate_proj": "mlp.fc_1",
    "mlp.up_proj": "mlp.fc_2",
    "mlp.down_proj": "mlp.proj",
    "self_attn.qkv_proj": "attn.qkv",  # Phi-3: fused already
    "self_attn.dense": "attn.proj",  # Phi
    "mlp.fc1": "mlp.fc",  # Phi: GptNeoxMLP
    "mlp.fc2": "mlp.proj",
    "attention.query_key_value": "attn.qkv",  # GPT-NeoX: fused already
    "attention.dense": "attn.proj",
    "mlp.dense_h_to_4h": "mlp.fc",
    "mlp.dense_4h_to_h": "mlp.proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = "mlp.gate_up_proj"  # Phi-3: LitGPT splits it into fc_1 and fc_2
_TOP = {
    "model.embed_tokens": "transformer.wte",
    "model.norm": "transformer.ln_f",
    "model.final_layernorm": "transformer.ln_f",  # Phi
    "gpt_neox.embed_in": "transformer.wte",  # GPT-NeoX
    "gpt_neox.final_layer_norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.fc", "mlp.proj", "lm_head")
"""The modules adapter_v2.py makes AdapterV2Linear."""


def refusal(inventory: Inventory) -> str:
    """Why LitGPT's adapter inventory is not modelled for this model, or ''."""
    arch = inventory.architecture
    if arch is None or inventory.is_bare_count:
        return (
            "LitGPT's adapter methods need the model's tensors: give hf_config, a preset or an "
            "architecture instead of num_parameters"
        )
    if arch.model_type not in COVERED:
        return (
            f"LitGPT's adapter and adapter_v2 are modelled on its Llama-shaped configs, "
            f"Phi and GPT-NeoX (model types {', '.join(sorted(COVERED))}); "
            f"{arch.model_type!r} is not one"
        )
    return ""


def _split(name: str) -> tuple[str, str, str]:
    """(module, suffix under model.layers.{i}. or '', leaf) of an HF parameter name."""
    module, leaf = name.rsplit(".", 1)
    for stack in ("model.layers.", "gpt_neox.layers."):
        if module.startswith(stack):
            index, _, suffix = module[len(stack) :].partition(".")
            return f"transformer.h.{index}", suffix, leaf
    return module, "", leaf


def litgpt_tensors(inventory: Inventory) -> list[TensorSpec]:
    """The base GPT's parameters in LitGPT's names (see the module docstring), before the
    adapter's; shapes, dtypes, layers and roles from the HF tensors they come from."""
    out: list[TensorSpec] = []
    qkv: dict[tuple[str, str], list[TensorSpec]] = {}
    for t in inventory.parameters:
        module, suffix, leaf = _split(t.name)
        if suffix in _QKV:
            qkv.setdefault((module, leaf), []).append(t)
            if len(qkv[(module, leaf)]) == len(_QKV):
                parts = qkv[(module, leaf)]
                rows = sum(p.shape[0] for p in parts)
                fused = replace(parts[0], name=f"{module}.attn.qkv.{leaf}")
                out.append(replace(fused, shape=(rows, *parts[0].shape[1:])))
        elif suffix == _GATE_UP:
            half = (t.shape[0] // 2, *t.shape[1:])
            out += [replace(t, name=f"{module}.mlp.fc_{i}.{leaf}", shape=half) for i in (1, 2)]
        elif suffix in _LAYER:
            out.append(replace(t, name=f"{module}.{_LAYER[suffix]}.{leaf}"))
        elif not suffix and module in _TOP:
            out.append(replace(t, name=f"{_TOP[module]}.{leaf}"))
        else:
            raise MemplanError(
                f"{t.name}: memplan has no LitGPT name for this tensor (LitGPT's adapter "
                f"methods are modelled on model types {', '.join(sorted(COVERED))}).",
                field="finetune.method",
            )
    return out


def _v2_linear(t: TensorSpec) -> str | None:
    """The AdapterV2Linear a base tensor belongs to (adapter_v2.py), or None."""
    module = t.name.rsplit(".", 1)[0]
    if any(module == m or module.endswith(f".{m}") for m in _LINEARS):
        return module
    return None


def kv_cache(
    arch: Architecture, layer: int, ft: FinetuneSpec, *, dtype: str, prefix: str
) -> list[TensorSpec]:
    """One adapted layer's `adapter_kv_cache`, filled once by fit's first (no-grad) forward
    and held by the module for the rest of the run (SRC_CACHE): `aqkv = qkv(adapter_wte.weight
    .reshape(1, aT, n_embd))` split into k and v, which `repeat_interleave(q_per_kv, dim=2)`
    copies to [1, n_head, aT, head_size] each whenever n_query_groups != 1 (q_per_kv 1
    included); with one query group (multi-query) both are views of aqkv
    [1, aT, (n_head + 2) head_size]. `dtype`: qkv's output dtype."""
    a, kv, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    aT = ft.adapter_prompt_length
    name = f"{prefix}.adapter_kv_cache"
    shapes: list[tuple[str, tuple[int, ...]]]
    if kv == 1:
        shapes = [(name, (1, aT, (a + 2) * d))]
    else:
        shapes = [(f"{name}.{i}", (1, a, aT, d)) for i in (0, 1)]
    return [
        TensorSpec(n, shape, "buffer", dtype, persistent=False, layer=layer, role="attention")
        for n, shape in shapes
    ]


def inventory(base: Inventory, ft: FinetuneSpec, *, compute: str, held: str) -> Inventory:
    """The inventory of litgpt.adapter.GPT (`method: adapter`) or litgpt.adapter_v2.GPT
    (`adapter_v2`) after mark_only_adapter(_v2)_as_trainable (see the module docstring), as
    finetune/adapter(_v2).py::fit trains it: `adapter_wte` requires grad but never gets a
    gradient (NO_GRAD_PREFIX), so it is held frozen here; every adapted layer holds its
    `adapter_kv_cache` (kv_cache) in qkv's output dtype: `compute` for adapter (the matmul
    dtype under autocast), `held` (the parameter dtype) for adapter_v2, whose
    `adapter_scale * (linear(x) + adapter_bias)` promotes an autocast bf16 output back to the
    fp32 parameters' dtype (measured: fp32 under bf16-mixed, tests/test_litgpt_adapter.py)."""
    why = refusal(base)
    if why:
        raise MemplanError(f"finetune.method {ft.method}: {why}.", field="finetune.method")
    arch = base.architecture
    assert arch is not None  # refusal checked it
    v2 = ft.method == "adapter_v2"
    params: list[TensorSpec] = []
    buffers: list[TensorSpec] = []
    for t in litgpt_tensors(litgpt.own_inventory(base)):
        module, leaf = t.name.rsplit(".", 1)
        linear = _v2_linear(t) if v2 else None
        if linear is not None:
            t = replace(t, name=f"{linear}.linear.{leaf}")
        params.append(t)
        if linear is not None and leaf == "weight":
            # AdapterV2Linear.__init__: adapter_bias zeros(out), adapter_scale ones(out).
            out_features = t.shape[0]
            params += [
                replace(t, name=f"{linear}.{extra}", shape=(out_features,))
                for extra in ("adapter_bias", "adapter_scale")
            ]
        if module.endswith(".attn.proj") and leaf == "weight" and t.layer is not None:
            if t.layer >= ft.adapter_start_layer:
                # adapter.py::CausalSelfAttention.__init__ from adapter_start_layer on.
                attn = module.removesuffix(".proj")
                params += [
                    replace(
                        t,
                        name=f"{attn}.adapter_wte.weight",
                        shape=(ft.adapter_prompt_length, arch.hidden_size),
                    ),
                    replace(
                        t, name=f"{attn}.gating_factor", shape=(1, 1, arch.num_attention_heads, 1)
                    ),
                ]
                cache_dtype = held if v2 else compute
                buffers += kv_cache(arch, t.layer, ft, dtype=cache_dtype, prefix=attn)
    trains = ADAPTER_V2_TRAINS if v2 else ADAPTER_V1_TRAINS
    params = [
        replace(t, trainable=any(s in t.name for s in trains) and NO_GRAD_PREFIX not in t.name)
        for t in params
    ]
    adapted = arch.num_layers - min(ft.adapter_start_layer, arch.num_layers)
    src = SRC_ADAPTER_V2 if v2 else SRC_ADAPTER
    what = (
        "adapter_wte and gating_factor, every AdapterV2Linear's adapter_bias and "
        "adapter_scale, and the norms (norm_1, norm_2, ln_f)"
        if v2
        else "adapter_wte and gating_factor"
    )
    note = (
        f"{FINETUNE_NOTE} LitGPT {ft.method} ({src}): a {ft.adapter_prompt_length}-position "
        f"prefix on {adapted} of {arch.num_layers} layers (from adapter_start_layer "
        f"{ft.adapter_start_layer}); trains {what}, every other parameter frozen "
        f"(mark_only_{ft.method}_as_trainable); tensors in LitGPT's names."
    )
    cache = (
        f"{FINETUNE_NOTE} LitGPT {ft.method}: fit's validation runs first, under no_grad, and "
        "fills every adapted layer's adapter_kv_cache, which training then reuses: adapter_wte "
        "gets no gradient and no optimizer state (held frozen here) and the cached prefix keys "
        f"and values stay allocated (buffers, {sum(b.numel for b in buffers):,} elements; "
        f"{SRC_CACHE})."
    )
    return replace(
        base,
        parameters=tuple(params),
        buffers=(*base.buffers, *buffers),
        tied=(),
        notes=(*base.notes, note, *((cache,) if buffers else ())),
    )
