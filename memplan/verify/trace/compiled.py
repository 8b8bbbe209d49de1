"""What a torch.compile'd decoder layer saves for backward, read from the graphs Inductor gets.

`compiled_saved` compiles a module with torch.compile's Inductor path up to the point where
Inductor would generate code: torch/_inductor/compile_fx.py::compile_fx (torch 2.13) runs
Inductor's decompositions and joint-graph passes, then AOTAutograd's
min_cut_rematerialization_partition (torch/_functorch/partitioners.py, `compiler="inductor"`),
and hands the forward and backward graphs to `inner_compile`. Here `inner_compile` keeps each
graph and returns it to run as it is (no C++/Triton code is generated, so a CPU build runs it):
the forward graph's outputs after the module's own are exactly the tensors passed from forward
to backward. `eager_saved` counts what the same module saves without compile
(torch.autograd.graph.saved_tensors_hooks), for comparison.

Both run the real module on real CPU tensors, small sequences at the model's full width: every
saved activation is linear in batch x sequence (flash-style attention keeps no S x S tensor),
so `per_token` fits bytes = constant + per_token x tokens over two sizes and checks a third
(the constant: parameters and buffers the backward reads, not activations).

Inductor's fusion of transients is not measured here: the generated kernels' temporaries are
not in these graphs (a fused kernel writes only its outputs), which is what memplan models for
a compiled layer (memplan.model.forward.compiled).

`torchtitan_llama3_block` builds torchtitan's Llama3TransformerBlock (torchtitan 0.3.0,
models/llama3/__init__.py::_build_llama3_layers) with the SDPA inner attention
(models/common/attention.py::ScaledDotProductAttention: cuDNN, flash, math) that the published
2024 runs used (torchtitan 9dec370 called F.scaled_dot_product_attention); 0.3.0 refuses
`attn_backend="sdpa"` for language models (config_utils.py::get_attention_config) and defaults
to FlexAttention, which saves the same q, k, v, output and logsumexp. On a CPU build SDPA runs
`_scaled_dot_product_flash_attention_for_cpu`, which saves what CUDA's flash kernel saves (q,
k, v, output, fp32 logsumexp [b, heads, s]) less the flash kernel's 16-byte philox state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class SavedTensor:
    name: str
    """The forward graph node (compiled) or the autograd node that saved it (eager)."""
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def _dtype(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).removeprefix("torch."))


class _Captured(Exception):
    """Raised in place of running the captured forward graph (`compiled_saved(run=False)`)."""


def compiled_saved(
    module: nn.Module, *inputs: Any, outputs: int = 1, run: bool = False
) -> list[SavedTensor]:
    """The tensors the forward graph of torch.compile(module) (Inductor's partition) passes to
    its backward, for one forward on `inputs`. `outputs`: how many tensors the module returns
    (the forward graph's first outputs). The partition is made when the graph compiles, before
    it runs: `run` also runs the forward graph (slow where CPU kernels are, such as fp8
    `_scaled_mm`), which changes nothing it saves."""
    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def inner_compile(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        graphs.append(gm)
        if run:
            return gm  # run the graph as it is: no code generation

        def stop(*args: Any) -> Any:
            raise _Captured

        return stop

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(module, backend=backend, fullgraph=True)
        with contextlib.suppress(_Captured):
            compiled(*inputs)
    finally:
        torch._dynamo.reset()
    forward = graphs[0]
    (result,) = (n for n in forward.graph.nodes if n.op == "output")
    saved = []
    for node in result.args[0][outputs:]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue  # a SymInt the backward reads
        if not all(isinstance(n, int) for n in value.shape):
            # A data-dependent size: the CPU generator's state (torch.get_rng_state(), uint8)
            # that checkpoint(preserve_rng_state=True) keeps; on CUDA the state checkpoint
            # keeps is the device generator's, in host memory.
            continue
        saved.append(
            SavedTensor(
                name=node.name,
                shape=tuple(value.shape),
                dtype=_dtype(value.dtype),
                nbytes=value.numel() * value.element_size(),
            )
        )
    return saved


def eager_saved(module: nn.Module, *inputs: Any) -> list[SavedTensor]:
    """The storages autograd saves for backward in one eager forward of `module` (parameters
    and buffers included; each storage once)."""
    seen: dict[int, SavedTensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen[key] = SavedTensor(
                name=type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf",
                shape=tuple(t.shape),
                dtype=_dtype(t.dtype),
                nbytes=storage.nbytes(),
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return list(seen.values())


def without_parameters(module: nn.Module, saved: list[SavedTensor]) -> list[SavedTensor]:
    """`saved` less the tensors shaped like one of `module`'s parameters or buffers (the
    weights a matmul's backward reads; RoPE's cache): what the layer adds, its activations."""
    shapes = {tuple(p.shape) for p in module.parameters()} | {
        tuple(b.shape) for b in module.buffers()
    }
    return [s for s in saved if s.shape not in shapes]


@dataclass(frozen=True)
class PerToken:
    per_token: int
    """Activation bytes saved per token (batch x sequence)."""
    constant: int
    """Bytes that do not grow with the tokens (parameters, buffers)."""


def per_token(sizes: list[tuple[int, int]], totals: list[int]) -> PerToken:
    """Fit totals = constant + per_token x b*s on the first two sizes; the others must agree."""
    (b0, s0), (b1, s1) = sizes[:2]
    t0, t1 = b0 * s0, b1 * s1
    slope, rem = divmod(totals[1] - totals[0], t1 - t0)
    fit = PerToken(per_token=slope, constant=totals[0] - slope * t0)
    for (b, s), total in zip(sizes, totals, strict=True):
        if rem or fit.constant + fit.per_token * b * s != total:
            raise ValueError(f"saved bytes {totals} at {sizes} are not linear in b*s")
    return fit


def per_token_tensors(
    small: list[SavedTensor], large: list[SavedTensor], tokens: tuple[int, int]
) -> list[tuple[str, str, int]]:
    """(name, dtype, bytes per token) of each saved tensor that grows with the tokens, from the
    same graph traced at two token counts; the others (parameters, buffers) must not change."""
    if [(s.name, s.dtype) for s in small] != [(s.name, s.dtype) for s in large]:
        raise ValueError("the two traces saved different tensors")
    out = []
    for a, b in zip(small, large, strict=True):
        grown, rem = divmod(b.nbytes - a.nbytes, tokens[1] - tokens[0])
        if rem or a.nbytes != grown * tokens[0] and grown:
            raise ValueError(f"{a.name}: {a.nbytes} -> {b.nbytes} bytes is not per token")
        if grown:
            out.append((a.name, a.dtype, grown))
    return out


def torchtitan_llama3_block(
    *, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, max_seq_len: int = 4096
) -> nn.Module:
    """torchtitan 0.3.0's Llama3TransformerBlock (fused wqkv, ComplexRoPE with llama scaling,
    RMSNorm, SwiGLU) with SDPA attention, in fp32; `bf16_parameters` casts it as FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16) presents it to the forward."""
    from torchtitan.models.common import ComplexRoPE  # type: ignore[import-untyped]
    from torchtitan.models.common.attention import (  # type: ignore[import-untyped]
        ScaledDotProductAttention,
    )
    from torchtitan.models.llama3 import _build_llama3_layers  # type: ignore[import-untyped]

    (config,) = _build_llama3_layers(
        n_layers=1,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        rope=ComplexRoPE.Config(
            dim=dim // n_heads, max_seq_len=max_seq_len, theta=500000, scaling="llama"
        ),
        attn_backend="flex",
    )
    config.attention.inner_attention = ScaledDotProductAttention.Config()
    block: nn.Module = config.build()
    return block


def bf16_parameters(module: nn.Module) -> nn.Module:
    """Parameters in bf16, buffers (RoPE's complex cache) as they are: what the forward sees
    under FSDP2's MixedPrecisionPolicy(param_dtype=bf16), which casts parameters only."""
    for p in module.parameters():
        p.data = p.data.to(torch.bfloat16)
    return module


def torchtitan_qwen3_block(
    *,
    dim: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    hidden_dim: int,
    max_seq_len: int = 4096,
) -> nn.Module:
    """torchtitan 0.3.0's dense Qwen3TransformerBlock (models/qwen3/__init__.py::
    _build_qwen3_layers: fused wqkv, per-head q_norm / k_norm RMSNorm(head_dim, eps 1e-6),
    CosSinRoPE theta 1e6 over an explicit head_dim, SwiGLU) with SDPA attention, in fp32
    (`bf16_parameters` as for `torchtitan_llama3_block`). 0.3.0 refuses `attn_backend="sdpa"`
    for language models (config_utils.py::get_attention_config): the builder's lookup is
    pointed at ScaledDotProductAttention for the call, as tests/torchtitan_probe.py does."""
    import torchtitan.models.qwen3 as qwen3  # type: ignore[import-untyped]
    from torchtitan.models.common import CosSinRoPE  # type: ignore[import-untyped]

    rope = CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=1000000.0)
    with _qwen3_sdpa(qwen3):
        (config,) = qwen3._build_qwen3_layers(
            n_layers=1,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_dim=hidden_dim,
            attn_backend="sdpa",
            rope=rope,
        )
    block: nn.Module = config.build()
    return block


