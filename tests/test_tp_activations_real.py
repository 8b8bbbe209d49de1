"""memplan's tensor-parallel activation rule against a real torch TP run (2 gloo ranks, CPU).

memplan predicts that a Megatron TP rank saves the single-GPU tensors of the narrower model
(heads / t, key/value heads / t, intermediate / t; memplan/activations/layout.py): the tensors
inside attention and the MLP shrink by t, the norms' tensors and the inputs of the
column-parallel linears stay whole. Here two spawned ranks shard a tiny transformers Llama with
torch's DTensor tensor parallelism (ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down) and
measure, with saved_tensors_hooks, the storages each decoder layer saves
(tests/tp_probe.py). Every layer on every rank matches memplan's `layers` block for
`parallelism: {engine: megatron, tensor: 2}` to the byte, and tensor by tensor (the multiset
of saved storage sizes and dtypes); the unsharded model, measured the same way, matches
`tensor: 1`. The embedding and lm_head are left whole (not vocab-parallel), so only the decoder
layers are compared.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)
try:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.tensor import DTensor  # noqa: F401
    from torch.distributed.tensor.parallel import parallelize_module  # noqa: F401
except ImportError:  # pragma: no cover - old torch
    pytest.skip("DTensor tensor parallelism is unavailable", allow_module_level=True)

from memplan import activations as acts  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from tests.conftest import TINY_LLAMA, make_spec, micro_batch_of  # noqa: E402
from tests.tp_probe import BATCH, COLWISE, PRECISIONS, ROWWISE, SEQ, Case, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow

TP = 2
# hidden 64, intermediate 160 (80 per rank), 4 heads and 2 key/value heads (2 and 1 per rank),
# 2 layers; the 1,041-token vocabulary is never split.
CONFIG: dict[str, Any] = dict(TINY_LLAMA)
CASES = [Case(p, a) for p in PRECISIONS for a in ("eager", "sdpa")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's measurements of every case, from one 2-rank run (index = rank)."""
    return run_ranks(CONFIG, CASES, tmp_path_factory.mktemp("tp"), world=TP)


def predicted(case: Case, tensor: int) -> acts.Block:
    spec = make_spec(
        precision=case.precision,
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "attention": case.attention,
            "dropout": False,
        },
        hardware={"device": "cpu"},
        parallelism={"engine": "megatron", "tensor": tensor},
    )
    saved = micro_batch_of(spec, from_config(CONFIG))
    assert saved.modelled
    block = saved.block("layers")
    assert block is not None and block.count == CONFIG["num_hidden_layers"]
    return block


def layers(run: dict[str, Any]) -> list[list[tuple[int, str]]]:
    """Each decoder layer's saved storages, as sorted (bytes, dtype)."""
    regions = run["regions"]
    return [
        sorted((n, dtype) for n, _, dtype in regions[f"layers.{i}"]["storages"])
        for i in range(CONFIG["num_hidden_layers"])
    ]


def expected(block: acts.Block) -> list[tuple[int, str]]:
    return sorted((t.bytes, t.dtype) for t in block.tensors)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp_rank_layer_matches_memplan(ranks: list[dict[str, Any]], case: Case) -> None:
    block = predicted(case, TP)
    for rank in ranks:
        for layer in layers(rank[case.name]["tp"]):
            assert sum(n for n, _ in layer) == block.bytes_each
            assert layer == expected(block)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unsharded_layer_matches_memplan(ranks: list[dict[str, Any]], case: Case) -> None:
    """The control: the same probe on the unsharded model against `tensor: 1`."""
    block = predicted(case, 1)
    for rank in ranks:
        for layer in layers(rank[case.name]["whole"]):
            assert sum(n for n, _ in layer) == block.bytes_each
            assert layer == expected(block)
    assert predicted(case, TP).bytes_each < block.bytes_each


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp_ranks_run_the_whole_model(ranks: list[dict[str, Any]], case: Case) -> None:
    """The sharded model computes the unsharded one's logits (so each rank's local heads and
    GQA grouping are right without changing the config), its sharded linears saved DTensors
    (counted by their local storage), and the unsharded parts save the same as without TP."""
    n = CONFIG["num_hidden_layers"]
    for rank in ranks:
        result = rank[case.name]
        tp, whole = result["tp"], result["whole"]
        assert result["max_logit_diff"] <= result["tol"]
        # Each sharded linear saves its input and its (transposed) weight shard as DTensors.
        assert tp["dtensor_saves"] == 2 * len(COLWISE + ROWWISE) * n
        assert whole["dtensor_saves"] == 0
        for part in ("embeddings", "rope", "head"):
            assert tp["regions"][part] == whole["regions"][part]
    assert ranks[0][case.name]["tp"]["regions"] == ranks[1][case.name]["tp"]["regions"]


def test_probe_attributes_every_byte() -> None:
    """The probe's regions are disjoint by construction; check the whole-model total of one
    case against the single-GPU prediction (every block), as tests/test_activations does."""
    from tests.tp_probe import forward

    case = Case("fp32", "sdpa")
    run, _ = forward(CONFIG, case, None)
    total = sum(n for r in run.regions.values() for n, _, _ in r.storages)
    spec = make_spec(
        precision="fp32",
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "attention": "sdpa",
            "dropout": False,
        },
        hardware={"device": "cpu"},
    )
    assert total == micro_batch_of(spec, from_config(CONFIG)).bytes
