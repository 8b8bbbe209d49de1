"""FSDP2's buffers for a group whose parameters are not of one dtype (issue 19).

torch 2.13 gathers a parameter in MixedPrecisionPolicy.param_dtype only where that is set and
the parameter is floating point; otherwise in the dtype it is held in, the group's flat
all-gather output holding each parameter's own bytes
(memplan.states.engines.fsdp2.buffers.OWN_DTYPE). benchmarks/fsdp2_own_dtype.py recorded what
torch allocated for such groups on a two-rank fake process group
(benchmarks/results/fsdp2-own-dtype.json); the default run holds memplan's `fsdp2_bytes` to
those measurements, the slow test measures again. Before memplan sized every parameter at the
recipe's width (test_the_recipe_width_alone_was_wrong).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memplan.model.inventory import Inventory, TensorSpec
from memplan.precision import dtype_bytes
from memplan.states.engines.fsdp2 import tp
from memplan.states.engines.fsdp2.buffers import OwnDtypes, fsdp2_bytes
from memplan.states.engines.fsdp2.groups import Fsdp2Group, Fsdp2Groups, _fsdp2_group

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fsdp2-own-dtype.json"
DOC: dict[str, Any] = json.loads(RESULTS.read_text())


def _group(case: dict[str, Any]) -> Fsdp2Group:
    """memplan's group of the case's parameters (a fixed dtype where the case names one)."""
    tensors = [
        TensorSpec(name=n, shape=tuple(s), dtype=d, trainable=t) for n, s, d, t in case["tensors"]
    ]
    return _fsdp2_group(tensors, DOC["world"])


def predicted(case: dict[str, Any]) -> dict[str, int]:
    """memplan's buffers for the case's group, the recipe's dtypes as verify's policy has them
    (the held default; param_dtype where set, else the held default)."""
    held, param, reduce = case["held"], case["param_dtype"], case["reduce_dtype"]
    group = _group(case)
    p = dtype_bytes(param or held)
    out = fsdp2_bytes(
        group,
        DOC["world"],
        p,
        p,
        dtype_bytes(held),
        dtype_bytes(reduce) if reduce else p,
        OwnDtypes(param_dtype=param, reduce_dtype=reduce),
    )
    return {
        "all_gather_output": out.unsharded,
        "unsharded_parameters": out.unsharded,
        "unsharded_gradients": out.grads,
        "reduce_scatter_input": out.reduce_in,
        "reduce_scatter_output": out.reduce_out,
    }


def test_the_stored_run_is_torch_2_13_s() -> None:
    assert DOC["versions"]["torch"].startswith("2.13")
    assert not DOC["dirty"]
    assert len(DOC["cases"]) == 5


@pytest.mark.parametrize("case", DOC["cases"], ids=[c["name"] for c in DOC["cases"]])
def test_buffers_equal_what_torch_allocated(case: dict[str, Any]) -> None:
    assert predicted(case) == case["measured"]


def test_the_recipe_width_alone_was_wrong() -> None:
    """Sized at the recipe's 2 B (what memplan did before OWN_DTYPE): the QLoRA layer's fp32
    adapters' gradients and reduce-scatter input count half, and so does the whole fp32 root
    prepare_model_for_kbit_training leaves."""
    two = dtype_bytes("bf16")
    layer, root = DOC["cases"][0], DOC["cases"][3]
    for case in (layer, root):
        assert case["held"] == "bf16" and case["param_dtype"] is None
    old = {
        c["name"]: fsdp2_bytes(_group(c), DOC["world"], two, two, two, two) for c in (layer, root)
    }
    assert old[layer["name"]].grads * 2 == layer["measured"]["unsharded_gradients"] == 4_096
    assert old[layer["name"]].reduce_in * 2 == layer["measured"]["reduce_scatter_input"]
    assert old[root["name"]].unsharded * 2 == root["measured"]["all_gather_output"]


@pytest.mark.slow
def test_live_measurement_matches_the_stored_one(tmp_path: Path) -> None:
    """benchmarks/fsdp2_own_dtype.py run now (a few seconds: a fake process group)."""
    pytest.importorskip("torch")
    out = tmp_path / "own.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp2_own_dtype.py"), "--out", str(out)],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    live = json.loads(out.read_text())
    assert [c["measured"] for c in live["cases"]] == [c["measured"] for c in DOC["cases"]]
    assert [c["measured"] for c in live["tp_cases"]] == [c["measured"] for c in TP_CASES]
    # torch prints the set of dtypes in no fixed order: compare whether and what it raised.
    raised = [(c["raised"] or "").split(" but got")[0] for c in live["refusals"]]
    assert raised == [(c["raised"] or "").split(" but got")[0] for c in DOC["refusals"]]


# Under tensor parallelism (issue 19): the root's unsharded parameters on FSDP2's one-rank
# data mesh (memplan.states.engines.fsdp2.tp, tp_fsdp2_unsharded_root).


def _tp_root_bytes(case: dict[str, Any], *, own: bool = True) -> int:
    """memplan's tp_fsdp2_unsharded_root for the case's module (its TP-local shapes: dim 0 /
    tensor where sharded), the recipe's widths as verify's policy has them."""
    ways = case["tensor"]
    tensors = [
        TensorSpec(
            name=n,
            shape=(s[0] // ways, *s[1:]) if where == "shard0" else tuple(s),
            dtype=d,
            trainable=t,
        )
        for n, s, d, t, where in case["tensors"]
    ]
    held, param = case["held"], case["param_dtype"]
    groups = Fsdp2Groups(
        root=_fsdp2_group(tensors, 1), block=_fsdp2_group([], 1), layers=0, head_grads=0
    )
    inventory = Inventory(name="case", architecture=None, parameters=tuple(tensors))
    width = dtype_bytes(param or held)
    terms = tp.backward_end(
        inventory,
        groups,
        world=1,
        param=width,
        grad=width,
        own=OwnDtypes(param_dtype=param, reduce_dtype=None) if own else None,
    )
    (root,) = [t.bytes for t in terms if t.name == "tp_fsdp2_unsharded_root"]
    return root


TP_CASES: list[dict[str, Any]] = DOC["tp_cases"]


@pytest.mark.parametrize("case", TP_CASES, ids=[c["name"] for c in TP_CASES])
def test_tp_unsharded_root_equals_what_torch_allocated(case: dict[str, Any]) -> None:
    assert _tp_root_bytes(case) == case["measured"]["unsharded_parameters"]


def test_tp_root_at_the_recipe_width_was_wrong() -> None:
    """Before, fsdp2.tp sized the root at the recipe's 2 B: the fp32 norm and adapters held in
    their own 4 B count half (142,592 B of the 152,064 torch allocated)."""
    case = TP_CASES[0]
    assert case["held"] == "bf16" and case["param_dtype"] is None
    assert _tp_root_bytes(case, own=False) == 142_592 != case["measured"]["unsharded_parameters"]
