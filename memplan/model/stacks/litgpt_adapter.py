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

Activations (`activations`, below): what the adapter GPTs' forward and fit's chunked loss save
for backward on one CPU device, proved to the byte against litgpt's own models run by Fabric
in fit's order, with and without LitGPT's recomputation (benchmarks/litgpt_adapter.py,
`activations_measured` and `activations`); CUDA is refused (docs/litgpt-adapter.md says why).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.config.finetune import FinetuneSpec
from memplan.errors import MemplanError
from memplan.model.forward import kernels
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.model.inventory import Architecture, Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE
from memplan.model.stacks import litgpt, litgpt_lora
from memplan.precision import dtype_bytes

SRC_ADAPTER = f"litgpt {litgpt.VERSION} litgpt/adapter.py"
SRC_ADAPTER_V2 = f"litgpt {litgpt.VERSION} litgpt/adapter_v2.py"

COVERED = frozenset({"llama", "mistral", "qwen2", "phi3"})
"""The Llama-shaped model types (RMSNorm, LLaMAMLP, sequential residual) whose HF tensors map
onto LitGPT's GPT one to one, as memplan.model.stacks.litgpt_lora covers them."""

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
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = "mlp.gate_up_proj"  # Phi-3: LitGPT splits it into fc_1 and fc_2
_TOP = {
    "model.embed_tokens": "transformer.wte",
    "model.norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj", "lm_head")
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
            f"LitGPT's adapter and adapter_v2 are modelled on its Llama-shaped configs "
            f"(model types {', '.join(sorted(COVERED))}); {arch.model_type!r} is not one"
        )
    return ""


def _split(name: str) -> tuple[str, str, str]:
    """(module, suffix under model.layers.{i}. or '', leaf) of an HF parameter name."""
    module, leaf = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        rest = module[len("model.layers.") :]
        index, _, suffix = rest.partition(".")
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


# Activations: what litgpt.adapter(_v2).GPT's forward and finetune/adapter(_v2).py::fit's loss
# save for backward on one device, after fit's no-grad validation filled every adapted layer's
# adapter_kv_cache (SRC_CACHE: the cached prefix keys and values need no gradient).

SRC_PREFIX = (
    f"{SRC_ADAPTER}::CausalSelfAttention.scaled_dot_product_attention (`amask = torch.ones(T, "
    "aT, dtype=torch.bool)`, `ay = super().scaled_dot_product_attention(q, ak, av, amask)`, "
    "`y + self.gating_factor * ay`); " + kernels.DERIV
)
SRC_SDPA_CPU = (
    "pytorch aten/src/ATen/native/transformers/sdp_utils_cpp.h::"
    "check_batch_size_and_num_heads_dense (read at 0119c205: the CPU flash kernel wants q, k "
    "and v of one batch size and head count; the cached k/v have batch 1 and, under "
    "multi-query, one head) and attention.cpp::_scaled_dot_product_attention_math (fp32 "
    "upcast; matmul expands k^T and v to q's batch; softmax's output kept); which path runs "
    "and what it keeps measured on torch 2.13.0+cpu (benchmarks/litgpt_adapter.py)"
)
SRC_CAST = "aten/src/ATen/autocast_mode.h::cached_cast (CPU autocast's lower-precision list)"
SRC_V2_LINEAR = (
    f"{SRC_ADAPTER_V2}::AdapterV2Linear.forward (`adapter_scale * (linear(x) + adapter_bias)`: "
    "the frozen linear keeps no input, the multiply keeps the sum for adapter_scale's "
    "gradient); " + kernels.DERIV
)
SRC_FIT_ADAPTER = (
    f"litgpt {litgpt.VERSION} finetune/adapter.py::fit and adapter_v2.py::fit "
    "(model(input_ids, lm_head_chunk_size=128), chunked_cross_entropy(logits, targets[..., 1:]), "
    "as finetune/lora.py::fit)"
)
_FROZEN = litgpt_lora.Flags(
    r=0, dropout=0.0, query=False, key=False, value=False, projection=False, mlp=False, head=False
)
"""No LoRA adapter: litgpt_lora's rule for the frozen base GPT around the prefix."""


