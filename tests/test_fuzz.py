"""Fuzzing the input path: whatever a spec file holds, the CLI answers with a report or one
clear error, never a traceback, never runs code from the file, and never hangs.

Hypothesis writes specs as YAML text: valid ones (tiny models, so that a run is milliseconds),
mutated ones (missing keys, wrong types, huge and negative numbers, unicode keys and values,
nesting), and hostile ones built as text (anchors and aliases, an alias bomb, deep nesting,
`!!python/...` tags, broken bytes). Each is run through `estimate`, `inventory` or `plan` with
`typer.testing.CliRunner`, and every run is checked the same way (`_check`).

Bounds, and why: models are tiny (2 layers, hidden 64) or bare parameter counts, parallel
degrees stay small in valid specs (huge ones arrive through mutation and must be refused), and
plan runs use 1-8 GPUs with budgets of KiB to GiB (plan's search grows with the GPU count).
`MEMPLAN_FUZZ_SCALE=10 pytest tests/test_fuzz.py` runs ten times as many inputs.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from memplan.cli.app import app
from memplan.hardware import ALIASES, CATALOG
from memplan.optimizers import OPTIMIZER_NAMES
from memplan.precision import PRESETS

SCALE = float(os.environ.get("MEMPLAN_FUZZ_SCALE", "1"))
SECONDS_PER_RUN = 60.0
"""A run that takes longer is a hang, not a slow machine: tiny models take milliseconds and plan
about a second on a quiet machine; 10 s failed under a load of 6 on 2 cores. A hang detector,
not a speed target (those are measured in benchmarks/)."""
RUNS: Counter[str] = Counter()
"""Inputs tried, by kind; printed by the last test."""

runner = CliRunner()


def examples(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,  # SECONDS_PER_RUN bounds each run instead (the first run imports)
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# --- where runs happen, and what every run must satisfy --------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the spec files; `pwned` in it must never appear."""
    path = tmp_path_factory.mktemp("fuzz")
    yield path
    assert not (path / "pwned").exists(), "a spec executed code"


def _run(work: Path, kind: str, text: str | bytes, command: str, *flags: str) -> Result:
    RUNS[kind] += 1
    path = work / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    result = runner.invoke(app, [command, str(path), "--width", "100", *flags])
    _check(result, time.monotonic() - started, work, text)
    return result


def _check(result: Result, seconds: float, work: Path, text: str | bytes) -> None:
    shown = text if isinstance(text, str) else repr(text)
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"crash on input:\n{shown[:2000]}\n{trace}")
    assert result.exit_code in (0, 1, 2, 3), (result.exit_code, shown[:2000], result.output)
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1:
        assert result.stderr.startswith("error: "), result.output
    assert not (work / "pwned").exists(), f"code ran from:\n{shown}"
    assert seconds < SECONDS_PER_RUN, f"{seconds:.1f} s on input:\n{shown[:2000]}"


# --- valid specs -----------------------------------------------------------------------------

TINY: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
    "mixtral": {
        "model_type": "mixtral",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000},
    "bert": {
        "model_type": "bert",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 1000,
    },
    "t5": {"model_type": "t5", "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4},
}
CONFIG_KEYS = sorted({k for arch in TINY.values() for k in arch} | {"rope_scaling", "head_dim"})

