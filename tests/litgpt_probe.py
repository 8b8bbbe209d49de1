"""Measure what LitGPT's own GPT holds for backward after forward + its loss (CPU).

Used by tests/test_litgpt_activations.py and benchmarks/litgpt_activations.py. Builds
litgpt 0.5.9's `litgpt.model.GPT` from a `litgpt.Config` of the Llama shape (RMSNorm,
LLaMAMLP, fused `qkv`, no biases, sequential residual: the fields of litgpt/config.py's
Llama 3 entries) and runs it the way litgpt's training scripts do:

- under Lightning Fabric's own precision plugin on CPU (`L.Fabric(accelerator="cpu",
  precision=...)`: "32-true", "bf16-true" = the model cast to bf16, buffers included
  (plugins/precision/half.py::HalfPrecision.convert_module), "bf16-mixed" = torch.autocast over
  the fp32 model (plugins/precision/amp.py::MixedPrecision.forward_context)); `fabric.setup`
  wraps the model in `_FabricModule`, whose forward casts the output to fp32
  (precision `convert_output`: the logits' fp32 copy);
- with LitGPT's recomputation, `FSDPStrategy(activation_checkpointing_policy={Block})` as
  finetune/full.py sets it, applied by Lightning's own `_setup_activation_checkpointing`
  (lightning/fabric/strategies/fsdp.py: torch's `checkpoint_wrapper` around every `Block`,
  non-reentrant), without the FSDP sharding (one process);
- the loss as pretrain.py::fit computes it: `chunked_cross_entropy(logits, targets)` with its
  default chunk_size=128 (litgpt/utils.py), targets a separate [B, T] tensor.

What is held is measured as tests/torchtitan_probe.py does: a TorchDispatchMode records the
storage of every tensor an op returns during forward + loss; the storages still alive
afterwards are what the forward holds, deduplicated by address. Excluded: parameters and
buffers (the RoPE `cos`/`sin` caches that RoPE's multiplies save are buffers), the loss value,
the logits (the model output and its fp32 copy, dropped before the measure: memplan counts
them as `logits_bytes` / `upcast_bytes`). Added: the token ids and targets, which the embedding
and nll_loss save (they exist before the forward). Not seen: the CPU RNG state the checkpoint
wrapper stashes per block (made outside the dispatcher).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from tests.torchtitan_probe import _Made

DIM, HEADS, KV_HEADS, FFN, VOCAB, BATCH, SEQ = 64, 4, 2, 192, 256, 2, 16
PRECISION = {"fp32": "32-true", "bf16": "bf16-true", "amp-bf16": "bf16-mixed"}
"""memplan's precision recipe -> Lightning Fabric's `precision` argument."""


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    batch: int = BATCH
    seq: int = SEQ
    dim: int = DIM
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    ffn: int = FFN
    vocab: int = VOCAB
    arch: str = "llama"
    """A key of ARCHS: which of litgpt/config.py's architectures the tiny model mirrors."""
    head_size: int | None = None
    """litgpt's `head_size` when it is not n_embd // n_head (Gemma 7B: 256 x 16 > 3072)."""


LLAMA31_8B = Shape(
    layers=2, batch=1, seq=8192, dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256
)
"""Two blocks of Llama 3.1 8B (litgpt/config.py "Llama-3.1-8B{}") at 1 x 8192 (fake tensors)."""

