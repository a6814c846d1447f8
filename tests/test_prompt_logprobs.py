"""prompt_logprobs: every prompt token's logprob under the model, across prefill chunks."""

import numpy as np
import pytest
import torch

from jaxvllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def case(zoo):
    return zoo.case("llama_gqa")


@pytest.fixture(scope="module")
def llm(case):
    # a 16-token budget splits the 37-token prompt over three steps
    return LLM(str(case.path), max_num_batched_tokens=16, block_size=4, max_model_len=128)


def reference_logprobs(hf_model, prompt):
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_prompt_logprobs_match_transformers_over_chunks(llm, case):
    prompt = [int(t) for t in np.random.RandomState(0).randint(3, 256, 37)]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    ref = reference_logprobs(case.hf_model, prompt)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for j in range(1, len(prompt)):
        entry = plp[j]
        assert prompt[j] in entry and len(entry) >= 3
        assert entry[prompt[j]].logprob == pytest.approx(ref[j - 1, prompt[j]], abs=1e-4)
        top = sorted(entry.values(), key=lambda lp: lp.rank)
        expected_top = np.sort(ref[j - 1])[::-1][:3]
        got_top = [lp.logprob for lp in top if lp.rank <= 3][:3]
        np.testing.assert_allclose(got_top, expected_top, atol=1e-4)
        assert entry[prompt[j]].rank == 1 + int(np.sum(ref[j - 1] > ref[j - 1, prompt[j]] + 1e-6))


def test_prompt_logprobs_off_by_default_and_no_prefix_cache_reuse(llm):
    prompt = list(range(3, 40))
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2),
                         use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    # the same prompt again: its blocks are cached, but prompt logprobs need every position
    again = llm.generate({"prompt_token_ids": prompt},
                         SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert all(len(e) >= 1 for e in again.prompt_logprobs[1:])
    assert again.outputs[0].token_ids == plain.outputs[0].token_ids


def test_too_many_prompt_logprobs_rejected(llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([5, 6, 7], SamplingParams(prompt_logprobs=21), use_tqdm=False)
    assert llm.llm_engine.kv_manager.usage == 0
