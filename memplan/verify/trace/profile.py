"""Trace what a model saves for backward and write it as a profile (memplan.model.profile).

A reduced copy of the model (two layers of each distinct layer kind, the config otherwise as
given) is built with transformers' `AutoModelForCausalLM.from_config` inside torch's
FakeTensorMode (parameters are fake tensors: no memory, any size), put in train mode, and run
forward + causal-LM loss (labels = input_ids, the loss transformers computes) under
`torch.autograd.graph.saved_tensors_hooks`. Each saved storage is recorded once, under the
first module that saves it, parameters and buffers excluded (the contract of
memplan.model.forward.tensors, as tests/activation_probe.py measures it on real tensors; fake
tensors have no data pointer, so a storage is known by its StorageImpl, `_cdata`).

Blocks: what is saved before the first decoder layer runs is the embeddings', what each decoder
layer saves is that layer's (a storage saved by more than one layer, e.g. RoPE's cos/sin or a
mask, is made once per forward and listed with the embeddings, as memplan's rules do), what is
saved after the last layer and before transformers' loss function is the head's, the rest the
loss's. Each storage's element count is fitted over `memplan.model.profile.BASIS` on a grid of
(batch, sequence) sizes and checked on one more.

Precision as memplan's Setting: the model is built in the stream dtype and, when the recipe
autocasts, run under torch.autocast(device, matmul dtype). Fake tensors run the CPU kernels'
meta functions: profiles are device=cpu (CUDA's SDPA saves other tensors: a CUDA profile needs
the trace on a CUDA fake device, `FakeTensorMode` with CUDA-device inputs, which is not done).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode

from memplan.config.load import LoadedSpec
from memplan.errors import MemplanError
from memplan.model import load as model_load
from memplan.model.profile import BASIS, SCHEMA, Key, config_hash, from_document, terms
from memplan.report.estimate import setting_of
from memplan.verify.trace import fit as fit_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
GRID = ((2, 1), (3, 1), (2, 2), (3, 2), (2, 3), (3, 3))
"""(batch, sequence multiple) sizes fitted for batch >= 2: {2, 3} x {1, 2, 3} spans BASIS."""
CHECK = (4, 5)
"""(batch, sequence multiple) the batch >= 2 fit is checked on."""
GRID_B1 = ((1, 1), (1, 2), (1, 3))
"""Batch 1 is fitted on its own over 1, s, s*s: torch saves other storages there (transformers'
causal-LM loss shifts labels with `labels[..., 1:].contiguous()`, a view without a copy when
the batch is 1: s + 1 elements, b * s otherwise)."""
CHECK_B1 = (1, 5)
SEQ_UNIT = 8
"""Tokens per sequence multiple."""


def reduced_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """The config with two layers of each distinct layer kind, and the full model's layer count
    per kind (config `layer_types`, else one kind, "decoder")."""
    cfg = dict(config)
    full = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0)
    if full <= 0:
        raise MemplanError("the config has no layer count (num_hidden_layers, n_layer).")
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        kinds = list(dict.fromkeys(str(t) for t in types))
        counts = {k: sum(1 for t in types if str(t) == k) for k in kinds}
        cfg["layer_types"] = kinds * 2
        layers = 2 * len(kinds)
    else:
        counts = {"decoder": full}
        layers = min(2, full)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in cfg:
            cfg[key] = layers
    if not any(k in cfg for k in ("num_hidden_layers", "n_layer", "num_layers")):
        cfg["num_hidden_layers"] = layers
    return cfg, counts


def check_full_structure(config: Mapping[str, Any], counts: Mapping[str, int]) -> None:
    """The full-depth model, built on the meta device (no memory, ~0.1 s for 100 layers):
    every layer of one kind must have the same parameters, or tracing two of them would not
    describe the rest (DeepSeek's first_k_dense_replace, Qwen MoE's mlp_only_layers, ...)."""
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = _head_class(config)(cfg)
    n = sum(counts.values())
    _, layers = _layers(model, n)
    kinds = _layer_kinds(dict(config), n) if len(counts) > 1 else ["decoder"] * n
    seen: dict[str, tuple[Any, ...]] = {}
    for i, (kind, layer) in enumerate(zip(kinds, layers, strict=True)):
        shape = (
            type(layer).__name__,
            tuple((name, tuple(p.shape)) for name, p in layer.named_parameters()),
        )
        if kind in seen and seen[kind] != shape:
            first = kinds.index(kind)
            raise MemplanError(
                f"layer {i} has other parameters than layer {first} ({type(layer).__name__}): "
                "the config makes layers of several structures that `layer_types` does not "
                "name (dense and MoE layers, ...); profiles trace two layers per kind, so this "
                "model is not traced yet."
            )
        seen.setdefault(kind, shape)


def sequence_unit(cfg: Any) -> int:
    """Tokens per traced sequence multiple: 8, or one more than the sliding window, so that
    every traced sequence is longer than the window (the code path changes where the window
    starts to cut: sdpa gets an explicit mask). The profile holds from that length on."""
    window = getattr(cfg, "sliding_window", None)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if not isinstance(window, int) or window <= 0 or not getattr(cfg, "use_sliding_window", True):
        return SEQ_UNIT
    if limit and window >= limit:
        return SEQ_UNIT  # never cuts a sequence the model takes
    return max(SEQ_UNIT, window + 1)


def _layer_kinds(reduced: Mapping[str, Any], n: int) -> list[str]:
    types = reduced.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [str(t) for t in types]
    return ["decoder"] * n


def _build(
    config: Mapping[str, Any], *, stream: str, attention: str, checkpointing: str
) -> tuple[torch.nn.Module, FakeTensorMode]:
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    kwargs.pop("torch_dtype", None)
    kwargs.pop("dtype", None)
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    except (KeyError, ValueError) as err:
        raise MemplanError(
            f"transformers cannot build model_type {config.get('model_type')!r}: {err}"
        ) from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise MemplanError(
            "profiles trace decoder-only and encoder-only models; encoder-decoder is not "
            "traced yet."
        )
    # `sdpa` is transformers' default, as verify builds it (memplan/verify/build.py::
    # build_model): sdpa where the class supports it, else eager (gpt_oss: attention sinks).
    impl = {"attn_implementation": "eager"} if attention == "eager" else {}
    mode = FakeTensorMode()
    with mode:
        model = _head_class(config)(cfg, dtype=DTYPES[stream], **impl)
    if _is_moe(cfg):
        _check_moe(model, stream)
    model.train()
    if checkpointing == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, mode


def _head_class(config: Mapping[str, Any]) -> Any:
    """The class config.json's `architectures` names when it is a language-model head
    (CausalLM, MaskedLM, LMHead: the loss takes labels = input_ids), else
    AutoModelForCausalLM."""
    for name in config.get("architectures") or ():
        if any(k in str(name) for k in ("CausalLM", "MaskedLM", "LMHead")):
            cls = getattr(transformers, str(name), None)
            if cls is not None:
                return cls._from_config
    return transformers.AutoModelForCausalLM.from_config


MOE_NOTE = (
    "MoE: experts run transformers' grouped_mm implementation (integrations/moe.py::"
    "grouped_mm_experts_forward, the default where it can dispatch), which sorts the "
    "tokens x top_k (token, expert) pairs by expert and multiplies them in one grouped GEMM: "
    "every saved tensor has tokens x top_k rows whatever the routing, so no routing assumption "
    "enters the sizes (the router's choices in the fake run carry no data)."
)


def _check_moe(model: torch.nn.Module, stream: str) -> None:
    """Refuse MoE models whose experts' saved sizes depend on the routing, or that fake
    tensors cannot run."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl != "grouped_mm":
        raise MemplanError(
            f"the experts run transformers' {impl!r} implementation, whose per-expert loop "
            "saves tensors sized by the routing (data-dependent: FakeTensorMode has no data). "
            "Profiles trace the grouped_mm implementation only (sizes independent of routing)."
        )
    if stream != "bf16":
        raise MemplanError(
            f"MoE experts in {stream}: torch's meta kernel for _grouped_mm "
            "(torch/_meta_registrations.py::_meta_grouped_mm_common) accepts bf16 only, while "
            "the CPU kernel also runs fp32, so fake tensors cannot trace this recipe. Profiles "
            "of MoE models are traced in bf16 (precision: bf16)."
        )


