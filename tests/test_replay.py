"""Issue 20 wired into the estimate: the step's timeline as allocator events
(memplan.step.replay), the replayed reserved bytes, the device terms, training.zero_grad and
the verdict on device_used.

Oracles: the event list of a hand-built step is written out by hand from the order the
replay's docstring states (not read back from the code); zero_grad's extra forward bytes are
the engine's gradient rows and, on a real CPU step of the tiny Llama, what torch's MemTracker
measures with `zero_grad(set_to_none=False)`; the alloc_conf errors are torch's own messages'
content with the YAML line the loader names. Tests named test_pin_* pin memplan's own
arithmetic (consistency between figures), not an outside truth.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from memplan.activations import Activations, Block
from memplan.config.load import load_spec
from memplan.errors import MemplanError
from memplan.memory import PHASES, Phase, Transient
from memplan.model.forward.tensors import Saved
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.load import load_inventory
from memplan.model.sources import from_config
from memplan.report.estimate import estimate
from memplan.states.parallel import stage_inventories
from memplan.states.terms import RankStates, Term
from memplan.step import replay as rp
from memplan.step.alloc_conf import AllocConf
from memplan.step.allocator import replay
from memplan.step.timeline import Point, Timeline
from tests.conftest import TINY_LLAMA, make_spec

ROOT = Path(__file__).resolve().parent.parent


# --- the event sequence of a hand-built step -------------------------------------------------


def _saved(name: str, nbytes: int) -> Saved:
    return Saved(name=name, shape=(nbytes // 4,), dtype="fp32", saved_by="x", source="test")


def _term(category: Any, name: str, nbytes: int) -> Term:
    return Term(
        category=category,
        name=name,
        dtype="fp32",
        tensors=1,
        elements=nbytes // 4,
        bytes=nbytes,
        formula="",
        source="test",
    )


def _transient(name: str, nbytes: int, phases: tuple[Phase, ...]) -> Transient:
    return Transient(name=name, bytes=nbytes, phases=phases, formula="", source="test")


def tiny_step() -> tuple[Timeline, RankStates, Activations, Inventory]:
    """Four parameter tensors of 1 KiB (embedding, two layers, head, untied), AdamW-like
    states of 4 KiB, an embedding block, two layers of two saved tensors, a head and a loss,
    and one transient of each kind the replay treats apart."""
    saved = Activations(
        modelled=True,
        blocks=(
            Block(name="embeddings", count=1, tensors=(_saved("ids", 1024),)),
            Block(
                name="layers",
                count=2,
                tensors=(_saved("a", 2048), _saved("b", 3072)),
                layered=True,
            ),
            Block(name="head", count=1, tensors=(_saved("norm", 512),)),
            Block(name="loss", count=1, tensors=(_saved("logsoftmax", 1536),)),
        ),
    )
    terms = (
        _transient("bucket", 100, PHASES),
        _transient("logits", 800, ("loss",)),
        # two equal tensors (the eager loss's nll and log-softmax gradients): `pieces`
        replace(_transient("logits_gradient", 1600, ("backward_start",)), pieces=2),
        _transient("forward_working_set", 256, ("forward",)),
        _transient("backward_working_set", 384, ("backward",)),
        _transient("allocator_rounding_activations", 12, ("forward", "backward")),
        _transient("embedding_backward", 640, ("backward_end",)),
        _transient("optimizer_temporaries", 4096, ("optimizer_step",)),
    )
    grads: dict[Phase, int] = {
        "start": 0,
        "forward": 0,
        "loss": 0,
        "backward_start": 0,
        "backward": 1024,  # the head's (_head_fraction: 1 of 4 equal tensors)
        "backward_end": 4096,
        "optimizer_step": 4096,
    }
    points = tuple(
        Point(
            phase=phase,
            by_category=(("gradients", grads[phase]),),
            transients=tuple(t.name for t in terms if phase in t.phases),
        )
        for phase in PHASES
    )
    timeline = Timeline(points=points, transients=terms, cuda_context_bytes=0, capacity_bytes=None)
    states = RankStates(
        ranks=(0,),
        terms=(
            _term("parameters", "parameters", 4096),
            _term("gradients", "gradients", 4096),
            _term("optimizer_states", "exp_avg", 4096),
        ),
    )
    inventory = Inventory(
        name="tiny",
        architecture=None,
        parameters=(
            TensorSpec(name="embed", shape=(256,)),
            TensorSpec(name="layer0", shape=(256,), layer=0),
            TensorSpec(name="layer1", shape=(256,), layer=1),
            TensorSpec(name="head", shape=(256,)),
        ),
    )
    return timeline, states, saved, inventory


# Saved blocks are keyed by their place in saved.blocks (names may repeat).
EMB, LAYERS, HEAD, LOSS = range(4)


def test_event_sequence_of_a_tiny_step() -> None:
    """The order the replay's docstring states, written out by hand for one step."""
    timeline, states, saved, inventory = tiny_step()
    got = rp.events(timeline, per_gpu=states, buffers=(), saved=saved, inventory=inventory, steps=1)

    def a(key: Any, n: int, piece: int = 0) -> tuple[Any, ...]:
        return ("alloc", (key, piece), n)

    def f(key: Any, piece: int = 0) -> tuple[Any, ...]:
        return ("free", (key, piece))

    def layer(c: int) -> list[tuple[Any, ...]]:
        return [
            a(("fws", 1, LAYERS, c), 256),
            a(("saved", 1, LAYERS, c, 0), 2048),
            a(("saved", 1, LAYERS, c, 1), 3072),
            f(("fws", 1, LAYERS, c)),
        ]

    def layer_backward(c: int) -> list[tuple[Any, ...]]:
        # each layer's gradients: a quarter of the 4 KiB (its one tensor of four)
        return [
            a(("bws", 1, LAYERS, c), 384),
            f(("saved", 1, LAYERS, c, 0)),
            f(("saved", 1, LAYERS, c, 1)),
            a(("gradients", 1, "layer", LAYERS, c), 1024),
            f(("bws", 1, LAYERS, c)),
        ]

    expected = [
        # init: the parameter and state rows (not the gradient row), the run-long bucket
        a(("state", 0, "parameters"), 4096),
        a(("state", 2, "exp_avg"), 4096),
        a(("transient", "bucket"), 100),
        ("phase", "start"),
        ("phase", "forward"),
        a(("saved", 1, EMB, 0, 0), 1024),
        *layer(0),
        *layer(1),
        ("phase", "loss"),
        # the head's saved tensors (final norm, the output layer's input) come before the
        # logits the output layer makes, the loss's after them
        a(("saved", 1, HEAD, 0, 0), 512),
        a(("transient", "logits"), 800),
        a(("saved", 1, LOSS, 0, 0), 1536),
        ("phase", "backward_start"),
        f(("transient", "logits")),
        # two [tokens, vocab] tensors: two blocks
        a(("transient", "logits_gradient"), 800, 0),
        a(("transient", "logits_gradient"), 800, 1),
        ("phase", "backward"),
        f(("transient", "logits_gradient"), 0),
        f(("transient", "logits_gradient"), 1),
        f(("saved", 1, HEAD, 0, 0)),
        f(("saved", 1, LOSS, 0, 0)),
        a(("gradients", 1, 0), 1024),  # the head's, before the first layer's backward
        *layer_backward(1),
        *layer_backward(0),
        ("phase", "backward_end"),
        a(("transient", "embedding_backward"), 640),
        f(("saved", 1, EMB, 0, 0)),
        a(("gradients", 1, 3), 1024),  # the rest: the embedding's
        ("phase", "optimizer_step"),
        f(("transient", "embedding_backward")),
        a(("transient", "optimizer_temporaries"), 4096),
    ]
    assert got == expected


