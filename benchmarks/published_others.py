"""memplan against other third-party GPU measurements, each in the metric its source measured.

Sources (each copied with its settings and our assumptions under benchmarks/reference/):
- hf-bert: Hugging Face Transformers docs, "Efficient Training on a Single GPU" (early 2022):
  bert-large-uncased sequence classification on a V100 16GB, nine Trainer runs, NVML used
  memory after `trainer.train()` (hf-transformers-bert-large-v100.md).
- titan-h200: torchtitan `benchmarks/llama3_8b_h200_2025-06_torchtitan.md` (Trainy, June 2025):
  Llama 3.1 8B, FSDP over 32 and 64 H200s, max reserved (torchtitan-llama3-8b-h200-trainy.md).
- litgpt: LitGPT `tutorials/resource-tables.md` (October 2023): LoRA on Llama 2 7B and 13B,
  StableLM Alpha 3B, phi-1.5 and Falcon 40B on one A100 40GB, max allocated
  (litgpt-lora-a100.md), and its Llama 2 7B adapter / adapter_v2 rows without quantization
  (the other adapter rows are not here: the same file says why). The runs it
  printed as "OOM" are rows too: memplan's verdict on them must be "does not fit".

The metric maps to memplan's figure of the same spec (its most loaded rank):
`max_allocated` -> `per_gpu.peak`, `max_reserved` -> `per_gpu.peak_reserved`, `nvidia_smi` ->
`per_gpu.device_used`. Each row is written as the memplan spec that describes it; a row memplan
cannot express (a spec key or value it refuses, a profile it will not trace, activations it does
not model) is listed with the refusal instead of a number. A row whose source used a technique
memplan does not model carries it in `unmodelled` and stays out of the counts.

Rows marked `trace` have no hand activation rule (BertForSequenceClassification): their activations
come from a profile traced from transformers' model under fake tensors, as `memplan profile` does,
so this script needs torch and transformers (memplan[verify]); it traces into a temporary
MEMPLAN_CACHE, never the user's.

    python benchmarks/published_others.py   # about 20 s; writes
                                            # benchmarks/results/published-others.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from memplan.config.load import validate
from memplan.errors import MemplanError
from memplan.model.load import load_inventory
from memplan.report.estimate import estimate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30

Metric = Literal["max_allocated", "max_reserved", "nvidia_smi"]
FIGURE: dict[str, str] = {
    "max_allocated": "per_gpu.peak",
    "max_reserved": "per_gpu.peak_reserved",
    "nvidia_smi": "per_gpu.device_used",
}
UNIT_BYTES: dict[str, int] = {"MiB": MIB, "GiB": GIB, "GB": 10**9}

SOURCES: dict[str, dict[str, str]] = {
    "hf-bert": {
        "title": "Hugging Face Transformers docs, Efficient Training on a Single GPU (2022)",
        "url": "https://huggingface.co/docs/transformers/ko/perf_train_gpu_one",
        "reference": "benchmarks/reference/hf-transformers-bert-large-v100.md",
        "metric": "nvidia_smi",
    },
    "titan-h200": {
        "title": "torchtitan benchmarks/llama3_8b_h200_2025-06_torchtitan.md (Trainy)",
        "url": "https://github.com/pytorch/torchtitan/blob/main/benchmarks/"
        "llama3_8b_h200_2025-06_torchtitan.md",
        "reference": "benchmarks/reference/torchtitan-llama3-8b-h200-trainy.md",
        "metric": "max_reserved",
    },
    "litgpt": {
        "title": "LitGPT tutorials/resource-tables.md, LoRA on 1 GPU (2023-10-20)",
        "url": "https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md",
        "reference": "benchmarks/reference/litgpt-lora-a100.md",
        "metric": "max_allocated",
    },
}


@dataclass(frozen=True)
class Row:
    source: str
    """A key of SOURCES."""
    label: str
    """The source's words for the run."""
    published: float | None
    """None: the source printed "OOM" (the run did not fit the GPU): memplan's verdict on the
    row's spec must be that it does not fit."""
    unit: Literal["MiB", "GiB", "GB"]
    """As the source prints it (NVML's `// 1024**2` "MB" are MiB; LitGPT's `/ 1e9` "GB" are GB)."""
    spec: dict[str, Any]
    unmodelled: tuple[str, ...] = ()
    """Techniques the run used that memplan does not model: its figure is shown, but the row is
    left out of the counts."""
    trace: bool = False
    """No hand activation rule: trace a profile first (needs torch and transformers)."""
    notes: tuple[str, ...] = ()
    """What the source ran that differs from what memplan models, with its size where known
    (the row stays in the counts)."""

    @property
    def metric(self) -> str:
        return SOURCES[self.source]["metric"]


# google-bert/bert-large-uncased config.json
# (https://huggingface.co/google-bert/bert-large-uncased/blob/main/config.json), built as
# AutoModelForSequenceClassification builds it (2 labels, transformers' default num_labels).
BERT_LARGE: dict[str, Any] = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}


