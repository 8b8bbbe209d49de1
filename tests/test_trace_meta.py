"""memplan.verify.trace.meta: the inventory of any model transformers builds, read on the meta
device.

(a) Every hand-written family against the meta build, for the installed transformers: the same
    ordered parameter names and shapes (and fixed dtypes), buffers with persistence, tied pairs
    and parameter count. A family that drifts from transformers fails under its own case id.
    Oracle: transformers' model on the meta device (memplan.verify.trace.meta only reads it), so a
    failure says the hand family, not the reader, is out of date with the installed release.
(b) Tiny configs of model_types no hand family serves: the meta inventory against the model
    transformers builds on the CPU with real tensors (names, shapes, buffers, tied weights by
    storage, sum of numel). Oracle: the real module.
(c) The CLI on such a config: `estimate` works and says activations are unknown; without torch
    (find_spec monkeypatched) one clear error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from memplan.cli.app import app  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.model import sources as models  # noqa: E402
from memplan.model.families import BY_MODEL_TYPE, family_of  # noqa: E402
from memplan.model.inventory import Inventory  # noqa: E402
from memplan.verify.trace import fallback_inventory  # noqa: E402
from memplan.verify.trace.meta import inventory_from_config  # noqa: E402
from tests import test_models_classic, test_models_modern  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA = Path(__file__).parent / "data" / "hf-configs"
PRESETS = Path(models.__file__).parent.parent / "presets"


# -- (a) hand families == meta build --------------------------------------------------------


def _hand_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for name, config in test_models_modern.SMALL.items():
        cases[f"modern-{name}"] = config
    for name, config in test_models_classic.CASES.items():
        if "architectures" not in config:  # the class the hand family builds by default
            default = test_models_classic.DEFAULT_CLASS[config["model_type"]]
            config = {**config, "architectures": [default]}
        cases[f"classic-{name}"] = config
    for folder, tag in ((DATA, "hf"), (PRESETS, "preset")):
        for file in sorted(folder.glob("*.json")):
            config = json.loads(file.read_text())
            mt = config.get("model_type")
            if mt not in BY_MODEL_TYPE:
                continue  # no hand family (the flagships: tests/test_flagships.py)
            if mt in test_models_classic.DEFAULT_CLASS and not config.get("architectures"):
                config["architectures"] = [test_models_classic.DEFAULT_CLASS[mt]]
            cases[f"{tag}-{file.stem}"] = config
    return cases


HAND_CASES = _hand_cases()


def _layout(inv: Inventory) -> tuple[list[Any], list[Any], set[tuple[str, str]], int]:
    params = [(t.name, t.shape, t.dtype) for t in inv.parameters]
    buffers = [(t.name, t.shape, t.dtype, t.persistent) for t in inv.buffers]
    return params, buffers, set(inv.tied), inv.num_parameters


@pytest.mark.parametrize("config", HAND_CASES.values(), ids=HAND_CASES.keys())
def test_hand_family_equals_the_meta_build(config: dict[str, Any]) -> None:
    hand = models.from_config(config)
    meta = inventory_from_config(config)
    h_params, h_buffers, h_tied, h_count = _layout(hand)
    m_params, m_buffers, m_tied, m_count = _layout(meta)
    assert h_params == m_params
    assert h_buffers == m_buffers
    assert h_tied == m_tied
    assert h_count == m_count


def test_every_hand_model_type_has_a_case() -> None:
    covered = {c["model_type"] for c in HAND_CASES.values()}
    assert set(BY_MODEL_TYPE) <= covered, set(BY_MODEL_TYPE) - covered


# -- (b) model_types without a hand family, against the real module ---------------------------

# Small sizes under every key name the config classes use; a key is passed only when the
# model_type's config class has it (its attribute_map aliases included).
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "moe_intermediate_size": 32,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 96,
    "n_positions": 64,
    "d_model": 64,
    "n_layers": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "n_heads": 4,
    "rotary_dim": 8,
    "pad_token_id": 0,
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}

# model_types of transformers 5.25's causal-LM mapping (or its heads) that memplan has no hand
# family for, with the class transformers exports that builds them.
UNRULED: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt_oss": ("GptOssForCausalLM", {}),
    "qwen3_next": ("Qwen3NextForCausalLM", {}),
    "qwen3_5_text": ("Qwen3_5ForCausalLM", {}),
    "qwen3_5_moe_text": ("Qwen3_5MoeForCausalLM", {}),
    "llama4_text": ("Llama4ForCausalLM", {}),
    "glm4_moe": ("Glm4MoeForCausalLM", {}),
    "olmo3": ("Olmo3ForCausalLM", {}),
    "granite": ("GraniteForCausalLM", {}),
    "ministral": ("MinistralForCausalLM", {}),
    "exaone4": ("Exaone4ForCausalLM", {}),
    "seed_oss": ("SeedOssForCausalLM", {}),
    "smollm3": ("SmolLM3ForCausalLM", {}),
    "starcoder2": ("Starcoder2ForCausalLM", {}),
    "cohere": ("CohereForCausalLM", {}),
    "stablelm": ("StableLmForCausalLM", {}),
    "glm4": ("Glm4ForCausalLM", {}),
    "olmoe": ("OlmoeForCausalLM", {}),
    "phimoe": ("PhimoeForCausalLM", {}),
    "granitemoe": ("GraniteMoeForCausalLM", {}),
    "deepseek_v32": ("DeepseekV32ForCausalLM", {}),
    "ernie4_5": ("Ernie4_5ForCausalLM", {}),
    "helium": ("HeliumForCausalLM", {}),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", {}),
    "gpt_neo": ("GPTNeoForCausalLM", {"attention_types": [[["global", "local"], 1]]}),
    "minimax": ("MiniMaxForCausalLM", {}),
    "jamba": ("JambaForCausalLM", {}),
    "gemma4_text": ("Gemma4ForCausalLM", {}),
    "mpt": ("MptForCausalLM", {}),
    # a classification head and an encoder-decoder of model_types memplan has families for:
    # the meta reader builds whichever class `architectures` names.
    "bert": ("BertForSequenceClassification", {"num_labels": 3}),
    "t5": ("T5ForConditionalGeneration", {}),
}


def tiny(model_type: str, **extra: Any) -> dict[str, Any]:
    default = transformers.AutoConfig.for_model(model_type).to_dict()
    known = {k for k in TINY if k in default}
    return {"model_type": model_type, **{k: TINY[k] for k in known}, **extra}


def real_layout(model: Any) -> tuple[list[Any], list[Any], set[tuple[str, str]], int]:
    """Names and shapes from the real module; tied pairs by shared storage."""
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    owner = {p.data_ptr(): n for n, p in model.named_parameters()}
    tied = {
        (n, owner[p.data_ptr()])
        for n, p in model.named_parameters(remove_duplicate=False)
        if owner[p.data_ptr()] != n
    }
    buffers = []
    for name, buf in model.named_buffers():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        buffers.append((name, tuple(buf.shape), leaf not in module._non_persistent_buffers_set))
    return params, buffers, tied, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", UNRULED)
def test_unruled_model_types_match_the_real_module(model_type: str) -> None:
    class_name, extra = UNRULED[model_type]
    config = tiny(model_type, architectures=[class_name], **extra)
    if model_type not in ("bert", "t5"):
        assert family_of(model_type) is None
    inv = inventory_from_config(config)

    cls = getattr(transformers, class_name)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    if not isinstance(hf_config, cls.config_class):
        hf_config = hf_config.get_text_config(decoder=True)
    torch.manual_seed(0)
    model = cls._from_config(hf_config)  # real tensors on the CPU, fp32
    params, buffers, tied, count = real_layout(model)

    assert [(t.name, t.shape) for t in inv.parameters] == params
    assert [(t.name, t.shape, t.persistent) for t in inv.buffers] == buffers
    assert set(inv.tied) == tied
    assert inv.num_parameters == count
    assert type(model).__name__ in inv.notes[0]


@pytest.mark.parametrize("model_type", ["recurrent_gemma", "llama", "gpt_oss"])
def test_fixed_dtypes_against_real_builds_in_two_dtypes(model_type: str) -> None:
    """Each floating tensor's dtype as the inventory gives it (None: follows the recipe)
    against the real module built on the CPU in fp32 and in bf16: a tensor that follows is
    each build's dtype, a fixed one is the same in both. RecurrentGemma's `normalizer` is bf16
    whatever the default dtype (a bf16 build took it for one that follows: verify's fp32 run
    held 2 bytes where the estimate said 4)."""
    config = tiny(model_type)
    inv = inventory_from_config(config)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    built = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        built[dtype] = dict([*model.named_parameters(), *model.named_buffers()])
    names = {"float32": "fp32", "bfloat16": "bf16", "int64": "int64", "bool": "bool"}
    for t in (*inv.parameters, *inv.buffers):
        a, b = (built[d][t.name].dtype for d in (torch.float32, torch.bfloat16))
        if (a, b) == (torch.float32, torch.bfloat16):
            assert t.dtype is None, t.name  # follows the recipe
        else:
            assert a == b and t.dtype == names[str(a).removeprefix("torch.")], t.name
    if model_type == "recurrent_gemma":
        assert {t.name: t.dtype for t in inv.buffers}["model.normalizer"] == "bf16"


def test_at_least_twenty_unruled_causal_lm_types() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    unruled = [t for t in UNRULED if family_of(t) is None]
    assert len(unruled) >= 20
    assert set(unruled) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_layers_and_roles_from_names() -> None:
    inv = inventory_from_config(tiny("gpt_oss", architectures=["GptOssForCausalLM"]))
    by_name = {t.name: t for t in (*inv.parameters, *inv.buffers)}
    assert by_name["model.embed_tokens.weight"].role == "embedding"
    assert by_name["model.embed_tokens.weight"].layer is None
    assert by_name["model.layers.1.self_attn.q_proj.weight"].role == "attention"
    assert by_name["model.layers.1.self_attn.q_proj.weight"].layer == 1
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].role == "experts"
    assert by_name["model.layers.0.mlp.router.weight"].role == "router"
    assert by_name["model.layers.0.input_layernorm.weight"].role == "norm"
    assert by_name["lm_head.weight"].role == "head"
    assert by_name["model.rotary_emb.inv_freq"].dtype == "fp32"  # created fp32 (see rotary)
    arch = inv.architecture
    assert arch is not None
    assert (arch.hidden_size, arch.num_layers, arch.num_experts) == (64, 2, 4)


def test_unknown_model_type_is_one_error() -> None:
    with pytest.raises(
        MemplanError, match="'no_such_model' is not supported.*installed transformers"
    ):
        inventory_from_config({"model_type": "no_such_model", "hidden_size": 8})


# -- (c) the CLI ------------------------------------------------------------------------------

runner = CliRunner()

SPEC = """\
model:
  hf_config: config.json
