"""memplan's sequence-parallel activation rule against a real torch TP + SP run (2 gloo ranks).

memplan's rule (memplan/activations/layout.py::split) is Megatron-LM's: with
sequence_parallel the tensors TP leaves whole are saved sequence-sharded, [b, s / t, h]: the
norms' tensors and also the inputs of the column-parallel linears, because Megatron's
ColumnParallelLinear saves its local sequence shard and all-gathers it again in backward
(megatron/core/tensor_parallel/layers.py::LinearWithGradAccumulationAndAsyncCommunication).

torch's DTensor sequence parallelism, as torchtitan applies it (tests/tp_sp_probe.py), does the
all-gather as a separate op before the linears: `PrepareModuleInput(Shard(1) -> Replicate())`
on self_attn and mlp redistributes the norm's output (an all-gather), and `ColwiseParallel`'s
linear then saves that Replicate DTensor, whose local tensor is the whole sequence
(torch/distributed/tensor/parallel/style.py: PrepareModuleInput._prepare_input_arg ->
DTensor.redistribute; ColwiseParallel._prepare_input_fn keeps a Replicate input as it is;
SequenceParallel runs the norms on the Shard(1) DTensor). So a torch TP + SP rank saves exactly
memplan's SP prediction except the column-parallel linears' inputs, which keep their TP-only
(full-sequence) shape:

- fp32 / bf16: `self_attn.q_proj.input` (shared by q/k/v) and `mlp.gate_proj.input` (shared
  by gate/up), each b * s * h elements instead of b * s / t * h;
- amp-bf16: autocast casts the gathered fp32 input once per linear, so `self_attn.{q,k,v}_proj
  .input` and `mlp.{gate,up}_proj.input` (bf16), five full-sequence copies.

Everything else (norm tensors sequence-sharded, attention and MLP interiors head/intermediate
sharded, the row-parallel linears' inputs, the autocast weight casts) matches memplan to the
byte. The tests assert the measured layout against that explicit expectation: memplan's
`parallelism: {engine: megatron, tensor: 2, sequence_parallel: true}` `layers` block with the
column-parallel inputs taken from the `tensor: 2` (no SP) block, i.e.
measured == sp.bytes_each + extra, extra = sum of (tp - sp) bytes of those inputs.
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
    from torch.distributed.tensor.parallel import (  # noqa: F401
        PrepareModuleInput,
        SequenceParallel,
        parallelize_module,
    )
except ImportError:  # pragma: no cover - old torch
    pytest.skip("DTensor tensor/sequence parallelism is unavailable", allow_module_level=True)

from memplan import activations as acts  # noqa: E402
from memplan.model.sources import from_config  # noqa: E402
from tests.conftest import TINY_LLAMA, make_spec, micro_batch_of  # noqa: E402
from tests.tp_probe import BATCH, COLWISE, PRECISIONS, SEQ, Case  # noqa: E402
from tests.tp_sp_probe import NORMS, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow

TP = 2
CONFIG: dict[str, Any] = dict(TINY_LLAMA)
HIDDEN = CONFIG["hidden_size"]
CASES = [Case(p, a) for p in PRECISIONS for a in ("eager", "sdpa")]

TORCH_KEEPS_WHOLE = tuple(f"{name}.input" for name in COLWISE)
"""memplan tensors torch's SP saves with the whole sequence (those the block has: without
autocast q/k/v and gate/up share one input storage, named after q_proj and gate_proj)."""

# Per case: which of TORCH_KEEPS_WHOLE memplan's block lists, and their dtype's width.
DIFFERING: dict[str, tuple[tuple[str, ...], int]] = {
    "fp32": (("self_attn.q_proj.input", "mlp.gate_proj.input"), 4),
    "bf16": (("self_attn.q_proj.input", "mlp.gate_proj.input"), 2),
    "amp-bf16": (TORCH_KEEPS_WHOLE, 2),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's measurements of every case, from one 2-rank run (index = rank)."""
    return run_ranks(CONFIG, CASES, tmp_path_factory.mktemp("tp_sp"), world=TP)


def predicted(case: Case, sequence_parallel: bool, engine: str = "megatron") -> acts.Block:
    spec = make_spec(
        precision=case.precision,
        training={
            "micro_batch_size": BATCH,
            "sequence_length": SEQ,
            "attention": case.attention,
            "dropout": False,
        },
        hardware={"device": "cpu"},
        parallelism={"engine": engine, "tensor": TP, "sequence_parallel": sequence_parallel},
    )
    saved = micro_batch_of(spec, from_config(CONFIG))
    assert saved.modelled
    block = saved.block("layers")
    assert block is not None and block.count == CONFIG["num_hidden_layers"]
    return block


