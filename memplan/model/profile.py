"""Activation profiles: what a traced forward saved, as a document the pure calculator reads.

A profile is written by `memplan profile SPEC` (memplan.verify.trace.profile, which runs the model
code under torch's FakeTensorMode) and read here without torch: per block (embeddings, one
decoder-layer kind, head, loss) the storages autograd saved, each with its element count as a
function of micro-batch b and sequence s, fitted on several traced sizes and checked on one
more:

    numel = c[0] + c[1]*b + c[2]*s + c[3]*b*s + c[4]*s*s + c[5]*b*s*s

(`BASIS`: linear terms for indices and activations, the b*s*s term for eager attention scores,
the b term for the loss's shifted labels, the s and s*s terms for per-forward RoPE tables and
masks that do not grow with the batch). `Profile.activations` turns it into memplan's
`Activations` for one Setting, so layout, LoRA and the timeline read it like a family's rule.

A record that sums a chunked loop's storages (`pooled`: memplan.verify.trace.fit.pool), or one
storage over the chunks of a sequence traced on a chunk's multiples (Mamba-2's padded scan:
[b, h, c + 1, c + 1] for c = s / chunk), may have rational coefficients, stored as integers over
its `divisor` (documents without one: 1); a model with such a loop or scan is traced on
multiples of its chunk (`fit.sequence_multiple`), other sequences are extrapolated, and
sequences up to one chunk have a regime of their own (`fit.max_sequence`, below).

A windowed model (sliding window, Llama 4's attention chunk) runs another code path below its
window than past it, as a chunked model below one chunk than past it, so its document holds one
`Regime` per side, each fitted on its own sizes
(`fit.max_sequence` bounds the one below, `fit.above_sequence` the one past it; `regimes` holds
the other, traced when a sequence first needs it); `serving` picks the regime of the setting's
sequence. Documents without those keys (every earlier one) hold one regime that serves every
sequence, as before.

Pure: no torch, no I/O (memplan.model.load finds the files; memplan.verify.trace writes them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from memplan.errors import MemplanError
from memplan.model.forward.tensors import Activations, Block, Saved, Setting
from memplan.precision import DTYPE_BYTES, dtype_bytes

SCHEMA = 1
"""Version of the profile document; a reader refuses other versions."""

BASIS = ("1", "b", "s", "b*s", "s*s", "b*s*s")
"""The terms each saved storage's element count is fitted on (b: micro-batch, s: sequence)."""

# Config keys that do not change the model a config builds (names, provenance, the dtype the
# checkpoint was stored in: the precision recipe decides the dtype).
_NOT_HASHED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")


