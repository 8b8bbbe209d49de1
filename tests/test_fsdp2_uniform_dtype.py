"""torch FSDP2 refuses a group whose trainable parameters are held in different dtypes; so does
memplan (memplan.states.engines.fsdp2.uniform, issue 19).

The oracle is torch raising: benchmarks/fsdp2_own_dtype.py ran each REFUSALS module forward
under `fully_shard` on a two-rank fake process group and stored what torch raised
(benchmarks/results/fsdp2-own-dtype.json, "refusals"; the slow test in
tests/test_fsdp2_own_dtype.py runs it again). A spec that puts peft's fp32 adapters beside
bf16 trainable biases in one decoder layer is refused with one paragraph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec
from memplan.states.engines.fsdp2.uniform import check_uniform_dtype, mixed_trainable

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = json.loads(
    (ROOT / "benchmarks" / "results" / "fsdp2-own-dtype.json").read_text()
)
REFUSALS: list[dict[str, Any]] = DOC["refusals"]


def _layer(case: dict[str, Any]) -> Inventory:
    """The case's module as one decoder layer of an inventory."""
    tensors = tuple(
        TensorSpec(name=n, shape=tuple(s), dtype=d, trainable=t, layer=0)
        for n, s, d, t in case["tensors"]
    )
    return Inventory(name=case["name"], architecture=None, parameters=tensors)


def test_torch_refused_one_case_and_ran_the_other() -> None:
    assert [c["raised"] is not None for c in REFUSALS] == [True, False]
    assert REFUSALS[0]["raised"].startswith("FSDP expects uniform original parameter dtype")


@pytest.mark.parametrize("case", REFUSALS, ids=[c["name"] for c in REFUSALS])
def test_memplan_refuses_what_torch_refused(case: dict[str, Any]) -> None:
    inventory = _layer(case)
    assert bool(mixed_trainable(inventory.parameters, case["held"])) == bool(case["raised"])
    if case["raised"]:
        with pytest.raises(MemplanError, match="decoder layer 0: bias in bf16 and lora_A in fp32"):
            check_uniform_dtype(inventory, held=case["held"], wrap="layers", experts=False)
    else:
        check_uniform_dtype(inventory, held=case["held"], wrap="layers", experts=False)


def test_a_fp32_master_holds_every_parameter_in_one_dtype() -> None:
    """Under a *-mixed recipe FSDP2 holds the module in fp32 (the held default), and the
    adapters' fp32 is that dtype: one dtype, no refusal."""
    check_uniform_dtype(_layer(REFUSALS[0]), held="fp32", wrap="layers", experts=False)


def _spec(tmp_path: Path, **finetune: Any) -> Path:
    spec = {
        "model": {"preset": "qwen2.5-0.5b"},
        "precision": "bf16",
        "optimizer": {"name": "adamw"},
        "finetune": {"method": "lora", **finetune},
        "training": {"micro_batch_size": 1, "sequence_length": 256},
        "parallelism": {"engine": "fsdp2", "data": 2},
        "hardware": {"gpu": "H100-80GB"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_estimate_refuses_trainable_biases_beside_fp32_adapters(tmp_path: Path) -> None:
    """Qwen2.5's q/k/v biases trained (finetune.bias: all) in bf16 beside peft's fp32 LoRA
    adapters, in each decoder layer's group: one error paragraph, exit 1, no traceback."""
    result = CliRunner().invoke(app, ["estimate", str(_spec(tmp_path, bias="all"))])
    assert result.exit_code == 1, result.stdout
    err = " ".join(result.stderr.split())
    assert "parallelism.engine: fsdp2 puts trainable parameters held in different" in err
    assert "q_proj.base_layer.bias in bf16 and" in err and "lora_A.default.weight in fp32" in err
    assert "FSDPParamGroup._init_mp_dtypes" in err and "Traceback" not in result.stderr


def test_estimate_runs_with_the_biases_frozen(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["estimate", str(_spec(tmp_path)), "--json"])
    assert result.exit_code == 0, result.stderr
