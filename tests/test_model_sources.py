"""Model sources beyond config.json: safetensors headers, the local Hugging Face cache, and the
parameter counts `memplan inventory` reports (non-embedding, active per token, largest parts).

Safetensors files are written by the `safetensors` package itself (torch tensors through
`safetensors.torch.save_file`); damaged files are cut or hand-written with `struct`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memplan.cli.app import app
from memplan.config import load
from memplan.errors import MemplanError
from memplan.model import load as model_load
from memplan.model import sources as models
from memplan.model.families import family_of, supported_model_types
from memplan.model.inventory import Inventory
from memplan.model.sources import counts
from memplan.model.sources.checkpoint import classify
from memplan.model.sources.safetensors import SAFETENSORS_DTYPES, read_checkpoint, read_header
from memplan.precision import DTYPES
from tests.conftest import DATA, TINY_LLAMA, make_spec

PRESETS = Path(models.__file__).parent.parent / "presets"
runner = CliRunner()


def preset(name: str) -> Inventory:
    return models.from_config(json.loads((PRESETS / f"{name}.json").read_text()))


def inventory_of(tmp_path: Path, model: dict[str, Any]) -> Inventory:
    """`load_inventory` of a spec file in `tmp_path` whose model section is `model`."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"model": model}))
    return model_load.load_inventory(load.load_spec(spec))


def layout(inv: Inventory) -> list[tuple[str, tuple[int, ...], str, str | None, int | None]]:
    return [(t.name, t.shape, t.kind, t.dtype, t.layer) for t in (*inv.parameters, *inv.buffers)]


# -- writing checkpoints ---------------------------------------------------------------------


@pytest.fixture
def st():  # type: ignore[no-untyped-def]
    """(torch, safetensors.torch): writing .safetensors files needs them; reading does not."""
    torch = pytest.importorskip("torch")
    return torch, pytest.importorskip("safetensors.torch")


def save(st: Any, path: Path, shapes: dict[str, tuple[int, ...]], dtype: Any = None) -> Path:
    """Zero tensors of `shapes` saved with safetensors.torch.save_file (bf16 by default)."""
    torch, storch = st
    dtype = dtype or torch.bfloat16
    path.parent.mkdir(parents=True, exist_ok=True)
    storch.save_file({n: torch.zeros(s, dtype=dtype) for n, s in shapes.items()}, str(path))
    return path


