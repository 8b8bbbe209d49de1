"""Megatron-LM's theoretical memory report, transcribed (Megatron is not a pip package).

Source: NVIDIA/Megatron-LM megatron/training/theoretical_memory_usage.py at commit
00caa53af30912914981c86f39db123961678bbd: `compute_weight_and_optimizer_memory` (dense
layers; the MoE, multi-latent-attention and MTP branches are left out: no case here has
them), `compute_activation_memory_without_sp` (what `report_theoretical_memory` uses unless
sequence parallelism and selective recomputation are both on) and `report_theoretical_memory`
(total = the two summed). Variable names follow the source; it returns float bytes (the
source divides by NUM_BYTES_IN_MEGABYTE only to print).

tests/test_parallel.py::megatron_most_loaded_shard_params transcribes the same parameter
formula from core_r0.8 (before RMSNorm got its own norm size); tests/test_benchmarks.py
checks that the two agree where they should.

What it models: bf16/fp16 mixed precision with Adam and an fp32 `main_grad`: 18 B/param
(2 weight + 4 main_grad + 12 master and moments), or 6 + 12/DP with the distributed
optimizer (ZeRO-1); the most-loaded tensor/pipeline shard; activations of 34 x s x b x h
bytes per layer at TP=1 (Korthikanti et al. Table 2 without the attention scores) plus the
logits, times an unsourced 1.05. No biases, buffers, padding, FSDP, or other optimizers.

The step settings: 34 x s x b x h is Korthikanti's per-layer figure with the attention scores
(5 x a x s / h) left out, i.e. selective recomputation of the attention core (or a fused
kernel), with every dropout mask kept. So selective recomputation and sdpa are what it
describes, dropout on or off gives the same figure (it always counts the masks), and eager
attention (scores kept) and full recomputation (only each layer's input kept) have no input
in this report. MoE: the expert branch of `compute_weight_and_optimizer_memory` is not
transcribed here, so MoE models are n/a.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ADAM, MIXED, NotExpressible, Prediction, Result, Setting, _hf

NAME = "megatron"
MOE = ("mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3")
GATED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "phi3", "olmo2")


def available() -> bool:
    return True  # a transcription: nothing to install


@dataclass(frozen=True, slots=True, kw_only=True)
class Args:
    """The Megatron arguments the formulas read."""

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    padded_vocab_size: int
    swiglu: bool
    normalization: str  # "LayerNorm" | "RMSNorm"
    untie_embeddings_and_output_weights: bool
    use_distributed_optimizer: bool = False
    data_parallel_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    seq_length: int = 2048
    micro_batch_size: int = 1


def vocab_size_with_padding(vocab: int, *, divisible_by: int, tp: int) -> int:
    """megatron/training/tokenizer/tokenizer.py::_vocab_size_with_padding: round up to a
    multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def compute_weight_and_optimizer_memory(args: Args) -> float:
    query_projection_size = args.kv_channels * args.num_attention_heads
    query_projection_to_hidden_size_ratio = query_projection_size / args.hidden_size
    gated_linear_multiplier = 3 / 2 if args.swiglu else 1
    # RMSNorm does not have bias, but LayerNorm has.
    norm_size = 1 if args.normalization == "RMSNorm" else 2
    self_attn_term = (
        2
        * args.hidden_size
        * args.hidden_size
        * (
            (1 + (args.num_query_groups / args.num_attention_heads))
            * query_projection_to_hidden_size_ratio
        )
    )
    num_parameters_in_transformer_layer_dense = (
        2 * args.hidden_size * ((args.ffn_hidden_size * gated_linear_multiplier) + norm_size)
        + self_attn_term
    )
    embedding_size = args.hidden_size * args.padded_vocab_size
    final_layernorm = norm_size * args.hidden_size
    num_parameters_in_transformer_block = (
        num_parameters_in_transformer_layer_dense * args.num_layers + final_layernorm
    )
    # Most loaded model shard has (1/pp_size transformer layers + 1 embedding layer) / tp_size.
    num_parameters_on_most_loaded_model_shard = (
        (num_parameters_in_transformer_block / args.pipeline_model_parallel_size) + embedding_size
    ) / args.tensor_model_parallel_size
    if args.untie_embeddings_and_output_weights and args.pipeline_model_parallel_size == 1:
        num_parameters_on_most_loaded_model_shard += (
            embedding_size / args.tensor_model_parallel_size
        )
    num_bytes_per_parameter = (
        18 if not args.use_distributed_optimizer else 6 + (12 / args.data_parallel_size)
    )
    return num_parameters_on_most_loaded_model_shard * num_bytes_per_parameter


