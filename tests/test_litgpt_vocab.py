"""LitGPT's padded vocabulary (`model.implementation: litgpt`): litgpt 0.5.9's Config pads
`vocab_size` to `padded_vocab_size` (config.py::Config.__post_init__: the entry's own value,
else `find_multiple(vocab_size, padding_multiple)`, padding_multiple 512 by default), and
its embedding and lm_head have padded_vocab_size rows. The entries LitGPT converts Hugging
Face checkpoints for set it to the checkpoint's rows (the HF config's vocab_size): Llama 2's
32000 (padding_multiple 64, not 512's 32256), Pythia's 50254 -> 50304 (padding_multiple 128),
Llama 3's and Qwen2.5's explicit 128256 and 151936. memplan reads the HF config, so its
embedding and head are LitGPT's.

Independent oracle: litgpt's own Config.from_name for real entries of its config list and its
own GPT built from it on the meta device, against memplan's presets of the same models.
"""

from __future__ import annotations

import pytest

from memplan.config.load import validate
from memplan.model.finetune import lora as finetune
from memplan.model.load import load_inventory

NAMES = [
    ("llama-2-7b", "Llama-2-7b-hf"),
    ("pythia-160m", "pythia-160m"),
    ("qwen2.5-0.5b", "Qwen2.5-0.5B"),
    ("llama-3-8b", "Llama-3-8B"),
    ("mistral-7b", "Mistral-7B-v0.1"),
]


@pytest.mark.parametrize(("preset", "name"), NAMES)
def test_litgpt_vocabulary_and_parameters_match_litgpts_own_config(preset: str, name: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("litgpt.model")
    from litgpt.config import Config
    from litgpt.model import GPT

    config = Config.from_name(name)
    with torch.device("meta"):
        litgpts = sum(p.numel() for p in GPT(config).parameters())
    loaded = validate(
        {
            "model": {"preset": preset, "implementation": "litgpt"},
            "training": {"micro_batch_size": 1, "sequence_length": 128},
        }
    )
    inventory = load_inventory(loaded)
    assert inventory.architecture is not None
    assert inventory.architecture.vocab_size == config.padded_vocab_size
    assert finetune.apply(loaded.spec, inventory).num_parameters == litgpts


def test_litgpt_pads_beyond_the_tokenizer_where_its_entry_says() -> None:
    """The entries pad the tokenizer's vocab_size (Pythia's 50254) to the checkpoint's rows,
    and Llama 2's entry does not take the 512 default (32000 is no multiple of 512)."""
    pytest.importorskip("litgpt.config")
    from litgpt.config import Config

    pythia, llama2 = Config.from_name("pythia-160m"), Config.from_name("Llama-2-7b-hf")
    assert (pythia.vocab_size, pythia.padded_vocab_size) == (50254, 50304)
    assert (llama2.vocab_size, llama2.padded_vocab_size, llama2.padding_multiple) == (
        32000,
        32000,
        64,
    )