def torch_expectation(case: Case) -> tuple[list[tuple[int, str]], int]:
    """memplan's SP block with the column-parallel inputs at their TP-only (whole-sequence)
    size: the sorted (bytes, dtype) torch saves, and the extra bytes over memplan's SP block."""
    sp, tp = predicted(case, True), predicted(case, False)
    whole = {t.name: t for t in tp.tensors}
    tensors = [whole[t.name] if t.name in TORCH_KEEPS_WHOLE else t for t in sp.tensors]
    extra = sum(t.bytes for t in tensors) - sp.bytes_each
    return sorted((t.bytes, t.dtype) for t in tensors), extra


def layers(run: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [run["regions"][f"layers.{i}"] for i in range(CONFIG["num_hidden_layers"])]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sp_rank_layer_is_memplan_sp_plus_whole_linear_inputs(
    ranks: list[dict[str, Any]], case: Case
) -> None:
    sp = predicted(case, True)
    expected, extra = torch_expectation(case)
    names, width = DIFFERING[case.precision]
    # The documented difference, by name and size: each differing input is [b * s, h] in
    # torch and [b * s / t, h] in memplan (Megatron).
    assert [t.name for t in sp.tensors if t.name in TORCH_KEEPS_WHOLE] == list(names)
    assert extra == len(names) * BATCH * (SEQ - SEQ // TP) * HIDDEN * width
    for rank in ranks:
        for layer in layers(rank[case.name]["sp"]):
            measured = sorted((s["bytes"], s["dtype"]) for s in layer)
            assert sum(n for n, _ in measured) == sp.bytes_each + extra
            assert measured == expected
    # memplan's SP rule alone undercounts torch's SP by exactly `extra` per layer.
    assert sp.bytes_each < sum(n for n, _ in expected)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sp_rank_saves_whole_sequence_linear_inputs(
    ranks: list[dict[str, Any]], case: Case
) -> None:
    """Where the difference comes from, storage by storage: the column-parallel linears' mm
    saves the all-gathered [b * s, h] input; the norms save [b, s / t, ...] shards."""
    names, width = DIFFERING[case.precision]
    for rank in ranks:
        for layer in layers(rank[case.name]["sp"]):
            inputs = [
                s
                for s in layer
                if s["module"] in COLWISE and "MmBackward0._saved_self" in s["saved_by"]
            ]
            assert len(inputs) == len(names)
            for s in inputs:
                assert s["shape"] == [BATCH * SEQ, HIDDEN]
                assert s["bytes"] == BATCH * SEQ * HIDDEN * width
            norms = [s for s in layer if s["module"] in NORMS]
            assert len(norms) == 2 * 3  # input (fp32), rstd, normalized
            assert all(s["shape"][:2] == [BATCH, SEQ // TP] for s in norms)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sp_ranks_run_the_whole_model(ranks: list[dict[str, Any]], case: Case) -> None:
    """The TP + SP model computes the unsharded one's logits, saves DTensors, and its
    embeddings and RoPE tables (left whole) save what the unsharded model saves."""
    for rank in ranks:
        result = rank[case.name]
        sp = result["sp"]
        assert result["max_logit_diff"] <= result["tol"]
        assert sp["dtensor_saves"] > 0
        for part in ("embeddings", "rope"):
            assert sum(s["bytes"] for s in sp["regions"][part]) == result["whole_bytes"][part]
    assert ranks[0][case.name]["sp"]["regions"] == ranks[1][case.name]["sp"]["regions"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sp_rank_layer_is_memplans_torch_rule(ranks: list[dict[str, Any]], case: Case) -> None:
    """With engine fsdp2 (torch's DTensor tensor parallelism, as torchtitan composes it)
    memplan applies torch's rule, whole-sequence linear inputs, and predicts every decoder
    layer of every rank to the byte, tensor by tensor."""
    torch_rule = predicted(case, True, engine="fsdp2")
    expected = sorted((t.bytes, t.dtype) for t in torch_rule.tensors)
    for rank in ranks:
        for layer in layers(rank[case.name]["sp"]):
            assert sorted((s["bytes"], s["dtype"]) for s in layer) == expected
    assert torch_rule.bytes_each == sum(n for n, _ in torch_expectation(case)[0])
