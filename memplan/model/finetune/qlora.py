"""QLoRA's base model: transformers' BitsAndBytesConfig(load_in_4bit=True) and peft's
prepare_model_for_kbit_training as an inventory transform (`quantize_4bit`), and the weight
each 4-bit matmul dequantizes (`dequantized_weight_bytes`, a transient of the step). The LoRA
adapters on top come from memplan.model.finetune.lora. Pure: no torch, no I/O. The formulas
are cited from bitsandbytes' source and held to its own tensors by `memplan verify` on the CPU
(bitsandbytes 0.46 and later run 4-bit there: tests/test_qlora_verify.py) and on CUDA
(tests/test_finetune_gpu.py).
"""

from __future__ import annotations

import re
from dataclasses import replace

from memplan.config.finetune import FinetuneSpec
from memplan.errors import MemplanError
from memplan.model.inventory import Inventory, TensorSpec
from memplan.model.module_tree import FINETUNE_NOTE, frozen, leaf, modules, owner
from memplan.precision import dtype_bytes

SRC_BNB_REPLACE = (
    "transformers 5.24 integrations/bitsandbytes.py::replace_with_bnb_linear "
    "(nn.Linear and Conv1D only); quantizers/base.py::get_keys_to_not_convert"
)
SRC_BNB_QUANT = (
    "bitsandbytes 0.50.1 functional.py::quantize_4bit, _ops.py (quantize_4bit fake: packed "
    "[(n + 1) // 2, 1] uint8, absmax [ceil(n / blocksize)] fp32), nn/modules.py::Params4bit"
)
SRC_BNB_BIAS = "bitsandbytes 0.50.1 nn/modules.py::Linear4bit.forward"
SRC_FSDP2_BIAS = (
    "torch 2.13 distributed/fsdp/_fully_shard/_fsdp_param.py::FSDPParam.init_unsharded_param "
    "(after the first all-gather the unsharded nn.Parameter is kept and later all-gathers "
    "write into all_gather_outputs, which it no longer views once `.data` is reassigned), "
    "to_unsharded / to_sharded (the module's attribute swapped between the two parameters)"
)
SRC_BNB_DEQUANT = (
    "bitsandbytes 0.50.1 autograd/_functions.py::MatMul4Bit (F.dequantize_4bit(B, "
    "ctx.state).to(dtype)), backends/cuda/ops.py::_gemm_4bit_use_custom_cuda"
)

SRC_LIGHTNING_QUANT = (
    "lightning 2.6 fabric/plugins/precision/bitsandbytes.py::_Linear4bit.quantize "
    "(`weight.contiguous().to(device=device, dtype=torch.half)`, then quantize_4bit with the "
    "Params4bit's blocksize, compress_statistics and quant_type)"
)
LIGHTNING_STATE_DTYPE = "fp16"
"""The dtype Lightning quantizes every weight from (SRC_LIGHTNING_QUANT): QuantState.dtype,
what dequantize_4bit returns before MatMul4Bit's `.to(A.dtype)`."""

# bitsandbytes: Params4bit / quantize_4bit's default blocksize (transformers passes none), the
# nested (double) quantization of the absmax in blocks of 256 with the 8-bit dynamic map
# (functional.py::quantize_4bit: `quantize_blockwise(_absmax - offset, blocksize=256)`), the
# 16-entry 4-bit code (functional.py::get_4bit_type: `torch.tensor(data)` of 16 floats, made
# for each quantized weight) and the 256-entry dynamic map the nested state copies
# (quantize_blockwise: `code.to(A.device, copy=True)`).
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
BNB_4BIT_CODE_ELEMS = 16
BNB_DYNAMIC_MAP_ELEMS = 256
# Two 4-bit values per byte of uint8 storage (_ops.py: `(n + 1) // (itemsize * 2)` rows).
BNB_VALUES_PER_BYTE = 2