def hf_bert(
    mbs: int, ga: int, *, gc: bool = False, fp16: bool = False, optim: str = "adamw"
) -> dict[str, Any]:
    """One run of the HF page: Trainer defaults of transformers 4.16 on torch 1.10 (assumed;
    benchmarks/reference/hf-transformers-bert-large-v100.md says why)."""
    optimizer: dict[str, Any] = {"name": optim}
    if optim in ("adamw", "adafactor-hf"):
        # transformers.optimization.AdamW and .Adafactor: a loop over the parameters
        optimizer["implementation"] = "for_loop"
    return {
        "model": {"architecture": BERT_LARGE},
        "precision": {"preset": "amp-fp16" if fp16 else "fp32"},
        "optimizer": optimizer,
        "training": {
            "micro_batch_size": mbs,
            "sequence_length": 512,
            "gradient_accumulation_steps": ga,
            "attention": "eager",
            "activation_checkpointing": "full" if gc else "none",
            # Trainer 4.16: model.zero_grad(), torch 1.10's set_to_none=False.
            "zero_grad": "zero",
            # torch 1.10's SoftmaxBackward0 keeps softmax's input beside its output (1.10.0
            # wheel, autograd/generated/Functions.h: `self_`, `result_`; pytorch/pytorch#64000,
            # fixed in 1.11): one [batch, 16, 512, 512] fp32 tensor more per layer
            # (benchmarks/reference/bert-2022-gap.md, benchmarks/bert_2022_stack.py).
            "softmax_saves_input": True,
        },
        "hardware": {
            "gpu": "V100-32GB",
            "memory": "16160MiB",  # the page's nvidia-smi: Tesla V100-SXM2, 16160MiB
            "cuda_version": 11,
            "cuda_lazy_loading": False,
            # The page's idle reading, 1343 MiB, less the 2 MiB segment its tensor reserved.
            "cuda_context": "1341MiB",
        },
    }


def titan_h200(gpus: int) -> dict[str, Any]:
    """torchtitan e7c0cae's llama3_8b.toml with the run's overrides (the reference file)."""
    return {
        "model": {"preset": "llama-3.1-8b", "implementation": "torchtitan"},
        # --float8.enable_fsdp_float8_all_gather --float8.precompute_float8_dynamic_scale_for_fsdp
        # (e7c0cae components/quantization/float8.py::Float8Converter: tensorwise).
        "precision": {
            "preset": "bf16-mixed",
            "fp8": "torchao-tensorwise",
            "fp8_all_gather": True,
            "fp8_precompute_scale": True,
        },
        "optimizer": {"name": "adamw", "implementation": "foreach"},
        "training": {
            "micro_batch_size": 2,
            "sequence_length": 8192,
            "attention": "sdpa",
            "activation_checkpointing": "selective-op",
            "compile": True,
            # e7c0cae components/loss.py::build_cross_entropy_loss compiles the loss with the
            # model (`cross_entropy(pred.flatten(0, 1).float(), labels)`), as 0.3.0 does.
            "compile_loss": True,
        },
        # apply_fsdp at e7c0cae: each block, then the root (tok_embeddings, norm, output).
        "parallelism": {"engine": "fsdp2", "fsdp_wrap": "layers", "data": gpus},
        # torchrun called directly (not run_train.sh): PYTORCH_CUDA_ALLOC_CONF assumed unset.
        "hardware": {"gpu": "H200", "gpus_per_node": 8},
    }


# meta-llama/Llama-2-13b-hf config.json (https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/
# main/config.json), its size keys; the same sizes as litgpt 0.5.9 config.py's "Llama-2-13b{}-hf"
# entry (n_layer 40, n_head 40, n_embd 5120, intermediate_size 13824, vocab_size 32000).
LLAMA_2_13B: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "max_position_embeddings": 4096,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}