def config_hash(config: Mapping[str, Any]) -> str:
    """The key of a config.json mapping: sha256 of its canonical JSON, provenance keys dropped."""
    import hashlib  # here: OpenSSL's start-up is paid only where a profile is looked up

    kept = {k: v for k, v in config.items() if k not in _NOT_HASHED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def terms(batch: int, sequence: int) -> tuple[int, ...]:
    """The values of `BASIS` at one size."""
    b, s = batch, sequence
    return (1, b, s, b * s, s * s, b * s * s)


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """What a profile was traced for: the model and everything in a Setting that changes what a
    forward saves (batch and sequence excepted: the fit covers them)."""

    model_type: str
    config_hash: str
    stream: str
    matmul: str
    autocast: bool
    attention: str
    device: str
    checkpointing: str
    dropout: bool | None = None
    """`training.dropout` the trace applied: None, the config's probabilities."""
    tensor: int = 1
    """The tensor-parallel degree: > 1, the profile of one TP rank's slice of the config
    (memplan.verify.trace.tp.local_config: heads, key/value heads and intermediate sizes / TP,
    head_dim kept), traced as its own model (memplan.activations.layout.local_architecture's
    slice, for profiles)."""
    vocab_rows: int = 0
    """With `tensor` > 1: the vocabulary rows of the rank traced (the layout's padded or
    chunked rows, memplan.states.parallel.vocab_rows); 0 at tensor 1 (the config's own)."""
    softmax_input: bool = False
    """Traced with softmax and log_softmax keeping their input (torch before 1.11,
    `training.softmax_saves_input`; memplan.verify.trace.forward.SoftmaxInputs)."""

    def serves(self, st: Setting, *, tensor: int = 1, vocab_rows: int = 0) -> bool:
        """Whether this profile is the one traced for `st` on a TP rank of `tensor` ranks that
        holds `vocab_rows` vocabulary rows (tensor 1: the whole model)."""
        if (self.tensor, self.vocab_rows) != (tensor, vocab_rows if tensor > 1 else 0):
            return False
        return (
            st.stream,
            st.matmul,
            st.autocast,
            st.attention,
            st.device,
            st.checkpointing,
            st.dropout,
            st.softmax_input,
        ) == (
            self.stream,
            self.matmul,
            self.autocast,
            self.attention,
            self.device,
            self.checkpointing,
            self.dropout,
            self.softmax_input,
        )

    def file_stem(self) -> str:
        cast = "-autocast" if self.autocast else ""
        forced = "" if self.dropout is None else f"-dropout-{'on' if self.dropout else 'off'}"
        # tensor 1 keeps the stem it always had (the cache and the shipped profiles)
        tp = f"-tp{self.tensor}-vocab{self.vocab_rows}" if self.tensor > 1 else ""
        old_softmax = "-softmax-input" if self.softmax_input else ""
        return (
            f"{self.model_type}-{self.config_hash[:12]}-{self.stream}-{self.matmul}{cast}-"
            f"{self.attention}-{self.device}-{self.checkpointing}{forced}{tp}{old_softmax}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Tensor:
    """One saved storage of a block, as fitted."""

    name: str
    """The module that saved it first, relative to its block, and its order there."""
    dtype: str
    numel: tuple[int, ...]
    """Coefficients over `BASIS` (times `divisor`)."""
    divisor: int = 1
    """The element count is the polynomial over `divisor`: a pooled record holding a storage
    per chunk of the sequence ([b, heads, s / 64]) has rational coefficients, kept exact
    (the document's optional `divisor`; 1 in every document without it)."""
    pooled: bool = False
    """The sum of every storage of one module and dtype, not one storage (the document's
    `pooled`: memplan.verify.trace.fit.pool, a chunked loop's)."""

    def at(self, batch: int, sequence: int) -> int:
        total = sum(c * x for c, x in zip(self.numel, terms(batch, sequence), strict=True))
        # Exact on the traced sequences (the chunk's multiples); off them, rounded up (as the
        # loop pads the sequence) and extrapolated (Profile.sequence_multiple).
        return total if self.divisor == 1 else -(-total // self.divisor)


Working = tuple[tuple[int, ...], ...]
"""A working set: byte polynomials over `BASIS`, the most of them at a size (ProfileBlock)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileBlock:
    name: str
    """embeddings, layers (or layers.<kind> beside it), head or loss."""
    kind: str
    """The layer kind (config `layer_types` entry, else "decoder"); "" for other blocks."""
    count: int
    """Copies in the full model (layers of this kind); 1 otherwise."""
    tensors: tuple[Tensor, ...]
    """Fitted for micro-batches of 2 and more."""
    tensors_b1: tuple[Tensor, ...]
    """Fitted for a micro-batch of 1 (torch saves other storages there: a view of a one-row
    tensor is contiguous, so `.contiguous()` copies nothing)."""
    recompute: tuple[Tensor, ...] = ()
    """Full checkpointing: what one layer re-creates in its backward (the layer untraced)."""
    recompute_b1: tuple[Tensor, ...] = ()
    autocast_cache: tuple[Tensor, ...] = ()
    """CUDA autocast: the cast copies autocast's cache alone holds until the forward's autocast
    region exits (memplan.model.forward.tensors.Block.held); () in other profiles."""
    autocast_cache_b1: tuple[Tensor, ...] = ()
    working: tuple[Working | None, Working | None] = (None, None)
    """The main layer block of a CPU profile: the layers' forward and backward working sets
    (memplan.verify.trace.working; document key `working`: {"forward": [[...], ...],
    "backward": [[...], ...]}, bytes as polynomials over `BASIS`, the working set at a size the
    most of them there; either absent where the trace could not fit it); (None, None) in other
    blocks and documents without the key."""
    working_b1: tuple[Working | None, Working | None] = (None, None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Regime:
    """One range of sequence lengths a profile was traced for: windowed models run another code
    path below their sliding window (or attention chunk) than past it (transformers 5.25
    masking_utils.py::_ignore_causal_mask_sdpa gives sdpa an explicit mask from
    kv_length >= the window on), so each side is traced and fitted on its own."""

    min_sequence: int
    """The shortest traced sequence (below it: extrapolated)."""
    max_sequence: int
    """The longest sequence this regime describes; 0: no bound."""
    blocks: tuple[ProfileBlock, ...]
    above_sequence: int = 0
    """The regime past a window describes sequences longer than this (the regime below the
    window holds up to it, traced when one needs it); 0: every sequence up to max_sequence."""
    sequence_multiple: int = 0
    """The chunk on whose multiples this regime was traced (its `fit.sequence_multiple`); 0
    in a regime below one chunk (memplan.verify.trace.sizes.span) and without a chunk."""

    def holds(self, sequence: int) -> bool:
        return self.above_sequence < sequence and (
            not self.max_sequence or sequence <= self.max_sequence
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    key: Key
    versions: Mapping[str, str]
    """torch and transformers the trace ran on."""
    hidden_size: int
    vocab_size: int
    blocks: tuple[ProfileBlock, ...]
    assumptions: tuple[str, ...] = ()
    min_sequence: int = 1
    """The shortest traced sequence: below it the model may run another code path (a sliding
    window longer than the sequence)."""
    max_sequence: int = 0
    """The longest sequence `blocks` describe (a regime below a sliding window or attention
    chunk: memplan.verify.trace.sizes.below_window); 0: no bound."""
    above_sequence: int = 0
    """`blocks` describe sequences longer than this (Regime.above_sequence); 0: no bound."""
    regimes: tuple[Regime, ...] = ()
    """Other sequence ranges traced for the same key, stored beside `blocks` (the document's
    `regimes`): `serving` picks the one a sequence needs (Profile.at_sequence)."""
    experts: str = ""
    """How the traced MoE layers run their experts: "grouped_mm" (transformers' experts
    interface: every saved tensor has tokens x top_k rows whatever the routing), "own" (the
    model's own expert code), "" (no experts)."""
    head: str = "lm"
    """The head traced (memplan.verify.trace.heads): lm, sequence_classification,
    token_classification or question_answering."""
    num_labels: int = 2
    layer_groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(kind, its decoder-layer indices in the full model): the tracer's grouping
    (memplan.verify.trace.structure); () in profiles that do not record it."""
    sequence_multiple: int = 0
    """The chunk of a chunked loop over the sequence the model runs (`fit.sequence_multiple`:
    memplan.verify.trace.sizes.loop_chunk): traced on its multiples only, so another sequence
    is extrapolated; 0: none."""

    def at_sequence(self, sequence: int) -> Profile | None:
        """This profile with the regime `sequence` runs in as its blocks (the bounded regime of
        the smallest bound that reaches `sequence`, else the unbounded one); None when no
        traced regime holds it (a profile traced below the window asked for a longer
        sequence: memplan.verify.trace traces the other regime then)."""
        own = Regime(
            min_sequence=self.min_sequence,
            max_sequence=self.max_sequence,
            blocks=self.blocks,
            above_sequence=self.above_sequence,
            sequence_multiple=self.sequence_multiple,
        )
        held = [r for r in (own, *self.regimes) if r.holds(sequence)]
        if not held:
            return None
        # Bounded regimes before the unbounded one: a document traced before regimes existed
        # (no fit.above_sequence: it holds every sequence) kept beside a regime below the window
        # must not win below that window.
        pick = min(held, key=lambda r: (not r.max_sequence, r.max_sequence))
        if pick is own:
            return self
        # One view per (profile, regime): plan's memos key on the profile's identity
        # (memplan.memo), so each call must return the same object.
        key = (id(self), id(pick))
        seen = _VIEWS.get(key)
        if seen is not None and seen[0] is self:
            return seen[1]
        view = replace(
            self,
            blocks=pick.blocks,
            min_sequence=pick.min_sequence,
            max_sequence=pick.max_sequence,
            above_sequence=pick.above_sequence,
            sequence_multiple=pick.sequence_multiple,
            regimes=tuple(r for r in (own, *self.regimes) if r is not pick),
        )
        _VIEWS[key] = (self, view)
        return view

    def layer_order(self) -> tuple[str, ...]:
        """The block name of each decoder layer, in model order, when the profile has several
        layer kinds and records where each one is; else ()."""
        kinds = {blk.kind: blk.name for blk in self.blocks if blk.kind}
        if len(kinds) < 2 or {kind for kind, _ in self.layer_groups} != set(kinds):
            return ()
        order: dict[int, str] = {}
        for kind, indices in self.layer_groups:
            for i in indices:
                order[i] = kinds[kind]
        if sorted(order) != list(range(len(order))):
            return ()
        return tuple(order[i] for i in range(len(order)))

    def token_major(self) -> frozenset[tuple[str, str]]:
        """(block, tensor name) of the storages whose element count is tokens x a width alone
        (fitted on batches of 2 and more: only the b*s coefficient), the tensors sequence
        parallelism can split (memplan.activations.layout.split_traced); a batch-1 storage is
        one when its batch >= 2 namesake is."""
        out = set()
        for blk in self.blocks:
            for t in (*blk.tensors, *blk.recompute):
                if t.pooled or t.divisor != 1:
                    continue  # a sum of storages, not one tokens x width tensor
                if t.numel[3] > 0 and not any(c for i, c in enumerate(t.numel) if i != 3):
                    out.add((blk.name, t.name))
        return frozenset(out)

    def activations(self, st: Setting, *, num_layers: int) -> Activations:
        """The saved tensors of one forward at `st`'s batch and sequence, with `num_layers`
        decoder layers when the profile has one layer kind (a layout's local layer count)."""
        b, s = st.batch, st.sequence
        kinds = [blk for blk in self.blocks if blk.kind]
        blocks = []
        for blk in self.blocks:
            count = num_layers if blk.kind and len(kinds) == 1 else blk.count
            blocks.append(
                Block(
                    name=blk.name,
                    count=count,
                    tensors=_saved(blk.tensors_b1 if b == 1 else blk.tensors, b, s, self),
                    recompute=_saved(blk.recompute_b1 if b == 1 else blk.recompute, b, s, self),
                    held=_saved(
                        blk.autocast_cache_b1 if b == 1 else blk.autocast_cache, b, s, self
                    ),
                    layered=bool(blk.kind),
                    forward_working=_at(blk.working_b1[0] if b == 1 else blk.working[0], b, s),
                    backward_working=_at(blk.working_b1[1] if b == 1 else blk.working[1], b, s),
                )
            )
        logits, upcast = self._logits(st)
        notes = [
            f"activations traced (profile {self.key.file_stem()}: torch "
            f"{self.versions.get('torch', '?')}, transformers "
            f"{self.versions.get('transformers', '?')}), not a hand rule.",
            *self.assumptions,
        ]
        if st.sequence < self.min_sequence:
            where = "below the window" if self.max_sequence else "past the sliding window"
            notes.append(
                f"sequence {st.sequence} is shorter than the shortest traced one "
                f"({self.min_sequence}, {where}): extrapolated."
            )
        if self.sequence_multiple and st.sequence % self.sequence_multiple:
            notes.append(
                f"sequence {st.sequence} is not a multiple of {self.sequence_multiple}, the "
                "chunk of the model's loop over the sequence, on whose multiples alone it was "
                "traced (the loop pads or shortens its last chunk there): extrapolated."
            )
        return Activations(
            modelled=True,
            blocks=tuple(blocks),
            logits_bytes=logits,
            upcast_bytes=upcast,
            hidden_bytes=st.tokens * self.hidden_size * dtype_bytes(st.stream),
            notes=tuple(notes),
            source="profile",
            versions=tuple(sorted(self.versions.items())),
            layer_order=self.layer_order(),
        )

    def _logits(self, st: Setting) -> tuple[int, int]:
        """Not saved, alive around the loss: the logits in the matmul dtype, and their fp32
        upcast where the loss makes one (memplan.model.forward.assemble.finish for LM heads;
        transformers 5.25 loss/loss_utils.py: ForTokenClassification upcasts its logits,
        ForSequenceClassificationLoss and ForQuestionAnsweringLoss do not)."""
        t = st.tokens
        width = {
            "lm": t * self.vocab_size,
            "token_classification": t * self.num_labels,
            "question_answering": t * 2,  # start and end logits
            "sequence_classification": st.batch * self.num_labels,
        }[self.head]
        upcast = self.head in ("lm", "token_classification") and st.matmul != "fp32"
        return width * dtype_bytes(st.matmul), width * dtype_bytes("fp32") if upcast else 0


_VIEWS: dict[tuple[int, int], tuple[Profile, Profile]] = {}
"""Profile.at_sequence's views, each with the profile it was made from (which keeps its id)."""


def _saved(tensors: Sequence[Tensor], b: int, s: int, profile: Profile) -> tuple[Saved, ...]:
    return tuple(
        Saved(
            name=t.name,
            shape=(t.at(b, s),),
            dtype=t.dtype,
            saved_by="traced",
            source=f"traced with transformers {profile.versions.get('transformers', '?')}",
            pooled=t.pooled,
        )
        for t in tensors
    )


def from_document(doc: Any, *, origin: str) -> Profile:
    """A profile from its JSON document; a MemplanError naming `origin` if it is not one."""
    try:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, this memplan reads {SCHEMA}")
        k = doc["key"]
        key = Key(
            model_type=str(k["model_type"]),
            config_hash=str(k["config_hash"]),
            stream=str(k["stream"]),
            matmul=str(k["matmul"]),
            autocast=bool(k["autocast"]),
            attention=str(k["attention"]),
            device=str(k["device"]),
            checkpointing=str(k["checkpointing"]),
            dropout=None if k.get("dropout") is None else bool(k["dropout"]),
            tensor=int(k.get("tensor", 1)),
            vocab_rows=int(k.get("vocab_rows", 0)),
            softmax_input=bool(k.get("softmax_input", False)),
        )
        fit = doc.get("fit", {})
        return Profile(
            key=key,
            versions={str(a): str(v) for a, v in doc["versions"].items()},
            hidden_size=int(doc["model"]["hidden_size"]),
            vocab_size=int(doc["model"]["vocab_size"]),
            blocks=_blocks(doc["blocks"]),
            assumptions=tuple(str(a) for a in doc.get("assumptions", ())),
            min_sequence=int(fit.get("min_sequence", 1)),
            max_sequence=int(fit.get("max_sequence", 0)),
            above_sequence=int(fit.get("above_sequence", 0)),
            regimes=tuple(
                Regime(
                    min_sequence=int(r["fit"].get("min_sequence", 1)),
                    max_sequence=int(r["fit"].get("max_sequence", 0)),
                    above_sequence=int(r["fit"].get("above_sequence", 0)),
                    sequence_multiple=int(r["fit"].get("sequence_multiple", 0)),
                    blocks=_blocks(r["blocks"]),
                )
                for r in doc.get("regimes", ())
            ),
            experts=str(doc["model"].get("experts", "")),
            head=_head(doc["model"].get("head", "lm")),
            num_labels=int(doc["model"].get("num_labels", 2)),
            layer_groups=tuple(
                (str(kind), tuple(int(i) for i in indices))
                for kind, indices in doc["model"].get("layer_groups", {}).items()
            ),
            sequence_multiple=int(fit.get("sequence_multiple", 0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MemplanError(
            f"{origin} is not a memplan activation profile ({type(err).__name__}: {err}); "
            "rebuild it with `memplan profile SPEC`."
        ) from None


def _blocks(docs: Any) -> tuple[ProfileBlock, ...]:
    return tuple(
        ProfileBlock(
            name=str(blk["name"]),
            kind=str(blk.get("kind", "")),
            count=int(blk["count"]),
            tensors=tuple(_tensor(t) for t in blk["tensors"]),
            tensors_b1=tuple(_tensor(t) for t in blk["tensors_b1"]),
            recompute=tuple(_tensor(t) for t in blk.get("recompute", ())),
            recompute_b1=tuple(_tensor(t) for t in blk.get("recompute_b1", ())),
            autocast_cache=tuple(_tensor(t) for t in blk.get("autocast_cache", ())),
            autocast_cache_b1=tuple(_tensor(t) for t in blk.get("autocast_cache_b1", ())),
            working=_working(blk.get("working")),
            working_b1=_working(blk.get("working_b1")),
        )
        for blk in docs
    )


def _working(doc: Any) -> tuple[Working | None, Working | None]:
    """A layer block's `working` key (ProfileBlock.working): (forward, backward)."""
    if doc is None:
        return (None, None)
    out: list[Working | None] = []
    for name in ("forward", "backward"):
        polys = doc.get(name)
        if polys is not None:
            polys = tuple(tuple(int(c) for c in p) for p in polys)
            if not polys or any(len(p) != len(BASIS) for p in polys):
                raise ValueError(f"working.{name}: lists of {len(BASIS)} coefficients expected")
        out.append(polys)
    return (out[0], out[1])


def _at(polys: Working | None, batch: int, sequence: int) -> int | None:
    """A working set at one size: the most of its polynomials there (None stays None)."""
    if polys is None:
        return None
    t = terms(batch, sequence)
    return max(sum(c * x for c, x in zip(p, t, strict=True)) for p in polys)


HEADS = ("lm", "sequence_classification", "token_classification", "question_answering")
LM_CLASSES = ("LMHead", "CausalLM", "MaskedLM")
"""Class-name parts of the language-model heads the hand rules model (memplan.activations)."""


def other_head(model_class: object) -> bool:
    """Whether a model class (an inventory's `model_class`) is a head the hand rules do not
    model (sequence/token classification, question answering, ...): a profile traced for it
    serves instead."""
    return model_class is not None and not any(k in str(model_class) for k in LM_CLASSES)


def _head(name: Any) -> str:
    if name not in HEADS:
        raise ValueError(f"head {name!r} is not one memplan reads ({', '.join(HEADS)})")
    return str(name)


def _tensor(t: Mapping[str, Any]) -> Tensor:
    dtype = str(t["dtype"])
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} of {t.get('name')!r} is not one memplan knows")
    numel = tuple(int(c) for c in t["numel"])
    if len(numel) != len(BASIS):
        raise ValueError(f"{t.get('name')!r}: {len(numel)} coefficients, expected {len(BASIS)}")
    divisor = int(t.get("divisor", 1))
    if divisor < 1:
        raise ValueError(f"{t.get('name')!r}: divisor {divisor}, expected 1 or more")
    return Tensor(
        name=str(t["name"]),
        dtype=dtype,
        numel=numel,
        divisor=divisor,
        pooled=bool(t.get("pooled", False)),
    )


def serving(
    profiles: Sequence[Profile], st: Setting, *, tensor: int = 1, vocab_rows: int = 0
) -> Profile | None:
    """The profile traced for `st`'s recipe, attention, device and checkpointing, if any: of
    the whole model, or with `tensor` > 1 of one TP rank's slice holding `vocab_rows` rows; in
    the regime `st.sequence` runs in (Profile.at_sequence), None when that one is not traced."""
    found = matching(profiles, st, tensor=tensor, vocab_rows=vocab_rows)
    return found.at_sequence(st.sequence) if found is not None else None


def matching(
    profiles: Sequence[Profile], st: Setting, *, tensor: int = 1, vocab_rows: int = 0
) -> Profile | None:
    """The profile whose key serves `st` (any sequence regime)."""
    return next(
        (p for p in profiles if p.key.serves(st, tensor=tensor, vocab_rows=vocab_rows)), None
    )
