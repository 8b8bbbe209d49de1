"""Sequences below, at and past one chunk (memplan.verify.trace.sizes.span, scan_chunks): a model
with a chunked loop (Qwen3.5's gated delta rule, chunk 64) or a padded chunked scan (Mamba-2's
SSD, transformers 5.25 modeling_mamba2.py::mamba2_chunk_scan, `Mamba2Mixer.chunk_size`) runs
one padded chunk up to its chunk's length, so those sequences get a regime of their own, traced
at the ordinary sizes (`fit.max_sequence`: the chunk, or one below it where the chunk's own
length runs another path, as xlstm's chunkwise kernel does); past the chunk the trace runs on
multiples of 2 x the chunk, a storage over the chunks ([b, h, c + 1, c + 1], c = s / chunk)
fitted exactly over a divisor.

Oracle of the slow test: a real CPU forward and loss of the same tiny model (real weights and
tensors, torch's saved-tensor hooks), the bytes of the storages its saved tensors still hold
when the loss is made (memplan/verify/measure.py's definition: parameters left out), against
the profile document's activations at that size: independent of the FakeTensorMode trace the
prediction comes from, and run without verify's module tracker (which keeps Mamba-2's unused
`A = -exp(A_log)` alive: 16 B per layer more in `memplan verify`'s own count, the note
benchmarks/profile_verify.py gives falcon_h1).
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.model import profile  # noqa: E402
from memplan.model.forward.tensors import Setting  # noqa: E402
from memplan.verify.trace import fit as fit_  # noqa: E402
from memplan.verify.trace.sizes import Span, span  # noqa: E402

MAMBA2 = {
    "model_type": "mamba2",
    "num_heads": 4,
    "head_dim": 32,
    "vocab_size": 512,
    "hidden_size": 64,
    "state_size": 16,
    "n_groups": 1,
    "time_step_rank": 8,
    "num_hidden_layers": 2,
    "chunk_size": 64,
}
"""verify_sweep's tiny Mamba-2 with a 64-token chunk (the default 256 would trace past it at
512-1,536 tokens)."""
QWEN35 = {
    "model_type": "qwen3_5_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
}
"""benchmarks/profile_verify.py's qwen3_5_text: one gated-delta-rule layer (chunk 64), one full."""
XLSTM = {
    "model_type": "xlstm",
    "vocab_size": 512,
    "hidden_size": 64,
    "embedding_dim": 64,
    "num_heads": 4,
    "num_hidden_layers": 2,
    "num_blocks": 2,
    "qk_dim_factor": 1.0,
}
"""verify_sweep's tiny xLSTM (chunk_size 64, mode "inference": modeling_xlstm.py::
wrap_chunkwise_arbitrary_sequence_length, whole chunks chunkwise, the rest a per-token loop),
query/key heads as wide as the value heads: with the default qk_dim_factor 0.5 the real model's
chunkwise kernel fails from 64 tokens on (mlstm_chunkwise_recurrent_fw_C: "The expanded size of
the tensor (8) must match the existing size (16)")."""


def _cfg(**keys: Any) -> Any:
    return SimpleNamespace(max_position_embeddings=4096, **keys)


def test_span_pins_the_regimes() -> None:
    """Pins behaviour: the regime each sequence is traced in."""
    chunked = _cfg()
    assert span(chunked, 64, "cpu", 32) == Span(start=0, unit=8, top=64, edge=64)
    assert span(chunked, 64, "cpu", 64) == Span(start=0, unit=8, top=64, edge=64)
    # past the chunk: multiples of 2 x 64, the chunk's own length the regime below's edge
    assert span(chunked, 64, "cpu", 65) == Span(start=0, unit=128, above=63, chunk=64)
    assert span(chunked, 64, "cpu", None) == Span(start=0, unit=128, chunk=64)
    # a chunk too short for the ordinary checks (40 tokens): one regime, as before
    assert span(chunked, 16, "cpu", 8) == Span(start=0, unit=32, chunk=16)
    # device=cuda traces multiples of 32 (its check at 160 tokens): Mamba-2's 256 holds it
    assert span(chunked, 256, "cuda", 100) == Span(start=0, unit=32, top=256, edge=256)
    assert span(chunked, 64, "cuda", 32) == Span(start=0, unit=128, chunk=64)
    # a window alone: as below_window (below it at 8, past it at multiples of W + 1)
    windowed = _cfg(sliding_window=48)
    assert span(windowed, 0, "cpu", 47) == Span(start=0, unit=8, top=47)
    assert span(windowed, 0, "cpu", 48) == Span(start=0, unit=49, above=47)
    # a window (16) shorter than the chunk (64): past it and below the chunk from 16 tokens on
    both = _cfg(sliding_window=16)
    assert span(both, 64, "cpu", 32) == Span(start=8, unit=8, top=64, edge=64)
    assert span(both, 64, "cpu", 8).start == 8  # below the window: extrapolated from 16
    assert span(both, 64, "cpu", 100) == Span(start=0, unit=128, above=63, chunk=64)
    # a chunk (64) shorter than the window (1000): one chunk, then multiples of 128 below it
    long = _cfg(sliding_window=1000)
    assert span(long, 64, "cpu", 200) == Span(start=0, unit=128, top=999, above=63, chunk=64)
    assert span(long, 64, "cpu", 1500) == Span(start=0, unit=1024, above=999, chunk=64)
    # a window (400) too short for that middle regime's checks (640 tokens): past it from 64
    assert span(_cfg(sliding_window=400), 64, "cpu", 200) == Span(
        start=0, unit=512, above=63, chunk=64
    )