# stabilityai/stablelm-base-alpha-3b config.json
# (https://huggingface.co/stabilityai/stablelm-base-alpha-3b/blob/main/config.json), its size
# keys: GPT-NeoX with parallel residual and a quarter of each head rotated; the same sizes as
# litgpt 0.5.9 config.py's "stablelm-base-alpha-3b" entry (Config's defaults: n_layer 16,
# n_head 32, n_embd 4096, GptNeoxMLP 4 x n_embd, rotary_percentage 0.25, LayerNorm, biases,
# padded vocabulary 50688).
STABLELM_ALPHA_3B: dict[str, Any] = {
    "model_type": "gpt_neox",
    "architectures": ["GPTNeoXForCausalLM"],
    "hidden_act": "gelu",
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "use_parallel_residual": True,
    "vocab_size": 50688,
}
# microsoft/phi-1_5 config.json (https://huggingface.co/microsoft/phi-1_5/blob/main/config.json),
# its size keys (transformers 5.25 PhiConfig's defaults are the same); the same sizes as litgpt
# 0.5.9 config.py's "phi-1_5" entry (n_layer 24, n_embd 2048, n_head 32, GptNeoxMLP 4 x n_embd,
# rotary_percentage 0.5, shared_attention_norm, biases, lm_head_bias, gelu_approximate tanh,
# padded vocabulary 51200; tests/test_phi_family.py checks the parameter count).
PHI_1_5: dict[str, Any] = {
    "model_type": "phi",
    "architectures": ["PhiForCausalLM"],
    "hidden_act": "gelu_new",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "partial_rotary_factor": 0.5,
    "tie_word_embeddings": False,
    "vocab_size": 51200,
}
# tiiuae/falcon-40b config.json (https://huggingface.co/tiiuae/falcon-40b/blob/main/config.json),
# its size keys; the same sizes as lit-gpt 8641822 lit_gpt/config.py's "falcon-40b" entry
# (n_layer 60, n_head 128, n_embd 8192, n_query_groups 8, bias False, rotary_percentage 1.0,
# padded_vocab_size 65024; Config's defaults: parallel_residual, two LayerNorms, GptNeoxMLP
# 4 x n_embd) and litgpt 0.5.9's.
FALCON_40B: dict[str, Any] = {
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "alibi": False,
    "bias": False,
    "hidden_size": 8192,
    "layer_norm_epsilon": 1e-05,
    "new_decoder_architecture": True,
    "num_attention_heads": 128,
    "num_hidden_layers": 60,
    "num_kv_heads": 8,
    "parallel_attn": True,
    "vocab_size": 65024,
}
LITGPT_MODELS: dict[str, dict[str, Any]] = {
    "13b": {"architecture": LLAMA_2_13B, "implementation": "litgpt"},
    "stablelm-3b": {"architecture": STABLELM_ALPHA_3B, "implementation": "litgpt"},
    "phi-1.5": {"architecture": PHI_1_5, "implementation": "litgpt"},
    "falcon-40b": {"architecture": FALCON_40B, "implementation": "litgpt"},
}
LONGEST = {"7b": 1304, "13b": 1304, "stablelm-3b": 1034, "phi-1.5": 1044, "falcon-40b": 1079}
"""The longest Alpaca example in each model's tokens (the reference file): forced first."""


def litgpt(mbs: int, quantize: str | None = None, size: str = "7b") -> dict[str, Any]:
    """lit-gpt 8641822 finetune/lora.py on Llama 2 7B or 13B, StableLM Alpha 3B, phi-1.5 or
    Falcon 40B (the reference file)."""
    lora: dict[str, Any] = {
        "method": "qlora" if quantize else "lora",
        "rank": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
    }
    if size in ("stablelm-3b", "phi-1.5", "falcon-40b"):
        # Left out, the targets are LitGPT's default, lora_query + lora_value
        # (memplan.model.stacks.litgpt_lora_adapters.flags_of and default_targets).
        del lora["target_modules"]
    if quantize:
        # The reference file's bitsandbytes 0.41.1: MatMul4Bit keeps each 4-bit matmul's input.
        # lit-gpt 8641822's finetune/lora.py::main has no StableEmbedding swap (litgpt PR #1770,
        # commit ae798aba, first tagged v0.5.0): the embedding stays the frozen model's.
        lora |= {
            "quant_type": "nf4",
            "double_quant": quantize == "bnb.nf4-dq",
            "bnb_version": "0.41.1",
            "stable_embedding": False,
        }
    return {
        "model": LITGPT_MODELS.get(size, {"preset": "llama-2-7b", "implementation": "litgpt"}),
        "precision": {"preset": "bf16"},  # Fabric --precision bf16-true
        # torch.optim.AdamW; with --quantize, bnb.optim.PagedAdamW (32-bit, paged).
        "optimizer": {"name": "paged_adamw" if quantize else "adamw"},
        "finetune": lora,
        "training": {
            "micro_batch_size": mbs,
            "sequence_length": LONGEST[size],
            "gradient_accumulation_steps": 128 // mbs,
        },
        "hardware": {"gpu": "A100-40GB"},
    }


def litgpt_adapter(method: str, size: str = "7b") -> dict[str, Any]:
    """lit-gpt 8641822 finetune/adapter.py or adapter_v2.py on Llama 2 7B or StableLM Alpha 3B
    (LONGEST: 1304 or 1034 tokens), micro-batch 1, no
    quantization (the reference file's adapter rows): `torch.optim.AdamW(trainable_params,
    lr=3e-3, weight_decay=0.02)`, Fabric `--precision bf16-true`, one device (no FSDP, so no
    activation checkpointing: `activation_checkpointing_policy` only under devices > 1),
    `model(input_ids, lm_head_chunk_size=128)` and `chunked_cross_entropy`; the adapter
    defaults adapter_prompt_length 10, adapter_start_layer 2 (memplan's defaults too)."""
    spec = litgpt(1, size=size)
    return spec | {"finetune": {"method": method}}