def _is_moe(cfg: Any) -> bool:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return True
    return False


def _layers(model: torch.nn.Module, n: int) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers: the ModuleList of `n` modules holding the most parameters."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise MemplanError(f"no list of {n} layers found in {type(model).__name__}.")
    return best[1], best[2]


def trace_once(
    model: torch.nn.Module,
    mode: FakeTensorMode,
    *,
    batch: int,
    sequence: int,
    autocast: str | None,
    layer_count: int,
) -> list[fit_.Record]:
    """One forward + loss; every saved storage once, with its block and module."""
    prefix, layers = _layers(model, layer_count)
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    state = {"block": "embeddings"}
    layer_of = {id(m): i for i, m in enumerate(layers)}
    hooks = []

    def pre(module: torch.nn.Module, *_: Any) -> None:
        stack.append(names.get(module, "?"))
        if id(module) in layer_of:
            state["block"] = f"layer.{layer_of[id(module)]}"

    def post(module: torch.nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()
        if id(module) == id(layers[len(layers) - 1]):
            state["block"] = "head"

    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))
    loss_fn: Any = model.loss_function

    def loss_function(*args: Any, **kwargs: Any) -> Any:
        state["block"] = "loss"
        stack.append("loss")
        try:
            return loss_fn(*args, **kwargs)
        finally:
            stack.pop()

    model.loss_function = loss_function  # type: ignore[assignment]
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    records: dict[int, fit_.Record] = {}
    # Every storage handed to `pack` is kept referenced until the trace ends, so that its
    # address (`_cdata`) names it alone: a storage saved by a node the forward then drops (a
    # MoE router's index tensors off the loss's path: glm4_moe, phimoe) is freed during the
    # forward, and a later one made at its address was taken for it (merged into the earlier
    # block, at some sizes only, which the fit refused). It stays counted, as
    # memplan/verify/measure.py counts every storage saved (first seen).
    kept: list[Any] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept.append(storage)
        key = storage._cdata
        if key in skip:
            return t
        block = state["block"]
        if key not in records:
            module = stack[-1] if stack else ""
            layer_name = f"{prefix}.{block.split('.')[1]}." if block.startswith("layer.") else ""
            rel = module.removeprefix(layer_name) if layer_name else module
            if layer_name and module == layer_name[:-1]:
                rel = ""  # the layer itself (checkpoint's saved inputs)
            dtype = NAMES.get(t.dtype)
            if dtype is None:
                raise MemplanError(f"a saved tensor of dtype {t.dtype} memplan does not know.")
            records[key] = fit_.Record(
                block, rel or "(block)", dtype, storage.nbytes() // t.element_size()
            )
        records[key].savers.add(block)
        return t

    cast = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast else contextlib.nullcontext()
    try:
        with (
            mode,
            _real_tensor_masks(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            cast,
        ):
            ids = torch.zeros((batch, sequence), dtype=torch.int64)
            model(input_ids=ids, labels=ids.clone(), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.loss_function = loss_fn
        kept.clear()
    return list(records.values())


@contextlib.contextmanager
def _real_tensor_masks() -> Any:
    """Let transformers decide the attention mask as it does on real tensors.

    transformers.masking_utils reads data to choose the mask, and counts a FakeTensor as
    "tracing" (utils/import_utils.py::is_tracing), where it takes the general path: under
    FakeTensorMode SDPA would get an explicit (b, 1, s, s) mask, and so repeated k/v instead of
    `enable_gqa`, which a real run does not make. The trace passes neither attention_mask nor
    position_ids (no padding, one sequence per row, as the real-tensor probe and training
    without packing do), so the real-tensor answers are known without data, and given here:

    - `find_packed_sequence_indices(position_ids)`: position_ids are arange(s), no packed
      sequences, None;
    - `_ignore_causal_mask_sdpa(None, ...)`: no padding mask, so the causal mask is skipped
      (`is_causal=True`) unless a local window is not longer than the keys. Calls with a padding
      mask go to transformers."""
    import transformers.masking_utils as masking

    packed = masking.find_packed_sequence_indices
    original = masking._ignore_causal_mask_sdpa

    def ignore(padding_mask: Any, q_length: int, kv_length: int, *args: Any, **kw: Any) -> bool:
        if padding_mask is not None:
            return bool(original(padding_mask, q_length, kv_length, *args, **kw))
        local = kw.get("local_attention_size", args[2] if len(args) > 2 else None)
        return not (local is not None and kv_length >= local)

    masking._ignore_causal_mask_sdpa = ignore
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking._ignore_causal_mask_sdpa = original
        masking.find_packed_sequence_indices = packed


def _blocks(
    config: Mapping[str, Any],
    *,
    stream: str,
    matmul: str,
    autocast: bool,
    attention: str,
    checkpointing: str,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], list[str], dict[str, Any]]:
    """Fitted tensors per block: embeddings, one per layer kind (`layer:<kind>`), head, loss."""
    reduced, counts = reduced_config(config)
    check_full_structure(config, counts)
    model, mode = _build(reduced, stream=stream, attention=attention, checkpointing=checkpointing)
    n = int(getattr(model.config, "num_hidden_layers", 0) or len(_layers_any(model)))
    kinds = _layer_kinds(reduced, n)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    unit = sequence_unit(model.config)
    if limit and CHECK[1] * unit > limit:
        raise MemplanError(
            f"max_position_embeddings {limit} is below the traced sizes (up to "
            f"{CHECK[1] * unit} tokens)."
        )
    out: dict[str, list[dict[str, Any]]] = {}
    for suffix, grid, chk in (("", GRID, CHECK), ("@b1", GRID_B1, CHECK_B1)):
        sizes = [(b, m * unit) for b, m in grid]
        check = (chk[0], chk[1] * unit)
        traced = [
            fit_.split(
                trace_once(
                    model,
                    mode,
                    batch=b,
                    sequence=s,
                    autocast=matmul if autocast else None,
                    layer_count=n,
                )
            )
            for b, s in (*sizes, check)
        ]
        fitted: dict[str, list[dict[str, Any]]] = {}
        for block in ("embeddings", *(f"layer.{i}" for i in range(n)), "head", "loss"):
            fitted[block] = fit_.fit(traced[:-1], sizes, block)
            expected = [
                sum(c * x for c, x in zip(t["numel"], terms(*check), strict=True))
                for t in fitted[block]
            ]
            measured = [r.numel for r in traced[-1].get(block, [])]
            if expected != measured:
                raise MemplanError(
                    f"block {block}: the fit predicts {expected} elements at {check}, the trace "
                    f"saved {measured}."
                )
        per_kind: dict[str, list[dict[str, Any]]] = {}
        for i, kind in enumerate(kinds):
            tensors = fitted[f"layer.{i}"]
            if kind in per_kind and per_kind[kind] != tensors:
                raise MemplanError(f"layers of kind {kind!r} save different tensors in one model.")
            per_kind.setdefault(kind, tensors)
        out["embeddings" + suffix] = fitted["embeddings"]
        out.update({f"layer:{k}{suffix}": v for k, v in per_kind.items()})
        out["head" + suffix] = fitted["head"]
        out["loss" + suffix] = fitted["loss"]
    mcfg: Any = model.config
    model_facts = {
        "sequence_unit": unit,
        "hidden_size": int(mcfg.hidden_size),
        "vocab_size": int(mcfg.vocab_size),
        "traced_layers": n,
        "moe": _is_moe(mcfg),
        "class": type(model).__name__,
    }
    return out, counts, kinds, model_facts


def _layers_any(model: torch.nn.Module) -> torch.nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise MemplanError(f"{type(model).__name__} has no list of layers.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def build(
    config: Mapping[str, Any],
    *,
    stream: str,
    matmul: str,
    autocast: bool,
    attention: str,
    checkpointing: str = "none",
    device: str = "cpu",
) -> dict[str, Any]:
    """The profile document of `config` (a config.json mapping) for one recipe and kernel."""
    if device != "cpu":
        raise MemplanError(
            "profiles are traced with the CPU kernels (device=cpu); a CUDA profile needs a fake "
            "CUDA device, not done yet."
        )
    if checkpointing not in ("none", "full"):
        raise MemplanError(f"checkpointing {checkpointing!r}: profiles trace none or full.")
    started = time.perf_counter()
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    common: dict[str, Any] = {
        "stream": stream,
        "matmul": matmul,
        "autocast": autocast,
        "attention": attention,
    }
    blocks, counts, kinds, facts = _blocks(config, checkpointing=checkpointing, **common)
    recompute: dict[str, list[dict[str, Any]]] = {}
    if checkpointing == "full":
        plain, _, _, _ = _blocks(config, checkpointing="none", **common)
        recompute = {k: v for k, v in plain.items() if k.startswith("layer:")}

    def lists(name: str, kind: str = "") -> dict[str, Any]:
        src = f"layer:{kind}" if kind else name
        out = {"tensors": fit_.named(blocks[src]), "tensors_b1": fit_.named(blocks[src + "@b1"])}
        if kind:
            out["recompute"] = fit_.named(recompute.get(src, []))
            out["recompute_b1"] = fit_.named(recompute.get(src + "@b1", []))
        return out

    key = Key(
        model_type=str(config["model_type"]),
        config_hash=config_hash(config),
        device=device,
        checkpointing=checkpointing,
        **common,
    )
    kind_names = list(counts)
    main = max(kind_names, key=lambda k: counts[k])
    doc_blocks: list[dict[str, Any]] = [
        {"name": "embeddings", "kind": "", "count": 1, **lists("embeddings")}
    ]
    for kind in kind_names:
        doc_blocks.append(
            {
                "name": "layers" if kind == main else f"layers.{kind}",
                "kind": kind,
                "count": counts[kind],
                **lists("", kind),
            }
        )
    doc_blocks += [
        {"name": "head", "kind": "", "count": 1, **lists("head")},
        {"name": "loss", "kind": "", "count": 1, **lists("loss")},
    ]
    return {
        "schema": SCHEMA,
        "key": {
            "model_type": key.model_type,
            "config_hash": key.config_hash,
            "stream": stream,
            "matmul": matmul,
            "autocast": autocast,
            "attention": attention,
            "device": device,
            "checkpointing": checkpointing,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {**facts, "layer_counts": counts},
        "fit": {
            "basis": list(BASIS),
            "sizes": [[b, m * facts["sequence_unit"]] for b, m in GRID],
            "check": [CHECK[0], CHECK[1] * facts["sequence_unit"]],
            "sizes_b1": [[b, m * facts["sequence_unit"]] for b, m in GRID_B1],
            "check_b1": [CHECK_B1[0], CHECK_B1[1] * facts["sequence_unit"]],
            "min_sequence": facts["sequence_unit"],
        },
        "assumptions": [
            "dropout as the config's probabilities say (training.dropout is not applied).",
            "no padding and one sequence per row (no attention_mask, no packed position_ids).",
            *([MOE_NOTE] if facts["moe"] else []),
        ],
        "blocks": doc_blocks,
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"


def for_spec(loaded: LoadedSpec) -> tuple[dict[str, Any], Path]:
    """The profile a spec's estimate would use (its model's config, recipe, attention and
    checkpointing), and where it is stored (memplan.model.load.cache_dir)."""
    config = model_load.model_config(loaded)
    if config is None:
        raise MemplanError(
            "memplan profile needs the model's config.json (model.hf_config, hf_id, preset or "
            "architecture); a parameter count or a safetensors header has no forward to trace.",
            field="model",
        )
    st = setting_of(loaded.spec)
    if st.device != "cpu":
        raise MemplanError(
            f"hardware.device is {st.device!r}: profiles are traced with the CPU kernels (fake "
            "tensors run their meta functions), and CUDA kernels save other tensors (SDPA's "
            "flash/efficient kernels, dropout masks). Set hardware.device: cpu to trace the CPU "
            "profile; a CUDA trace is not done yet.",
            field="hardware.device",
        )
    if st.checkpointing == "selective":
        raise MemplanError(
            "training.activation_checkpointing: selective is not traced yet (none or full).",
            field="training.activation_checkpointing",
        )
    try:
        doc = build(
            config,
            stream=st.stream,
            matmul=st.matmul,
            autocast=st.autocast,
            attention=st.attention,
            checkpointing=st.checkpointing,
            device=st.device,
        )
    except MemplanError:
        raise
    except Exception as err:  # the model code's own failure, named (not a memplan bug)
        raise MemplanError(
            f"tracing {config.get('model_type')!r} failed in transformers/torch: "
            f"{type(err).__name__}: {err} (rerun with --debug for the traceback)."
        ) from err
    return (
        doc,
        model_load.cache_dir() / f"{from_document(doc, origin='trace').key.file_stem()}.json",
    )
