"""verify's saved-tensor measurement (memplan.verify.measure.SavedTensors) when the forward drops
a node that saved a tensor: the activations are the storages the graph holds when the backward
starts, each once, whatever address a freed storage leaves to a later one.

A saved tensor whose node the forward drops (a branch the loss does not reach: the chunked delta
rule's final recurrent state in qwen3_5_text / qwen3_next, the router's group selection in
glm4_moe) is freed mid-forward, and its address may be handed out again to a later saved
storage (CPU malloc hands a freed block of the same size out again). The old measurement keyed
storages by address alone, so it counted the dropped storage and missed the later one, and its
identity pack hook (`lambda t: t`) kept the outputs such nodes save alive in a reference cycle
(output -> grad_fn -> saved output), so what it measured depended on where malloc put things
(qwen3_5_text fp32: 76,771,844 / 77,820,420 / 78,868,996 B over runs of one setting).

The oracle is the autograd graph itself: every `_saved_*` tensor of every node reachable from
the loss (torch's generated nodes expose them), each storage once, parameters left out; it
shares nothing with measure.py's bookkeeping. Python numbers an op wraps into 0-dim tensors
(`x * 0.5`) are saved by torch without calling the pack hook (a CPU scalar, 8 B): the oracle
lists them apart.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from memplan.verify import measure

D = 4096
"""fp32 elements per row: 16 KiB blocks, which glibc's malloc hands out again after a free."""


def graph_saved(loss: torch.Tensor, model: nn.Module) -> tuple[dict[int, int], dict[int, int]]:
    """The storages the graph reachable from `loss` holds for backward (data pointer -> bytes),
    parameters and buffers left out; and apart, the wrapped Python numbers (0-dim float64 /
    int64 tensors, which torch saves without the pack hook)."""
    states = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    wrapped: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values: list[Any] = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                values.extend(value if isinstance(value, (tuple, list)) else [value])
        values.extend(getattr(node, "saved_tensors", ()))  # a custom Function's ctx
        for t in values:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in states:
                continue
            number = t.dim() == 0 and t.dtype in (torch.float64, torch.int64)
            (wrapped if number else saved)[ptr] = storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return saved, wrapped


class Block(nn.Module):
    """A branch whose output the forward drops (ExpBackward0 saves its own output), then a
    tensor of the same size saved by nodes the loss reaches: malloc hands the dropped output's
    block to it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        self.dropped: list[int] = []
        """The data pointer of each dropped output, in the order made."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.exp(x)  # saved by its node, which nothing downstream reaches
        self.dropped.append(side.data_ptr())
        del side  # the node and its saved output freed (unless a reference cycle holds them)
        kept = torch.exp(x)  # the freed block, handed out again
        return self.lin(kept) * kept  # type: ignore[no-any-return]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x.sum()


def _measure(model: Model) -> tuple[measure.SavedTensors, torch.Tensor]:
    x = torch.randn(1, D, requires_grad=True)
    record = measure.SavedTensors()
    with measure.saved_tensors(record, model, model.layers):
        loss = model(x)
    return record, loss


def test_a_dropped_node_s_storage_is_not_counted_and_its_address_is_free() -> None:
    """Each run measures what the graph holds at the backward's start (per block: the kept
    exp's output, which the Linear and the product read too, and the Linear's output; exp
    saves its output, not its input), every run the same bytes; the dropped outputs' blocks are
    taken by the kept outputs (malloc reuse, seen at least once), which the old measurement
    counted once at the dropped storage's place and, with its identity pack hook, not at all
    (the dropped outputs stayed alive in their cycle: 2 x 16 KiB over)."""
    model = Model()
    got = []
    reused = 0
    # Every run checks the count; whether malloc hands a dropped block out again is the
    # allocator's choice (seen in most runs, not all: one fresh CI venv saw none in 5), so
    # up to 50 runs are made until it does; Forced below reuses an address deterministically.
    for _ in range(50):
        if len(got) >= 5 and reused:
            break
        record, loss = _measure(model)
        saved, wrapped = graph_saved(loss, model)
        assert not wrapped
        assert record.bytes == sum(saved.values())
        assert record.layer_bytes == record.bytes  # every save is inside a block
        kept = [b.dropped[-1] for b in model.layers]
        reused += sum(1 for ptr in kept if ptr in saved)
        got.append(record.bytes)
        loss.backward()
        model.zero_grad(set_to_none=True)
    assert got == [got[0]] * len(got)
    assert got[0] == 2 * 2 * D * 4  # 2 blocks x 2 fp32 rows of D
    if not reused:
        pytest.skip(
            f"malloc never handed a dropped output's block out again in {len(got)} runs: the "
            "count held, the reuse went untested here (Forced's test reuses an address on "
            "purpose)"
        )