# lit-gpt 8641822 (git show 8641822:lit_gpt/rmsnorm.py, lit_gpt/model.py, lit_gpt/lora.py,
# finetune/lora.py) against the litgpt 0.5.9 memplan models (memplan.model.stacks.litgpt_lora).
LITGPT_2023 = (
    "version gap: the source ran lit-gpt 8641822 (Oct 2023), memplan models litgpt 0.5.9. "
    "Same in both: LoRAQKVLinear/LoRALinear, mark_only_lora_as_trainable, "
    "model(input_ids, lm_head_chunk_size=128), logits[-1][..., :-1, :], "
    "chunked_cross_entropy, AdamW over the bf16 adapters.",
    "8641822's RMSNorm (lit_gpt/rmsnorm.py: `x * x`, `x * rsqrt(...)`, `weight * x_normed`, "
    "no `x.float()`) keeps its bf16 input and a bf16 rsqrt where 0.5.9's keeps an fp32 copy, "
    "an fp32 rsqrt and the weight's fp32 copy: 0.5.9 saves tokens x 4096 x 2 B more per norm "
    "whose input requires grad (63 + ln_f here), about 0.64 GiB at micro-batch 1 and 1.27 GiB "
    "at 2 (not subtracted).",
    "8641822's attention calls flash_attn.flash_attn_func when flash-attn is installed (its "
    "scaled_dot_product_attention), else SDPA: memplan models SDPA.",
)
LITGPT_QLORA_2023 = (
    "lit-gpt 8641822 with --quantize (git show 8641822:finetune/lora.py): Lightning's "
    "BitsandbytesPrecision(quantize[4:], dtype) quantizes every nn.Linear, the head included, "
    "and the optimizer is bnb.optim.PagedAdamW over the LoRA parameters, as litgpt 0.5.9 "
    "(memplan.model.stacks.litgpt_qlora). bitsandbytes 0.41.1 keeps every 4-bit matmul's input "
    "(MatMul4Bit.forward `ctx.tensors = (A, B)`, finetune.bnb_version 0.41.1): 1.80 GiB here; "
    "with memplan's default bitsandbytes (>= 0.43.2, PR #1270) the rows would be 11.32 and "
    "11.04 GiB (-14.0%, -14.4%).",
    "version gap, modelled: 8641822 has no StableEmbedding swap (litgpt finetune/lora.py::main "
    "adds it from v0.5.0, PR #1770, commit ae798aba), so the rows set finetune.stable_embedding "
    "false: the embedding stays frozen. With the swap (litgpt 0.5.9, memplan's default) they "
    "would be 572,435,456 B higher, +3.7% both (the embedding's bf16 gradient, which 0.5.9's "
    "PagedAdamW never holds or clears, and the replaced weight its param_groups keep, "
    "262,144,000 B each; the LayerNorm's weight and bias and their gradients; its saved input; "
    "layer 0's norm and kept inputs). Version gaps left, not subtracted (LITGPT_2023): "
    "8641822's RMSNorm keeps its bf16 input where 0.5.9 keeps an fp32 copy, 0.64 GiB at "
    "micro-batch 1 (without it memplan would be about 5% under, as the LoRA rows would be about "
    "3.5% under), and 8641822's flash-attn path where installed.",
)

# The same gaps at Llama 2 13B's sizes (hidden 5120, 40 layers, embedding 32,000 x 5,120).
LITGPT_13B_2023 = (
    LITGPT_2023[0],
    "8641822's RMSNorm keeps its bf16 input and a bf16 rsqrt where 0.5.9's keeps an fp32 copy, "
    "an fp32 rsqrt and the weight's fp32 copy (LITGPT_2023): 0.5.9 saves tokens x 5120 x 2 B "
    "more per norm whose input requires grad (79 + ln_f here), about 0.99 GiB at micro-batch 1 "
    "(not subtracted).",
    LITGPT_2023[2],
)
LITGPT_QLORA_13B_2023 = (
    "lit-gpt 8641822 with --quantize, as the 7B rows (LITGPT_QLORA_2023). bitsandbytes 0.41.1 "
    "keeps every 4-bit matmul's input (finetune.bnb_version 0.41.1): 2.82 GiB here; with "
    "memplan's default bitsandbytes (>= 0.43.2) the rows would be 20.08 and 19.48 GB (-13.2%, "
    "-13.6%).",
    "version gap, modelled: no StableEmbedding swap in 8641822 (finetune.stable_embedding "
    "false, as the 7B rows); with 0.5.9's swap the rows would be 715,537,408 B higher, +3.0% "
    "both (mostly two 327,680,000 B tensors: the embedding's bf16 gradient and the replaced "
    "weight). Left, not subtracted: 0.5.9's RMSNorm holds about 0.99 GiB more at micro-batch 1 "
    "(LITGPT_13B_2023; without it memplan would be about 5% under).",
)