def prefix_attention(
    arch: Architecture, st: Setting, aT: int, *, q_grad: bool, cast: bool = False
) -> list[Saved]:
    """The gated attention over the cached prefix (SRC_PREFIX) in an adapted layer. `ay` (q's
    dtype, [B, T, n_head, head_size]) is kept by `gating_factor * ay` for the gate's gradient.
    When q requires grad SDPA keeps more: on CPU, with q's batch 1 and k/v of every head, its
    flash kernel (SRC_SDPA_CPU) keeps the bool mask converted to q's dtype [T, aT], the
    logsumexp [B, n_head, T] fp32 and its output (that `ay`); otherwise the math path keeps
    k^T and v expanded to q's batch [B n_head, head_size, aT] / [B n_head, aT, head_size] and
    the softmax [B, n_head, T, aT], in fp32 (the cache needs no gradient: q itself is not
    kept)."""
    h, a, kv, d = kernels.attention_dims(arch)
    b, s, mm, fp32 = st.batch, st.sequence, st.matmul, kernels.FP32
    ay = kernels.saved("attn.prefix.output", (b, s, a, d), mm, "MulBackward0", SRC_PREFIX)
    if not q_grad:
        return [ay]
    if b == 1 and kv != 1:
        casts = [
            kernels.saved(f"attn.prefix.{n}_cast", shape, mm, "SdpaBackward", SRC_CAST)
            for n, shape in (
                ("query", (b, a, s, d)),
                ("key", (1, a, aT, d)),
                ("value", (1, a, aT, d)),
            )
        ]
        return [
            *(casts if cast else []),
            kernels.saved("attn.prefix.mask", (s, aT), mm, "SdpaBackward", SRC_SDPA_CPU),
            kernels.saved("attn.prefix.logsumexp", (b, a, s), fp32, "SdpaBackward", SRC_SDPA_CPU),
            ay,
        ]
    softmax = kernels.saved(
        "attn.prefix.softmax", (b, a, s, aT), fp32, "SoftmaxBackward0", SRC_SDPA_CPU
    )
    if kv == 1:
        # One cached head: matmul's expand of the fp32 [1, 1, aT, head_size] k^T and v to
        # [B, n_head, ...] has stride 0 in both batch dims, so its reshape is a view: bmm keeps
        # the scaled k (a new fp32 tensor) and v's fp32 upcast, which is the cache itself when
        # the cache is fp32 (32-true: nothing new).
        out = [kernels.saved("attn.prefix.key_t", (1, d, aT), fp32, "BmmBackward0", SRC_SDPA_CPU)]
        out.append(softmax)
        if mm != fp32:
            value = kernels.saved(
                "attn.prefix.value", (1, aT, d), fp32, "BmmBackward0", SRC_SDPA_CPU
            )
            out.append(value)
        return [*out, ay]
    return [
        kernels.saved("attn.prefix.key_t", (b * a, d, aT), fp32, "BmmBackward0", SRC_SDPA_CPU),
        softmax,
        kernels.saved("attn.prefix.value", (b * a, aT, d), fp32, "BmmBackward0", SRC_SDPA_CPU),
        ay,
    ]


def _v1_layer(arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool) -> list[Saved]:
    """One Block of litgpt.adapter.GPT. Every base weight is frozen, so it saves what
    litgpt_lora's frozen layer saves (nothing when its input needs no gradient), plus the
    prefix attention of an adapted layer; the first adapted layer after frozen ones (input
    without gradient) keeps only `ay` in its attention, then proj's weight cast (autocast),
    norm_2 and the MLP as a layer whose residual requires grad."""
    if not adapted:
        return litgpt_lora._layer(arch, st, _FROZEN, g_in)[0]
    full = litgpt_lora._layer(arch, st, _FROZEN, True)[0]
    if g_in:
        return [*full, *prefix_attention(arch, st, aT, q_grad=True)]
    kept = [x for x in full if x.name.startswith(("attn.proj.", "norm_2.", "mlp."))]
    return [*prefix_attention(arch, st, aT, q_grad=False), *kept]


