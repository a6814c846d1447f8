"""kv_cache_dtype: a narrower KV cache than the model's weights (vLLM's option of that name)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def folder(zoo):
    return str(zoo.case("llama_gqa").path)


def prompt_logprobs(llm, prompt):
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return np.array([entry[token].logprob
                     for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])


def test_bfloat16_cache_is_stored_narrow_and_stays_close(folder):
    kwargs = dict(block_size=4, max_model_len=64, num_gpu_blocks_override=40)
    full = LLM(folder, **kwargs)
    narrow = LLM(folder, kv_cache_dtype="bfloat16", **kwargs)
    assert full.llm_engine.runner.kv.k.dtype == jnp.float32
    assert narrow.llm_engine.runner.kv.k.dtype == jnp.bfloat16
    prompt = [int(t) for t in np.random.RandomState(1).randint(3, 256, 30)]
    a, b = prompt_logprobs(full, prompt), prompt_logprobs(narrow, prompt)
    assert not np.array_equal(a, b)  # the cache really is rounded
    np.testing.assert_allclose(a, b, atol=5e-2)


def test_bad_kv_cache_dtype(folder):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(folder, kv_cache_dtype="int4")
