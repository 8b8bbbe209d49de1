"""Parameters that require grad but get no gradient from the loss (TensorSpec.gradient False):
DeepSeek-V3.2's DSA indexer, whose forward transformers 5.25 runs under `@torch.no_grad`.

Oracle: the tiny DeepSeek-V3.2 of benchmarks/profile_verify.py built by transformers on CPU with
real tensors, one forward + loss + backward, and torch's own AdamW step: the parameters whose
`.grad` is None, and those AdamW keeps no state for, against what memplan's inventory (one fake
forward + backward, memplan.verify.trace.gradients) marks.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from memplan.errors import MemplanError
from memplan.model import stored
from memplan.model.inventory import Architecture, Inventory, TensorSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.profile_verify import TYPES  # noqa: E402


def _real_run() -> tuple[set[str], set[str], list[str]]:
    """(parameters with `.grad` None after one backward, parameters AdamW holds no state for
    after one step, every parameter name), on real CPU tensors."""
    config = TYPES["deepseek_v32"]
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model("deepseek_v32", **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    no_state = {n for n, p in model.named_parameters() if not opt.state.get(p)}
    return no_grad, no_state, [n for n, _ in model.named_parameters()]


def test_the_inventory_marks_the_parameters_a_real_backward_leaves_without_grad() -> None:
    from memplan.verify.trace.meta import inventory_from_config

    no_grad, no_state, names = _real_run()
    assert no_grad and all(".indexer." in n for n in no_grad)
    assert len(no_grad) == 10  # wq_b, wk, k_norm weight and bias, weights_proj; 2 layers
    assert no_state == no_grad  # torch AdamW: state only where p.grad is not None
    inventory = inventory_from_config(copy.deepcopy(TYPES["deepseek_v32"]))
    assert [t.name for t in inventory.parameters] == names
    assert {t.name for t in inventory.parameters if not t.gradient} == no_grad
    assert any("get no gradient from the loss" in note for note in inventory.notes)


def _inventory(**flags: Any) -> Inventory:
    arch = Architecture(model_type="m", hidden_size=4, num_layers=1, vocab_size=8)
    params = (
        TensorSpec("a.weight", (4, 4)),
        TensorSpec("b.weight", (4,), gradient=False, **flags),
    )
    return Inventory(name="m", architecture=arch, parameters=params)


def test_stored_rows_keep_the_flag_and_read_old_rows_as_graded() -> None:
    """Pins behaviour: the eighth entry is written only where a tensor gets no gradient, and
    a seven-entry row (documents written before it) reads as `gradient` True."""
    doc = stored.to_document(_inventory(), config_hash="0" * 64, versions={})
    assert [len(r) for r in doc["parameters"]] == [7, 8]
    back = stored.from_document(doc, origin="t")
    assert [t.gradient for t in back.parameters] == [True, False]
    doc["parameters"][1] = doc["parameters"][1][:7]
    assert stored.from_document(doc, origin="t").parameters[1].gradient
    doc["parameters"][1] = [*doc["parameters"][1], False, 1]
    with pytest.raises(MemplanError, match="not a memplan stored inventory"):
        stored.from_document(doc, origin="t")


def test_shipped_deepseek_v32_inventory_carries_the_flag() -> None:
    """The shipped DeepSeek-V3.2 inventory (memplan/model/profiles) marks the 5 indexer tensors
    of each of its 61 layers, and nothing else."""
    import json

    from memplan.model.load import PRESET_DIR, find_inventory

    config = json.loads((PRESET_DIR / "deepseek-v3.2.json").read_text())
    inventory = find_inventory(config)
    assert inventory is not None
    marked = [t.name for t in inventory.parameters if not t.gradient]
    assert len(marked) == 5 * 61 and all(".self_attn.indexer." in n for n in marked)


# -- engines (pinning tests: the real run's side is benchmarks/profile_verify.py's DDP rows) --


def _rows(states: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in states.terms:
        out[t.name] = out.get(t.name, 0) + t.bytes
    return out


def _engine_inputs(recipe_name: str) -> tuple[Inventory, Inventory, Any, Any]:
    """(the inventory with b.weight unreached, the same with b.weight left out of training
    entirely, the recipe, AdamW)."""
    from dataclasses import replace

    from memplan.optimizers import OptimizerConfig
    from memplan.precision import PRESETS

    inv = _inventory()
    frozen = replace(
        inv, parameters=tuple(replace(t, trainable=t.gradient) for t in inv.parameters)
    )
    return inv, frozen, PRESETS[recipe_name], OptimizerConfig(name="adamw")


@pytest.mark.parametrize("recipe_name", ["bf16", "bf16-mixed"])
def test_ddp_counts_no_gradient_and_no_state_but_the_master_copy(recipe_name: str) -> None:
    """Pins behaviour: under DDP an unreached parameter has the rows of a frozen one (no
    gradient, no exp_avg / exp_avg_sq / step), but the fp32 master copy the mixed-precision
    wrapper makes of every parameter it is given (memplan/verify/build.py) stays."""
    from memplan.states.engines import ddp
    from memplan.states.layout import Layout

    inv, frozen, recipe, opt = _engine_inputs(recipe_name)
    layout = Layout(data=2)
    got = _rows(ddp.replicated(inv, recipe, opt, layout, 2)[0])
    want = _rows(ddp.replicated(frozen, recipe, opt, layout, 2)[0])
    if recipe.master_weights:
        assert got.pop("master_weights") == want.pop("master_weights") + 4 * 4  # b.weight fp32
    assert got == want
    zero = [_rows(s) for s in ddp.zero_redundancy(inv, recipe, opt, layout, 2)]
    assert sum(r.get("exp_avg", 0) for r in zero) == want["exp_avg"]


def test_fsdp2_drops_the_gradient_and_state_shards_deepspeed_keeps_them() -> None:
    """Pins behaviour: FSDP2 (per-parameter shards) gives an unreached parameter the rows of a
    frozen one; DeepSpeed ZeRO-2's flat buffers keep its gradient and state bytes, as if the
    loss reached it (stage_1_and_2.py::get_flat_partition fills a None grad with zeros)."""
    from dataclasses import replace

    from memplan.states.engines.deepspeed import sharding as deepspeed
    from memplan.states.engines.fsdp2 import sharding as fsdp2
    from memplan.states.layout import Layout

    inv, frozen, recipe, opt = _engine_inputs("bf16")
    layout = Layout(engine="fsdp2", data=2)
    assert [_rows(s) for s in fsdp2.fsdp2(inv, recipe, opt, layout, 2)] == [
        _rows(s) for s in fsdp2.fsdp2(frozen, recipe, opt, layout, 2)
    ]
    graded = replace(inv, parameters=tuple(replace(t, gradient=True) for t in inv.parameters))
    layout = Layout(engine="deepspeed", stage=2, data=2)
    rule = deepspeed.stage12(2)
    assert [_rows(s) for s in rule(inv, recipe, opt, layout, 2)] == [
        _rows(s) for s in rule(graded, recipe, opt, layout, 2)
    ]