AT_SCALE = {
    "qwen2.5": Shape(
        arch="qwen2.5",
        layers=2,
        batch=1,
        seq=4096,
        dim=3584,
        heads=28,
        kv_heads=4,
        ffn=18944,
        vocab=152064,
    ),
    "mistral": Shape(
        arch="mistral",
        layers=2,
        batch=1,
        seq=4096,
        dim=4096,
        heads=32,
        kv_heads=8,
        ffn=14336,
        vocab=32000,
    ),
    "phi-3": Shape(
        arch="phi-3",
        layers=2,
        batch=1,
        seq=4096,
        dim=3072,
        heads=32,
        kv_heads=32,
        ffn=8192,
        vocab=32064,
    ),
    "gemma": Shape(
        arch="gemma",
        layers=2,
        batch=1,
        seq=4096,
        dim=3072,
        heads=16,
        kv_heads=16,
        ffn=24576,
        vocab=256000,
        head_size=256,
    ),
    "pythia": Shape(
        arch="pythia",
        layers=2,
        batch=1,
        seq=2048,
        dim=2048,
        heads=8,
        kv_heads=8,
        ffn=8192,
        vocab=50304,
    ),
    "falcon-7b": Shape(
        arch="falcon-7b",
        layers=2,
        batch=1,
        seq=2048,
        dim=4544,
        heads=71,
        kv_heads=1,
        ffn=18176,
        vocab=65024,
    ),
    "gemma-2": Shape(
        arch="gemma-2",
        layers=2,
        batch=1,
        seq=4096,
        dim=3584,
        heads=16,
        kv_heads=8,
        ffn=14336,
        vocab=256000,
        head_size=256,
    ),
    "phi-2": Shape(
        arch="phi-2",
        layers=2,
        batch=1,
        seq=2048,
        dim=2560,
        heads=32,
        kv_heads=32,
        ffn=10240,
        vocab=51200,
    ),
}
"""Two blocks of litgpt/config.py's "Qwen2.5-7B", "Mistral-7B-v0.1", "Phi-3-mini-4k-instruct",
"Gemma-7b" (head_size 256 x 16 heads over n_embd 3072) and "gemma-2-9b" at 1 x 4096, and of
"pythia-1b", "falcon-7b" (71 heads, one k/v head) and "phi-2" (padded vocab 51200) at 1 x 2048
(their block_size), under fake tensors."""


ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    # "Qwen2.5-7B" (and every Qwen2.5 entry): Llama's fields plus a bias on the fused qkv.
    "qwen2.5": {"attn_bias": True, "norm_eps": 1e-6, "rope_base": 1000000},
    # "Mistral-7B-v0.1": Llama's fields plus sliding_window_size=4096 on every layer.
    "mistral": {"sliding_window_size": 4096, "rope_base": 10000},
    # "Phi-3-mini-4k-instruct": Llama's fields, multi-head, sliding_window_size=2048.
    "phi-3": {"sliding_window_size": 2048, "rope_base": 10000},
    # "Phi-4-mini-instruct": Phi-3's, with rotary_percentage 0.75 and grouped queries.
    "phi-4-mini": {"sliding_window_size": 262145, "rotary_percentage": 0.75, "rope_base": 10000},
    # "Gemma-2b" / "Gemma-7b": GemmaMLP (gelu tanh), RMSNorm with add_unit_offset (the
    # name holds "Gemma": Config.norm_class), the embedding scaled by sqrt(n_embd).
    "gemma": {
        "name": "Gemma-memplan-probe",
        "scale_embeddings": True,
        "mlp_class_name": "GemmaMLP",
        "gelu_approximate": "tanh",
        "rope_base": 10000,
    },
    # "gemma-2-9b" / "gemma-2-2b": Gemma's fields plus post-norms, score and logit
    # softcapping, attention_scores_scalar (its head_size), and the sliding window on
    # every other layer (sliding_window_indices set per n_layer in `config`).
    "gemma-2": {
        "name": "Gemma-2-memplan-probe",
        "scale_embeddings": True,
        "mlp_class_name": "GemmaMLP",
        "gelu_approximate": "tanh",
        "rope_base": 10000,
        "post_attention_norm": True,
        "post_mlp_norm": True,
        "attention_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window_size": 4096,
    },
    # "pythia-160m" ... "pythia-12b": LayerNorm, parallel residual, GptNeoxMLP (exact GELU,
    # 4 x n_embd), biases everywhere but lm_head, a quarter of each head rotated.
    "pythia": {
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "parallel_residual": True,
        "bias": True,
        "rotary_percentage": 0.25,
        "rope_base": 10000,
        "norm_eps": 1e-5,
    },
    # "falcon-7b": Pythia's block with one shared norm (shared_attention_norm), no biases,
    # all of each head rotated, multi-query; "falcon-40b": two norms, grouped queries.
    "falcon-7b": {
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "parallel_residual": True,
        "shared_attention_norm": True,
        "bias": False,
        "rope_base": 10000,
    },
    "falcon-40b": {
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "parallel_residual": True,
        "bias": False,
        "rope_base": 10000,
    },
    # "phi-1_5" / "phi-2": Falcon-7B's shared_attention_norm with Pythia's biases, multi-head,
    # GptNeoxMLP's GELU tanh, half (phi-1.5) or 0.4 (phi-2) of each head rotated, a bias on
    # lm_head (Config's defaults for the rest: LayerNorm, GptNeoxMLP, rope_base 10000).
    "phi-1.5": {
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "parallel_residual": True,
        "shared_attention_norm": True,
        "bias": True,
        "rotary_percentage": 0.5,
        "lm_head_bias": True,
        "gelu_approximate": "tanh",
        "rope_base": 10000,
        "norm_eps": 1e-5,
    },
    "phi-2": {
        "norm_class_name": "LayerNorm",
        "mlp_class_name": "GptNeoxMLP",
        "parallel_residual": True,
        "shared_attention_norm": True,
        "bias": True,
        "rotary_percentage": 0.4,
        "lm_head_bias": True,
        "gelu_approximate": "tanh",
        "rope_base": 10000,
        "norm_eps": 1e-5,
    },
}
"""Each architecture's fields beside the Llama 3.1 ones `config` sets, as litgpt/config.py's
named entry sets them (the sizes are `Shape`'s)."""


