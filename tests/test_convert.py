"""`jaxvllm convert`: a converted checkpoint loads to exactly the parameters, logits and greedy
tokens of the model it came from, stores the dtype asked for, and fails clearly on bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.checkpoint import (FORMAT_VERSION, STATE_DIR, _restore_state, load_converted,
                                read_marker, save_converted)
from jaxvllm.entrypoints.cli import main
from jaxvllm.models.loader import abstract_model, load_model
from jaxvllm.models.source import CHECKPOINT_MARKER
from jaxvllm.simple_generate import SimpleGenerator
from jaxvllm.tokenizer import load_tokenizer

PROMPT = [1, 17, 42, 99, 5, 63, 2, 88, 31]


def _tiny_hf_model(folder, torch_dtype=None, seed=0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger than the 0.02 default so that greedy tokens vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.save_pretrained(folder)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return _tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def converted(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny-jax"
    assert main(["convert", str(tiny_src), str(out), "--no-progress"]) == 0
    return out


def _params(loaded):
    return nnx.to_pure_dict(nnx.state(loaded.model))


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


def test_help_lists_options_and_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("SRC", "OUT", "--dtype", "--force", "--no-progress", "examples"):
        assert word in text


def test_cli_convert_writes_checkpoint_folder(converted, tiny_src):
    marker = read_marker(converted)
    assert marker["format_version"] == FORMAT_VERSION
    assert marker["architecture"] == "LlamaForCausalLM"
    assert marker["dtype"] == "float32"  # float32 safetensors stay float32
    assert marker["source"] == str(tiny_src) and marker["source_kind"] == "hf"
    assert marker["tokenizer"] is True
    assert (converted / STATE_DIR).is_dir()
    assert json.loads((converted / "config.json").read_text()) == json.loads(
        (tiny_src / "config.json").read_text())
    assert (converted / "tokenizer.json").read_bytes() == (tiny_src / "tokenizer.json").read_bytes()
    assert not list(converted.glob("*.safetensors"))
    text = "w5 w17 w99 w3"
    assert load_tokenizer(str(converted)).encode(text) == load_tokenizer(str(tiny_src)).encode(text)


def test_converted_logits_and_greedy_tokens_identical(converted, tiny_src):
    direct = load_model(str(tiny_src), dtype="float32")
    conv = load_model(str(converted), dtype="float32")
    assert conv.source.kind == "converted" and direct.source.kind == "hf"
    assert conv.config == direct.config
    assert conv.hf_config == direct.hf_config
    _assert_same_params(_params(conv), _params(direct))

    gen_d, gen_c = SimpleGenerator(direct.model), SimpleGenerator(conv.model)
    logits_d, logits_c = gen_d.prompt_logits(PROMPT), gen_c.prompt_logits(PROMPT)
    assert logits_d.dtype == np.float32 and np.array_equal(logits_d, logits_c)

    prompts = [PROMPT, [7, 8, 9]]
    tokens_d = gen_d.generate(prompts, max_tokens=8)
    assert tokens_d == gen_c.generate(prompts, max_tokens=8)
    assert len(set(tokens_d[0])) > 1  # the check is not vacuous


def test_bfloat16_storage(tiny_src, tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", str(tiny_src), str(out), "--dtype", "bfloat16", "--no-progress"]) == 0
    marker = read_marker(out)
    assert marker["dtype"] == "bfloat16"
    conv = load_model(str(out), dtype="bfloat16")
    stored = _restore_state(out / STATE_DIR,
                            nnx.to_pure_dict(nnx.state(abstract_model(conv.config, jnp.bfloat16))))
    assert {a.dtype.name for a in jax.tree.leaves(stored)} == {"bfloat16"}
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(stored))
    # the stored bfloat16 values are the float32 source rounded as the on-the-fly path rounds
    _assert_same_params(_params(conv), _params(load_model(str(tiny_src), dtype="bfloat16")))
    # and they load in another dtype too
    as_f32 = load_model(str(out), dtype="float32")
    logits = SimpleGenerator(as_f32.model).prompt_logits(PROMPT)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_auto_keeps_bfloat16_source(tmp_path):
    import torch

    src = _tiny_hf_model(tmp_path / "bf16_src", torch_dtype=torch.bfloat16, seed=1)
    out = save_converted(str(src), tmp_path / "out", progress=False)
    assert read_marker(out)["dtype"] == "bfloat16"
    _, _, params = load_converted(out, jnp.float32)
    _assert_same_params(params, _params(load_model(str(src), dtype="float32")))


def test_non_empty_out_needs_force(tiny_src, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["convert", str(tiny_src), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="not empty"):
        save_converted(str(tiny_src), out, progress=False)

    # --force writes the checkpoint (over an earlier one too) and leaves other files alone
    for _ in range(2):
        assert main(["convert", str(tiny_src), str(out), "--force", "--no-progress"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert load_model(str(out)).source.kind == "converted"


def test_out_may_not_be_the_source_folder(tiny_src):
    with pytest.raises(ValueError, match="source model's own folder"):
        save_converted(str(tiny_src), tiny_src, force=True, progress=False)
    assert (tiny_src / "config.json").is_file()


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    out = tmp_path / "out"
    assert main(["convert", str(missing), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "jaxvllm convert: error:" in err and str(missing) in err
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        save_converted(str(missing), out, progress=False)


def test_unsupported_source_and_dtype(tmp_path, converted):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        save_converted(str(bad), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="already a converted checkpoint"):
        save_converted(str(converted), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="stored dtype"):
        save_converted(str(converted), tmp_path / "out", dtype="int8", progress=False)


def test_broken_converted_folders(converted, tmp_path):
    no_state = tmp_path / "no_state"
    shutil.copytree(converted, no_state)
    shutil.rmtree(no_state / STATE_DIR)
    with pytest.raises(ValueError, match="weights are missing") as exc:
        load_model(str(no_state))
    assert str(no_state / STATE_DIR) in str(exc.value)

    old = tmp_path / "old_format"
    shutil.copytree(converted, old)
    marker = json.loads((old / CHECKPOINT_MARKER).read_text())
    (old / CHECKPOINT_MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(ValueError, match="unknown checkpoint format version 99") as exc:
        load_model(str(old))
    assert CHECKPOINT_MARKER in str(exc.value)

    no_marker = tmp_path / "no_marker"
    shutil.copytree(converted, no_marker)
    (no_marker / CHECKPOINT_MARKER).unlink()
    with pytest.raises(ValueError, match=CHECKPOINT_MARKER):
        load_converted(no_marker, jnp.float32)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(converted, corrupt)
    shutil.rmtree(corrupt / STATE_DIR / "d")
    with pytest.raises(ValueError, match="cannot restore"):
        load_model(str(corrupt))


@pytest.mark.slow
def test_convert_embedded_default_gguf(tmp_path):
    out = save_converted(None, tmp_path / "smollm2", progress=False)
    marker = read_marker(out)
    assert marker["dtype"] == "float32" and marker["source_kind"] == "gguf"
    assert (out / "tokenizer.json").is_file()
    conv = load_model(str(out), dtype="float32")
    direct = load_model(None, dtype="float32")
    assert conv.config == direct.config
    _assert_same_params(_params(conv), _params(direct))
