"""memplan verify on torch.distributed ranks (gloo, CPU): FSDP2 `fully_shard`, plain DDP and
DDP + ZeroRedundancyOptimizer, every rank's local shards against that rank's prediction.

The tiny models have a 1,041-token vocabulary, which neither 2 nor 4 divides, so FSDP2's
padded shards and ZeroRedundancyOptimizer's uneven partition are both exercised.
"""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from tests.test_verify_support import has_family, loaded, model_state_rows_exact, run

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("stage", [3, 2])
def test_fsdp2_every_rank_matches(ranks: int, stage: int) -> None:
    result = run(loaded(parallelism={"engine": "fsdp2", "zero_stage": stage}), nproc=ranks)
    assert len(result.ranks) == ranks
    model_state_rows_exact(result)
    # torch.chunk's split: the last rank holds fewer embedding rows, so fewer state bytes,
    # but the same padded parameter and gradient storage.
    first, last = result.ranks[0], result.ranks[-1]
    assert first.row("parameters").measured == last.row("parameters").measured
    assert first.row("exp_avg").measured > last.row("exp_avg").measured


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_fsdp2_precision(precision: str) -> None:
    """bf16-mixed on FSDP2 is MixedPrecisionPolicy(param_dtype=bf16) over fp32 shards:
    fp32 parameters, gradients and states at rest, no separate master copy."""
    result = run(loaded(precision=precision, parallelism={"engine": "fsdp2"}), nproc=2)
    model_state_rows_exact(result)
    names = {r.name for r in result.headline.rows}
    assert "master_weights" not in names


@pytest.mark.skipif(not has_family("gpt2"), reason="memplan has no gpt2 family yet")
def test_fsdp2_tied_embeddings() -> None:
    result = run(loaded("gpt2", parallelism={"engine": "fsdp2"}), nproc=2)
    model_state_rows_exact(result)


@pytest.mark.parametrize("ranks", [2, 4])
def test_zero_redundancy_optimizer_every_rank_matches(ranks: int) -> None:
    result = run(loaded(parallelism={"engine": "ddp", "zero_stage": 1}), nproc=ranks)
    model_state_rows_exact(result)
    states = [r.row("optimizer_states").measured for r in result.ranks]
    assert len(set(states)) > 1, "whole tensors to the least-loaded rank: uneven states"
    assert result.most_loaded == states.index(max(states))


def test_ddp_replicates_everything() -> None:
    result = run(loaded(precision="bf16-mixed", parallelism={"engine": "ddp"}), nproc=2)
    model_state_rows_exact(result)
    a, b = result.ranks
    assert [r.measured for r in a.rows[:-2]] == [r.measured for r in b.rows[:-2]]


def test_zero_redundancy_keeps_master_weights_whole_on_every_rank() -> None:
    """torch's ZeroRedundancyOptimizer broadcasts every updated tensor from its owner to all
    ranks, so fp32 master weights given to it exist whole on every rank, while their Adam
    states live on the owner only. (This run found memplan's first rule wrong; fixed.)"""
    result = run(
        loaded(precision="bf16-mixed", parallelism={"engine": "ddp", "zero_stage": 1}), nproc=2
    )
    assert result.ok
    for rank in result.ranks:
        row = rank.row("master_weights")
        assert row.measured == row.predicted == rank.row("parameters").measured * 2
        assert rank.row("exp_avg").delta == 0


def test_cuda_ranks_need_gpus() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    with pytest.raises(MemplanError, match="needs 64 GPUs|no CUDA device"):
        run(loaded(parallelism={"engine": "fsdp2"}), nproc=64, device="cuda")


def test_cli_json_lists_every_rank(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from memplan.verify import job as jobs

    monkeypatch.setattr(jobs, "transients_modelled", lambda _report: False)  # peak unchecked

    import yaml
    from typer.testing import CliRunner

    from memplan.cli.app import app
    from tests.test_verify_support import spec_dict

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(parallelism={"engine": "fsdp2", "data": 2})))
    out = CliRunner().invoke(app, ["verify", str(path), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["setup"]["ranks"] == 2 and len(doc["ranks"]) == 2
    assert doc["categories"] == doc["ranks"][doc["rank"]]
    for rank in doc["ranks"]:
        assert rank["gradients"]["delta"] == 0