HF_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2.5": {"model_type": "qwen2"},
    "mistral": {"model_type": "mistral", "sliding_window": 4096},
    "phi-3": {"model_type": "phi3", "sliding_window": 2047},
    "phi-4-mini": {"model_type": "phi3", "sliding_window": 262144, "partial_rotary_factor": 0.75},
    "gemma": {"model_type": "gemma"},
    "gemma-2": {"model_type": "gemma2", "sliding_window": 4096},
    "falcon-7b": {"model_type": "falcon", "multi_query": True, "parallel_attn": True},
    "falcon-40b": {
        "model_type": "falcon",
        "new_decoder_architecture": True,
        "parallel_attn": True,
    },
    "pythia": {
        "model_type": "gpt_neox",
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "hidden_act": "gelu",
    },
    "phi-1.5": {"model_type": "phi", "partial_rotary_factor": 0.5, "hidden_act": "gelu_new"},
    "phi-2": {"model_type": "phi", "partial_rotary_factor": 0.4, "hidden_act": "gelu_new"},
}
"""What the Hugging Face config.json of each ARCHS entry's checkpoint says beside the sizes
(Qwen2.5's `use_sliding_window: false`, Mistral-7B-v0.1's `sliding_window: 4096`,
Phi-3-mini-4k's `sliding_window: 2047`)."""


def hf_config(shape: Shape) -> dict[str, Any]:
    """The config.json memplan reads for the model `config(shape)` builds (Falcon's names its
    k/v heads `num_kv_heads` and its MLP width `ffn_hidden_size`)."""
    head_dim = shape.head_size or shape.dim // shape.heads
    falcon = {"num_kv_heads": shape.kv_heads, "ffn_hidden_size": shape.ffn}
    return {
        **(falcon if shape.arch.startswith("falcon") else {}),
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": max(128, shape.seq),
        **HF_CONFIG[shape.arch],
    }


def config(shape: Shape) -> Any:
    """litgpt's Config at `shape`: the fields of its Llama 3.1 entry (litgpt/config.py), with
    `ARCHS[shape.arch]`'s in their place."""
    from litgpt.config import Config

    fields: dict[str, Any] = {
        "name": "memplan-probe",
        "block_size": max(128, shape.seq),
        "vocab_size": shape.vocab,
        "padded_vocab_size": shape.vocab,
        "n_layer": shape.layers,
        "n_head": shape.heads,
        "n_embd": shape.dim,
        "n_query_groups": shape.kv_heads,
        "rotary_percentage": 1.0,
        "parallel_residual": False,
        "bias": False,
        "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP",
        "intermediate_size": shape.ffn,
        "rope_base": 500000,
        "head_size": shape.head_size,
    }
    if shape.arch == "gemma-2":
        head = shape.head_size or shape.dim // shape.heads
        fields["attention_scores_scalar"] = head
        fields["sliding_window_indices"] = [1 - i % 2 for i in range(shape.layers)]
    return Config(**{**fields, **ARCHS[shape.arch]})


def checkpoint(model: torch.nn.Module) -> None:
    """LitGPT's recomputation: Lightning's FSDPStrategy(activation_checkpointing_policy={Block})
    applies it with `_setup_activation_checkpointing` (torch's checkpoint_wrapper per Block)."""
    from lightning.fabric.strategies.fsdp import (
        _activation_checkpointing_kwargs,
        _setup_activation_checkpointing,
    )
    from litgpt.model import Block

    _setup_activation_checkpointing(model, _activation_checkpointing_kwargs(None, {Block}))


def held_bytes(precision: str, mode: str, shape: Shape = Shape()) -> int:
    """Bytes LitGPT's GPT holds for backward after forward + loss (module docstring), under
    Fabric's `PRECISION[precision]`, with checkpointing `mode` ("none" or "full")."""
    import lightning as L
    from litgpt.model import GPT

    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = GPT(config(shape))
    if mode == "full":
        checkpoint(model)
    elif mode != "none":
        raise ValueError(mode)
    wrapped = fabric.setup(model)
    return _run(wrapped, model, shape, key=lambda st: st.data_ptr())


def held_bytes_fsdp_mixed(mode: str, shape: Shape = Shape()) -> int:
    """`held_bytes` for Lightning's FSDPPrecision("bf16-mixed") without the sharding: the
    parameters and buffers in bf16 (FSDP's MixedPrecision param_dtype and buffer_dtype bf16,
    plugins/precision/fsdp.py::mixed_precision_config) under the plugin's torch.autocast
    (forward_context; on CPU here), the output cast to fp32 (convert_output)."""
    from litgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(config(shape)).to(torch.bfloat16)
    if mode == "full":
        checkpoint(model)

    def call(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens)
        return out.float()

    return _run(call, model, shape, key=lambda st: st.data_ptr())