models = st.one_of(
    st.sampled_from(sorted(TINY)).map(lambda name: {"architecture": dict(TINY[name])}),
    st.integers(1, 10**13).map(lambda n: {"num_parameters": n}),
    st.sampled_from(["gpt2", "pythia-160m", "qwen2.5-0.5b", "llama-3-8b"]).map(
        lambda name: {"preset": name}
    ),
)
precisions = st.one_of(
    st.sampled_from(sorted(PRESETS)),
    st.fixed_dictionaries(
        {},
        optional={
            "preset": st.sampled_from(sorted(PRESETS)),
            "master_weights": st.sampled_from(["fp32", "none"]),
            "gradient_accumulation": st.sampled_from(["fp32", "none"]),
            "compute": st.sampled_from(["bf16", "fp16", "fp32"]),
        },
    ),
)
optimizers = st.fixed_dictionaries(
    {"name": st.sampled_from(OPTIMIZER_NAMES)},
    optional={
        "momentum": st.sampled_from([0.0, 0.9]),
        "amsgrad": st.booleans(),
        "centered": st.booleans(),
        "implementation": st.sampled_from(["foreach", "fused", "for_loop"]),
    },
)
trainings = st.fixed_dictionaries(
    {},
    optional={
        "micro_batch_size": st.integers(1, 8),
        "sequence_length": st.integers(1, 2048),
        "gradient_accumulation_steps": st.integers(1, 8),
        "attention": st.sampled_from(["sdpa", "eager"]),
        "dropout": st.sampled_from([None, True, False]),
        "activation_checkpointing": st.sampled_from(["none", "selective", "full"]),
    },
)
parallelisms = st.fixed_dictionaries(
    {},
    optional={
        "engine": st.sampled_from(["deepspeed", "fsdp2", "ddp", "megatron"]),
        "data": st.integers(1, 64),
        "zero_stage": st.integers(0, 3),
        "tensor": st.sampled_from([1, 2, 4]),
        "pipeline": st.sampled_from([1, 2]),
        "expert": st.sampled_from([1, 2]),
        "context": st.sampled_from([1, 2]),
        "offload": st.fixed_dictionaries(
            {},
            optional={
                "optimizer": st.sampled_from(["none", "cpu", "nvme"]),
                "parameters": st.sampled_from(["none", "cpu"]),
            },
        ),
    },
)
hardwares = st.fixed_dictionaries(
    {},
    optional={
        "gpu": st.sampled_from(sorted(CATALOG) + sorted(ALIASES)),
        "memory": st.sampled_from(["80GiB", "24 GB", 2**30, "1.5 TiB", "512KiB"]),
        "gpus_per_node": st.integers(1, 16),
        "host_memory": st.sampled_from(["2TiB", "512GB", 2**20]),
        "device": st.sampled_from(["cuda", "cpu"]),
    },
)
specs = st.fixed_dictionaries(
    {"model": models},
    optional={
        "precision": precisions,
        "optimizer": optimizers,
        "training": trainings,
        "parallelism": parallelisms,
        "hardware": hardwares,
    },
)


def dump(spec: Any) -> str:
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=10**6)


# --- mutations -------------------------------------------------------------------------------