def _v2_sum(name: str, shape: tuple[int, ...], st: Setting) -> Saved:
    """AdapterV2Linear's `linear(x) + adapter_bias`, kept by the scale's multiply: in the
    parameters' dtype (stream), the bias's promotion lifting autocast's bf16 output to fp32."""
    return kernels.saved(f"{name}.adapter_sum", shape, st.stream, "MulBackward0", SRC_V2_LINEAR)


def _v2_layer(arch: Architecture, st: Setting, aT: int, adapted: bool, g_in: bool) -> list[Saved]:
    """One Block of litgpt.adapter_v2.GPT: the trainable norms keep x_normed (and, when the
    input requires grad, all of litgpt.norm); every AdapterV2Linear keeps its sum (_v2_sum)
    and under autocast its frozen weight's cast; q, k, v reach SDPA as litgpt.attention_saves
    says, except under autocast, where SDPA casts the fp32 qkv output's q, k and v to bf16
    (v a new copy even with one key per query head); the MLP's silu and product run in the
    stream dtype."""
    h, a, kv, d = kernels.attention_dims(arch)
    t, inter = st.tokens, arch.intermediate_size
    qkv_out = (a + 2 * kv) * d
    casts = {
        "attn.qkv": (qkv_out, h),
        "attn.proj": (h, a * d),
        "mlp.fc_1": (inter, h),
        "mlp.fc_2": (inter, h),
        "mlp.proj": (h, inter),
    }

    def cast(name: str) -> list[Saved]:
        return litgpt_lora._weight_cast(name, casts[name], st, x_grad=True)

    out: list[Saved] = []
    norm1 = litgpt.norm("norm_1", t, h, st)
    out += norm1 if g_in else [x for x in norm1 if x.name.endswith(".normalized")]
    out += [*cast("attn.qkv"), _v2_sum("attn.qkv", (t, qkv_out), st)]
    main = [x for x in litgpt.attention_saves(arch, st) if x.name != "attn.proj.input"]
    if st.stream != st.matmul:
        value = kernels.saved(
            "attn.value", (st.batch, a, st.sequence, d), st.matmul, "SdpaBackward", litgpt.SRC_ATTN
        )
        main = [value if x.name == "attn.qkv.output" else x for x in main]
    out += main
    if adapted:
        out += prefix_attention(arch, st, aT, q_grad=True, cast=st.stream != st.matmul)
    out += [*cast("attn.proj"), _v2_sum("attn.proj", (t, h), st)]
    out += litgpt.norm("norm_2", t, h, st)
    src = SRC_V2_LINEAR
    out += [
        *cast("mlp.fc_1"),
        _v2_sum("mlp.fc_1", (t, inter), st),
        *cast("mlp.fc_2"),
        _v2_sum("mlp.fc_2", (t, inter), st),
        kernels.saved("mlp.fc_1.output", (t, inter), st.stream, "SiluBackward0", src),
        kernels.saved("mlp.silu.output", (t, inter), st.stream, "MulBackward0", src),
        kernels.saved("mlp.fc_2.output", (t, inter), st.stream, "MulBackward0", src),
        *cast("mlp.proj"),
        _v2_sum("mlp.proj", (t, h), st),
    ]
    return out


def _v2_head(arch: Architecture, st: Setting) -> list[Saved]:
    """adapter_v2's head: ln_f trains (all of litgpt.norm), and every 128-position chunk's
    AdapterV2Linear lm_head keeps its weight's cast (autocast) and its sum [B, chunk, vocab]."""
    h, vocab, b = arch.hidden_size, arch.vocab_size, st.batch
    out = litgpt.norm("transformer.ln_f", st.tokens, h, st)
    for i, c in enumerate(litgpt_lora._chunks(st.sequence)):
        out += litgpt_lora._weight_cast(f"lm_head.{i}", (vocab, h), st, x_grad=True)
        out.append(_v2_sum(f"lm_head.{i}", (b, c, vocab), st))
    return out


