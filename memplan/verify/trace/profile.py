"""Trace what a model saves for backward and write it as a profile (memplan.model.profile).

The model is built at full depth inside torch's FakeTensorMode and its forward + loss traced by
memplan.verify.trace.forward (two layers of each distinct layer structure traced in their
places, the others stood in for: memplan.verify.trace.structure); here the records become a
profile.

Blocks: what is saved before the first decoder layer runs is the embeddings', what each decoder
layer saves is that layer's (a storage saved by more than one layer, e.g. RoPE's cos/sin or a
mask, is made once per forward and listed with the embeddings, as memplan's rules do; one the
embeddings and a single layer save, Gemma 4's scaled embeddings that its per-layer-input
projection and layer 0 keep, is that layer's: fit.split), what is
saved after the last layer and before transformers' loss function is the head's, the rest the
loss's. Each storage's element count is fitted over `memplan.model.profile.BASIS` on a grid of
(batch, sequence) sizes and checked on one more.

Sequence regimes: a model with a sliding window (or attention chunk) W shorter than its
max_position_embeddings is traced either below the window (sequences 8-40 tokens and up to 512
or W - 1, `fit.max_sequence` W - 1: below_window) or past it (multiples of W + 1, the one regime
before), as the sequence the profile is for needs; for_spec keeps a stored
document's other regime beside the new one (merge). A block whose storage count grows with the
sequence (a per-token loop) is fitted on its runs of equal storages summed (fit.collapse); where
that leaves the counts unequal (a chunked loop, Qwen3.5's gated delta rule), on each varying
(module, dtype) group summed (fit.pool), traced on multiples of twice the loop's chunk
(sizes.loop_chunk, chunked_unit; `fit.sequence_multiple`).

Checkpointing as memplan's Setting: none; full (transformers' activation_checkpointing_enable,
non-reentrant: `recompute` is each layer's untraced tensors); selective (every attention core
under torch.utils.checkpoint, memplan.verify.selective, and a backward: `recompute` is what each
core's recomputation re-creates, memplan.verify.trace.recompute).

Precision as memplan's Setting: the model is built in the stream dtype and, when the recipe
autocasts, run under torch.autocast(device, matmul dtype). Fake tensors run the CPU kernels'
meta functions; a device=cuda profile is traced on the same fake CPU tensors with the ops whose
CUDA kernels save other tensors run as CUDA runs them (memplan.verify.trace.cuda) and, when the
recipe autocasts, CUDA autocast's op lists run at the CPU autocast key
(memplan.verify.trace.autocast); each block then also lists the cast copies autocast's cache
alone holds until the forward's autocast region exits (`autocast_cache`, fitted like the saved
tensors: memplan.model.forward.tensors.Block.held).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from memplan.config.load import LoadedSpec
from memplan.errors import MemplanError
from memplan.model import load as model_load
from memplan.model.profile import BASIS, SCHEMA, Key, config_hash, from_document
from memplan.report.settings import setting_of
from memplan.verify import selective as selective_
from memplan.verify.trace import autocast as autocast_
from memplan.verify.trace import cuda, heads, moe, notes, structure, tp
from memplan.verify.trace import fit as fit_
from memplan.verify.trace import recompute as recompute_
from memplan.verify.trace import working as working_
from memplan.verify.trace.forward import (
    any_layers,
    build_fake,
    position_limit,
    text_config,
    trace_once,
)
from memplan.verify.trace.regimes import merge
from memplan.verify.trace.sizes import (
    CHECK,
    CHECK_B1,
    GRID,
    GRID_B1,
    far_sequence,
    loop_chunk,
    span,
)


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
    softmax_input: bool = False,
    sequence: int | None = None,
    working: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], list[str], dict[str, Any]]:
    """Fitted tensors per block: embeddings, one per layer kind (`layer:<kind>`), head, loss.

    The model is built at full depth and two layers of each structure are traced in their
    places (memplan.verify.trace.structure), the grouping checked on one full forward.
    `head_dim`: a TP-local config's pinned head width, and whether the whole config lacked
    it, checked on the built model (memplan.verify.trace.tp.check_heads). `sequence`: the
    sequence the profile is for; one below the model's window is traced in the regime below
    it (below_window), else (and for None) past it. `working`: the layers' working sets traced
    and fitted too (memplan.verify.trace.working: facts["working"], per suffix)."""
    model, mode = build_fake(
        config, stream=stream, attention=attention, checkpointing=checkpointing, dropout=dropout
    )
    if head_dim is not None:
        tp.check_heads(model, head_dim[0], required=head_dim[1])
    text = text_config(model.config)  # an image-text config: its text model's sizes
    two = structure.stacks(model)
    if two:  # encoder-decoder: every layer traced, kinds "encoder" and "decoder"
        layer_list = torch.nn.ModuleList([m for _, stack in two for m in stack])
        depth = config_depth = len(layer_list)
        types = ["encoder"] * len(two[0][1]) + ["decoder"] * len(two[1][1])
        plan = structure.plan(layer_list, types, keep_all=True)
        swapped = [layer_list]
    else:  # the layers (structure.layer_lists): the lists `keeping` swaps stand-ins into
        config_depth = int(getattr(text, "num_hidden_layers", 0) or len(any_layers(model)))
        swapped = [lst for _, lst in structure.layer_lists(model, config_depth).lists]
        layer_list = torch.nn.ModuleList([m for lst in swapped for m in lst])
        depth = len(layer_list)
        plan = structure.plan(layer_list, getattr(text, "layer_types", None))
    n = depth
    limit = position_limit(text)
    chunk, chunk_source = loop_chunk(model)
    regime = span(model.config, chunk, device, sequence)
    unit, start, top, above = regime.unit, regime.start, regime.top, regime.above
    if top:  # a bounded regime: every traced size (far check too) in it
        limit = min(limit, top) if limit else top
    if limit and regime.sequence(CHECK[1]) > limit:
        raise MemplanError(
            f"max_position_embeddings {limit} is below the traced sizes (up to "
            f"{regime.sequence(CHECK[1])} tokens)."
        )
    cast = matmul if autocast else None
    emulated = bool(cast) and device == "cuda"  # the cast cache is known (autocast_.HELD)
    selective = checkpointing == "selective"
    once: dict[str, Any] = {
        "autocast": cast,
        "layer_count": config_depth,
        "device": device,
        "selective": selective,
        "softmax_input": softmax_input,
    }
    if not plan.keep_all:  # the groups split by what each layer runs and saves (Plan.refine)
        with structure.counting(list(layer_list)) as calls:
            seen = fit_.split(
                trace_once(model, mode, batch=GRID[0][0], sequence=GRID[0][1] * unit, **once)
            )
        saves = [structure.signature(seen.get(f"layer.{i}", [])) for i in range(depth)]
        plan = plan.refine(calls, saves)
    counts = plan.counts
    kinds = [plan.kind_of(i) for i in plan.kept]
    out: dict[str, list[dict[str, Any]]] = {}
    collapsed: set[str] = set()
    pooled: dict[str, set[tuple[str, str]]] = {}  # block: its (module, dtype) groups pooled
    far = far_sequence(unit, limit)
    if start:  # the regime past a window and below a chunk: its far check at its end
        far = limit if limit > regime.sequence(CHECK[1]) else 0
    edge = regime.edge if regime.edge and regime.edge == limit else 0
    if edge:  # the regime below a chunk: its far check at the chunk's length (Span.edge)
        far = 0
    edge_failed = False
    working_sets: dict[str, dict[str, list[list[int]]]] = {}
    for suffix, grid, chk in (("", GRID, CHECK), ("@b1", GRID_B1, CHECK_B1)):
        sizes = [(b, regime.sequence(m)) for b, m in grid]
        checks = [(chk[0], regime.sequence(chk[1]))]
        if far and not suffix:
            checks.append((chk[0], far))
        edges = [(chk[0], edge)] if edge and not suffix else []
        recorders = [working_.Recorder() for _ in (*sizes, *checks)]
        with structure.keeping(swapped, plan):
            if working and not suffix:
                # a model's first forward runs a few more ops than the next ones (one-time
                # set-up: falcon_h1's runs 1,756 against 1,754), and the working sets' fit
                # needs the same ops at every size: one untimed forward first
                trace_once(model, mode, batch=sizes[0][0], sequence=sizes[0][1], **once)
            traced = [
                fit_.split(
                    trace_once(
                        model, mode, batch=b, sequence=s, working=r if working else None, **once
                    )
                )
                for (b, s), r in zip((*sizes, *checks), recorders, strict=True)
            ]
            edge_traced = [
                fit_.split(trace_once(model, mode, batch=b, sequence=s, **once)) for b, s in edges
            ]
        if working:
            working_sets[suffix] = working_.fitted(recorders, sizes, checks)
        for name in sorted({name for t in traced for name in t}):
            if len({len(t.get(name, [])) for t in traced}) > 1:  # a per-token loop: fit_.collapse
                merged = [fit_.collapse(t.get(name, [])) for t in traced]
                if len({len(x) for x in merged}) == 1:
                    collapsed.add(name)
                else:  # a chunked loop: each varying (module, dtype) group summed (fit_.pool)
                    groups = fit_.varying([t.get(name, []) for t in traced])
                    pooled.setdefault(name, set()).update(groups)
                    merged = [fit_.pool(t.get(name, []), groups) for t in traced]
                for t, records in zip(traced, merged, strict=True):
                    if name in t:
                        t[name] = records
                for t in edge_traced:  # as the traces the fit spans
                    if name in t and name in collapsed:
                        t[name] = fit_.collapse(t[name])
                    elif name in t:
                        t[name] = fit_.pool(t[name], pooled.get(name, set()))
        fits = traced[: len(sizes)]
        fitted: dict[str, list[dict[str, Any]]] = {}
        recomputed = [f"{recompute_.PREFIX}layer.{i}" for i in plan.kept]
        base = ("embeddings", *(f"layer.{i}" for i in plan.kept), "head", "loss")
        held = [f"{autocast_.HELD}{b}" for b in base] if emulated else []
        for block in (*base, *(recomputed if selective else ()), *held):
            fitted[block] = fit_.fit(fits, sizes, block, chunk=regime.chunk)
            for check, seen in zip(edges, edge_traced, strict=True):
                expected = [fit_.value(t, *check) for t in fitted[block]]
                edge_failed |= expected != [r.numel for r in seen.get(block, [])]
            for check, seen in zip(checks, traced[len(sizes) :], strict=True):
                expected = [fit_.value(t, *check) for t in fitted[block]]
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
        if emulated:
            h = autocast_.HELD
            for name in ("embeddings", "head", "loss"):
                out[f"{h}{name}{suffix}"] = fitted[f"{h}{name}"]
            for i, kind in zip(plan.kept, kinds, strict=True):
                key = f"{h}layer:{kind}{suffix}"
                if out.setdefault(key, fitted[f"{h}layer.{i}"]) != fitted[f"{h}layer.{i}"]:
                    raise MemplanError(f"layers of kind {kind!r} cast different weights.")
    if edge_failed:  # another code path at the chunk's own length (Span.edge)
        top = edge - 1
    if len(plan.kept) < depth:  # the grouping, checked on the full-depth model at one size
        # not the size Plan.refine grouped them at
        size = (GRID[-1][0], regime.sequence(GRID[-1][1]))
        full = fit_.split(trace_once(model, mode, batch=size[0], sequence=size[1], **once))
        kinds_collapsed = {plan.kind_of(i) for i in plan.kept if f"layer.{i}" in collapsed}
        kinds_pooled: dict[str, set[tuple[str, str]]] = {}
        for i in plan.kept:
            kinds_pooled.setdefault(plan.kind_of(i), set()).update(pooled.get(f"layer.{i}", ()))
        for name in list(full):
            layer = name.startswith("layer.") and name[6:].isdigit()
            if name in collapsed or (layer and plan.kind_of(int(name[6:])) in kinds_collapsed):
                full[name] = fit_.collapse(full[name])
            of_kind = kinds_pooled.get(plan.kind_of(int(name[6:])), set()) if layer else set()
            if name in pooled or of_kind:
                full[name] = fit_.pool(full[name], pooled.get(name, set()) | of_kind)

        def numels(tensors: list[dict[str, Any]]) -> list[tuple[str, int]]:
            return [(t["dtype"], fit_.value(t, *size)) for t in tensors]

        structure.check(
            plan,
            {k: numels(v) for k, v in out.items() if "@" not in k},
            {k: [(r.dtype, r.numel) for r in v] for k, v in full.items()},
            size,
        )
    n = len(plan.kept)
    mcfg: Any = text
    whole: Any = model.config
    model_facts = {
        "sequence_unit": unit,
        "sequence_start": start,
        "sequence_multiple": regime.chunk,
        "far_check_sequence": edge if edge and not edge_failed else far,
        "loop_chunk": chunk,
        "loop_chunk_source": chunk_source,
        "max_sequence": top,
        "above_sequence": above,
        "collapsed": sorted(
            {
                f"layers of kind {plan.kind_of(int(c[6:]))!r}" if c[6:].isdigit() else c
                for c in (
                    name.removeprefix(recompute_.PREFIX).removeprefix(autocast_.HELD)
                    for name in collapsed
                )
            }
        ),
        "pooled": sorted(
            {
                f"layers of kind {plan.kind_of(int(c[6:]))!r}" if c[6:].isdigit() else c
                for c in (
                    name.removeprefix(recompute_.PREFIX).removeprefix(autocast_.HELD)
                    for name in pooled
                )
            }
        ),
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
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
        "num_labels": int(whole.num_labels),
        "layer_groups": {g.kind: list(g.layers) for g in plan.groups},
        "encoder_decoder": bool(two),
        "working": working_sets,
    }
    return out, counts, kinds, model_facts


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
    softmax_input: bool = False,
    sequence: int | None = None,
) -> dict[str, Any]:
    """The profile document of `config` (a config.json mapping) for one recipe and kernel;
    with `tensor` > 1, of one TP rank's slice holding `vocab_rows` vocabulary rows
    (memplan.verify.trace.tp.local_config), keyed by the whole config. `sequence`: the
    sequence it is for; below a sliding window (or attention chunk) the regime below it is
    traced (below_window: fit.max_sequence bounds it), else (and for None) the one past it."""
    if device not in ("cpu", "cuda"):
        raise MemplanError(f"device {device!r}: profiles are traced for cpu or cuda.")
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

    def traced(sequence: int | None, **over: Any) -> Any:
        kwargs: dict[str, Any] = {
            "checkpointing": checkpointing,
            # CPU profiles: the working sets the CPU kernels make (CUDA's are not traced)
            "working": device == "cpu",
            **over,
        }
        return _blocks(
            config,
            dropout=dropout,
            device=device,
            head_dim=pinned,
            softmax_input=softmax_input,
            sequence=sequence,
            **kwargs,
            **common,
        )

    blocks, counts, kinds, facts = traced(sequence)
    if sequence is not None and facts["max_sequence"] and sequence > facts["max_sequence"]:
        # the chunk's own length runs another code path than the regime below it (sizes.Span.
        # edge; the gated delta rule, xlstm): the regime past the chunk holds it
        sequence = int(facts["max_sequence"]) + 2
        blocks, counts, kinds, facts = traced(sequence)
    recompute: dict[str, list[dict[str, Any]]] = {}
    if checkpointing == "full":
        plain = traced(sequence, checkpointing="none", working=False)[0]
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
        held = autocast_.HELD + src
        if held in blocks:  # CUDA autocast: the cast cache's own copies (autocast_.HELD)
            out["autocast_cache"] = fit_.named(blocks[held])
            out["autocast_cache_b1"] = fit_.named(blocks[held + "@b1"])
        return out

    key = Key(
        model_type=str(config["model_type"]),
        config_hash=hashed,
        dropout=dropout,
        device=device,
        checkpointing=checkpointing,
        tensor=tensor,
        vocab_rows=vocab_rows if tensor > 1 else 0,
        softmax_input=softmax_input,
        **common,
    )
    kind_names = list(counts)
    main = max(kind_names, key=lambda k: counts[k])
    doc_blocks: list[dict[str, Any]] = [
        {"name": "embeddings", "kind": "", "count": 1, **lists("embeddings")}
    ]
    working = facts.pop("working")
    for kind in kind_names:
        doc_blocks.append(
            {
                "name": "layers" if kind == main else f"layers.{kind}",
                "kind": kind,
                "count": counts[kind],
                **lists("", kind),
                # every layer's working sets, on the main kind's block (the step's timeline
                # reads them there: memplan.step.transients.working_sets)
                **{
                    f"working{suffix.replace('@', '_')}": sets
                    for suffix, sets in working.items()
                    if sets and kind == main
                },
            }
        )
    doc_blocks += [
        {"name": "head", "kind": "", "count": 1, **lists("head")},
        {"name": "loss", "kind": "", "count": 1, **lists("loss")},
    ]
    moe_note = facts.pop("moe_note")
    start = facts.pop("sequence_start")
    multiple = facts.pop("sequence_multiple")
    unit = facts["sequence_unit"]
    top = facts.pop("max_sequence")
    above = facts.pop("above_sequence")
    collapsed = facts.pop("collapsed")
    pooled = facts.pop("pooled")
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
            **({"softmax_input": True} if softmax_input else {}),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {**facts, "layer_counts": counts},
        "fit": {
            "basis": list(BASIS),
            "sizes": [[b, start + m * unit] for b, m in GRID],
            "check": [CHECK[0], start + CHECK[1] * unit],
            "sizes_b1": [[b, start + m * unit] for b, m in GRID_B1],
            "check_b1": [CHECK_B1[0], start + CHECK_B1[1] * unit],
            "min_sequence": start + unit,
            **({"max_sequence": top} if top else {}),
            **({"above_sequence": above} if above else {}),
            **({"sequence_multiple": multiple} if multiple else {}),
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
            *([autocast_.DIFFERENCES_NOTE] if device == "cuda" and autocast else []),
            *([selective_.NOTE] if checkpointing == "selective" else []),
            *([notes.tp_note(tensor, vocab_rows)] if tensor > 1 else []),
            *([notes.SOFTMAX_INPUT_NOTE] if softmax_input else []),
            *([notes.collapsed_note(collapsed)] if collapsed else []),
            *([notes.pooled_note(pooled)] if pooled else []),
            *([notes.chunk_note(multiple, facts["loop_chunk_source"], unit)] if multiple else []),
            *(
                [notes.one_chunk_note(facts["loop_chunk"], facts["loop_chunk_source"], top)]
                if facts["loop_chunk"] and not multiple
                else []
            ),
        ],
        "blocks": doc_blocks,
        "build_seconds": round(time.perf_counter() - started, 3),
    }


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
    key = from_document(doc, origin="trace").key
    path = model_load.profile_file(model_load.cache_dir(), key)
    # The other sequence regime, if one is stored for this key (the cache's, else the shipped
    # one), is kept beside the one traced now (merge).
    for folder in model_load.profile_dirs():
        found = model_load.profile_file(folder, key)
        if found.is_file():
            try:
                stored = json.loads(found.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            return merge(stored, doc), path
    return doc, path


def for_setting(
    config: Mapping[str, Any], spec: Any, *, tensor: int = 1, vocab_rows: int = 0
) -> dict[str, Any]:
    """The profile document of `config` for the activation setting `spec` describes (its
    recipe, attention, device, checkpointing and dropout); the model code's own failure named in
    one MemplanError."""
    st = setting_of(spec)
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
            softmax_input=st.softmax_input,
            sequence=st.sequence,
        )
    except MemplanError:
        raise
    except Exception as err:  # the model code's own failure, named (not a memplan bug)
        raise MemplanError(
            f"tracing {config.get('model_type')!r} failed in transformers/torch: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:300]} (rerun with --debug "
            "for the traceback)."
        ) from err