def test_working_sets_are_made_as_their_parts() -> None:
    """A working set that names its tensors (Transient.parts) is one allocation per non-empty
    part, in the parts' order, all alive until the layer's end and freed there (the order the
    replay's docstring states, written out by hand for the second layer's forward and the
    first layer's backward)."""
    timeline, states, saved, inventory = tiny_step()
    parted = {
        "forward_working_set": (128, 128),
        "backward_working_set": (64, 0, 256, 64),  # an empty part (a 0-byte tensor): none
    }
    terms = tuple(
        replace(t, parts=parted[t.name]) if t.name in parted else t for t in timeline.transients
    )
    timeline = replace(timeline, transients=terms)
    got = rp.events(timeline, per_gpu=states, buffers=(), saved=saved, inventory=inventory, steps=1)
    fws, bws = ("fws", 1, LAYERS, 1), ("bws", 1, LAYERS, 0)
    i = got.index(("alloc", (fws, 0), 128))
    assert got[i : i + 5] == [
        ("alloc", (fws, 0), 128),
        ("alloc", (fws, 1), 128),
        ("alloc", (("saved", 1, LAYERS, 1, 0), 0), 2048),
        ("alloc", (("saved", 1, LAYERS, 1, 1), 0), 3072),
        ("free", (fws, 0)),
    ]
    assert got[i + 5] == ("free", (fws, 1))
    j = got.index(("alloc", (bws, 0), 64))
    assert got[j : j + 9] == [
        ("alloc", (bws, 0), 64),
        ("alloc", (bws, 1), 256),
        ("alloc", (bws, 2), 64),
        ("free", (("saved", 1, LAYERS, 0, 0), 0)),
        ("free", (("saved", 1, LAYERS, 0, 1), 0)),
        ("alloc", (("gradients", 1, "layer", LAYERS, 0), 0), 1024),
        ("free", (bws, 0)),
        ("free", (bws, 1)),
        ("free", (bws, 2)),
    ]