def activations(arch: Architecture, st: Setting, ft: FinetuneSpec) -> Activations:
    """litgpt.adapter(_v2).GPT's forward and fit's chunked loss on one device (see the
    comments above), or why not."""
    why = litgpt.unsupported(arch, st) or litgpt_lora.unsupported(st)
    if not why and arch.model_type not in COVERED:
        why = (
            f"LitGPT's {ft.method} is modelled on its Llama-shaped configs (model types "
            f"{', '.join(sorted(COVERED))})"
        )
    if not why and st.device == "cuda":
        why = (
            "on CUDA the kernel of the prefix attention (the cached k/v of batch 1 against q's "
            "batch, with a bool mask) is not settled from torch 2.13's source (sdp_utils.cpp::"
            "select_sdp_backend: its order depends on the runtime cuDNN and the GPU; "
            "docs/litgpt-adapter.md) and was not measured; the rule is proved on CPU "
            "(hardware.device: cpu)"
        )
    if why:
        return litgpt.refused(f"activations not modelled: {why}.")
    v2 = ft.method == "adapter_v2"
    h, vocab, t, b, s = arch.hidden_size, arch.vocab_size, st.tokens, st.batch, st.sequence
    blocks = [Block(name="embeddings", count=1, tensors=())]
    g = False  # the frozen embedding's output needs no gradient
    runs: list[tuple[list[Saved], int]] = []
    for i in range(arch.num_layers):
        adapted = i >= ft.adapter_start_layer
        layer = (_v2_layer if v2 else _v1_layer)(arch, st, ft.adapter_prompt_length, adapted, g)
        g = g or adapted or v2
        if runs and runs[-1][0] == layer:
            runs[-1] = (layer, runs[-1][1] + 1)
        else:
            runs.append((layer, 1))
    for layer, count in runs:
        if st.checkpointing == "full" and layer:
            # LitGPT's checkpoint around every Block (as memplan.model.stacks.litgpt_lora): the
            # block input kept, the layer's tensors recomputed in backward.
            kept = kernels.saved(
                "checkpoint.x", (b, s, h), st.stream, "Noop", litgpt.SRC_CHECKPOINT
            )
            blocks.append(
                Block(
                    name="layers",
                    count=count,
                    tensors=(kept,),
                    recompute=tuple(layer),
                    layered=True,
                )
            )
        elif st.checkpointing == "full":
            # A block that records nothing packs nothing: its checkpoint frame is not kept.
            blocks.append(Block(name="layers", count=count, tensors=(), layered=True))
        else:
            blocks.append(Block(name="layers", count=count, tensors=tuple(layer), layered=True))
    head = _v2_head(arch, st) if v2 else litgpt_lora._head(arch, st, _FROZEN, g)
    blocks.append(Block(name="head", count=1, tensors=tuple(head)))
    blocks.append(Block(name="loss", count=1, tensors=tuple(litgpt_lora.loss(b, s, vocab))))
    src = SRC_ADAPTER_V2 if v2 else SRC_ADAPTER
    notes: tuple[str, ...] = (
        f"{src}: the adapter GPT's forward on CPU after fit's no-grad validation filled the "
        f"prefix caches; prefix attention from layer {ft.adapter_start_layer} "
        f"({ft.adapter_prompt_length} positions), {SRC_FIT_ADAPTER}.",
        "LitGPT's fit loop keeps Fabric's fp32 logits chunks until the next forward returns: "
        "the step holds them in every phase (memplan.step.transients.litgpt_logits).",
    )
    return Activations(
        modelled=True,
        blocks=tuple(blocks),
        logits_bytes=t * vocab * dtype_bytes(st.stream if v2 else st.matmul),
        upcast_bytes=(
            t * vocab * dtype_bytes(kernels.FP32)
            if (st.stream if v2 else st.matmul) != kernels.FP32
            else 0
        ),
        hidden_bytes=t * h * dtype_bytes(st.stream),
        loss_gradient_bytes=litgpt_lora.loss_gradient(b, s, vocab),
        notes=notes,
        implementation="litgpt",
    )
