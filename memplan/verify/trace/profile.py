"""Trace what a model saves for backward and write it as a profile (memplan.model.profile).

The model is built at full depth with transformers' `AutoModelForCausalLM.from_config` inside
torch's FakeTensorMode (two layers of each distinct layer structure traced in their places, the
others stood in for: memplan.verify.trace.structure; parameters are fake tensors: no memory, any
size), put in train mode, and run forward + causal-LM loss (labels = input_ids, the loss
transformers computes) under `torch.autograd.graph.saved_tensors_hooks`. Each saved storage is
recorded once, under the first module that saves it, parameters and buffers excluded (the
contract of memplan.model.forward.tensors, as tests/activation_probe.py measures it on real
tensors; fake tensors have no data pointer, so a storage is known by its StorageImpl, `_cdata`),
and counted when a saved tensor still holds it at the end of the forward.

Blocks: what is saved before the first decoder layer runs is the embeddings', what each decoder
layer saves is that layer's (a storage saved by more than one layer, e.g. RoPE's cos/sin or a
mask, is made once per forward and listed with the embeddings, as memplan's rules do), what is
saved after the last layer and before transformers' loss function is the head's, the rest the
loss's. Each storage's element count is fitted over `memplan.model.profile.BASIS` on a grid of
(batch, sequence) sizes and checked on one more.

Checkpointing as memplan's Setting: none; full (transformers' activation_checkpointing_enable,
non-reentrant: `recompute` is each layer's untraced tensors); selective (every attention core
under torch.utils.checkpoint, memplan.verify.selective, and a backward: `recompute` is what each
core's recomputation re-creates, memplan.verify.trace.recompute).

Precision as memplan's Setting: the model is built in the stream dtype and, when the recipe
autocasts, run under torch.autocast(device, matmul dtype). Fake tensors run the CPU kernels'
meta functions; a device=cuda profile is traced on the same fake CPU tensors with the ops whose
CUDA kernels save other tensors run as CUDA runs them (memplan.verify.trace.cuda; autocast
refused there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import weakref
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
from memplan.verify import selective as selective_
from memplan.verify.build import force_dropout
from memplan.verify.trace import cuda, heads, masks, moe, structure, tp
from memplan.verify.trace import fit as fit_
from memplan.verify.trace import recompute as recompute_

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
    torch.uint64: "uint64",
    torch.complex64: "complex64",
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


def sequence_unit(cfg: Any) -> int:
    """Tokens per traced sequence multiple: 8, or one more than the sliding window, so that
    every traced sequence is longer than the window (the code path changes where the window
    starts to cut: sdpa gets an explicit mask). The profile holds from that length on."""
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", True):
        window = None
    # Llama 4's chunked attention cuts the same way (masking_utils.py::chunked_causal_mask).
    window = window or getattr(cfg, "attention_chunk_size", None)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if not isinstance(window, int) or window <= 0:
        return SEQ_UNIT
    if limit and window >= limit:
        return SEQ_UNIT  # never cuts a sequence the model takes
    return max(SEQ_UNIT, window + 1)


FAR = 512
"""A long sequence every profile's fit is also checked on (below max_position_embeddings):
code paths that change with the length past the traced sizes (a chunked linear-attention loop,
chunk 64, saves per chunk) make the fit fail there instead of extrapolating wrongly."""


def far_sequence(unit: int, limit: int) -> int:
    """The far check's sequence: FAR rounded up to a multiple of `unit`, or the longest
    multiple of `unit` the model takes when that is shorter; 0 when that is not past the
    ordinary check (CHECK)."""
    far = -(-FAR // unit) * unit
    if limit and far > limit:
        far = limit // unit * unit
    return far if far > CHECK[1] * unit else 0


def _build(
    config: Mapping[str, Any],
    *,
    stream: str,
    attention: str,
    checkpointing: str,
    dropout: bool | None = None,
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
    force_dropout(cfg, dropout)  # training.dropout, as verify applies it
    seq2seq = getattr(cfg, "is_encoder_decoder", False)  # decoder as long as the encoder
    head = transformers.AutoModelForSeq2SeqLM.from_config if seq2seq else _head_class(config)
    # `sdpa` is transformers' default, as verify builds it (memplan/verify/build.py::
    # build_model): sdpa where the class supports it, else eager (gpt_oss: attention sinks).
    impl = {"attn_implementation": "eager"} if attention == "eager" else {}
    mode = FakeTensorMode()
    with mode:
        model = head(cfg, dtype=DTYPES[stream], **impl)
    if moe.is_moe(cfg):
        moe.check(model, stream)
    model.train()
    if checkpointing == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, mode


def _head_class(config: Mapping[str, Any]) -> Any:
    """The class config.json's `architectures` names when it is a head the trace runs with its
    loss (memplan.verify.trace.heads: language-model, sequence and token classification,
    question answering), else AutoModelForCausalLM."""
    _, cls = heads.head_class(config)
    return cls._from_config if cls is not None else transformers.AutoModelForCausalLM.from_config


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
    device: str = "cpu",
    selective: bool = False,
) -> list[fit_.Record]:
    """One forward + loss; every saved storage once, with its block and module (device cuda:
    the CUDA kernels' tensors, memplan.verify.trace.cuda). `selective`: every attention core
    checkpointed, then backward, whose recomputations are recorded as `recompute:<block>`
    (memplan.verify.trace.recompute)."""
    lists = structure.stacks(model) or [_layers(model, layer_count)]
    layers = [m for _, stack in lists for m in stack]
    paths = [f"{prefix}.{j}" for prefix, stack in lists for j in range(len(stack))]
    # after an encoder's last layer its final norm and the decoder's embeddings run: per forward
    ends = {id(stack[len(stack) - 1]): "embeddings" for _, stack in lists[:-1]}
    ends[id(layers[-1])] = "head"
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
        if id(module) in ends:
            state["block"] = ends[id(module)]

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
    records: dict[Any, fit_.Record] = {}
    # A saved tensor whose graph node is dropped in the forward (a branch the loss does not
    # reach, e.g. DeepSeek's group-limited routing) frees its storage, and a later storage can
    # take its StorageImpl's address: a key whose saved tensors are all gone is a new storage,
    # and only storages some live saved tensor holds at the end of the forward are counted.
    refs: dict[Any, list[weakref.ref[torch.Tensor]]] = {}
    reused: dict[int, int] = {}
    stream = NAMES[next(model.parameters()).dtype]
    em = cuda.Emulation(stream=stream) if device == "cuda" else None

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key: Any = (storage._cdata, reused.get(storage._cdata, 0))
        if key in refs and all(r() is None for r in refs[key]):
            reused[storage._cdata] = key[1] + 1
            key = (storage._cdata, key[1] + 1)
        refs.setdefault(key, []).append(weakref.ref(t))
        if key[0] in skip:
            return t
        block = state["block"]
        if key not in records:
            module = stack[-1] if stack else ""
            layer_name = f"{paths[int(block.split('.')[1])]}." if block.startswith("layer.") else ""
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
    recomputed = recompute_.Recomputed(lambda: state["block"], skip, NAMES)
    cores: Any = (
        selective_.attention_cores(model, recompute_context=recomputed.context)
        if selective
        else contextlib.nullcontext()
    )
    try:
        with (
            mode,
            cuda.cuda_kernels(em) if em is not None else contextlib.nullcontext(),
            masks.real_tensor_masks(),
            cores as run,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            cast,
        ):
            ids = torch.zeros((batch, sequence), dtype=torch.int64)
            kind = heads.kind_of_name(type(model).__name__) or "lm"
            labels = int(getattr(model.config, "num_labels", 2))
            targets = heads.loss_inputs(kind, ids, labels)
            out = model(input_ids=ids, use_cache=False, **targets)
            alive = {k: r for k, r in records.items() if any(w() is not None for w in refs[k])}
        if selective:
            if not run.calls:
                raise MemplanError(selective_.no_core_message(model))
            with (
                mode,
                cuda.cuda_kernels(em) if em is not None else contextlib.nullcontext(),
                selective_.recomputed_saves(recomputed.save),
            ):
                out.loss.backward()  # the cores' recomputations run the same kernels
            for p in model.parameters():
                p.grad = None
        del out
    finally:
        for hook in hooks:
            hook.remove()
        model.loss_function = loss_fn
    host: set[int] = set()
    if em is not None:
        em.check()
        host = em.host_storages()  # host memory on CUDA (known once the op returned)
    again = zip(recomputed.records, recomputed.storages, strict=True)
    return [
        *(r for key, r in alive.items() if key[0] not in host),
        *(r for r, key in again if key not in host),
    ]


def _blocks(
    config: Mapping[str, Any],
    *,
    stream: str,
    matmul: str,
    autocast: bool,
    attention: str,
    checkpointing: str,
    dropout: bool | None = None,
    device: str = "cpu",
    head_dim: tuple[int, bool] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], list[str], dict[str, Any]]:
    """Fitted tensors per block: embeddings, one per layer kind (`layer:<kind>`), head, loss.

    The model is built at full depth and two layers of each structure are traced in their
    places (memplan.verify.trace.structure), the grouping checked on one full forward.
    `head_dim`: a TP-local config's pinned head width, and whether the whole config lacked
    it, checked on the built model (memplan.verify.trace.tp.check_heads)."""
    model, mode = _build(
        config, stream=stream, attention=attention, checkpointing=checkpointing, dropout=dropout
    )
    if head_dim is not None:
        tp.check_heads(model, head_dim[0], required=head_dim[1])
    two = structure.stacks(model)
    if two:  # encoder-decoder: every layer traced, kinds "encoder" and "decoder"
        layer_list = torch.nn.ModuleList([m for _, stack in two for m in stack])
        depth = len(layer_list)
        types = ["encoder"] * len(two[0][1]) + ["decoder"] * len(two[1][1])
        plan = structure.plan(layer_list, types, keep_all=True)
    else:
        depth = int(getattr(model.config, "num_hidden_layers", 0) or len(_layers_any(model)))
        _, layer_list = _layers(model, depth)
        plan = structure.plan(layer_list, getattr(model.config, "layer_types", None))
    counts = plan.counts
    n = depth
    kinds = [plan.kind_of(i) for i in plan.kept]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    unit = sequence_unit(model.config)
    if device == "cuda":
        unit = cuda.sequence_unit(unit)
    if limit and CHECK[1] * unit > limit:
        raise MemplanError(
            f"max_position_embeddings {limit} is below the traced sizes (up to "
            f"{CHECK[1] * unit} tokens)."
        )
    cast = matmul if autocast else None
    selective = checkpointing == "selective"
    once: dict[str, Any] = {
        "autocast": cast,
        "layer_count": n,
        "device": device,
        "selective": selective,
    }
    out: dict[str, list[dict[str, Any]]] = {}
    far = far_sequence(unit, limit)
    for suffix, grid, chk in (("", GRID, CHECK), ("@b1", GRID_B1, CHECK_B1)):
        sizes = [(b, m * unit) for b, m in grid]
        checks = [(chk[0], chk[1] * unit)]
        if far and not suffix:
            checks.append((chk[0], far))
        with structure.keeping(layer_list, plan):
            traced = [
                fit_.split(trace_once(model, mode, batch=b, sequence=s, **once))
                for b, s in (*sizes, *checks)
            ]
        fits = traced[: len(sizes)]
        fitted: dict[str, list[dict[str, Any]]] = {}
        recomputed = [f"{recompute_.PREFIX}layer.{i}" for i in plan.kept]
        for block in (
            "embeddings",
            *(f"layer.{i}" for i in plan.kept),
            "head",
            "loss",
            *(recomputed if selective else ()),
        ):
            fitted[block] = fit_.fit(fits, sizes, block)
            for check, seen in zip(checks, traced[len(sizes) :], strict=True):
                expected = [
                    sum(c * x for c, x in zip(t["numel"], terms(*check), strict=True))
                    for t in fitted[block]
                ]
                measured = [r.numel for r in seen.get(block, [])]
                if expected != measured:
                    raise MemplanError(
                        f"the forward saves other tensors at {check[1]} tokens than its fit "
                        f"over {sizes[0][1]}-{sizes[-1][1]} tokens predicts (block {block}, "
                        f"batch x sequence {check}: {len(measured)} storages of "
                        f"{sum(measured)} elements, the fit {len(expected)} of "
                        f"{sum(expected)}); another code path at that length, such as a "
                        "chunked linear-attention loop, so a fit on short sequences would not "
                        "describe long ones."
                    )
        per_kind: dict[str, list[dict[str, Any]]] = {}
        for i, kind in zip(plan.kept, kinds, strict=True):
            tensors = fitted[f"layer.{i}"]
            if kind in per_kind and per_kind[kind] != tensors:
                raise MemplanError(f"layers of kind {kind!r} save different tensors in one model.")
            per_kind.setdefault(kind, tensors)
        out["embeddings" + suffix] = fitted["embeddings"]
        out.update({f"layer:{k}{suffix}": v for k, v in per_kind.items()})
        out["head" + suffix] = fitted["head"]
        out["loss" + suffix] = fitted["loss"]
        for name, kind in zip(recomputed if selective else (), kinds, strict=False):
            key = f"{recompute_.PREFIX}layer:{kind}{suffix}"
            if out.setdefault(key, fitted[name]) != fitted[name]:
                raise MemplanError(f"layers of kind {kind!r} recompute different tensors.")
    if len(plan.kept) < depth:  # the grouping, checked on the full-depth model at one size
        size = (GRID[0][0], GRID[0][1] * unit)
        full = fit_.split(trace_once(model, mode, batch=size[0], sequence=size[1], **once))
        at = terms(*size)

        def numels(tensors: list[dict[str, Any]]) -> list[tuple[str, int]]:
            return [
                (t["dtype"], sum(c * x for c, x in zip(t["numel"], at, strict=True)))
                for t in tensors
            ]

        structure.check(
            plan,
            {k: numels(v) for k, v in out.items() if "@" not in k},
            {k: [(r.dtype, r.numel) for r in v] for k, v in full.items()},
            size,
        )
    n = len(plan.kept)
    mcfg: Any = model.config
    model_facts = {
        "sequence_unit": unit,
        "far_check_sequence": far,
        "hidden_size": int(mcfg.hidden_size),
        "vocab_size": int(mcfg.vocab_size),
        "traced_layers": n,
        "moe": moe.is_moe(mcfg),
        "experts": (
            ("grouped_mm" if structure.experts_interface(model) else "own")
            if moe.is_moe(mcfg)
            else ""
        ),
        "moe_note": moe.NOTE if structure.experts_interface(model) else structure.OWN_EXPERTS_NOTE,
        "class": type(model).__name__,
        "head": heads.kind_of_name(type(model).__name__) or "lm",
        "num_labels": int(mcfg.num_labels),
        "layer_groups": {g.kind: list(g.layers) for g in plan.groups},
        "encoder_decoder": bool(two),
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
    dropout: bool | None = None,
    tensor: int = 1,
    vocab_rows: int = 0,
) -> dict[str, Any]:
    """The profile document of `config` (a config.json mapping) for one recipe and kernel;
    with `tensor` > 1, of one TP rank's slice holding `vocab_rows` vocabulary rows
    (memplan.verify.trace.tp.local_config), keyed by the whole config."""
    if device not in ("cpu", "cuda"):
        raise MemplanError(f"device {device!r}: profiles are traced for cpu or cuda.")
    if device == "cuda":
        cuda.refuse_autocast(autocast)
    if checkpointing not in ("none", "full", "selective"):
        raise MemplanError(
            f"checkpointing {checkpointing!r}: profiles trace none, full or selective."
        )
    started = time.perf_counter()
    # The key is the config as given: transformers' config classes edit nested values in place
    # (GptOssConfig adds rope_theta to the caller's rope_scaling dict), so hash first and trace
    # a copy, or `estimate` (memplan.model.load.find_profiles) would never find the profile.
    hashed = config_hash(config)
    config = copy.deepcopy(dict(config))
    pinned = None
    if tensor > 1:
        required = tp.pinned_without_key(config)
        config = tp.local_config(config, tensor, vocab_rows)
        pinned = (int(config["head_dim"]), required)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    common: dict[str, Any] = {
        "stream": stream,
        "matmul": matmul,
        "autocast": autocast,
        "attention": attention,
    }
    blocks, counts, kinds, facts = _blocks(
        config,
        checkpointing=checkpointing,
        dropout=dropout,
        device=device,
        head_dim=pinned,
        **common,
    )
    recompute: dict[str, list[dict[str, Any]]] = {}
    if checkpointing == "full":
        plain, _, _, _ = _blocks(
            config,
            checkpointing="none",
            dropout=dropout,
            device=device,
            head_dim=pinned,
            **common,
        )
        recompute = {k: v for k, v in plain.items() if k.startswith("layer:")}
    if checkpointing == "selective":
        # What each layer's attention core re-creates in its backward, traced (recompute.py).
        recompute = {
            k.removeprefix(recompute_.PREFIX): v
            for k, v in blocks.items()
            if k.startswith(recompute_.PREFIX)
        }

    def lists(name: str, kind: str = "") -> dict[str, Any]:
        src = f"layer:{kind}" if kind else name
        out = {"tensors": fit_.named(blocks[src]), "tensors_b1": fit_.named(blocks[src + "@b1"])}
        if kind:
            out["recompute"] = fit_.named(recompute.get(src, []))
            out["recompute_b1"] = fit_.named(recompute.get(src + "@b1", []))
        return out

    key = Key(
        model_type=str(config["model_type"]),
        config_hash=hashed,
        dropout=dropout,
        device=device,
        checkpointing=checkpointing,
        tensor=tensor,
        vocab_rows=vocab_rows if tensor > 1 else 0,
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
    moe_note = facts.pop("moe_note")
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
            **({} if dropout is None else {"dropout": dropout}),
            **({} if tensor == 1 else {"tensor": tensor, "vocab_rows": vocab_rows}),
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
            "dropout as the config's probabilities say."
            if dropout is None
            else f"training.dropout: {str(dropout).lower()} applied to every dropout probability "
            "of the config (memplan.verify.build.force_dropout, as verify runs it).",
            "no padding and one sequence per row (no attention_mask, no packed position_ids).",
            *([moe_note] if facts["moe"] else []),
            *([structure.ENCODER_DECODER_NOTE] if facts["encoder_decoder"] else []),
            *(cuda.CUDA_ASSUMPTIONS if device == "cuda" else ()),
            *([selective_.NOTE] if checkpointing == "selective" else []),
            *([_tp_note(tensor, vocab_rows)] if tensor > 1 else []),
        ],
        "blocks": doc_blocks,
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def _tp_note(tensor: int, vocab_rows: int) -> str:
    return (
        f"one rank of tensor parallelism {tensor}: traced as the slice it runs (heads, "
        "key/value heads and intermediate sizes / TP, head_dim kept, "
        f"{vocab_rows} vocabulary rows: memplan.verify.trace.tp.local_config), as "
        "memplan.activations.layout.local_architecture slices a hand-ruled family."
    )


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"


def for_spec(
    loaded: LoadedSpec, *, tensor: int = 1, vocab_rows: int = 0
) -> tuple[dict[str, Any], Path]:
    """The profile a spec's estimate would use (its model's config, recipe, attention and
    checkpointing; with `tensor` > 1 one TP rank's slice), and where it is stored
    (memplan.model.load.cache_dir)."""
    config = model_load.model_config(loaded)
    if config is None:
        raise MemplanError(
            "memplan profile needs the model's config.json (model.hf_config, hf_id, preset or "
            "architecture); a parameter count or a safetensors header has no forward to trace.",
            field="model",
        )
    doc = for_setting(config, loaded.spec, tensor=tensor, vocab_rows=vocab_rows)
    return (
        doc,
        model_load.profile_file(model_load.cache_dir(), from_document(doc, origin="trace").key),
    )


def for_setting(
    config: Mapping[str, Any], spec: Any, *, tensor: int = 1, vocab_rows: int = 0
) -> dict[str, Any]:
    """The profile document of `config` for the activation setting `spec` describes (its
    recipe, attention, device, checkpointing and dropout); the model code's own failure named in
    one MemplanError."""
    st = setting_of(spec)
    if st.device == "cuda":
        cuda.refuse_autocast(st.autocast)
    try:
        return build(
            config,
            stream=st.stream,
            matmul=st.matmul,
            autocast=st.autocast,
            attention=st.attention,
            checkpointing=st.checkpointing,
            device=st.device,
            dropout=st.dropout,
            tensor=tensor,
            vocab_rows=vocab_rows,
        )
    except MemplanError:
        raise
    except Exception as err:  # the model code's own failure, named (not a memplan bug)
        raise MemplanError(
            f"tracing {config.get('model_type')!r} failed in transformers/torch: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]} (rerun with --debug "
            "for the traceback)."
        ) from err
