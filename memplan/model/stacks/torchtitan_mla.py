"""torchtitan's own DeepSeek-V3 attention, multi-head latent attention (MLA), under
`model.implementation: torchtitan` (model_type deepseek_v3): what it saves for backward on CPU.
The norms, the embeddings, the head and the loss are memplan.model.stacks.torchtitan's; the
MoE half of a block is memplan.model.stacks.torchtitan_moe's.

Read from torchtitan 0.3.0 (pip `torchtitan==0.3.0`):
- models/deepseek_v3/model.py::Attention.forward: q = `wq(x)`, or with q_lora_rank
  `wq_b(q_norm(wq_a(x)))`; q split into nope / rope parts (views), RoPE on the rope part,
  `cat([q_nope, q_pe])` (a new [b, s, h, nope + rope]); `kv = wkv_a(x)` split into the latent
  [.., kv_lora_rank] and k_pe (views); `wkv_b(kv_norm(kv))` viewed as [b, s, h, nope + v]
  and split into k_nope and v (views); `k = cat([k_nope, k_pe.expand(...)])`; the inner
  attention; `.contiguous()`, `wo`.
- models/common/nn_modules.py::RMSNorm (torch.nn.RMSNorm) for q_norm and kv_norm: kv_norm's
  input is a slice of wkv_a's output, so in fp32 (`x.to(float32)` returns x itself) pow saves
  that slice, whose storage is the whole [tokens, kv_lora + rope] output.
- models/common/rope.py::ComplexRoPE.apply_rotary_emb: the multiply saves only the cache.
- models/common/attention.py::ScaledDotProductAttention.forward (the inner attention this rule
  models; 0.3.0's DeepSeek-V3 flavors default to flex, models/deepseek_v3/__init__.py::
  model_registry `attn_backend="flex"`): q, k, v transposed to [b, h, s, d]. q and k have
  head dim nope + rope, v has v_head_dim: the CPU flash kernel takes one head dim for all
  three (aten native/transformers/sdp_utils_cpp.cpp: `check_head_dim_size_cpp`), so SDPA runs
  its math kernel (aten native/transformers/attention.cpp::_scaled_dot_product_attention_math,
  measured): q and k scaled and upcast to fp32, the fp32 softmax [b, h, s, s], v upcast.
  On CUDA the same ScaledDotProductAttention allows cuDNN, flash and math only
  (`sdpa_backends`); flash refuses unequal head dims, and cuDNN takes head dims up to 256
  only on Hopper with cuDNN >= 9.10 (128 otherwise: torch aten native/transformers/cuda/
  sdp_utils.cpp::check_cudnn_tensor_shapes), so the kernel depends on the cuDNN runtime:
  refused (memplan.model.stacks.torchtitan_moe.unsupported).
"""

from __future__ import annotations

from dataclasses import replace

from memplan.model.forward import kernels
from memplan.model.forward.attention import SRC_MATH, math_dtype
from memplan.model.forward.tensors import Saved, Setting
from memplan.model.inventory import Architecture

VERSION = "0.3.0"
SRC = f"torchtitan {VERSION} models/deepseek_v3/model.py::Attention.forward"


def dims(arch: Architecture) -> tuple[int, int, int, int, int, int]:
    """(q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
    heads) of a DeepSeek-V3 config."""
    x = arch.extra
    return (
        int(x.get("q_lora_rank") or 0),
        int(x["kv_lora_rank"]),
        int(x["qk_nope_head_dim"]),
        int(x["qk_rope_head_dim"]),
        int(x["v_head_dim"]),
        arch.num_attention_heads,
    )


def matmuls(arch: Architecture) -> list[tuple[str, int, int]]:
    """MLA's matmuls in forward order, (name, input width, output width): SelectiveAC's count
    order."""
    ql, r, nope, rope, v, h = dims(arch)
    d = arch.hidden_size
    q = (
        [("attention.wq_a", d, ql), ("attention.wq_b", ql, h * (nope + rope))]
        if ql
        else [("attention.wq", d, h * (nope + rope))]
    )
    return [
        *q,
        ("attention.wkv_a", d, r + rope),
        ("attention.wkv_b", r, h * (nope + v)),
        ("attention.wo", h * v, d),
    ]


def saves(arch: Architecture, st: Setting, norm_out: Saved) -> list[Saved]:
    """What MLA saves after attention_norm's own saves, on CPU: attention_norm's output
    `norm_out` (read by wq / wq_a and wkv_a), q_norm's and kv_norm's saves and outputs, the
    math SDPA's and wo's input (module docstring)."""
    from memplan.model.stacks.torchtitan import rms_norm

    ql, r, nope, rope, v, h = dims(arch)
    b, s, t, x = st.batch, st.sequence, st.tokens, st.stream
    out = [norm_out]
    if ql:
        out += rms_norm("attention.q_norm", t, ql, x, st)
        out.append(kernels.saved("attention.q_norm.output", (t, ql), x, "MmBackward0", SRC))
    kv_norm = rms_norm("attention.kv_norm", t, r, x, st)
    if x == kernels.FP32:
        # pow saves the slice of wkv_a's output itself: its storage is the whole output.
        kv_norm[0] = replace(kv_norm[0], shape=(t, r + rope))
    out += kv_norm
    out.append(kernels.saved("attention.kv_norm.output", (t, r), x, "MmBackward0", SRC))
    up = math_dtype(st)
    by = "BmmBackward0"
    out += [
        kernels.saved("attn.query_scaled", (b * h, s, nope + rope), up, by, SRC_MATH),
        kernels.saved("attn.key_scaled_t", (b * h, nope + rope, s), up, by, SRC_MATH),
        kernels.saved("attn.softmax", (b, h, s, s), up, "SafeSoftmaxBackward0", SRC_MATH),
    ]
    if up == x and b == 1:
        # matmul's reshape of v (a slice of wkv_b's output) is a view at batch 1: the bmm
        # saves wkv_b's whole output.
        out.append(kernels.saved("attention.wkv_b.output", (t, h * (nope + v)), x, by, SRC_MATH))
    else:
        out.append(kernels.saved("attn.value_bmm", (b * h, s, v), up, by, SRC_MATH))
    # The math result cast back, transposed to [b, s, h, v] and `.contiguous()`: wo's input.
    out.append(kernels.saved("attention.wo.input", (t, h * v), x, "MmBackward0", SRC))
    return out


def selective_kept(arch: Architecture, st: Setting) -> list[Saved]:
    """What SelectiveAC keeps of the math SDPA on CPU: its two bmm outputs (`aten.bmm` is in
    torch._functorch.partitioners.get_default_op_list().compute_intensive_ops, not in
    SelectiveAC's counted mm ops), q k^T [b x h, s, s] and the attention times v
    [b x h, s, v], in the math dtype."""
    _, _, _, _, v, h = dims(arch)
    b, s = st.batch, st.sequence
    up = math_dtype(st)
    src = "torchtitan 0.3.0 distributed/activation_checkpoint.py::_get_default_save_ops"
    return [
        kernels.saved("attn.scores_bmm", (b * h, s, s), up, "MUST_SAVE", src),
        kernels.saved("attn.output_bmm", (b * h, s, v), up, "MUST_SAVE", src),
    ]