LITGPT_STABLELM_2023 = (
    LITGPT_2023[0],
    "StableLM Alpha's LayerNorm is torch.nn.LayerNorm in both lit-gpt 8641822 and litgpt "
    "0.5.9 (no RMSNorm gap, unlike the Llama rows); the LoRA rule for LitGPT's "
    "parallel-residual Block is proved against litgpt 0.5.9's model on CPU "
    "(benchmarks/litgpt_lora_neox.py: 634 of 634 cases exact, StableLM 3B at 1034 tokens too).",
    LITGPT_2023[2],
)
LITGPT_QLORA_STABLELM_2023 = (
    "lit-gpt 8641822 with --quantize, as the Llama rows (LITGPT_QLORA_2023), bitsandbytes "
    "0.41.1 keeping every 4-bit matmul's input (finetune.bnb_version 0.41.1).",
    "version gap, modelled: litgpt 0.5.9's StableEmbedding swap, absent from 8641822, is off "
    "(finetune.stable_embedding false); with it the rows would be 953,363,968 B higher, "
    "+14.2% / +14.6% (the embedding's bf16 gradient and the replaced weight its PagedAdamW "
    "keeps, 50,688 x 4,096 x 2 B = 415 MB each; the StableEmbedding's saved LayerNorm input, "
    "8.5 MB; layer 0's kept inputs, 97 MB). No RMSNorm gap here (LITGPT_STABLELM_2023); "
    "8641822's flash-attn path is the gap left.",
)
LITGPT_PHI_2023 = (
    LITGPT_2023[0],
    "phi-1.5's LayerNorm is torch.nn.LayerNorm in both (no RMSNorm gap, unlike the Llama rows). "
    "lit-gpt 8641822's own phi-1_5 entry was not read: memplan assumes litgpt 0.5.9's "
    "(shared_attention_norm, GptNeoxMLP with GELU tanh, rotary 0.5, biases, lm_head bias, "
    "padded vocabulary 51200). The LoRA rule for LitGPT's Phi Block is proved against litgpt "
    "0.5.9's model on CPU (benchmarks/litgpt_lora_neox.py: 634 of 634 cases exact, 208 of "
    "them Phi's, phi-1.5 at 1044 tokens too).",
    LITGPT_2023[2],
)
LITGPT_QLORA_PHI_2023 = (
    "lit-gpt 8641822 with --quantize, as the Llama rows (LITGPT_QLORA_2023), bitsandbytes "
    "0.41.1 keeping every 4-bit matmul's input (finetune.bnb_version 0.41.1).",
    "version gap, modelled: litgpt 0.5.9's StableEmbedding swap, absent from 8641822, is off "
    "(finetune.stable_embedding false); with it the rows would be 477,202,944 B higher, "
    "+10.5% / +10.6% (the embedding's bf16 gradient and the replaced weight its PagedAdamW "
    "keeps, 51,200 x 2,048 x 2 B = 210 MB each; the StableEmbedding's saved LayerNorm input, "
    "4.3 MB; layer 0's kept inputs, about 45 MB). Gaps left (LITGPT_PHI_2023): 8641822's own "
    "phi-1_5 config, not read, and its flash-attn path.",
)
LITGPT_FALCON_2023 = (
    LITGPT_2023[0],
    "Falcon 40B's LayerNorms are torch.nn.LayerNorm in both lit-gpt 8641822 and litgpt 0.5.9; "
    "8641822's LoRAQKVLinear has 0.5.9's shapes (12,042,240 trainable, as the table says). "
    "Published OOM at every setting: compared by verdict (the A100 40GB must not fit).",
    LITGPT_2023[2],
)
LITGPT_QLORA_FALCON_2023 = (
    "lit-gpt 8641822 with --quantize, as the Llama rows (LITGPT_QLORA_2023), bitsandbytes "
    "0.41.1 keeping every 4-bit matmul's input (finetune.bnb_version 0.41.1); litgpt 0.5.9's "
    "StableEmbedding swap, absent from 8641822, is off (finetune.stable_embedding false: "
    "2,455,647,744 B less than with it).",
    "The verdict rests on bitsandbytes 0.41.1: its kept inputs put memplan at 46.43 / 44.63 GiB "
    "on the device (nf4 / nf4-dq); with bitsandbytes >= 0.43.2 (no input kept) memplan says "
    "39.38 / 37.58 GiB, which fits the A100 40GB.",
)