class Forced(nn.Module):
    """Address reuse forced, with storages of different sizes: two tensors made by
    torch.frombuffer over one bytearray are two storages at one address. The first (4 KiB) is
    saved by a node the forward drops; the second (16 KiB) by a node the loss reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray(4 * D)
        self.addresses: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer: a writable buffer (not written here)
            small = torch.frombuffer(self.buffer, dtype=torch.float32, count=D // 4)
            side = small * x[: D // 4]  # saves `small` (x's gradient)
            self.addresses.append(small.untyped_storage().data_ptr())
            del side, small  # the node dropped: the 4 KiB storage freed, its address free
            big = torch.frombuffer(self.buffer, dtype=torch.float32, count=D)
        self.addresses.append(big.untyped_storage().data_ptr())
        return (big * x).sum()


def test_a_storage_at_a_freed_storage_s_address_is_a_new_storage() -> None:
    """The 16 KiB storage the loss's graph holds is counted, the dropped 4 KiB one is not (the
    old measurement: 4 KiB, the dropped storage's, and the live one taken for it)."""
    model = Forced()
    layers = nn.ModuleList([model])
    for _ in range(3):
        x = torch.randn(D, requires_grad=True)
        record = measure.SavedTensors()
        with measure.saved_tensors(record, model, layers):
            loss = model(x)
        assert model.addresses[-2] == model.addresses[-1]  # one address, two storages
        saved, _ = graph_saved(loss, model)
        assert saved == {model.addresses[-1]: 4 * D}
        assert record.bytes == record.layer_bytes == 4 * D


def test_the_measurement_holds_no_saved_tensor_alive() -> None:
    """With the recording hooks on, a dropped node's saved output is freed as without them
    (the identity pack hook held it in a cycle): a weak reference to it dies at `del`."""
    import weakref

    x = torch.randn(D, requires_grad=True)
    record = measure.SavedTensors()
    with measure.saved_tensors(record, nn.Module(), None):
        side = torch.exp(x)
        ref = weakref.ref(side.untyped_storage())
        del side
        assert ref() is None
        kept = torch.exp(x)
    assert record.bytes == kept.untyped_storage().nbytes()


TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}
"""benchmarks/profile_verify.py's tiny config (BASE, MOE)."""
MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_type", "extra", "dtype"),
    [
        ("qwen3_5_text", {}, torch.float32),
        ("glm4_moe", {**MOE, "first_k_dense_replace": 0}, torch.bfloat16),
    ],
)
def test_real_models_that_drop_saving_nodes(
    model_type: str, extra: dict[str, Any], dtype: torch.dtype
) -> None:
    """The tiny configs of benchmarks/profile_verify.py whose forward drops saving nodes
    (qwen3_5_text: the chunked delta rule's final state; glm4_moe: the router's group
    selection): the measurement is the graph's saved storages (wrapped Python numbers aside:
    torch saves them without the hook), and the profile trace, under FakeTensorMode at the
    same batch, counts the same bytes (memplan/verify/trace/forward.py::trace_once: that
    agreement pins one definition in both, it is not an independent oracle)."""
    transformers = pytest.importorskip("transformers")
    from memplan.verify.trace import forward as trace_forward

    transformers.logging.set_verbosity_error()
    config = {"model_type": model_type, **TINY, **extra}
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=dtype, attn_implementation="eager"
    )
    model.train()
    ids = torch.randint(0, 512, (2, 32))
    layers = model.model.layers
    got = []
    for _ in range(2):
        record = measure.SavedTensors()
        with measure.saved_tensors(record, model, layers):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        saved, _wrapped = graph_saved(loss, model)
        assert record.bytes == sum(saved.values())
        got.append(record.bytes)
        del loss
    assert got[0] == got[1]

    stream = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    fake, mode = trace_forward.build_fake(
        config, stream=stream, attention="eager", checkpointing="none"
    )
    records = trace_forward.trace_once(
        fake, mode, batch=2, sequence=32, autocast=None, layer_count=2
    )
    size = {"fp32": 4, "bf16": 2, "int64": 8, "int32": 4, "bool": 1}
    assert sum(r.numel * size[r.dtype] for r in records) == got[0]