def test_pin_working_set_parts_are_the_rules_tensors() -> None:
    """Pinning (memplan's own decomposition, memplan.step.transients.working_sets): on the
    70B TP 8 block (full AC, 2 layers), the backward working set is the layer's output
    gradient, each tensor the rule recomputes in its order, the largest one's gradient and its
    input's, and the input gradient; its parts sum to its bytes, none above the largest saved
    tensor (the traced step's backward makes no tensor above it either:
    benchmarks/torchtitan_70b_trace.py). Under sequence parallelism the forward's is the
    gathered input (the largest saved tensor) beside a row-parallel output and its chunks
    concatenated, each [tokens, hidden] (half the embedding's reduce-scatter term); without
    it, the largest saved tensor and its input."""
    from benchmarks.torchtitan_70b_trace import ROW, spec_doc
    from memplan.config.load import validate

    # The row's Float8 blocks save the gathered inputs in fp8 (memplan.activations.
    # torchtitan_float8): their largest recomputed tensor is half the bf16 one.
    f8 = validate(spec_doc(replace(ROW, layers=2)))
    f8_layers = estimate(f8.spec, load_inventory(f8)).activations.block("layers")
    assert f8_layers is not None
    assert max(t.bytes for t in f8_layers.recompute) == 1 << 30
    # The decomposition below, on the row's bf16 blocks (as the traced step's bf16 variant).
    loaded = validate(spec_doc(replace(ROW, layers=2), float8=False))
    report = estimate(loaded.spec, load_inventory(loaded))
    layers = report.activations.block("layers")
    assert layers is not None and layers.recompute
    terms = {t.name: t for t in report.timeline.transients}
    fws, bws = terms["forward_working_set"], terms["backward_working_set"]
    largest = max(t.bytes for t in layers.recompute)
    hidden = report.activations.hidden_bytes
    recomputed = tuple(t.bytes for t in layers.recompute if t.bytes)
    whole = terms["tp_embedding_reduce_scatter"].bytes // 2
    assert whole == largest == 2 << 30
    assert fws.parts == (largest, whole, whole) and sum(fws.parts) == fws.bytes
    assert bws.parts == (hidden, *recomputed, largest, largest, hidden)
    assert sum(bws.parts) == bws.bytes and max(bws.parts) == largest

    doc = spec_doc(replace(ROW, layers=2), float8=False)
    doc["parallelism"] = {**doc["parallelism"], "sequence_parallel": False}
    loaded = validate(doc)
    report = estimate(loaded.spec, load_inventory(loaded))
    layers = report.activations.block("layers")
    assert layers is not None
    largest = max(t.bytes for t in layers.recompute)
    terms = {t.name: t for t in report.timeline.transients}
    assert "tp_embedding_reduce_scatter" not in terms
    assert terms["forward_working_set"].parts == (largest, largest)