# No lone surrogates: they cannot be written as UTF-8 (broken bytes come from `raw_bytes`).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
huge = st.sampled_from(
    [0, -1, -(2**63), 2**31, 2**63 - 1, 2**63, 2**64, 10**30, 10**300, -(10**300), 10**4000]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge,
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from(["80GiB", "1e400GiB", "-5", "0x10", "1_000", "~", "null", ".inf", "a\0b"]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A valid spec with one to four things broken."""
    spec: Any = copy.deepcopy(draw(specs))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(spec) if p]
        how = draw(
            st.sampled_from(["delete", "replace", "add", "rename", "config", "nest", "root"])
        )
        if how == "root":
            spec = draw(junk)
            continue
        if not isinstance(spec, dict) or not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(spec, path)
        key = path[-1]
        if how == "delete":
            del parent[key]
        elif how == "replace":
            parent[key] = draw(junk)
        elif how == "nest":
            depth = draw(st.integers(1, 60))
            value = parent[key]
            for _ in range(depth):
                value = draw(st.sampled_from([[value], {"k": value}]))
            parent[key] = value
        elif how == "add" and isinstance(parent, dict):
            parent[draw(texts)] = draw(junk)
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(texts) or f"{key}_"] = parent.pop(key)
        elif how == "config" and isinstance(spec.get("model"), dict):
            arch = spec["model"].setdefault("architecture", dict(TINY["llama"]))
            if isinstance(arch, dict):
                arch[draw(st.sampled_from(CONFIG_KEYS))] = draw(st.one_of(junk, huge))
    return spec


# --- hostile YAML, written as text -----------------------------------------------------------

SLOT = "__SLOT__"


@st.composite
def slotted(draw: st.DrawFn) -> str:
    """A valid spec as YAML with SLOT where some value was (or under a new key)."""
    spec = copy.deepcopy(draw(specs))
    paths = [p for p in _paths(spec) if p]
    if draw(st.booleans()):
        path = draw(st.sampled_from(paths))
        _parent(spec, path)[path[-1]] = SLOT
    else:
        section = draw(st.sampled_from(["model", "training", "top", "architecture"]))
        if section == "top":
            spec["extra"] = SLOT
        elif section == "architecture" and "architecture" in spec["model"]:
            spec["model"]["architecture"]["extra"] = SLOT
        else:
            spec.setdefault(section, {})["extra"] = SLOT
    return dump(spec)


def _tags(work: Path) -> st.SearchStrategy[str]:
    marker = str(work / "pwned")
    return st.sampled_from(
        [
            f"!!python/object/apply:os.system ['touch {marker}']",
            f"!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
            f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
            f"!!python/object/apply:builtins.open ['{marker}', 'w']",
            f"!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
            "!!python/name:os.system",
            "!!python/module:os",
            "!!python/object:builtins.object {}",
            "!!python/tuple [1, 2]",
            "!!binary aGVsbG8=",
            "!!binary '%%%'",
            "!!set {a, b}",
            "!!omap [a: 1]",
            "!!timestamp 2024-13-45",
            "!!float abc",
            "!!int 0xZZ",
            "!custom value",
            "!!str",
        ]
    )


@st.composite
def alias_bombs(draw: st.DrawFn) -> str:
    """`[&b0 [x, x, ...], &b1 [*b0, *b0, ...], ..., *bN]`: fanout ** levels values."""
    levels = draw(st.integers(1, 12))
    fanout = draw(st.integers(2, 10))
    parts = [f"&b0 [{', '.join(['lol'] * fanout)}]"]
    parts += [f"&b{i} [{', '.join([f'*b{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return f"[{', '.join(parts)}, *b{levels - 1}]"


nesting = st.integers(1, 5000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "- " * n + "x"])
)


@st.composite
def with_aliases(draw: st.DrawFn) -> str:
    """A valid spec whose repeated values are written once with an anchor and then aliased."""
    spec = copy.deepcopy(draw(specs))
    spec.setdefault("training", {})["micro_batch_size"] = "__ANCHOR__"
    spec["training"]["gradient_accumulation_steps"] = "__ALIAS__"
    spec.setdefault("parallelism", {})["data"] = "__ALIAS__"
    text = dump(spec)
    value = draw(st.sampled_from(["2", "1", "[1]", "{a: 1}", "-3"]))
    text = text.replace("__ANCHOR__", f"&n {value}").replace("__ALIAS__", "*n")
    if draw(st.booleans()):  # a merge key and an anchored section
        text = text.replace("training:\n", "training: &t\n", 1) + "plan:\n  <<: *t\n"
    return text


@st.composite
def raw_bytes(draw: st.DrawFn) -> bytes:
    """A valid spec's text, damaged byte by byte."""
    data = bytearray(dump(draw(specs)).encode())
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "delete", "truncate", "bom", "duplicate"]))
        if how == "insert":
            data[at:at] = draw(
                st.sampled_from([b"\t", b"\0", b"\xff\xfe", b"\xc3", b":", b"- ", b"&", b"*", b"!"])
            )
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "truncate":
            del data[at:]
        elif how == "bom":
            data[0:0] = b"\xef\xbb\xbf"
        else:
            line_end = data.find(b"\n", at)
            start = data.rfind(b"\n", 0, at) + 1
            if line_end > start:
                data[line_end:line_end] = b"\n" + data[start:line_end]
    return bytes(data)


# --- the tests -------------------------------------------------------------------------------

FLAGS = st.sampled_from([(), ("--json",), ("--explain",), ("--ranks",)])


@examples(120)
@given(spec=specs, flags=FLAGS)
def test_valid_specs_estimate(work: Path, spec: Any, flags: tuple[str, ...]) -> None:
    _run(work, "valid spec", dump(spec), "estimate", *flags)


@examples(300)
@given(spec=mutated_specs(), flags=FLAGS)
def test_mutated_specs_estimate(work: Path, spec: Any, flags: tuple[str, ...]) -> None:
    _run(work, "mutated spec", dump(spec), "estimate", *flags)


@examples(120)
@given(spec=st.one_of(specs, mutated_specs()), as_json=st.booleans())
def test_specs_inventory(work: Path, spec: Any, as_json: bool) -> None:
    _run(work, "inventory", dump(spec), "inventory", *(("--json",) if as_json else ()))