def quantize_4bit(
    inventory: Inventory,
    ft: FinetuneSpec,
    *,
    compute: str,
    state_dtype: str | None = None,
    sharded: bool = False,
) -> Inventory:
    """transformers BitsAndBytesConfig(load_in_4bit=True) then peft
    prepare_model_for_kbit_training: which modules become bnb Linear4bit, and what each holds.

    Every nn.Linear and Conv1D module is replaced (SRC_BNB_REPLACE) except those that
    `skip_modules` (llm_int8_skip_modules) names, or by default the output embedding, tied
    weights and the module of the last parameter (get_keys_to_not_convert). A quantized
    weight of n elements becomes (SRC_BNB_QUANT):
      packed weight      [(n + 1) // 2, 1] uint8 (two 4-bit codes per byte), a frozen Params4bit;
      absmax             [ceil(n / 64)] fp32, or uint8 with double quantization;
      quant_map          [16] fp32, the nf4 / fp4 code (one per weight);
      with double quantization: nested_absmax [ceil(blocks / 256)] fp32, nested_quant_map
      [256] fp32 (a copy of the 8-bit dynamic map per weight) and offset, a 0-dim fp32.
    The quantization state is not a parameter; memplan lists it with the buffers (held whole
    by every rank, no gradient). prepare_kbit (peft utils/other.py::
    prepare_model_for_kbit_training) then casts every other 16-bit parameter to fp32.
    `state_dtype`: as `dequantized_weight_bytes`'s (Lightning's fp16), for the note.
    """
    mods = modules(inventory)
    skip = default_skips(inventory) if ft.skip_modules is None else None
    if skip is None:
        _refuse_tied_4bit(ft, [m.name for m in mods.values() if m.alias and m.kind == "linear"])
    quantized = [
        m.name
        for m in mods.values()
        if m.kind in ("linear", "conv1d")
        and not m.alias
        and not (skip is not None and m.output)
        and not _skipped(m.name, ft, skip)
    ]
    chosen = set(quantized)
    params: list[TensorSpec] = []
    states: list[TensorSpec] = []
    for t in inventory.parameters:
        if owner(t.name) in chosen and leaf(t.name) == "weight":
            params.append(packed_weight(t, ft.quant_storage))
            states += quant_state(t, double=ft.double_quant)
        elif owner(t.name) in chosen and leaf(t.name) == "bias" and not sharded:
            # Linear4bit's first forward casts its bias to the compute dtype for good
            # (SRC_BNB_BIAS: `bias.data = bias.data.to(x.dtype)`), whatever prepare_kbit made.
            # Under FSDP2 that cast lands on the unsharded parameter only (SRC_FSDP2_BIAS):
            # the sharded bias keeps the dtype below.
            params.append(replace(frozen(t), dtype=compute))
        elif ft.prepare_kbit and t.dtype is None:
            params.append(replace(t, dtype="fp32", trainable=False))
        else:
            params.append(frozen(t))
    upcast = "; other parameters upcast to fp32 (prepare_model_for_kbit_training)"
    largest = max((t.numel for t in inventory.parameters if owner(t.name) in chosen), default=0)
    transient = dequantized_weight_bytes(
        largest, compute=compute, double=ft.double_quant, state_dtype=state_dtype
    )
    held = compute if state_dtype in (None, compute) else f"{state_dtype}, then {compute}"
    note = (
        f"{FINETUNE_NOTE} {len(quantized)} Linear modules in 4-bit {ft.quant_type} "
        f"(blocksize {BNB_4BIT_BLOCKSIZE}, double quantization "
        f"{'on' if ft.double_quant else 'off'}), quantization state counted with the buffers"
        f"{upcast if ft.prepare_kbit else ''}. Each 4-bit Linear dequantizes its weight for "
        f"its matmuls: one layer's worth, {transient:,} B for the largest ({largest:,} "
        f"elements in {held}), alive during its forward and backward (transient "
        "qlora_dequantized_weight)."
    )
    return replace(
        inventory,
        parameters=tuple(params),
        buffers=(*inventory.buffers, *states),
        notes=(*inventory.notes, note),
    )