def held_bytes_fake(precision: str, mode: str, shape: Shape = LLAMA31_8B) -> int:
    """`held_bytes` under FakeTensorMode (the CPU kernels' meta functions, no memory), without
    Fabric: its precision plugin done by hand (`model.to(bf16)` for bf16-true, the output's
    `.float()` for convert_output). Storages are told apart by their StorageImpl."""
    from litgpt.model import GPT
    from torch._subclasses.fake_tensor import FakeTensorMode

    if precision == "amp-bf16":
        raise ValueError("the fake probe runs 32-true and bf16-true")
    with torch.device("meta"):
        model = GPT(config(shape))
        if precision == "bf16":
            model = model.to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        if mode == "full":
            checkpoint(model)
        return _run(model, model, shape, key=lambda st: int(st._cdata))


def _run(call: Any, model: torch.nn.Module, shape: Shape, *, key: Any) -> int:
    from litgpt.utils import chunked_cross_entropy

    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    inputs = (*model.parameters(), *model.buffers(), tokens, targets)
    before = {key(t.untyped_storage()) for t in inputs}
    spy = _Made(key)
    with spy:
        logits = call(tokens)
        if logits.dtype != torch.float32:  # Fabric's convert_output, done by hand (fake run)
            logits = logits.float()
        loss = chunked_cross_entropy(logits, targets)
    del logits
    before.add(key(loss.untyped_storage()))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    return sum(alive.values()) + tokens.nbytes + targets.nbytes


@dataclass(frozen=True)
class Lora:
    """LitGPT's LoRA flags (litgpt/lora.py::Config: lora_r, lora_alpha, lora_dropout and
    lora_query/key/value/projection/mlp/head), as finetune/lora.py::setup passes them."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False


def lora_config(shape: Shape, lora: Lora) -> Any:
    """litgpt.lora.Config at `shape` with `lora`'s flags (the fields of `config`)."""
    from dataclasses import asdict

    from litgpt.lora import Config

    base = {k: v for k, v in asdict(config(shape)).items() if k in _CONFIG_KEYS}
    flags = {f"lora_{k}": v for k, v in asdict(lora).items()}
    return Config(**base, **flags)


_CONFIG_KEYS = (
    "name",
    "block_size",
    "vocab_size",
    "padded_vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "n_query_groups",
    "rotary_percentage",
    "parallel_residual",
    "shared_attention_norm",
    "bias",
    "norm_class_name",
    "mlp_class_name",
    "intermediate_size",
    "rope_base",
    "head_size",
    "attn_bias",
    "norm_eps",
    "sliding_window_size",
    "scale_embeddings",
    "gelu_approximate",
    "lm_head_bias",
    "post_attention_norm",
    "post_mlp_norm",
    "attention_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window_indices",
    "attention_scores_scalar",
)


def held_bytes_lora(precision: str, mode: str, shape: Shape = Shape(), lora: Lora = Lora()) -> int:
    """`held_bytes` for litgpt 0.5.9's finetune/lora.py: `litgpt.lora.GPT` with `lora`'s flags,
    `mark_only_lora_as_trainable` (every parameter but the lora_A / lora_B frozen), the model
    in training mode (LoRA dropout active when > 0), and its fit loop's forward and loss:
    `logits = model(input_ids, lm_head_chunk_size=128)`, `logits[-1] = logits[-1][..., :-1,
    :]`, `chunked_cross_entropy(logits, targets[..., 1:])`. LoRAQKVLinear's index buffer
    (`lora_ind`, made lazily by its first forward) is made before the measure: a buffer."""
    import lightning as L
    from litgpt.lora import GPT, LoRAQKVLinear, mark_only_lora_as_trainable

    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = GPT(lora_config(shape, lora))
    mark_only_lora_as_trainable(model)
    for m in model.modules():
        if isinstance(m, LoRAQKVLinear) and any(m.enable_lora) and m.r > 0:
            m.lora_ind  # noqa: B018 - the lazy buffer, made before the measure
    if mode == "full":
        checkpoint(model)
    elif mode != "none":
        raise ValueError(mode)
    wrapped = fabric.setup(model)
    return _run_lora(wrapped, model, shape)