def stored_shapes(inv: Inventory) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of `inv` holds: its parameters and persistent buffers."""
    return {t.name: t.shape for t in (*inv.parameters, *inv.buffers) if t.kind == "parameter"} | {
        t.name: t.shape for t in inv.buffers if t.persistent
    }


def raw_file(path: Path, header: bytes, *, data: int = 0, length: int | None = None) -> Path:
    """A file with an explicit length prefix, header bytes and `data` zero bytes."""
    prefix = struct.pack("<Q", len(header) if length is None else length)
    path.write_bytes(prefix + header + bytes(data))
    return path


# -- safetensors: one file, shards, a directory ----------------------------------------------


def test_single_file_with_config_reproduces_the_config_inventory(tmp_path: Path, st: Any) -> None:
    reference = models.from_config(TINY_LLAMA)
    save(st, tmp_path / "model.safetensors", stored_shapes(reference))
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    inv = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    assert layout(inv) == layout(reference)  # names, order, kinds, dtypes, layers
    assert [t.role for t in inv.parameters] == [t.role for t in reference.parameters]
    assert inv.num_parameters == reference.num_parameters == 219_584
    assert inv.architecture == reference.architecture
    assert all(t.dtype is None for t in inv.parameters)  # bf16 in the file is storage only
    assert any("bf16 (" in n and "storage" in n for n in inv.notes)
    assert any("non-persistent buffers from config.json added" in n for n in inv.notes)
    assert not any("describes" in n for n in inv.notes)  # the cross-check found no difference


def test_real_transformers_state_dict(tmp_path: Path, st: Any) -> None:
    transformers = pytest.importorskip("transformers")
    torch, storch = st
    config = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    storch.save_file(state, str(tmp_path / "model.safetensors"))
    alone = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    reference = models.from_config(TINY_LLAMA)
    assert sorted((t.name, t.shape, t.role, t.layer) for t in alone.parameters) == sorted(
        (t.name, t.shape, t.role, t.layer) for t in reference.parameters
    )
    assert alone.architecture is None
    assert any("no config.json beside the checkpoint" in n for n in alone.notes)


def test_two_shard_index_and_directory(tmp_path: Path, st: Any) -> None:
    reference = models.from_config(TINY_LLAMA)
    shapes = stored_shapes(reference)
    names = list(shapes)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    for shard, members in shards.items():
        save(st, tmp_path / "ckpt" / shard, {n: shapes[n] for n in members})
    index = {
        "metadata": {"total_size": 2 * reference.num_parameters},
        "weight_map": {n: s for s, members in shards.items() for n in members},
    }
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY_LLAMA))

    checkpoint = read_checkpoint(tmp_path / "ckpt" / "model.safetensors.index.json")
    assert [f.name for f in checkpoint.files] == list(shards)
    assert {t.name for t in checkpoint.tensors} == set(names)
    by_index = inventory_of(tmp_path, {"safetensors": "ckpt/model.safetensors.index.json"})
    by_dir = inventory_of(tmp_path, {"safetensors": "ckpt"})
    assert layout(by_index) == layout(by_dir) == layout(reference)
    assert by_index.name == "ckpt/model.safetensors.index.json"
    assert "of 2 safetensors files, no weights" in by_index.notes[0]


def test_only_the_headers_are_read(tmp_path: Path) -> None:
    # A 4 GiB data section that is never written (a sparse file): reading it would be slow and
    # would need the bytes; the reader takes 8 + N bytes and checks the offsets against the size.
    numel = 2**31
    header = json.dumps({"w": {"dtype": "BF16", "shape": [numel], "data_offsets": [0, 2 * numel]}})
    path = raw_file(tmp_path / "big.safetensors", header.encode())
    with path.open("r+b") as f:
        f.truncate(8 + len(header) + 2 * numel)
    tensors, read = read_header(path)
    assert read == 8 + len(header)
    assert [(t.name, t.shape, t.dtype, t.file_dtype) for t in tensors] == [
        ("w", (numel,), "bf16", "BF16")
    ]


# -- safetensors: dtypes ---------------------------------------------------------------------


def test_dtype_table_names_memplan_and_safetensors_dtypes() -> None:
    assert set(SAFETENSORS_DTYPES.values()) <= set(DTYPES)
    storch = pytest.importorskip("safetensors.torch")
    assert set(SAFETENSORS_DTYPES) <= set(storch._TYPES)  # dtypes the writer knows


def test_stored_dtypes_map_to_memplan_dtypes(tmp_path: Path, st: Any) -> None:
    torch, storch = st
    tensors = {
        "model.embed_tokens.weight": torch.zeros(10, 4, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 4, dtype=torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.zeros(1, 1),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.layers.1.self_attn.q_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
        "model.layers.1.self_attn.q_proj.qweight": torch.zeros(4, 2, dtype=torch.int32),
        "positions": torch.zeros(7, dtype=torch.int64),
        "mask": torch.zeros(3, 3, dtype=torch.bool),
        "packed": torch.zeros(5, dtype=torch.uint8),
        "signed": torch.zeros(5, dtype=torch.int8),
    }
    storch.save_file(tensors, str(tmp_path / "model.safetensors"))
    stored = {
        t.name: (t.dtype, t.file_dtype) for t in read_header(tmp_path / "model.safetensors")[0]
    }
    assert stored["model.embed_tokens.weight"] == ("fp16", "F16")
    assert stored["model.layers.0.mlp.up_proj.weight"] == ("fp8", "F8_E4M3")
    assert stored["mask"] == ("bool", "BOOL")
    inv = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    params = {t.name: t for t in inv.parameters}
    buffers = {t.name: t for t in inv.buffers}
    # Floating parameters take the recipe's dtype; integer/bool data and scales are fixed buffers.
    assert set(params) == {
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    assert {t.dtype for t in params.values()} == {None}
    assert {n: (b.dtype, b.persistent) for n, b in buffers.items()} == {
        "model.layers.0.mlp.up_proj.weight_scale_inv": ("fp32", True),
        "model.layers.1.self_attn.q_proj.qweight": ("int32", True),
        "positions": ("int64", True),
        "mask": ("bool", True),
        "packed": ("uint8", True),
        "signed": ("int8", True),
    }
    assert buffers["model.layers.0.mlp.up_proj.weight_scale_inv"].role == "quantization"
    assert any("6 tensors kept as persistent buffers" in n for n in inv.notes)


def test_unknown_dtype_is_refused_by_name(tmp_path: Path, st: Any) -> None:
    torch, _ = st
    save(st, tmp_path / "model.safetensors", {"w": (2, 2)}, dtype=torch.float64)
    with pytest.raises(MemplanError, match=r"tensor 'w' has dtype F64, which memplan does not"):
        read_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(MemplanError, match=r"supported: F32, F16, BF16, F8_E4M3, F8_E5M2, I64"):
        read_checkpoint(tmp_path / "model.safetensors")


# -- safetensors: damaged files ---------------------------------------------------------------

GOOD_HEADER = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_bytes(b"abc"), r"the file is 3 bytes, shorter than the 8-byte length"),
        (lambda p: p.write_bytes(b""), r"the file is 0 bytes"),
        (
            lambda p: raw_file(p, b"{}", length=2**62),
            r"claims a 4,611,686,018,427,387,904-byte header, over the format's limit",
        ),
        (
            lambda p: raw_file(p, GOOD_HEADER.encode(), length=len(GOOD_HEADER) + 1000),
            r"header but only \d+ bytes follow it \(truncated\?\)",
        ),
        (lambda p: raw_file(p, b"\x80\x81garbage", data=24), r"the header is not UTF-8 text"),
        (lambda p: raw_file(p, b"{not json", data=24), r"the header is not valid JSON"),
        (lambda p: raw_file(p, b"[1, 2]", data=24), r"the header is a JSON list, not an object"),
        (
            lambda p: raw_file(p, GOOD_HEADER.encode(), data=10),
            r"tensor 'w': data_offsets \[0, 24\] do not lie inside the 10-byte data section",
        ),
        (
            lambda p: raw_file(
                p, b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}', data=24
            ),
            r"tensor 'w': F32 \[2, 3\] needs 24 bytes but data_offsets span 20",
        ),
        (
            lambda p: raw_file(p, b'{"w": {"dtype": "F32", "shape": [-1]}}', data=24),
            r"tensor 'w': shape must be a list of non-negative integers",
        ),
        (lambda p: raw_file(p, b'{"w": 1}', data=24), r"tensor 'w' is not an object"),
    ],
    ids=[
        "short",
        "empty",
        "huge-length",
        "header-past-end",
        "not-utf8",
        "bad-json",
        "not-object",
        "data-truncated",
        "offset-size-mismatch",
        "bad-shape",
        "bad-entry",
    ],
)
def test_malformed_file_is_one_clear_error_naming_it(
    tmp_path: Path, make: Any, problem: str
) -> None:
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(MemplanError, match=problem) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path} is not a readable safetensors file: ")


def test_truncated_real_file(tmp_path: Path, st: Any) -> None:
    path = save(st, tmp_path / "model.safetensors", {"a": (64, 64), "b": (64,)})
    whole = path.read_bytes()
    (length,) = struct.unpack("<Q", whole[:8])
    path.write_bytes(whole[: 8 + length // 2])  # cut inside the header
    with pytest.raises(MemplanError, match=r"only \d+ bytes follow it \(truncated\?\)"):
        read_checkpoint(path)
    path.write_bytes(whole[:-100])  # cut inside the data
    with pytest.raises(MemplanError, match=r"do not lie inside the .*data section"):
        read_checkpoint(path)


def test_spec_error_points_at_the_yaml_line(tmp_path: Path) -> None:
    raw_file(tmp_path / "model.safetensors", b"garbage!")
    spec = tmp_path / "spec.yaml"
    spec.write_text("precision: bf16-mixed\nmodel:\n  safetensors: model.safetensors\n")
    result = runner.invoke(app, ["inventory", str(spec)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {spec}:3: {tmp_path / 'model.safetensors'} is not")
    assert "the header is not valid JSON" in result.stderr


@pytest.mark.parametrize(
    ("index", "shards", "problem"),
    [
        ({"metadata": {}}, {}, r"has no weight_map \(tensor name -> shard file\)"),
        ({"weight_map": {"w": "gone.safetensors"}}, {}, r"lists shard gone.safetensors, which"),
        (
            {"weight_map": {"w": "a.safetensors", "v": "a.safetensors"}},
            {"a.safetensors": {"w": (2,)}},
            r"1 tensors of the weight_map are not in their shard's header, e.g. v \(a.safe",
        ),
    ],
    ids=["no-weight-map", "missing-shard", "missing-tensor"],
)
def test_bad_index(tmp_path: Path, st: Any, index: Any, shards: Any, problem: str) -> None:
    for name, shapes in shards.items():
        save(st, tmp_path / name, shapes)
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(MemplanError, match=problem):
        read_checkpoint(path)


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match=r"safetensors file not found: .*nope.safetensors"):
        inventory_of(tmp_path, {"safetensors": "nope.safetensors"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemplanError, match=r"empty is a directory without model.safetensors"):
        inventory_of(tmp_path, {"safetensors": "empty"})


# -- safetensors: cross-checks against config.json --------------------------------------------

TINY_MIXTRAL: dict[str, Any] = {
    "model_type": "mixtral",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 101,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}


def mixtral_checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Mixtral's checkpoint layout (what `save_pretrained` writes in transformers 5.24 too):
    one w1/w2/w3 per expert under `block_sparse_moe`, not the fused runtime tensors."""
    h, inter, kv, vocab = 32, 48, 2 * 8, 101
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(2):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.block_sparse_moe.gate.weight": (4, h),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
        for e in range(4):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes |= {f"{q}.w1.weight": (inter, h), f"{q}.w2.weight": (h, inter)}
            shapes[f"{q}.w3.weight"] = (inter, h)
    return shapes