SRC_FSDP_QLORA = (
    "bitsandbytes 0.50.2 docs/source/fsdp_qlora.md (bnb_4bit_quant_storage set to the load "
    "dtype so FSDP can shard the packed weights), nn/modules.py::"
    "fix_4bit_weight_quant_state_from_module (the quantization state restored from the "
    "module after FSDP swaps the parameter)"
)


def refuse_engine(ft: FinetuneSpec, *, engine: str, stage: int) -> None:
    """The engines QLoRA is modelled under: DDP, DeepSpeed ZeRO 0-2 (the frozen 4-bit base
    whole on every rank) and FSDP2 (`fully_shard`), HF's FSDP-QLoRA recipe
    (SRC_FSDP_QLORA) with or without prepare_model_for_kbit_training: every rank holds its
    dim-0 shard of each packed weight and the whole quantization state, and all-gathers a
    unit's parameters each in its own dtype (memplan.states.engines.fsdp2.buffers.OWN_DTYPE:
    the packed weights in quant_storage, peft's fp32 adapters, prepare_kbit's fp32 root).
    Each measured by `memplan verify` on two CPU gloo ranks (benchmarks/qlora_verify.py,
    benchmarks/qlora_fsdp_probe.py for what does not run)."""
    if engine in ("ddp", "fsdp2") or (engine == "deepspeed" and stage < 3):
        return
    if engine == "fsdp1":
        raise MemplanError(
            "qlora under engine fsdp1 is not modelled: FullyShardedDataParallel flattens each "
            "unit into one tensor and refuses the mix of the packed 4-bit weights and peft's "
            'fp32 adapters (torch 2.13 fsdp/_flat_param.py: "Must flatten tensors with '
            'uniform dtype but got torch.bfloat16 and torch.float32", measured on CPU with '
            "bnb_4bit_quant_storage bf16 and a decoder-layer wrap policy). Use engine fsdp2 "
            "or ddp.",
            field="parallelism.engine",
        )
    raise MemplanError(
        f"qlora with engine {engine} (ZeRO stage {stage}) is not modelled: sharding 4-bit "
        "weights needs bnb_4bit_quant_storage and keeps the quantization state per rank. "
        "Use engine: ddp, fsdp2, or deepspeed with zero_stage 0-2 "
        "(the frozen 4-bit base stays whole on every rank).",
        field="finetune.method",
    )


def _refuse_tied_4bit(ft: FinetuneSpec, aliases: list[str]) -> None:
    """skip_modules that leave a tied output embedding (`aliases`: GPT-2's and tied Llama's
    lm_head) to be quantized describe a job that does not run: transformers replaces the
    head with a Linear4bit and ties its weight back to the 16-bit embedding, and the first
    forward fails in bitsandbytes 0.50.2 nn/modules.py::fix_4bit_weight_quant_state_from_module
    (`assert module.weight.shape[1] == 1`: the weight is not packed). Measured by `memplan
    verify` on the CPU (transformers 5.25, tie_word_embeddings: true, skip_modules: [])."""
    quantized = [name for name in aliases if not _skipped(name, ft, None)]
    if quantized:
        raise MemplanError(
            f"{list(ft.skip_modules or ())} leaves {', '.join(quantized)} to be quantized, but its "
            "weight is tied to the input embedding: transformers ties the 16-bit embedding "
            "back into the 4-bit Linear and bitsandbytes' first forward fails (nn/modules.py::"
            "fix_4bit_weight_quant_state_from_module: `assert module.weight.shape[1] == 1`). "
            f"Add {quantized[0]!r} to skip_modules, or leave skip_modules unset (transformers "
            "then keeps tied weights unquantized).",
            field="finetune.skip_modules",
        )


