"""What each op saves for backward, per device: one rule per function, with its source.

Shapes are (tokens, width) for per-token tensors, tokens = batch x sequence. Sources:
- derivatives.yaml = pytorch tools/autograd/derivatives.yaml (2.13): which inputs/outputs each
  op's backward formula needs, hence what its autograd node saves.
- Kernel files are under pytorch aten/src/ATen/native/ (2.13).
Every rule here is measured on CPU by tests/test_activations*.py; the CUDA branches follow the
cited CUDA kernels and are not measured by a test (no GPU in CI).
"""

from __future__ import annotations

from memplan.model.forward.tensors import Saved, Setting, promote
from memplan.model.inventory import Architecture

DERIV = "tools/autograd/derivatives.yaml (torch 2.13)"
INT64 = "int64"
FP32 = "fp32"


def saved(name: str, shape: tuple[int, ...], dtype: str, by: str, source: str) -> Saved:
    return Saved(name=name, shape=shape, dtype=dtype, saved_by=by, source=source)


# --- dropout ---------------------------------------------------------------------------------


def dropout_mask_dtype(st: Setting, x_dtype: str) -> str:
    """The dtype of the tensor dropout keeps for backward.

    CUDA: `dropout` takes the fused path (Dropout.cpp::is_fused_kernel_acceptable: CUDA and
    0 < p < 1) -> `native_dropout` saves a bool mask (cuda/Dropout.cu::native_dropout_cuda;
    derivatives.yaml native_dropout: `native_dropout_backward(grad, result1, scale)`).
    CPU: `_dropout_impl` builds `noise = empty_like(input).bernoulli_(1 - p).div_(1 - p)` and
    returns `input * noise`; the multiply saves `noise` in the input's dtype (Dropout.cpp).
    """
    return "bool" if st.device == "cuda" else x_dtype


def dropout(name: str, shape: tuple[int, ...], x_dtype: str, st: Setting) -> Saved:
    """One active dropout: its mask (see `dropout_mask_dtype`). The output is a new tensor."""
    by = "NativeDropoutBackward0" if st.device == "cuda" else "MulBackward0"
    return saved(name, shape, dropout_mask_dtype(st, x_dtype), by, "aten native/Dropout.cpp")


# --- embeddings and norms --------------------------------------------------------------------


def embedding_indices(name: str, shape: tuple[int, ...]) -> Saved:
    """`embedding` saves its int64 indices (derivatives.yaml: embedding_backward(grad, indices))."""
    return saved(name, shape, INT64, "EmbeddingBackward0", DERIV + ": embedding")


def rms_norm(prefix: str, tokens: int, width: int, x_dtype: str, st: Setting) -> list[Saved]:
    """transformers `LlamaRMSNorm.forward` (modeling_llama.py, and every copy of it):

        x32 = x.to(float32); var = x32.pow(2).mean(-1); y = x32 * rsqrt(var + eps)
        return weight * y.to(x.dtype)

    pow saves x32 [tokens, width] fp32 (x itself when x is fp32); rsqrt saves its result and the
    multiply saves it again [tokens, 1] fp32; `weight *` saves y cast back to x's dtype. The
    output (weight x y, dtype promote(weight, x)) is saved by whoever consumes it.
    """
    return [
        saved(f"{prefix}.input_fp32", (tokens, width), FP32, "PowBackward0", "modeling_llama.py"),
        saved(f"{prefix}.rstd", (tokens, 1), FP32, "RsqrtBackward0", "modeling_llama.py"),
        saved(f"{prefix}.normalized", (tokens, width), x_dtype, "MulBackward0", "modeling_llama"),
    ]


def rms_norm_out(x_dtype: str, st: Setting) -> str:
    """Dtype of `weight * y.to(x.dtype)`: the weight is in the stream (parameter) dtype."""
    return promote(st.stream, x_dtype)


def layer_norm_stats_dtype(st: Setting, x_dtype: str) -> str:
    """mean and rstd of `native_layer_norm`: fp32 on CUDA (cuda/layer_norm_kernel.cu::
    layer_norm_cuda allocates them in the accumulate type); on CPU the input dtype
    (layer_norm.cpp::layer_norm_cpu), fp32 when a 16-bit input meets fp32 weights (the
    mixed-type path, e.g. an autocast bf16 tensor into an fp32 LayerNorm; measured)."""
    if st.device == "cuda" or x_dtype != st.stream:
        return FP32
    return x_dtype


