"""llm-analysis 0.2.2 (`llm_analysis.analysis.train`, its command-line entry point), with a
ModelConfig JSON written from the model's config.json.

Installed with --no-deps into the benchmark environment: its metadata pins transformers<5,
which would shadow the transformers 5 that memplan verify uses; `train` itself imports
transformers only to fetch configs from the Hub, which we do not use.

The ModelConfig: num_layers, n_head, num_key_value_heads, hidden_dim, vocab_size,
max_seq_len from config.json. Its parameter formula has two MLP matrices (2 x h x ffn), so a
gated MLP (Llama: gate, up, down) is given ffn_embed_dim = 3/2 x intermediate_size, which
makes the parameter count right up to biases (its own shipped Llama configs use 4 x h).

What it models: weights (16-bit), gradients at the master-weight width (4 B), Adam = fp32
master + two fp32 moments (12 B), ZeRO 0-3 over dp_size, and activations by the
Korthikanti et al. formula (arXiv 2205.05198, flash attention by default) plus the logits.
It always keeps an fp32 master copy beside 16-bit weights, so fp32 and pure bf16 training
have no input; SGD with momentum is other_op_bytes=4 (the knob its docstring names for
optimizers other than Adam). It has no bias, buffer, untied output head (embedding counted
once) or padding terms.

The step settings map onto `train`'s own arguments: activation_recomputation (its
ActivationRecomputation enum: 0 none, 1 selective = the attention core, 2 full), flash_attn
(False for eager attention, whose softmax is saved), softmax_dropout (dropout forced on: the
attention-probability dropout is the one a Llama has). MoE: ModelConfig's moe_num_experts and
moe_top_k (Mixtral's num_local_experts and num_experts_per_tok, every expert of the
intermediate width); it has no shared expert or separate expert width, so Qwen2-MoE has no
input.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from . import ADAM, MIXED, NotExpressible, Prediction, Result, Setting

NAME = "llm-analysis"
RECOMPUTATION = {"none": 0, "selective": 1, "full": 2}  # analysis.py::ActivationRecomputation
GATED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "phi3", "olmo2")
STAGES = {("ddp", 0): 0, ("ddp", 1): 1, ("fsdp2", 2): 2, ("fsdp2", 3): 3}


def available() -> bool:
    return importlib.util.find_spec("llm_analysis") is not None


def model_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig JSON a careful user writes for this config.json."""
    c = config
    hidden = c.get("hidden_size", c.get("n_embd"))
    ffn = c.get("intermediate_size") or c.get("n_inner") or 4 * hidden
    if c["model_type"] in GATED:
        ffn = ffn * 3 // 2
    moe = {}
    if c["model_type"] == "mixtral":
        moe = {"moe_num_experts": c["num_local_experts"], "moe_top_k": c["num_experts_per_tok"]}
    return {
        **moe,
        "name": name,
        "num_layers": c.get("num_hidden_layers", c.get("n_layer")),
        "n_head": c.get("num_attention_heads", c.get("n_head")),
        "num_key_value_heads": c.get("num_key_value_heads"),
        "hidden_dim": hidden,
        "vocab_size": c["vocab_size"],
        "max_seq_len": c.get("max_position_embeddings", c.get("n_positions")),
        "ffn_embed_dim": ffn,
        "expansion_ratio": ffn / hidden,
        "model_type": c["model_type"],
    }


def predict(s: Setting) -> Result:
    if s.precision not in MIXED:
        return NotExpressible("always adds an fp32 master copy")
    if s.optimizer in ADAM:
        other_op_bytes = None  # its default: Adam, two fp32 moments
    elif s.optimizer == "sgd":
        other_op_bytes = 4  # one fp32 momentum buffer
    else:
        return NotExpressible(f"no {s.optimizer}")
    if "moe_intermediate_size" in s.config:
        return NotExpressible("no shared expert or expert width (Qwen2-MoE)")
    from llm_analysis import analysis

    logging.getLogger("llm_analysis").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{s.name}.json"
        path.write_text(json.dumps(model_config(s.name, s.config)))
        summary = analysis.train(
            model_name=str(path),
            gpu_name="a100-sxm-80gb",
            dtype_name="w16a16e16",
            log_level="ERROR",
            batch_size_per_gpu=s.micro_batch_size,
            gradient_accumulation_steps=1,
            seq_len=s.sequence_length,
            ds_zero=STAGES[(s.engine, s.stage)],
            dp_size=s.ranks,
            other_op_bytes=other_op_bytes,
            mlp_gated_linear_units=s.config["model_type"] in GATED,
            activation_recomputation=RECOMPUTATION[s.checkpointing],
            flash_attn=s.attention != "eager",
            softmax_dropout=s.dropout,
        )
    states = summary["(weight+op_state+grad)_memory_per_gpu"]
    total = summary["(weight+op_state+grad+act)_memory_per_gpu"]
    return Prediction(
        model_states=int(states),
        total=int(total),
        activations=int(summary["activation_memory_per_gpu"]),
        how=(
            f"train(ds_zero={STAGES[(s.engine, s.stage)]}, dp_size={s.ranks}, "
            f"activation_recomputation={RECOMPUTATION[s.checkpointing]}, "
            f"flash_attn={s.attention != 'eager'}, softmax_dropout={s.dropout})"
        ),
        extra={
            k: summary[k]
            for k in (
                "num_params_total",
                "weight_memory_per_gpu",
                "gradient_memory_per_gpu",
                "optimizer_state_memory_per_gpu",
                "activation_memory_per_gpu",
            )
        },
    )