def dequantized_weight_bytes(
    numel: int, *, compute: str, double: bool, state_dtype: str | None = None
) -> int:
    """The transient of one 4-bit Linear's matmul: bitsandbytes MatMul4Bit dequantizes the
    whole weight into the compute dtype (autograd/_functions.py::MatMul4Bit.backward:
    `F.dequantize_4bit(B, ctx.state).to(grad_output.dtype)`, 0.50.1; the forward too up to
    0.49, and in 0.50 for more than a few rows: backends/cuda/ops.py::
    _gemm_4bit_use_custom_cuda), after dequantizing a nested absmax to fp32
    (functional.py::dequantize_4bit). Only one layer's weight is alive at a time.

    `state_dtype`: the dtype the weight was quantized from (QuantState.dtype, what
    dequantize_4bit returns) when it differs from the compute dtype, as under Lightning
    (SRC_LIGHTNING_QUANT: fp16): `.to(compute)` then copies the fp16 weight while it is
    alive, two copies at once (the nested absmax is freed when dequantize_4bit returns)."""
    if state_dtype is not None and state_dtype != compute:
        return numel * (dtype_bytes(state_dtype) + dtype_bytes(compute))
    blocks = -(-numel // BNB_4BIT_BLOCKSIZE)
    return numel * dtype_bytes(compute) + (blocks * dtype_bytes("fp32") if double else 0)


def default_skips(inventory: Inventory) -> set[str]:
    """transformers quantizers/base.py::get_keys_to_not_convert: both sides of every tied
    pair, the module of the last parameter, and the output embedding (caught by
    `Module.output`)."""
    names = {owner(n) for pair in inventory.tied for n in pair}
    if inventory.parameters:
        names.add(owner(inventory.parameters[-1].name))
    return names


def _skipped(name: str, ft: FinetuneSpec, default: set[str] | None) -> bool:
    """Whether a Linear stays unquantized. Without skip_modules: the default skips (and the
    output embedding). With them, transformers quantizers_utils.py::should_convert_module: a
    pattern skips a module when it matches from the start up to a module boundary (as a
    regex), or is a suffix of its name."""
    if default is not None:
        return name in default
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(
        re.match(rf"(?:{key}){boundary}", name) or name.endswith(key)
        for key in ft.skip_modules or ()
    )


def dequantize_transient(
    inventory: Inventory, ft: FinetuneSpec, *, compute: str, state_dtype: str | None = None
) -> tuple[int, str] | None:
    """(bytes, formula) of the largest 4-bit weight dequantized for its matmul
    (`dequantized_weight_bytes`), from the packed weights of a `quantize_4bit` inventory;
    None without qlora. `state_dtype`: as `dequantized_weight_bytes`'s."""
    if ft.method != "qlora":
        return None
    numel = max(
        (t.shape[0] * values_per_element(t) for t in inventory.parameters if _is_packed(t)),
        default=0,
    )
    if not numel:
        return None
    n = dequantized_weight_bytes(
        numel, compute=compute, double=ft.double_quant, state_dtype=state_dtype
    )
    if state_dtype is not None and state_dtype != compute:
        return n, (
            f"the largest 4-bit weight, {numel:,} elements, dequantized to {state_dtype} "
            f"({dtype_bytes(state_dtype)} B) and copied to {compute} ({dtype_bytes(compute)} B)"
        )
    return n, (
        f"the largest 4-bit weight, {numel:,} elements x {dtype_bytes(compute)} B ({compute})"
        + (" + its nested absmax in fp32" if ft.double_quant else "")
    )


SRC_BNB_BACKWARD = (
    "bitsandbytes 0.50.2 autograd/_functions.py::MatMul4Bit.backward (`torch.matmul("
    "grad_output, F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))`), functional.py::"
    "dequantize_4bit (returns QuantState.dtype, the dtype the weight was loaded in), nn/"
    "modules.py::Linear4bit.forward (`bnb.matmul_4bit(x.to(self.compute_dtype), ...).to("
    "inp_dtype)`: the matmul in bnb_4bit_compute_dtype, its output handed back in the input's)"
)


def backward_dequantized(
    inventory: Inventory, ft: FinetuneSpec, *, compute: str, state_dtype: str
) -> tuple[int, str] | None:
    """(bytes, formula) of the largest 4-bit weight of a decoder layer dequantized for its
    input's gradient (the LM head's is `head_backward`'s: its backward runs before the
    layers'), when transformers loaded the model in `state_dtype` (the recipe's parameter
    dtype: QuantState.dtype) and the matmul runs in `compute` (SRC_BNB_BACKWARD):
    dequantize_4bit returns the weight in `state_dtype` and `.to(grad_output.dtype)` copies
    it to `compute` while it is alive, both at once where they differ
    (`dequantized_weight_bytes`). None without qlora. Measured on the CPU
    (benchmarks/qlora_verify.py, amp-bf16: the weights loaded in fp32, dequantized to fp32 and
    cast to bf16 in backward)."""
    if ft.method != "qlora":
        return None
    numel = max(
        (
            t.shape[0] * values_per_element(t)
            for t in inventory.parameters
            if _is_packed(t) and t.role != "head"
        ),
        default=0,
    )
    if not numel:
        return None
    n = dequantized_weight_bytes(
        numel, compute=compute, double=ft.double_quant, state_dtype=state_dtype
    )
    if state_dtype == compute:
        return n, (
            f"the largest 4-bit weight of a layer, {numel:,} elements x "
            f"{dtype_bytes(compute)} B ({compute})"
            + (" + its nested absmax in fp32" if ft.double_quant else "")
        )
    return n, (
        f"the largest 4-bit weight of a layer, {numel:,} elements, dequantized to "
        f"{state_dtype} ({dtype_bytes(state_dtype)} B, the dtype it was loaded in) and cast to "
        f"{compute} ({dtype_bytes(compute)} B) for its input's gradient"
    )


def head_backward(
    inventory: Inventory,
    ft: FinetuneSpec,
    *,
    compute: str,
    state_dtype: str,
    logits_elems: int,
    loss_backward_bytes: int,
) -> tuple[int, str] | None:
    """(bytes, formula) the backward of a 4-bit LM head (`skip_modules` that do not keep it)
    holds beyond the loss's backward just before it; None when the head is not 4-bit.

    Linear4bit runs its matmul in the compute dtype and hands the logits back in its input's
    dtype (SRC_BNB_BACKWARD), so by MatMul4Bit's backward the logits' gradient has been cast
    to the compute dtype (by Linear4bit's `.to(inp_dtype)`, or by the loss's `.float()` where
    the logits were 16-bit; the fp32 gradient is freed once cast), and the head's weight is
    dequantized beside it (`dequantized_weight_bytes`, in the dtype it was loaded in, then
    cast to the compute dtype). The loss's backward before it held its log-softmax and two
    fp32 [tokens, vocab] gradients (`loss_backward_bytes`), all freed by then; the rest of
    what is alive is the same at both moments. So the step's peak at the loss's backward is
    the higher of the two, and this term is what the head's moment holds more (0 where
    less). Measured on the CPU by `memplan verify` (benchmarks/qlora_verify.py: amp-bf16
    with the head quantized, the head's moment 66,624 B above the loss's; bf16, below it)."""
    if ft.method != "qlora":
        return None
    numel = max(
        (
            t.shape[0] * values_per_element(t)
            for t in inventory.parameters
            if _is_packed(t) and t.role == "head"
        ),
        default=0,
    )
    if not numel or logits_elems <= 0:
        return None
    weight = dequantized_weight_bytes(
        numel, compute=compute, double=ft.double_quant, state_dtype=state_dtype
    )
    gradient = logits_elems * dtype_bytes(compute)
    held = gradient + weight
    return max(0, held - loss_backward_bytes), (
        f"the 4-bit head's backward: the logits' gradient, {logits_elems:,} elements x "
        f"{dtype_bytes(compute)} B ({compute}), + its weight dequantized, {weight:,} B "
        f"({numel:,} elements"
        + (
            f" in {state_dtype}, cast to {compute})"
            if state_dtype != compute
            else f" in {compute}" + (" + the nested absmax in fp32)" if ft.double_quant else ")")
        )
        + f" = {held:,} B, less the loss's log-softmax and gradients freed by then "
        f"({loss_backward_bytes:,} B); 0 when less"
    )


STORAGE_DTYPES = ("uint8", "bf16", "fp16", "fp32")
"""The dtypes `bnb_4bit_quant_storage` may name (memplan.config.finetune.FinetuneSpec)."""


def fsdp2_bias_copies(
    inventory: Inventory, ft: FinetuneSpec, *, compute: str, parameters: str
) -> tuple[int, str] | None:
    """(bytes, formula) of the 4-bit Linears' biases FSDP2 keeps unsharded in the compute
    dtype on every rank, from a `quantize_4bit(sharded=True)` inventory; None where no bias
    is cast. Linear4bit's forward (SRC_BNB_BIAS) reassigns `.data` of the module's bias, which
    under FSDP2 is the unsharded parameter (to_unsharded): from the first forward on, that
    nn.Parameter holds a private copy of the whole bias in `compute`, no longer a view of the
    all-gather output, and FSDP2 keeps it between steps (init_unsharded_param returns early
    after the first all-gather; reshard frees only all_gather_outputs) while the sharded bias
    keeps its own dtype (SRC_FSDP2_BIAS; measured by benchmarks/qlora_verify.py's Qwen2
    FSDP2 cases). `parameters`: the recipe's dtype of a parameter held in none of its own."""
    if ft.method != "qlora":
        return None
    packed = {owner(t.name) for t in inventory.parameters if _is_packed(t)}
    cast = [
        t
        for t in inventory.parameters
        if leaf(t.name) == "bias" and owner(t.name) in packed and (t.dtype or parameters) != compute
    ]
    if not cast:
        return None
    numel = sum(t.numel for t in cast)
    formula = (
        f"{len(cast)} 4-bit Linear biases, {numel:,} elements x {dtype_bytes(compute)} B "
        f"({compute}), whole on every rank"
    )
    return numel * dtype_bytes(compute), formula


def is_packed(t: TensorSpec) -> bool:
    """Whether `t` is a bnb Params4bit as `packed_weight` makes it: frozen, [rows, 1] in a
    storage dtype. (A Linear's own weight is [out, in]: never [rows, 1] in practice.)"""
    return t.dtype in STORAGE_DTYPES and len(t.shape) == 2 and t.shape[1] == 1 and not t.trainable


_is_packed = is_packed


def values_per_element(t: TensorSpec) -> int:
    """4-bit values one element of a packed weight holds: two per byte of its dtype."""
    return BNB_VALUES_PER_BYTE * dtype_bytes(t.dtype or "uint8")


def packed_weight(t: TensorSpec, storage: str = "uint8") -> TensorSpec:
    """A bnb Params4bit: [(n + 1) // (2 x width), 1] in the `storage` dtype
    (bnb_4bit_quant_storage: uint8 by default), frozen (SRC_BNB_QUANT)."""
    rows = (t.numel + 1) // (BNB_VALUES_PER_BYTE * dtype_bytes(storage))
    return replace(t, shape=(rows, 1), dtype=storage, trainable=False)


def quant_state(t: TensorSpec, *, double: bool) -> list[TensorSpec]:
    """The QuantState of one 4-bit weight of n elements (SRC_BNB_QUANT; names as
    QuantState.as_dict writes them)."""
    blocks = -(-t.numel // BNB_4BIT_BLOCKSIZE)

    def state(leaf: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
        return TensorSpec(
            f"{t.name}.{leaf}", shape, "buffer", dtype, layer=t.layer, role="quant_state"
        )

    out = [
        state("absmax", (blocks,), "uint8" if double else "fp32"),
        state("quant_map", (BNB_4BIT_CODE_ELEMS,), "fp32"),
    ]
    if double:
        nested = -(-blocks // BNB_NESTED_BLOCKSIZE)
        out += [
            state("nested_absmax", (nested,), "fp32"),
            state("nested_quant_map", (BNB_DYNAMIC_MAP_ELEMS,), "fp32"),
            state("nested_offset", (), "fp32"),
        ]
    return out