def held_bytes_lora_fake(precision: str, mode: str, shape: Shape, lora: Lora = Lora()) -> int:
    """`held_bytes_lora` under FakeTensorMode (the CPU kernels' meta functions, no memory),
    without Fabric: its precision plugin done by hand (`model.to(bf16)` for bf16-true, each
    output chunk's `.float()` for convert_output). Storages are told apart by their
    StorageImpl."""
    from litgpt.lora import GPT, LoRAQKVLinear, mark_only_lora_as_trainable
    from torch._subclasses.fake_tensor import FakeTensorMode

    if precision not in ("fp32", "bf16"):
        raise ValueError("the fake probe runs 32-true and bf16-true")
    with torch.device("meta"):
        model = GPT(lora_config(shape, lora))
        if precision == "bf16":
            model = model.to(torch.bfloat16)
    mark_only_lora_as_trainable(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        for m in model.modules():
            if isinstance(m, LoRAQKVLinear) and any(m.enable_lora) and m.r > 0:
                m.lora_ind  # noqa: B018 - the lazy buffer, made before the measure
        if mode == "full":
            checkpoint(model)

        def call(tokens: torch.Tensor, lm_head_chunk_size: int) -> list[torch.Tensor]:
            return [y.float() for y in model(tokens, lm_head_chunk_size=lm_head_chunk_size)]

        return _run_lora(call, model, shape, key=lambda st: int(st._cdata))


def _run_lora(
    call: Any, model: torch.nn.Module, shape: Shape, *, key: Any = None, held: tuple[Any, ...] = ()
) -> int:
    """Forward + loss as finetune/lora.py::fit runs them; the token ids and targets are made
    inside the measure and dropped after it, so they count only when autograd keeps them
    (with the embedding frozen it does not keep the ids; nll_loss keeps views or copies of
    the targets). `held`: tensors the model holds beside its parameters and buffers, not
    counted."""
    from litgpt.utils import chunked_cross_entropy

    key = key or (lambda st: st.data_ptr())
    kept = (*model.parameters(), *model.buffers(), *held)
    before = {key(t.untyped_storage()) for t in kept}
    spy = _Made(key)
    with spy:
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        logits = call(tokens, lm_head_chunk_size=HEAD_CHUNK)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, targets[..., 1:])
    del logits, tokens, targets
    before.add(key(loss.untyped_storage()))
    alive = {k: n for ref, k, n in spy.made if not ref.expired() and k not in before}
    return sum(alive.values())


HEAD_CHUNK = 128
"""finetune/lora.py::fit's `model(input_ids, lm_head_chunk_size=128)`."""


class _Alive(_Made):
    """`_Made` that also follows, after every op, the bytes of the storages it has seen that
    are still alive, and their most while `measuring`."""

    def __init__(self) -> None:
        super().__init__(lambda st: st.data_ptr())
        self.measuring = False
        self.most = 0

    def alive(self) -> int:
        live = {k: n for ref, k, n in self.made if not ref.expired()}
        return sum(live.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.measuring:
            self.most = max(self.most, self.alive())
        return out


def loss_backward_excess(precision: str, shape: Shape, lora: Lora = Lora()) -> int:
    """The most the backward of finetune/lora.py's loss holds beyond what was alive when it
    began: forward + loss as `held_bytes_lora` runs them, then `torch.autograd.grad` of the
    loss with respect to the fp32 logits chunks Fabric returned (the loss's nodes only: the
    head's backward and the layers' are left out), the bytes of every storage made since the
    forward began followed after each op."""
    import lightning as L
    from litgpt.lora import GPT, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = GPT(lora_config(shape, lora))
    mark_only_lora_as_trainable(model)
    wrapped = fabric.setup(model)
    spy = _Alive()
    with spy:
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        logits = wrapped(tokens, lm_head_chunk_size=HEAD_CHUNK)
        chunks = list(logits)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, targets[..., 1:])
        start = spy.alive()
        spy.measuring = True
        grads = torch.autograd.grad(loss, chunks)
        spy.measuring = False
    del grads
    return spy.most - start


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtype LitGPT's BitsandbytesPrecision computes in for 32-true and bf16-true."""