def layer_norm_dtype(st: Setting, x_dtype: str) -> str:
    """The dtype `nn.LayerNorm` runs in: layer_norm is on CUDA autocast's fp32 list
    (aten/src/ATen/autocast_mode.cpp), not on CPU's."""
    return FP32 if st.autocast and st.device == "cuda" else x_dtype


def layer_norm(prefix: str, tokens: int, width: int, x_dtype: str, st: Setting) -> list[Saved]:
    """`native_layer_norm` saves input, mean and rstd (derivatives.yaml: native_layer_norm).

    Under CUDA autocast a 16-bit input is first cast to fp32 (the cast is what is saved).
    """
    run = layer_norm_dtype(st, x_dtype)
    stats = layer_norm_stats_dtype(st, run)
    src = DERIV + ": native_layer_norm"
    return [
        saved(f"{prefix}.input", (tokens, width), run, "NativeLayerNormBackward0", src),
        saved(f"{prefix}.mean", (tokens, 1), stats, "NativeLayerNormBackward0", src),
        saved(f"{prefix}.rstd", (tokens, 1), stats, "NativeLayerNormBackward0", src),
    ]


# --- linears ---------------------------------------------------------------------------------


def linear_inputs(
    names: list[str], tokens: int, width: int, x_dtype: str, st: Setting
) -> list[Saved]:
    """The input each linear saves (mm/addmm save `self` to compute the weight's gradient).

    Linears reading the same tensor share it (one storage). Under autocast, a tensor that is not
    in the matmul dtype is cast separately for each linear (autocast caches only casts of leaf
    tensors, aten/src/ATen/autocast_mode.h::cached_cast), so each keeps its own copy.
    """
    src = DERIV + ": mm / addmm"
    if x_dtype == st.matmul:
        return [saved(f"{names[0]}.input", (tokens, width), x_dtype, "MmBackward0", src)]
    return [saved(f"{n}.input", (tokens, width), st.matmul, "MmBackward0", src) for n in names]


def attention_dims(arch: Architecture) -> tuple[int, int, int, int]:
    """(hidden, query heads, key/value heads, head_dim) of a decoder's attention."""
    return (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.head_dim,
    )


def rotary_tables(seq: int, dim: int, dtype: str, source: str, suffix: str = "") -> list[Saved]:
    """RoPE's cos and sin, [1, seq, dim]: made once per forward by the model's rotary embedding,
    saved by every layer's RoPE multiplies (the same two storages)."""
    return [
        saved(f"rotary_emb.{n}{suffix}", (1, seq, dim), dtype, "MulBackward0", source)
        for n in ("cos", "sin")
    ]


def projection_weights(
    h: int, a: int, kv: int, d: int, inter: int | None
) -> list[tuple[str, tuple[int, ...]]]:
    """The q/k/v/o projections' weight shapes (and the gated MLP's, given `inter`), for
    `weight_casts`."""
    out: list[tuple[str, tuple[int, ...]]] = [
        ("self_attn.q_proj", (a * d, h)),
        ("self_attn.k_proj", (kv * d, h)),
        ("self_attn.v_proj", (kv * d, h)),
        ("self_attn.o_proj", (h, a * d)),
    ]
    if inter is not None:
        out += [
            ("mlp.gate_proj", (inter, h)),
            ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter)),
        ]
    return out


def rms_norm_head(tokens: int, hidden: int, vocab: int, st: Setting) -> list[Saved]:
    """The final RMSNorm (`norm`) and the LM head's input and weight cast (`lm_head`)."""
    head = rms_norm("norm", tokens, hidden, st.stream, st)
    head += linear_inputs(["lm_head"], tokens, hidden, rms_norm_out(st.stream, st), st)
    head += weight_casts([("lm_head", (vocab, hidden))], st)
    return head


def layer_norm_head(
    norm: str, head: str, tokens: int, hidden: int, vocab: int, x_dtype: str, st: Setting
) -> list[Saved]:
    """The final LayerNorm (`norm`, over an `x_dtype` input) and the LM head's input and weight
    cast (`head`)."""
    out = layer_norm(norm, tokens, hidden, x_dtype, st)
    out += linear_inputs([head], tokens, hidden, layer_norm_dtype(st, x_dtype), st)
    out += weight_casts([(head, (vocab, hidden))], st)
    return out


def weight_casts(weights: list[tuple[str, tuple[int, ...]]], st: Setting) -> list[Saved]:
    """Under autocast each weight is cast to the matmul dtype once per autocast region (the
    cast cache, autocast_mode.h::cached_cast) and the matmul saves that copy: it is not a
    parameter, so it counts as an activation. None without autocast."""
    if not st.autocast or st.stream == st.matmul:
        return []
    src = "aten/src/ATen/autocast_mode.h::cached_cast"
    return [saved(f"{n}.weight_cast", shape, st.matmul, "MmBackward0", src) for n, shape in weights]


