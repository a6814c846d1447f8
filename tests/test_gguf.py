"""GGUF loading: the embedded SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF
path, the rotary row permutation, a tiny GGUF written here from a random HF Llama, and the
errors for unsupported quant types, unsupported architectures and unreadable files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from jaxvllm.models.gguf_file import GGUF_ARCHITECTURES, GGUFModel, unpermute_rotary_rows
from jaxvllm.models.loader import load_model
from jaxvllm.simple_generate import SimpleGenerator
from jaxvllm.tokenizer import load_tokenizer

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who",
]


@pytest.fixture(scope="session")
def smollm():
    """Our load of the embedded default model (the package's default when `model` is None)."""
    lm = load_model(None, dtype="float32")
    assert lm.source.kind == "gguf" and lm.source.path.suffix == ".gguf"
    return lm


@pytest.fixture(scope="session")
def smollm_tok():
    return load_tokenizer(None)


@pytest.fixture(scope="session")
def smollm_hf(smollm):
    """transformers' own GGUF loader (its dequantization and its q/k un-permutation)."""
    import transformers

    path = smollm.source.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm_gen(smollm):
    return SimpleGenerator(smollm.model, block_size=16)


def hf_greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_smollm_config(smollm):
    cfg = smollm.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        (30, 576, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 100000.0


def test_smollm_weights_match_transformers_gguf(smollm, smollm_hf):
    """Layer 0 and the embedding, dequantized and un-permuted, equal transformers' tensors."""
    hf_layer = smollm_hf.model.layers[0]
    ours = smollm.model.layers
    pairs = {
        "q_proj": hf_layer.self_attn.q_proj.weight, "k_proj": hf_layer.self_attn.k_proj.weight,
        "v_proj": hf_layer.self_attn.v_proj.weight, "o_proj": hf_layer.self_attn.o_proj.weight,
        "gate_proj": hf_layer.mlp.gate_proj.weight, "down_proj": hf_layer.mlp.down_proj.weight,
    }
    for name, hf_weight in pairs.items():
        np.testing.assert_allclose(np.asarray(getattr(ours, name)[...][0]),
                                   hf_weight.detach().numpy().T, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(ours.attn_norm_scale[...][0]),
                               hf_layer.input_layernorm.weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(smollm.model.embed[...]),
                               smollm_hf.model.embed_tokens.weight.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_smollm_logits_match_transformers_gguf(smollm_gen, smollm_hf, smollm_tok, prompt):
    ids = smollm_tok.encode(prompt)
    assert len(ids) > 3
    ours = smollm_gen.prompt_logits(ids)
    with torch.no_grad():
        ref = smollm_hf(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape == (len(ids), 49152)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-3 * scale, f"max |diff| {diff:.3g}, max |logit| {scale:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_smollm_knows_the_capital_of_france(smollm_gen, smollm_tok):
    ids = smollm_tok.encode("The capital of France is")
    out = smollm_gen.generate([ids], 4)[0]
    assert smollm_tok.decode(out).startswith(" Paris"), smollm_tok.decode(out)


def test_smollm_greedy_matches_transformers_gguf(smollm_gen, smollm_hf, smollm_tok):
    prompts = [smollm_tok.encode(TEXT_PROMPTS[1]), smollm_tok.encode(TEXT_PROMPTS[2])]
    expected = [hf_greedy(smollm_hf, ids, 16) for ids in prompts]
    got = smollm_gen.generate(prompts, 16)
    eos = set(smollm_tok.all_special_ids)
    for g, e in zip(got, expected):
        assert not eos & set(g), "a special token inside 16 tokens: pick another prompt"
        assert g == e, (smollm_tok.decode(g), smollm_tok.decode(e))


def test_smollm_chat_template_is_chatml(smollm, smollm_tok):
    template = smollm_tok.chat_template
    assert template and "<|im_start|>" in template
    # it is the GGUF's `tokenizer.chat_template` string, stored verbatim in the metadata
    # (a byte search: parsing the whole metadata again takes seconds)
    key = b"tokenizer.chat_template"
    with open(smollm.source.path, "rb") as f:
        head = f.read(16 << 20)
    at = head.find(key)
    assert at > 0
    value = head[at + len(key):]
    # value type (u32 = 8, string) and u64 length precede the UTF-8 bytes
    assert int.from_bytes(value[:4], "little") == gguf.GGUFValueType.STRING
    length = int.from_bytes(value[4:12], "little")
    assert value[12:12 + length].decode("utf-8") == template
    text = smollm_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                          tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = smollm_tok.encode(text)
    assert ids.count(smollm_tok.convert_tokens_to_ids("<|im_start|>")) == text.count("<|im_start|>")


# ---------------------------------------------------------------------------------------------
# llama.cpp's rotary permutation
# ---------------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation: each head's rows viewed as [2, D/2] -> [D/2, 2]."""
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


@pytest.mark.parametrize("n_heads, head_dim, cols", [(1, 4, 3), (3, 8, 5), (4, 16, 64), (2, 64, 0)])
def test_unpermute_is_the_inverse_of_llama_cpp_permute(n_heads, head_dim, cols):
    rng = np.random.default_rng(n_heads * 100 + head_dim)
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, n_heads), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_rotary_rows(w, n_heads), n_heads), w)


def test_permutation_row_order():
    """Row r = h*D + 2*i + j of the GGUF tensor is HF row h*D + j*D/2 + i."""
    n_heads, d = 2, 6
    hf_rows = np.arange(n_heads * d)
    gguf_rows = llama_cpp_permute(hf_rows, n_heads)
    assert gguf_rows.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    assert unpermute_rotary_rows(gguf_rows, n_heads).tolist() == hf_rows.tolist()


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written here
# ---------------------------------------------------------------------------------------------

def llama_metadata(writer: gguf.GGUFWriter, arch: str, *, layers=1, hidden=32, ffn=64, heads=2,
                   kv_heads=2, vocab=8, ctx=64, theta=10000.0, eps=1e-6):
    writer.add_uint32(f"{arch}.block_count", layers)
    writer.add_uint32(f"{arch}.embedding_length", hidden)
    writer.add_uint32(f"{arch}.feed_forward_length", ffn)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_uint32(f"{arch}.context_length", ctx)
    writer.add_uint32(f"{arch}.vocab_size", vocab)
    writer.add_float32(f"{arch}.rope.freq_base", theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", eps)


def write_gguf(path, arch, tensors, **metadata):
    """tensors: (name, array, raw_dtype or None); quantized arrays are uint8 [rows, bytes]."""
    writer = gguf.GGUFWriter(str(path), arch)
    llama_metadata(writer, arch, **metadata)
    for name, array, raw_dtype in tensors:
        if raw_dtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_llama_gguf_matches_transformers(tmp_path):
    """A random GQA Llama written as GGUF the way llama.cpp does it (q/k rows permuted, F32 and
    F16 tensors) loads to the same logits as transformers on the original weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000.0,
                                      tie_word_embeddings=False, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
        # store the MLP in F16 and make the reference use the same rounded values
        for layer in hf.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(lin.weight.half().float())
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    tensors = [("token_embd.weight", sd["model.embed_tokens.weight"], None),
               ("output_norm.weight", sd["model.norm.weight"], None),
               ("output.weight", sd["lm_head.weight"], None)]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(2):
        for g, h in names.items():
            w = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                w = llama_cpp_permute(w, 4)
            elif g == "attn_k":
                w = llama_cpp_permute(w, 2)
            if g.startswith("ffn_") and g != "ffn_norm":
                w = w.astype(np.float16)
            tensors.append((f"blk.{i}.{g}.weight", np.ascontiguousarray(w), None))
    path = write_gguf(tmp_path / "tiny-llama.gguf", "llama", tensors, layers=2, hidden=32, ffn=48,
                      heads=4, kv_heads=2, vocab=64, ctx=64, theta=1000.0, eps=1e-5)

    lm = load_model(str(path), dtype="float32")
    assert lm.source.kind == "gguf"
    assert (lm.config.num_kv_heads, lm.config.tie_word_embeddings, lm.config.rope_theta) == \
        (2, False, 1000.0)
    ids = [int(t) for t in np.random.RandomState(0).randint(0, 64, 21)]
    ours = SimpleGenerator(lm.model, block_size=4).prompt_logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_1, gguf.GGMLQuantizationType.Q8_K])
def test_unsupported_quant_type_names_file_tensor_and_type(tmp_path, qtype):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    hidden = block  # one quant block per row
    vocab = 8
    raw = np.random.RandomState(0).randint(0, 256, (vocab, nbytes)).astype(np.uint8)
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", "llama",
                      [("token_embd.weight", raw, qtype),
                       ("output_norm.weight", np.ones(hidden, np.float32), None)],
                      hidden=hidden, vocab=vocab, heads=2, kv_heads=2)
    with pytest.raises(ValueError) as info:
        load_model(str(path), dtype="float32")
    message = str(info.value)
    assert str(path) in message
    assert "token_embd.weight" in message
    assert qtype.name in message


@pytest.mark.parametrize("arch", ["falcon", "gpt2"])
def test_unsupported_gguf_architecture_lists_supported(tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch,
                      [("token_embd.weight", np.zeros((8, 32), np.float32), None)])
    with pytest.raises(ValueError) as info:
        load_model(str(path))
    message = str(info.value)
    assert str(path) in message and repr(arch) in message and "not supported" in message
    for supported in GGUF_ARCHITECTURES:
        assert supported in message


def _valid_tiny_gguf(path):
    return write_gguf(path, "llama", [("token_embd.weight", np.ones((8, 32), np.float32), None),
                                      ("output_norm.weight", np.ones(32, np.float32), None)])


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated_header", "truncated_data"])
def test_unreadable_gguf_names_the_file(tmp_path, damage):
    good = _valid_tiny_gguf(tmp_path / "good.gguf").read_bytes()
    assert GGUFModel(tmp_path / "good.gguf").gguf_architecture == "llama"
    data = {"garbage": b"this is not a gguf file at all" * 10, "empty": b"",
            "truncated_header": good[:40], "truncated_data": good[:-100]}[damage]
    path = tmp_path / f"{damage}.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_cached_gguf_tokenizer_equals_the_rebuilt_one_and_loads_without_torch(smollm):
    """The second load reads the cache (a plain fast tokenizer: no model config, so no torch
    import on the way) and tokenizes, decodes and templates exactly as the first build."""
    import subprocess
    import sys

    from jaxvllm.tokenizer import _byte_level_bpe_from_gguf, tokenizer_from_gguf

    path = smollm.source.path
    cached = tokenizer_from_gguf(path)  # builds the cache entry if it is not there yet
    built = _byte_level_bpe_from_gguf(path)
    text = "Hello <|im_start|>wörld  \n\tdef f(x): return x**2 <|endoftext|>"
    assert cached.encode(text) == built.encode(text)
    assert cached.decode(built.encode(text)) == built.decode(built.encode(text))
    assert (cached.bos_token, cached.eos_token) == (built.bos_token, built.eos_token)
    messages = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        built.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    code = ("import sys; from jaxvllm.tokenizer import load_tokenizer; "
            "tok = load_tokenizer(None); print(tok.encode('Paris'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout


@pytest.mark.parametrize("type_name, block_bytes", [("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)])
def test_whole_tensor_dequantization_equals_the_gguf_package(type_name, block_bytes):
    from jaxvllm.models.gguf_file import dequantize_whole

    rng = np.random.default_rng(block_bytes)
    raw = rng.integers(0, 256, (640, block_bytes), dtype=np.uint8)
    raw[:, 1] &= 0x3B  # finite float16 scales (and minimums): exponent bits below all-ones
    raw[:, 3] &= 0x3B
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    want = gguf.quants.dequantize(raw.reshape(20, -1), qtype).reshape(-1)
    got = dequantize_whole(raw.reshape(-1), type_name)
    assert got.dtype == np.float32 and got.size == 640 * 32
    np.testing.assert_array_equal(got.reshape(-1), want)
    assert dequantize_whole(raw.reshape(-1), "Q5_K") is None  # left to the gguf package