def lightning_4bit_modules(lora: Lora, shape: Shape) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the Linears Lightning's BitsandbytesPrecision("nf4") makes 4-bit in
    litgpt's LoRA GPT (convert_module on the meta device: the classes swapped, nothing
    quantized)."""
    import bitsandbytes as bnb
    from lightning.fabric.plugins import BitsandbytesPrecision
    from litgpt.lora import GPT

    with torch.device("meta"):
        model = GPT(lora_config(shape, lora))
    BitsandbytesPrecision("nf4", torch.bfloat16).convert_module(model)
    return {
        n: (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def held_bytes_qlora(
    precision: str, shape: Shape, lora: Lora, *, double: bool, stable_embedding: bool = True
) -> int:
    """What litgpt's LoRA GPT holds after finetune/lora.py's forward and loss with QLoRA on CPU:
    Fabric's `PRECISION[precision]`, 32-true or bf16-true (bf16-true's forward_context sets
    the default dtype to bf16 as BitsandbytesPrecision's does; the output is cast to fp32 as
    both plugins do), every
    Linear Lightning's convert_module picks made a bitsandbytes Linear4bit quantized by
    bitsandbytes on CPU from fp16, and the embedding swapped for StableEmbedding as
    finetune/lora.py::main swaps it (litgpt >= 0.5.0; `stable_embedding=False`: no swap, the
    frozen embedding as litgpt v0.4.13's main keeps it)."""
    fabric, model = _qlora_model(precision, shape, lora, double=double)
    wrapped = fabric.setup(model)
    if stable_embedding:
        swap_stable_embedding(model)
    return _run_lora(wrapped, model, shape)


def _qlora_model(precision: str, shape: Shape, lora: Lora, *, double: bool) -> tuple[Any, Any]:
    """(Fabric, litgpt's LoRA GPT after mark_only_lora_as_trainable with every Linear
    Lightning's convert_module picks made a bitsandbytes Linear4bit, quantized on CPU from
    fp16), not yet set up."""
    import bitsandbytes as bnb
    import lightning as L
    from litgpt.lora import GPT, LoRAQKVLinear, mark_only_lora_as_trainable

    names = set(lightning_4bit_modules(lora, shape))
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = GPT(lora_config(shape, lora))
    mark_only_lora_as_trainable(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, attr)
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=DTYPES[precision],
            quant_type="nf4",
            compress_statistics=double,
            device="meta",
        )
        if old.bias is not None:  # _convert_layers' _replace_param: a frozen copy
            new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
        new.weight = bnb.nn.Params4bit(
            old.weight.data.to(torch.half),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=double,
            blocksize=64,
        )
        setattr(owner, attr, new.to("cpu"))  # bitsandbytes quantizes here
    for m in model.modules():
        if isinstance(m, LoRAQKVLinear) and any(m.enable_lora) and m.r > 0:
            m.lora_ind  # noqa: B018 - the lazy buffer, made before the measure
    assert all(m.weight.dtype == torch.uint8 for n, m in model.named_modules() if n in names)
    return fabric, model


def swap_stable_embedding(model: Any) -> Any:
    """finetune/lora.py::main's swap of `transformer.wte` for bitsandbytes' StableEmbedding
    (the same statements, on CPU); returns the old embedding module."""
    import bitsandbytes as bnb

    old = model.transformer.wte
    model.transformer.wte = bnb.nn.StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(old.weight)
    model.transformer.wte = model.transformer.wte.to(
        device=old.weight.device, dtype=old.weight.dtype
    )
    return old


@dataclass(frozen=True)
class OptimizerHeld:
    """What litgpt's QLoRA optimizer holds after real steps (`qlora_optimizer_held`)."""

    state_bytes: int
    """Bytes of every tensor in `optimizer.state` (bitsandbytes' state1 / state2)."""
    by_key: dict[str, tuple[int, int]]
    """`optimizer.state` by key (state1, exp_avg, step, ...): (tensors, bytes)."""
    with_state: tuple[str, ...]
    """Names (model.named_parameters()) of the parameters that have optimizer state."""
    kept_grads: dict[str, int]
    """Parameters whose `.grad` is still allocated after optimizer.zero_grad(): name -> bytes."""
    outside_model: int
    """Bytes of the param_groups tensors that are no longer the model's parameters."""
    trainable: tuple[str, ...]
    """Names of the parameters with requires_grad."""
    grad_bytes: int = 0
    """Bytes of the parameters' `.grad` after the last backward, before optimizer.step()."""
    cache_bytes: int = 0
    """LitGPT adapter: bytes of the storages every layer's `adapter_kv_cache` holds."""
    cache_dtypes: tuple[str, ...] = ()
    """LitGPT adapter: the dtypes of those tensors."""


def qlora_optimizer_held(
    precision: str,
    shape: Shape,
    lora: Lora,
    *,
    double: bool,
    steps: int = 2,
    stable_embedding: bool = True,
) -> OptimizerHeld:
    """litgpt 0.5.9 finetune/lora.py::main's order on CPU: Fabric setup_module, the optimizer
    litgpt instantiates (utils.py::instantiate_bnb_optimizer("AdamW", model.parameters()):
    bitsandbytes' own PagedAdamW, which on CPU keeps ordinary tensors, warning "Paged
    optimizers are not supported on CPU"), the StableEmbedding swap (`stable_embedding=False`:
    none, as litgpt v0.4.13's main), setup_optimizers, then `steps` of fit's forward, loss,
    fabric.backward, optimizer.step(), optimizer.zero_grad()."""
    fabric, model = _qlora_model(precision, shape, lora, double=double)
    return _optimizer_held(fabric, model, shape, quantized=True, steps=steps, swap=stable_embedding)


