"""What a new user met (issue 15 items 2 and 9): one verdict, and the rough edges of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.config.load import load_spec, validate
from memplan.config.parallelism import ParallelismSpec
from memplan.errors import MemplanError
from memplan.model.load import load_inventory
from memplan.plan.search import plan
from memplan.report.estimate import estimate
from memplan.report.result import fits_of, verdict

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args: str, width: int = 140):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, "--width", str(width)])


LLAMA = """\
model:
  preset: llama-3-8b
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 1
  sequence_length: 2048
parallelism:
  data: 8
  zero_stage: 3
"""


# --- item 2: one verdict -----------------------------------------------------------------------


def test_verdict_table() -> None:
    """The verdict's cases, spelled out (the issue's wording is the oracle)."""
    assert verdict(usable_bytes=None, activations_modelled=True) is None
    assert verdict(usable_bytes=0, activations_modelled=True) == "fits"
    assert verdict(usable_bytes=-1, activations_modelled=True) == "does_not_fit"
    assert (
        verdict(usable_bytes=5, activations_modelled=False)
        == "model_states_fit_activations_unknown"
    )
    assert verdict(usable_bytes=-1, activations_modelled=False) == "model_states_do_not_fit"
    assert fits_of("model_states_fit_activations_unknown") is None
    assert fits_of("model_states_do_not_fit") is False
    assert fits_of("fits") is True


def test_peak_under_capacity_but_no_usable_memory_does_not_fit(tmp_path: Path) -> None:
    """The issue's case: peak <= capacity, but the CUDA context and the allocator's reserve
    leave nothing usable. Table and JSON both say it does not fit, from one figure."""
    free = json.loads(cli("estimate", str(write(tmp_path, LLAMA)), "--json").stdout)
    capacity = free["per_gpu"]["peak"] + (100 << 20)  # 100 MiB above the peak
    spec = write(tmp_path, LLAMA + f"hardware:\n  memory: {capacity}\n")
    doc = json.loads(cli("estimate", str(spec), "--json").stdout)
    hw = doc["hardware"]
    assert hw["verdict"] == "does_not_fit" and hw["fits"] is False
    # issue 20: the headroom is capacity - device_used (what nvidia-smi would show)
    assert hw["headroom_bytes"] == capacity - doc["per_gpu"]["device_used"] < 0
    out = cli("estimate", str(spec)).stdout
    assert "does NOT fit the GPU" in out and "\nfits " not in out


def test_fit_line_prints_the_usable_memory(tmp_path: Path) -> None:
    spec = write(tmp_path, LLAMA + "hardware:\n  gpu: H100-80GB\n")
    doc = json.loads(cli("estimate", str(spec), "--json").stdout)
    assert doc["hardware"]["verdict"] == "fits" and doc["hardware"]["fits"] is True
    from memplan.cli.render import human

    # issue 20: the memory left is capacity - device_used, the device table's last layer
    usable = human(doc["hardware"]["memory_bytes"] - doc["per_gpu"]["device_used"])
    out = cli("estimate", str(spec)).stdout
    assert f"device {human(doc['per_gpu']['device_used'])}" in " ".join(out.split())
    assert f"fits H100-80GB (79.65 GiB): {usable} usable left" in out


@pytest.mark.parametrize(
    ("memory", "expected", "fits", "text"),
    [
        ("80GiB", "model_states_fit_activations_unknown", None, "model states fit; activations"),
        ("1GiB", "model_states_do_not_fit", False, "model states alone do NOT fit"),
    ],
)
def test_no_plain_yes_without_activations(
    tmp_path: Path, memory: str, expected: str, fits: bool | None, text: str
) -> None:
    """A parameter count has no activations: never a plain "fits"."""
    body = LLAMA.replace("  preset: llama-3-8b", "  num_parameters: 1e9")
    spec = write(tmp_path, body + f"hardware:\n  memory: {memory}\n")
    doc = json.loads(cli("estimate", str(spec), "--json").stdout)
    assert doc["per_gpu"]["activations_modelled"] is False
    assert doc["hardware"]["verdict"] == expected and doc["hardware"]["fits"] is fits
    out = cli("estimate", str(spec)).stdout
    assert text in out and "\nfits " not in out


def test_deepseek_v3_is_partial(tmp_path: Path) -> None:
    """DeepSeek-V3's activations have no hand rule: without a profile (`--no-trace`, or no
    torch) the verdict is partial. (With torch, estimate traces one: tests/test_auto_trace.py.)"""
    spec = write(
        tmp_path,
        LLAMA.replace("llama-3-8b", "deepseek-v3").replace("data: 8", "data: 1024")
        + "hardware:\n  gpu: H200\n",
    )
    doc = json.loads(cli("estimate", str(spec), "--json", "--no-trace").stdout)
    assert doc["hardware"]["verdict"].startswith("model_states_")
    assert doc["hardware"]["fits"] in (None, False)


def test_plan_refuses_a_model_without_activations() -> None:
    loaded = validate(
        {
            "model": {"preset": "deepseek-v3"},
            "hardware": {"gpu": "H200"},
            "plan": {"gpus": 8},
        }
    )
    with pytest.raises(MemplanError, match="activations are not modelled"):
        plan(loaded.spec, load_inventory(loaded))


def test_plan_uses_estimate_verdict() -> None:
    """Every layout plan ranks is a "fits" for estimate, with the same headroom."""
    loaded = load_spec(ROOT / "configs" / "plan-llama-3-8b.yaml")
    inventory = load_inventory(loaded)
    result = plan(loaded.spec, inventory)
    assert result.layouts
    for c in result.layouts[:3]:
        par = ParallelismSpec(
            engine=c.engine,
            data=c.data,
            zero_stage=c.zero_stage,
            tensor=c.tensor,
            pipeline=c.pipeline,
            context=c.context,
            expert=c.expert,
            sequence_parallel=c.tensor > 1,
            layers_per_stage=c.layers_per_stage,
            schedule="interleaved" if c.virtual_stages > 1 else "1f1b",
            virtual_stages=c.virtual_stages,
            offload={"optimizer": c.offload},
        )
        training = loaded.spec.training.model_copy(
            update={
                "micro_batch_size": c.micro_batch_size,
                "gradient_accumulation_steps": c.gradient_accumulation_steps,
                "activation_checkpointing": c.recompute,
                "compile": c.compile,
            }
        )
        spec = loaded.spec.model_copy(update={"parallelism": par, "training": training})
        report = estimate(spec, inventory)
        assert report.verdict == "fits"
        assert report.peak_bytes == c.peak_bytes
        # plan keeps the timeline's packing bound (issue 20: the allocator replay behind
        # estimate's verdict stays out of plan's search); plan.reserve is 0 here
        assert report.timeline.usable_bytes == c.headroom_bytes


# --- item 9: what a new user met ---------------------------------------------------------------


@pytest.mark.parametrize("preset", ["llama-3-8b", "mixtral-8x7b", "qwen2.5-0.5b"])
def test_tp_hint_lists_only_degrees_that_pass(tmp_path: Path, preset: str) -> None:
    """Every degree the hint offers passes every divisibility check (the hint's own claim,
    checked by running each), and a degree not offered is refused."""
    spec = write(tmp_path, f"model:\n  preset: {preset}\nparallelism:\n  tensor: 3\n")
    result = cli("estimate", str(spec))
    assert result.exit_code == 1
    offered = [
        int(d) for d in result.stderr.split("valid tensor degrees: ")[1].rstrip(".\n").split(", ")
    ]
    for d in (*offered, 16, 32):
        spec = write(tmp_path, f"model:\n  preset: {preset}\nparallelism:\n  tensor: {d}\n")
        code = cli("estimate", str(spec), "--json").exit_code
        assert code == (0 if d in offered else 1), (preset, d, offered)


def test_llama_3_8b_tp_hint_is_what_its_kv_heads_allow(tmp_path: Path) -> None:
    """Llama-3-8B: 32 heads, 8 key/value heads (reference/hf-configs): 1, 2, 4, 8."""
    spec = write(tmp_path, "model:\n  preset: llama-3-8b\nparallelism:\n  tensor: 16\n")
    result = cli("estimate", str(spec))
    assert "16 does not divide num_key_value_heads=8; valid tensor degrees: 1, 2, 4, 8." in (
        result.stderr
    )


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "model:\n  preset: llama-3-8b\ntraining:\n  sequence_length: 2048\n"
        "  micro_batch_size: 1\n  sequence_length: 8192\n",
    )
    result = cli("estimate", str(spec))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{spec}:6: duplicate key 'training.sequence_length' (first at line 4)" in (
        result.stderr
    )


def test_a_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "x-base: &base\n  micro_batch_size: 1\n  sequence_length: 2048\n"
        "model:\n  preset: llama-3-8b\ntraining:\n  <<: *base\n  sequence_length: 4096\n",
    )
    with pytest.raises(MemplanError):  # x-base is not a spec key; the parse itself passes
        load_spec(spec)
    from memplan.config.load import _parse_yaml

    data, _ = _parse_yaml(spec.read_text(), str(spec))
    assert data["training"] == {"micro_batch_size": 1, "sequence_length": 4096}


@pytest.mark.parametrize(("data", "gpn", "ranks"), [(1, 8, 1), (4, 8, 4), (16, 8, 8)])
def test_host_memory_per_node_counts_the_ranks_on_it(
    tmp_path: Path, data: int, gpn: int, ranks: int
) -> None:
    """A one-GPU job's node holds one rank's host memory, not gpus_per_node of them."""
    spec = write(
        tmp_path,
        LLAMA.replace("data: 8", f"data: {data}")
        + f"  offload:\n    optimizer: cpu\nhardware:\n  gpus_per_node: {gpn}\n",
    )
    result = cli("estimate", str(spec), "--json")
    assert result.exit_code == 0, result.output
    host = json.loads(result.stdout)["per_host"]
    assert host["per_rank"] > 0 and host["ranks_per_node"] == ranks
    assert host["total"] == ranks * host["per_rank"]


@pytest.mark.parametrize(
    ("gpu", "mib"),
    [
        # nvidia-smi memory.total of an L40S, 48GB with ECC on (akash-network/provider-configs
        # PR 99, driver 595.71.05): 46068 MiB.
        ("L40S", 46068),
        ("L40", 46068),
        ("A40", 46068),
        ("A6000", 49140),
        ("RTX-A6000", 49140),
        ("H100-NVL", 95830),
        ("H100-96GB", 95830),
    ],
)
def test_the_48gb_cards_and_h100_nvl_are_known(gpu: str, mib: int) -> None:
    loaded = validate({"model": {"preset": "llama-3-8b"}, "hardware": {"gpu": gpu}})
    report = estimate(loaded.spec, load_inventory(loaded))
    assert report.capacity_bytes == mib * 2**20


def test_unknown_gpu_points_at_hardware_memory(tmp_path: Path) -> None:
    spec = write(tmp_path, "model:\n  preset: llama-3-8b\nhardware:\n  gpu: L40X\n")
    result = cli("estimate", str(spec))
    assert result.exit_code == 1
    assert "or give hardware.memory: 48GB" in result.stderr


def test_cpu_run_is_titled_per_process(tmp_path: Path) -> None:
    spec = write(tmp_path, LLAMA + "hardware:\n  device: cpu\n  memory: 512GiB\n")
    out = cli("estimate", str(spec)).stdout
    assert "Memory per process (CPU)" in out and "Memory per GPU" not in out
    assert "of mem" in out and "of GPU" not in out


SHIPPED = ["llama-3-8b", "mixtral-8x7b", "llama-3-8b-qlora"]


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("how", ["--width", "COLUMNS"])
def test_80_columns_break_no_phrase(name: str, how: str) -> None:
    """At 80 columns no line is longer than 80, and the phrases a reader looks for stay whole."""
    args = ["estimate", str(ROOT / "configs" / f"{name}.yaml"), "--explain"]
    if how == "--width":
        result = runner.invoke(app, [*args, "--width", "80"])
    else:
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    doc = json.loads(runner.invoke(app, [*args[:2], "--json"]).stdout)
    from memplan.cli.render import human

    peak = human(doc["per_gpu"]["peak"])
    assert any(line.rstrip().endswith(f"{peak} <- peak") for line in lines)
    assert "What the GPU will show" in result.stdout
    assert "transient at the peak" in result.stdout
    assert "▓ transient" in result.stdout


def test_qlora_header_counts_the_model_as_inventory_does(tmp_path: Path) -> None:
    """QLoRA Llama-2-70B: the header's count is `memplan inventory`'s (an independent command
    that reads the same preset without finetune), and the packed storage is said apart."""
    body = (ROOT / "configs" / "llama-3-8b-qlora.yaml").read_text()
    spec = write(tmp_path, body.replace("llama-3-8b", "llama-2-70b").replace("RTX-4090", "H100"))
    inv = json.loads(runner.invoke(app, ["inventory", str(spec), "--json"]).stdout)
    doc = json.loads(cli("estimate", str(spec), "--json").stdout)
    assert doc["model"]["num_parameters"] == inv["num_parameters"]
    assert doc["model"]["num_stored_elements"] < inv["num_parameters"]  # packed 4-bit
    out = cli("estimate", str(spec)).stdout
    first = out.splitlines()[0]
    assert f"{inv['num_parameters']:,} parameters" in first
    assert f"held as {doc['model']['num_stored_elements']:,} elements" in first
    assert "parameters stored fp32 + uint8" in out and "packed two to a uint8" in out


def test_fsdp2_header_says_the_fp32_masters_are_stored(tmp_path: Path) -> None:
    spec = write(tmp_path, LLAMA.replace("  data: 8", "  engine: fsdp2\n  data: 8"))
    doc = json.loads(cli("estimate", str(spec), "--json").stdout)
    stored = {r["dtype"] for r in doc["per_gpu"]["rows"] if r["category"] == "parameters"}
    assert stored == {"fp32"}  # the table's own rows
    out = cli("estimate", str(spec)).stdout
    assert "bf16-mixed: parameters stored fp32" in out and "compute bf16" in out
    assert "bf16 parameters and gradients" not in out


def test_sequence_beyond_max_positions_is_noted(tmp_path: Path) -> None:
    """Llama-3-8B's config.json says max_position_embeddings 8192 (reference/hf-configs)."""
    spec = write(tmp_path, LLAMA.replace("2048", "1000000000"))
    result = cli("estimate", str(spec), "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert any(
        "sequence_length 1,000,000,000 is beyond the model's max_position_embeddings=8,192" in n
        for n in notes
    )
    ok = json.loads(cli("estimate", str(write(tmp_path, LLAMA)), "--json").stdout)["notes"]
    assert not any("max_position_embeddings" in n for n in ok)


