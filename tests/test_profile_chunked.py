"""Profiles of models with a chunked loop over the sequence (Qwen3.5's gated delta rule,
transformers 5.25 modeling_qwen3_5.py::torch_chunk_gated_delta_rule, chunk 64): traced on
multiples of 2 x the chunk (memplan.verify.trace.sizes.loop_chunk, chunked_unit), the loop's
storages summed per module and dtype (memplan.verify.trace.fit.pool) with exact rational
coefficients (a tensor's `divisor`), pooled records kept out of the working set.

Oracle of the slow test: `memplan verify` on CPU (real tensors, saved-tensor hooks on the real
model's forward), independent of the FakeTensorMode trace the prediction comes from, counting
the storages a saved tensor still holds when the forward and loss are done (as the trace does
and as branch mc makes memplan/verify/measure.py do: the delta rule's last chunk saves a
storage its dropped final-state node frees in the forward, and the CPU allocator can hand its
address to a later saved storage)."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.profile_verify import spec as verify_spec  # noqa: E402
from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.step.transients import working_sets  # noqa: E402
from memplan.verify.trace import fit as fit_  # noqa: E402

QWEN35 = {
    "model_type": "qwen3_5_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
}
"""Three linear-attention (gated delta rule) layers and one full-attention layer (the config's
default layer_types); linear heads as the config defaults them (32 value heads of 128)."""


def test_loop_chunk_is_the_model_codes_default() -> None:
    """The chunk is the modeling function's own default (its source says `chunk_size: int =
    64`); a model without such a loop has none."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    from memplan.verify.trace.forward import build_fake
    from memplan.verify.trace.sizes import chunked_unit, loop_chunk

    source = inspect.getsource(modeling)
    assert "def torch_chunk_gated_delta_rule(" in source and "chunk_size: int = 64," in source
    model, _ = build_fake(QWEN35, stream="fp32", attention="sdpa", checkpointing="none")
    assert loop_chunk(model) == (64, "modeling_qwen3_5.py::torch_chunk_gated_delta_rule")
    assert chunked_unit(8, 64) == 128 and chunked_unit(129, 64) == 256
    llama = {**QWEN35, "model_type": "llama"}
    model, _ = build_fake(llama, stream="fp32", attention="sdpa", checkpointing="none")
    assert loop_chunk(model) == (0, "")


def _loop(n_chunks: int, batch: int) -> list[fit_.Record]:
    """A block as the delta rule saves it (pins behaviour): a bf16 projection, then per chunk
    an fp32 state [b, 2, 4, 4] and values [b, 2, 8, 4], and chunk_decay [b, 2, n_chunks]."""
    out = [fit_.Record("layer.0", "in_proj", "bf16", batch * 8 * n_chunks * 16)]
    out.append(fit_.Record("layer.0", "linear_attn", "fp32", batch * 2 * n_chunks))
    for _ in range(n_chunks):
        out.append(fit_.Record("layer.0", "linear_attn", "fp32", batch * 32))
        out.append(fit_.Record("layer.0", "linear_attn", "fp32", batch * 64))
    return out


def test_pool_sums_the_varying_groups_with_an_exact_divisor() -> None:
    """Pins behaviour: the loop's group summed where its first storage was, the others kept;
    chunk_decay's b * s / 8 (s = 8 x chunks) fitted exactly as integers over a divisor."""
    sizes = [(2, 16), (3, 16), (2, 32), (3, 32), (2, 48), (3, 48)]
    lists = [_loop(s // 8, b) for b, s in sizes]
    assert fit_.varying(lists) == {("linear_attn", "fp32")}
    pooled = [fit_.pool(x, fit_.varying(lists)) for x in lists]
    assert [len(x) for x in pooled] == [2] * 6
    assert [r.pooled for r in pooled[0]] == [False, True]
    fitted = fit_.fit([fit_.split(x) for x in pooled], sizes, "layer.0")
    # per chunk of 8 tokens b x (2 + 32 + 64): numel = 98 * b * s / 8 = 49 * b * s / 4
    assert fitted[1] == {
        "module": "linear_attn",
        "dtype": "fp32",
        "numel": [0, 0, 0, 49, 0, 0],
        "divisor": 4,
        "pooled": True,
    }
    assert fit_.value(fitted[1], 4, 80) == sum(r.numel for r in _loop(10, 4)[1:])
    assert "divisor" not in fitted[0] and "pooled" not in fitted[0]
    # A storage that is not pooled keeps the integer fit's refusal.
    single = [[fit_.Record("layer.0", "x", "fp32", b * s // 8)] for b, s in sizes]
    with pytest.raises(Exception, match="not a polynomial"):
        fit_.fit([{"layer.0": x} for x in single], sizes, "layer.0")


def _doc(tensors: list[dict[str, Any]], multiple: int = 0) -> dict[str, Any]:
    return {
        "schema": profile.SCHEMA,
        "key": {
            "model_type": "qwen3_5_text",
            "config_hash": "0" * 64,
            "stream": "fp32",
            "matmul": "fp32",
            "autocast": False,
            "attention": "sdpa",
            "device": "cpu",
            "checkpointing": "none",
        },
        "versions": {"torch": "t", "transformers": "x"},
        "model": {"hidden_size": 64, "vocab_size": 512},
        "fit": {"min_sequence": 128, **({"sequence_multiple": multiple} if multiple else {})},
        "blocks": [
            {"name": "layers", "kind": "decoder", "count": 1, "tensors": tensors, "tensors_b1": []}
        ],
    }


def _setting(batch: int, sequence: int) -> Setting:
    return Setting(
        batch=batch,
        sequence=sequence,
        stream="fp32",
        matmul="fp32",
        autocast=False,
        device="cpu",
        attention="sdpa",
        dropout=None,
        checkpointing="none",
    )


def test_divisor_pooled_and_the_chunk_in_a_profile() -> None:
    """Pins behaviour: a document's divisor and pooled flag are read (documents without them as
    before); a pooled record is no working set's largest tensor nor a token-major tensor; a
    sequence off the chunk's multiples is extrapolated."""
    plain = {"name": "mlp#0", "dtype": "fp32", "numel": [0, 0, 0, 64, 0, 0]}
    pooled = {
        "name": "linear_attn#0",
        "dtype": "fp32",
        "numel": [128, 0, 0, 127489, 0, 0],
        "divisor": 2,
        "pooled": True,
    }
    prof = profile.from_document(_doc([plain, pooled], multiple=64), origin="test")
    blk = prof.blocks[0]
    assert blk.tensors[0].divisor == 1 and not blk.tensors[0].pooled
    assert blk.tensors[1].at(2, 128) == (128 + 127489 * 256) // 2
    assert prof.token_major() == {("layers", "mlp#0")}
    acts = prof.activations(_setting(2, 128), num_layers=1)
    layers = acts.blocks[0]
    assert layers.bytes_each == 4 * (64 * 256 + (128 + 127489 * 256) // 2)
    forward = working_sets(acts, layers)[0]
    assert forward.parts == (4 * 64 * 256, 4 * 64 * 256)  # the plain tensor, not the sum
    assert not any("extrapolated" in n for n in acts.notes)
    off = prof.activations(_setting(2, 160), num_layers=1)
    assert any("not a multiple of 64" in n and "extrapolated" in n for n in off.notes)
    old = profile.from_document(_doc([plain]), origin="test")
    assert old.sequence_multiple == 0 and old.blocks[0].tensors[0].at(3, 7) == 64 * 21
    with pytest.raises(Exception, match="divisor 0"):
        profile.from_document(_doc([{**pooled, "divisor": 0}]), origin="test")


class _AliveAtEnd:
    """memplan.verify.measure.SavedTensors counting the storages a saved tensor still holds at
    the recording's end (the definition branch mc brings to measure.py, SavedTensors.close;
    installed only while measure.py lacks it)."""

    @staticmethod
    def install(monkeypatch: pytest.MonkeyPatch) -> None:
        from memplan.verify import measure

        base = measure.SavedTensors
        original = measure.saved_tensors
        if hasattr(base, "close"):  # measure.py counts the storages alive at the end itself
            return

        class Recorder(base):  # type: ignore[misc,valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.entries: dict[int, tuple[int, bool, list[Any]]] = {}

            def pack(self, t: Any) -> Any:
                held = t.detach()  # no cycle through a node that saves its own output
                key = measure.storage_key(measure.local(t))
                entry = self.entries.get(key)
                if entry is not None and all(r() is None for r in entry[2]):
                    entry = None  # freed: a new storage at that address
                if entry is None:
                    if self.is_model_state(key):
                        return held
                    in_layer = self.layer is not None and key not in self.shared
                    nbytes = measure.storage_bytes(measure.local(t))
                    entry = self.entries[key] = (nbytes, in_layer, [])
                entry[2].append(weakref.ref(held))
                return held

        @contextlib.contextmanager
        def saved_tensors(record: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with original(record, *args, **kwargs) as out:
                yield out
            # after the recording's own end; the caller still holds the loss (the graph)
            alive = [e for e in record.entries.values() if any(r() is not None for r in e[2])]
            record.bytes = sum(e[0] for e in alive)
            record.layer_bytes = sum(e[0] for e in alive if e[1])

        monkeypatch.setattr(measure, "SavedTensors", Recorder)
        monkeypatch.setattr(measure, "saved_tensors", saved_tensors)


@pytest.mark.slow
def test_verify_qwen35_linear_attention(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Predicted activations equal the measured ones to the byte at 128, 192 and 256 tokens (2, 3
    and 4 chunks; the profile is fitted on 128-384 and checked at 640: 192 is a multiple of the
    chunk, not of the traced unit)."""
    from memplan.config.load import validate
    from memplan.verify.job import Options
    from memplan.verify.result import to_json
    from memplan.verify.runner import verify

    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    _AliveAtEnd.install(monkeypatch)
    for sequence in (128, 192, 256):
        doc = verify_spec(
            QWEN35, {"precision": "fp32", "attention": "sdpa", "checkpointing": "none"}
        )
        doc["training"]["sequence_length"] = sequence
        out = to_json(verify(validate(doc), Options(), lambda _r, _w: None))
        acts = out["categories"]["activations"]
        assert out["setup"]["activations_source"] == "profile", out["notes"]
        assert acts["predicted"] == acts["measured"], (sequence, acts)
        assert not any("extrapolated" in n for n in out["notes"]), out["notes"]


def test_the_shipped_qwen35_profile_pools_its_loop() -> None:
    """Pins the shipped Qwen3.5-35B-A3B profile (benchmarks/flagships.py): its linear-attention
    layers hold one pooled fp32 record over a divisor, traced on multiples of 128 tokens; at
    4,096 tokens nothing is extrapolated, at 4,000 (not a multiple of 64) it is, and the working
    set is two of the largest real tensor, not of the pool."""
    import json

    from memplan.model.load import PROFILE_DIR

    path = PROFILE_DIR / "qwen3_5_moe_text-09668c2804de-bf16-bf16-sdpa-cuda-full.json"
    doc = json.loads(path.read_text())
    assert doc["fit"]["sequence_multiple"] == 64 and doc["fit"]["min_sequence"] == 128
    prof = profile.from_document(doc, origin="test")
    linear = next(b for b in prof.blocks if b.kind == "linear_attention")
    pooled = [t for t in (*linear.tensors, *linear.recompute) if t.pooled]
    assert pooled and all(t.dtype == "fp32" and t.divisor > 1 for t in pooled)
    st = replace(_setting(1, 4096), stream="bf16", matmul="bf16", device="cuda")
    st = replace(st, checkpointing="full")
    acts = prof.activations(st, num_layers=40)
    assert not any(n.startswith("sequence 4096") for n in acts.notes)
    assert any("chunked loop" in n for n in acts.notes)
    layers = next(b for b in acts.blocks if b.name == "layers")
    largest = max(t.bytes for t in layers.recompute if not t.pooled)
    assert max(t.bytes for t in layers.recompute) > largest  # the pool is the biggest record
    assert working_sets(acts, layers)[0].parts == (largest, largest)
    off = prof.activations(replace(st, sequence=4000), num_layers=40)
    assert any(n.startswith("sequence 4000 is not a multiple of 64") for n in off.notes)