def test_second_step_frees_the_first_steps_gradients_and_temporaries() -> None:
    """zero_grad(set_to_none=True) after the step: the second (marked) step's start frees the
    optimizer's temporaries, then the gradients (newest first), and nothing else happens
    before its forward."""
    timeline, states, saved, inventory = tiny_step()
    got = rp.events(timeline, per_gpu=states, buffers=(), saved=saved, inventory=inventory)
    assert got.count(("phase", "start")) == 1
    start, forward = got.index(("phase", "start")), got.index(("phase", "forward"))
    assert [e for e in got[start + 1 : forward] if e[0] != "free"] == []
    frees = [e[1][0] for e in got[start + 1 : forward]]
    assert frees == [
        ("transient", "optimizer_temporaries"),
        ("gradients", 1, 3),
        ("gradients", 1, "layer", LAYERS, 0),
        ("gradients", 1, "layer", LAYERS, 1),
        ("gradients", 1, 0),
    ]


def test_tiny_step_replayed() -> None:
    """Every block of the tiny step is small (<= 1 MiB): one 2 MiB small-pool segment holds
    them all (get_allocation_size: kSmallBuffer), and the allocated peak is the backward_start
    point's blocks, each rounded up to 512 bytes (round_size): parameters and exp_avg 4096
    each, the 100-byte bucket 512, embeddings 1024, two layers of 2048 + 3072, head 512, loss
    1536, and the two 800-byte halves of logits_gradient 1024 each (no gradients yet)."""
    timeline, states, saved, inventory = tiny_step()
    view = rp.replay(
        timeline,
        per_gpu=states,
        buffers=(),
        saved=saved,
        inventory=inventory,
        conf=AllocConf(),
        limit=None,
    )
    assert view.peak_reserved == 2 << 20
    assert view.peak_allocated == 4096 + 4096 + 512 + 1024 + 2 * 5120 + 512 + 1536 + 2 * 1024
    assert [p.phase for p in view.phases] == list(PHASES)


# --- the replay on real specs ------------------------------------------------------------------

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "plan" not in p.name)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "max_split_size_mb:256"])
def test_reserved_is_at_least_allocated(config: str, conf: str) -> None:
    """Whatever the spec and the allocator settings: reserved >= the replay's allocated peak
    >= the timeline's peak (the replay holds every point's bytes, each rounded up), and the
    device adds the terms outside the allocator on top."""
    loaded = load_spec(ROOT / "configs" / config)
    spec = loaded.spec.model_copy(
        update={"hardware": loaded.spec.hardware.model_copy(update={"alloc_conf": conf})}
    )
    report = estimate(spec, load_inventory(loaded))
    alloc = report.allocator
    assert alloc is not None
    # The replay rounds each saved tensor itself instead of adding the timeline's rounding
    # term, which the timeline also counts at the backward point for the head and loss blocks
    # already freed there: the replay may hold up to that term less.
    rounding = sum(t.bytes for t in report.timeline.transients if t.name in rp.ROUNDED_BY_REPLAY)
    assert alloc.peak_reserved >= alloc.peak_allocated >= report.peak_bytes - rounding
    for phase in alloc.phases:
        assert phase.peak_reserved >= phase.peak_allocated
    assert report.device_used == alloc.peak_reserved + sum(t.bytes for t in report.device_terms)
    assert report.device_terms[0].name == "cuda_context"


def test_cpu_has_no_replay() -> None:
    report = estimate(make_spec(hardware={"device": "cpu"}), from_config(TINY_LLAMA))
    assert report.allocator is None and report.device_used is None and not report.device_terms


def test_pin_two_steps_reach_the_steady_state() -> None:
    """Pins STEPS = 2: a third and a fifth step reserve nothing more for the shipped
    configs (the second step's reserved is the run's)."""
    for config in CONFIGS:
        loaded = load_spec(ROOT / "configs" / config)
        inventory = load_inventory(loaded)
        report = estimate(loaded.spec, inventory)
        stage = report.stages[report.stage]
        local = stage_inventories(inventory, report.layout)[stage.stage]
        reserved = []
        for steps in (2, 3, 5):
            events = rp.events(
                report.timeline,
                per_gpu=report.per_gpu,
                buffers=report.buffers,
                saved=report.activations,
                inventory=local,
                steps=steps,
            )
            reserved.append(replay(events).peak_reserved)
        assert reserved[0] == reserved[1] == reserved[2], config


# --- training.zero_grad ----------------------------------------------------------------------