def compute_activation_memory_without_sp(args: Args) -> float:
    """Non-interleaved schedule, one microbatch in flight at pipeline size 1."""
    per_layer_memory = (
        args.seq_length
        * args.micro_batch_size
        * args.hidden_size
        * (10 + (24 / args.tensor_model_parallel_size))
    )
    total_activation_memory = per_layer_memory * args.num_layers
    # Input to embedding (pp_size microbatches in flight)
    total_activation_memory += (
        8 * args.seq_length * args.micro_batch_size * args.pipeline_model_parallel_size
    )
    # Dropout in embedding layer (pp_size microbatches in flight)
    total_activation_memory += (
        args.seq_length
        * args.micro_batch_size
        * args.hidden_size
        * args.pipeline_model_parallel_size
    )
    if args.pipeline_model_parallel_size == 1:
        logits_size = args.seq_length * args.micro_batch_size * args.padded_vocab_size
        logits_size /= args.tensor_model_parallel_size
        final_ln_output = args.seq_length * args.micro_batch_size * args.hidden_size
        total_activation_memory += (logits_size + final_ln_output) * 2  # bytes
    # 9. Add buffer for optimizer and miscellaneous temporaries (5% overhead)
    overhead_factor = 1.05
    return total_activation_memory * overhead_factor


def report_theoretical_memory(args: Args) -> tuple[float, float, float]:
    """(weight and optimizer, activation, total) bytes of the most-loaded GPU."""
    weight_and_optimizer_memory = compute_weight_and_optimizer_memory(args)
    activation_memory = compute_activation_memory_without_sp(args)
    return (
        weight_and_optimizer_memory,
        activation_memory,
        weight_and_optimizer_memory + activation_memory,
    )


def args_for(s: Setting) -> Args:
    """A Megatron argument set describing the HF model of `s` (vocabulary not padded: the
    run being compared has none, i.e. --make-vocab-size-divisible-by 1)."""
    c = s.config
    hidden = c.get("hidden_size", c.get("n_embd"))
    heads = c.get("num_attention_heads", c.get("n_head"))
    gated = c["model_type"] in GATED
    return Args(
        hidden_size=hidden,
        ffn_hidden_size=c.get("intermediate_size") or c.get("n_inner") or 4 * hidden,
        num_layers=c.get("num_hidden_layers", c.get("n_layer")),
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=c.get("head_dim") or hidden // heads,
        padded_vocab_size=vocab_size_with_padding(c["vocab_size"], divisible_by=1, tp=1),
        swiglu=gated,
        normalization="RMSNorm" if gated else "LayerNorm",
        # transformers' default differs by family (Llama: untied, GPT-2: tied).
        untie_embeddings_and_output_weights=not _hf.hf_config(c).tie_word_embeddings,
        use_distributed_optimizer=s.stage == 1,
        data_parallel_size=s.ranks,
        seq_length=s.sequence_length,
        micro_batch_size=s.micro_batch_size,
    )


def predict(s: Setting) -> Result:
    if s.optimizer not in ADAM:
        return NotExpressible("Adam only (18 B/param)")
    if s.precision not in MIXED:
        return NotExpressible("assumes 16-bit mixed precision")
    if s.engine != "ddp":
        return NotExpressible("no FSDP")
    if s.config["model_type"] in MOE:
        return NotExpressible("MoE branch not transcribed")
    if s.checkpointing == "full":
        return NotExpressible("no full-recomputation term in its report")
    if s.attention == "eager":
        return NotExpressible("its formula leaves out the attention scores")
    states, activations, total = report_theoretical_memory(args_for(s))
    how = "18 B/param" if s.stage == 0 else f"6 + 12/{s.ranks} B/param (distributed optimizer)"
    return Prediction(
        model_states=round(states),
        total=round(total),
        activations=round(activations),
        how=how,
    )


def compute_activation_memory_per_layer(args: Args) -> float:
    """`compute_activation_memory`'s per-layer term (the path `report_theoretical_memory` takes
    with sequence parallelism and selective recomputation): Korthikanti et al. Table 2 without
    the attention scores, `s b h (18 + 4 ffn / h)` bytes, divided over TP."""
    activation_memory = (args.seq_length * args.micro_batch_size * args.hidden_size) * (
        18 + (4 * (args.ffn_hidden_size / args.hidden_size))
    )
    return activation_memory / args.tensor_model_parallel_size