def test_scan_chunk_is_the_mixers_chunk_size() -> None:
    """Mamba-2's scan has no loop: its chunk is the mixer's `chunk_size`, which the modeling
    module's mamba2_chunk_scan takes without a default; a model without one has none."""
    import inspect

    import transformers.models.mamba2.modeling_mamba2 as modeling

    from memplan.verify.trace.forward import build_fake
    from memplan.verify.trace.sizes import loop_chunk, scan_chunks

    source = inspect.getsource(modeling)
    assert "chunk_size=module.chunk_size," in source and "    chunk_size: int,\n" in source
    model, _ = build_fake(MAMBA2, stream="fp32", attention="sdpa", checkpointing="none")
    chunk, where = loop_chunk(model)
    assert chunk == 64 and where.startswith("modeling_mamba2.py::mamba2_chunk_scan over ")
    assert list(scan_chunks(model)) == [64]
    llama = {**QWEN35, "model_type": "llama", "layer_types": None}
    model, _ = build_fake(llama, stream="fp32", attention="sdpa", checkpointing="none")
    assert scan_chunks(model) == {}


def test_a_storage_over_the_chunks_fits_over_a_divisor() -> None:
    """Pins behaviour: Mamba-2's inter-chunk decay [b, h, c + 1, c + 1] (h = 4, c = s / 16) on
    multiples of 32 is b * (s * s / 64 + s / 2 + 4): exact over the divisor 64 (a divisor of
    16^2); without a chunk the fit refuses it, as before."""
    sizes = [(2, 32), (3, 32), (2, 64), (3, 64), (2, 96), (3, 96)]
    lists = [
        [fit_.Record("layer.0", "mixer", "fp32", b * 4 * (s // 16 + 1) ** 2)] for b, s in sizes
    ]
    traces = [{"layer.0": x} for x in lists]
    fitted = fit_.fit(traces, sizes, "layer.0", chunk=16)
    assert fitted == [
        {"module": "mixer", "dtype": "fp32", "numel": [0, 256, 0, 32, 0, 1], "divisor": 64}
    ]
    assert fit_.value(fitted[0], 4, 160) == 4 * 4 * (160 // 16 + 1) ** 2
    with pytest.raises(Exception, match="not a polynomial"):
        fit_.fit(traces, sizes, "layer.0")
    with pytest.raises(Exception, match="not a polynomial"):  # 64 does not divide 4^2
        fit_.fit(traces, sizes, "layer.0", chunk=4)


def _doc(numel: list[int], fit: dict[str, int]) -> dict[str, Any]:
    tensor = {"name": "t#0", "dtype": "fp32", "numel": numel}
    block = {"name": "layers", "kind": "decoder", "count": 1}
    return {
        "fit": {"min_sequence": 8, **fit},
        "blocks": [{**block, "tensors": [tensor], "tensors_b1": [tensor]}],
    }


def _setting(sequence: int, batch: int = 2) -> Setting:
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


def test_each_regime_has_its_own_chunk() -> None:
    """Pins behaviour: the regime below the chunk (no fit.sequence_multiple) serves 32 tokens
    without the past regime's "not a multiple" note; the past regime keeps its own."""
    past = _doc([0, 0, 0, 3, 0, 0], {"min_sequence": 128, "sequence_multiple": 64})
    past["fit"]["above_sequence"] = 63
    below = _doc([0, 0, 0, 2, 0, 0], {"max_sequence": 64})
    doc = {
        "schema": profile.SCHEMA,
        "key": {
            "model_type": "x",
            "config_hash": "0" * 64,
            "stream": "fp32",
            "matmul": "fp32",
            "autocast": False,
            "attention": "sdpa",
            "device": "cpu",
            "checkpointing": "none",
        },
        "versions": {"torch": "2.13.0", "transformers": "5.25.0"},
        "model": {"hidden_size": 64, "vocab_size": 512},
        **past,
        "regimes": [below],
    }
    prof = profile.from_document(doc, origin="test")

    def at(sequence: int) -> tuple[int, bool]:
        view = prof.at_sequence(sequence)
        assert view is not None
        acts = view.activations(_setting(sequence), num_layers=1)
        layer = next(b for b in acts.blocks if b.name == "layers")
        return layer.bytes_each, any("not a multiple" in n for n in acts.notes)

    assert at(32) == (4 * 2 * 2 * 32, False)
    assert at(64) == (4 * 2 * 2 * 64, False)
    assert at(128) == (4 * 3 * 2 * 128, False)
    assert at(96) == (4 * 3 * 2 * 96, True)


def _real_saved(config: dict[str, Any], batch: int, sequence: int) -> int:
    """Bytes of the storages the saved tensors of a real CPU forward and loss still hold at its
    end (parameters left out), counted by torch's saved-tensor hooks."""
    import torch
    import transformers

    torch.manual_seed(0)
    conf = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(conf).float().train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, list[Any]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        held = t.detach()  # no cycle through a node that saves its own output
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = seen.get(key)
        if entry is not None and all(r() is None for r in entry[1]):
            entry = None  # freed: a new storage at that address
        if entry is None:
            if key in params:
                return held
            entry = seen[key] = (storage.nbytes(), [])
        entry[1].append(weakref.ref(held))
        return held

    ids = torch.randint(0, int(config["vocab_size"]), (batch, sequence))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    alive = sum(n for n, refs in seen.values() if any(r() is not None for r in refs))
    del loss
    return alive


def _predicted(doc: dict[str, Any], batch: int, sequence: int) -> tuple[int, tuple[str, ...]]:
    prof = profile.from_document(doc, origin="test").at_sequence(sequence)
    assert prof is not None
    acts = prof.activations(
        _setting(sequence, batch), num_layers=int(doc["model"]["traced_layers"])
    )
    return sum(b.count * b.bytes_each for b in acts.blocks), acts.notes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "sequences", "top"),
    [
        (MAMBA2, (32, 64, 128), 64),
        (QWEN35, (32, 64, 128), 63),
        (XLSTM, (32, 128), 63),
    ],
    ids=["mamba2", "qwen3_5_text", "xlstm"],
)
def test_below_at_and_past_the_chunk(
    config: dict[str, Any], sequences: tuple[int, ...], top: int
) -> None:
    """The profile traced for each sequence (its regime) predicts the real forward's saved
    bytes exactly: below the chunk (32), at it (64: one chunk, no padding, in the regime below
    for Mamba-2's padded scan; the gated delta rule's trace at 64 saves other storages than the
    fit over 8-40 tokens says, and xlstm runs its chunkwise kernel there, so their regime below
    stops at 63 and 64 is extrapolated, noted, from the regime past the chunk: qwen3_5_text
    3,065,796 B against 3,063,716 real) and past it (128, two chunks: the regime on multiples
    of 128)."""
    from memplan.verify.trace import profile as tracer

    for sequence in sequences:
        doc = tracer.build(
            config,
            stream="fp32",
            matmul="fp32",
            autocast=False,
            attention="sdpa",
            sequence=sequence,
        )
        if sequence <= top:
            assert doc["fit"]["max_sequence"] == top and "sequence_multiple" not in doc["fit"]
        else:
            assert doc["fit"]["above_sequence"] == 63 and doc["fit"]["sequence_multiple"] == 64
        predicted, notes = _predicted(doc, 2, sequence)
        if sequence >= doc["fit"]["min_sequence"]:
            assert predicted == _real_saved(config, 2, sequence), sequence
            assert not any(f"sequence {sequence} is" in n for n in notes), notes
        else:  # the chunk's own length, past the regime below it: extrapolated, and noted
            assert any(f"sequence {sequence} is shorter" in n for n in notes), notes