# The run's float8 flags, each now modelled or shown to change nothing:
# enable_fsdp_float8_all_gather is precision.fp8_all_gather (memplan.states.engines.fsdp2.fp8,
# measured to the byte by benchmarks/fsdp2_float8_all_gather.py);
# precompute_float8_dynamic_scale_for_fsdp is precision.fp8_precompute_scale (one fp32 scale per
# Float8Linear kept between steps: 224 x 4 = 896 B here, in a note); and
# force_recompute_fp8_weight_in_bwd did nothing at the run's torchao 0afa4c1 (2025-06-13): it
# contains pytorch/ao#2356 (03c850afa, "make float8 training's force_recompute_fp8_weight_in_bwd
# flag do nothing"), after which float8/config.py only warns that the flag is deprecated.
LITGPT_ADAPTER_2023 = (
    "version gap: the source ran lit-gpt 8641822 (Oct 2023), memplan models litgpt 0.5.9. "
    "Same in both (git show 8641822:finetune/adapter.py, adapter_v2.py, lit_gpt/adapter.py, "
    "lit_gpt/adapter_v2.py): the prefix of 10 positions from layer 2, fit's no-grad "
    "validate() filling adapter_kv_cache before training (adapter_wte never gets a gradient), "
    "AdamW over the marked parameters, model(input_ids, lm_head_chunk_size=128), "
    "chunked_cross_entropy, no checkpointing on one device.",
    "8641822's RMSNorm keeps its bf16 input and a bf16 rsqrt where 0.5.9's keeps an fp32 copy, "
    "an fp32 rsqrt and the weight's fp32 copy (LITGPT_2023): by the LoRA rows' tokens x 4096 x "
    "2 B per norm whose input requires grad, 0.5.9 holds about 0.64 GB more under adapter (59 "
    "norms + ln_f: none before the first adapted layer's attention) and about 0.68 GB more "
    "under adapter_v2 (63 + ln_f; its norms train too, so the per-norm gap there is an "
    "estimate, not derived). Not subtracted: without it memplan would be about 3% under.",
    LITGPT_2023[2],
    "torch 2.1 vs 2.13: the prefix attention runs the memory-efficient kernel in both (flash "
    "refuses the mask); a torch 2.1-era attention.cpp (pytorch bc8cb280, not confirmed as "
    "2.1.0's) expands the additive mask to [1, 32, T, 10] before padding it, so its saved "
    "bias is [1, 32, 1304, 16] bf16 "
    "(1.34 MB) per adapted layer where 2.13 keeps [1304, 16] (42 kB): about 0.04 GB more in "
    "the source's run (not added).",
)

LITGPT_ADAPTER_STABLELM_2023 = (
    LITGPT_ADAPTER_2023[0],
    "StableLM Alpha's LayerNorm is torch.nn.LayerNorm in both lit-gpt 8641822 and litgpt "
    "0.5.9 (no RMSNorm gap, unlike the Llama rows). The adapter rule for LitGPT's GPT-NeoX "
    "Block (adapter and adapter_v2) is proved against litgpt 0.5.9's Pythia-shaped model on "
    "CPU (benchmarks/litgpt_adapter.py's matrix, `pythia` rows: 32-true, bf16-true, "
    "bf16-mixed; adapter_start_layer 0 and 2; checkpointed too), and the inventory against "
    "litgpt's own stablelm-base-alpha-3b adapter GPTs (names, shapes, dtypes, what trains: "
    "exact).",
    LITGPT_2023[2],
    "torch 2.1 vs 2.13 (LITGPT_ADAPTER_2023): the torch 2.1-era mask expand-then-pad keeps "
    "[1, 32, 1034, 16] bf16 (1.06 MB) per adapted layer where 2.13 keeps [1034, 16]: about "
    "0.014 GB more in the source's run (not added).",
)

TITAN_2025: tuple[str, ...] = ()