def lora_optimizer_held(
    precision: str, shape: Shape, lora: Lora, *, steps: int = 2
) -> OptimizerHeld:
    """`qlora_optimizer_held` without --quantize: finetune/lora.py::main's
    instantiate_torch_optimizer("AdamW", model.parameters()) (torch.optim.AdamW over every
    parameter, the frozen ones included) on litgpt's LoRA GPT, no swap."""
    import lightning as L
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = GPT(lora_config(shape, lora))
    mark_only_lora_as_trainable(model)
    return _optimizer_held(fabric, model, shape, quantized=False, steps=steps)


def _optimizer_held(
    fabric: Any,
    model: Any,
    shape: Shape,
    *,
    quantized: bool,
    steps: int,
    wrapped: Any = None,
    swap: bool = True,
) -> OptimizerHeld:
    import warnings

    from litgpt.utils import (
        chunked_cross_entropy,
        instantiate_bnb_optimizer,
        instantiate_torch_optimizer,
    )

    wrapped = wrapped or fabric.setup_module(model)
    if quantized:
        optimizer = instantiate_bnb_optimizer("AdamW", wrapped.parameters())
        if swap:
            swap_stable_embedding(model)
    else:
        optimizer = instantiate_torch_optimizer("AdamW", wrapped.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    for _ in range(steps):
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
        logits = wrapped(tokens, lm_head_chunk_size=HEAD_CHUNK)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, tokens[..., 1:])
        fabric.backward(loss)
        grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
            optimizer.step()
        optimizer.zero_grad()
    name_of = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.optimizer.state
    given = [p for g in optimizer.param_groups for p in g["params"]]
    return OptimizerHeld(
        state_bytes=sum(
            t.nbytes for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)
        ),
        by_key={
            key: (
                sum(1 for s in state.values() if isinstance(s.get(key), torch.Tensor)),
                sum(s[key].nbytes for s in state.values() if isinstance(s.get(key), torch.Tensor)),
            )
            for key in {k for s in state.values() for k in s}
        },
        with_state=tuple(name_of[id(p)] for p in state),
        kept_grads={n: p.grad.nbytes for n, p in model.named_parameters() if p.grad is not None},
        outside_model=sum(p.nbytes for p in given if id(p) not in name_of),
        trainable=tuple(n for n, p in model.named_parameters() if p.requires_grad),
        grad_bytes=grad_bytes,
    )


def adapter_parameters(
    name: str, method: str, precision: str, **fields: Any
) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """`adapter_parameters_of` for litgpt's own config entry `name` (Config.from_name, with
    `fields` overridden: n_layer, adapter_start_layer, adapter_prompt_length)."""
    import importlib

    module = importlib.import_module(f"litgpt.{method}")
    return adapter_parameters_of(module.Config.from_name(name, **fields), method, precision)


def adapter_parameters_of(
    config: Any, method: str, precision: str
) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """{name: (shape, str(dtype), requires_grad)} of litgpt 0.5.9's `litgpt.adapter.GPT` or
    `litgpt.adapter_v2.GPT` as finetune/adapter(_v2).py::main builds it: under Fabric's
    precision plugin's module_init_context (the dtype Fabric's init_module gives; the meta
    device instead of the CPU, so whole published models fit), then
    mark_only_adapter_as_trainable / mark_only_adapter_v2_as_trainable. `config` is any
    litgpt Config; its fields are carried into the method's own Config."""
    import importlib
    from dataclasses import fields as dataclass_fields

    import lightning as L

    module = importlib.import_module(f"litgpt.{method}")
    names = {f.name for f in dataclass_fields(module.Config) if f.init}
    own = module.Config(**{k: getattr(config, k) for k in names if hasattr(config, k)})
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)  # type: ignore[arg-type]
    with torch.device("meta"), fabric.strategy.precision.module_init_context():
        model = module.GPT(own)
    mark = getattr(module, f"mark_only_{method}_as_trainable")
    mark(model)
    return {n: (tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()}


def lora_parameters_of(
    config: Any, lora: Lora, precision: str
) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """{name: (shape, str(dtype), requires_grad)} of litgpt 0.5.9's `litgpt.lora.GPT` as
    finetune/lora.py::main builds it (without --quantize): `config`'s fields (any litgpt
    Config: Config.from_name's entries or `config(shape)`) with `lora`'s flags, built under
    Fabric's precision plugin's module_init_context on the meta device (so whole published
    models fit), then `mark_only_lora_as_trainable(model)` (bias "none", as main calls it)."""
    from dataclasses import fields as dataclass_fields

    import lightning as L
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    names = {f.name for f in dataclass_fields(Config) if f.init and not f.name.startswith("lora_")}
    flags = {f"lora_{k}": v for k, v in asdict(lora).items()}
    own = Config(**{k: getattr(config, k) for k in names if hasattr(config, k)}, **flags)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)  # type: ignore[arg-type]
    with torch.device("meta"), fabric.strategy.precision.module_init_context():
        model = GPT(own)
    mark_only_lora_as_trainable(model)
    return {n: (tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()}


def adapter_fit_grads(config: Any, method: str) -> dict[str, bool]:
    """{name: whether it gets a gradient} in litgpt 0.5.9's finetune/adapter(_v2).py::fit, on
    the meta device: fit first runs `validate` (under @torch.no_grad(), model.eval(); the
    sanity check or the initial validation, one of the two always), whose forward fills every
    adapted layer's `adapter_kv_cache` (adapter.py::CausalSelfAttention.
    scaled_dot_product_attention) without a graph; then the training forward
    (lm_head_chunk_size=128), the chunked loss and backward."""
    import importlib
    from dataclasses import fields as dataclass_fields

    from litgpt.utils import chunked_cross_entropy

    module = importlib.import_module(f"litgpt.{method}")
    names = {f.name for f in dataclass_fields(module.Config) if f.init}
    own = module.Config(**{k: getattr(config, k) for k in names if hasattr(config, k)})
    with torch.device("meta"):
        model = module.GPT(own)
        getattr(module, f"mark_only_{method}_as_trainable")(model)
        tokens = torch.zeros(1, 8, dtype=torch.long)
        model.eval()
        with torch.no_grad():
            model(tokens)
        model.train()
        logits = model(tokens, lm_head_chunk_size=HEAD_CHUNK)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, tokens[..., 1:])
        if loss.requires_grad:  # else nothing trains (fit's backward would raise)
            loss.backward()
    return {n: p.grad is not None for n, p in model.named_parameters()}