@examples(150)
@given(data=st.data())
def test_hostile_yaml(work: Path, data: st.DataObject) -> None:
    text = data.draw(slotted())
    fragment = data.draw(st.one_of(_tags(work), alias_bombs(), nesting))
    command = data.draw(st.sampled_from(["estimate", "inventory"]))
    _run(work, "hostile YAML", text.replace(SLOT, fragment, 1), command)


@examples(60)
@given(text=with_aliases())
def test_anchors_and_aliases(work: Path, text: str) -> None:
    _run(work, "aliases", text, "estimate")


@examples(100)
@given(data=raw_bytes())
def test_damaged_bytes(work: Path, data: bytes) -> None:
    _run(work, "damaged bytes", data, "estimate")


plans = st.fixed_dictionaries(
    {
        "model": st.just({"architecture": TINY["llama"]}),
        "hardware": st.fixed_dictionaries(
            {"memory": st.sampled_from(["64KiB", "1MiB", "16MiB", "1GiB"])},
            optional={"gpus_per_node": st.sampled_from([1, 2, 8])},
        ),
        "plan": st.fixed_dictionaries(
            {"gpus": st.sampled_from([1, 2, 4, 8])},
            optional={
                "global_batch_size": st.sampled_from([1, 8, 16]),
                "engines": st.lists(
                    st.sampled_from(["deepspeed", "fsdp2", "megatron", "ddp"]),
                    min_size=1,
                    max_size=4,
                    unique=True,
                ),
                "micro_batch_sizes": st.lists(st.integers(1, 4), min_size=1, max_size=3),
                "allow_offload": st.booleans(),
                "allow_recompute": st.booleans(),
                "reserve": st.sampled_from(["0", "1KiB", "2GiB"]),
            },
        ),
    }
)


@examples(8)
@given(spec=plans, as_json=st.booleans())
def test_plan_tiny_budgets(work: Path, spec: Any, as_json: bool) -> None:
    result = _run(work, "plan", dump(spec), "plan", *(("--json",) if as_json else ()))
    assert result.exit_code in (0, 1, 3), result.output


# --- crashes fuzzing found, one regression each -------------------------------------------------

LLAMA = "model:\n  architecture: {model_type: llama, hidden_size: 64, num_attention_heads: 4, "
LLAMA += "num_hidden_layers: 2, intermediate_size: 128, vocab_size: 1000"


def _bomb(levels: int = 9, fanout: int = 9) -> str:
    return "".join(
        [f"&b0 [{', '.join(['lol'] * fanout)}]"]
        + [f", &b{i} [{', '.join([f'*b{i - 1}'] * fanout)}]" for i in range(1, levels)]
    )