ROWS = (
    Row("hf-bert", "bs 4, fp32, AdamW", 14949, "MiB", hf_bert(4, 1), trace=True),
    Row("hf-bert", "bs 1 x GA 4", 8681, "MiB", hf_bert(1, 4), trace=True),
    Row("hf-bert", "bs 1 x GA 4, gradient checkpointing", 6775, "MiB", hf_bert(1, 4, gc=True),
        trace=True),
    Row("hf-bert", "bs 4, fp16 (AMP)", 13939, "MiB", hf_bert(4, 1, fp16=True), trace=True),
    Row("hf-bert", "bs 1 x GA 4, GC, fp16", 7275, "MiB", hf_bert(1, 4, gc=True, fp16=True),
        trace=True),
    # The page's `optim="adafactor"`: the Trainer builds transformers' own
    # transformers.optimization.Adafactor(scale_parameter=False, relative_step=False), not
    # torch.optim.Adafactor (transformers 4.16 trainer.py::get_optimizer_cls_and_kwargs, as
    # 5.25 trainer_optimizer.py::_get_adafactor): memplan's adafactor-hf.
    Row("hf-bert", "bs 4, Adafactor", 12295, "MiB", hf_bert(4, 1, optim="adafactor-hf"),
        trace=True),
    Row("hf-bert", "bs 1 x GA 4, GC, fp16, Adafactor", 4847, "MiB",
        hf_bert(1, 4, gc=True, fp16=True, optim="adafactor-hf"), trace=True),
    Row("hf-bert", "bs 4, 8-bit Adam (bnb)", 13085, "MiB", hf_bert(4, 1, optim="adam8bit"),
        trace=True),
    Row("hf-bert", "bs 1 x GA 4, GC, fp16, 8-bit Adam", 5363, "MiB",
        hf_bert(1, 4, gc=True, fp16=True, optim="adam8bit"), trace=True),
    Row("titan-h200", "FSDP 32, per-op SAC, compile + Float8, local batch 2", 47.96, "GiB",
        titan_h200(32), TITAN_2025),
    Row("titan-h200", "FSDP 64, per-op SAC, compile + Float8, local batch 2", 46.97, "GiB",
        titan_h200(64), TITAN_2025),
    Row("litgpt", "Llama 2 7B, LoRA, micro-batch 1", 21.30, "GB", litgpt(1), notes=LITGPT_2023),
    Row("litgpt", "Llama 2 7B, LoRA, micro-batch 2", 29.07, "GB", litgpt(2), notes=LITGPT_2023),
    Row("litgpt", "Llama 2 7B, LoRA, bnb.nf4, micro-batch 1", 14.14, "GB", litgpt(1, "bnb.nf4"),
        notes=LITGPT_QLORA_2023),
    Row("litgpt", "Llama 2 7B, LoRA, bnb.nf4-dq, micro-batch 1", 13.84, "GB",
        litgpt(1, "bnb.nf4-dq"), notes=LITGPT_QLORA_2023),
    Row("litgpt", "Llama 2 7B, LoRA, micro-batch 4", None, "GB", litgpt(4), notes=LITGPT_2023),
    Row("litgpt", "Llama 2 7B, adapter, micro-batch 1", 19.98, "GB", litgpt_adapter("adapter"),
        notes=LITGPT_ADAPTER_2023),
    Row("litgpt", "Llama 2 7B, adapter_v2, micro-batch 1", 25.51, "GB",
        litgpt_adapter("adapter_v2"), notes=LITGPT_ADAPTER_2023),
    Row("litgpt", "Llama 2 13B, LoRA, micro-batch 1", 38.12, "GB", litgpt(1, size="13b"),
        notes=LITGPT_13B_2023),
    Row("litgpt", "Llama 2 13B, LoRA, bnb.nf4, micro-batch 1", 23.14, "GB",
        litgpt(1, "bnb.nf4", size="13b"), notes=LITGPT_QLORA_13B_2023),
    Row("litgpt", "Llama 2 13B, LoRA, bnb.nf4-dq, micro-batch 1", 22.55, "GB",
        litgpt(1, "bnb.nf4-dq", size="13b"), notes=LITGPT_QLORA_13B_2023),
    Row("litgpt", "Llama 2 13B, LoRA, micro-batch 2", None, "GB", litgpt(2, size="13b"),
        notes=LITGPT_13B_2023),
    Row("litgpt", "Llama 2 13B, LoRA, micro-batch 4", None, "GB", litgpt(4, size="13b"),
        notes=LITGPT_13B_2023),
    Row("litgpt", "StableLM Alpha 3B, LoRA, micro-batch 1", 9.69, "GB",
        litgpt(1, size="stablelm-3b"), notes=LITGPT_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, LoRA, micro-batch 2", 12.10, "GB",
        litgpt(2, size="stablelm-3b"), notes=LITGPT_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, LoRA, micro-batch 4", 16.92, "GB",
        litgpt(4, size="stablelm-3b"), notes=LITGPT_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, LoRA, bnb.nf4, micro-batch 1", 6.35, "GB",
        litgpt(1, "bnb.nf4", size="stablelm-3b"), notes=LITGPT_QLORA_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, LoRA, bnb.nf4-dq, micro-batch 1", 6.19, "GB",
        litgpt(1, "bnb.nf4-dq", size="stablelm-3b"), notes=LITGPT_QLORA_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, adapter, micro-batch 1", 9.10, "GB",
        litgpt_adapter("adapter", "stablelm-3b"), notes=LITGPT_ADAPTER_STABLELM_2023),
    Row("litgpt", "StableLM Alpha 3B, adapter_v2, micro-batch 1", 10.71, "GB",
        litgpt_adapter("adapter_v2", "stablelm-3b"), notes=LITGPT_ADAPTER_STABLELM_2023),
    Row("litgpt", "phi-1.5, LoRA, micro-batch 1", 4.82, "GB",
        litgpt(1, size="phi-1.5"), notes=LITGPT_PHI_2023),
    Row("litgpt", "phi-1.5, LoRA, bnb.nf4, micro-batch 1", 3.78, "GB",
        litgpt(1, "bnb.nf4", size="phi-1.5"), notes=LITGPT_QLORA_PHI_2023),
    Row("litgpt", "phi-1.5, LoRA, bnb.nf4-dq, micro-batch 1", 3.72, "GB",
        litgpt(1, "bnb.nf4-dq", size="phi-1.5"), notes=LITGPT_QLORA_PHI_2023),
    Row("litgpt", "phi-1.5, LoRA, micro-batch 2", 6.76, "GB",
        litgpt(2, size="phi-1.5"), notes=LITGPT_PHI_2023),
    Row("litgpt", "phi-1.5, LoRA, micro-batch 4", 10.68, "GB",
        litgpt(4, size="phi-1.5"), notes=LITGPT_PHI_2023),
    Row("litgpt", "Falcon 40B, LoRA, micro-batch 1", None, "GB",
        litgpt(1, size="falcon-40b"), notes=LITGPT_FALCON_2023),
    Row("litgpt", "Falcon 40B, LoRA, bnb.nf4, micro-batch 1", None, "GB",
        litgpt(1, "bnb.nf4", size="falcon-40b"), notes=LITGPT_QLORA_FALCON_2023),
    Row("litgpt", "Falcon 40B, LoRA, bnb.nf4-dq, micro-batch 1", None, "GB",
        litgpt(1, "bnb.nf4-dq", size="falcon-40b"), notes=LITGPT_QLORA_FALCON_2023),
)  # fmt: skip


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def trace_profile(loaded: Any) -> None:
    """Trace and store the profile the spec's estimate reads (memplan profile, into
    $MEMPLAN_CACHE); a refusal of the tracer is raised as its MemplanError."""
    from memplan.verify.trace import profile as tracer

    doc, path = tracer.for_spec(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tracer.dumps(doc), encoding="utf-8")


