"""memplan's activation bytes against Korthikanti et al. 2022, term by term.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), Table 2, no parallelism: activations per transformer layer =
s*b*h*(34 + 5*a*s/h) bytes, for s sequence, b micro-batch, h hidden, a heads, 16-bit activations,
1-byte dropout masks, an unfused attention (softmax and its dropout kept: the 5as/h part), a 4h
GELU MLP and two LayerNorms. Their section 4.1 splits it as: attention 11sbh + 5as^2b, MLP
19sbh, LayerNorms 4sbh.

memplan lists the tensors autograd really saves in transformers 5.24 (memplan.activations; the
CPU profile is proved to the byte by tests/test_activations.py). Run:

    python benchmarks/activations_vs_korthikanti.py            # the table
    python benchmarks/activations_vs_korthikanti.py --terms    # + term-by-term for each model

Why the totals differ, in short (the --terms table says it per term):
- The paper leaves out the embeddings, the final norm, the logits and the loss; transformers
  upcasts the logits to fp32 for the loss and the log-softmax it saves is [s*b, vocab] fp32:
  for Llama-3 (vocab 128,256) that is more than a whole layer.
- RMSNorm (Llama) upcasts to fp32 and saves the fp32 input and the normalized tensor; the
  paper's LayerNorm saves a 2-byte input. Llama/NeoX compute the softmax in fp32 (4as^2b
  instead of 2as^2b) and keep its bf16 cast for the V matmul.
- GPT-2's `gelu_new` is written in Python: four saved [s, b, 4h] tensors instead of one.
- SwiGLU MLPs (Llama) save gate output, act output, up output and product at width I, and
  have no hidden dropout; GQA repeats K and V to every head in eager attention.
- With SDPA (the transformers default) flash attention keeps no s x s tensor at all: the
  5as/h term disappears and memplan is far below the paper.

Pure memplan: no torch needed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.activations import Saved, Setting, predict
from memplan.model.sources import from_config

PRESETS = Path(__file__).resolve().parent.parent / "memplan" / "model" / "presets"
GIB = 2**30


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    seq: int
    batch: int = 1


def preset(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PRESETS / f"{name}.json").read_text())
    return data


CASES = (
    Case("gpt2 (124M)", preset("gpt2"), seq=1024),
    # Korthikanti et al. Table 3's 22B model: h 6144, a 64, L 48, s 2048 (GPT-style).
    Case(
        "gpt-22B (paper's)",
        {
            "model_type": "gpt2",
            "n_embd": 6144,
            "n_head": 64,
            "n_layer": 48,
            "vocab_size": 51200,
            "n_positions": 2048,
        },
        seq=2048,
    ),
    Case("pythia-160m (gpt_neox)", preset("pythia-160m"), seq=2048),
    Case("llama-2-7b", preset("llama-2-7b"), seq=4096),
    Case("llama-3-8b", preset("llama-3-8b"), seq=8192),
)

# The setting the paper assumes: 16-bit activations on CUDA, eager attention, dropout on.
PAPER = {"attention": "eager", "dropout": True}
# What a transformers run does by default: SDPA (flash on CUDA), dropout as configured.
PRACTICE = {"attention": "sdpa", "dropout": None}


def setting(case: Case, **over: Any) -> Setting:
    return Setting(
        batch=case.batch,
        sequence=case.seq,
        stream="bf16",
        matmul="bf16",
        autocast=False,
        device="cuda",
        attention=over["attention"],
        dropout=over["dropout"],
        checkpointing="none",
    )


def korthikanti_layer(s: int, b: int, h: int, a: int) -> int:
    """Table 2, no parallelism: sbh(34 + 5as/h) bytes per layer."""
    return s * b * h * 34 + 5 * a * s * s * b


def layer_tensors(case: Case, **over: Any) -> tuple[Saved, ...]:
    act = predict(from_config(case.config), setting(case, **over))
    block = act.block("layers")
    assert act.modelled and block is not None, act.notes
    return block.tensors


# Korthikanti's terms (section 4.1): (name, their bytes as coefficient x sbh or x as^2b,
# memplan tensor names (regex), why memplan's figure differs).
SBH, AS2B = "sbh", "as2b"
TERMS: tuple[tuple[str, float, str, str, str], ...] = (
    (
        "norm inputs",
        4,
        SBH,
        r"(ln_\d|input_layernorm|post_attention_layernorm)\.input(_fp32)?",
        "RMSNorm upcasts its input to fp32 (4 B, not 2); NeoX's parallel residual shares one",
    ),
    ("norm statistics", 0, SBH, r".*\.(mean|rstd)", "mean/rstd [s, b] fp32: left out by the paper"),
    ("RMSNorm normalized", 0, SBH, r".*\.normalized", "RMSNorm's `weight *` saves x/rms: 2sbh"),
    (
        "QKV input",
        2,
        SBH,
        r"(attn\.c_attn|self_attn\.q_proj|attention\.query_key_value)\.input",
        "same",
    ),
    (
        "Q, K for QK^T",
        4,
        SBH,
        r"attn\.(query|key_t|key)",
        "GQA: K repeated to every head (repeat_kv) in eager",
    ),
    (
        "softmax output",
        2,
        AS2B,
        r"attn\.softmax",
        "Llama/NeoX softmax in fp32 (4 B, `dtype=torch.float32`): 4as^2b",
    ),
    ("attention dropout mask", 1, AS2B, r"attn\.dropout_mask", "same (CUDA bool mask)"),
    (
        "dropout output / 16-bit cast",
        2,
        AS2B,
        r"attn\.probs(_cast|_dropped)?",
        "the matmul with V reads the dropout output (or the bf16 cast of the fp32 softmax)",
    ),
    (
        "V",
        2,
        SBH,
        r"attn\.(value|c_attn_output)|attention\.query_key_value\.output",
        "GQA: V repeated to every head",
    ),
    ("flash logsumexp", 0, SBH, r"attn\.logsumexp", "SDPA flash keeps [b, a, s] fp32"),
    ("attention output (proj input)", 2, SBH, r"o_proj\.input|attn\.output", "same"),
    (
        "attention output dropout",
        1,
        SBH,
        r"attn\.resid_dropout\.mask|post_attention_dropout\.mask",
        "same; Llama has none",
    ),
    ("MLP first linear input", 2, SBH, r"mlp\.(c_fc|gate_proj|dense_h_to_4h)\.input", "same"),
    (
        "MLP activation",
        8,
        SBH,
        r"mlp\.act\..*|mlp\.gate_proj\.output",
        "GPT-2's gelu_new is Python: 4 tensors (32sbh); SwiGLU's I = 8h/3 rounded, not 4h",
    ),
    (
        "SwiGLU gate x up",
        0,
        SBH,
        r"mlp\.(act_output|up_proj\.output)",
        "SwiGLU's product saves both of its inputs [s, b, I]",
    ),
    (
        "MLP second linear input",
        8,
        SBH,
        r"mlp\.(c_proj|down_proj|dense_4h_to_h)\.input",
        "I instead of 4h",
    ),
    ("MLP dropout mask", 1, SBH, r"(mlp\.dropout|post_mlp_dropout)\.mask", "same; Llama: none"),
    ("other", 0, SBH, r".*", ""),
)


def by_term(tensors: Iterable[Saved]) -> dict[str, int]:
    """memplan's saved bytes of one layer grouped into Korthikanti's terms (first match)."""
    out = {name: 0 for name, *_ in TERMS}
    for t in tensors:
        for name, _, _, pattern, _ in TERMS:
            if re.fullmatch(pattern, t.name):
                out[name] += t.bytes
                break
    return out


def paper_term(coefficient: float, unit: str, s: int, b: int, h: int, a: int) -> float:
    return coefficient * (s * b * h if unit == SBH else a * s * s * b)


def table() -> list[dict[str, Any]]:
    rows = []
    for case in CASES:
        inv = from_config(case.config)
        arch = inv.architecture
        assert arch is not None
        k = korthikanti_layer(case.seq, case.batch, arch.hidden_size, arch.num_attention_heads)
        paper = sum(t.bytes for t in layer_tensors(case, **PAPER))
        practice = sum(t.bytes for t in layer_tensors(case, **PRACTICE))
        rows.append(
            {
                "model": case.name,
                "s": case.seq,
                "b": case.batch,
                "h": arch.hidden_size,
                "a": arch.num_attention_heads,
                "korthikanti_layer_bytes": k,
                "memplan_eager_dropout_bytes": paper,
                "memplan_sdpa_bytes": practice,
                "ratio_eager": paper / k,
                "ratio_sdpa": practice / k,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", action="store_true", help="term-by-term breakdown")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    rows = table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("Activations per layer, bf16 on CUDA, micro-batch 1 (GiB):")
    head = f"{'model':24s} {'s':>6s} {'Korthikanti':>12s} {'memplan eager+dropout':>22s}"
    print(head + f" {'ratio':>6s} {'memplan sdpa':>13s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['model']:24s} {r['s']:>6d} {r['korthikanti_layer_bytes'] / GIB:12.3f} "
            f"{r['memplan_eager_dropout_bytes'] / GIB:22.3f} {r['ratio_eager']:6.2f} "
            f"{r['memplan_sdpa_bytes'] / GIB:13.3f} {r['ratio_sdpa']:6.2f}"
        )
    print("\nWhole forward pass (GiB): the paper's L x layer vs everything memplan counts")
    print(f"{'model':24s} {'L x layer':>10s} {'memplan':>9s} {'of which embed/head/loss':>25s}")
    for case, r in zip(CASES, rows, strict=True):
        act = predict(from_config(case.config), setting(case, **PAPER))
        layers = act.block("layers")
        assert layers is not None
        print(
            f"{case.name:24s} {r['korthikanti_layer_bytes'] * layers.count / GIB:10.2f} "
            f"{act.bytes / GIB:9.2f} {(act.bytes - layers.bytes) / GIB:25.2f}"
        )
    if not args.terms:
        return
    for case in CASES:
        arch = from_config(case.config).architecture
        assert arch is not None
        dims = (case.seq, case.batch, arch.hidden_size, arch.num_attention_heads)
        print(f"\n{case.name}, eager + dropout, one layer (MiB)")
        print(f"  {'term':30s} {'paper':>12s} {'memplan':>9s}  why")
        terms = by_term(layer_tensors(case, **PAPER))
        for name, coefficient, unit, _, why in TERMS:
            paper = paper_term(coefficient, unit, *dims)
            if terms[name] or paper:
                formula = f"{coefficient:g}{unit.replace('as2b', 'as^2b')}" if paper else "-"
                print(
                    f"  {name:30s} {formula:>6s}{paper / 2**20:7.1f} "
                    f"{terms[name] / 2**20:9.1f}  {why}"
                )


if __name__ == "__main__":
    main()
