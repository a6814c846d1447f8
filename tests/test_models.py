"""Model parity with transformers (float32) for every supported family, on tiny random models:
full-prompt logits through the paged cache, and greedy decoding (batched, with and without
chunked prefill). Plus sharded and bf16 checkpoints, the registry and dtype resolution."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

try:
    from conftest import CASES, VOCAB, CaseSpec, build_hf_model
except ImportError:  # tests/ imported as a package
    from tests.conftest import CASES, VOCAB, CaseSpec, build_hf_model
from jaxvllm.models.config import resolve_dtype
from jaxvllm.models.loader import load_model
from jaxvllm.models.registry import REGISTRY, model_config_from_hf, supported_architectures
from jaxvllm.simple_generate import SimpleGenerator

NAMES = list(CASES)
NEW_TOKENS = 20

_rng = np.random.RandomState(1234)
# 45 tokens: 12 blocks of 4, 6 of 8, 3 of 16 (with the generated tokens even more)
LONG_PROMPT = [int(t) for t in _rng.randint(3, VOCAB, 45)]
PROMPTS = [
    [int(t) for t in _rng.randint(3, VOCAB, 5)],
    LONG_PROMPT,
    [int(t) for t in _rng.randint(3, VOCAB, 17)],
    [int(t) for t in _rng.randint(3, VOCAB, 1)],
]
LOGIT_RTOL = 1e-4  # max |ours - transformers| as a fraction of the largest |logit|


def hf_logits(model, prompt) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


def assert_logits_close(ours, ref, rtol=LOGIT_RTOL):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    assert diff <= rtol * scale, f"max |diff| {diff:.3g} > {rtol} * max |logit| {scale:.3g}"


_greedy_memo: dict[str, list[list[int]]] = {}


def hf_greedy(name, model) -> list[list[int]]:
    """transformers' greedy continuation of each of PROMPTS (NEW_TOKENS tokens, no early stop)."""
    if name not in _greedy_memo:
        outs = []
        for p in PROMPTS:
            ids = torch.tensor([p])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
        _greedy_memo[name] = outs
    return _greedy_memo[name]


def with_params(model, edit):
    """A copy of `model` whose pure-dict parameters went through `edit(params)`."""
    graphdef, state = nnx.split(model)
    params = jax_tree_to_numpy(nnx.to_pure_dict(state))
    edit(params)
    nnx.replace_by_pure_dict(state, jax_tree_to_jnp(params))
    return nnx.merge(graphdef, state)


def jax_tree_to_numpy(tree):
    return {k: jax_tree_to_numpy(v) if isinstance(v, dict) else np.array(v)
            for k, v in tree.items()}


def jax_tree_to_jnp(tree):
    return {k: jax_tree_to_jnp(v) if isinstance(v, dict) else jnp.asarray(v)
            for k, v in tree.items()}


def flat_params(model) -> dict[str, np.ndarray]:
    out = {}

    def walk(prefix, tree):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = np.asarray(v)

    walk("", nnx.to_pure_dict(nnx.state(model)))
    return out


# ---------------------------------------------------------------------------------------------
# The configs were translated as intended (so that each case tests what it claims to)
# ---------------------------------------------------------------------------------------------