def measure(row: Row) -> dict[str, Any]:
    record: dict[str, Any] = {
        "source": row.source,
        "label": row.label,
        "metric": row.metric,
        "figure": FIGURE[row.metric],
        "published": row.published,
        "unit": row.unit,
        "published_gib": None
        if row.published is None
        else row.published * UNIT_BYTES[row.unit] / GIB,
        "unmodelled": list(row.unmodelled),
        "notes": list(row.notes),
        "spec": row.spec,
    }
    try:
        loaded = validate(row.spec)
        if row.trace:
            trace_profile(loaded)
        inventory = load_inventory(loaded)
    except (MemplanError, ValidationError) as err:
        return record | {"expressible": False, "why": one_line(err)}
    report = estimate(loaded.spec, inventory)
    if not report.activations.modelled:
        # A peak without activations is a partial figure, never compared.
        why = " ".join(report.activations.notes) or "activations not modelled"
        return record | {"expressible": False, "why": why}
    assert report.peak_reserved is not None and report.device_used is not None
    figures = {
        "max_allocated": report.peak_bytes,
        "max_reserved": report.peak_reserved,
        "nvidia_smi": report.device_used,
    }
    record |= {
        "expressible": True,
        "activations_source": report.activations.source,
        "allocated_gib": report.peak_bytes / GIB,
        "host_gib": report.host_bytes / GIB,
        "reserved_gib": report.peak_reserved / GIB,
        "device_used_gib": report.device_used / GIB,
        "device_terms": {t.name: t.bytes for t in report.device_terms},
        "memplan_gib": figures[row.metric] / GIB,
        "verdict": report.verdict,
    }
    if row.published is None:
        # An "OOM" row: memplan agrees when its verdict (device_used against the GPU) is
        # that the spec does not fit.
        return record | {"error": None, "agrees": report.fits is False}
    return record | {"error": figures[row.metric] / (row.published * UNIT_BYTES[row.unit]) - 1}


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memplan-cache-") as cache:
        os.environ["MEMPLAN_CACHE"] = cache  # traced profiles never reach the user's cache
        rows = [measure(row) for row in ROWS]
    for r in rows:
        head = f"{r['source']:<10} {r['label']:<54} {r['metric']:<13}"
        if r["expressible"] and r["published"] is None:
            print(
                f"{head} published OOM         memplan {r['device_used_gib']:6.2f} GiB on the "
                f"device: {r['verdict']} ({'agrees' if r['agrees'] else 'DISAGREES'})"
            )
        elif r["expressible"]:
            print(
                f"{head} published {r['published_gib']:6.2f} GiB  memplan "
                f"{r['memplan_gib']:6.2f} GiB  {r['error']:+6.1%}"
                + (" (not modelled: " + "; ".join(r["unmodelled"]) + ")" if r["unmodelled"] else "")
            )
        else:
            print(f"{head} not expressible: {r['why'][:150]}")
    elapsed = time.perf_counter() - start
    print(f"{elapsed:.1f} s")
    done = [
        r for r in rows if r["expressible"] and not r["unmodelled"] and r["published"] is not None
    ]
    oom = [r for r in rows if r["expressible"] and r["published"] is None]
    out = {
        **stamp(),
        "sources": SOURCES,
        "figures": FIGURE,
        "target": "every expressible row within +-10%, none under by more than 5%",
        "rows": rows,
        "expressible": len(done),
        "within_10pct": sum(abs(r["error"]) <= 0.10 for r in done),
        "under_5pct": sum(r["error"] < -0.05 for r in done),
        "oom_rows": len(oom),
        "oom_agree": sum(r["agrees"] for r in oom),
        "elapsed_s": elapsed,
    }
    path = ROOT / "benchmarks" / "results" / "published-others.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