def _zero_grad_pair(**overrides: Any) -> tuple[Any, Any]:
    inventory = from_config(TINY_LLAMA)
    none = estimate(make_spec(**overrides), inventory)
    training = {**overrides.get("training", {}), "zero_grad": "zero"}
    zero = estimate(make_spec(**{**overrides, "training": training}), inventory)
    return none, zero


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_zero_grad_zero_raises_the_forward_peak_by_the_gradient_rows(engine: str) -> None:
    """The engine's gradient rows (RankStates' gradients category) stay alive through the
    forward: the forward and loss points gain exactly their bytes, and so does the replay's
    allocated forward peak (one block, rounded to 512 bytes)."""
    data = 2 if engine == "fsdp2" else 1
    none, zero = _zero_grad_pair(
        parallelism={"engine": engine, "data": data}, hardware={"gpu": "H100-80GB"}
    )
    grads = zero.per_gpu.bytes_of("gradients")
    assert grads > 0
    for phase in ("start", "forward", "loss"):
        before = {p.phase: p.total_bytes for p in none.timeline.points}[phase]
        after = {p.phase: p.total_bytes for p in zero.timeline.points}[phase]
        assert after - before == grads, phase
    fwd_none = {p.phase: p for p in none.allocator.phases}["forward"].peak_allocated
    fwd_zero = {p.phase: p for p in zero.allocator.phases}["forward"].peak_allocated
    assert 0 <= fwd_zero - fwd_none - grads < 512


def test_zero_grad_changes_nothing_under_deepspeed() -> None:
    none, zero = _zero_grad_pair(
        parallelism={"engine": "deepspeed", "data": 2, "zero_stage": 2},
        hardware={"gpu": "H100-80GB"},
    )
    assert none.peak_bytes == zero.peak_bytes
    assert any("zero_grad: zero changes nothing under deepspeed" in n for n in zero.notes)


