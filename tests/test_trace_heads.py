"""Heads other than the language-model ones (memplan.verify.trace.heads): issue 18.

- Sequence classification (BERT's and a decoder's, Llama: the last non-pad token's logits),
  token classification and question answering, traced with the loss transformers computes for
  each (labels shaped as the head takes them): the profile's bytes = the storages real CPU
  tensors still hold for backward when forward + loss returns, at sizes the fit never saw
  (independent oracle: `_alive_bytes`, the real model with seeded random targets).
- BERT with BertForSequenceClassification: the hand rule covers the masked-LM head only, so
  estimate says "not modelled" (source none) until `memplan profile` traces that head, then
  uses the profile (source profile) and its bytes equal the real model's.
- verify builds the head config.json names and feeds its loss the targets it takes.
- Encoder-decoders (T5, BART) traced as Seq2SeqLM, the decoder as long as the encoder (labels =
  input ids), every layer of both stacks: the profile = real tensors.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from memplan.model import profile  # noqa: E402
from memplan.verify.trace import heads  # noqa: E402
from memplan.verify.trace import profile as tracer  # noqa: E402
from tests.test_activations import LLAMA, VARIANTS  # noqa: E402
from tests.test_profile import PRECISIONS, _setting  # noqa: E402

BERT = {k: v for k, v in VARIANTS["bert-mlm"].items() if k != "architectures"}
CONFIGS: dict[str, dict[str, Any]] = {
    "bert-sequence": {
        **BERT,
        "architectures": ["BertForSequenceClassification"],
        "num_labels": 3,
    },
    "bert-token": {**BERT, "architectures": ["BertForTokenClassification"], "num_labels": 5},
    "bert-qa": {**BERT, "architectures": ["BertForQuestionAnswering"]},
    "llama-sequence": {
        **LLAMA,
        "architectures": ["LlamaForSequenceClassification"],
        "pad_token_id": 0,
        "num_labels": 3,
    },
}


def _real(config: dict[str, Any], precision: str) -> Any:
    kind, cls = heads.head_class(config)
    assert cls is not None and kind != "lm"
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.train()
    return model


def _alive_bytes(model: Any, *, batch: int, sequence: int) -> int:
    """Bytes of the storages saved tensors still hold after forward + the head's loss (real
    tensors; parameters and buffers excluded; seeded random ids and targets)."""
    torch.manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, sequence))
    kind = heads.kind_of_name(type(model).__name__) or "lm"
    generator = torch.Generator().manual_seed(0)
    targets = heads.loss_inputs(kind, ids, model.config.num_labels, generator=generator)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, use_cache=False, **targets)
    assert out.loss.isfinite()
    storages: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(storages.values())


CASES = [("bert-qa", "fp32"), ("bert-token", "bf16"), ("llama-sequence", "bf16")]


@pytest.mark.parametrize(("name", "precision"), CASES, ids=["-".join(c) for c in CASES])
def test_head_profile_equals_real_tensors(name: str, precision: str) -> None:
    config = CONFIGS[name]
    stream, matmul, cast = PRECISIONS[precision]
    doc = tracer.build(config, stream=stream, matmul=matmul, autocast=cast, attention="sdpa")
    assert doc["model"]["head"] == heads.head_class(config)[0]
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    model = _real(config, precision)
    for batch, seq in ((3, 37), (1, 50)):
        st = _setting(precision, "sdpa", batch, seq)
        predicted = traced.activations(st, num_layers=config["num_hidden_layers"]).bytes
        assert predicted == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)


SEQ2SEQ: dict[str, dict[str, Any]] = {
    "t5": {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "d_model": 32,
        "d_ff": 48,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 3,
        "num_decoder_layers": 2,
        "vocab_size": 300,
        "dropout_rate": 0.0,
        "relative_attention_num_buckets": 8,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    },
    "bart": {
        "model_type": "bart",
        "architectures": ["BartForConditionalGeneration"],
        "d_model": 32,
        "encoder_ffn_dim": 48,
        "decoder_ffn_dim": 40,
        "encoder_layers": 2,
        "decoder_layers": 3,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "vocab_size": 300,
        "max_position_embeddings": 128,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
    },
}
GROUPS = {
    "t5": {
        "encoder[layer.0.SelfAttention.has_relative_attention_bias=True]": [0],
        "encoder[layer.0.SelfAttention.has_relative_attention_bias=False]": [1, 2],
        "decoder[layer.0.SelfAttention.has_relative_attention_bias=True]": [3],
        "decoder[layer.0.SelfAttention.has_relative_attention_bias=False]": [4],
    },
    "bart": {"encoder": [0, 1], "decoder": [2, 3, 4]},
}
S2S_CASES = [("t5", "sdpa", "bf16"), ("bart", "eager", "fp32")]


@pytest.mark.parametrize(
    ("name", "attention", "precision"), S2S_CASES, ids=["-".join(c) for c in S2S_CASES]
)
def test_encoder_decoder_profile_equals_real_tensors(
    name: str, attention: str, precision: str
) -> None:
    config = SEQ2SEQ[name]
    stream, matmul, cast = PRECISIONS[precision]
    doc = tracer.build(config, stream=stream, matmul=matmul, autocast=cast, attention=attention)
    assert doc["model"]["layer_groups"] == GROUPS[name] and doc["model"]["encoder_decoder"]
    traced = profile.from_document(json.loads(json.dumps(doc)), origin="test")
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = transformers.AutoModelForSeq2SeqLM.from_config(
        cfg, dtype=dtype, attn_implementation=attention
    )
    model.train()
    for batch, seq in ((3, 37), (1, 50)):
        st = _setting(precision, attention, batch, seq)
        layers = sum(doc["model"]["layer_counts"].values())
        predicted = traced.activations(st, num_layers=layers).bytes
        assert predicted == _alive_bytes(model, batch=batch, sequence=seq), (batch, seq)


def test_bert_sequence_classifier_estimate_uses_its_profile(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from typer.testing import CliRunner

    from memplan.cli.app import app

    (tmp_path / "bert.json").write_text(json.dumps(CONFIGS["bert-sequence"]))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model:\n  hf_config: bert.json\nprecision: fp32\noptimizer:\n  name: adamw\n"
        "training:\n  micro_batch_size: 3\n  sequence_length: 37\n  attention: sdpa\n"
        "parallelism:\n  engine: ddp\n  data: 1\nhardware:\n  gpu: H100-80GB\n  device: cpu\n"
    )
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    before = json.loads(runner.invoke(app, ["estimate", str(spec), "--json"]).stdout)
    assert before["activations"]["source"] == "none"
    assert "BertForSequenceClassification" in before["activations"]["notes"][0]
    assert "memplan profile" in before["activations"]["notes"][0]
    result = runner.invoke(app, ["profile", str(spec)])
    assert result.exit_code == 0, result.output
    after = json.loads(runner.invoke(app, ["estimate", str(spec), "--json"]).stdout)
    assert after["activations"]["source"] == "profile"
    measured = _alive_bytes(_real(CONFIGS["bert-sequence"], "fp32"), batch=3, sequence=37)
    assert after["activations"]["bytes"] == measured
    # the logits alive around the loss: [batch, num_labels], not [tokens, vocab]
    assert after["activations"]["logits_bytes"] == 3 * 3 * 4


def test_verify_builds_the_head_and_its_targets() -> None:
    from memplan.verify import build, rank

    model = build.build_model(CONFIGS["bert-sequence"], torch.float32, "cpu")
    assert type(model).__name__ == "BertForSequenceClassification"
    ids = torch.randint(0, 777, (3, 11))
    targets = rank._targets(model, ids)
    assert targets["labels"].shape == (3,) and int(targets["labels"].max()) < 3
    assert model(input_ids=ids, **targets).loss.isfinite()
    lm = build.build_model({**BERT, "architectures": ["BertForMaskedLM"]}, torch.float32, "cpu")
    assert rank._targets(lm, ids)["labels"] is ids