EXPECTED_CONFIG = {
    "llama_gqa": dict(num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
                      qkv_bias=False, qk_norm=False, sliding_window=None),
    "llama_mha_tied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True, rope_theta=500.0),
    "mistral_sliding": dict(num_kv_heads=2, sliding_window=12, tie_word_embeddings=False),
    "qwen2_bias_tied": dict(qkv_bias=True, o_bias=False, tie_word_embeddings=True,
                            sliding_window=None),
    "qwen3_qknorm": dict(num_heads=4, num_kv_heads=1, head_dim=32, qk_norm=True, qkv_bias=False),
    "opt_prenorm": dict(norm="layer", pre_norm=True, final_norm=True, position="learned",
                        position_offset=2, mlp="plain", activation="relu", qkv_bias=True,
                        mlp_bias=True, tie_word_embeddings=True, has_projections=False),
    "opt_350m_style": dict(norm="layer", pre_norm=False, final_norm=False, word_embed_dim=32,
                           hidden_size=64, has_projections=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", NAMES)
def test_config_translation(zoo, name):
    lm = zoo.loaded(name)
    cfg = lm.config
    assert cfg.architecture == CASES[name].architecture
    assert (cfg.vocab_size, cfg.num_layers) == (VOCAB, 2)
    for field, value in EXPECTED_CONFIG[name].items():
        assert getattr(cfg, field) == value, field
    if name == "llama_gqa":
        scaling = cfg.rope_scaling_dict()
        assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
        assert scaling["original_max_position_embeddings"] == 64
    assert lm.dtype == jnp.float32
    for path, value in flat_params(lm.model).items():
        assert value.dtype == np.float32, path


# ---------------------------------------------------------------------------------------------
# (a) full-prompt logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_prompt_logits_match_transformers(zoo, name):
    case = zoo.case(name)
    lm = zoo.loaded(name)
    gen = SimpleGenerator(lm.model, block_size=case.spec.block_size)
    ours = gen.prompt_logits(LONG_PROMPT)
    assert_logits_close(ours, hf_logits(case.hf_model, LONG_PROMPT))
    # a short prompt inside a single block
    assert_logits_close(gen.prompt_logits(PROMPTS[0]), hf_logits(case.hf_model, PROMPTS[0]))


def test_mistral_long_prompt_exercises_the_window(zoo):
    """Sanity of the mistral case: dropping the window changes transformers' logits past it, so
    the parity above would catch a model that ignored `sliding_window`."""
    case = zoo.case("mistral_sliding")
    window = case.hf_model.config.sliding_window
    assert window < len(LONG_PROMPT)
    config = type(case.hf_model.config).from_dict(case.hf_model.config.to_dict())
    config.sliding_window = None
    import transformers

    full = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    full.load_state_dict(case.hf_model.state_dict())
    windowed, unwindowed = hf_logits(case.hf_model, LONG_PROMPT), hf_logits(full, LONG_PROMPT)
    scale = np.abs(windowed).max()
    assert np.abs(windowed[:window] - unwindowed[:window]).max() <= 1e-5 * scale
    assert np.abs(windowed[window:] - unwindowed[window:]).max() > 100 * LOGIT_RTOL * scale


@pytest.mark.parametrize("name, edit", [
    ("qwen2_bias_tied", lambda p: p["layers"]["k_bias"].fill(0.0)),
    ("qwen3_qknorm", lambda p: p["layers"]["q_norm"].fill(1.0)),
    ("opt_350m_style", lambda p: p["layers"]["mlp_norm_bias"].fill(0.0)),
    ("opt_prenorm", lambda p: p["final_norm_bias"].fill(0.0)),
    ("llama_gqa", lambda p: p["layers"]["attn_norm_scale"].fill(1.0)),
])
def test_parity_detects_a_dropped_bias_or_norm(zoo, name, edit):
    """The random biases/norm weights matter: resetting one to HF's init breaks parity."""
    case = zoo.case(name)
    broken = with_params(zoo.loaded(name).model, edit)
    ours = SimpleGenerator(broken, block_size=case.spec.block_size).prompt_logits(LONG_PROMPT)
    ref = hf_logits(case.hf_model, LONG_PROMPT)
    assert np.abs(ours - ref).max() > 100 * LOGIT_RTOL * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# (b) greedy decoding, batched, whole-prompt and chunked prefill
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(zoo, name):
    case = zoo.case(name)
    expected = hf_greedy(name, case.hf_model)
    assert all(len(e) == NEW_TOKENS for e in expected)
    # not a degenerate model repeating one token (which a broken decoder could match)
    assert len({t for e in expected for t in e}) >= 12 and len(set(expected[1])) >= 4, expected
    gen = SimpleGenerator(zoo.loaded(name).model, block_size=case.spec.block_size)
    got = gen.generate(PROMPTS, NEW_TOKENS)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (length {len(PROMPTS[i])})"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_chunked_prefill_matches_transformers(zoo, name):
    case = zoo.case(name)
    expected = hf_greedy(name, case.hf_model)
    gen = SimpleGenerator(zoo.loaded(name).model, block_size=case.spec.block_size)
    # chunks of 6 start mid-block for every block size and attend to the cached earlier chunks
    got = gen.generate(PROMPTS, NEW_TOKENS, prefill_chunk=6)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (length {len(PROMPTS[i])})"


def test_batching_does_not_change_results(zoo):
    """A prompt decoded alone gives what it gives inside the batch."""
    name = "qwen3_qknorm"
    gen = SimpleGenerator(zoo.loaded(name).model, block_size=CASES[name].block_size)
    alone = gen.generate([LONG_PROMPT], NEW_TOKENS)[0]
    assert alone == hf_greedy(name, zoo.case(name).hf_model)[1]


# ---------------------------------------------------------------------------------------------
# Checkpoint variants
# ---------------------------------------------------------------------------------------------

def test_sharded_checkpoint_loads_identically(zoo):
    name = "llama_gqa"
    folder = zoo.save_variant(name, "sharded", max_shard_size="40KB")
    index = folder / "model.safetensors.index.json"
    assert index.is_file()
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    assert {s.name for s in shards} == set(json.loads(index.read_text())["weight_map"].values())

    sharded = flat_params(load_model(str(folder), dtype="float32").model)
    single = flat_params(zoo.loaded(name).model)
    assert sharded.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(sharded[key], single[key], err_msg=key)


@pytest.fixture(scope="module")
def bf16_checkpoint(zoo):
    name = "qwen2_bias_tied"
    folder = zoo.save_variant(name, "bf16", torch_dtype=torch.bfloat16)
    import transformers

    # transformers' own float32 load of the bf16 files (casting the torch model instead would
    # also round its rotary inv_freq buffer)
    rounded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert rounded.model.embed_tokens.weight.dtype == torch.float32
    return name, folder, rounded


def test_bf16_checkpoint_as_float32(zoo, bf16_checkpoint):
    name, folder, rounded = bf16_checkpoint
    assert json.loads((folder / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    lm = load_model(str(folder), dtype="float32")
    assert lm.dtype == jnp.float32
    assert all(v.dtype == np.float32 for v in flat_params(lm.model).values())
    ours = SimpleGenerator(lm.model, block_size=8).prompt_logits(LONG_PROMPT)
    # exact bf16 weights widened to float32: as tight as the float32 checkpoint
    assert_logits_close(ours, hf_logits(rounded, LONG_PROMPT))


def test_bf16_checkpoint_as_bfloat16(zoo, bf16_checkpoint):
    name, folder, rounded = bf16_checkpoint
    lm = load_model(str(folder), dtype="bfloat16")
    assert lm.dtype == jnp.bfloat16
    params = flat_params(lm.model)
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    # the bf16 weights arrive bit-exact
    ref_embed = rounded.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(params["embed"].astype(np.float32), ref_embed)
    ours = SimpleGenerator(lm.model, block_size=8).prompt_logits(LONG_PROMPT)
    assert ours.dtype == np.float32
    ref = hf_logits(rounded, LONG_PROMPT)
    assert_logits_close(ours, ref, rtol=5e-2)  # bf16 activations: loose
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.8


def test_auto_dtype_on_cpu_is_float32(zoo, bf16_checkpoint):
    import jax

    expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert resolve_dtype("auto") is expected
    assert resolve_dtype(None) is expected
    _, folder, _ = bf16_checkpoint
    if jax.default_backend() == "cpu":
        # a bf16 checkpoint still runs in float32 on CPU unless asked otherwise
        lm = load_model(str(folder))
        assert lm.dtype == jnp.float32
        assert flat_params(lm.model)["embed"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Registry and dtype strings
# ---------------------------------------------------------------------------------------------

FIVE = ["LlamaForCausalLM", "MistralForCausalLM", "OPTForCausalLM", "Qwen2ForCausalLM",
        "Qwen3ForCausalLM"]


def test_registry_lists_the_five_architectures():
    assert supported_architectures() == FIVE
    assert set(REGISTRY) == set(FIVE)
    assert REGISTRY["OPTForCausalLM"].__name__.endswith(".opt")
    assert REGISTRY["Qwen3ForCausalLM"].__name__.endswith(".llama")


@pytest.mark.parametrize("name", NAMES)
def test_model_config_from_hf_dict(zoo, name):
    hf = json.loads((zoo.case(name).path / "config.json").read_text())
    assert model_config_from_hf(hf).architecture == hf["architectures"][0]


def test_config_missing_key_is_a_value_error(zoo):
    hf = json.loads((zoo.case("llama_gqa").path / "config.json").read_text())
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        model_config_from_hf(hf, "some/config.json")


@pytest.mark.parametrize("alias, expected", [
    ("float32", jnp.float32), ("fp32", jnp.float32), ("bfloat16", jnp.bfloat16),
    ("bf16", jnp.bfloat16), ("float16", jnp.float16), ("half", jnp.float16),
    (jnp.bfloat16, jnp.bfloat16), (np.float32, jnp.float32),
])
def test_dtype_aliases(alias, expected):
    assert resolve_dtype(alias) is expected


@pytest.mark.parametrize("bad", ["float8", "int8", "bfloat", "fp64", np.int32])
def test_bad_dtype_raises_value_error(bad):
    with pytest.raises(ValueError, match="not supported") as info:
        resolve_dtype(bad)
    assert "float32" in str(info.value) and "bfloat16" in str(info.value)


def test_load_model_with_bad_dtype_raises_value_error(llama_folder):
    with pytest.raises(ValueError, match=r"'int4'.*float32"):
        load_model(str(llama_folder), dtype="int4")


# ---------------------------------------------------------------------------------------------
# Unrolled layers (per-layer, fused weights)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_unrolled_layers_match_transformers(zoo, name):
    """The unrolled model (separate per-layer arrays, q/k/v and gate/up fused) gives the
    prompt logits and greedy tokens of transformers, as the scan does."""
    case = zoo.case(name)
    lm = load_model(str(case.path), dtype="float32")  # unrolling changes the module in place
    lm.model.unroll_layers()
    state = nnx.to_pure_dict(nnx.state(lm.model))
    layers = state["layers"]["per_layer"]
    assert len(layers) == lm.config.num_layers
    assert not any(k.endswith("_proj") for k in state["layers"]), "stacked weights left behind"
    first = layers[0]
    cfg = lm.config
    if cfg.mlp == "gated":
        assert first["gate_up_proj"].shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
        assert "gate_proj" not in first and "up_proj" not in first
    assert first["qkv_proj"].shape == (cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)
    assert ("qkv_bias" in first) == cfg.qkv_bias

    gen = SimpleGenerator(lm.model, block_size=case.spec.block_size)
    assert_logits_close(gen.prompt_logits(LONG_PROMPT), hf_logits(case.hf_model, LONG_PROMPT))
    got = gen.generate(PROMPTS, NEW_TOKENS, prefill_chunk=6)
    assert got == hf_greedy(name, case.hf_model)


def _qwen2_head_dim_32():
    import transformers

    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=256,
                                    tie_word_embeddings=False, use_sliding_window=False,
                                    bos_token_id=1, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def qwen2_head_dim_32(tmp_path_factory):
    """A Qwen2 of head dim 32: its rotation partners fill whole 16-column tiles, so the
    small-batch QKV kernel applies the rotary embeddings itself."""
    spec = CaseSpec(_qwen2_head_dim_32, "Qwen2ForCausalLM", 8, 8)
    model = build_hf_model(spec)
    path = tmp_path_factory.mktemp("qwen2_head_dim_32")
    model.save_pretrained(path)
    return model, path


# gated MLP with GQA and llama3 rope scaling (head dim 16: the rotation in XLA); q/k norms;
# a LayerNorm model (unfused); Qwen2's biases at head dim 32 (the rotation in the QKV kernel)
@pytest.mark.parametrize("name", ["llama_gqa", "qwen3_qknorm", "opt_prenorm",
                                  "qwen2_head_dim_32"])
def test_small_batch_matmuls_match_transformers(zoo, name, monkeypatch, request):
    """With `small_batch_matmuls` (Pallas kernels, interpreted on the CPU) the unrolled model
    still gives transformers' logits and greedy tokens; every RMSNorm model runs them."""
    from pallas_kernels import small_batch_matmul

    calls = []
    kernel = small_batch_matmul.fused_matmul
    monkeypatch.setattr(small_batch_matmul, "fused_matmul",
                        lambda *a, **k: calls.append(k) or kernel(*a, **k))
    if name == "qwen2_head_dim_32":
        hf_model, path, block_size = *request.getfixturevalue(name), 8
    else:
        case = zoo.case(name)
        hf_model, path, block_size = case.hf_model, case.path, case.spec.block_size
    lm = load_model(str(path), dtype="float32")
    lm.model.unroll_layers()
    lm.model.small_batch_matmuls = True
    gen = SimpleGenerator(lm.model, block_size=block_size)
    assert_logits_close(gen.prompt_logits(LONG_PROMPT), hf_logits(hf_model, LONG_PROMPT))
    assert gen.generate(PROMPTS, NEW_TOKENS, prefill_chunk=6) == hf_greedy(name, hf_model)
    if lm.config.norm == "rms":  # all four projections ran as kernels
        kinds = {("norm" if k.get("norm_scale") is not None else "")
                 + ("+gate" if k.get("gated_act") else "")
                 + ("+residual" if k.get("residual") is not None else "") for k in calls}
        assert kinds == {"norm", "norm+gate", "+residual"}, kinds
    else:
        assert not calls
    rotated = any(k.get("rope_columns") for k in calls)
    assert rotated == (name == "qwen2_head_dim_32"), "rotary embeddings in the kernel"


def test_small_batch_matmuls_in_bfloat16(qwen2_head_dim_32):
    """In bfloat16 the kernels' prompt logits stay within bfloat16's rounding of XLA's."""
    _, path = qwen2_head_dim_32
    logits = []
    for fused in (False, True):
        lm = load_model(str(path), dtype="bfloat16")
        lm.model.unroll_layers()
        lm.model.small_batch_matmuls = fused
        logits.append(SimpleGenerator(lm.model, block_size=8).prompt_logits(LONG_PROMPT[:30]))
    assert_logits_close(logits[1], logits[0], rtol=3e-2)
    assert not np.array_equal(logits[1], logits[0])  # the kernels did run


def test_one_kernel_layers_generate_what_xla_generates(qwen2_head_dim_32, zoo):
    """With `decode_layer_kernel` each layer of a multi-step decode call is one kernel
    (pallas_kernels/decode_layer.py, interpreted here): the engine's greedy tokens equal
    XLA's. A model it cannot run (head dim 16: no whole tile of rotation partners) is a
    ValueError."""
    import jax

    from jaxvllm import LLM, SamplingParams

    _, path = qwen2_head_dim_32
    kwargs = dict(attention_backend="pallas", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32, num_scheduler_steps=4)
    # 3 requests: a step of 4 rows, one of them padding
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65, 35, 89][: 2 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    generate = lambda llm: [o.outputs[0].token_ids
                            for o in llm.generate(prompts, params, use_tqdm=False)]
    want = generate(LLM(str(path), **kwargs))
    one = LLM(str(path), **kwargs, decode_layer_kernel=True)
    runner = one.llm_engine.runner
    key, args = runner.dummy_multi_step(one.llm_engine.vocab_size, runner.multi_step_rows(2),
                                        runner.min_table_width)
    step, args, _ = runner.step_function(key, args)
    assert "decode_layer_t" in str(jax.make_jaxpr(step)(*args))
    assert generate(one) == want
    assert runner.counters.multi_steps > 0
    assert one.llm_engine.stats()["decode_layer_rows"] == 64
    with pytest.raises(ValueError, match="decode_layer_kernel=True needs"):
        LLM(str(zoo.case("llama_gqa").path), **kwargs, decode_layer_kernel=True)