@contextlib.contextmanager
def _qwen3_sdpa(qwen3: Any) -> Iterator[None]:
    """torchtitan 0.3.0's qwen3 builders with their attention lookup pointed at
    ScaledDotProductAttention for the call (config_utils.py::get_attention_config refuses
    `attn_backend="sdpa"` for language models), restored after."""
    from torchtitan.models.common.attention import (  # type: ignore[import-untyped]
        ScaledDotProductAttention,
    )

    original = qwen3.get_attention_config
    qwen3.get_attention_config = lambda backend: ScaledDotProductAttention.Config()
    try:
        yield
    finally:
        qwen3.get_attention_config = original


class TransformersLayer(nn.Module):
    """One transformers decoder layer (LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer,
    ...: `model_type` picks models/<model_type>/modeling_<model_type>.py) with SDPA, called as
    its model calls it: `layer(x, attention_mask=None, position_embeddings=(cos, sin))`. RoPE's
    cos and sin are the model's (made once per forward by its rotary embedding, `rope(x, s)`):
    inputs here, so a trace counts them, [b, s, head_dim] each, and `rope_bytes_per_token`
    says how much of it they are."""

    def __init__(self, model_type: str, dtype: torch.dtype, **config: Any) -> None:
        super().__init__()
        import importlib

        from transformers import AutoConfig

        modeling = importlib.import_module(
            f"transformers.models.{model_type}.modeling_{model_type}"
        )
        prefix = {
            "qwen2": "Qwen2",
            "qwen3": "Qwen3",
            "llama": "Llama",
            "mistral": "Mistral",
            "olmo2": "Olmo2",
        }
        name = prefix[model_type]
        cfg = AutoConfig.for_model(
            model_type, num_hidden_layers=1, attn_implementation="sdpa", **config
        )
        self.layer = getattr(modeling, f"{name}DecoderLayer")(cfg, 0)
        if dtype != torch.float32:
            self.layer.to(dtype)
        self.rotary = getattr(modeling, f"{name}RotaryEmbedding")(cfg)
        self.dtype = dtype
        self.hidden = int(cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        return self.layer(x, attention_mask=None, position_embeddings=(cos, sin))

    def inputs(self, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(b, s, self.hidden, dtype=self.dtype, requires_grad=True)
        cos, sin = self.rotary(x, torch.arange(s)[None].expand(b, s))
        return x, cos, sin

    @property
    def rope_bytes_per_token(self) -> tuple[str, int]:
        """(dtype, bytes per token) of each of cos and sin: the layer's dtype (`cos.to(x.dtype)`)
        or fp32 (OLMo 2's rotary embedding returns them in fp32)."""
        cos, _ = self.inputs(1, 1)[1:]
        return _dtype(cos.dtype), cos.numel() * cos.element_size()


def torchtitan_qwen3_moe_block(
    *,
    dim: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    moe_hidden_dim: int,
    num_experts: int,
    top_k: int,
    routing: str = "seeded",
    cuda_router: bool = False,
    max_seq_len: int = 4096,
) -> nn.Module:
    """torchtitan 0.3.0's Qwen3-MoE TransformerBlock (models/qwen3/__init__.py::
    _build_qwen3_moe_layers: the dense Qwen3 attention above, then models/common/moe.py::MoE
    with a softmax TokenChoiceTopKRouter, route_norm, the fp32 `expert_bias_E` buffer, the
    `standard` token dispatcher, local at expert parallelism 1, and GroupedExperts on
    `torch._grouped_mm`), SDPA attention, in fp32 (`bf16_parameters` as for the dense block),
    parameters initialised by torchtitan's `init_states` under seed 0.

    `routing`: "seeded" (the gate as initialised), "balanced" (torchtitan's own
    `_debug_force_load_balance` round-robin) or "collapsed" (the gate zeroed and the expert
    bias set so that every token goes to experts 0 .. top_k - 1; the others get none).
    `cuda_router`: the gate's `torch.autocast(dtype=float32)` region as CUDA autocast runs it
    (aten/src/ATen/autocast_mode.h::cached_cast: input and weight cast to fp32, then the
    matmul), written out as those casts; CPU autocast disables itself for fp32 (torch 2.13
    torch/amp/autocast_mode.py), so on CPU the gate runs in the parameters' dtype."""
    import torchtitan.models.qwen3 as qwen3
    from torchtitan.models.common import CosSinRoPE

    rope = CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=1000000.0)
    with _qwen3_sdpa(qwen3):
        (config,) = qwen3._build_qwen3_moe_layers(
            n_layers=1,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            moe_hidden_dim=moe_hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            attn_backend="sdpa",
            moe_comm_backend="standard",
            rope=rope,
        )
    torch.manual_seed(0)
    block: Any = config.build()
    block.init_states()
    router: Any = block.moe.router
    if routing == "balanced":
        router._debug_force_load_balance = True
    elif routing == "collapsed":
        with torch.no_grad():
            router.gate.weight.zero_()
            block.moe.expert_bias_E.zero_()
            block.moe.expert_bias_E[:top_k] = 1.0
    elif routing != "seeded":
        raise ValueError(f"routing {routing!r}: seeded, balanced or collapsed")
    if cuda_router:
        gate: Any = router.gate

        def fp32_gate(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x.float(), gate.weight.float())

        gate.forward = fp32_gate
    built: nn.Module = block
    return built