precision: bf16-mixed
optimizer:
  name: adamw
training:
  micro_batch_size: 1
  sequence_length: 64
parallelism:
  data: 1
hardware:
  gpu: H100-80GB
"""


def _spec(tmp_path: Path) -> Path:
    config = tiny("gpt_oss", architectures=["GptOssForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return spec


def test_cli_estimates_an_unruled_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["estimate", str(_spec(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["hardware"]["verdict"] == "model_states_fit_activations_unknown"
    assert doc["per_gpu"]["activations_modelled"] is False
    assert any("built on the meta device by transformers" in n for n in doc["notes"])
    config = tiny("gpt_oss", architectures=["GptOssForCausalLM"])
    assert doc["model"]["num_parameters"] == inventory_from_config(config).num_parameters


def test_cli_without_torch_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memplan.verify.trace as trace

    real = trace.find_spec
    monkeypatch.setattr(
        trace, "find_spec", lambda name: None if name in ("torch", "transformers") else real(name)
    )
    result = runner.invoke(app, ["estimate", str(_spec(tmp_path))])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = " ".join(result.output.split())
    assert "pip install torch transformers" in err
    assert "download.pytorch.org/whl/cpu" in err
    assert "model_type 'gpt_oss'" in err and "spec.yaml" in err


def test_hand_family_path_never_imports_torch(tmp_path: Path) -> None:
    """`estimate` on a hand family: torch stays unimported (a fresh interpreter)."""
    import subprocess

    (tmp_path / "config.json").write_text(json.dumps(test_models_modern.small("llama")))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    code = (
        "import sys; from memplan.cli.app import main; sys.argv=['memplan','estimate',"
        f"{str(spec)!r},'--json']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fallback_refuses_without_torch_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    import memplan.verify.trace as trace

    monkeypatch.setattr(trace, "find_spec", lambda name: None)
    with pytest.raises(MemplanError, match="torch and transformers are not installed"):
        fallback_inventory({"model_type": "gpt_oss"}, "config.json")


def test_an_architecture_transformers_lacks_falls_back_with_a_note() -> None:
    config = tiny("olmo3", architectures=["Olmo3ForRemoteCode"], auto_map={"AutoModel": "x.Y"})
    inv = inventory_from_config(config)
    assert "built as Olmo3ForCausalLM" in inv.notes[1]
    assert "auto_map in the config ignored" in inv.notes[2]