def test_zero_grad_zero_measured_on_a_real_cpu_step() -> None:
    """A real step of the tiny Llama on CPU (fp32, AdamW foreach), second step, measured with
    torch's MemTracker: `zero_grad(set_to_none=False)` after the first step raises the forward
    window's peak by exactly the gradients' storage bytes, and memplan's loss point rises by
    the same bytes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.distributed._tools.mem_tracker import MemTracker

    batch, sequence = 2, 32

    def forward_peak(set_to_none: bool) -> tuple[int, int]:
        config = transformers.LlamaConfig(
            **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, use_cache=False
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
        ids = torch.randint(0, TINY_LLAMA["vocab_size"], (batch, sequence))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        tracker = MemTracker()
        tracker.track_external(model, optimizer, ids)
        with tracker:
            loss = model(input_ids=ids, labels=ids).loss
        peak = sum(int(d["Total"]) for d in tracker.get_tracker_snapshot("peak").values())
        grads = sum(
            p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None
        )
        del loss
        return peak, grads

    peak_none, grads_none = forward_peak(True)
    peak_zero, grads_zero = forward_peak(False)
    assert grads_none == 0
    measured = peak_zero - peak_none
    assert measured == grads_zero
    spec: dict[str, Any] = {
        "precision": "fp32",
        "optimizer": {"name": "adamw", "implementation": "foreach"},
        "training": {"micro_batch_size": batch, "sequence_length": sequence},
        "hardware": {"device": "cpu"},
    }
    none, zero = _zero_grad_pair(**spec)
    loss_none = {p.phase: p.total_bytes for p in none.timeline.points}["loss"]
    loss_zero = {p.phase: p.total_bytes for p in zero.timeline.points}["loss"]
    assert loss_zero - loss_none == measured


# --- hardware.alloc_conf and the device keys -------------------------------------------------


def _spec_file(tmp_path: Path, hardware: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "model:\n  preset: qwen2.5-0.5b\ntraining:\n  sequence_length: 512\n"
        f"hardware:\n  gpu: H100-80GB\n{hardware}"
    )
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("expandable_segments:yes", "expected True or False"),
        ("max_split_size_mb:10", "too small, must be >= 20"),
        ("roundup_power2_divisions:3", "must be a power of 2"),
        ("expandible_segments:True", "unknown key"),
        ("backend:cudaMallocAsync", "cudaMallocAsync"),
    ],
)
def test_alloc_conf_errors_name_the_line(tmp_path: Path, value: str, message: str) -> None:
    """A bad PYTORCH_CUDA_ALLOC_CONF is one MemplanError naming hardware.alloc_conf and its
    YAML line (line 7 of the file), through the CLI: exit 1, no traceback."""
    from typer.testing import CliRunner

    from memplan.cli.app import app

    path = _spec_file(tmp_path, f"  alloc_conf: '{value}'\n")
    result = CliRunner().invoke(app, ["estimate", str(path)])
    assert result.exit_code == 1
    out = result.output
    assert f"{path}:7: hardware.alloc_conf: PYTORCH_CUDA_ALLOC_CONF" in " ".join(out.split())
    assert message in " ".join(out.split())
    assert "Traceback" not in out


def test_cuda_version_is_checked_with_its_line(tmp_path: Path) -> None:
    from memplan.config.load import load_spec as load

    path = _spec_file(tmp_path, "  cuda_version: 10\n")
    with pytest.raises(MemplanError, match=r"spec.yaml:7.*hardware.cuda_version"):
        load(path)


def test_device_keys_reach_the_terms(tmp_path: Path) -> None:
    """cuda_lazy_loading: false adds the eager kernel images; nccl_nvls: false drops the NVLS
    buffers of an 8-GPU H100 data-parallel group; cuda_context overrides the context."""
    base = {"parallelism": {"engine": "fsdp2", "data": 8}}
    inventory = from_config(TINY_LLAMA)

    def names(**hardware: Any) -> dict[str, int]:
        spec = make_spec(**base, hardware={"gpu": "H100-80GB", **hardware})
        return {t.name: t.bytes for t in estimate(spec, inventory).device_terms}

    default = names()
    assert "nccl_world_nvls" in default and "eager_kernel_images" not in default
    assert "eager_kernel_images" in names(cuda_lazy_loading=False)
    assert "nccl_world_nvls" not in names(nccl_nvls=False)
    assert names(cuda_context="1GiB")["cuda_context"] == 1 << 30


# --- the verdict on device_used ----------------------------------------------------------------


def test_verdict_flips_exactly_when_device_used_crosses_capacity() -> None:
    """For capacities around the step's need, the verdict is "fits" exactly when device_used
    <= capacity, and the headroom is capacity - device_used (searching the smallest capacity
    that fits, 512 bytes apart)."""
    inventory = from_config(TINY_LLAMA)
    spec = make_spec(training={"micro_batch_size": 4, "sequence_length": 256})

    def at(capacity: int) -> Any:
        return estimate(
            spec.model_copy(
                update={"hardware": spec.hardware.model_copy(update={"memory": capacity})}
            ),
            inventory,
        )

    low, high = 0, 1 << 34
    assert at(high).verdict == "fits" and at(low).verdict == "does_not_fit"
    while high - low > 512:
        mid = (low + high) // 2 // 512 * 512
        if at(mid).verdict == "fits":
            high = mid
        else:
            low = mid
    fits, misses = at(high), at(low)
    assert fits.device_used <= high and fits.usable_bytes == high - fits.device_used
    assert misses.device_used > low and misses.usable_bytes == low - misses.device_used < 0
    assert fits.fits is True and misses.fits is False


def test_json_carries_the_three_layers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from memplan.cli.app import app

    path = _spec_file(tmp_path, "  alloc_conf: 'expandable_segments:True'\n")
    doc = json.loads(CliRunner().invoke(app, ["estimate", str(path), "--json"]).stdout)
    gpu = doc["per_gpu"]
    assert gpu["peak"] <= gpu["peak_reserved"] <= gpu["device_used"]
    assert gpu["device_used"] == gpu["peak_reserved"] + sum(t["bytes"] for t in gpu["device_terms"])
    assert [p["phase"] for p in gpu["reserved_by_phase"]] == list(PHASES)
    hw = doc["hardware"]
    assert hw["headroom_bytes"] == hw["memory_bytes"] - gpu["device_used"]
    table = CliRunner().invoke(app, ["estimate", str(path), "--width", "200"]).stdout
    assert "What the GPU will show" in table
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in " ".join(table.split())


def test_pin_llama_3_8b_fits_only_through_retries() -> None:
    """Pins the shipped llama-3-8b config (ZeRO-3, 8k tokens, H100): replayed without a limit
    its allocator would reserve more than the GPU has beside the device terms, but within the
    limit it frees its cached segments and retries (DeviceCachingAllocator::malloc's
    release_cached_blocks), so the step fits, the retries are counted and a note says so."""
    loaded = load_spec(ROOT / "configs" / "llama-3-8b.yaml")
    inventory = load_inventory(loaded)
    report = estimate(loaded.spec, inventory)
    alloc = report.allocator
    assert alloc is not None and alloc.limit is not None
    assert report.fits is True and alloc.alloc_retries > 0
    assert any("retrying" in n for n in report.notes)
    stage = report.stages[report.stage]
    events = rp.events(
        report.timeline,
        per_gpu=report.per_gpu,
        buffers=report.buffers,
        saved=report.activations,
        inventory=stage_inventories(inventory, report.layout)[stage.stage],
    )
    assert replay(events).peak_reserved > alloc.limit >= alloc.peak_reserved


def test_lora_blocks_with_one_name_replay() -> None:
    """LoRA's activations may hold two blocks of one name (the snapshot replay's estimate
    #929, llama-3-8b + LoRA on q_proj/v_proj, raised 'already allocated' before the replay
    keyed blocks by their place)."""
    from memplan.config.load import validate

    loaded = validate(
        {
            "model": {"preset": "llama-3-8b"},
            "finetune": {"method": "lora", "rank": 8, "alpha": 16},
            "training": {"micro_batch_size": 1, "sequence_length": 32},
            "hardware": {"gpu": "H100-80GB"},
        }
    )
    report = estimate(loaded.spec, load_inventory(loaded))
    names = [b.name for b in report.activations.blocks]
    assert len(names) > len(set(names))
    assert report.allocator is not None
    assert report.allocator.peak_reserved >= report.allocator.peak_allocated


# --- FSDP2's side streams ------------------------------------------------------------------------


def test_fsdp2_side_streams_hold_their_own_buffers() -> None:
    """torch 2.13's FSDP2 makes each flat all-gather output on all_gather_copy_in_stream in
    forward and pre-backward (_fsdp_param_group.py::get_all_gather_streams, _fsdp_collectives.py
    ::foreach_all_gather) and the reduce-scatter output, of which the sharded gradients are
    views, on reduce_scatter_stream (foreach_reduce: "The RS output is allocated in the RS
    stream and used in the default stream (for optimizer)"). The replay puts every gradient the
    step makes and those buffers there; the root's flat output is made as forward begins, and
    freed once the first layer's is made (all_gather_state, wait_for_unshard). The reduce-
    scatter stream's own pool then holds at least every sharded gradient at once."""
    from memplan.states.engines.fsdp2.buffers import ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM

    spec = make_spec(parallelism={"engine": "fsdp2", "data": 2}, hardware={"gpu": "H100-80GB"})
    inventory = from_config(TINY_LLAMA)
    report = estimate(spec, inventory)
    events = rp.events(
        report.timeline,
        per_gpu=report.per_gpu,
        buffers=report.buffers,
        saved=report.activations,
        inventory=inventory,
        gradient_stream=REDUCE_SCATTER_STREAM,
    )
    allocs = [e for e in events if e[0] == "alloc"]
    gradients = [e for e in allocs if e[1][0][0] == "gradients"]
    assert gradients and {e[3] for e in gradients} == {REDUCE_SCATTER_STREAM}
    flat = [e for e in allocs if e[1][0] == ("transient", "fsdp2_all_gather_output")]
    assert flat and all(e[3] == ALL_GATHER_STREAM for e in flat)
    # The root's flat output: made at forward's start, before the layer's, freed after it.
    name = "fsdp2_all_gather_output_root_forward"
    (moment,) = [t for t in report.timeline.transients if t.name == name]
    assert (moment.phases, moment.momentary, moment.stream) == ((), "forward", ALL_GATHER_STREAM)
    key = (("momentary", 2, name), 0)
    start = events.index(("phase", "forward"))
    made = events.index(("alloc", key, moment.bytes, ALL_GATHER_STREAM), start)
    flat_made = next(i for i, e in enumerate(events) if i > start and e in flat)
    freed = events.index(("free", key))
    assert start < made < flat_made < freed
    streams = dict(report.allocator.reserved_by_stream)
    assert set(streams) == {"compute", ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM}
    assert streams[REDUCE_SCATTER_STREAM] >= report.per_gpu.bytes_of("gradients")
