"""Broken or missing checkpoints fail with the right exception type and a message that names
the file and the problem."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxvllm.models.loader import load_model
from jaxvllm.models.registry import supported_architectures
from jaxvllm.models.safetensors_file import SafetensorsFile

K_PROJ = "model.layers.1.self_attn.k_proj.weight"  # HF shape (kv_size 32, hidden 64)


@pytest.fixture
def ckpt(llama_folder, tmp_path):
    """A private copy of the tiny Llama checkpoint, free to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(llama_folder, folder)
    return folder


def write_raw_safetensors(path, header: bytes, data: bytes = b"", declared_len: int | None = None):
    n = len(header) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + header + data)


def rewrite_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    path.unlink()
    save_file(tensors, path)
    return path


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(str(ckpt))
    assert str(ckpt) in str(info.value) and "config.json" in str(info.value)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt))
    assert str(ckpt / "config.json") in str(info.value) and "invalid JSON" in str(info.value)


def test_config_without_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(str(ckpt))
    message = str(info.value)
    assert str(ckpt) in message and "*.safetensors" in message


def test_pytorch_bin_only_is_explained(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"\.bin checkpoints are not supported"):
        load_model(str(ckpt))


@pytest.mark.parametrize("header, declared, data, problem", [
    (b"{this is not json", None, b"", "corrupt safetensors header"),
    (b"[1, 2, 3]", None, b"", "not a JSON object"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', None, b"\0" * 8, "'data_offsets'"),
    (b'{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}', None, b"\0" * 8, "'Q4'"),
    (b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}', None, b"\0" * 16,
     "'w' offsets 0..16 do not fit shape (2, 3)"),
    (b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}', None, b"\0" * 16,
     "'w' offsets 0..24 do not fit shape (2, 3)"),
    (b"{}", 10**6, b"", "declared length 1000000 bytes exceeds the file"),
    (b"", None, b"", "corrupt safetensors"),
])
def test_corrupt_safetensors(ckpt, header, declared, data, problem):
    path = ckpt / "model.safetensors"
    write_raw_safetensors(path, header, data, declared)
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_file_shorter_than_its_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than its 8-byte header length") as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_offsets_not_matching_shape_in_a_real_file(ckpt):
    """A real checkpoint whose header claims one tensor is bigger than its bytes."""
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[K_PROJ]["shape"] = [33, 64]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    assert str(path) in str(info.value) and K_PROJ in str(info.value)
    assert "(33, 64)" in str(info.value)


def test_unsupported_architecture_lists_supported(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt))
    message = str(info.value)
    assert str(ckpt / "config.json") in message and "GPT2LMHeadModel" in message
    assert "not supported" in message
    for arch in supported_architectures():
        assert arch in message


def test_config_without_architectures(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["architectures"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'llama' is not supported; supported architectures: "):
        load_model(str(ckpt))


def test_missing_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    message = str(info.value)
    assert str(ckpt) in message and "missing" in message
    assert "model.layers.1.post_attention_layernorm.weight" in message


def test_missing_top_level_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("lm_head.weight"))  # untied model: lm_head needed
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    assert str(ckpt) in str(info.value) and "lm_head.weight" in str(info.value)


def test_wrong_shape_names_tensor_and_both_shapes(ckpt):
    def edit(t):
        t[K_PROJ] = np.zeros((48, 64), np.float32)

    rewrite_tensors(ckpt, edit)
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    message = str(info.value)
    assert str(ckpt) in message and K_PROJ in message
    # the shapes as they are in the checkpoint (HF [out, in] layout), not transposed
    assert "(48, 64)" in message and "(32, 64)" in message


def test_wrong_shape_of_a_vector(ckpt):
    def edit(t):
        t["model.norm.weight"] = np.ones(63, np.float32)

    rewrite_tensors(ckpt, edit)
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt), dtype="float32")
    message = str(info.value)
    assert "model.norm.weight" in message and "(63,)" in message and "(64,)" in message


def test_sharded_index_with_a_missing_shard(zoo, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(zoo.save_variant("llama_gqa", "sharded-broken", max_shard_size="40KB"), folder)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 2
    (folder / shards[1]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert str(index) in message and shards[1] in message and "missing" in message
    assert shards[0] not in message


def test_sharded_index_that_is_not_json(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{]")
    with pytest.raises(ValueError) as info:
        load_model(str(ckpt))
    assert str(ckpt / "model.safetensors.index.json") in str(info.value)


@pytest.mark.parametrize("name", ["/nonexistent/jaxvllm-test-model", "./no-such-model-dir",
                                  "missing-model.gguf", "a/b/c"])
def test_nonexistent_local_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_model(name)
    assert repr(name) in str(info.value) and "does not exist" in str(info.value)


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a model") as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_folder_without_anything_recognizable(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_hub_id_not_in_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once at import: point its resolved cache there as well
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    repo = "jaxvllm-tests/no-such-model"
    with pytest.raises(ValueError) as info:
        load_model(repo)
    message = str(info.value)
    assert repr(repo) in message
    assert "not in the Hugging Face cache" in message and str(home / "hub") in message
    assert "HF_HUB_OFFLINE" in message
    assert f"huggingface-cli download {repo}" in message  # how to fix it
    assert not (home / "hub" / "models--jaxvllm-tests--no-such-model" / "snapshots").exists()