REGRESSIONS: list[tuple[str, str, str, int, str]] = [
    # (what, command, spec text, exit code, message)
    (
        "RecursionError: deep [[[...]]]",
        "estimate",
        "model: " + "[" * 5000 + "]" * 5000,
        1,
        "nested too deeply",
    ),
    (
        "RecursionError: deep {a: {a: ...}}",
        "estimate",
        "model: " + "{a: " * 3000 + "1" + "}" * 3000,
        1,
        "nested too deeply",
    ),
    (
        "ValueError: a 5,000-digit integer",
        "estimate",
        "model: {num_parameters: 1" + "0" * 5000 + "}",
        1,
        "a value cannot be read",
    ),
    (
        "ValueError: !!timestamp out of range",
        "estimate",
        "model: !!timestamp 2024-13-45\n",
        1,
        "a value cannot be read",
    ),
    (
        "hang: an alias bomb printed in an error",
        "estimate",
        LLAMA + ", junk: [" + _bomb() + "], hidden_size: *b8}\n",
        1,
        "alias bomb",
    ),
    (
        "cycle: an alias inside its own anchor",
        "estimate",
        "a: &a [*a]\nmodel: {num_parameters: 5}\n",
        1,
        "refers to a node that holds it",
    ),
    (
        "ReaderError: a NUL byte",
        "estimate",
        "\0model: {num_parameters: 5}\n",
        1,
        "unacceptable character",
    ),
    (
        "ValueError: a NUL in a path",
        "estimate",
        'model: {hf_config: "a\\0b"}\n',
        1,
        "cannot contain a NUL",
    ),
    (
        "OverflowError: data 10**20",
        "estimate",
        "model: {num_parameters: 1000}\nparallelism: {data: 100000000000000000000}\n",
        1,
        "less than or equal to 65536",
    ),
    (
        "OverflowError: a 400-digit memory size",
        "estimate",
        "model: {num_parameters: 1000}\nhardware: {memory: '1" + "0" * 400 + " GiB'}\n",
        1,
        "a size must be at most",
    ),
    (
        "OverflowError: a micro-batch beyond int64",
        "estimate",
        LLAMA + "}\ntraining: {micro_batch_size: 1" + "0" * 30 + "}\n",
        1,
        "less than or equal to 9223372036854775807",
    ),
    (
        "OverflowError: a hidden size beyond int64",
        "estimate",
        "model: {architecture: {model_type: llama, hidden_size: 1" + "0" * 30 + "}}\n",
        1,
        "(int64)",
    ),
    (
        "hang: a million layers",
        "inventory",
        "model: {architecture: {model_type: gpt2, n_layer: 1000000}}\n",
        1,
        "at most 10,000 layers",
    ),
    (
        "IndexError: a capitalised unknown key",
        "estimate",
        "A: 1\nmodel: {num_parameters: 5}\n",
        1,
        "A: unknown key",
    ),
    ("KeyError: any T5 spec", "estimate", "model: {architecture: {model_type: t5}}\n", 0, ""),
    (
        "KeyError: T5 over pipeline stages",
        "estimate",
        "model: {architecture: {model_type: t5}}\nparallelism: {pipeline: 2}\n",
        1,
        "encoder-decoder models are not split",
    ),
    (
        "StopIteration: DeepSpeed ZeRO-0 optimizer offload",
        "estimate",
        LLAMA
        + "}\nprecision: amp-bf16\nparallelism: {engine: deepspeed, offload: {optimizer: cpu}}\n",
        1,
        "zero_stage 1, 2 or 3",
    ),
    (
        "TypeError: rope_scaling: true",
        "estimate",
        LLAMA + ", rope_scaling: true}\n",
        1,
        "rope_scaling must be a mapping",
    ),
    (
        "ValueError: partial_rotary_factor: x",
        "estimate",
        "model: {architecture: {model_type: phi3, partial_rotary_factor: x}}\n",
        1,
        "partial_rotary_factor must be a number",
    ),
    (
        "ZeroDivisionError: gpt2 n_head 0",
        "estimate",
        "model: {architecture: {model_type: gpt2, n_head: 0}}\n",
        1,
        "n_head must be positive",
    ),
    (
        "ZeroDivisionError: num_key_value_heads 0",
        "estimate",
        LLAMA + ", num_key_value_heads: 0}\n",
        1,
        "num_key_value_heads must be positive",
    ),
    (
        "ZeroDivisionError: FSDP2 with an empty tensor",
        "estimate",
        # vocab_size 0 replaces LLAMA's 1000 (a duplicate key is refused since issue 15).
        LLAMA.replace("vocab_size: 1000", "vocab_size: 0")
        + "}\nparallelism: {engine: fsdp2, data: 3}\n",
        0,
        "",
    ),
    (
        "hang: plan suggestions recursing",
        "plan",
        LLAMA + "}\nhardware: {memory: 1MiB}\nplan: {gpus: 8, global_batch_size: 64}\n",
        3,
        "Nothing fits",
    ),
    (
        "hang: plan over 2**32 GPUs",
        "plan",
        LLAMA + "}\nhardware: {memory: 80GiB, gpus_per_node: 65536}\nplan: {nodes: 65536}\n",
        1,
        "plan searches at most 65,536",
    ),
]


@pytest.mark.parametrize(
    ("command", "text", "code", "message"),
    [r[1:] for r in REGRESSIONS],
    ids=[r[0] for r in REGRESSIONS],
)
def test_regression(work: Path, command: str, text: str, code: int, message: str) -> None:
    result = _run(work, "regression", text, command)
    assert result.exit_code == code, result.output
    assert message in result.output


def test_zz_inputs_tried(capsys: pytest.CaptureFixture[str]) -> None:
    """Say how many inputs this run tried (shown even under -q)."""
    total = sum(RUNS.values())
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(RUNS.items()))
    with capsys.disabled():
        print(f"\nfuzz: {total} inputs tried ({detail})")
    if RUNS:
        assert total >= 10
