"""The assumptions a traced profile document states (memplan.verify.trace.profile writes them
under `assumptions`; memplan.model.profile shows them as the estimate's notes): a TP rank's
slice, torch before 1.11's softmax, per-token runs summed, a chunked loop's storages pooled."""

from __future__ import annotations

SOFTMAX_INPUT_NOTE = (
    "training.softmax_saves_input: softmax and log_softmax keep their input for backward, as "
    "torch before 1.11 does (1.10.0's SoftmaxBackward0 / LogSoftmaxBackward0 hold self_; "
    "pytorch/pytorch#64000, fixed by #66018): memplan.verify.trace.forward.SoftmaxInputs."
)


def collapsed_note(blocks: list[str]) -> str:
    return (
        f"{', '.join(blocks)}: the number of storages saved grows with the sequence (a "
        "per-token loop, such as recurrent_gemma's RG-LRU scan); each run of consecutive "
        "storages of one module, dtype and size is listed as one storage of their summed size "
        "(memplan.verify.trace.fit.collapse), so the CUDA allocator's 512-byte rounding is "
        "counted once per run (exact where each storage is a multiple of 512 bytes)."
    )


def pooled_note(blocks: list[str]) -> str:
    return (
        f"{', '.join(blocks)}: the number of storages saved grows with the sequence with no runs "
        "of equal storages (a chunked loop's recurrent state and values, alternating); every "
        "storage of such a module and dtype is listed as one record of their summed size "
        "(`pooled`: memplan.verify.trace.fit.pool), exact in bytes, with the CUDA allocator's "
        "512-byte rounding counted once per record, and no working set made of its size."
    )


OWN_LOOP = "the module's own loop"
"""Marks a loop_chunk source that is a module's own forward (memplan.verify.trace.sizes.
block_loops), which no kernel replaces, from a function transformers' kernel hub may replace."""


SCAN = "a padded scan without a loop"
"""Marks a loop_chunk source that is a padded chunked scan (memplan.verify.trace.sizes.
scan_chunks), from a loop."""


def chunk_note(chunk: int, source: str, unit: int) -> str:
    if all(SCAN in part for part in source.split(", ")):  # sizes.scan_chunks only
        return (
            f"a padded scan over chunks of the sequence, chunk {chunk} ({source}; transformers' "
            "torch fallback: @use_kernel_func_from_hub_with_fallback runs mamba_ssm's kernels "
            "instead where `kernels` or mamba_ssm is installed and takes the device, which save "
            f"other tensors): traced on multiples of {unit} tokens (fit.sequence_multiple "
            f"{chunk}; other sequences are extrapolated)."
        )
    if all(OWN_LOOP in part for part in source.split(", ")):  # sizes.block_loops only
        return (
            f"a loop over blocks of the sequence, block {chunk} ({source}; plain torch, no "
            "kernel replaces it): traced on multiples of "
            f"{unit} tokens (fit.sequence_multiple {chunk}; other sequences are extrapolated)."
        )
    return (
        f"a chunked loop over the sequence, chunk {chunk} ({source}, transformers' torch "
        "fallback: @use_kernel_func_from_hub_with_fallback runs flash-linear-attention's "
        "kernels instead where `kernels` or fla is installed and takes the device, a GPU job's "
        "usual case, which save other tensors): traced on multiples of "
        f"{unit} tokens (fit.sequence_multiple {chunk}; other sequences are extrapolated)."
    )


def one_chunk_note(chunk: int, source: str, top: int) -> str:
    return (
        f"sequences up to {top} tokens run one chunk of {chunk} ({source}; padded to the chunk "
        "where the code pads): a regime of their own, traced at the ordinary sizes "
        "(memplan.verify.trace.sizes.span, fit.max_sequence); longer sequences are traced on "
        "the chunk's multiples when one needs them."
    )


def tp_note(tensor: int, vocab_rows: int) -> str:
    return (
        f"one rank of tensor parallelism {tensor}: traced as the slice it runs (heads, "
        "key/value heads and intermediate sizes / TP, head_dim kept, "
        f"{vocab_rows} vocabulary rows: memplan.verify.trace.tp.local_config), as "
        "memplan.activations.layout.local_architecture slices a hand-ruled family."
    )