def adapter_optimizer_held(
    precision: str, shape: Shape, method: str, *, steps: int = 2
) -> OptimizerHeld:
    """`lora_optimizer_held` for finetune/adapter.py / adapter_v2.py::main: litgpt's adapter
    GPT (default adapter_start_layer 2, adapter_prompt_length 10) under fabric.init_module,
    mark_only_adapter(_v2)_as_trainable, instantiate_torch_optimizer("AdamW",
    model.parameters()), then `steps` of fit's forward, chunked loss, backward, step and
    zero_grad."""
    import importlib

    import lightning as L

    module = importlib.import_module(f"litgpt.{method}")
    base = {k: v for k, v in asdict(config(shape)).items() if k in _CONFIG_KEYS}
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = module.GPT(module.Config(**base))
    getattr(module, f"mark_only_{method}_as_trainable")(model)
    wrapped = fabric.setup_module(model)
    # fit's validate before training (@torch.no_grad(), eval mode): fills adapter_kv_cache.
    model.eval()
    with torch.no_grad():
        wrapped(torch.randint(0, shape.vocab, (shape.batch, shape.seq)))
    model.train()
    held = _optimizer_held(fabric, model, shape, quantized=False, steps=steps, wrapped=wrapped)
    caches = [t for m in model.modules() for t in getattr(m, "adapter_kv_cache", None) or ()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in caches}
    return replace(
        held,
        cache_bytes=sum(storages.values()),
        cache_dtypes=tuple(sorted({str(t.dtype) for t in caches})),
    )


def held_bytes_adapter(
    precision: str,
    shape: Shape,
    method: str,
    *,
    start: int = 2,
    length: int = 10,
    checkpointed: bool = False,
) -> int:
    """`held_bytes_lora` for litgpt 0.5.9's finetune/adapter(_v2).py: the adapter GPT under
    fabric.init_module, mark_only_adapter(_v2)_as_trainable, fit's no-grad validation forward
    first (fills every adapted layer's adapter_kv_cache, made before the measure), then fit's
    training forward and chunked loss, what is held for backward measured. `checkpointed`:
    LitGPT's recomputation, every Block wrapped (`checkpoint`, as FSDPStrategy(
    activation_checkpointing_policy={Block}) does in finetune/adapter(_v2).py::setup) before
    Fabric's setup."""
    import importlib

    import lightning as L

    module = importlib.import_module(f"litgpt.{method}")
    base = {k: v for k, v in asdict(config(shape)).items() if k in _CONFIG_KEYS}
    fields = {"adapter_start_layer": start, "adapter_prompt_length": length}
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=PRECISION[precision])  # type: ignore[arg-type]
    with fabric.init_module():
        model = module.GPT(module.Config(**base, **fields))
    getattr(module, f"mark_only_{method}_as_trainable")(model)
    if checkpointed:
        checkpoint(model)
    wrapped = fabric.setup(model)
    model.eval()
    with torch.no_grad():
        wrapped(torch.randint(0, shape.vocab, (shape.batch, shape.seq)))
    model.train()
    # The caches are the model's (memplan counts them as buffers): views SDPA takes of them
    # during the measure are not activations.
    caches = tuple(t for m in model.modules() for t in getattr(m, "adapter_kv_cache", None) or ())
    return _run_lora(wrapped, model, shape, held=caches)