def test_learned_positions_refuse_a_longer_sequence(tmp_path: Path) -> None:
    """GPT-2 learns 1024 positions (wpe [1024, 768]): a longer sequence cannot run."""
    spec = write(tmp_path, "model:\n  preset: gpt2\ntraining:\n  sequence_length: 2048\n")
    result = cli("estimate", str(spec))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{spec}:4: training.sequence_length: 2,048 tokens is beyond" in result.stderr


def test_absurd_sequence_is_refused(tmp_path: Path) -> None:
    """1e14 tokens: the fp32 logits [1e14, 128256] alone are 5.1e19 bytes > 2^63 - 1."""
    spec = write(tmp_path, LLAMA.replace("2048", "100000000000000"))
    result = cli("estimate", str(spec))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "training.sequence_length" in result.stderr
    assert "more than a torch tensor can hold" in result.stderr


def test_plot_title_names_model_and_layout() -> None:
    loaded = validate(
        {
            "model": {"preset": "mixtral-8x7b"},
            "parallelism": {
                "engine": "megatron",
                "data": 4,
                "tensor": 2,
                "pipeline": 2,
                "expert": 2,
                "zero_stage": 1,
            },
        }
    )
    from memplan.cli.render import human
    from memplan.cli.timeline_view import plot_title

    report = estimate(loaded.spec, load_inventory(loaded))
    title = plot_title(report)
    assert title.startswith(f"{report.model.name} ({report.model.num_parameters:,} parameters)")
    assert "megatron ZeRO-1, dp=4 tp=2 pp=2 ep=2" in title
    assert title.endswith(f"peak {human(report.peak_bytes)}")


@pytest.mark.parametrize("name", SHIPPED)
def test_explain_covers_activations_and_transients(name: str) -> None:
    """--explain numbers the activations and transient rows too, with each block's saved
    tensors and each transient's formula and source (as the JSON lists them)."""
    path = str(ROOT / "configs" / f"{name}.yaml")
    doc = json.loads(cli("estimate", path, "--json").stdout)
    out = cli("estimate", path, "--explain", width=400).stdout
    rows = len(doc["per_gpu"]["rows"])
    assert f"activations [{rows + 1}]" in out and f"[{rows + 1}] activations: " in out
    assert f"[{rows + 2}] transient at {doc['timeline']['peak']['label']}: " in out
    peak = next(
        p for p in doc["timeline"]["phases"] if p["phase"] == doc["timeline"]["peak"]["phase"]
    )
    by_name = {t["name"]: t for t in doc["timeline"]["transients"]}
    for t in peak["transients"]:
        assert f"{t} = {by_name[t]['formula']}" in out
        assert f"source: {by_name[t]['source']}" in out
    for b in doc["activations"]["blocks"]:
        if not b["on_host"]:
            assert f"{b['count']} x {b['bytes_each']:,} ({b['name']})" in out