# --- activation functions --------------------------------------------------------------------


def act_saves_input(name: str) -> bool | None:
    """True: the activation's node saves its input; False: its output; None: not a single op."""
    if name in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu_op"):
        return True  # derivatives.yaml: silu/gelu backward use `self`
    if name == "relu":
        return False  # derivatives.yaml: relu: threshold_backward(grad, result, 0)
    return None


def gelu_new(prefix: str, tokens: int, width: int, x_dtype: str, st: Setting) -> list[Saved]:
    """transformers `NewGELUActivation` (activations.py), written out in Python:

        0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3))))

    pow saves x, tanh saves its result, the last multiply saves `0.5 * x` and `1 + tanh(.)`:
    four [tokens, width] tensors. Under CUDA autocast `pow` is on the fp32 list, so x is cast to
    fp32 first and the tanh branch runs in fp32 (autocast_mode.cpp); CPU autocast has no pow.
    """
    src = "transformers activations.py::NewGELUActivation"
    x_pow = FP32 if st.autocast and st.device == "cuda" else x_dtype
    branch = promote(x_dtype, x_pow)
    shape = (tokens, width)
    return [
        saved(f"{prefix}.pow_input", shape, x_pow, "PowBackward0", src),
        saved(f"{prefix}.tanh", shape, branch, "TanhBackward0", src),
        saved(f"{prefix}.half_x", shape, x_dtype, "MulBackward0", src),
        saved(f"{prefix}.one_plus_tanh", shape, branch, "MulBackward0", src),
    ]


def gelu_new_out(x_dtype: str, st: Setting) -> str:
    return promote(x_dtype, FP32) if st.autocast and st.device == "cuda" else x_dtype


# --- the loss --------------------------------------------------------------------------------


def causal_lm_loss(
    tokens: int, vocab: int, dtype: str = FP32, *, batch: int = 0, shifted: bool = False
) -> list[Saved]:
    """transformers loss/loss_utils.py::ForCausalLMLoss: `logits.float()`, labels shifted by
    one (`pad(labels, (0, 1))[..., 1:].contiguous()`), `cross_entropy(reduction="mean")`.

    cross_entropy = log_softmax + nll_loss: log_softmax saves its fp32 result [tokens, vocab]
    (derivatives.yaml _log_softmax: result), nll_loss saves that again (same storage), the int64
    targets [tokens] and the 0-dim fp32 total_weight (derivatives.yaml nll_loss_forward).
    Losses that do not upcast (BERT's CrossEntropyLoss on the scores) keep `dtype`.

    `shifted` (causal LMs) at `batch` 1: `labels[..., 1:]` of the padded [1, s + 1] labels is
    already contiguous (a size-1 dim's stride does not count), so `.contiguous()` returns the
    view and nll_loss keeps the padded storage, one token longer (measured).
    """
    src = "transformers loss/loss_utils.py::ForCausalLMLoss; " + DERIV
    targets = tokens + 1 if shifted and batch == 1 else tokens
    return [
        saved("log_softmax", (tokens, vocab), dtype, "LogSoftmaxBackward0", src),
        saved("targets", (targets,), INT64, "NllLossBackward0", src),
        saved("total_weight", (), dtype, "NllLossBackward0", src),
    ]


def gemma_rms_norm(prefix: str, tokens: int, width: int, x_dtype: str, src: str) -> list[Saved]:
    """`GemmaRMSNorm.forward` (and Gemma2/Gemma3's copies):

        x32 = x.float(); y = x32 * rsqrt(x32.pow(2).mean(-1) + eps)
        return (y * (1.0 + weight.float())).type_as(x)

    pow saves x32 [tokens, width] fp32 (x itself when x is fp32); rsqrt saves its result and
    the multiply saves it again [tokens, 1] fp32; `* (1 + w)` saves y [tokens, width] fp32 and
    the new tensor 1 + w [width] fp32 (not a parameter). The output is in x's dtype.
    """
    fp32 = FP32
    return [
        saved(f"{prefix}.input_fp32", (tokens, width), fp32, "PowBackward0", src),
        saved(f"{prefix}.rstd", (tokens, 1), fp32, "RsqrtBackward0", src),
        saved(f"{prefix}.normalized", (tokens, width), fp32, "MulBackward0", src),
        saved(f"{prefix}.one_plus_weight", (width,), fp32, "MulBackward0", src),
    ]