def test_checkpoint_layout_differs_from_runtime_layout(tmp_path: Path, st: Any) -> None:
    save(st, tmp_path / "model.safetensors", mixtral_checkpoint_shapes())
    (tmp_path / "config.json").write_text(json.dumps(TINY_MIXTRAL))
    inv = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    reference = models.from_config(TINY_MIXTRAL)
    assert inv.num_parameters == reference.num_parameters == 49_888
    assert len(inv.parameters) == 41 and len(reference.parameters) == 21
    assert inv.architecture == reference.architecture
    roles = {t.name: (t.role, t.layer) for t in inv.parameters}
    assert roles["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == ("experts", 1)
    assert roles["model.layers.0.block_sparse_moe.gate.weight"] == ("router", 0)
    # Same active count as the fused runtime layout: 2 of 4 experts per token.
    assert counts.active_parameters(inv) == counts.active_parameters(reference) == 31_456
    (note,) = [n for n in inv.notes if "describes" in n]
    assert "holds 49,888 parameters in 41 tensors; its config.json describes 49,888 in 21" in note
    assert "26 only in the file (model.layers.0.block_sparse_moe.experts.0.w1.weight" in note
    assert "24 tensors hold one expert each" in note and "give model.hf_config" in note
    # Name order (layers numerically), since the file's names are not the runtime's.
    names = [t.name for t in inv.parameters]
    assert names.index("model.layers.1.input_layernorm.weight") < names.index("model.norm.weight")


def test_save_pretrained_checkpoint_of_transformers(tmp_path: Path, st: Any) -> None:
    transformers = pytest.importorskip("transformers")
    torch, _ = st
    kwargs = {k: v for k, v in TINY_MIXTRAL.items() if k != "model_type"}
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    inv = inventory_of(tmp_path, {"safetensors": "ckpt"})
    reference = models.from_config(TINY_MIXTRAL)
    assert inv.num_parameters == reference.num_parameters
    assert counts.active_parameters(inv) == counts.active_parameters(reference)


def test_extra_tensors_and_reshaped_ones_are_noted(tmp_path: Path, st: Any) -> None:
    shapes = stored_shapes(models.from_config(TINY_LLAMA))
    shapes["model.layers.2.eh_proj.weight"] = (64, 128)  # a multi-token-prediction layer
    shapes["model.norm.weight"] = (65,)
    save(st, tmp_path / "model.safetensors", shapes)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    inv = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    (note,) = [n for n in inv.notes if "describes" in n]
    assert "(+8,193 parameters): 1 only in the file (model.layers.2.eh_proj.weight)" in note
    assert "1 shaped differently (model.norm.weight)" in note
    assert inv.num_parameters == 219_584 + 8_193  # the file's tensors are used


def test_tied_embedding_is_one_tensor(tmp_path: Path, st: Any) -> None:
    tied = {**TINY_LLAMA, "tie_word_embeddings": True}
    reference = models.from_config(tied)
    assert reference.tied == (("lm_head.weight", "model.embed_tokens.weight"),)
    (tmp_path / "config.json").write_text(json.dumps(tied))
    shapes = stored_shapes(reference)
    save(st, tmp_path / "model.safetensors", shapes)  # as save_pretrained: the owner only
    once = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    assert once.tied == reference.tied and layout(once) == layout(reference)
    assert not any("describes" in n for n in once.notes)

    save(st, tmp_path / "model.safetensors", shapes | {"lm_head.weight": (1041, 64)})
    twice = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    assert twice.tied == reference.tied and layout(twice) == layout(reference)
    assert any(
        "ties lm_head.weight to the embedding; the checkpoint stores" in n for n in twice.notes
    )


def test_config_of_an_unknown_family_is_set_aside(tmp_path: Path, st: Any) -> None:
    save(st, tmp_path / "model.safetensors", {"backbone.layers.0.mixer.in_proj.weight": (8, 4)})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    inv = inventory_of(tmp_path, {"safetensors": "model.safetensors"})
    assert inv.architecture is None and inv.num_parameters == 32
    assert inv.parameters[0].layer == 0
    assert any(
        "config.json not used: model_type 'mamba' is not one memplan models" in n for n in inv.notes
    )


def test_roles_and_layers_from_names_agree_with_every_builder() -> None:
    """Without a config, `classify` reads role and layer from names; on every shipped preset
    and reference config it agrees with the family builders (T5's decoder blocks aside: their
    layer continues the encoder's count, which names alone cannot tell)."""
    configs = [json.loads(p.read_text()) for p in sorted(PRESETS.glob("*.json"))]
    configs += [json.loads(p.read_text()) for p in sorted((DATA / "hf-configs").glob("*.json"))]
    # Presets without a hand family (the flagships) have no builder: tests/test_flagships.py.
    configs = [c for c in configs if family_of(c["model_type"]) is not None]
    configs.append(
        {"model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 2, "num_heads": 2,
         "d_kv": 8, "vocab_size": 50, "architectures": ["T5ForConditionalGeneration"]}
    )  # fmt: skip
    checked = 0
    for config in configs:
        for t in models.from_config(config).parameters:
            role, layer = classify(t.name)
            assert role == t.role, (config["model_type"], t.name)
            if not t.name.startswith("decoder.block."):
                assert layer == t.layer, (config["model_type"], t.name)
            checked += 1
    assert checked > 2000


# -- hf_id: the local Hugging Face cache --------------------------------------------------------


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME in tmp_path, the other cache settings cleared; returns the hub cache dir."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def cache_snapshot(hub: Path, repo_id: str, commit: str, config: dict[str, Any]) -> Path:
    """The cache layout of huggingface_hub: the file in blobs/, a symlink in snapshots/."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / f"blob-{commit}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_text(json.dumps(config))
    link = repo / "snapshots" / commit / "config.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def set_ref(hub: Path, repo_id: str, commit: str) -> None:
    ref = hub / ("models--" + repo_id.replace("/", "--")) / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def test_hf_id_follows_refs_main(tmp_path: Path, hf_env: Path) -> None:
    old = cache_snapshot(hf_env, "org/tiny", "a" * 40, {**TINY_LLAMA, "num_hidden_layers": 1})
    new = cache_snapshot(hf_env, "org/tiny", "b" * 40, TINY_LLAMA)
    os.utime(old.parent, (2e9, 2e9))  # the older commit has the newer directory
    set_ref(hf_env, "org/tiny", "b" * 40)
    assert model_load.hf_cache_config("org/tiny") == new
    inv = inventory_of(tmp_path, {"hf_id": "org/tiny"})
    assert layout(inv) == layout(models.from_config(TINY_LLAMA))


def test_hf_id_without_refs_takes_the_newest_snapshot(hf_env: Path) -> None:
    first = cache_snapshot(hf_env, "org/tiny", "a" * 40, TINY_LLAMA)
    second = cache_snapshot(hf_env, "org/tiny", "b" * 40, TINY_LLAMA)
    os.utime(first.parent, (1e9, 1e9))
    os.utime(second.parent, (2e9, 2e9))
    assert model_load.hf_cache_config("org/tiny") == second
    os.utime(first.parent, (3e9, 3e9))
    assert model_load.hf_cache_config("org/tiny") == first


def test_hf_id_miss_names_where_it_looked(tmp_path: Path, hf_env: Path) -> None:
    looked = hf_env / "models--org--absent" / "snapshots"
    with pytest.raises(MemplanError) as err:
        inventory_of(tmp_path, {"hf_id": "org/absent"})
    message = str(err.value)
    assert (
        f"org/absent is not in the local Hugging Face cache: no config.json under {looked}"
        in message
    )
    assert "(cache from $HF_HOME/hub)" in message
    assert "hf download org/absent config.json" in message and "model.hf_config" in message
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:1: ")

    set_ref(hf_env, "org/absent", "c" * 40)
    with pytest.raises(
        MemplanError, match=r"refs/main points at c{40}, but .*/snapshots/c{40}/config"
    ):
        model_load.hf_cache_config("org/absent")


def test_hf_cache_location_order(
    tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert model_load.hf_hub_cache() == (hf_env, "$HF_HOME/hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert model_load.hf_hub_cache() == (tmp_path / "hub-cache", "$HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_load.hf_hub_cache() == (tmp_path / "home/.cache/huggingface/hub", "the default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_load.hf_hub_cache() == (tmp_path / "xdg/huggingface/hub", "$XDG_CACHE_HOME")


def test_hf_cache_resolution_matches_huggingface_hub(tmp_path: Path, hf_env: Path) -> None:
    pytest.importorskip("huggingface_hub")
    cache_snapshot(hf_env, "org/tiny", "a" * 40, TINY_LLAMA)
    set_ref(hf_env, "org/tiny", "a" * 40)
    code = (
        "from huggingface_hub import try_to_load_from_cache as f; "
        "print(f('org/tiny', 'config.json'))"
    )  # huggingface_hub reads the environment when imported: ask a fresh interpreter
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(model_load.hf_cache_config("org/tiny"))


def test_hf_id_never_touches_the_network(
    tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("memplan opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    cache_snapshot(hf_env, "org/tiny", "a" * 40, TINY_LLAMA)
    assert inventory_of(tmp_path, {"hf_id": "org/tiny"}).num_parameters == 219_584
    with pytest.raises(MemplanError, match="not in the local Hugging Face cache"):
        inventory_of(tmp_path, {"hf_id": "org/other"})


@pytest.mark.parametrize("bad", ["org/name/extra", "org--name", "../etc", "a/b c"])
def test_hf_id_must_be_a_repo_id(bad: str) -> None:
    with pytest.raises(MemplanError, match=r"model.hf_id: .* is not a Hugging Face repo id"):
        load.validate({"model": {"hf_id": bad}})


def test_model_sources_are_exclusive() -> None:
    exclusive = (
        r"give exactly one of hf_config, preset, architecture, safetensors, hf_id or "
        r"num_parameters \(got safetensors and hf_id\)"
    )
    with pytest.raises(MemplanError, match=exclusive):
        load.validate({"model": {"safetensors": "x.safetensors", "hf_id": "org/name"}})


# -- counts: non-embedding, active per token, largest parts -----------------------------------


def test_active_parameters_of_mixtral_8x7b() -> None:
    """Mixtral-8x7B (config.json: H=4096, I=14336, 32 layers, 32 heads, 8 kv heads of 128,
    vocab 32000, 8 experts, top 2). Mistral AI, "Mixtral of experts" (2023-12-11) and Jiang et
    al. 2024 (arXiv 2401.04088 section 2.1): 46.7B parameters, 12.9B used per token."""
    h, inter, layers, vocab, kv = 4096, 14336, 32, 32000, 8 * 128
    attention = 2 * h * h + 2 * kv * h  # q, o [H, H]; k, v [kv, H]
    expert = 3 * inter * h  # w1, w3 [I, H]; w2 [H, I]
    router, norms = 8 * h, 2 * h
    layer_active = attention + 2 * expert + router + norms
    bare = layers * layer_active + h  # + final norm
    with_embeddings = bare + 2 * vocab * h  # embed_tokens and an untied lm_head
    inv = preset("mixtral-8x7b")
    assert counts.active_parameters(inv) == with_embeddings == 12_879_925_248
    assert counts.active_parameters(inv, embeddings=False) == bare == 12_617_781_248
    assert abs(with_embeddings / 12.9e9 - 1) < 0.01  # the published figure, to its rounding
    assert inv.num_parameters == 46_702_792_704  # 46.7B


def test_active_parameters_of_qwen3_30b_a3b() -> None:
    """Qwen3-30B-A3B (H=2048, 48 layers, 32 q heads and 4 kv heads of 128, q/k norms, 128
    experts of 768, top 8, vocab 151936, untied). Qwen3 model card: 30.5B total, 3.3B
    activated, 29.9B non-embedding."""
    h, layers, vocab, hd = 2048, 48, 151936, 128
    attention = 2 * (32 * hd * h) + 2 * (4 * hd * h) + 2 * hd  # q, o; k, v; q_norm, k_norm
    layer_active = attention + 8 * (3 * 768 * h) + 128 * h + 2 * h  # 8 experts, router, norms
    bare = layers * layer_active + h
    inv = preset("qwen3-30b-a3b")
    assert counts.active_parameters(inv, embeddings=False) == bare == 2_730_702_848
    assert counts.active_parameters(inv) == bare + 2 * vocab * h == 3_353_032_704
    assert abs(3_353_032_704 / 3.3e9 - 1) < 0.02  # "3.3B": 1.6% off, the card truncates
    assert round(counts.non_embedding_parameters(inv) / 1e9, 1) == 29.9


def test_active_parameters_of_deepseek_v3() -> None:
    """DeepSeek-V3 (arXiv 2412.19437, abstract: 671B total, 37B activated per token): 61
    layers, the first 3 dense (I=18432), then 256 routed experts of 2048 (top 8) and one shared
    expert; MLA with q_lora 1536, kv_lora 512, 128 heads of 128 + 64 rope dims, v 128."""
    h, vocab, heads = 7168, 129280, 128
    mla = (
        h * 1536 + 1536 + 1536 * heads * 192  # q_a_proj, q_a_layernorm, q_b_proj
        + h * (512 + 64) + 512 + 512 * heads * (128 + 128)  # kv_a (+rope), norm, kv_b
        + heads * 128 * h  # o_proj
    )  # fmt: skip
    norms = 2 * h
    dense_layer = mla + 3 * 18432 * h + norms
    moe_active = mla + 8 * (3 * 2048 * h) + 3 * 2048 * h + 256 * h + norms  # 8 routed, shared
    bare = 3 * dense_layer + 58 * moe_active + h
    inv = preset("deepseek-v3")
    assert counts.active_parameters(inv, embeddings=False) == bare == 35_698_924_544
    assert counts.active_parameters(inv) == bare + 2 * vocab * h == 37_552_282_624
    assert abs(37_552_282_624 / 37e9 - 1) < 0.02  # "37B": 1.5% off
    assert counts.largest_layer(inv) == (3, 11_507_286_016)  # the first MoE layer
    assert inv.num_parameters == 671_026_404_352  # without the MTP layer (transformers drops it)


def test_dense_flat_and_unknown_top_k() -> None:
    llama = preset("llama-3-8b")
    assert counts.active_parameters(llama) == llama.num_parameters == 8_030_261_248
    assert counts.non_embedding_parameters(llama) == 8_030_261_248 - 2 * 128256 * 4096
    assert counts.largest_tensor(llama) is not None
    assert counts.largest_tensor(llama).name == "model.embed_tokens.weight"  # type: ignore[union-attr]
    flat = models.from_parameter_count(10**9)
    assert counts.active_parameters(flat) is None and counts.largest_layer(flat) is None
    no_config = models.from_tensors(
        [models.TensorSpec("model.layers.0.mlp.experts.gate_up_proj", (4, 8, 2), dtype="bf16")],
        name="experts only",
    )
    assert counts.routed_expert_parameters(no_config) == 64
    assert counts.active_parameters(no_config) is None  # top_k unknown without config.json


def test_inventory_json_and_text_show_the_counts(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  preset: mixtral-8x7b\n")
    result = runner.invoke(app, ["inventory", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["num_parameters"] == 46_702_792_704
    assert doc["num_non_embedding_parameters"] == 46_440_648_704
    assert doc["num_active_parameters"] == 12_879_925_248
    assert doc["num_active_non_embedding_parameters"] == 12_617_781_248
    assert doc["active_parameters_definition"] == counts.ACTIVE_DEFINITION
    assert doc["largest_tensor"] == {
        "name": "model.layers.0.mlp.experts.gate_up_proj",
        "shape": [8, 28672, 4096],
        "numel": 939_524_096,
    }
    assert doc["largest_layer"] == {"layer": 0, "num_parameters": 1_451_270_144}

    text = runner.invoke(app, ["inventory", str(spec), "--width", "200"]).stdout
    assert "non-embedding parameters: 46,440,648,704" in text
    assert (
        "active parameters per token: 12,879,925,248 with embeddings and head, 12,617,781,248 "
        "without (top_k=2 of 8 experts)" in text
    )
    assert "top_k/num_experts of the routed expert parameters" in text
    assert "largest layer: 0 (1,451,270,144 parameters)" in text
    assert "largest tensor: model.layers.0.mlp.experts.gate_up_proj [8, 28672, 4096]" in text


def test_inventory_json_of_a_bare_count(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  num_parameters: 1000\n")
    doc = json.loads(runner.invoke(app, ["inventory", str(spec), "--json"]).stdout)
    assert doc["num_active_parameters"] is None and doc["largest_layer"] is None
    assert doc["largest_tensor"] == {"name": "parameters", "shape": [1000], "numel": 1000}


# -- an unknown model_type ---------------------------------------------------------------------


def test_unknown_model_type_lists_families_and_the_ways_out(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    # A model_type neither memplan nor transformers knows (one transformers knows gets its
    # inventory from the meta device: tests/test_trace_meta.py).
    spec.write_text("model:\n  architecture:\n    model_type: mamba9\n    hidden_size: 8\n")
    result = runner.invoke(app, ["inventory", str(spec)])
    assert result.exit_code == 1
    message = result.stderr
    assert message.startswith(f"error: {spec}:3: model_type 'mamba9' is not supported.")
    supported = re.search(r"Supported: ([a-z0-9_, -]+)\.", message)
    assert supported is not None
    assert supported.group(1).split(", ") == supported_model_types()
    assert "`model: {architecture: {...}}`" in message
    assert "`model: {num_parameters: N}`" in message
    loaded = load.LoadedSpec(make_spec(model={"architecture": {"model_type": "mamba"}}), None, {})
    with pytest.raises(MemplanError, match=r"model_type 'mamba' is not supported"):
        model_load.load_inventory(loaded)
